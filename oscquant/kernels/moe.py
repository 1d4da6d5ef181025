"""MoE experts through the kernels: every (token, expert) pair of a layer in one launch per step.

A Qwen3-MoE block routes each token to k of E experts. Run as one OSC layer per expert, a step asks the host which
experts its tokens reached (a device-to-host copy, which a CUDA graph cannot capture) and then launches two kernels
per projection per expert reached. Here the experts' kernel weights are stacked once ([E, N, ...]); the router's
choice stays on the device as int32 expert ids, and one grouped split-quantize plus one grouped transposed GEMM per
projection take all T × k pairs at once, each program reading its pair's expert id and that expert's weights. The
work of a step has a fixed shape (T × k pairs), so a CUDA graph captures it, and each expert reached streams its
weights once per token routed to it.

A pair-per-program GEMM streams an expert's weights once per token routed to it, which suits decoding; for a prompt
it still beats the experts' own layers by far while the prompt is short, since those wait on the host (two launches
per projection and expert reached, 128 experts a layer for Qwen3-30B-A3B). Past ``MAX_PAIRS`` pairs the experts' own
layers run, each on all of its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .layout import KernelWeights, kernel_weights
from .ops import FMT_IDS, GemmConfig, MODE_F8, MODE_F16, osc_gemm, split_quantize, supported

# above this many (token, expert) pairs a step runs the experts' own layers: their GEMMs read each expert's weights
# once for all its tokens, where the grouped GEMM reads them once per pair. Measured (H100, Qwen3-30B-A3B shapes,
# docs/bench/h100_moe_2026-12-06.md) at a 256-token prompt, 2048 pairs: grouped 4.2 ms a layer eager (2.6 from a CUDA
# graph) against 50-83 ms for the experts' own layers; larger prompts were not measured
MAX_PAIRS = 4096
PROJECTIONS = ("gate_up_proj", "down_proj")  # convert.ExpertLinears' layers of each expert


@dataclass
class StackedExperts:
    """The kernel weights of E experts' layers of one projection, stacked along a leading expert axis."""
    weights: KernelWeights  # codes [E, N, ...], rel_exp [E, N, Kk/32], row_scale [E, N], w_outlier [E, N, k],
    # outlier_idx [E, k], keep [E, Kk], bias [E, N] or None

    @property
    def experts(self) -> int:
        return self.weights.row_scale.shape[0]

    @property
    def out_features(self) -> int:
        return self.weights.row_scale.shape[1]


def _unlike(layers: list) -> str | None:
    """None if ``layers`` are OSC layers of one format, shape and outlier count (what one stack holds), else why not."""
    from ..linear import OSCLinear

    if not layers or not all(isinstance(m, OSCLinear) for m in layers):
        return "not every expert's layer of a projection is an OSC layer"
    first = layers[0]
    key = (first.scheme.format, first.scheme.group_size, first.in_features, first.out_features, first.k,
           first.bias is not None)
    for m in layers:
        if (m.scheme.format, m.scheme.group_size, m.in_features, m.out_features, m.k, m.bias is not None) != key:
            return (f"the experts' layers differ ({m.extra_repr()} against {first.extra_repr()}); the grouped kernels "
                    "need one format, shape and outlier count for all experts")
    return None


@torch.compiler.disable  # built once, eagerly: never traced into a compiled step
def stack_experts(layers: list) -> StackedExperts:
    """Stack the kernel weights of one projection's expert layers (OSCLinear, one scheme and shape for all). Each
    layer's own kernel weights then become views into the stack, so that its own calls (long prompts) add no copy."""
    why = _unlike(layers)
    if why:
        raise ValueError(f"stack_experts takes the OSC layers of one projection of every expert: {why}")
    first = layers[0]
    dev = first.qweight.device
    kws = [kernel_weights(m, frag=False) for m in layers]

    def stack(name):
        parts = [getattr(kw, name) for kw in kws]
        return None if parts[0] is None else torch.stack(parts).contiguous()

    w = KernelWeights(kws[0].fmt, stack("codes"), stack("rel_exp"), stack("row_scale"), kws[0].k_main,
                      stack("w_outlier"), stack("outlier_idx"), stack("keep"), stack("bias"))
    for e, m in enumerate(layers):  # the layers' own kernel weights: views, and no fragment layout of their own
        m._cache[("kernel", dev)] = KernelWeights(
            w.fmt, w.codes[e], None if w.rel_exp is None else w.rel_exp[e], w.row_scale[e], w.k_main,
            w.w_outlier[e], w.outlier_idx[e], w.keep[e], None if w.bias is None else w.bias[e])
    return StackedExperts(w)


def grouped_config(pairs: int, n: int, k_pad: int, fmt: str) -> GemmConfig:
    """The grouped GEMM's config: the transposed GEMM, one pair a program (bm = 1), 32 weight rows on 2 warps as the
    decode configs of gemm_config, FP16 operands for 4-bit weights and e4m3 for FP8 ones; split-K (a power of two up
    to 8, at least 2 steps of 128 columns each) until about two programs an SM."""
    programs = triton.cdiv(n, 32) * pairs
    split = 1
    while split < 8 and programs * split < 264 and k_pad // (128 * split * 2) >= 2:
        split *= 2
    return GemmConfig(1, 32, split, fmt == "fp8", 2, 6 if k_pad > n else 3, swap=True)


def grouped_linear(x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, stacked: StackedExperts,
                   cfg: GemmConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y [P, N]: row p is x[rows[p]] through expert experts[p]'s layer (split-quantize and the dual-path GEMM), for
    x [T, K] and int32 rows, experts [P] on x's device (``out``: y's buffer). The expert ids are not checked against E
    on the host (that would wait for the GPU); they come from the router's top-k, which cannot exceed it."""
    w = stacked.weights
    if x.dim() != 2 or x.shape[1] > w.k_main or rows.shape != experts.shape or rows.dim() != 1:
        raise ValueError(f"grouped_linear takes x [T, K <= {w.k_main}] and int32 rows, experts of one shape [P]; got "
                         f"x {tuple(x.shape)}, rows {tuple(rows.shape)}, experts {tuple(experts.shape)}")
    if rows.dtype != torch.int32 or experts.dtype != torch.int32:
        raise ValueError(f"rows and experts must be int32 (got {rows.dtype}, {experts.dtype})")
    if w.fmt not in FMT_IDS:
        raise ValueError(f"no grouped kernel for format {w.fmt}")
    p = rows.numel()
    cfg = cfg or grouped_config(p, stacked.out_features, w.k_main, w.fmt)
    x = x.contiguous()
    xo, a, sa = split_quantize(x, w.keep, w.outlier_idx, w.fmt, MODE_F8 if cfg.op_f8 else MODE_F16, w.k_main,
                               src=rows, grp=experts)
    y = out if out is not None else torch.empty(p, stacked.out_features, dtype=x.dtype, device=x.device)
    if p == 0:
        return y
    return osc_gemm(a, sa, w, xo, x.dtype, cfg, out=y, groups=experts)


def experts_supported(projections: list[list], x: torch.Tensor) -> str | None:
    """None if the grouped kernels can run these experts on x (each projection's layers alike, in a format with a
    kernel), else why not. An MoE model quantized with per-layer choices (policy="auto") may differ between experts;
    its experts then run one by one."""
    for layers in projections:
        why = _unlike(layers) or supported(layers[0], x)
        if why:
            return why
    return None


@torch.library.custom_op("oscquant::osc_grouped_linear", mutates_args=())
def grouped_linear_op(x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, codes: torch.Tensor,
                      rel_exp: torch.Tensor | None, row_scale: torch.Tensor, w_outlier: torch.Tensor,
                      outlier_idx: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None, fmt: str,
                      k_main: int) -> torch.Tensor:
    w = KernelWeights(fmt, codes, rel_exp, row_scale, k_main, w_outlier, outlier_idx, keep, bias)
    return grouped_linear(x, rows, experts, StackedExperts(w))


@grouped_linear_op.register_fake
def _(x, rows, experts, codes, rel_exp, row_scale, w_outlier, outlier_idx, keep, bias, fmt, k_main):
    return x.new_empty(rows.shape[0], row_scale.shape[1])


def _grouped(x, rows, experts, stacked: StackedExperts) -> torch.Tensor:
    """grouped_linear; under torch.compile through the custom op, which it sees as one opaque call (as the OSC
    layers' own ``oscquant::osc_linear``)."""
    if not torch.compiler.is_compiling():
        return grouped_linear(x, rows, experts, stacked)
    w = stacked.weights
    return grouped_linear_op(x, rows, experts, w.codes, w.rel_exp, w.row_scale, w.w_outlier, w.outlier_idx, w.keep,
                             w.bias, w.fmt, w.k_main)


def experts_forward(module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """convert.ExpertLinears' step through the grouped kernels: gate_up for every (token, expert) pair, the
    activation, down, then each token's pairs summed with the router's weights. Static shapes, no host sync."""
    t, k = top_k_index.shape
    dev = hidden.device
    experts = top_k_index.reshape(-1).to(torch.int32)
    pairs = torch.arange(t * k, device=dev, dtype=torch.int32)
    gate_up, down = (module.stacked(p, dev) for p in PROJECTIONS)
    gate, up = _grouped(hidden, pairs // k, experts, gate_up).chunk(2, dim=-1)
    h = _grouped(module.act_fn(gate) * up, pairs, experts, down)
    out = (h.float() * top_k_weights.reshape(-1, 1).float()).reshape(t, k, -1).sum(1)
    return out.to(hidden.dtype)
