"""Number formats as pure functions: quantize, dequantize, pack.

Every quantizer works along the last dimension of a 2-D tensor ``[rows, K]``
(tokens x channels for activations, out x in for weights) and returns a
:class:`QTensor`. Dequantizing gives float32 values, so ``dequantize(quantize(x))``
is the value the hardware would compute with.

Formats
-------
int4   symmetric, scale = amax/7 per row (or per ``group_size`` columns), codes in [-8, 7]
mxfp4  OCP MX: e2m1 elements, one E8M0 (power-of-two) scale per 32 columns
nvfp4  e2m1 elements, one E4M3 scale per 16 columns, times one FP32 scale per tensor
       (per row for activations, which are quantized token by token)
fp8    e4m3 elements, one FP32 scale per row

Four-bit codes are packed two per byte, element ``2j`` in the low nibble and
``2j+1`` in the high nibble of byte ``j``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

FP4_FORMATS = ("int4", "mxfp4", "nvfp4")
FORMATS = FP4_FORMATS + ("fp8",)
SEARCHED_FORMATS = FP4_FORMATS  # whose weights may search their scales (quantize(..., search=True)): every 4-bit one
BLOCK_SIZE = {"mxfp4": 32, "nvfp4": 16}  # fixed by the format; int4's group is a choice

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_MAX = 6.0
E4M3_MAX = 448.0
INT4_MAX = 7.0

# Thresholds between consecutive e2m1 magnitudes. A tie goes to the even code
# (round-half-to-even), so the ">=" comparisons sit where the upper code is even.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_GOES_UP = (False, True, False, True, False, True, False)


@dataclass
class QTensor:
    """Quantized 2-D tensor: codes plus the scales needed to dequantize them."""

    fmt: str
    codes: torch.Tensor  # uint8: packed nibbles for 4-bit formats, e4m3 bytes for fp8
    scales: torch.Tensor  # per row, or per (row, block)
    shape: tuple[int, int]
    group_size: int | None = None  # columns per scale (None: the whole row)
    global_scale: torch.Tensor | None = None  # nvfp4 only: fp32, [1] or [rows, 1]


def block_size(fmt: str, group_size: int | None = None) -> int | None:
    """Columns that share one scale; None means one scale per row."""
    check_format(fmt)
    if fmt in BLOCK_SIZE:
        return BLOCK_SIZE[fmt]
    return group_size if fmt == "int4" else None


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown number format {fmt!r}; choose one of {', '.join(FORMATS)}")


def check_columns(fmt: str, k: int, group_size: int | None = None, what: str = "K") -> None:
    """Raise if ``k`` columns cannot be split into the format's scaling blocks."""
    block = block_size(fmt, group_size)
    if block and k % block:
        raise ValueError(
            f"{what}={k} is not a multiple of {fmt}'s block of {block} columns; "
            f"use a layer whose input size is a multiple of {block}, or another format"
            + (" or int4 group_size" if fmt == "int4" else "")
        )


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D tensor [rows, K], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize a tensor that holds NaN or Inf; check the model's inputs")


# ---------------------------------------------------------------- packing
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (uint8 values 0..15, even last dim) two per byte."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of 4-bit codes ({codes.shape[-1]})")
    codes = codes.to(torch.uint8)
    if (codes > 15).any():
        raise ValueError("4-bit codes must lie in 0..15")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


# ---------------------------------------------------------------- e2m1
def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """Round float values (already divided by their scale) to e2m1 codes 0..15.

    Bit 3 is the sign, bits 0-2 index E2M1_VALUES. Magnitudes above 6 saturate.
    """
    mag = v.abs().float()
    idx = torch.bucketize(mag, _bucket_edges(mag.device), right=False).to(torch.uint8)
    sign = (v < 0) & (idx > 0)  # no negative zero
    return idx | (sign.to(torch.uint8) << 3)


@functools.lru_cache(maxsize=None)
def _bucket_edges(device) -> torch.Tensor:
    """Midpoints for bucketize, which counts edges strictly below a value. Where a tie must
    go up, the edge moves to the next float32 below it, so "> edge" means ">= midpoint".
    Made once per device: GPTQ encodes a column at a time, and a copy to the GPU each time would wait on it."""
    edges = torch.tensor(_E2M1_MIDPOINTS, dtype=torch.float32)
    down = torch.nextafter(edges, torch.tensor(-1.0))
    return torch.where(torch.tensor(_TIE_GOES_UP), down, edges).to(device)


@functools.lru_cache(maxsize=None)
def _e2m1_values(device) -> torch.Tensor:
    return E2M1_VALUES.to(device)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    mag = _e2m1_values(codes.device)[(codes & 7).long()]
    return torch.where(codes >= 8, -mag, mag)


def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """``v`` on the e2m1 grid as values: e2m1_decode(e2m1_encode(v)) in a few elementwise operations. The grid steps
    by 0.5 below 2, by 1 below 4 and by 2 up to 6, so a magnitude over its step, rounded half to even and times the
    step, is the nearest value with ties to the even code (the steps are powers of two: nothing rounds on the way)."""
    mag = v.abs().float()
    # frexp: mag = m * 2**e with m in [0.5, 1), so [2, 4) has e = 2 and the step is 2**(e - 2), clamped to [0.5, 2]
    step = torch.exp2((torch.frexp(mag).exponent - 2).clamp_(-1, 1))
    r = torch.round(mag / step).mul_(step).clamp_(max=6.0)
    return r.copysign_(v).add_(0.0)  # -0.0 + 0.0 is +0.0: no negative zero, as e2m1_encode


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    rows, k = x.shape
    return x.reshape(rows, k // block, block)


def on_grid(fmt: str, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the 4-bit format's element grid under ``scale`` (broadcast to x), as values: what a block
    quantized with that scale decodes to (the weights' scale search and GPTQ compare candidates by it)."""
    if fmt == "int4":
        return torch.round(x / scale).clamp(-8, 7) * scale
    return e2m1_round(x / scale) * scale


def nibble_codes(fmt: str, v: torch.Tensor) -> torch.Tensor:
    """4-bit codes 0..15 (unpacked) of values already divided by their scale: int4 rounds to nearest and saturates at
    -8 and 7 (two's complement nibbles), the FP4 formats round to e2m1 (:func:`e2m1_encode`)."""
    if fmt == "int4":
        return (torch.round(v).clamp(-8, 7).to(torch.int8) & 0xF).to(torch.uint8)
    return e2m1_encode(v)


def _least_error(candidates: list[torch.Tensor], sq_err) -> torch.Tensor:
    """Per block, the candidate scale whose ``sq_err`` is least; the first (the max rule's) where they tie.
    FP8 scales are compared as their bytes, which torch can stack and gather."""
    fp8 = candidates[0].dtype == torch.float8_e4m3fn
    errs = torch.stack([sq_err(c) for c in candidates])
    stacked = torch.stack([c.view(torch.uint8) if fp8 else c for c in candidates])
    best = stacked.gather(0, errs.argmin(0, keepdim=True)).squeeze(0)
    return best.view(torch.float8_e4m3fn) if fp8 else best


def _column_weights(importance: torch.Tensor | None, x: torch.Tensor, block: int) -> torch.Tensor | float:
    """The scale search's weight for each column's squared error, [K] or one row of them per row of ``x`` [rows, K]
    (GPTQ rounds several layers' rows at once, each under its own), shaped [1 or rows, K / block, block] (1.0: all
    alike)."""
    if importance is None:
        return 1.0
    rows, k = x.shape
    h = torch.as_tensor(importance).to(x.device, torch.float32)
    if h.shape not in ((k,), (rows, k)):
        raise ValueError(f"importance must hold one weight per column ({k}), or a row of them per row ({rows}, {k}); "
                         f"got shape {tuple(h.shape)}")
    if not torch.isfinite(h).all() or (h < 0).any():
        raise ValueError("importance must be finite and non-negative (a channel's mean square activation)")
    return h.reshape(-1, k // block, block)


# ---------------------------------------------------------------- int4
INT4_CLIPS = tuple(1 - 0.05 * i for i in range(11))  # the scale search's candidates: amax / 7 times 1, 0.95, ..., 0.5


def quantize_int4(x: torch.Tensor, group_size: int | None = None, search: bool = False,
                  importance: torch.Tensor | None = None) -> QTensor:
    """``search`` (weights, offline): each row's (or group's) scale is amax / 7 times whichever of INT4_CLIPS leaves
    the least squared error (each column's weighted by ``importance``, see :func:`quantize`); clipping the few
    largest values buys a finer step for the rest. Activations keep amax / 7, which split-quantize reproduces bit
    for bit."""
    _check_input(x)
    check_columns("int4", x.shape[1], group_size)
    g = group_size or x.shape[1]
    xb = _blocks(x.float(), g)
    amax = xb.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax))
    if search:
        h = _column_weights(importance, x, g)

        def sq_err(s):
            return ((on_grid("int4", xb, s) - xb).square() * h).sum(-1, keepdim=True)
        scale = _least_error([torch.where(amax > 0, amax * clip / INT4_MAX, torch.ones_like(amax))
                              for clip in INT4_CLIPS], sq_err)  # INT4_CLIPS[0] = 1: the max rule's scale
    codes = pack_nibbles(nibble_codes("int4", xb / scale).reshape(x.shape))
    return QTensor("int4", codes, scale.squeeze(-1), tuple(x.shape), group_size)


def _int4_values(q: QTensor) -> torch.Tensor:
    c = unpack_nibbles(q.codes).to(torch.int16)
    return torch.where(c >= 8, c - 16, c).float()


# ---------------------------------------------------------------- mxfp4
def e8m0_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Shared exponent e = ceil(log2(amax / 6)): the smallest e with amax / 2**e <= 6.

    The OCP spec's example rule, floor(log2(amax)) - 2, maps the block maximum into
    [4, 8) and clips everything above 6 to 6; rounding up keeps the maximum
    representable. Either is a valid MX encoding. Computed from amax's bits, so that
    kernels can reproduce it exactly: with amax = m * 2**E, m in [1, 2),
    e = E - 2, plus 1 when m > 1.5.
    """
    mant, exp = torch.frexp(amax.float())  # amax = mant * 2**exp, mant in [0.5, 1)
    e = (exp - 3 + (mant > 0.75).to(exp.dtype)).float()
    e = torch.where(amax > 0, e, torch.full_like(e, -127.0))
    return e.clamp(-127, 127)


def quantize_mxfp4(x: torch.Tensor, search: bool = False, importance: torch.Tensor | None = None) -> QTensor:
    """``search`` (weights, which are quantized once, offline): each block takes the better, by squared error (each
    column's weighted by ``importance``, see :func:`quantize`), of e8m0_exponent's scale and the one below it, which
    clips the block's largest values to ±6 times it but halves the step for all the others. Activations keep the
    one rule, which the kernels reproduce bit for bit."""
    _check_input(x)
    check_columns("mxfp4", x.shape[1])
    xb = _blocks(x.float(), 32)
    e = e8m0_exponent(xb.abs().amax(-1, keepdim=True))
    if search:
        h = _column_weights(importance, x, 32)

        def sq_err(ee):
            return ((on_grid("mxfp4", xb, torch.exp2(ee)) - xb).square() * h).sum(-1, keepdim=True)
        e = _least_error([e, (e - 1).clamp(min=-127)], sq_err)
    codes = e2m1_encode(xb * torch.exp2(-e)).reshape(x.shape)
    scales = (e.squeeze(-1) + 127).to(torch.uint8)  # E8M0: biased exponent byte
    return QTensor("mxfp4", pack_nibbles(codes), scales, tuple(x.shape), 32)


# ---------------------------------------------------------------- nvfp4
def quantize_nvfp4(x: torch.Tensor, per_row_global: bool = False, search: bool = False,
                   importance: torch.Tensor | None = None, global_scale: torch.Tensor | None = None) -> QTensor:
    """NVFP4. The FP32 global scale maps the largest block scale onto E4M3's range.

    Weights use one global scale per tensor; activations pass ``per_row_global``
    so each token gets its own, as a dynamic per-token quantizer would. ``search`` (weights, offline): each block's
    E4M3 scale is amax / 6 times whichever of INT4_CLIPS, rounded to E4M3, leaves the least squared error (weighted
    by ``importance``, see :func:`quantize`); activations keep amax / 6, which split-quantize reproduces.
    ``global_scale`` [1, 1], or [rows, 1]: the per-tensor scale given (GPTQ rounds a tensor a block at a time under
    one, and several tensors' rows at once, each row under its tensor's).
    """
    _check_input(x)
    check_columns("nvfp4", x.shape[1])
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True) if per_row_global else xf.abs().amax().reshape(1, 1)
    gscale = amax / (E2M1_MAX * E4M3_MAX)
    gscale = torch.where(gscale > 0, gscale, torch.ones_like(gscale))
    if global_scale is not None:
        gscale = global_scale.float().reshape(-1, 1).to(xf.device)
    xb = _blocks(xf, 16)
    g = gscale.unsqueeze(-1)

    def block_scale(clip):
        return (xb.abs().amax(-1) * clip / E2M1_MAX / gscale).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)

    def effective(bs):
        eff = bs.float().unsqueeze(-1) * g
        return torch.where(eff > 0, eff, torch.ones_like(eff))

    bscale = block_scale(1.0)
    if search:
        h = _column_weights(importance, x, 16)

        def sq_err(bs):
            return ((on_grid("nvfp4", xb, effective(bs)) - xb).square() * h).sum(-1)
        bscale = _least_error([block_scale(clip) for clip in INT4_CLIPS], sq_err)
    codes = e2m1_encode(xb / effective(bscale)).reshape(x.shape)
    return QTensor("nvfp4", pack_nibbles(codes), bscale, tuple(x.shape), 16, gscale.reshape(-1, 1))


# ---------------------------------------------------------------- fp8
def quantize_fp8(x: torch.Tensor) -> QTensor:
    _check_input(x)
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return QTensor("fp8", codes.view(torch.uint8), scale.squeeze(-1), tuple(x.shape))


# ---------------------------------------------------------------- dispatch
def quantize(x: torch.Tensor, fmt: str, group_size: int | None = None, per_row_global: bool = False,
             search: bool = False, importance: torch.Tensor | None = None) -> QTensor:
    """Quantize a 2-D tensor along its last dimension (``search``: 4-bit weights, see each format's quantizer).

    ``importance`` [K] or [rows, K] (with ``search``): how much each column's error counts, a weight layer's mean square input
    per channel from calibration. A layer's output error from its weight error ΔW is E[(ΔW x)^2], which is
    sum_j E[x_j^2] ΔW_ij^2 when channels are uncorrelated; the search then spends its precision where the
    activations are large."""
    check_format(fmt)
    if group_size is not None and fmt != "int4":
        raise ValueError(f"group_size applies to int4 only; {fmt} has a fixed block")
    if search and fmt not in SEARCHED_FORMATS:
        raise ValueError(f"the scale search is for {', '.join(SEARCHED_FORMATS)} weights only, not {fmt}")
    if importance is not None and not search:
        raise ValueError("importance weighs the scale search's error; pass search=True with it")
    if fmt == "int4":
        return quantize_int4(x, group_size, search, importance)
    if fmt == "mxfp4":
        return quantize_mxfp4(x, search, importance)
    if fmt == "nvfp4":
        return quantize_nvfp4(x, per_row_global, search, importance)
    return quantize_fp8(x)


def element_values(q: QTensor) -> torch.Tensor:
    """The decoded elements before scaling (e2m1 or int4 or e4m3 values), float32."""
    if q.fmt == "int4":
        return _int4_values(q)
    if q.fmt == "fp8":
        return q.codes.view(torch.float8_e4m3fn).float()
    return e2m1_decode(unpack_nibbles(q.codes))


def expanded_scales(q: QTensor) -> torch.Tensor:
    """Per-element scale factors, broadcastable to ``[rows, K]``, float32."""
    rows, k = q.shape
    if q.fmt == "mxfp4":
        s = torch.exp2(q.scales.float() - 127)
    elif q.fmt == "nvfp4":
        s = q.scales.float() * q.global_scale.float()
    else:
        s = q.scales.float().reshape(rows, -1)
    if s.shape[-1] == 1:
        return s  # one scale per row: broadcast
    return s.repeat_interleave(k // s.shape[-1], dim=-1)


def dequantize(q: QTensor) -> torch.Tensor:
    return element_values(q) * expanded_scales(q)


def fake_quantize(x: torch.Tensor, fmt: str, **kw) -> torch.Tensor:
    """Round-trip through the format: the values a quantized kernel would see."""
    return dequantize(quantize(x, fmt, **kw))


def bits_per_element(fmt: str, group_size: int | None = None, k: int | None = None) -> float:
    """Storage bits per element, scales included (a row-scale over ``k`` columns)."""
    check_format(fmt)
    if fmt == "mxfp4":
        return 4 + 8 / 32
    if fmt == "nvfp4":
        return 4 + 8 / 16
    if fmt == "fp8":
        return 8 + (32 / k if k else 0)
    g = group_size or k
    return 4 + (32 / g if g else 0)
