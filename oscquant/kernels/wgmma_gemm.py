"""The mid-size GEMM (tens to thousands of tokens): 4-bit weights unpacked for an async wgmma.

y = (A · deq(W)^T) * sa * sw + x_o · W_o^T (+ bias), in the transposed form y^T = W · A^T so that the
weight tile is wgmma's M side (64 rows a warpgroup) and the tokens its N side (8 to 256):

- TMA copies the chunk-layout code bytes and the e4m3 activation tile (split_quantize MODE_F8) of
  each 128-column step into a ring of STAGES shared-memory stages, STAGES - 1 steps ahead (the
  rows' four MX block exponents of a step, 4 bytes, come by plain loads three steps ahead);
- the warps read a step's codes, unpack them through the folded GEMM's byte tables
  (triton_osc._E2M1_LUT_ASM: e2m1 * 2**(rel + 6) in e4m3, exact) into one of two weight buffers;
- the step's wgmma (K = 128: four k = 32 instructions) on that buffer and the activations' stage is
  issued asynchronously, and the warps go on to the next step's unpack while the tensor cores run:
  one step of MMAs stays in flight (the Triton folded GEMM waited for each before unpacking the
  next; docs/kernels.md).

REG_A (what gemm_config takes for 64-row tiles): the codes go from the ring straight into wgmma's A-operand
register layout, are unpacked there, and each 32-column block is one k = 32 wgmma with A from registers; no
weight buffer, fence or barrier for it (2-13 % faster; docs/bench/h200_wgmma_rega_2026-11-29.md). Those wgmmas
are waited for within their step: ptxas serializes wgmmas whose register operands other instructions write while
wgmmas are in flight (_register_mmas).

F16 (NVFP4, register operand only: through shared memory it measured 0.77-0.99x as fast,
docs/bench/h100_f16_shared_2026-12-07.md): the same ring and loop on FP16 wgmma. The activations are split_quantize's
FP16 operands (MODE_F16), two [BT, 64] TMA boxes a step (a TMA box row holds at most 128 bytes under the 128-byte
swizzle); the codes unpack to FP16 e2m1 * 2**-14 (triton_osc._E2M1_ASM) times the rows' FP16 block factors, one per
16 columns (layout.kernel_weights: e4m3 scale * 2**6, so exact), loaded two steps ahead. The weights stay 0.5 bytes
a weight where the FP16 expansion paths read 2 (ops._fp16_expansion_config). INT4 with group scales (GROUP) the
same way: int4 values (triton_osc._INT4_ASM) times their group's scale over the row's largest, rounded to FP16 (the
expansion path rounds the product once instead: a last-bit difference at most), on activations with their group
scales folded in the same way (split_quantize fold_groups).

The BF16 branch is one more wgmma per 64 outlier channels on the scaled accumulator. SPLIT_K > 1
reduces through the FP32 workspace (frag_gemm.store_tile).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

from .frag_gemm import store_tile
from .layout import FRAG_LUT
from .overlap import wait_inputs
from .triton_osc import _E2M1_ASM, _E2M1_LUT_ASM, _INT4_ASM

LUT_LO = gl.constexpr(FRAG_LUT[0])
LUT_HI = gl.constexpr(FRAG_LUT[1])
LUT_LO_STEP = gl.constexpr(FRAG_LUT[2])
LUT_HI_STEP = gl.constexpr(FRAG_LUT[3])
LUT_ASM = gl.constexpr(_E2M1_LUT_ASM.value)
E2M1_F16_ASM = gl.constexpr(_E2M1_ASM.value)
INT4_F16_ASM = gl.constexpr(_INT4_ASM.value)


def descriptor_layouts(bn: int, bt: int, f16: bool = False) -> tuple:
    """The shared layouts of the TMA descriptors (activations [bt, 128] e4m3, or [bt, 64] FP16 with ``f16``; codes
    [bn, 64] bytes): the launch builds the descriptors with them, aot.py compiles against them."""
    act = gl.NVMMASharedLayout.get_default_for([bt, 64], gl.float16) if f16 else \
        gl.NVMMASharedLayout.get_default_for([bt, 128], gl.float8e4nv)
    return act, gl.NVMMASharedLayout.get_default_for([bn, 64], gl.uint8)


def act_boxes(f16: bool) -> int:
    """TMA boxes of activations a 128-column step: one of e4m3, two of FP16."""
    return 2 if f16 else 1


@gluon.jit
def _unpack(p, e0, e1):
    """Code bytes [BN, 32] of one chunk and its two blocks' relative exponents [BN] -> the two blocks'
    e4m3 tiles (e2m1 * 2**(rel + 6)), as triton_osc._unpack_lut."""
    s0 = (e0 + 6).to(gl.uint32)
    s1 = (e1 + 6).to(gl.uint32)
    z = gl.zeros_like(p).to(gl.int32)
    a0 = (s0 * LUT_LO_STEP + LUT_LO).to(gl.int32, bitcast=True)[:, None] + z
    a1 = (s0 * LUT_HI_STEP + LUT_HI).to(gl.int32, bitcast=True)[:, None] + z
    b0 = (s1 * LUT_LO_STEP + LUT_LO).to(gl.int32, bitcast=True)[:, None] + z
    b1 = (s1 * LUT_HI_STEP + LUT_HI).to(gl.int32, bitcast=True)[:, None] + z
    return gl.inline_asm_elementwise(LUT_ASM, "=r,=r,r" + ",r" * 16, [p, a0, a1, b0, b1],
                                     dtype=(gl.float8e4nv, gl.float8e4nv), is_pure=True, pack=4)


@gluon.jit
def _issue(c_desc, a_desc, c_s, a_s, bars, st, s, n0, t0, BOXES: gl.constexpr):
    """TMA for step s into ring stage st: the [BN, 64] code bytes and the step's 128 activation columns."""
    _issue_codes(c_desc, a_desc, c_s, bars, st, s, n0, BOXES)
    _issue_acts(a_desc, a_s, bars, st, s, t0, BOXES)


@gluon.jit
def _issue_codes(c_desc, a_desc, c_s, bars, st, s, n0, BOXES: gl.constexpr):
    """The weight half of _issue (the stage's barrier then also waits for the activations' bytes)."""
    bar = bars.index(st)
    mbarrier.expect(bar, c_desc.block_type.nbytes + BOXES * a_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(c_desc, [n0, s * 64], bar, c_s.index(st))


@gluon.jit
def _issue_acts(a_desc, a_s, bars, st, s, t0, BOXES: gl.constexpr):
    """Ring stage st's activations: BOXES boxes of 128 / BOXES columns, slots BOXES * st onwards of a_s."""
    for b in gl.static_range(BOXES):
        tma.async_copy_global_to_shared(a_desc, [t0, s * 128 + b * (128 // BOXES)], bars.index(st),
                                        a_s.index(st * BOXES + b))


@gluon.jit
def _unpack_blocks(c, ev, L: gl.constexpr):
    """A step's [BN, 64] code bytes c (shared) and its rows' four block exponents ev (one int32, block i in
    byte i) -> its four [BN, 32] e4m3 blocks in layout L, columns 32 * i to 32 * i + 31 in block i."""
    w0, w1 = _unpack(c.slice(0, 32, dim=1).load(L), (ev << 24) >> 24, (ev << 16) >> 24)
    w2, w3 = _unpack(c.slice(32, 32, dim=1).load(L), (ev << 8) >> 24, ev >> 24)
    return w0, w1, w2, w3


@gluon.jit
def _unpack_step(c_s, w, st, ev, LW: gl.constexpr):
    """Unpack ring stage st's codes with their exponents ev into the weight buffer w, columns in order."""
    w0, w1, w2, w3 = _unpack_blocks(c_s.index(st), ev, LW)
    # one [BN, 128] store (four slice stores get a CTA barrier between each): column 32 * i + j is w_i[:, j]
    q = gl.join(gl.join(w0, w1), gl.join(w2, w3))  # [BN, 32, 2, 2], element (r, j, a, b) = w_{2b + a}[r, j]
    w.store(gl.reshape(gl.permute(q, (0, 3, 2, 1)), [q.shape[0], 128]))
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _wait_stage(bars, s, s0, STAGES: gl.constexpr):
    """Wait until step s's ring stage has landed; returns the stage."""
    it = s - s0
    st = it % STAGES
    mbarrier.wait(bars.index(st), (it // STAGES) & 1)
    return st


@gluon.jit
def _refill(c_desc, a_desc, c_s, a_s, bars, s, s0, s1, n0, t0, STAGES: gl.constexpr):
    """After step s: once every warp is past it (the step before's stage is free), refill that stage with
    step s + STAGES - 1."""
    gl.thread_barrier()
    if s + STAGES - 1 < s1:
        _issue(c_desc, a_desc, c_s, a_s, bars, (s - s0 + STAGES - 1) % STAGES, s + STAGES - 1, n0, t0,
               a_s.shape[0] // STAGES)


@gluon.jit
def _step(c_desc, a_desc, c_s, a_s, w, bars, erow, nm, acc, ec, e1, e2, s, s0, s1, n0, t0, STAGES: gl.constexpr,
          LW: gl.constexpr, PROBE: gl.constexpr):
    """Step s: wait for its ring stage, unpack into w, issue its wgmma; once the step before has
    finished (its stage and weight buffer free, every warp past the barrier), refill that stage with
    step s + STAGES - 1. The exponents move along their three-step register queue. PROBE (timing only,
    wrong values; scripts/wgmma_probe.py): bit 1 skips the unpack, 2 the MMAs, 4 the exponent loads."""
    st = _wait_stage(bars, s, s0, STAGES)
    if PROBE & 1 == 0:
        _unpack_step(c_s, w, st, ec, LW)
    else:
        fence_async_shared()
        gl.thread_barrier()
    if PROBE & 4 == 0:
        e3 = gl.load(erow + gl.minimum(s + 3, s1 - 1), mask=nm, other=0)
    else:
        e3 = e2
    if PROBE & 2 == 0:
        acc = warpgroup_mma(w, a_s.index(st).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
    _refill(c_desc, a_desc, c_s, a_s, bars, s, s0, s1, n0, t0, STAGES)
    return acc, e1, e2, e3


@gluon.jit
def _step_reg(c_desc, a_desc, c_s, a_s, bars, erow, nm, acc, ec, e1, e2, s, s0, s1, n0, t0, STAGES: gl.constexpr,
              LA: gl.constexpr):
    """Step s with the unpacked weights as wgmma's register operand (no shared-memory store, no fence): the
    four 32-column blocks of the step are four k = 32 wgmmas."""
    st = _wait_stage(bars, s, s0, STAGES)
    w0, w1, w2, w3 = _unpack_blocks(c_s.index(st), ec, LA)
    e3 = gl.load(erow + gl.minimum(s + 3, s1 - 1), mask=nm, other=0)
    b = a_s.index(st)
    acc = _register_mmas(acc, w0, w1, w2, w3, b.slice(0, 32, dim=1), b.slice(32, 32, dim=1), b.slice(64, 32, dim=1),
                         b.slice(96, 32, dim=1))
    _refill(c_desc, a_desc, c_s, a_s, bars, s, s0, s1, n0, t0, STAGES)
    return acc, e1, e2, e3


@gluon.jit
def _register_mmas(acc, w0, w1, w2, w3, b0, b1, b2, b3):
    """acc += w_i · b_i^T for a step's four weight blocks w_i in registers and their [BT, 32] activation slices b_i
    (shared), as async wgmmas, all waited for here. Left in flight over the next step's unpack (the loop unrolled by
    two, each step's operands its own registers), ptxas serializes every wgmma instead (C7513: other instructions
    write wgmma operand registers while wgmmas are in flight; aot.wgmma_serialized); without the unroll the unpack
    would overwrite the registers of the wgmmas in flight."""
    acc = warpgroup_mma(w0, b0.permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma(w1, b1.permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma(w2, b2.permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma(w3, b3.permute((1, 0)), acc, is_async=True)
    return warpgroup_mma_wait(num_outstanding=0, deps=(acc,))


@gluon.jit
def _factor_tile(f2, first):
    """An int32 [BN] holding two FP16 block factors (the first 16 columns' in the low half) -> the factor of each
    element of a [BN, 32] tile; ``first``: [1, 32], true on the first 16 columns."""
    lo = (f2 & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True)
    hi = ((f2 >> 16) & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True)
    return gl.where(first, lo[:, None], hi[:, None])


@gluon.jit
def _block_factor(f, first, inv_top, GROUP: gl.constexpr):
    """The FP16 factor of each element of a [BN, 32] block: NVFP4 (GROUP 0), from the int32 word f of its two 16-column
    factors; INT4, its group's FP32 scale (f's bits) over the row's largest (1 / inv_top), rounded to FP16."""
    if GROUP:
        return (f.to(gl.float32, bitcast=True) * inv_top).to(gl.float16)[:, None]
    else:
        return _factor_tile(f, first)


@gluon.jit
def _unpack_chunk_f16(c, f_lo, f_hi, first, inv_top, LA: gl.constexpr, GROUP: gl.constexpr):
    """One 64-column chunk's code bytes [BN, 32] (shared) -> its two [BN, 32] FP16 operand tiles in LA (columns 0-31
    from the low nibbles, 32-63 from the high ones), e2m1 or int4 values times their blocks' factors."""
    lo, hi = gl.inline_asm_elementwise(INT4_F16_ASM if GROUP else E2M1_F16_ASM, "=r,=r,=r,=r,r", [c.load(LA)],
                                       dtype=(gl.float16, gl.float16), is_pure=True, pack=4)
    return lo * _block_factor(f_lo, first, inv_top, GROUP), hi * _block_factor(f_hi, first, inv_top, GROUP)


@gluon.jit
def _factor_words(frow, s, nm, GROUP: gl.constexpr):
    """Step s's four 32-column blocks' factor words of the rows at frow (int32): NVFP4, two FP16 factors each;
    INT4, the bits of the FP32 scale of the block's group (blocks of one group load the same word)."""
    if GROUP:
        w0 = gl.load(frow + (s * 128) // GROUP, mask=nm, other=0)
        w1 = gl.load(frow + (s * 128 + 32) // GROUP, mask=nm, other=0)
        w2 = gl.load(frow + (s * 128 + 64) // GROUP, mask=nm, other=0)
        w3 = gl.load(frow + (s * 128 + 96) // GROUP, mask=nm, other=0)
    else:
        w0 = gl.load(frow + 4 * s, mask=nm, other=0)
        w1 = gl.load(frow + 4 * s + 1, mask=nm, other=0)
        w2 = gl.load(frow + 4 * s + 2, mask=nm, other=0)
        w3 = gl.load(frow + 4 * s + 3, mask=nm, other=0)
    return w0, w1, w2, w3


@gluon.jit
def _step_f16(c_desc, a_desc, c_s, a_s, bars, frow, nm, inv_top, acc, f0, f1, f2, f3, g0, g1, g2, g3, s, s0, s1, n0,
              t0, STAGES: gl.constexpr, LA: gl.constexpr, GROUP: gl.constexpr):
    """Step s of the FP16 GEMM: its two chunks unpacked (f: this step's four factor words, g: the next step's), then
    four k = 32 wgmmas with the weights from registers (_register_mmas); the factor words of step s + 2 loaded
    meanwhile."""
    st = _wait_stage(bars, s, s0, STAGES)
    first = (gl.arange(0, 32, layout=gl.SliceLayout(0, LA)) < 16)[None, :]
    c = c_s.index(st)
    w0, w1 = _unpack_chunk_f16(c.slice(0, 32, dim=1), f0, f1, first, inv_top, LA, GROUP)
    w2, w3 = _unpack_chunk_f16(c.slice(32, 32, dim=1), f2, f3, first, inv_top, LA, GROUP)
    h0, h1, h2, h3 = _factor_words(frow, gl.minimum(s + 2, s1 - 1), nm, GROUP)
    b0 = a_s.index(2 * st)  # the step's two 64-column activation boxes
    b1 = a_s.index(2 * st + 1)
    acc = _register_mmas(acc, w0, w1, w2, w3, b0.slice(0, 32, dim=1), b0.slice(32, 32, dim=1), b1.slice(0, 32, dim=1),
                         b1.slice(32, 32, dim=1))
    _refill(c_desc, a_desc, c_s, a_s, bars, s, s0, s1, n0, t0, STAGES)
    return acc, g0, g1, g2, g3, h0, h1, h2, h3


@gluon.jit
def osc_wgmma_gemm_kernel(
    a_desc, sa_ptr, c_desc, be_ptr, sb_ptr, xo_ptr, wo_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K_PAD, K_OUT, stride_be, stride_ym,
    BN: gl.constexpr, BT: gl.constexpr, BO: gl.constexpr, SPLIT_K: gl.constexpr, HAS_BIAS: gl.constexpr,
    STAGES: gl.constexpr, num_warps: gl.constexpr, PROBE: gl.constexpr = 0, REG_A: gl.constexpr = False,
    PDL: gl.constexpr = False, F16: gl.constexpr = False, GROUP: gl.constexpr = 0,
):
    """a_desc: TMA descriptor of the e4m3 activations [M, K_PAD], blocks [BT, 128]; sa [M] (split_quantize
    MODE_F8); c_desc: of the chunk-layout codes [N, K_PAD / 2], blocks [BN, 64]; be: rel_exp int8
    [N, K_PAD / 32], sb [N] (layout.KernelWeights); xo [M, K_OUT], wo [N, K_OUT] BF16; stride_be: be's row stride in
    int32 words. F16 (NVFP4): a_desc of FP16 activations (MODE_F16), blocks [BT, 64]; be NVFP4's FP16 block factors
    [N, K_PAD / 16]. F16 with GROUP (INT4 with a scale per GROUP columns): be the FP32 group scales [N, K_PAD / GROUP],
    sb each row's largest, and the activations' group scales folded in as for the FP16 expansion (fold_groups).
    Program (i, j): weight tile i // cdiv(M, BT), token tile i % cdiv(M, BT) (token tiles vary
    fastest: the programs sharing a weight tile run together), split j of the K steps.
    PDL (overlap.py): launched while split_quantize still runs, the program sets up its ring and
    copies its first steps' code tiles (TMA), which no kernel writes, and then waits for split_quantize
    before anything else: activations, exponents, x_o, the workspace and y."""
    LW: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [num_warps, 1], [1, 0])
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BT, 16 if F16 else 32])
    BOXES: gl.constexpr = 2 if F16 else 1
    WS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, 128], gl.float8e4nv)

    num_t = gl.cdiv(M, BT)
    pt = gl.program_id(0) % num_t
    pn = gl.program_id(0) // num_t
    split = gl.program_id(1)
    steps = K_PAD // 128
    per = gl.cdiv(steps, SPLIT_K)
    s0 = split * per
    s1 = gl.minimum(s0 + per, steps)
    n0 = pn * BN
    t0 = pt * BT

    gl.static_assert(PROBE == 0 or not REG_A, "the probe bits cut parts of the shared-memory path")
    gl.static_assert(REG_A or not F16, "the FP16 GEMM takes its weights from registers")
    gl.static_assert(F16 or GROUP == 0, "INT4 group scales take the FP16 GEMM")
    LA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2 if F16 else 4)
    if REG_A:
        rn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, LA))
    else:
        rn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, LW))
    nm = rn < N
    erow = be_ptr.to(gl.pointer_type(gl.int32)) + rn.to(gl.int64) * stride_be

    c_s = gl.allocate_shared_memory(gl.uint8, [STAGES, BN, 64], c_desc.layout)
    a_s = gl.allocate_shared_memory(a_desc.dtype, [STAGES * BOXES, BT, 128 // BOXES], a_desc.layout)
    # the weight buffers of the shared-memory path (with REG_A unused, and not allocated: 98 -> 82 KB at 64 x 128)
    w_a = gl.allocate_shared_memory(gl.float8e4nv, [BN, 128], WS)
    w_b = gl.allocate_shared_memory(gl.float8e4nv, [BN, 128], WS)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(STAGES):
        mbarrier.init(bars.index(b), count=1)
    acc = gl.zeros([BN, BT], gl.float32, ACC)
    for b in gl.static_range(STAGES - 1):
        if s0 + b < s1:
            _issue_codes(c_desc, a_desc, c_s, bars, b, s0 + b, n0, BOXES)
    # what split_quantize writes is read from here on; the TMA copies above are the only memory accesses
    # before it (aot.pdl_order counts them)
    wait_inputs(PDL)
    if s0 < s1:
        for b in gl.static_range(STAGES - 1):
            if s0 + b < s1:
                _issue_acts(a_desc, a_s, bars, b, s0 + b, t0, BOXES)
        if F16:
            # a step's four factor words, two steps ahead in registers; INT4's factors are over the row's largest scale
            inv_top = 1.0 / gl.load(sb_ptr + rn, mask=nm, other=1.0) if GROUP else 1.0
            f0, f1, f2, f3 = _factor_words(erow, s0, nm, GROUP)
            g0, g1, g2, g3 = _factor_words(erow, gl.minimum(s0 + 1, s1 - 1), nm, GROUP)
            for s in range(s0, s1):
                acc, f0, f1, f2, f3, g0, g1, g2, g3 = _step_f16(c_desc, a_desc, c_s, a_s, bars, erow, nm, inv_top, acc,
                                                                f0, f1, f2, f3, g0, g1, g2, g3, s, s0, s1, n0, t0,
                                                                STAGES, LA, GROUP)
        else:
            acc = _main_loop_f8(c_desc, a_desc, c_s, a_s, w_a, w_b, bars, erow, nm, acc, s0, s1, n0, t0, STAGES, LW, LA,
                                PROBE, REG_A)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for b in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(b))
    _epilogue(acc, sa_ptr, sb_ptr, xo_ptr, wo_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K_OUT, stride_ym, pn, pt,
              split, BN, BT, BO, SPLIT_K, HAS_BIAS, num_warps, 1.0 if F16 else 0.015625, ACC)  # e4m3 tables: 2**6 times


@gluon.jit
def _main_loop_f8(c_desc, a_desc, c_s, a_s, w_a, w_b, bars, erow, nm, acc, s0, s1, n0, t0, STAGES: gl.constexpr,
                  LW: gl.constexpr, LA: gl.constexpr, PROBE: gl.constexpr, REG_A: gl.constexpr):
    """The MXFP4 main loop, steps s0 to s1 - 1, on e4m3 operands (from registers with REG_A, else through the weight
    buffers w_a and w_b)."""
    # a step's exponents, three steps ahead in registers (a step past s1 reloads s1 - 1)
    ec = gl.load(erow + s0, mask=nm, other=0)
    e1 = gl.load(erow + gl.minimum(s0 + 1, s1 - 1), mask=nm, other=0)
    e2 = gl.load(erow + gl.minimum(s0 + 2, s1 - 1), mask=nm, other=0)
    if REG_A:
        for s in range(s0, s1):
            acc, ec, e1, e2 = _step_reg(c_desc, a_desc, c_s, a_s, bars, erow, nm, acc, ec, e1, e2, s, s0, s1, n0, t0,
                                        STAGES, LA)
    else:
        # two steps an iteration, so that each step's weight buffer is its own allocation (w_a, w_b)
        for s in range(s0, s1, 2):
            acc, ec, e1, e2 = _step(c_desc, a_desc, c_s, a_s, w_a, bars, erow, nm, acc, ec, e1, e2, s, s0, s1, n0,
                                    t0, STAGES, LW, PROBE)
            if s + 1 < s1:
                acc, ec, e1, e2 = _step(c_desc, a_desc, c_s, a_s, w_b, bars, erow, nm, acc, ec, e1, e2, s + 1, s0,
                                        s1, n0, t0, STAGES, LW, PROBE)
    return acc


@gluon.jit
def _epilogue(acc, sa_ptr, sb_ptr, xo_ptr, wo_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K_OUT, stride_ym, pn, pt,
              split, BN: gl.constexpr, BT: gl.constexpr, BO: gl.constexpr, SPLIT_K: gl.constexpr,
              HAS_BIAS: gl.constexpr, num_warps: gl.constexpr, SB_SCALE: gl.constexpr, ACC: gl.constexpr):
    """On the accumulator's layout ACC: the token and row scales (SB_SCALE: what the unpack multiplied the weights
    by, undone), the bias, the BF16 branch (one wgmma per BO outlier channels), then the store (or split-K sum)."""
    en = pn * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, ACC))
    et = pt * BT + gl.arange(0, BT, layout=gl.SliceLayout(0, ACC))
    enm = en < N
    etm = et < M
    sb = gl.load(sb_ptr + en, mask=enm, other=0.0) * SB_SCALE
    sa = gl.load(sa_ptr + et, mask=etm, other=0.0)
    acc = acc * sb[:, None] * sa[None, :]
    if HAS_BIAS:
        if split == 0:
            acc += gl.load(bias_ptr + en, mask=enm, other=0.0)[:, None]
    LY: gl.constexpr = gl.BlockedLayout([4, 1], [32, 1], [1, num_warps], [0, 1])
    if BO > 0:
        if split == 0:
            # the BF16 wgmma's k is 16: the same accumulator registers under that instruction shape
            ACC16: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                            instr_shape=[16, BT, 16])
            acc16 = gl.convert_layout(acc, ACC16)
            LO: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
            o = gl.arange(0, BO, layout=gl.SliceLayout(0, LO))
            on = pn * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, LO))
            ot = pt * BT + gl.arange(0, BT, layout=gl.SliceLayout(1, LO))
            wo_s = gl.allocate_shared_memory(gl.bfloat16, [BN, BO], gl.NVMMASharedLayout.get_default_for([BN, BO],
                                                                                                        gl.bfloat16))
            xo_s = gl.allocate_shared_memory(gl.bfloat16, [BT, BO], gl.NVMMASharedLayout.get_default_for([BT, BO],
                                                                                                        gl.bfloat16))
            for k0 in range(0, K_OUT, BO):
                om = (k0 + o) < K_OUT
                wo = gl.load(wo_ptr + on.to(gl.int64)[:, None] * K_OUT + (k0 + o)[None, :],
                             mask=(on < N)[:, None] & om[None, :], other=0.0)
                xo = gl.load(xo_ptr + ot.to(gl.int64)[:, None] * K_OUT + (k0 + o)[None, :],
                             mask=(ot < M)[:, None] & om[None, :], other=0.0)
                gl.thread_barrier()  # the previous chunk's MMA has finished reading (it was waited for)
                wo_s.store(wo)
                xo_s.store(xo)
                fence_async_shared()
                gl.thread_barrier()
                acc16 = warpgroup_mma(wo_s, xo_s.permute((1, 0)), acc16)
            out = gl.convert_layout(acc16, LY)
        else:
            out = gl.convert_layout(acc, LY)
    else:
        out = gl.convert_layout(acc, LY)

    # y[token, row]: rows are contiguous in y, so the store's layout (LY) runs its threads along rows
    yn = pn * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, LY))
    yt = pt * BT + gl.arange(0, BT, layout=gl.SliceLayout(0, LY))
    store_tile(out, y_ptr + yt.to(gl.int64)[None, :] * stride_ym + yn[:, None],
               ws_ptr + yt.to(gl.int64)[None, :] * N + yn[:, None], (yn < N)[:, None] & (yt < M)[None, :],
               cnt_ptr + gl.program_id(0), SPLIT_K)
