"""Host side of the Triton kernels: launch, per-shape configs (one place), custom ops.

Regimes, chosen in :func:`gemm_config` only:
  MXFP4, M <= 8:      split-quantize to FP16 operands, then the fragment GEMM (frag_gemm.py: the
                      weights stored in MMA fragment order, unpacked by byte lookups), launched
                      overlapped with split-quantize (overlap.py).
  MXFP4 on Hopper, 9-1024 tokens where it measured faster (_wgmma_wins): split-quantize to e4m3
                      operands, then the Gluon wgmma GEMM (wgmma_gemm.py: TMA ring, weights unpacked
                      by byte lookups into wgmma's register operand, or for the widest layers' 128 x 256
                      tiles into shared memory with an async wgmma while the next step unpacks).
  MXFP4, 17-64 tokens (9-128 where K >= N, to 256 where N >= 16384 or K >= 3N): split-quantize to e4m3
                      operands, then the transposed GEMM with the block factors folded into
                      e4m3 weights (wgmma, the unpacked weights from registers; fold_config).
  small M otherwise (<= 16 tokens, INT4 <= 64): split-quantize to FP16 (or e4m3) operands, then the
                      transposed GEMM (``osc_gemm_t_kernel``: y^T = W · A^T, the 4-bit weights the
                      left MMA operand, unpacked where they land); split-K when N alone gives too
                      few weight tiles. The run time is the 4-bit weight stream plus launch latency.
  prefill (otherwise): FP8 operands on wgmma. 4-bit weights are first expanded to an e4m3
                      workspace (one memory-bound pass, exact for blocks within 2**-9 of their
                      row's largest), then a plain FP8 GEMM with the BF16 branch fused runs:
                      unpacking inside the main loop would make it ALU-bound.
FP8-fallback layers (e4m3 weights) use the plain GEMM at every M.
NVFP4 (no e4m3 holds an e2m1 value times its e4m3 block scale; FP16 does): FP16 operands at every M. On Hopper
                      up to 64-256 tokens by shape, the wgmma GEMM on FP16 operands (the codes unpacked in
                      registers times their block factors; INT4 with group scales too, _f16_wgmma_wins).
                      Otherwise the transposed GEMM up to 64 tokens, then the weights expanded to FP16 (exact)
                      and, on Hopper, cuBLAS's FP16 GEMM into FP32 with epilogue_kernel after it, elsewhere our
                      plain GEMM on FP16 (nvfp4_config).
INT4 with group scales (a token's scale and a weight's differ from group to group, so neither folds exactly into
                      an operand): up to 64 tokens the int4 values as operands on the transposed GEMM, each group's
                      partial product times its two scales in FP32; above, each value times its group's scale over
                      the row's largest, rounded once to FP16, for weights (expanded) and activations, and the
                      FP16 GEMM as for NVFP4 (int4_group_config).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton

from .layout import FragWeights, KernelWeights, group_kernel, kernel_weights
from .overlap import prefer_shared_carveout
from .triton_osc import (FMT_FP8, FMT_INT4, FMT_MXFP4, FMT_NVFP4, MODE_F8, MODE_F16, MODE_PACKED, decode_weights_kernel,
                         epilogue_kernel, head_norm_kernel, osc_gemm_kernel, osc_gemm_t_kernel, split_quantize_kernel)

FMT_IDS = {"mxfp4": FMT_MXFP4, "int4": FMT_INT4, "fp8": FMT_FP8, "nvfp4": FMT_NVFP4}
DECODE_MAX_M = 16
FRAG_MAX_M = 8  # the fragment GEMM's one token group; at 9-16 tokens the transposed GEMM measured faster
SWAP_MAX_M = 64
MAX_K = 32768  # split_quantize keeps a whole row in registers


# Triton decides at import whether its kernels run compiled or in the CPU interpreter
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    return INTERPRETED


# programmatic dependent launch (overlap.py) of split-quantize and the GEMM after it (GemmConfig.pdl):
# OSCQUANT_PDL=0, or setting this False, launches them one after the other (scripts/pdl_rows.py times both)
PDL = os.environ.get("OSCQUANT_PDL", "1") != "0"


def overlapped(m: int, k_pad: int, wgmma: bool = False) -> dict:
    """How a GEMM is launched after split-quantize (overlap.py): released from split-quantize's start (early), or once
    its programs have issued their stores (late). Early, with split-quantize's shared-memory carve-out raised: at 16-64
    tokens 0.1-1.3 µs faster than late back to back on every layer with K <= 4096 (docs/bench/h200_carveout_2026-11-30.md),
    the folded GEMM at 96-128 tokens 0.3-0.8 µs flushed and 0.4-0.6 back to back (docs/bench/h200_pdl_fold_2026-11-30.md),
    the wgmma GEMM above 64 tokens 2-6 % at 256 (docs/bench/h200_wgmma_pdl_2026-11-29.md). Late where K > 4096, whose long
    rows hold registers that leave no room for a GEMM program beside them (8B down at 9-64 tokens: early up to 4 µs
    slower), except for the wgmma GEMM above 64 tokens."""
    late = k_pad > 4096 and not (wgmma and m > SWAP_MAX_M)
    return dict(pdl=True, pdl_late=late)


def pdl_launch(device: torch.device, want: bool = True) -> dict:
    """The kernel arguments for a launch that may overlap the kernel before it: sm_90 and newer only
    (griddepcontrol is Hopper PTX), never in the CPU interpreter."""
    on = want and PDL and not INTERPRETED and device.type == "cuda" and _major(device) >= 9
    return dict(PDL=True, launch_pdl=True) if on else dict(PDL=False)


_MAJOR: dict = {}


def _major(device: torch.device) -> int:
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _MAJOR:
        _MAJOR[i] = torch.cuda.get_device_capability(i)[0]
    return _MAJOR[i]


def supported(layer, x: torch.Tensor) -> str | None:
    """None if the kernels can run this call, else the reason they cannot."""
    s = layer.scheme
    if s.format not in FMT_IDS or (s.format == "int4" and not group_kernel(s.group_size or 0)):
        return (f"format {s.format} (group_size={s.group_size}) has no kernel; the kernels take mxfp4, nvfp4, fp8, and "
                "int4 per row or in groups of a power of two from 32 columns")
    if not (x.is_cuda or (INTERPRETED and os.environ.get("OSCQUANT_BACKEND") == "triton")):
        return "the input is not on a CUDA device"
    if layer.in_features > MAX_K:
        return f"K={layer.in_features} exceeds the kernels' {MAX_K}"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"input dtype {x.dtype} is not supported"
    return None


# ------------------------------------------------------------------ split-quantize
@dataclass(frozen=True)
class KernelNorm:
    """The RMSNorm before a layer, run inside its split-quantize (norms.py): x * rsqrt(mean(x**2) + eps) * factor,
    rounded to x's dtype; kind 1 rounds the normalized row before the factors too (Llama), kind 2 only after (Gemma,
    whose factors are 1 + weight)."""
    factor: torch.Tensor  # fp32 [K]
    eps: float
    kind: int


@dataclass(frozen=True)
class KernelHeadNorm:
    """The per-head RMSNorms of q and k (Qwen3's q_norm and k_norm), run on the stacked q/k/v layer's output
    (head_norms.py): the first q_heads heads of head_dim columns with factor[0], the next k_heads with factor[1]."""
    factor: torch.Tensor  # fp32 [2, head_dim]
    eps: float
    kind: int  # as KernelNorm's
    q_heads: int
    k_heads: int

    @property
    def head_dim(self) -> int:
        return self.factor.shape[1]


def head_norm_(y: torch.Tensor, hn: KernelHeadNorm) -> torch.Tensor:
    """y [M, >= (q_heads + k_heads) * head_dim], its q and k heads normalized in place (head_norm_kernel)."""
    d, heads = hn.head_dim, hn.q_heads + hn.k_heads
    if y.dim() != 2 or y.stride(1) != 1 or y.shape[1] < heads * d or d & (d - 1) or hn.factor.dtype != torch.float32:
        raise ValueError(f"head norms take rows of contiguous columns holding {hn.q_heads} + {hn.k_heads} heads of a "
                         f"power-of-two head_dim and FP32 factors; got {tuple(y.shape)}, head_dim {d}, "
                         f"{hn.factor.dtype}")
    if y.shape[0]:
        head_norm_kernel[(y.shape[0],)](y, y.stride(0), hn.factor, hn.q_heads, hn.k_heads, hn.eps, D=d,
                                        BH=triton.next_power_of_2(heads), NORM=hn.kind, INTERPRET=interpreting(),
                                        num_warps=4)
    return y


def split_quantize(x: torch.Tensor, keep: torch.Tensor, outlier_idx: torch.Tensor, fmt: str, mode: int,
                   k_pad: int, out: tuple | None = None, rows: int | None = None, pdl: bool = False,
                   pdl_late: bool = False, shared_beside: bool = True, src: torch.Tensor | None = None,
                   grp: torch.Tensor | None = None, group: int = 0, fold_groups: bool = False,
                   norm: KernelNorm | None = None, act: int = 0):
    """x [M, K] -> (x_o bf16 [M, k], q, scales). mode MODE_PACKED: q = canonical codes [M, k_pad/2]
    and scales = E8M0 [M, k_pad/32] (mxfp4), per-token FP32 (int4), or for nvfp4 the pair (e4m3 [M, k_pad/16],
    per-token FP32 global scales); else q = operand
    [M, k_pad] (fp16 or e4m3) and scales = per-row FP32. ``group`` (int4 only, a power of two from 32 dividing k_pad):
    a scale per ``group`` columns of a token, scales = FP32 [M, k_pad / group] in every mode; with ``fold_groups``
    (MODE_F16) each operand is its value times its group's scale over the token's largest, rounded once to FP16, and
    scales is that largest scale per token (the prefill path of int4_group_config). ``out`` = (xo, q, sc, rs) buffers to
    write into (tests poison them first). ``pdl``: the GEMM after it is launched overlapped, from the start of
    this kernel's programs or (``pdl_late``) from when they have issued their stores; ``shared_beside``: that kernel
    needs shared memory, so this one runs with the largest shared-memory carve-out (overlap.py). The prefill path's
    weight expansion, which needs none, runs beside it with the default carve-out instead: with the raised one,
    split-quantize there took 2-15 µs longer at 256-4096 tokens (docs/bench/h200_carveout_expand_2026-11-30.md).
    ``src``, ``grp`` (int32 [P], MoE experts, moe.py): output row p is x row src[p] split by group grp[p]'s outlier
    channels, keep [groups, k_pad] and outlier_idx [groups, k]. ``norm``: x is the input of the RMSNorm before the
    layer, which runs first, on each row in registers (norms.py). ``act`` (1: SiLU, 2: GELU's tanh form; gated.py):
    x [M, 2K] holds a gated MLP's gate and up projections side by side, and the layer's input act(gate) * up is
    computed here; outputs as for an input [M, K]."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("split_quantize takes a 2-D input with contiguous rows")
    if act and (act not in (1, 2) or norm is not None or src is not None or x.shape[1] % 2):
        raise ValueError(f"a gated input takes act 1 (SiLU) or 2 (GELU, tanh), gate and up side by side (an even "
                         f"width, got {x.shape[1]}), and no fused norm or grouped rows; got act={act}")
    if norm is not None and (src is not None or norm.factor.shape != (x.shape[1],) or norm.kind not in (1, 2)
                             or norm.factor.dtype != torch.float32):
        raise ValueError(f"a fused RMSNorm takes FP32 factors, one per input channel ({x.shape[1]}), kind 1 or 2 and "
                         f"ungrouped rows; got {norm.factor.dtype} {tuple(norm.factor.shape)}, kind {norm.kind}"
                         f"{', grouped rows' if src is not None else ''}")
    if fmt == "nvfp4" and mode == MODE_F8:
        raise ValueError("NVFP4 activations quantize to FP16 operands (MODE_F16) or packed codes, not e4m3: an e2m1 "
                         "value times its e4m3 block scale needs up to 5 significant bits")
    if group and (fmt != "int4" or not group_kernel(group) or k_pad % group):
        raise ValueError(f"group scales take int4 and a power of two from 32 dividing k_pad={k_pad} "
                         f"(KernelWeights.group); got {fmt}, group={group}")
    if fold_groups and not (group and mode == MODE_F16):
        raise ValueError("fold_groups folds INT4 group scales into FP16 operands: it needs group and mode=MODE_F16")
    grouped = src is not None
    if grouped and (grp is None or src.shape != grp.shape or keep.dim() != 2 or outlier_idx.dim() != 2):
        raise ValueError("grouped split_quantize takes src and grp of one shape [P], keep [groups, k_pad] and "
                         "outlier_idx [groups, k]")
    m = src.numel() if grouped else x.shape[0]
    k_in = x.shape[1] // 2 if act else x.shape[1]
    k_out = outlier_idx.shape[-1]
    dev = x.device
    xo = torch.empty(m, k_out, dtype=torch.bfloat16, device=dev)
    if mode == MODE_PACKED:
        q = torch.empty(m, k_pad // 2, dtype=torch.uint8, device=dev)
        sc = torch.empty(m, k_pad // (16 if fmt == "nvfp4" else 32), dtype=torch.uint8, device=dev)
    else:
        q = torch.empty(m, k_pad, dtype=torch.float16 if mode == MODE_F16 else torch.float8_e4m3fn, device=dev)
        sc = q
    if group and not fold_groups:
        sc = torch.empty(m, k_pad // group, dtype=torch.float32, device=dev)
    rs = torch.empty(m, dtype=torch.float32, device=dev)
    block = triton.next_power_of_2(k_pad)
    block_o = max(16, triton.next_power_of_2(k_out))
    if out is not None:
        xo, q, sc, rs = out
    if m:
        # rows loaded together per program, about 16K elements, once M fills the GPU anyway: at M = 4096
        # 4 rows of 4096 measured best, 8 of 2048 slower than 4, 12288 wants 1; at M = 16, 4 rows
        # per program (4 programs) cost 2-3 µs (docs/kernels.md)
        rows = rows or (1 if m < 1024 else min(max(1, 16384 // block), 4))
        if rows & (rows - 1):
            raise ValueError(f"rows={rows} per program must be a power of two")
        launch = pdl_launch(dev, pdl)
        kernel = split_quantize_kernel[(triton.cdiv(m, rows),)](
            x, x.stride(0), keep, outlier_idx if k_out else keep, xo, q, sc, rs,
            m, k_in, k_out, k_pad, FMT=FMT_IDS[fmt], MODE=mode, BLOCK=block, BLOCK_O=block_o, ROWS=rows,
            INTERPRET=interpreting(), num_warps=8 if block >= 4096 else 4, RELEASE_LATE=pdl_late,
            SHARED_BESIDE=launch["PDL"] and shared_beside, **launch,
            **(dict(src_ptr=src, grp_ptr=grp, GROUPED=True) if grouped else {}),
            **(dict(GROUP=group, FOLD=fold_groups) if group else {}),
            **(dict(nw_ptr=norm.factor, norm_eps=norm.eps, NORM=norm.kind) if norm is not None else {}),
            **(dict(ACT=act) if act else {}),
        )
        if launch["PDL"] and shared_beside:  # a GEMM needing shared memory may start beside it (overlap.py)
            prefer_shared_carveout(kernel)
    if group and not fold_groups:
        return xo, q, sc
    if mode == MODE_PACKED:
        if fmt == "nvfp4":
            return xo, q, (sc.view(torch.float8_e4m3fn), rs)
        return xo, q, (sc if fmt == "mxfp4" else rs)
    return xo, q, rs


# ------------------------------------------------------------------ dual-path GEMM
@dataclass(frozen=True)
class GemmConfig:
    bm: int
    bn: int
    split_k: int
    op_f8: bool
    warps: int
    stages: int
    bk: int = 128  # K per step; the 4-bit path always steps 256 (4 chunks)
    expand: bool = False  # 4-bit weights -> e4m3 (op_f8) or FP16 workspace first, then the plain GEMM on it
    group_m: int = 8
    swap: bool = False  # few tokens: y^T = W · A^T with the 4-bit weights as the left operand (bm = rows padded)
    frag: bool = False  # MXFP4, M <= 16: the fragment GEMM (frag_gemm.py); bm = tokens padded to 8 or 16, bn = 16 * warps
    fold: bool = False  # transposed GEMM on e4m3 operands, the block factors folded into the weights by byte tables
    wgmma: bool = False  # MXFP4: the Gluon GEMM (wgmma_gemm.py), async wgmma on weights unpacked on the SM
    prefetch: bool = False  # fragment GEMM: the epilogue's weight-side operands pulled into L2 before the main loop
    reg_a: bool = False  # wgmma GEMM: the unpacked weights go to wgmma from registers, not through shared memory
    pdl: bool = False  # launched while split-quantize before it still runs (overlap.py)
    pdl_late: bool = False  # ... from when split-quantize's programs have issued their stores, not from their start
    cublas: bool = False  # cuBLAS: FP8 weights through torch._scaled_mm, the BF16 branch added in place; NVFP4 and
    # INT4 with group scales (op_f8 off) expanded to FP16, cuBLAS's FP16 GEMM into FP32, then epilogue_kernel

    @property
    def mode(self) -> int:
        """The split_quantize mode whose activation operands this config multiplies."""
        return MODE_F8 if self.op_f8 else MODE_F16

    @property
    def path(self) -> str:
        """Which GEMM runs, in a word (benchmark tables): frag, wgmma, fold, t (transposed), expand, cublas or plain."""
        for name in ("frag", "wgmma", "fold", "expand", "cublas"):
            if getattr(self, name):
                return name
        return "t" if self.swap else "plain"

    @property
    def label(self) -> str:
        """The path with its tile, weight rows × tokens, and split-K (benchmark tables), e.g. "wgmma 64×64 /2"."""
        tile = f" {self.bn}×{self.bm}" if self.bn else ""
        return f"{self.path}{tile}" + (f" /{self.split_k}" if self.split_k > 1 else "")


CUBLAS_CONFIG = GemmConfig(0, 0, 1, True, 0, 0, cublas=True)  # tiles, warps and stages: cuBLAS's own choice
# the expansion, which reads only the weights, runs beside split-quantize (overlap.py)
CUBLAS_F16_CONFIG = GemmConfig(0, 0, 1, False, 0, 0, cublas=True, pdl=True)
CUBLAS_F16_MAX_M = 512  # where it measured faster than our FP16 GEMM (_fp16_expansion_config)


def gemm_config(m: int, n: int, k_pad: int, fmt: str = "mxfp4", frag: bool = True, wgmma: bool = True,
                cublas: bool = True, group: int = 0) -> GemmConfig:
    """The one place that picks tiles and the regime for a shape.

    MXFP4 up to 8 tokens: the fragment GEMM (``frag``: False where it cannot run, i.e. the
    CPU interpreter or weights without the fragment layout). Otherwise, from the small-M sweeps
    on the H200 (``bench.sweep_small``, ``scripts/decode_sweep.py``,
    docs/kernels.md): up to 64 tokens the transposed GEMM (4-bit weights as the left
    operand) wins; 32-row weight tiles up to 16 tokens, 64 above (128 for very wide layers).
    Up to 16 tokens: e4m3 operands for the widest layers (>= 512 weight tiles; their
    cheaper unpack wins there), FP16 elsewhere with split-K 4 (8 for one token where N > K);
    the A tile padded only to the next power of two of M where N > K; 3 pipeline stages,
    6 where K > N. MXFP4 above 16 tokens, and from 9 where K >= N (``scripts/mid_sweep.py``): the folded
    e4m3 transposed GEMM up to 64 tokens, 128 where K >= N, 256 where N >= 16384 or K >= 3N (``fold_config``); the FP16
    transposed GEMM for INT4 up to 64. Prefill wants the largest FP8 tiles, smaller ones at a
    few hundred rows (``bench.sweep``).

    MXFP4 on Hopper (``wgmma``: False where it cannot run, i.e. the CPU interpreter or another
    architecture), where it measured faster than the above (``scripts/wgmma_rows.py``,
    docs/bench/h200_wgmma_rows_2026-11-29.md): the Gluon wgmma GEMM (``wgmma_config``) at 9-16
    tokens on the long layers (N >= 16384 or K >= 3N), 17-64 tokens where N and K are both >= 4096,
    65-256 tokens except where N <= K < 3N, 257-1024 tokens where N >= 16384 or N <= 2048 <= K / 2.
    """
    # FP8-fallback weights at 65-512 tokens (``cublas``: False where not measured, i.e. the CPU interpreter or a GPU
    # other than Hopper): split-quantize, then cuBLAS's row-wise FP8 GEMM, 1.04-1.21x our Triton GEMM at 256 tokens
    # and 0.98-1.09x at 512 on the layers with N >= 4096, even or slower from 1024 on
    # (scripts/cublas_route.py, docs/bench/h200_cublas_route_2026-11-30.md)
    if fmt == "fp8" and cublas and SWAP_MAX_M < m <= 512 and n >= 4096 and n % 16 == 0:
        return CUBLAS_CONFIG
    if fmt == "nvfp4":
        return nvfp4_config(m, n, k_pad, cublas, wgmma)
    if fmt == "int4" and group:
        return int4_group_config(m, n, k_pad, group, cublas, wgmma)
    # one exception measured: the 2048-wide layer (30B-A3B qkv) at 2-8 tokens, 16 steps of K, runs
    # the transposed GEMM faster (7.9 against 8.4 µs back to back)
    if fmt == "mxfp4" and m <= FRAG_MAX_M and frag and (m == 1 or k_pad > 2048):
        return frag_config(m, n, k_pad)
    if fmt == "mxfp4" and wgmma and _wgmma_wins(m, n, k_pad):
        if n >= 16384 and m > 64:  # the widest layers: 128 x 256 tiles on two warpgroups
            return wgmma_config(m, n, k_pad, bn=128, bt=min(256, triton.next_power_of_2(m)))
        # 64-row tiles take the unpacked weights from registers: 2-13 % faster than through shared memory
        # (docs/bench/h200_wgmma_rega_2026-11-29.md); at 128 x 256 that measured slower (85.5 against 82.0 µs)
        return wgmma_config(m, n, k_pad, bn=64, reg_a=True)
    if fmt == "mxfp4" and FRAG_MAX_M < m <= DECODE_MAX_M and k_pad >= n:  # measured 4-9 % faster there
        return fold_config(m, n, k_pad)
    if fmt != "fp8" and m <= DECODE_MAX_M:
        mp = max(1, triton.next_power_of_2(m)) if n > k_pad else 16
        if triton.cdiv(n, 32) >= 512:
            return GemmConfig(mp, 32, 2, True, 2, 3, swap=True, **overlapped(m, k_pad))
        split = 8 if m == 1 and n > k_pad else 4
        return GemmConfig(mp, 32, split, False, 2, 6 if k_pad > n else 3, swap=True, **overlapped(m, k_pad))
    if fmt == "mxfp4" and m > DECODE_MAX_M and (m <= SWAP_MAX_M or (m <= 128 and k_pad >= n)
                                                  or (m <= 256 and _long_layer(n, k_pad))):
        return fold_config(m, n, k_pad)
    if fmt != "fp8" and m <= SWAP_MAX_M:
        mp = max(16, triton.next_power_of_2(m))
        if n >= 16384:
            return GemmConfig(mp, 128, 1, False, 4, 4, swap=True, **overlapped(m, k_pad))
        return GemmConfig(mp, 64, 4 if k_pad >= n else 1, False, 4, 4, swap=True, **overlapped(m, k_pad))
    if m <= DECODE_MAX_M:
        bm = max(16, triton.next_power_of_2(m))
        if n >= 16384:
            return GemmConfig(bm, 64, 2, False, 4, 3, bk=256)
        return GemmConfig(bm, 32, 4 if k_pad >= 1024 else 1, False, 2, 2, bk=256)
    # the expansion reads only the weights: it runs beside split-quantize (overlap.py)
    # where the usual tiles would leave half the SMs idle, half as many weight rows a tile: 1.16-1.18x at 160-256
    # tokens on 30B-A3B o (64 x 64), 1.20-1.28x at 320-512 tokens on 8B o, 8B down and 30B-A3B qkv (128 x 128)
    # (scripts/config_ab.py, docs/bench/h200_expand_tiles_2026-11-30.md)
    if m <= 256:
        return GemmConfig(64, 64 if triton.cdiv(m, 64) * triton.cdiv(n, 128) <= 64 else 128, 1, True, 4, 4,
                          expand=True, pdl=True)
    if triton.cdiv(m, 128) * triton.cdiv(n, 256) <= 64:
        return GemmConfig(128, 128, 1, True, 8, 4, expand=True, pdl=True)
    return GemmConfig(128, 256, 1, True, 8, 3, expand=True, pdl=True)


def nvfp4_config(m: int, n: int, k_pad: int, cublas: bool = False, wgmma: bool = False) -> GemmConfig:
    """NVFP4, FP16 operands throughout (its weights are e2m1 times an e4m3 scale per 16 columns: exact in FP16, not
    in e4m3). Up to 64 tokens the FP16 transposed GEMM with the tiles measured for MXFP4 and INT4 there (on the H100
    1.4-2.0x MXFP4's time at 1-16 tokens, docs/bench/h100_formats_2026-12-07.md). Above, the weights expanded to
    FP16 beside split-quantize and the plain GEMM on FP16 wgmma, on the tiles of the e4m3 expansion path with 64
    columns a step (FP16 doubles a step's bytes): the plain GEMM unpacking the codes in registers, which ran there
    before, took 3-5x BF16's time at 256-4096 tokens (same file); the expansion 2.1-2.7x less at 4096 tokens, still
    0.37-0.77x BF16's speed from 256 on (docs/bench/h100_norms_formats_2026-12-07.md). ``cublas`` (Hopper): cuBLAS's
    FP16 GEMM on the expanded weights instead (_fp16_expansion_config). ``wgmma`` (Hopper): the wgmma GEMM on FP16
    operands, the codes unpacked in registers (0.5 bytes a weight read, not 2), where it measured faster than the
    above (_f16_wgmma_wins, _f16_wgmma_rows)."""
    if wgmma and _f16_wgmma_wins(m, n, k_pad):
        return wgmma_config(m, n, k_pad, bn=_f16_wgmma_rows(m, n), f16=True)
    if m <= SWAP_MAX_M:
        return dataclasses.replace(gemm_config(m, n, k_pad, "int4"), op_f8=False)
    return _fp16_expansion_config(m, n, k_pad, cublas)


def _fp16_expansion_config(m: int, n: int, k_pad: int, cublas: bool) -> GemmConfig:
    """The prefill path on weights expanded to FP16 (NVFP4, INT4 with group scales): our plain GEMM on the e4m3
    expansion path's tiles with FP16 operands and 64 columns a step (FP16 doubles a step's bytes), or, with
    ``cublas`` up to CUBLAS_F16_MAX_M tokens (256 where N >= 16384), cuBLAS's FP16 GEMM into FP32 sums and
    epilogue_kernel after it. On the H100 that measured 1.03-1.20x faster than ours at 128 and 256 tokens on every
    Qwen3 shape, 1.03-1.26x at 512 but 0.95x on 8B gate+up, 0.95-1.15x at 1024 and 0.83-1.13x at 4096, where its FP32
    sums' round trip counts (scripts/f16_route.py, docs/bench/h100_fusions_f16_2026-12-07.md). Both read FP16 weights
    of 2 bytes, as BF16 does: 0.4-0.6x BF16's speed in that range."""
    if cublas and (m <= CUBLAS_F16_MAX_M // 2 or (m <= CUBLAS_F16_MAX_M and n < 16384)):
        return CUBLAS_F16_CONFIG
    return dataclasses.replace(gemm_config(m, n, k_pad, "int4"), op_f8=False, bk=64)


def int4_group_config(m: int, n: int, k_pad: int, group: int, cublas: bool = False, wgmma: bool = False) -> GemmConfig:
    """INT4 with a scale per ``group`` columns. Up to 64 tokens the transposed GEMM, each group's partial products
    times its scales in FP32: the tiles of per-row INT4 up to 16 tokens (on the H100 1.1-1.6x MXFP4's time,
    docs/bench/h100_formats_2026-12-07.md), then 64 x 64 on 4 warps, or on 8 for groups of 32 (a partial product per
    32 columns, four live at once: 4 warps spilled registers). Above 64 tokens the prefill path, as nvfp4_config's:
    weights expanded to FP16 with their group scales folded in (over the row's largest, one rounding), activations
    likewise (split_quantize's fold_groups), then the plain GEMM on FP16 wgmma. The transposed GEMM that ran there
    before took 2-4x BF16's time at 256-4096 tokens (64 x 128 tiles on 8 warps, the largest that did not spill); the
    prefill path is 2.2-2.5x faster than it at 4096 tokens, even to 1.6x at 256, and 0.37-0.75x BF16's speed there
    (docs/bench/h100_norms_formats_2026-12-07.md). ``cublas`` (Hopper): cuBLAS's FP16 GEMM on the expanded weights
    instead (_fp16_expansion_config). ``wgmma`` (Hopper): where it measured faster, the wgmma GEMM on FP16 operands
    with the group scales folded in as on the prefill path, the codes unpacked in registers (_f16_wgmma_wins)."""
    if wgmma and _f16_wgmma_wins(m, n, k_pad, group):
        return wgmma_config(m, n, k_pad, bn=_f16_wgmma_rows(m, n), f16=True)
    if m <= DECODE_MAX_M:
        return gemm_config(m, n, k_pad, "int4")
    if m <= SWAP_MAX_M:
        return GemmConfig(64, 64, 4 if k_pad >= n else 1, False, 8 if group == 32 else 4, 3, swap=True,
                          **overlapped(m, k_pad))
    return _fp16_expansion_config(m, n, k_pad, cublas)


def _f16_wgmma_wins(m: int, n: int, k_pad: int, group: int = 0) -> bool:
    """Where the wgmma GEMM on FP16 operands measured faster than the transposed GEMM and the FP16 expansion routes
    (H100, scripts/nvfp4_wgmma.py, docs/bench/h100_nvfp4_wgmma_2026-12-07.md). NVFP4: up to 64 tokens on every Qwen3
    shape (1.01-1.99x; 1.03x on the weakest, 30B-A3B qkv at one token); INT4 with group scales (``group``, measured
    for groups of 32 and 128), whose transposed GEMM is faster at few tokens: up to 16 only on the long layers
    (N >= 16384 or K >= 3N: 0.99-1.48x), 17-64 on every shape (1.13-2.47x). Both: 65-128 tokens where N and K are
    both >= 4096 (1.08-2.21x), 129-256 on the long layers (1.26-1.59x)."""
    if m <= DECODE_MAX_M and group:
        return _long_layer(n, k_pad)
    if m <= SWAP_MAX_M:
        return True
    if m <= 128:
        return n >= 4096 and k_pad >= 4096
    return m <= 256 and _long_layer(n, k_pad)


def _f16_wgmma_rows(m: int, n: int) -> int:
    """The FP16 wgmma GEMM's weight rows a tile: 128 up to 16 tokens but on the widest layers (N >= 16384) and above
    128 tokens, else 64 (scripts/nvfp4_wgmma.py: the other within 7 % where it won)."""
    return 128 if (m <= DECODE_MAX_M and n < 16384) or m > 128 else 64


def _wgmma_wins(m: int, n: int, k_pad: int) -> bool:
    """Where the wgmma GEMM measured faster than the Triton paths on the H200 (gemm_config)."""
    if FRAG_MAX_M < m <= DECODE_MAX_M:
        return _long_layer(n, k_pad)
    if DECODE_MAX_M < m <= SWAP_MAX_M:
        return n >= 4096 and k_pad >= 4096
    if SWAP_MAX_M < m <= 256:
        return not n <= k_pad < 3 * n
    # above 256 tokens the widest layers, and the narrow o-shaped one (30B-A3B o, N = 2048, K = 2N: 37.9 µs at 1024
    # tokens against the expansion path's 44.8; docs/bench/h200_wgmma_rega_2026-11-29.md)
    return 256 < m <= 1024 and (n >= 16384 or (n <= 2048 and k_pad >= 2 * n))


def _long_layer(n: int, k_pad: int) -> bool:
    """Layers with enough work per token (the widest, or K >= 3N) that the folded GEMM keeps beating the
    expansion path up to 256 tokens, on 128 x 128 tiles."""
    return n >= 16384 or k_pad >= 3 * n


def fold_config(m: int, n: int, k_pad: int) -> GemmConfig:
    """The transposed GEMM on e4m3 operands with the block factors folded into the weights, for 9-256
    tokens (scripts/mid_sweep.py, docs/bench/h200_mid_sweeps_2026-11-29.md): 64-token tiles of 64
    weight rows on 4 warps (16-token tiles up to 16 tokens), 128 x 128 on 8 warps above 64 tokens for
    the long layers (N >= 16384 or K >= 3N); split-K up to 8 toward 256 programs where fewer than 128
    tiles share K > 2048 (not on the widest layers); 4 pipeline stages without split-K or with
    16-token tiles, else 3."""
    mp, bn, warps = (128, 128, 8) if m > 64 and _long_layer(n, k_pad) else (16 if m <= 16 else 64, 64, 4)
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, mp)
    split = 1
    if k_pad > 2048 and n < 16384 and tiles < 128:
        while split < 8 and tiles * split < 256:
            split *= 2
    stages = 4 if (split == 1 and n < 16384) or mp == 16 else 3
    return GemmConfig(mp, bn, split, True, warps, stages, swap=True, fold=True, **overlapped(m, k_pad))


def frag_config(m: int, n: int, k_pad: int, warps: int | None = None, split_k: int | None = None,
                prefetch: bool | None = None) -> GemmConfig:
    """The fragment GEMM's config: one weight tile (16 rows) per warp, 2 warps a program; split-K
    (a power of two up to 16, at least 2 steps of 128 columns each) until the tiles times the
    splits reach 4096 for one token, 2048 for more (more tokens load more activation bytes per
    step). From the H200 sweeps (scripts/decode_sweep.py, docs/kernels.md). The epilogue prefetch is on
    except on the long layers (N >= 16384 or K >= 3N), which stream longer and lost more to its
    8 registers a thread than they gained (scripts/kernel_ab.py)."""
    tiles = triton.cdiv(n, 16)
    steps = k_pad // 128
    if split_k is None:
        budget = 4096 if m <= 1 else 2048
        split_k = 1
        while split_k < 16 and tiles * split_k * 2 <= budget and steps // (split_k * 2) >= 2:
            split_k *= 2
    warps = warps or 2
    prefetch = not _long_layer(n, k_pad) if prefetch is None else prefetch
    return GemmConfig(8 if m <= 8 else 16, 16 * warps, split_k, False, warps, 1, swap=True, frag=True,
                      prefetch=prefetch, pdl=True)


_SPLIT_WORKSPACE: dict = {}  # device -> (FP32 partial sums, int32 tile counters), zero between calls


def split_workspace(device, numel: int, tiles: int):
    """The split-K workspace of a device: the kernels leave it zeroed, so one is shared by every layer
    (calls on one device must not overlap across streams). None while a CUDA graph is being
    captured and none is large enough yet: a buffer zeroed inside a capture is only zeroed on replay."""
    ws, cnt = _SPLIT_WORKSPACE.get(device, (None, None))
    if ws is None or ws.numel() < numel or cnt.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        ws = torch.zeros(max(numel, 1 << 20, 0 if ws is None else ws.numel()), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(tiles, 4096, 0 if cnt is None else cnt.numel()), dtype=torch.int32, device=device)
        _SPLIT_WORKSPACE[device] = ws, cnt
    return ws, cnt


def _split_buffers(y: torch.Tensor, split_k: int, tiles: int):
    """(workspace, tile counters) for a split-K launch writing y; without split-K the kernels ignore
    them (y stands in). While capturing with no workspace yet, a fresh zeroed one for this call alone."""
    if split_k == 1:
        return y, y
    return split_workspace(y.device, y.numel(), tiles) or (
        torch.zeros(y.numel(), dtype=torch.float32, device=y.device), torch.zeros(tiles, dtype=torch.int32, device=y.device))


def _branch_block(k_out: int) -> int:
    """Columns of the BF16 branch a step (the Triton GEMMs' BO): 0 without outlier channels, else 16 to 64."""
    return 0 if k_out == 0 else min(64, max(16, triton.next_power_of_2(k_out)))


def osc_gemm(a, sa, kw: KernelWeights, xo, out_dtype, cfg: GemmConfig, out: torch.Tensor | None = None,
             groups: torch.Tensor | None = None) -> torch.Tensor:
    """y = the layer's dual-path GEMM on split-quantize's outputs, by ``cfg``. ``groups`` (MoE experts, moe.py): kw
    holds the stacked weights of several layers ([groups, N, ...]), and groups is the int32 tile table [tiles, 3] of
    moe.route: tile t is rows groups[t, 0] to groups[t, 0] + groups[t, 1] - 1 (at most cfg.bm) of a and y, multiplied
    by layer groups[t, 2]'s weights (the transposed GEMM; or, for long prompts, the plain FP8 GEMM on e4m3 weights,
    4-bit ones expanded first)."""
    m, n = a.shape[0], kw.row_scale.shape[-1]
    other_gemm = cfg.frag or cfg.wgmma or cfg.cublas
    transposed = cfg.swap and not (other_gemm or cfg.expand)  # it reads the 4-bit codes itself
    plain_fp8 = not (cfg.swap or other_gemm) and cfg.split_k == 1 and cfg.op_f8 and (cfg.expand or kw.fmt == "fp8")
    if groups is not None and not (transposed or plain_fp8):
        raise ValueError(f"stacked (grouped) weights take the transposed GEMM, or the plain FP8 GEMM without split-K "
                         f"on e4m3 weights (expanded where 4-bit) (moe.grouped_config), got {cfg}")
    if groups is not None and (groups.dim() != 2 or groups.shape[1] != 3 or groups.dtype != torch.int32):
        raise ValueError(f"groups must be moe.route's int32 tile table [tiles, 3], got {groups.dtype} "
                         f"{tuple(groups.shape)}")
    if cfg.cublas:
        if kw.fmt == "nvfp4" or kw.group:
            return _cublas_f16_gemm(a, sa, kw, xo, out_dtype, cfg, out)
        return _cublas_gemm(a, sa, kw, xo, out_dtype, out)
    if cfg.frag:
        return _frag_gemm(a, sa, kw, xo, out_dtype, cfg, out)
    if cfg.wgmma:
        return _wgmma_gemm(a, sa, kw, xo, out_dtype, cfg, out)
    if cfg.swap and kw.fmt == "fp8" and (cfg.fold or not cfg.op_f8):
        raise ValueError("the transposed GEMM takes FP8-fallback weights with e4m3 operands only (op_f8, no fold)")
    if kw.group and (cfg.fold or not (transposed or (cfg.expand and not cfg.op_f8))):
        raise ValueError(f"INT4 weights with group scales (group {kw.group}) take the transposed GEMM (swap, no fold), "
                         "which puts the scales on each group's partial products, or the FP16 expansion (expand, "
                         "op_f8 off) with the scales folded in (int4_group_config)")
    if kw.fmt == "nvfp4" and (cfg.op_f8 or cfg.fold):
        raise ValueError("NVFP4 weights multiply FP16 operands (op_f8=False, no fold): e2m1 times an e4m3 block scale "
                         "is not an e4m3 number (ops.nvfp4_config)")
    want = torch.float8_e4m3fn if cfg.op_f8 else torch.float16
    if a.dtype != want:
        raise ValueError(f"this GemmConfig multiplies {want} activation operands, got {a.dtype}: split_quantize "
                         f"with mode={'MODE_F8' if cfg.op_f8 else 'MODE_F16'}")
    dev = a.device
    y = out if out is not None else torch.empty(m, n, dtype=out_dtype, device=dev)
    fmt, codes, rel = kw.fmt, kw.codes, kw.rel_exp
    sb_scale = 0.5 if cfg.op_f8 and fmt == "mxfp4" else 1.0
    if cfg.expand and fmt != "fp8":
        # stacked experts: the folded GEMM's byte tables, so that both grouped paths multiply the same weights
        lut = groups is not None and fmt == "mxfp4"
        codes, rel, fmt = decode_weights(kw, cfg.op_f8, lut=lut, pdl=cfg.pdl), None, "fp8"
        sb_scale = 2.0 ** -6 if lut else sb_scale
    tiles = triton.cdiv(m, cfg.bm) if groups is None else groups.shape[0]
    grid = (triton.cdiv(n, cfg.bn) * tiles, cfg.split_k)
    ws, cnt = _split_buffers(y, cfg.split_k, grid[0])
    k_out = xo.shape[1]
    bo = _branch_block(k_out)
    weights = (codes, rel if rel is not None else codes, kw.row_scale, xo, kw.w_outlier,
               kw.bias if kw.bias is not None else kw.row_scale, y, ws, cnt)
    common = dict(FMT=FMT_IDS[fmt], HAS_BIAS=kw.bias is not None, BN=cfg.bn, BO=bo, SPLIT_K=cfg.split_k,
                  INTERPRET=interpreting(), num_warps=cfg.warps, num_stages=cfg.stages)
    if kw.group and transposed:
        if sa.shape != (m, kw.k_main // kw.group) or sa.dtype != torch.float32:
            raise ValueError(f"INT4 with group scales takes the token scales of each group, FP32 [M, "
                             f"{kw.k_main // kw.group}] (split_quantize with group={kw.group}); got {sa.dtype} "
                             f"{tuple(sa.shape)}")
        common["GROUP"] = kw.group
    elif kw.group and sa.shape != (m,):
        raise ValueError(f"the FP16 expansion of INT4 group scales takes operands with the scales folded in and one "
                         f"scale per token (split_quantize with group={kw.group}, fold_groups=True); got scales "
                         f"{tuple(sa.shape)}")
    stacked = {} if groups is None else dict(grp_ptr=groups, stride_ce=codes.stride(0), TILES=tiles, GROUPED=True)
    if cfg.swap:
        if groups is not None:  # the transposed GEMM also offsets the MXFP4 exponents by expert
            stacked["stride_ee"] = rel.stride(0) if rel is not None else 0
        osc_gemm_t_kernel[grid](
            a, sa, *weights, m, n, kw.k_main, k_out, a.stride(0), codes.stride(-2),
            rel.stride(-2) if rel is not None else 0, y.stride(0), MP=cfg.bm, OP_F8=cfg.op_f8, F8_FOLD=cfg.fold,
            **common, **pdl_launch(dev, cfg.pdl), **stacked)
    else:
        osc_gemm_kernel[grid](
            a, sa, *weights, m, n, kw.k_main, k_out, a.stride(0), codes.stride(-2), y.stride(0),
            OP_F8=cfg.op_f8, BM=cfg.bm, BK=cfg.bk if fmt == "fp8" else 256, GROUP_M=cfg.group_m,
            SB_SCALE=sb_scale, **common, **stacked)
    return y


def _cublas_gemm(a, sa, kw: KernelWeights, xo, out_dtype, out=None) -> torch.Tensor:
    """FP8 weights through cuBLAS: y = (a · W^T) scaled by token and row (torch._scaled_mm), then + x_o · W_o^T in
    place (one more cuBLAS GEMM reading and writing y) and the bias."""
    if kw.fmt != "fp8":
        raise ValueError(f"the cuBLAS path takes FP8 (e4m3) weights, or NVFP4 and INT4 with group scales expanded to "
                         f"FP16, got {kw.fmt}{'' if kw.group else ' without group scales'}; these take the Triton GEMMs")
    if a.dtype != torch.float8_e4m3fn:
        raise ValueError(f"the cuBLAS path multiplies torch.float8_e4m3fn activation operands, got {a.dtype}: "
                         "split_quantize with mode=MODE_F8")
    n = kw.row_scale.numel()
    if n % 16:
        raise ValueError(f"cuBLAS's FP8 GEMM needs N a multiple of 16, got {n}; use a Triton config (gemm_config "
                         "picks one for such layers)")
    y = torch._scaled_mm(a, kw.codes.t(), scale_a=sa.view(-1, 1), scale_b=kw.row_scale.view(1, -1),
                         out_dtype=out_dtype)
    if xo.shape[1]:
        y.addmm_(xo, kw.w_outlier.t())
    if kw.bias is not None:
        y += kw.bias
    if out is not None:
        return out.copy_(y)
    return y


def _cublas_f16_gemm(a, sa, kw: KernelWeights, xo, out_dtype, cfg: GemmConfig, out=None) -> torch.Tensor:
    """NVFP4 and INT4 with group scales on many tokens: the weights expanded to FP16 (decode_weights, exact for NVFP4;
    INT4 with its group scales folded in, as split-quantize's fold_groups does for the activations), cuBLAS's FP16
    GEMM into FP32 (FP16 sums overflow), then epilogue_kernel: token and row scales, the BF16 branch, the bias."""
    m, n = a.shape[0], kw.row_scale.numel()
    if a.dtype != torch.float16 or sa.shape != (m,):
        raise ValueError(f"the FP16 cuBLAS path multiplies torch.float16 operands with one scale per token "
                         f"(split_quantize with mode=MODE_F16{', fold_groups=True' if kw.group else ''}); got "
                         f"{a.dtype} with scales {tuple(sa.shape)}")
    acc = _mm_f32(a, decode_weights(kw, False, pdl=cfg.pdl))
    y = out if out is not None else torch.empty(m, n, dtype=out_dtype, device=a.device)
    k_out = xo.shape[1]
    bo = _branch_block(k_out)
    epilogue_kernel[(triton.cdiv(m, 64), triton.cdiv(n, 64))](
        acc, sa, kw.row_scale, xo, kw.w_outlier, kw.bias if kw.bias is not None else kw.row_scale, y, m, n, k_out,
        y.stride(0), HAS_BIAS=kw.bias is not None, BM=64, BN=64, BO=bo, INTERPRET=interpreting(), num_warps=4)
    return y


def _mm_f32(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a · w^T with FP32 output: cuBLAS on the GPU (FP16 tensor cores, FP32 sums); on the CPU (interpreter tests) in
    FP32, where FP16 products are exact too."""
    if a.is_cuda:
        return torch.mm(a, w.t(), out_dtype=torch.float32)
    return a.float() @ w.float().t()


def _frag_gemm(a, sa, kw: KernelWeights, xo, out_dtype, cfg: GemmConfig, out=None, probe: int = 0) -> torch.Tensor:
    """The fragment GEMM's launch. probe (scripts/frag_probe.py only): 1 skips the e4m3 -> FP16
    conversions, 2 all arithmetic after the loads; both give wrong values, for timing."""
    from .frag_gemm import osc_frag_gemm_kernel

    m, n = a.shape[0], kw.row_scale.numel()
    fw = kw.frag
    if cfg.bm not in (8, 16):  # NT = bm / 8 token groups: the kernel has one or two
        raise ValueError(f"a fragment GEMM config pads the tokens to 8 or 16 (frag_config), got bm={cfg.bm}")
    if fw is None or m > cfg.bm:
        raise ValueError(f"the fragment GEMM takes MXFP4 weights with their fragment layout and M <= {cfg.bm}; "
                         f"got {kw.fmt} ({'with' if fw is not None else 'without'} fragment layout), M={m}")
    if a.dtype != torch.float16:
        raise ValueError(f"the fragment GEMM multiplies torch.float16 activation operands, got {a.dtype}: "
                         "split_quantize with mode=MODE_F16")
    y = out if out is not None else torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return y
    tiles = fw.words.shape[1]
    if tiles % cfg.warps:
        raise ValueError(f"the fragment GEMM takes one weight tile a warp, the warps dividing the layer's {tiles} "
                         f"padded tiles (layout.FRAG_TILE_PAD); got warps={cfg.warps}")
    grid = (tiles // cfg.warps, cfg.split_k)
    ws, cnt = _split_buffers(y, cfg.split_k, grid[0])
    k_out = xo.shape[1]
    if k_out % 8 or (k_out and xo.stride(0) != k_out):
        raise ValueError(f"x_o needs contiguous rows of a multiple of 8 channels (LayerScheme keeps 16s), got {k_out}")
    osc_frag_gemm_kernel[grid](
        a, sa, fw.words, fw.exps, fw.row_scale, xo, kw.w_outlier,
        kw.bias if kw.bias is not None else fw.row_scale, y, ws, cnt,
        m, n, fw.steps, tiles, k_out, a.stride(0), y.stride(0),
        NT=cfg.bm // 8, WARPS=cfg.warps, SPLIT_K=cfg.split_k, HAS_BIAS=kw.bias is not None, BRANCH=k_out > 0,
        PREFETCH=cfg.prefetch, PROBE=probe, num_warps=cfg.warps, **pdl_launch(a.device, cfg.pdl))
    return y


def wgmma_config(m: int, n: int, k_pad: int, bn: int = 128, bt: int | None = None, warps: int | None = None,
                 split_k: int | None = None, stages: int | None = None, reg_a: bool = False,
                 f16: bool = False) -> GemmConfig:
    """The Gluon wgmma GEMM's config: bn weight rows (64 a warpgroup) by bt tokens a program (by default M's
    power of two, 16 to 128), a TMA ring of ``stages`` steps (3 with 256-token tiles: shared memory);
    split-K (a power of two up to 8, at least 4 steps each) until the tiles fill the 132 SMs. ``reg_a``: the
    unpacked weights go to wgmma as its register operand instead of through a shared tile. It is launched
    overlapped with split-quantize (``pdl``): above 64 tokens from split-quantize's start, back to back 2-6 %
    faster at 256 tokens and 0-1 % at 512-1024 (docs/bench/h200_wgmma_pdl_2026-11-29.md); up to 64 tokens as
    ``overlapped`` says. ``f16``: NVFP4's or INT4-with-groups' weights on FP16 operands (from registers: reg_a)."""
    bt = bt or min(128, max(16, triton.next_power_of_2(m)))
    if split_k is None:
        tiles = triton.cdiv(n, bn) * triton.cdiv(m, bt)
        split_k = 1
        while split_k < 8 and tiles * split_k < 132 and k_pad // (128 * split_k * 2) >= 4:
            split_k *= 2
    return GemmConfig(bt, bn, split_k, not f16, warps or bn // 16, stages or (3 if bt > 128 else 4), swap=True,
                      wgmma=True, reg_a=reg_a or f16, **overlapped(m, k_pad, wgmma=True))


def _wgmma_gemm(a, sa, kw: KernelWeights, xo, out_dtype, cfg: GemmConfig, out=None, probe: int = 0) -> torch.Tensor:
    """The wgmma GEMM's launch. probe (scripts/wgmma_probe.py only): bits 1, 2 and 4 skip the unpack,
    the MMAs and the exponent loads of the main loop; they give wrong values, for timing."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .wgmma_gemm import act_boxes, descriptor_layouts, osc_wgmma_gemm_kernel

    m, n = a.shape[0], kw.row_scale.numel()
    if kw.fmt not in ("mxfp4", "nvfp4", "int4") or kw.rel_exp is None:
        raise ValueError(f"the wgmma GEMM takes MXFP4 weights (byte-table unpack to e4m3), or NVFP4 and INT4 with group "
                         f"scales (FP16), got {kw.fmt}{' without group scales' if kw.fmt == 'int4' else ''}")
    f16 = kw.fmt != "mxfp4"
    if kw.group and sa.shape != (m,):
        raise ValueError(f"the wgmma GEMM takes INT4 activations with their group scales folded in and one scale per "
                         f"token (split_quantize with group={kw.group}, fold_groups=True); got scales {tuple(sa.shape)}")
    want, mode = (torch.float16, "MODE_F16") if f16 else (torch.float8_e4m3fn, "MODE_F8")
    if a.dtype != want or a.stride(1) != 1:
        raise ValueError(f"the wgmma GEMM multiplies contiguous {want} activation operands on {kw.fmt} weights, got "
                         f"{a.dtype}: split_quantize with mode={mode}")
    if f16 and (not cfg.reg_a or cfg.bm > 128):
        raise ValueError(f"the wgmma GEMM takes {kw.fmt} weights (FP16) as its register operand only, on up to 128 "
                         f"tokens a tile (more spill registers): wgmma_config(f16=True), got reg_a={cfg.reg_a}, "
                         f"bm={cfg.bm}")
    if cfg.bn != 64 * (cfg.warps // 4) or cfg.bm not in (16, 32, 64, 128, 256) or cfg.stages < 2:
        raise ValueError(f"the wgmma GEMM takes 64 weight rows a warpgroup, 16-256 tokens a tile (a power of two) and "
                         f"at least 2 stages; got bn={cfg.bn}, warps={cfg.warps}, bm={cfg.bm}, stages={cfg.stages}")
    y = out if out is not None else torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return y
    grid = (triton.cdiv(n, cfg.bn) * triton.cdiv(m, cfg.bm), cfg.split_k)
    ws, cnt = _split_buffers(y, cfg.split_k, grid[0])
    k_out = xo.shape[1]
    a_layout, c_layout = descriptor_layouts(cfg.bn, cfg.bm, f16)
    a_desc = TensorDescriptor.from_tensor(a, [cfg.bm, 128 // act_boxes(f16)], a_layout)
    c_desc = TensorDescriptor.from_tensor(kw.codes, [cfg.bn, 64], c_layout)
    osc_wgmma_gemm_kernel[grid](
        a_desc, sa, c_desc, kw.rel_exp, kw.row_scale, xo, kw.w_outlier,
        kw.bias if kw.bias is not None else kw.row_scale, y, ws, cnt, m, n, kw.k_main, k_out,
        kw.rel_exp.stride(0) * kw.rel_exp.element_size() // 4, y.stride(0), BN=cfg.bn, BT=cfg.bm,
        BO=0 if k_out == 0 else 64, SPLIT_K=cfg.split_k, HAS_BIAS=kw.bias is not None, STAGES=cfg.stages,
        num_warps=cfg.warps, PROBE=probe, REG_A=cfg.reg_a, F16=f16, GROUP=kw.group, **pdl_launch(a.device, cfg.pdl))
    return y


def decode_weights(kw: KernelWeights, op_f8: bool, raw_e4m3: bool = False, lut: bool = False,
                   pdl: bool = False) -> torch.Tensor:
    """The weight operands [N, Kk] exactly as the GEMM builds them in registers (FP16 or e4m3).

    FP16: value * 2**rel_exp (MXFP4), value * e4m3 block scale * 2**-8 (NVFP4), the int4 value (with group scales:
    times its group's scale over the row's largest, rounded to FP16), or the e4m3 value. op_f8: the same in e4m3,
    twice it for MXFP4 (not NVFP4 or INT4 with group scales, which have no e4m3 form).
    raw_e4m3 (MXFP4): what the transposed GEMM's e4m3 variant multiplies, value * 2**-6 (its
    block factors go on the partial products). lut (MXFP4): the byte-table unpack of the folded
    GEMM, value * 2**(rel_exp + 6) in e4m3. ``pdl``: launched overlapped with the split-quantize before it (the
    expansion path, overlap.py).
    """
    if kw.fmt == "fp8":
        return kw.codes if op_f8 else kw.codes.to(torch.float16)
    if (raw_e4m3 or lut) and kw.fmt != "mxfp4":
        raise ValueError(f"raw_e4m3 and lut are MXFP4 unpacks; got {kw.fmt}")
    if op_f8 and kw.fmt == "nvfp4":
        raise ValueError("NVFP4 weights decode to FP16 (op_f8=False): e2m1 times an e4m3 block scale is not e4m3")
    if op_f8 and kw.group:
        raise ValueError("INT4 weights with group scales decode to FP16 (op_f8=False), their group scales folded in")
    n = kw.row_scale.numel()  # stacked experts ([E, N, ...], contiguous: moe.stack_experts) as E * N rows
    if kw.codes.dim() > 2 and not (kw.codes.is_contiguous() and (kw.rel_exp is None or kw.rel_exp.is_contiguous())):
        raise ValueError("decode_weights takes stacked weights only as moe.stack_experts makes them (contiguous)")
    out = torch.empty(*kw.row_scale.shape, kw.k_main,
                      dtype=torch.float8_e4m3fn if op_f8 or raw_e4m3 or lut else torch.float16, device=kw.codes.device)
    bn = 64
    decode_weights_kernel[(triton.cdiv(n, bn), kw.k_main // 64)](
        kw.codes, kw.rel_exp if kw.rel_exp is not None else kw.codes, out, n, kw.k_main, kw.codes.stride(-2),
        FMT=FMT_IDS[kw.fmt], OP_F8=op_f8, BN=bn, RAW_E4M3=raw_e4m3, LUT=lut, INTERPRET=interpreting(), num_warps=4,
        **pdl_launch(kw.codes.device, pdl), **(dict(sb_ptr=kw.row_scale, GROUP=kw.group) if kw.group else {}))
    return out


def wgmma_runs(x: torch.Tensor) -> bool:
    """Whether the wgmma GEMM can take an input on x's device: Hopper (sm_90), not the CPU interpreter."""
    return not INTERPRETED and x.is_cuda and _major(x.device) == 9


def layer_config(x: torch.Tensor, kw: KernelWeights) -> GemmConfig:
    """The config osc_linear_2d runs for a 2-D input x on a layer's kernel weights (gemm_config's choice for the
    paths that can run there)."""
    # the fragment GEMM is PTX: the CPU interpreter takes the transposed GEMM instead
    hopper = wgmma_runs(x)  # where the wgmma GEMM and the cuBLAS route were measured
    return gemm_config(x.shape[0], kw.row_scale.numel(), kw.k_main, kw.fmt,
                       frag=kw.frag is not None and not INTERPRETED, wgmma=hopper, cublas=hopper, group=kw.group)


def split_for(x: torch.Tensor, kw: KernelWeights, cfg: GemmConfig, norm: KernelNorm | None = None, act: int = 0):
    """split_quantize of a 2-D input for the GEMM that ``cfg`` runs on a layer's kernel weights: (x_o, a, sa)."""
    expands = cfg.expand or cfg.cublas  # the weights expanded beside it (no shared memory), or FP8 ones in cuBLAS
    return split_quantize(x.contiguous(), kw.keep, kw.outlier_idx, kw.fmt, cfg.mode, kw.k_main, pdl=cfg.pdl,
                          pdl_late=cfg.pdl_late, shared_beside=not expands, group=kw.group,
                          fold_groups=bool(kw.group) and (expands or cfg.wgmma), norm=norm, act=act)


def osc_linear_2d(x: torch.Tensor, kw: KernelWeights, cfg: GemmConfig | None = None,
                  norm: KernelNorm | None = None, act: int = 0, heads: KernelHeadNorm | None = None) -> torch.Tensor:
    """The whole online path of one layer on a 2-D input: split-quantize (after the RMSNorm ``norm``, if the layer
    took over the one before it, or of a gated MLP's act(gate) * up from x = [gate | up] for ``act``), then the
    dual-path GEMM, then (``heads``, a stacked q/k/v layer) the q and k heads' RMSNorms on its output."""
    cfg = cfg or layer_config(x, kw)
    xo, a, sa = split_for(x, kw, cfg, norm, act)
    y = osc_gemm(a, sa, kw, xo, x.dtype, cfg)
    return y if heads is None else head_norm_(y, heads)


# ------------------------------------------------------------------ the layer backend and custom op
def layer_weights(layer) -> KernelWeights:
    return layer.cached(("kernel", layer.compute_device), lambda: _build_layer_weights(layer))


@torch.compiler.disable  # built once, eagerly: never traced into a compiled step
def _build_layer_weights(layer) -> KernelWeights:
    kw = kernel_weights(layer)
    if kw.codes.is_cuda and not _same_storage(kw.codes, layer.qweight):
        layer.park_codes()  # one copy of the weights on the GPU, the kernels' own
    return kw


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@torch.library.custom_op("oscquant::osc_linear", mutates_args=())
def osc_linear_op(x: torch.Tensor, codes: torch.Tensor, rel_exp: torch.Tensor | None, row_scale: torch.Tensor,
                  w_outlier: torch.Tensor, outlier_idx: torch.Tensor, keep: torch.Tensor,
                  bias: torch.Tensor | None, fmt: str, k_main: int, frag_words: torch.Tensor | None = None,
                  frag_exps: torch.Tensor | None = None, frag_scale: torch.Tensor | None = None,
                  norm_factor: torch.Tensor | None = None, norm_eps: float = 0.0, norm_kind: int = 0,
                  act: int = 0, head_factor: torch.Tensor | None = None, head_eps: float = 0.0, head_kind: int = 0,
                  q_heads: int = 0, k_heads: int = 0) -> torch.Tensor:
    frag = None if frag_words is None else FragWeights(frag_words, frag_exps, frag_scale)
    kw = KernelWeights(fmt, codes, rel_exp, row_scale, k_main, w_outlier, outlier_idx, keep, bias, frag)
    return osc_linear_2d(x, kw, norm=None if norm_factor is None else KernelNorm(norm_factor, norm_eps, norm_kind),
                         act=act, heads=None if head_factor is None else KernelHeadNorm(head_factor, head_eps,
                                                                                        head_kind, q_heads, k_heads))


@osc_linear_op.register_fake
def _(x, codes, rel_exp, row_scale, w_outlier, outlier_idx, keep, bias, fmt, k_main, frag_words=None, frag_exps=None,
      frag_scale=None, norm_factor=None, norm_eps=0.0, norm_kind=0, act=0, head_factor=None, head_eps=0.0,
      head_kind=0, q_heads=0, k_heads=0):
    return x.new_empty(x.shape[0], row_scale.shape[0])


def osc_linear_2d_op(x2: torch.Tensor, kw: KernelWeights, norm: KernelNorm | None = None, act: int = 0,
                     heads: KernelHeadNorm | None = None) -> torch.Tensor:
    """osc_linear_2d through the ``oscquant::osc_linear`` custom op, its weights passed as tensors."""
    fw = kw.frag
    hn = (heads.factor, heads.eps, heads.kind, heads.q_heads, heads.k_heads) if heads is not None else (None, 0.0, 0,
                                                                                                      0, 0)
    return osc_linear_op(x2, kw.codes, kw.rel_exp, kw.row_scale, kw.w_outlier, kw.outlier_idx, kw.keep, kw.bias,
                         kw.fmt, kw.k_main, *((fw.words, fw.exps, fw.row_scale) if fw is not None else (None,) * 3),
                         *((norm.factor, norm.eps, norm.kind) if norm is not None else (None, 0.0, 0)), act, *hn)


def triton_forward(layer, x: torch.Tensor) -> torch.Tensor:
    kw = layer_weights(layer)
    act = layer.input_gate.kind if layer.input_gate is not None else 0  # x: gate and up side by side
    x2 = x.reshape(-1, layer.in_features * (2 if act else 1))
    norm = layer.input_norm.kernel_norm(x.device) if layer.input_norm is not None else None
    heads = layer.output_norm.kernel_norm(x.device) if layer.output_norm is not None else None
    if torch.compiler.is_compiling():  # torch.compile sees one opaque op with a fake implementation
        y = osc_linear_2d_op(x2, kw, norm, act, heads)
    else:  # eager (and CUDA graph capture): the custom op's dispatch alone cost 22-118 µs of host
        # time a call on the H200's host (scripts/host_overhead.py)
        y = osc_linear_2d(x2, kw, norm=norm, act=act, heads=heads)
    return y.reshape(*x.shape[:-1], layer.out_features)
