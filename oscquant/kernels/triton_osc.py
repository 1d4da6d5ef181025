"""Triton kernels for the two online steps of an OSC linear layer.

split_quantize   one pass over BF16 activation rows: gathers the outlier channels into
                 x_o [M, k] BF16, zeroes them on the main path (all K channels, linear.py)
                 and quantizes that per token to
                   - canonical packed codes + E8M0 scales (MODE_PACKED, bit-exact with formats.py), or
                   - ready-to-multiply operands (MODE_F16 / MODE_F8): the 4-bit values with each
                     MX block's exponent folded in relative to the row's largest, plus one FP32
                     scale per row. e2m1 * 2**d is exact in FP16 for d >= -24 and in e4m3 for d >= -14.
osc_gemm         y = (A @ B^T) * sx * sw + x_o @ W_o^T (+ bias), one launch (prefill, FP8 weights).
osc_gemm_t       the same for up to 256 tokens, computed as y^T = B @ A^T (4-bit weights the left operand).
                 B is read as 4-bit codes (chunk layout of layout.py) and unpacked in registers:
                 e2m1 code -> FP16 by placing its three magnitude bits at FP16 bits 9-11 and its
                 sign at bit 15 (that FP16 number is the e2m1 value times 2**-14, subnormals
                 included), then one multiply by 2**(d + 14) per block; int4 -> FP16 by the
                 0x6400 trick. FP16 operands feed mma/wgmma for small M; at 9-256 tokens,
                 by layer shape (ops.fold_config), MXFP4 weights unpack to e4m3 by byte tables
                 instead (_unpack_lut) and feed wgmma; for large M, 4-bit weights are expanded to
                 e4m3 first (ops.py) and osc_gemm runs on wgmma. The BF16
                 branch accumulates into the same FP32 accumulator after the main loop.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .layout import FRAG_LUT
from .overlap import release_dependents, wait_inputs

_LUT_LO, _LUT_HI, _LUT_LO_STEP, _LUT_HI_STEP = (tl.constexpr(v) for v in FRAG_LUT)

MODE_PACKED, MODE_F16, MODE_F8 = 0, 1, 2
FMT_MXFP4, FMT_INT4, FMT_FP8, FMT_NVFP4 = 0, 1, 2, 3


@triton.jit
def _pow2(e):
    """2**e for integer e in [-126, 127], exactly, from the bits."""
    return ((e + 127).to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_code(v):
    """Round to the nearest e2m1 code (ties to even), sign in bit 3; matches formats.e2m1_encode."""
    a = tl.abs(v)
    idx = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32) \
        + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32)
    sign = ((v < 0) & (idx > 0)).to(tl.int32)
    return idx | (sign << 3)


@triton.jit
def _round_even(v):
    """Round half to even, as torch.round does, for |v| < 2**22: adding 1.5 * 2**23 leaves no
    fraction bits, so the FP32 adder itself rounds (to nearest, ties to even)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _e2m1_round(v):
    """The nearest e2m1 value to v (|v| <= 6), ties to the even code, in about eight operations.

    The e2m1 grid has spacing 0.5 below 2, 1 below 4 and 2 up to 6, and its even codes are
    exactly the even multiples of the spacing, so rounding to the spacing (ties to even, by
    the FP32 adder) is e2m1 rounding with ties to the even code.
    """
    a = tl.abs(v)
    step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
    magic = step * 12582912.0
    return (v + magic) - magic


@triton.jit
def _store_nibbles(q_ptr, r, rm, code, K_PAD, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Rows r of 4-bit codes [ROWS, BLOCK] (int32, 0..15) packed two a byte, column 2j low, into q [M, K_PAD / 2]."""
    lo, hi = tl.split(tl.reshape(code, [ROWS, BLOCK // 2, 2]))
    h = tl.arange(0, BLOCK // 2)
    tl.store(q_ptr + r[:, None] * (K_PAD // 2) + h[None, :], (lo | (hi << 4)).to(tl.uint8),
             mask=rm[:, None] & (h < K_PAD // 2)[None, :])


@triton.jit
def _round_to(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """FP32 v rounded to dtype (to nearest, ties to even), as an FP32 value."""
    if INTERPRET and dtype == tl.bfloat16:  # the CPU interpreter's FP32 -> BF16 cast truncates
        b = v.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True)
    return v.to(dtype).to(tl.float32)


@triton.jit
def _rms_scaled(xf, rstd, w, dtype: tl.constexpr, NORM: tl.constexpr, INTERPRET: tl.constexpr):
    """An RMSNorm's output from x (FP32), its rows' rsqrt and its factors, rounded as the model's norm rounds (FP32
    values of dtype)."""
    h = xf * rstd[:, None]
    if NORM == 1:  # Llama: the normalized row in the input dtype, then times the weight
        h = _round_to(h, dtype, INTERPRET)
    return _round_to(h * w, dtype, INTERPRET)


@triton.jit
def _gated(g, u, dtype: tl.constexpr, ACT: tl.constexpr, INTERPRET: tl.constexpr):
    """A gated MLP's act(gate) * up from the gate and up values, rounded as Hugging Face's MLP rounds (the activation's
    output in dtype, then the product): FP32 values of dtype. ACT 1 is SiLU, 2 GELU's tanh form."""
    gf = g.to(tl.float32)
    if ACT == 1:
        a = gf / (1.0 + tl.exp(-gf))
    else:  # 0.5 * (1 + tanh(y)) = 1 / (1 + exp(-2y)): no cancellation where tanh(y) is near -1
        y = 0.7978845608028654 * (gf + 0.044715 * gf * gf * gf)
        a = gf / (1.0 + tl.exp(-2.0 * y))
    return _round_to(_round_to(a, dtype, INTERPRET) * u.to(tl.float32), dtype, INTERPRET)


@triton.jit
def split_quantize_kernel(
    x_ptr, stride_xm, keep_ptr, out_idx_ptr,
    xo_ptr, q_ptr, s_ptr, rs_ptr,
    M, K_IN, K_OUT, K_PAD,
    FMT: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_O: tl.constexpr, ROWS: tl.constexpr,
    INTERPRET: tl.constexpr = False, PDL: tl.constexpr = False, RELEASE_LATE: tl.constexpr = False,
    SHARED_BESIDE: tl.constexpr = False, src_ptr=None, grp_ptr=None, GROUPED: tl.constexpr = False,
    GROUP: tl.constexpr = 0, FOLD: tl.constexpr = False, nw_ptr=None, norm_eps=0.0, NORM: tl.constexpr = 0,
    ACT: tl.constexpr = 0,
):
    """ROWS token rows per program, loaded together as one [ROWS, BLOCK] tile (BLOCK >= K_PAD:
    rows stay whole in registers), so that each program keeps ROWS rows of loads in flight.
    PDL (overlap.py): the GEMM after it may launch at once, or (RELEASE_LATE) once this program's stores
    are issued. SHARED_BESIDE changes no code: it compiles a kernel of its own, to which the driver is asked
    for the largest shared-memory carve-out (set per compiled kernel), for launches whose overlapped dependent
    needs shared memory (overlap.py); the others keep the default carve-out and with it their L1.
    GROUPED (MoE experts, moe.py): output row r quantizes x row src[r] with the outlier channels of group grp[r]
    (keep [groups, K_PAD], out_idx [groups, K_OUT]): one launch for every (token, expert) pair of a layer.
    GROUP (INT4 only; a power of two dividing K_PAD): a scale per GROUP columns of a token, not one per token; with
    FOLD (MODE_F16) each value times its group's scale over the token's largest (of its nonzero groups), rounded once
    to FP16, and that largest scale per token in rs (the prefill path's operands).
    NORM (norms.py): x is the input of the RMSNorm before the layer, which runs here on the whole row: x * rsqrt(mean
    of x**2 + norm_eps) times the factors nw (FP32 [K_IN]), rounded to x's dtype after the product, and for NORM == 1
    before it too (Llama's order; NORM == 2 is Gemma's), the outlier channels as well.
    ACT (gated.py): each x row holds a gated MLP's gate and up projections side by side (up from column K_IN on), and
    the layer's input is act(gate) * up, computed here (ACT 1: SiLU, 2: GELU's tanh form)."""
    release_dependents(PDL and not RELEASE_LATE)
    wait_inputs(PDL)
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rm = r < M
    c = tl.arange(0, BLOCK)
    o = tl.arange(0, BLOCK_O)
    om = rm[:, None] & (o < K_OUT)[None, :]
    if GROUPED:
        src = tl.load(src_ptr + r, mask=rm, other=0).to(tl.int64)
        grp = tl.load(grp_ptr + r, mask=rm, other=0).to(tl.int64)
    else:
        src = r
    # the row is loaded first, in flight while the outlier indices arrive and x_o is gathered (after the
    # x_o store it would wait for it: the pointers may alias). tl.gather from the registers instead
    # compiles to thousands of shuffles and a stack.
    x = tl.load(x_ptr + src[:, None] * stride_xm + c[None, :], mask=rm[:, None] & (c < K_IN)[None, :], other=0.0)
    # the BF16 sub-tensor of the outlier channels (nothing when K_OUT is 0: all masked)
    if GROUPED:
        keep = tl.load(keep_ptr + grp[:, None] * K_PAD + c[None, :], mask=rm[:, None] & (c < K_PAD)[None, :],
                       other=0) != 0
        oi = tl.load(out_idx_ptr + grp[:, None] * K_OUT + o[None, :], mask=om, other=0)
    else:
        keep = (tl.load(keep_ptr + c, mask=c < K_PAD, other=0) != 0)[None, :]
        oi = tl.load(out_idx_ptr + o, mask=o < K_OUT, other=0)[None, :]
    xo = tl.load(x_ptr + src[:, None] * stride_xm + oi, mask=om, other=0.0)
    if ACT:  # the up half of the row, then act(gate) * up for the row and its outlier channels
        tl.static_assert(NORM == 0 and not GROUPED, "a gated input takes no fused norm and no grouped rows")
        xdt_a: tl.constexpr = x.dtype
        up = tl.load(x_ptr + src[:, None] * stride_xm + K_IN + c[None, :], mask=rm[:, None] & (c < K_IN)[None, :],
                     other=0.0)
        up_o = tl.load(x_ptr + src[:, None] * stride_xm + K_IN + oi, mask=om, other=0.0)
        x = _gated(x, up, xdt_a, ACT, INTERPRET)
        xo = _gated(xo, up_o, xdt_a, ACT, INTERPRET)
    if NORM:  # the sum over the row's own registers; the factors are K_IN FP32 words that every program reads
        xdt: tl.constexpr = x.dtype
        xf = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / K_IN + norm_eps)  # as torch.rsqrt: rsqrtf on the GPU
        x = _rms_scaled(xf, rstd, tl.load(nw_ptr + c, mask=c < K_IN, other=0.0)[None, :], xdt, NORM, INTERPRET)
        xo = _rms_scaled(xo.to(tl.float32), rstd, tl.load(nw_ptr + oi, mask=om, other=0.0), xdt, NORM, INTERPRET)
    tl.store(xo_ptr + r[:, None] * K_OUT + o[None, :], xo.to(tl.bfloat16), mask=om)
    x = tl.where(keep, x.to(tl.float32), 0.0)  # outlier channels and padding are zero on the 4-bit path
    cm = rm[:, None] & (c < K_PAD)[None, :]
    out = r[:, None] * K_PAD + c[None, :]  # where operands (MODE_F16 / MODE_F8) go

    if FMT == 0:  # MXFP4
        xb = tl.reshape(x, [ROWS, BLOCK // 32, 32])
        amax = tl.max(tl.abs(xb), axis=2)
        bits = amax.to(tl.int32, bitcast=True)
        ex = ((bits >> 23) & 0xFF) - 127
        e = ex - 2 + ((bits & 0x7FFFFF) > 0x400000).to(tl.int32)
        e = tl.where(amax > 0, e, -127)
        e = tl.minimum(tl.maximum(e, -127), 127)
        v = xb * _pow2(-tl.maximum(e, -126))[:, :, None]
        nb = tl.arange(0, BLOCK // 32)
        if MODE == 0:
            _store_nibbles(q_ptr, r, rm, _e2m1_code(v), K_PAD, ROWS, BLOCK)
            tl.store(s_ptr + r[:, None] * (K_PAD // 32) + nb[None, :], (e + 127).to(tl.uint8),
                     mask=rm[:, None] & (nb < K_PAD // 32)[None, :])
        else:
            top = tl.max(e, axis=1)
            d = tl.maximum(e - top[:, None], -60)
            if MODE == 1:
                val = _e2m1_round(v) * tl.exp2(d.to(tl.float32))[:, :, None]
                tl.store(q_ptr + out, tl.reshape(val, [ROWS, BLOCK]).to(tl.float16), mask=cm)
                tl.store(rs_ptr + r, _pow2(tl.maximum(top, -126)), mask=rm)
            else:  # e4m3 holds e2m1 * 2**(d + 5) exactly down to d = -13
                val = _e2m1_round(v) * tl.exp2((d + 5).to(tl.float32))[:, :, None]
                tl.store(q_ptr + out, tl.reshape(val, [ROWS, BLOCK]).to(tl.float8e4nv), mask=cm)
                tl.store(rs_ptr + r, _pow2(tl.maximum(top - 5, -126)), mask=rm)
    elif FMT == 1:  # INT4, one scale per token, or per GROUP columns of a token (into s, [M, K_PAD / GROUP])
        if not GROUP:
            amax = tl.max(tl.abs(x), axis=1)
            scale = tl.where(amax > 0, tl.math.div_rn(amax, 7.0), 1.0)
            q = tl.minimum(tl.maximum(_round_even(tl.math.div_rn(x, scale[:, None])), -8.0), 7.0)
            tl.store(rs_ptr + r, scale, mask=rm)
        else:
            xg = tl.reshape(x, [ROWS, BLOCK // GROUP, GROUP])
            amax = tl.max(tl.abs(xg), axis=2)
            scale = tl.where(amax > 0, tl.math.div_rn(amax, 7.0), 1.0)
            q = tl.minimum(tl.maximum(_round_even(tl.math.div_rn(xg, scale[:, :, None])), -8.0), 7.0)
            if FOLD:  # all-zero groups (scale 1) do not count towards the largest: their values are 0
                tl.static_assert(MODE == 1, "folded group scales make FP16 operands")
                top = tl.max(tl.where(amax > 0, scale, 0.0), axis=1)
                top = tl.where(top > 0, top, 1.0)
                q = q * tl.math.div_rn(scale, top[:, None])[:, :, None]
                tl.store(rs_ptr + r, top, mask=rm)
            else:
                ng = tl.arange(0, BLOCK // GROUP)
                tl.store(s_ptr + r[:, None] * (K_PAD // GROUP) + ng[None, :], scale,
                         mask=rm[:, None] & (ng < K_PAD // GROUP)[None, :])
            q = tl.reshape(q, [ROWS, BLOCK])
        if MODE == 0:
            _store_nibbles(q_ptr, r, rm, q.to(tl.int32) & 0xF, K_PAD, ROWS, BLOCK)
        elif MODE == 1:
            tl.store(q_ptr + out, q.to(tl.float16), mask=cm)
        else:
            tl.store(q_ptr + out, q.to(tl.float16).to(tl.float8e4nv), mask=cm)
    elif FMT == 3:  # NVFP4: an e4m3 scale per 16 columns under an FP32 scale per token, as formats.quantize_nvfp4
        tl.static_assert(MODE != 2, "NVFP4 values times their e4m3 scales are FP16 operands, not e4m3")
        amax = tl.max(tl.abs(x), axis=1)
        g = tl.math.div_rn(amax, 2688.0)  # the largest block scale maps onto e4m3's 448 (6 * 448)
        g = tl.where(g > 0, g, 1.0)
        xb = tl.reshape(x, [ROWS, BLOCK // 16, 16])
        bs = tl.minimum(tl.math.div_rn(tl.math.div_rn(tl.max(tl.abs(xb), axis=2), 6.0), g[:, None]), 448.0)
        if INTERPRET:  # the CPU interpreter's float -> e4m3 cast carries wrongly into the next binade
            s8 = _round_e4m3(bs).to(tl.float8e4nv)
        else:
            s8 = bs.to(tl.float8e4nv)
        sf = s8.to(tl.float32)
        eff = sf * g[:, None]
        v = tl.math.div_rn(xb, tl.where(eff > 0, eff, 1.0)[:, :, None])
        nb = tl.arange(0, BLOCK // 16)
        if MODE == 0:
            _store_nibbles(q_ptr, r, rm, _e2m1_code(v), K_PAD, ROWS, BLOCK)
            tl.store(s_ptr + r[:, None] * (K_PAD // 16) + nb[None, :], s8.to(tl.uint8, bitcast=True),
                     mask=rm[:, None] & (nb < K_PAD // 16)[None, :])
        else:  # e2m1 * scale: at most 5 significant bits, 2**-10 to 2688, exact in FP16
            val = _e2m1_round(v) * sf[:, :, None]
            tl.store(q_ptr + out, tl.reshape(val, [ROWS, BLOCK]).to(tl.float16), mask=cm)
        tl.store(rs_ptr + r, g, mask=rm)
    else:  # FP8 e4m3, one scale per token
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -448.0), 448.0)
        if INTERPRET:  # the CPU interpreter's float -> e4m3 cast carries wrongly into the next binade
            q8 = _round_e4m3(v).to(tl.float8e4nv)
        else:
            q8 = v.to(tl.float8e4nv)
        if MODE == 1:
            tl.store(q_ptr + out, q8.to(tl.float16), mask=cm)
        else:
            tl.store(q_ptr + out, q8, mask=cm)
        tl.store(rs_ptr + r, scale, mask=rm)
    release_dependents(PDL and RELEASE_LATE)


@triton.jit
def head_norm_kernel(y_ptr, stride_ym, f_ptr, HQ, HK, eps, D: tl.constexpr, BH: tl.constexpr, NORM: tl.constexpr,
                     INTERPRET: tl.constexpr = False):
    """In place on one row of a stacked q/k/v output (head_norms.py): each of its first HQ heads of D columns (q)
    RMS-normalized with the factors f[0], the next HK (k) with f[1] (FP32 [2, D]), rounded as _rms_scaled rounds;
    the v columns after them are not touched."""
    r = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BH)
    d = tl.arange(0, D)
    hm = (h < HQ + HK)[:, None]
    ptr = y_ptr + r * stride_ym + h[:, None] * D + d[None, :]
    x = tl.load(ptr, mask=hm, other=0.0)
    xdt: tl.constexpr = x.dtype
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)
    w = tl.load(f_ptr + (h >= HQ).to(tl.int32)[:, None] * D + d[None, :], mask=hm, other=0.0)
    tl.store(ptr, _rms_scaled(xf, rstd, w, xdt, NORM, INTERPRET).to(xdt), mask=hm)


@triton.jit
def _round_e4m3(v):
    """Round to the nearest e4m3 value, ties to even, in float32 arithmetic (for the CPU
    interpreter; the GPU's cast does this itself)."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # below 2**-6 the spacing stays 2**-9
    return _round_even(v * _pow2(3 - e)) * _pow2(e - 3)


# PTX for the GPU: four packed bytes in, their low and high nibbles out as FP16 pairs, ~2.3
# integer instructions per element. Bytes (b0, b1) are spread into the two 16-bit lanes of a
# word (prmt); then per lane, FP16 bits = ((c & 7) << 9) | ((c & 8) << 12).
_E2M1_ASM = tl.constexpr("""
{
.reg .b32 a, b, t, x, y;
prmt.b32 a, $4, 0, 0x4140;
prmt.b32 b, $4, 0, 0x4342;
and.b32 t, a, 0x000F000F; shl.b32 x, t, 9; shl.b32 y, t, 12; or.b32 x, x, y; and.b32 $0, x, 0x8E008E00;
and.b32 t, b, 0x000F000F; shl.b32 x, t, 9; shl.b32 y, t, 12; or.b32 x, x, y; and.b32 $1, x, 0x8E008E00;
and.b32 t, a, 0x00F000F0; shl.b32 x, t, 5; shl.b32 y, t, 8; or.b32 x, x, y; and.b32 $2, x, 0x8E008E00;
and.b32 t, b, 0x00F000F0; shl.b32 x, t, 5; shl.b32 y, t, 8; or.b32 x, x, y; and.b32 $3, x, 0x8E008E00;
}
""")
# int4: FP16 bits 0x6400 | (c ^ 8) are 1024 + (c ^ 8); subtracting 1032 leaves the signed value.
_INT4_ASM = tl.constexpr("""
{
.reg .b32 a, b, t, k;
mov.b32 k, 0x64086408;
prmt.b32 a, $4, 0, 0x4140;
prmt.b32 b, $4, 0, 0x4342;
and.b32 t, a, 0x000F000F; xor.b32 t, t, 0x64086408; sub.rn.f16x2 $0, t, k;
and.b32 t, b, 0x000F000F; xor.b32 t, t, 0x64086408; sub.rn.f16x2 $1, t, k;
shr.b32 t, a, 4; and.b32 t, t, 0x000F000F; xor.b32 t, t, 0x64086408; sub.rn.f16x2 $2, t, k;
shr.b32 t, b, 4; and.b32 t, t, 0x000F000F; xor.b32 t, t, 0x64086408; sub.rn.f16x2 $3, t, k;
}
""")


# e2m1 -> e4m3 without arithmetic: a nibble's three magnitude bits at e4m3 bits 2-4 and its sign at
# bit 7 make the e4m3 number e2m1 value * 2**-6 (0.5 lands on the subnormal 2**-7), four values per
# 32-bit operation. Four packed bytes in; their low and high nibbles out as e4m3 quadruples.
_E2M1_E4M3_ASM = tl.constexpr("""
{
.reg .b32 t, u;
shl.b32 t, $2, 2; and.b32 t, t, 0x1C1C1C1C; shl.b32 u, $2, 4; and.b32 u, u, 0x80808080; or.b32 $0, t, u;
shr.b32 t, $2, 2; and.b32 t, t, 0x1C1C1C1C; and.b32 u, $2, 0x80808080; or.b32 $1, t, u;
}
""")


@triton.jit
def _unpack_e4m3(packed, INTERPRET: tl.constexpr):
    """uint8 tile of e2m1 code pairs -> (low nibbles, high nibbles) as e4m3 = e2m1 value * 2**-6, exactly."""
    if INTERPRET:
        c = packed.to(tl.int32)
        lo = ((c & 7) << 2) | ((c & 8) << 4)
        hi = ((c >> 2) & 0x1C) | (c & 0x80)
        return lo.to(tl.uint8).to(tl.float8e4nv, bitcast=True), hi.to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        return tl.inline_asm_elementwise(_E2M1_E4M3_ASM, "=r,=r,r", [packed], dtype=(tl.float8e4nv, tl.float8e4nv),
                                         is_pure=True, pack=4)


# e2m1 -> e4m3 with the block exponent folded in, by byte tables (as the fragment GEMM): per row and
# block, two words hold the e4m3 encodings of e2m1 magnitudes 0-7 times 2**(rel + 6) (layout.FRAG_LUT;
# exact for rel >= layout.LUT_REL_MIN). Four packed bytes in (chunk layout: low nibble one block, high
# nibble the next), the low block's table in $3/$7, the high block's in $11/$15 (broadcast operands,
# the same register four times); out: low and high nibbles as e4m3 quadruples. Swapping bytes 1 and 2
# first lets one shift-or turn the four 3-bit magnitudes into prmt's selector nibbles in order; the
# signs sit at bit 3 (low) and bit 7 (high) of each byte. 13 instructions per 8 values.
_E2M1_LUT_ASM = tl.constexpr("""
{
.reg .b32 w, x, s, t, m;
prmt.b32 w, $2, 0, 0x3120;
and.b32 x, w, 0x07070707; shr.b32 s, x, 12; or.b32 s, s, x;
prmt.b32 t, $3, $7, s; shl.b32 m, $2, 4; and.b32 m, m, 0x80808080; or.b32 $0, t, m;
shr.b32 x, w, 4; and.b32 x, x, 0x07070707; shr.b32 s, x, 12; or.b32 s, s, x;
prmt.b32 t, $11, $15, s; and.b32 m, $2, 0x80808080; or.b32 $1, t, m;
}
""")


@triton.jit
def _lut_byte(mag, sign, t0, t1):
    """The CPU interpreter's replay of one table lookup: magnitude 0-7 picks byte mag of (t0, t1)."""
    word = tl.where(mag < 4, t0, t1)
    return (((word >> ((mag & 3) * 8)) & 0xFF) | (sign << 7)).to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _lut_tables(e):
    """A block's two table words [BN, 1] from its relative exponent [BN], in uint32 so that the
    multiply wraps as the fragment GEMM's PTX does."""
    shift = (e + 6).to(tl.uint32)
    return ((shift * _LUT_LO_STEP + _LUT_LO).to(tl.int32, bitcast=True)[:, None],
            (shift * _LUT_HI_STEP + _LUT_HI).to(tl.int32, bitcast=True)[:, None])


@triton.jit
def _unpack_lut(packed, e0, e1, INTERPRET: tl.constexpr):
    """uint8 tile [BN, 32] of chunk-layout code pairs and the two blocks' relative exponents [BN]
    -> (low, high) e4m3 tiles of e2m1 * 2**(rel + 6), exactly (rel >= layout.LUT_REL_MIN)."""
    a0, a1 = _lut_tables(e0)
    b0, b1 = _lut_tables(e1)
    if INTERPRET:
        c = packed.to(tl.int32)
        return _lut_byte(c & 7, (c >> 3) & 1, a0, a1), _lut_byte((c >> 4) & 7, (c >> 7) & 1, b0, b1)
    z = tl.zeros_like(packed).to(tl.int32)
    return tl.inline_asm_elementwise(_E2M1_LUT_ASM, "=r,=r,r" + ",r" * 16, [packed, a0 + z, a1 + z, b0 + z, b1 + z],
                                     dtype=(tl.float8e4nv, tl.float8e4nv), is_pure=True, pack=4)


@triton.jit
def _nibble_f16(c, FMT: tl.constexpr):
    """A 4-bit code (0..15, int16) -> FP16: e2m1 value * 2**-14 (MXFP4, NVFP4) or the int4 value (FMT 1)."""
    if FMT == 1:
        return (0x6400 | (c ^ 8)).to(tl.float16, bitcast=True) - 1032.0
    else:
        return (((c & 7) << 9) | ((c & 8) << 12)).to(tl.float16, bitcast=True)


@triton.jit
def _unpack_f16(packed, FMT: tl.constexpr, INTERPRET: tl.constexpr):
    """uint8 tile -> (low nibbles, high nibbles) as FP16 tiles of the same shape.

    The GPU runs the PTX above; the CPU interpreter, which cannot, runs the same bit
    recipe in Triton operations. tests/test_kernels.py checks both against formats.py.
    """
    if INTERPRET:
        c = packed.to(tl.int16)
        return _nibble_f16(c & 0xF, FMT), _nibble_f16((c >> 4) & 0xF, FMT)
    else:
        return tl.inline_asm_elementwise(_INT4_ASM if FMT == 1 else _E2M1_ASM, "=r,=r,=r,=r,r", [packed],
                                         dtype=(tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def _load_codes(b_ptr, be_ptr, rn64, nm, ck, limit, stride_bn, K_PAD, FMT: tl.constexpr):
    """The raw bytes [BN, 32] of 64-column chunk ``ck`` and its block scales [BN] for each half: MXFP4, the two
    blocks' relative exponents; NVFP4, the FP16 factors of the half's two 16-column blocks as one int32 (FP16 bits
    of the first block low). Chunks at or past ``limit`` read as zeros (they contribute nothing)."""
    h = tl.arange(0, 32)
    ok = nm & (ck < limit)
    p = tl.load(b_ptr + rn64[:, None] * stride_bn + (ck * 32 + h)[None, :], mask=ok[:, None], other=0)
    if FMT == 0 or FMT == 3:  # NVFP4's [N, K_PAD / 16] FP16 factors read as [N, K_PAD / 32] int32
        eb = (be_ptr.to(tl.pointer_type(tl.int32)) if FMT == 3 else be_ptr) + rn64 * (K_PAD // 32) + ck * 2
        return p, tl.load(eb, mask=ok, other=0), tl.load(eb + 1, mask=ok, other=0)
    else:
        return p, p, p


@triton.jit
def _block_factors(f2):
    """NVFP4: an int32 [BN] holding two FP16 block factors -> the [BN, 32] factor tile of a half chunk."""
    first = (f2 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    second = ((f2 >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    return tl.where((tl.arange(0, 32) < 16)[None, :], first[:, None], second[:, None])


@triton.jit
def _decode_codes(p, e0, e1, FMT: tl.constexpr, OP_F8: tl.constexpr, INTERPRET: tl.constexpr):
    """Bytes -> the two [BN, 32] operand tiles of a chunk.

    MXFP4 blocks get their factor 2**(d + 14) (FP16 operand: e2m1 * 2**d) or 2**(d + 15)
    (FP8 operand: e2m1 * 2**(d + 1), exact in e4m3 for d >= -9; the GEMM takes the 2 back).
    NVFP4 blocks (FP16 only) get their factor s * 2**6 (layout.kernel_weights): e2m1 * s * 2**-8, exact in FP16.
    """
    tl.static_assert(not (FMT == 3 and OP_F8), "NVFP4 weights decode to FP16 operands only")
    b_lo, b_hi = _unpack_f16(p, FMT, INTERPRET)
    if FMT == 0:  # FP16 2**(e + off) from its bits (e >= -24 keeps the exponent field in 5..30)
        off = 15 if OP_F8 else 14
        b_lo = b_lo * (((e0 + off + 15) << 10).to(tl.int16).to(tl.float16, bitcast=True))[:, None]
        b_hi = b_hi * (((e1 + off + 15) << 10).to(tl.int16).to(tl.float16, bitcast=True))[:, None]
    elif FMT == 3:
        b_lo = b_lo * _block_factors(e0)
        b_hi = b_hi * _block_factors(e1)
    if OP_F8:
        b_lo = b_lo.to(tl.float8e4nv)
        b_hi = b_hi.to(tl.float8e4nv)
    return b_lo, b_hi


@triton.jit
def _chunk_dot(acc, a_ptr, rm64, mm, stride_am, ck, limit, p, e0, e1, FMT: tl.constexpr, OP_F8: tl.constexpr,
               INTERPRET: tl.constexpr):
    """acc += A[:, chunk] @ B[:, chunk]^T for one 64-column chunk whose bytes are already loaded."""
    h = tl.arange(0, 32)
    ok = mm & (ck < limit)
    a_lo = tl.load(a_ptr + rm64[:, None] * stride_am + (ck * 64 + h)[None, :], mask=ok[:, None], other=0.0)
    a_hi = tl.load(a_ptr + rm64[:, None] * stride_am + (ck * 64 + 32 + h)[None, :], mask=ok[:, None], other=0.0)
    b_lo, b_hi = _decode_codes(p, e0, e1, FMT, OP_F8, INTERPRET)
    if INTERPRET and OP_F8:  # the CPU interpreter has no FP8 matmul; e4m3 -> FP16 is exact
        a_lo, a_hi = a_lo.to(tl.float16), a_hi.to(tl.float16)
        b_lo, b_hi = b_lo.to(tl.float16), b_hi.to(tl.float16)
    acc = tl.dot(a_lo, tl.trans(b_lo), acc)
    return tl.dot(a_hi, tl.trans(b_hi), acc)


@triton.jit
def _dot_f8(w, a, acc, INTERPRET: tl.constexpr):
    """acc + w · a^T on e4m3 tiles, or a fresh FP32 result when acc is None (the CPU interpreter has no
    FP8 matmul; e4m3 -> FP16 is exact)."""
    if INTERPRET:
        return tl.dot(w.to(tl.float16), tl.trans(a.to(tl.float16)), acc)
    return tl.dot(w, tl.trans(a), acc)


@triton.jit
def _chunk_t_f8(acc, p, e0, e1, a_lo, a_hi, FMT: tl.constexpr, INTERPRET: tl.constexpr):
    """acc += W · A^T for one 64-column chunk on e4m3 operands (the transposed GEMM's FP8 variant).

    MXFP4: the weights unpack to e2m1 * 2**-6 by moving bits, and each 32-column block's factor
    2**(d + 6) multiplies its FP32 partial product: exact at any block exponent, and no operand
    arithmetic. INT4: FP16 (0x6400 trick) -> e4m3, exact for -8..7.
    """
    if FMT == 0:
        w_lo, w_hi = _unpack_e4m3(p, INTERPRET)
        acc += _dot_f8(w_lo, a_lo, None, INTERPRET) * _pow2(e0 + 6)[:, None]
        acc += _dot_f8(w_hi, a_hi, None, INTERPRET) * _pow2(e1 + 6)[:, None]
    else:
        w_lo, w_hi = _decode_codes(p, e0, e1, FMT, True, INTERPRET)
        acc += _dot_f8(w_lo, a_lo, None, INTERPRET)
        acc += _dot_f8(w_hi, a_hi, None, INTERPRET)
    return acc


@triton.jit
def _bf16_branch(acc, xo_ptr, wo_ptr, rm64, mm, rn64, nm, K_OUT, BO: tl.constexpr, TRANSPOSED: tl.constexpr,
                 INTERPRET: tl.constexpr):
    """acc += x_o · W_o^T, the BF16 branch on the gathered outlier channels, BO columns a step;
    TRANSPOSED: acc is y^T [N rows, M rows] (the small-M GEMM), so acc += W_o · x_o^T."""
    o = tl.arange(0, BO)
    for k0 in range(0, K_OUT, BO):
        om = (k0 + o) < K_OUT
        xo = tl.load(xo_ptr + rm64[:, None] * K_OUT + (k0 + o)[None, :], mask=mm[:, None] & om[None, :], other=0.0)
        wo = tl.load(wo_ptr + rn64[:, None] * K_OUT + (k0 + o)[None, :], mask=nm[:, None] & om[None, :], other=0.0)
        if INTERPRET:  # the CPU interpreter has no BF16 matmul
            xo = xo.to(tl.float32)
            wo = wo.to(tl.float32)
        if TRANSPOSED:
            acc = tl.dot(wo, tl.trans(xo), acc)
        else:
            acc = tl.dot(xo, tl.trans(wo), acc)
    return acc


@triton.jit
def _epilogue(acc, sa_ptr, sb_ptr, xo_ptr, wo_ptr, bias_ptr, rm, rn, rm64, rn64, mm, nm, K_OUT, first,
              SB_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BO: tl.constexpr, INTERPRET: tl.constexpr):
    """A tile's main-path sums acc [rows rm, columns rn] times the token and row scales (and SB_SCALE); where
    ``first`` (split-K's program 0), plus x_o · W_o^T and the bias."""
    sa = tl.load(sa_ptr + rm, mask=mm, other=0.0)
    sb = tl.load(sb_ptr + rn, mask=nm, other=0.0)
    if SB_SCALE != 1.0:
        sb = sb * SB_SCALE
    acc = acc * sa[:, None] * sb[None, :]
    if first:
        if BO > 0:
            acc = _bf16_branch(acc, xo_ptr, wo_ptr, rm64, mm, rn64, nm, K_OUT, BO, False, INTERPRET)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=nm, other=0.0)[None, :]
    return acc


@triton.jit
def _store_tile(acc, y, ws, mask, cnt, SPLIT_K: tl.constexpr):
    """Write a program's tile. With SPLIT_K > 1 its partial sum goes into the FP32 workspace ``ws``
    (same indexing as y, all zero between calls), and the last of the tile's SPLIT_K programs, told
    by the tile's counter ``cnt``, takes the sum out (leaving zeros), writes y and re-arms the
    counter: no zero-fill and no conversion launch around the GEMM. The tile's atomics are relaxed
    (one fence each would serialise them); the barrier and the counter's acquire-release order
    them, as in CUTLASS's split-K semaphore."""
    if SPLIT_K == 1:
        tl.store(y, acc.to(y.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ws, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()
        if tl.atomic_add(cnt, 1, sem="acq_rel") == SPLIT_K - 1:
            # read and zero as int32 bits (the CPU interpreter exchanges no floats)
            bits = tl.atomic_xchg(ws.to(tl.pointer_type(tl.int32)), tl.zeros_like(acc).to(tl.int32), mask=mask,
                                  sem="relaxed")
            tl.store(y, bits.to(tl.float32, bitcast=True).to(y.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt, 0, sem="relaxed")


@triton.jit
def decode_weights_kernel(b_ptr, be_ptr, out_ptr, N, K_PAD, stride_bn,
                          FMT: tl.constexpr, OP_F8: tl.constexpr, BN: tl.constexpr, RAW_E4M3: tl.constexpr = False,
                          LUT: tl.constexpr = False, INTERPRET: tl.constexpr = False, PDL: tl.constexpr = False,
                          sb_ptr=None, GROUP: tl.constexpr = 0):
    """Write the weight operands exactly as the GEMM decodes them: for tests, and as the FP8
    expansion of 4-bit weights ahead of a large-M GEMM. RAW_E4M3 (MXFP4, for tests): the e4m3
    operands of the transposed GEMM's e4m3 variant, before their block factors (e2m1 * 2**-6).
    GROUP (INT4 with a scale per GROUP columns, FP16 out): each value times its group's scale (be, [N, K_PAD / GROUP])
    over the row's largest (sb), rounded once to FP16 (11 significant bits: the one rounding of the prefill path).
    PDL (overlap.py): launched while split-quantize still runs; it reads only the weights, and waits for
    split-quantize at its end, so that the GEMM launched after it finds both kernels' outputs complete."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    ck = tl.program_id(1)
    nm = rn < N
    rn64 = rn.to(tl.int64)
    p, e0, e1 = _load_codes(b_ptr, be_ptr, rn64, nm, ck, K_PAD // 64, stride_bn, K_PAD, FMT)
    if RAW_E4M3:
        b_lo, b_hi = _unpack_e4m3(p, INTERPRET)
    elif LUT:
        b_lo, b_hi = _unpack_lut(p, e0.to(tl.int32), e1.to(tl.int32), INTERPRET)
    else:
        b_lo, b_hi = _decode_codes(p, e0, e1, FMT, OP_F8, INTERPRET)
    if GROUP:
        top = tl.load(sb_ptr + rn64, mask=nm, other=1.0)
        srow = be_ptr + rn64 * (K_PAD // GROUP)
        f_lo = tl.math.div_rn(tl.load(srow + ck * 64 // GROUP, mask=nm, other=0.0), top)
        f_hi = tl.math.div_rn(tl.load(srow + (ck * 64 + 32) // GROUP, mask=nm, other=0.0), top)
        b_lo = (b_lo.to(tl.float32) * f_lo[:, None]).to(tl.float16)
        b_hi = (b_hi.to(tl.float32) * f_hi[:, None]).to(tl.float16)
    h = tl.arange(0, 32)
    base = out_ptr + rn64[:, None] * K_PAD + ck * 64 + h[None, :]
    tl.store(base, b_lo, mask=nm[:, None])
    tl.store(base + 32, b_hi, mask=nm[:, None])
    wait_inputs(PDL)


@triton.jit
def _expert_tile(grp_ptr, t, N, K_OUT, sb_ptr, wo_ptr, bias_ptr):
    """Row t of moe.route's tile table (first pair, pairs, expert), and the expert's row scales, BF16 columns and bias:
    N, N * K_OUT and N elements after the previous expert's (the GEMMs offset their own weight codes)."""
    first = tl.load(grp_ptr + 3 * t)
    rows = tl.load(grp_ptr + 3 * t + 1)
    g = tl.load(grp_ptr + 3 * t + 2).to(tl.int64)
    return first, rows, g, sb_ptr + g * N, wo_ptr + g * N * K_OUT, bias_ptr + g * N


@triton.jit
def osc_gemm_kernel(
    a_ptr, sa_ptr, b_ptr, be_ptr, sb_ptr, xo_ptr, wo_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K_PAD, K_OUT,
    stride_am, stride_bn, stride_ym,
    FMT: tl.constexpr, OP_F8: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, SB_SCALE: tl.constexpr, INTERPRET: tl.constexpr = False,
    grp_ptr=None, stride_ce=0, TILES=0, GROUPED: tl.constexpr = False,
):
    """y[M, N] = (A @ deq(B)^T) * sa[:, None] * sb[None, :] * SB_SCALE + xo @ wo^T + bias.

    A: [M, K_PAD] FP16 or FP8 operands from split_quantize. B: 4-bit codes in chunk layout
    ([N, K_PAD/2] bytes, FMT 0/1/3, BK/64 chunks per step) or e4m3 ([N, K_PAD], FMT 2, BK
    columns per step; FP16 weights expanded from NVFP4 or INT4 with group scales take the same path with OP_F8 off). be:
    MXFP4 relative exponents [N, K_PAD/32]. SPLIT_K > 1: see _store_tile (ws [M, N] FP32, cnt one int32 per output
    tile). SB_SCALE: what the expanded e4m3 weights are over the
    values (0.5 or 2**-6 for MXFP4, by ops.decode_weights' recipe).
    GROUPED (MoE experts on long prompts, FMT 2 only: the experts' weights expanded to e4m3 and stacked): token tile
    t is the row grp[t] = (first row, rows <= BM, expert) of moe.route's tile table [TILES, 3], as in
    osc_gemm_t_kernel; the expert's weights lie stride_ce bytes after the previous one's.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    if GROUPED:  # weight tiles vary fastest: a token tile's activations are read once, and an expert's few
        # token tiles, adjacent in the table, find its weights in L2
        num_n = tl.cdiv(N, BN)
        pn = pid % num_n
        pm = pid // num_n
        first, rows, g, sb_ptr, wo_ptr, bias_ptr = _expert_tile(grp_ptr, pm, N, K_OUT, sb_ptr, wo_ptr, bias_ptr)
        b_ptr += g * stride_ce
        rm = first + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        mm = tl.arange(0, BM) < rows
        nm = (rn < N) & (rows > 0)
    else:
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pm = first_m + (pid % group) % size_m
        pn = (pid % group) // size_m

        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        mm = rm < M
        nm = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    steps = tl.cdiv(K_PAD, BK)
    per_split = tl.cdiv(steps, SPLIT_K)
    s0 = split * per_split
    s1 = tl.minimum(s0 + per_split, steps)
    if GROUPED:  # an empty tile (an unused slot of the table) runs no step and stores nothing
        s1 = tl.where(rows > 0, s1, s0)
    if FMT == 2:  # e4m3 weights: plain tiles, one dot of depth BK per step
        kk = tl.arange(0, BK)
        for st in range(s0, s1):
            k = st * BK + kk
            km = k < K_PAD
            a = tl.load(a_ptr + rm64[:, None] * stride_am + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
            b = tl.load(b_ptr + rn64[:, None] * stride_bn + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            if INTERPRET or not OP_F8:  # the CPU interpreter has no FP8 matmul; e4m3 -> FP16 is exact
                a = a.to(tl.float16)
                b = b.to(tl.float16)
            acc = tl.dot(a, tl.trans(b), acc)
    else:  # 4-bit weights unpacked in registers: 4 chunks of 64 columns per step (BK = 256),
        # the next step's bytes fetched before this step's arithmetic so the loads stay in flight
        limit = tl.minimum(s1 * 4, K_PAD // 64)
        c = s0 * 4
        p0, e00, e01 = _load_codes(b_ptr, be_ptr, rn64, nm, c, limit, stride_bn, K_PAD, FMT)
        p1, e10, e11 = _load_codes(b_ptr, be_ptr, rn64, nm, c + 1, limit, stride_bn, K_PAD, FMT)
        p2, e20, e21 = _load_codes(b_ptr, be_ptr, rn64, nm, c + 2, limit, stride_bn, K_PAD, FMT)
        p3, e30, e31 = _load_codes(b_ptr, be_ptr, rn64, nm, c + 3, limit, stride_bn, K_PAD, FMT)
        for st in range(s0, s1):
            c = st * 4
            q0, f00, f01 = _load_codes(b_ptr, be_ptr, rn64, nm, c + 4, limit, stride_bn, K_PAD, FMT)
            q1, f10, f11 = _load_codes(b_ptr, be_ptr, rn64, nm, c + 5, limit, stride_bn, K_PAD, FMT)
            q2, f20, f21 = _load_codes(b_ptr, be_ptr, rn64, nm, c + 6, limit, stride_bn, K_PAD, FMT)
            q3, f30, f31 = _load_codes(b_ptr, be_ptr, rn64, nm, c + 7, limit, stride_bn, K_PAD, FMT)
            acc = _chunk_dot(acc, a_ptr, rm64, mm, stride_am, c, limit, p0, e00, e01, FMT, OP_F8, INTERPRET)
            acc = _chunk_dot(acc, a_ptr, rm64, mm, stride_am, c + 1, limit, p1, e10, e11, FMT, OP_F8, INTERPRET)
            acc = _chunk_dot(acc, a_ptr, rm64, mm, stride_am, c + 2, limit, p2, e20, e21, FMT, OP_F8, INTERPRET)
            acc = _chunk_dot(acc, a_ptr, rm64, mm, stride_am, c + 3, limit, p3, e30, e31, FMT, OP_F8, INTERPRET)
            p0, e00, e01, p1, e10, e11 = q0, f00, f01, q1, f10, f11
            p2, e20, e21, p3, e30, e31 = q2, f20, f21, q3, f30, f31

    acc = _epilogue(acc, sa_ptr, sb_ptr, xo_ptr, wo_ptr, bias_ptr, rm, rn, rm64, rn64, mm, nm, K_OUT, split == 0,
                    SB_SCALE, HAS_BIAS, BO, INTERPRET)
    _store_tile(acc, y_ptr + rm64[:, None] * stride_ym + rn64[None, :], ws_ptr + rm64[:, None] * N + rn64[None, :],
                mm[:, None] & nm[None, :], cnt_ptr + pid, SPLIT_K)


@triton.jit
def epilogue_kernel(acc_ptr, sa_ptr, sb_ptr, xo_ptr, wo_ptr, bias_ptr, y_ptr, M, N, K_OUT, stride_ym,
                    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BO: tl.constexpr,
                    INTERPRET: tl.constexpr = False):
    """y = acc * sa[:, None] * sb[None, :] + x_o · W_o^T (+ bias), the dual path's epilogue for a main-path GEMM
    that ran elsewhere (cuBLAS, ops._cublas_f16_gemm): acc [M, N] holds its FP32 sums, read once; the BF16 branch
    runs here on the tensor cores, by osc_gemm_kernel's _epilogue."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mm = rm < M
    nm = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    mask = mm[:, None] & nm[None, :]
    acc = tl.load(acc_ptr + rm64[:, None] * N + rn64[None, :], mask=mask, other=0.0)
    acc = _epilogue(acc, sa_ptr, sb_ptr, xo_ptr, wo_ptr, bias_ptr, rm, rn, rm64, rn64, mm, nm, K_OUT, True, 1.0,
                    HAS_BIAS, BO, INTERPRET)
    tl.store(y_ptr + rm64[:, None] * stride_ym + rn64[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _t_loads(wrow, erow, arow, nm, mm, ck, FMT: tl.constexpr):
    """Step ``ck`` of the transposed GEMM (chunks ck, ck + 1): code bytes [BN, 32] x 2, the four MXFP4
    block exponents of each row as one int32, and A's four [MP, 32] tiles."""
    p0 = tl.load(wrow + ck * 32, mask=nm[:, None], other=0)
    p1 = tl.load(wrow + ck * 32 + 32, mask=nm[:, None], other=0)
    ev = tl.load(erow + ck // 2, mask=nm, other=0) if FMT == 0 else p0
    a0 = tl.load(arow + ck * 64, mask=mm[:, None], other=0.0)
    a1 = tl.load(arow + ck * 64 + 32, mask=mm[:, None], other=0.0)
    a2 = tl.load(arow + ck * 64 + 64, mask=mm[:, None], other=0.0)
    a3 = tl.load(arow + ck * 64 + 96, mask=mm[:, None], other=0.0)
    return p0, p1, ev, a0, a1, a2, a3


@triton.jit
def _t_step(acc, p0, p1, ev, a0, a1, a2, a3, rn, FMT: tl.constexpr, OP_F8: tl.constexpr, F8_FOLD: tl.constexpr,
            INTERPRET: tl.constexpr):
    """acc += W · A^T over one step's two chunks."""
    if FMT == 0:  # e(ck, lo), e(ck, hi), e(ck+1, lo), e(ck+1, hi), sign-extended from the bytes
        e00, e01, e10, e11 = (ev << 24) >> 24, (ev << 16) >> 24, (ev << 8) >> 24, ev >> 24
    else:  # unused by the int4 decode
        e00, e01, e10, e11 = rn, rn, rn, rn
    if F8_FOLD:  # e4m3 weights with the block factor folded in, one MMA per block accumulating in place
        if FMT == 0:  # e2m1 * 2**(d + 6) from the byte tables
            w0, w1 = _unpack_lut(p0, e00, e01, INTERPRET)
            w2, w3 = _unpack_lut(p1, e10, e11, INTERPRET)
        else:  # int4 through FP16, exact in e4m3
            w0, w1 = _decode_codes(p0, e00, e01, FMT, True, INTERPRET)
            w2, w3 = _decode_codes(p1, e10, e11, FMT, True, INTERPRET)
        acc = _dot_f8(w0, a0, acc, INTERPRET)
        acc = _dot_f8(w1, a1, acc, INTERPRET)
        acc = _dot_f8(w2, a2, acc, INTERPRET)
        acc = _dot_f8(w3, a3, acc, INTERPRET)
    elif OP_F8:
        acc = _chunk_t_f8(acc, p0, e00, e01, a0, a1, FMT, INTERPRET)
        acc = _chunk_t_f8(acc, p1, e10, e11, a2, a3, FMT, INTERPRET)
    else:
        w0, w1 = _decode_codes(p0, e00, e01, FMT, False, INTERPRET)
        acc = tl.dot(w0, tl.trans(a0), acc)
        acc = tl.dot(w1, tl.trans(a1), acc)
        w2, w3 = _decode_codes(p1, e10, e11, FMT, False, INTERPRET)
        acc = tl.dot(w2, tl.trans(a2), acc)
        acc = tl.dot(w3, tl.trans(a3), acc)
    return acc


@triton.jit
def _t_tile(w, a, part, OP_F8: tl.constexpr, INTERPRET: tl.constexpr):
    if OP_F8:
        part = _dot_f8(w, a, part, INTERPRET)
    else:
        part = tl.dot(w, tl.trans(a), part)
    return part


@triton.jit
def _group_flush(acc, part, sw_row, sa_row, g, nm, mm):
    """acc [BN, MP] + part times group g's weight scales (sw_row + g) and token scales (sa_row + g), part the group's
    partial product (int4 values multiplied and summed: exact in FP32)."""
    sw = tl.load(sw_row + g, mask=nm, other=0.0)
    sa = tl.load(sa_row + g, mask=mm, other=0.0)
    return acc + part * sw[:, None] * sa[None, :]


@triton.jit
def _t_step_groups(acc, p0, p1, a0, a1, a2, a3, ck, sw_row, sa_row, nm, mm, GROUP: tl.constexpr,
                   OP_F8: tl.constexpr, INTERPRET: tl.constexpr):
    """acc += W · A^T over one step's four 32-column tiles for INT4 with a scale per GROUP columns: each group's
    partial product times the group's weight and token scales (groups wider than the step's 128 columns: once a
    step)."""
    w0, w1 = _decode_codes(p0, p0, p0, 1, OP_F8, INTERPRET)
    w2, w3 = _decode_codes(p1, p1, p1, 1, OP_F8, INTERPRET)
    g = ck * 64 // GROUP  # the step's first group
    if GROUP == 32:
        acc = _group_flush(acc, _t_tile(w0, a0, None, OP_F8, INTERPRET), sw_row, sa_row, g, nm, mm)
        acc = _group_flush(acc, _t_tile(w1, a1, None, OP_F8, INTERPRET), sw_row, sa_row, g + 1, nm, mm)
        acc = _group_flush(acc, _t_tile(w2, a2, None, OP_F8, INTERPRET), sw_row, sa_row, g + 2, nm, mm)
        acc = _group_flush(acc, _t_tile(w3, a3, None, OP_F8, INTERPRET), sw_row, sa_row, g + 3, nm, mm)
    elif GROUP == 64:
        part = _t_tile(w1, a1, _t_tile(w0, a0, None, OP_F8, INTERPRET), OP_F8, INTERPRET)
        acc = _group_flush(acc, part, sw_row, sa_row, g, nm, mm)
        part = _t_tile(w3, a3, _t_tile(w2, a2, None, OP_F8, INTERPRET), OP_F8, INTERPRET)
        acc = _group_flush(acc, part, sw_row, sa_row, g + 1, nm, mm)
    else:
        part = _t_tile(w1, a1, _t_tile(w0, a0, None, OP_F8, INTERPRET), OP_F8, INTERPRET)
        part = _t_tile(w3, a3, _t_tile(w2, a2, part, OP_F8, INTERPRET), OP_F8, INTERPRET)
        acc = _group_flush(acc, part, sw_row, sa_row, g, nm, mm)
    return acc


@triton.jit
def osc_gemm_t_kernel(
    a_ptr, sa_ptr, b_ptr, be_ptr, sb_ptr, xo_ptr, wo_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K_PAD, K_OUT, stride_am, stride_bn, stride_be, stride_ym,
    FMT: tl.constexpr, HAS_BIAS: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr, BO: tl.constexpr,
    SPLIT_K: tl.constexpr, OP_F8: tl.constexpr = False, F8_FOLD: tl.constexpr = False,
    INTERPRET: tl.constexpr = False, PDL: tl.constexpr = False, grp_ptr=None, stride_ce=0, stride_ee=0,
    TILES=0, GROUPED: tl.constexpr = False, GROUP: tl.constexpr = 0,
):
    """y^T [BN, MP] = deq(B) · A^T for MP tokens a program (grid axis 0: weight tiles x token tiles), A the FP16
    (OP_F8: e4m3) operands of split_quantize. MP may be below 16 (down to 1): Triton pads the MMA, and
    A's tile shrinks. OP_F8 alone: weights moved bit-wise to e4m3, each block's factor on its FP32
    partial product (few tokens); with F8_FOLD: the factor folded into the e4m3 weights by the byte
    tables of _unpack_lut (MXFP4, exact: kernel_weights keeps blocks within their range) and one FP8
    MMA accumulating in place (wgmma with the weights from registers: 17-256 tokens).

    The weight tile is the left operand, so Triton loads its bytes straight into the MMA
    operand layout and unpacks them there (no shared-memory round trip of unpacked values);
    A^T, small, goes to the MMA from shared memory. Two 64-column chunks per step, and every
    load is a contiguous tile at an address known ahead, so the pipeliner prefetches them
    all: codes, A, and the four MXFP4 block exponents of the pair as one little-endian int32
    per row (1-byte loads could not be asynchronous). SPLIT_K > 1: see _store_tile.

    FMT 2 (e4m3 weights [N, K_PAD], OP_F8 operands): four [BN, 32] weight tiles a step, no unpack.
    GROUPED (MoE experts, moe.py): the rows of A and y are (token, expert) pairs, and token tile t is the grp[t] =
    (first row, rows <= MP, expert) of the int32 tile table [TILES, 3]: those rows times that expert's weights, whose
    codes, exponents, row scales, BF16 columns and bias lie stride_ce, stride_ee, N, N * K_OUT and N elements after
    the previous expert's. A tile of no rows (the table's unused slots) skips the main loop and stores nothing.
    GROUP (INT4 with a scale per GROUP columns): sa [M, K_PAD / GROUP] and be [N, K_PAD / GROUP] (FP32, row stride
    stride_be) hold each group's token and weight scales, which multiply its partial products (sb is 1).
    """
    wait_inputs(PDL)  # launched overlapped (overlap.py): every load comes after split-quantize has finished
    # token tiles vary fastest: the programs that share a weight tile run together, so the weights
    # come from HBM once and the (small) activations from L2
    num_m = TILES if GROUPED else tl.cdiv(M, MP)
    pm = tl.program_id(0) % num_m
    rn = (tl.program_id(0) // num_m) * BN + tl.arange(0, BN)
    split = tl.program_id(1)
    if GROUPED:
        first, rows, g, sb_ptr, wo_ptr, bias_ptr = _expert_tile(grp_ptr, pm, N, K_OUT, sb_ptr, wo_ptr, bias_ptr)
        b_ptr += g * stride_ce
        be_ptr += g * stride_ee
        nm = (rn < N) & (rows > 0)  # an empty tile (an unused slot of the table) loads nothing
    else:
        nm = rn < N
    rn64 = rn.to(tl.int64)
    if GROUPED:  # a second block, so that the plain branch keeps its instruction order (and PTX)
        rm = first + tl.arange(0, MP)
        mm = tl.arange(0, MP) < rows
    else:
        rm = pm * MP + tl.arange(0, MP)
        mm = rm < M
    h = tl.arange(0, 32)
    acc = tl.zeros((BN, MP), dtype=tl.float32)
    per_split = tl.cdiv(K_PAD // 128, SPLIT_K)
    c0 = split * per_split * 2
    c1 = tl.minimum(c0 + per_split * 2, K_PAD // 64)
    if GROUPED:  # ... and runs no step
        c1 = tl.where(rows > 0, c1, c0)
    arow = a_ptr + rm.to(tl.int64)[:, None] * stride_am + h[None, :]
    wrow = b_ptr + rn64[:, None] * stride_bn + h[None, :]
    erow = be_ptr.to(tl.pointer_type(tl.int32)) + rn64 * (stride_be // 4)
    for ck in range(c0, c1, 2):  # K_PAD is a multiple of 128: chunks ck and ck + 1 both exist
        if FMT == 2:  # e4m3 weights: 128 columns of bytes a step, four [BN, 32] tiles
            for j in tl.static_range(4):
                w = tl.load(wrow + ck * 64 + 32 * j, mask=nm[:, None], other=0.0)
                a = tl.load(arow + ck * 64 + 32 * j, mask=mm[:, None], other=0.0)
                acc = _dot_f8(w, a, acc, INTERPRET)
        elif FMT == 3:  # NVFP4: FP16 operands, each 16-column block's factor on the weights
            for j in tl.static_range(2):
                p, f_lo, f_hi = _load_codes(b_ptr, be_ptr, rn64, nm, ck + j, c1, stride_bn, K_PAD, FMT)
                a_lo = tl.load(arow + (ck + j) * 64, mask=mm[:, None], other=0.0)
                a_hi = tl.load(arow + (ck + j) * 64 + 32, mask=mm[:, None], other=0.0)
                w_lo, w_hi = _decode_codes(p, f_lo, f_hi, FMT, False, INTERPRET)
                acc = tl.dot(w_lo, tl.trans(a_lo), acc)
                acc = tl.dot(w_hi, tl.trans(a_hi), acc)
        elif GROUP:
            p0, p1, ev, a0, a1, a2, a3 = _t_loads(wrow, erow, arow, nm, mm, ck, FMT)
            acc = _t_step_groups(acc, p0, p1, a0, a1, a2, a3, ck, be_ptr + rn64 * stride_be,
                                 sa_ptr + rm.to(tl.int64) * (K_PAD // GROUP), nm, mm, GROUP, OP_F8, INTERPRET)
        else:
            p0, p1, ev, a0, a1, a2, a3 = _t_loads(wrow, erow, arow, nm, mm, ck, FMT)
            acc = _t_step(acc, p0, p1, ev, a0, a1, a2, a3, rn, FMT, OP_F8, F8_FOLD, INTERPRET)
    if not GROUP:  # (group scales went on the partial products)
        sa = tl.load(sa_ptr + rm, mask=mm, other=0.0)
        sb = tl.load(sb_ptr + rn, mask=nm, other=0.0)
        if F8_FOLD and FMT == 0:  # the table-unpacked e4m3 weights are 2**6 times the values
            sb = sb * 0.015625
        acc = acc * sa[None, :] * sb[:, None]
    if BO > 0 and split == 0:
        # (with GROUP, ptxas serializes every wgmma of the kernel as the branch's accumulate onto what the group
        # flushes wrote; a separate branch accumulator avoids that but measured 3-9 % slower on MoE experts)
        acc = _bf16_branch(acc, xo_ptr, wo_ptr, rm.to(tl.int64), mm, rn64, nm, K_OUT, BO, True, INTERPRET)
    if HAS_BIAS and split == 0:
        acc += tl.load(bias_ptr + rn, mask=nm, other=0.0)[:, None]
    _store_tile(acc, y_ptr + rm.to(tl.int64)[None, :] * stride_ym + rn64[:, None],
                ws_ptr + rm.to(tl.int64)[None, :] * N + rn64[:, None], nm[:, None] & mm[None, :],
                cnt_ptr + tl.program_id(0), SPLIT_K)
