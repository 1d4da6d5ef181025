"""Kernel-side re-encoding of an OSC layer's weights (pure PyTorch, runs anywhere).

The checkpoint keeps the canonical encoding of formats.py. The GPU kernels read the
same bits in a different order, prepared once per layer and cached (as Marlin does):

codes   [N, Kk/2] uint8. K is cut into chunks of CHUNK = 64 columns; in each chunk,
        byte j holds column j in its low nibble and column 32 + j in its high nibble.
        Unpacking a [rows, 32]-byte tile then gives two [rows, 32] operand tiles, one whole
        MX block each, with no interleaving shuffle in registers and one scale per row.
rel_exp [N, Kk/32] int8 (MXFP4): each 32-column block's E8M0 exponent minus the row's
        largest, so <= 0. The row's largest goes into the row scale.
row_scale [N] fp32: 2**(max exponent - 127) for MXFP4, the int4 scale for INT4, the
        e4m3 scale for FP8.

Kk is K rounded up to two CHUNKs (128) with zero columns (zero codes decode to 0); the outlier
channels' columns hold zero codes too (linear.py).
An operand element is then value * 2**rel_exp, and y = acc * row_scale_x * row_scale_w.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import formats

CHUNK = 64
HALF = CHUNK // 2
REL_EXP_MIN = -24  # below this a block is < 2**-24 of its row maximum: it decodes to zero


@dataclass
class KernelWeights:
    fmt: str  # mxfp4 | int4 | fp8
    codes: torch.Tensor  # uint8 [N, Kk/2] (4-bit) or float8_e4m3fn [N, Kk] (fp8)
    rel_exp: torch.Tensor | None  # int8 [N, Kk/32] (mxfp4)
    row_scale: torch.Tensor  # fp32 [N]
    k_main: int  # Kk
    w_outlier: torch.Tensor  # bf16 [N, k]
    outlier_idx: torch.Tensor  # int32 [k]
    keep: torch.Tensor  # uint8 [Kk]: 1 where x feeds the 4-bit path, 0 for outlier channels and padding
    bias: torch.Tensor | None


def padded_width(k: int) -> int:
    """K rounded up to whole chunk pairs: the transposed small-M GEMM steps two chunks at a time."""
    return -(-k // (2 * CHUNK)) * 2 * CHUNK


def chunk_pack(codes: torch.Tensor) -> torch.Tensor:
    """Unpacked 4-bit codes [rows, Kk] (Kk % 64 == 0) -> chunk layout bytes [rows, Kk/2]."""
    rows, kk = codes.shape
    c = codes.reshape(rows, kk // CHUNK, 2, HALF)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(rows, kk // 2)


def chunk_unpack(packed: torch.Tensor) -> torch.Tensor:
    rows, half = packed.shape
    p = packed.reshape(rows, half // HALF, HALF)
    return torch.stack((p & 0xF, p >> 4), dim=2).reshape(rows, half * 2)


def _pad_cols(t: torch.Tensor, width: int, value=0) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def split_exponents(e8m0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E8M0 bytes [rows, blocks] -> (relative exponents int8 <= 0, row scale fp32)."""
    e = e8m0.to(torch.int32) - 127
    top = e.amax(dim=1, keepdim=True)
    rel = (e - top).clamp(min=REL_EXP_MIN).to(torch.int8)
    return rel, torch.exp2(top.squeeze(1).float())


def kernel_weights(layer) -> KernelWeights:
    """Re-encode an OSCLinear for the kernels (call once; the result is cached on the layer)."""
    fmt = layer.scheme.format
    n = layer.out_features
    kk = padded_width(layer.main_columns)
    if fmt == "mxfp4":
        codes = _pad_cols(formats.unpack_nibbles(layer.qweight), kk)
        rel, row = split_exponents(layer.wscale)
        rel = _pad_cols(rel, kk // 32, REL_EXP_MIN)
        packed = chunk_pack(codes)
    elif fmt == "int4" and layer.scheme.group_size is None:
        packed = chunk_pack(_pad_cols(formats.unpack_nibbles(layer.qweight), kk))
        rel, row = None, layer.wscale.float().reshape(n)
    elif fmt == "fp8":
        packed = _pad_cols(layer.qweight, kk).view(torch.float8_e4m3fn)
        rel, row = None, layer.wscale.float().reshape(n)
    else:
        raise NotImplementedError(f"no kernel layout for {fmt} (group_size={layer.scheme.group_size})")
    dev = layer.qweight.device
    return KernelWeights(
        fmt, packed.contiguous(), None if rel is None else rel.contiguous(), row.contiguous(), kk,
        layer.w_outlier.contiguous(), layer.outlier_idx.to(torch.int32),
        _pad_cols(layer.main_mask(dev)[None], kk)[0].contiguous(),
        None if layer.bias is None else layer.bias.float().contiguous(),
    )


def reference_operand(kw: KernelWeights) -> torch.Tensor:
    """What the kernels decode the weights to, before the row scale: float32 [N, Kk]."""
    if kw.fmt == "fp8":
        return kw.codes.float()
    codes = chunk_unpack(kw.codes)
    if kw.fmt == "int4":
        c = codes.to(torch.int16)
        return torch.where(c >= 8, c - 16, c).float()
    vals = formats.e2m1_decode(codes)
    return vals * torch.exp2(kw.rel_exp.float()).repeat_interleave(32, dim=1)
