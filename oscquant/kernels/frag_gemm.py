"""The decode GEMM in MMA fragment layout (Gluon, Triton's explicit-layout dialect, plus inline PTX).

Up to 16 tokens, y = (A · deq(W)^T) * sa * sw + x_o · W_o^T (+ bias), one launch. Each warp owns 16
weight rows; every thread holds one row of a [32 * WARPS, 8] register tensor, and that row *is*
its share of the MMA fragments: layout.fragment_pack stores the 4-bit codes so that a thread's
32 bytes of a step (128 columns) arrive with two 16-byte loads, already in fragment order, with no
shared memory and no shuffles. Per step a thread unpacks 64 weights:

- each 32-bit word (8 codes of one row) goes through two ``prmt`` byte lookups whose 8-entry table
  is that row's e4m3 encodings of the e2m1 magnitudes with the MX block exponent already added
  (the table is built from the block exponent by two integer multiply-adds), and two sign ORs:
  about 7 instructions per 8 values, exact for block exponents within 2**-11 of the row's largest;
- ``cvt.f16x2.e4m3x2`` widens the bytes to FP16 (sm_90 has no FP8 ``mma.sync`` of its own: ptxas
  would insert the same conversion for the activations too), and FP16 ``mma.sync`` m16n8k16
  multiplies them with the FP16 operands of split_quantize.

Each thread reads all its values of a step from one MX block per row (the k positions of the MMA
are permuted consistently for both operands), so the lookup table is built once per row and step.
The BF16 branch uses BF16 ``mma.sync`` on W_o and x_o read in natural order.

The whole main step is one inline-asm call: Gluon gives the register layout, PTX the rest.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .layout import FRAG_LUT
from .overlap import wait_inputs


def _main_step_asm(nt: int, probe: int = 0) -> str:
    """PTX for one 128-column step of one thread: 8 code words ($8-$15), the two rows' block
    exponents (low bytes of $16), nt groups of 16 activation words (FP16 pairs, natural order),
    8 accumulators in, 8 out ($0-$7; the second four belong to tokens 8-15)."""
    x0 = 24
    acc_in = x0 + 16 * nt
    ins = ["{", ".reg .b32 e, m, s, la0, la1, lb0, lb1;", ".reg .b32 q<16>;", ".reg .b32 f<32>;",
           ".reg .b16 u, v;"]
    # lookup tables: byte c = e4m3 of e2m1 magnitude c times 2**e (c = 0 stays 0)
    for h, (l0, l1) in enumerate((("la0", "la1"), ("lb0", "lb1"))):
        ins += [f"bfe.s32 e, $16, {8 * h}, 8;",
                f"mad.lo.s32 {l0}, e, 0x{FRAG_LUT[2]:08X}, 0x{FRAG_LUT[0]:08X};",
                f"mad.lo.s32 {l1}, e, 0x{FRAG_LUT[3]:08X}, 0x{FRAG_LUT[1]:08X};"]
    for h in range(2):
        l0, l1 = ("la0", "la1") if h == 0 else ("lb0", "lb1")
        for b in range(4):
            w = f"${8 + 4 * h + b}"
            lo, hi = f"q{8 * h + 2 * b}", f"q{8 * h + 2 * b + 1}"
            ins += [f"and.b32 m, {w}, 0x77777777;", f"prmt.b32 {lo}, {l0}, {l1}, m;",
                    f"and.b32 s, {w}, 0x80808080;", f"or.b32 {lo}, {lo}, s;",
                    "shr.u32 m, m, 16;", f"prmt.b32 {hi}, {l0}, {l1}, m;",
                    f"shl.b32 s, {w}, 4;", "and.b32 s, s, 0x80808080;", f"or.b32 {hi}, {hi}, s;"]
    for i in range(16):  # e4m3 quad i -> FP16 pairs f(2i), f(2i + 1)
        if probe == 1:  # timing probe only: no conversion (wrong values)
            ins += [f"mov.b32 f{2 * i}, q{i};", f"xor.b32 f{2 * i + 1}, q{i}, 0x1234;"]
        else:
            ins += [f"mov.b32 {{u, v}}, q{i};", f"cvt.rn.f16x2.e4m3x2 f{2 * i}, u;", f"cvt.rn.f16x2.e4m3x2 f{2 * i + 1}, v;"]
    mmas = []
    for b in range(4):
        for part in range(2):  # part 0: columns 8b..8b+3 of the thread's block, part 1: 8b+4..8b+7
            qa, qb = 2 * b + part, 8 + 2 * b + part  # quads of rows g and g + 8
            a = f"{{f{2 * qa}, f{2 * qb}, f{2 * qa + 1}, f{2 * qb + 1}}}"
            mmas += [(a, x0 + 16 * grp + 4 * b + 2 * part, grp) for grp in range(nt)]
    return "\n".join(ins + _mma_chain("f16", mmas, nt, acc_in))


def _mma_chain(dtype: str, mmas: list, nt: int, acc_in: int) -> list:
    """m16n8k16 MMAs (A registers, first of B's two words, token group) into outputs $0-$7: each
    group's first MMA reads the incoming accumulators, the rest its own outputs; unused outputs
    pass their inputs through."""
    ins, first = [], [True] * nt
    for a, xw, grp in mmas:
        d = ", ".join(f"${4 * grp + i}" for i in range(4))
        c = ", ".join(f"${acc_in + 4 * grp + i}" for i in range(4)) if first[grp] else d
        first[grp] = False
        ins.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{dtype}.{dtype}.f32 {{{d}}}, {a}, {{${xw}, ${xw + 1}}}, {{{c}}};")
    ins += [f"mov.b32 ${i}, ${acc_in + i};" for i in range(4 * nt, 8)]
    return ins + ["}"]


def _branch_step_asm(nt: int) -> str:
    """PTX for one 64-column step of the BF16 branch: W_o words of rows g ($8-$15) and g + 8 ($16-$23),
    nt groups of 8 x_o words, accumulators as in _main_step_asm."""
    x0 = 24
    acc_in = x0 + 8 * nt
    mmas = [(f"{{${8 + 2 * b}, ${16 + 2 * b}, ${8 + 2 * b + 1}, ${16 + 2 * b + 1}}}", x0 + 8 * grp + 2 * b, grp)
            for b in range(4) for grp in range(nt)]
    return "\n".join(["{"] + _mma_chain("bf16", mmas, nt, acc_in))


# lane 0 of a warp ($1 != 0) pulls $4 bytes of W_o ($2) and 64 bytes of row scales ($3) and of bias ($5) into L2
PREFETCH_EPILOGUE = gl.constexpr("{ .reg .pred p; setp.ne.s32 p, $1, 0; @p cp.async.bulk.prefetch.L2.global [$2], $4; "
                                 "@p cp.async.bulk.prefetch.L2.global [$3], 64; "
                                 "@p cp.async.bulk.prefetch.L2.global [$5], 64; mov.b32 $0, 0; }")


def _constraints(n_words: int) -> str:
    return ",".join(["=f"] * 8 + ["r"] * n_words + ["f"] * 8)


MAIN1 = gl.constexpr(_main_step_asm(1))
MAIN2 = gl.constexpr(_main_step_asm(2))
MAIN1_P1 = gl.constexpr(_main_step_asm(1, 1))
MAIN1_C = gl.constexpr(_constraints(32))
MAIN2_C = gl.constexpr(_constraints(48))
BRANCH1 = gl.constexpr(_branch_step_asm(1))
BRANCH2 = gl.constexpr(_branch_step_asm(2))
BRANCH1_C = gl.constexpr(_constraints(24))
BRANCH2_C = gl.constexpr(_constraints(32))


@gluon.jit
def _main_loads(w_row, e_row, x_row0, x_row1, s, w_step, e_step, NT: gl.constexpr):
    w = gl.load(w_row + s * w_step)
    e = gl.load(e_row + s * e_step)
    xa = gl.load(x_row0 + s * 64)
    xb = gl.load(x_row0 + s * 64 + 8)
    if NT == 2:
        xc = gl.load(x_row1 + s * 64)
        xd = gl.load(x_row1 + s * 64 + 8)
    else:
        xc = xa
        xd = xb
    return w, e, xa, xb, xc, xd


@gluon.jit
def _main_step(acc, w, e, xa, xb, xc, xd, NT: gl.constexpr, PROBE: gl.constexpr = 0):
    e8 = e[:, None] + gl.zeros_like(w)
    if PROBE == 1:
        return gl.inline_asm_elementwise(MAIN1_P1, MAIN1_C, [w, e8, xa, xb, acc], dtype=gl.float32, is_pure=True,
                                         pack=8)
    elif PROBE == 2:  # timing probe: loads only
        return acc + (w + e8 + xa + xb).to(gl.float32)
    elif NT == 2:
        return gl.inline_asm_elementwise(MAIN2, MAIN2_C, [w, e8, xa, xb, xc, xd, acc], dtype=gl.float32,
                                         is_pure=True, pack=8)
    else:
        return gl.inline_asm_elementwise(MAIN1, MAIN1_C, [w, e8, xa, xb, acc], dtype=gl.float32, is_pure=True,
                                         pack=8)


@gluon.jit
def osc_frag_gemm_kernel(
    a_ptr, sa_ptr, w_ptr, e_ptr, sw_ptr, xo_ptr, wo_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, STEPS, TILES, K_OUT, stride_am, stride_ym,
    NT: gl.constexpr, WARPS: gl.constexpr, SPLIT_K: gl.constexpr, HAS_BIAS: gl.constexpr, BRANCH: gl.constexpr,
    PREFETCH: gl.constexpr = False, PROBE: gl.constexpr = 0, PDL: gl.constexpr = False,
):
    """a: FP16 operands [M, 128 * STEPS] (split_quantize MODE_F16), sa [M]; w: int32 words
    [STEPS, TILES, 32, 8] and e: int32 [STEPS, TILES, 32] of layout.fragment_pack; sw [N];
    xo [M, K_OUT], wo [N, K_OUT] BF16 with K_OUT % 8 == 0. NT token groups of 8 (M <= 8 * NT).
    Program (i, j): weight tiles WARPS*i .. WARPS*i + WARPS - 1 (one per warp), split j of the steps.
    PDL (overlap.py): launched while split_quantize still runs, the program waits for it before any
    load."""
    L: gl.constexpr = gl.BlockedLayout([1, 8], [32, 1], [WARPS, 1], [1, 0])
    ROWS: gl.constexpr = gl.SliceLayout(1, L)
    COLS: gl.constexpr = gl.SliceLayout(0, L)
    t = gl.arange(0, 32 * WARPS, layout=ROWS)
    j = gl.arange(0, 8, layout=COLS)
    lane = t % 32
    g = lane // 4
    tq = lane % 4
    tile = (gl.program_id(0) * WARPS + t // 32).to(gl.int64)
    split = gl.program_id(1)
    per = gl.cdiv(STEPS, SPLIT_K)
    s0 = split * per
    s1 = gl.minimum(s0 + per, STEPS)

    if PREFETCH:
        # the epilogue's weight-side operands (W_o rows, row scales, bias) are pulled into L2 now, before
        # split_quantize has finished, so that their DRAM round trip is off the program's tail (loading them
        # into registers would hold those through the loop). Whole 16-row tiles only: a bulk prefetch must
        # stay inside the tensors.
        first = (lane == 0) & (tile * 16 + 16 <= N) & (split == 0) & (K_OUT > 0)
        gl.inline_asm_elementwise(PREFETCH_EPILOGUE, "=r,r,l,l,r,l",
                                  [first.to(gl.int32), wo_ptr + tile * 16 * K_OUT, sw_ptr + tile * 16,
                                   gl.zeros_like(lane) + 32 * K_OUT, (bias_ptr if HAS_BIAS else sw_ptr) + tile * 16],
                                  dtype=gl.int32, is_pure=False, pack=1)

    wait_inputs(PDL)

    # step-major: the programs running together read neighbouring kilobytes (DRAM pages), not
    # one 32 KB run each
    w_row = w_ptr + (tile * 256 + lane * 8)[:, None] + j[None, :]
    e_row = e_ptr + tile * 32 + lane
    # tokens past M read row M - 1 instead of being masked (no zero-fill per step): their columns
    # of the product are never stored
    a32 = a_ptr.to(gl.pointer_type(gl.int32))
    x_row0 = a32 + (gl.minimum(g, M - 1).to(gl.int64) * (stride_am // 2) + tq * 16)[:, None] + j[None, :]
    x_row1 = a32 + (gl.minimum(g + 8, M - 1).to(gl.int64) * (stride_am // 2) + tq * 16)[:, None] + j[None, :]

    acc = gl.zeros([32 * WARPS, 8], gl.float32, L)
    if s0 < s1:
        # two steps per iteration, each step's loads issued one step ahead into the other register
        # set (no copies between sets); a step past s1 reloads s1 - 1 and is not computed.
        # (Loading three steps ahead from four sets measured slower.)
        ws = TILES * 256
        es = TILES * 32
        w, e, xa, xb, xc, xd = _main_loads(w_row, e_row, x_row0, x_row1, s0, ws, es, NT)
        for s in range(s0, s1, 2):
            w2, e2, xa2, xb2, xc2, xd2 = _main_loads(w_row, e_row, x_row0, x_row1, gl.minimum(s + 1, s1 - 1), ws, es,
                                                     NT)
            acc = _main_step(acc, w, e, xa, xb, xc, xd, NT, PROBE)
            w, e, xa, xb, xc, xd = _main_loads(w_row, e_row, x_row0, x_row1, gl.minimum(s + 2, s1 - 1), ws, es, NT)
            if s + 1 < s1:
                acc = _main_step(acc, w2, e2, xa2, xb2, xc2, xd2, NT, PROBE)

    # fragment element (thread, r): weight row n = 16 * tile + g + 8 * ((r % 4) // 2), token 8 * (r // 4) + 2 * tq + r % 2
    n = tile[:, None] * 16 + (g[:, None] + 8 * ((j[None, :] % 4) // 2))
    m = 8 * (j[None, :] // 4) + 2 * tq[:, None] + j[None, :] % 2
    nm = n < N
    mm = m < M
    sa = gl.load(sa_ptr + m, mask=mm, other=0.0)
    sw = gl.load(sw_ptr + n, mask=nm, other=0.0)
    acc = acc * sa * sw

    if BRANCH and split == 0:
        br = gl.zeros([32 * WARPS, 8], gl.float32, L)
        wo32 = wo_ptr.to(gl.pointer_type(gl.int32))
        xo32 = xo_ptr.to(gl.pointer_type(gl.int32))
        n_g = tile * 16 + g
        wo_a = wo32 + (n_g * (K_OUT // 2) + tq * 8)[:, None] + j[None, :]
        wo_b = wo_a + 8 * (K_OUT // 2)
        xo_a = xo32 + (gl.minimum(g, M - 1).to(gl.int64) * (K_OUT // 2) + tq * 8)[:, None] + j[None, :]
        xo_b = xo32 + (gl.minimum(g + 8, M - 1).to(gl.int64) * (K_OUT // 2) + tq * 8)[:, None] + j[None, :]
        for c in range(0, K_OUT, 64):
            cm = c + 16 * tq[:, None] + 2 * j[None, :] < K_OUT
            wa = gl.load(wo_a + c // 2, mask=cm & (n_g < N)[:, None], other=0)
            wb = gl.load(wo_b + c // 2, mask=cm & (n_g + 8 < N)[:, None], other=0)
            xa = gl.load(xo_a + c // 2, mask=cm, other=0)
            if NT == 2:
                xb = gl.load(xo_b + c // 2, mask=cm, other=0)
                br = gl.inline_asm_elementwise(BRANCH2, BRANCH2_C, [wa, wb, xa, xb, br], dtype=gl.float32,
                                               is_pure=True, pack=8)
            else:
                br = gl.inline_asm_elementwise(BRANCH1, BRANCH1_C, [wa, wb, xa, br], dtype=gl.float32,
                                               is_pure=True, pack=8)
        acc += br
    if HAS_BIAS and split == 0:
        acc += gl.load(bias_ptr + n, mask=nm, other=0.0)

    store_tile(acc, y_ptr + m.to(gl.int64) * stride_ym + n, ws_ptr + m.to(gl.int64) * N + n, nm & mm,
               cnt_ptr + gl.program_id(0), SPLIT_K)


@gluon.jit
def store_tile(acc, y, ws, mask, cnt, SPLIT_K: gl.constexpr):
    """triton_osc._store_tile for the Gluon kernels: y directly, or (split-K) relaxed FP32 partial sums
    into the workspace ws, of which the tile's last program (told by its counter cnt) writes y, leaving
    zeros, and re-arms cnt."""
    if SPLIT_K == 1:
        gl.store(y, acc.to(y.dtype.element_ty), mask=mask)
    else:
        gl.atomic_add(ws, acc, mask=mask, sem="relaxed")
        gl.thread_barrier()
        if gl.atomic_add(cnt, 1, sem="acq_rel") == SPLIT_K - 1:
            bits = gl.atomic_xchg(ws.to(gl.pointer_type(gl.int32)), gl.zeros_like(acc).to(gl.int32), mask=mask,
                                  sem="relaxed")
            gl.store(y, bits.to(gl.float32, bitcast=True).to(y.dtype.element_ty), mask=mask)
            gl.atomic_xchg(cnt, 0, sem="relaxed")
