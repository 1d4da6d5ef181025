"""Where does the small-M (decode) GEMM's time go? H200 probe, one run, all in one process.

For each shape at M = 1 and 16, side by side:
  stream   a kernel that only streams the 4-bit weight bytes with the transposed GEMM's tiling
           (no unpack, no MMA): the load ceiling of that structure in Triton;
  real     osc_gemm_t_kernel as shipped;
  cheap    the same kernel with the unpack replaced by two prmt + two and per 8 values (wrong
           values, same data flow): what a cheaper unpack could at most buy.
Timed two ways: "flush" (one graph replay after an L2 flush, as `oscquant bench gemm`) and
"b2b" (one graph of R back-to-back calls on R distinct weight copies, > 256 MB in all, per call),
which is how a decode step runs the layers.
Usage on the device: python3 scripts/decode_probe.py > $OUT/probe.md
"""

from __future__ import annotations

import functools
import sys

import torch
import triton
import triton.language as tl

from oscquant.bench import _graph_time
from oscquant.config import LayerScheme
from oscquant.kernels import triton_osc as T
from oscquant.kernels.ops import gemm_config, layer_weights, osc_gemm, split_quantize
from oscquant.linear import OSCLinear

_CHEAP_ASM = tl.constexpr("""
{
prmt.b32 $0, $4, 0, 0x4140;
prmt.b32 $1, $4, 0, 0x4342;
and.b32 $2, $0, 0x8E008E00;
and.b32 $3, $1, 0x8E008E00;
}
""")


@triton.jit
def stream_kernel(b_ptr, out_ptr, N, K_PAD, stride_bn, BN: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr,
                  WORDS: tl.constexpr, TILED: tl.constexpr):
    """Reads the 4-bit weights once, WORDS int32 per row per step. TILED: the bytes of each
    16-row x (4 * WORDS)-byte tile are contiguous (a pre-tiled layout) instead of 16 row pieces."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    split = tl.program_id(1)
    nm = rn < N
    h = tl.arange(0, WORDS)
    acc = tl.zeros((BN, WORDS), dtype=tl.int32)
    steps = K_PAD // (8 * WORDS)
    per_split = tl.cdiv(steps, SPLIT_K)
    s0 = split * per_split
    s1 = tl.minimum(s0 + per_split, steps)
    b32 = b_ptr.to(tl.pointer_type(tl.int32))
    rn64 = rn.to(tl.int64)
    if TILED:
        base = b32 + ((rn64 // 16) * steps * 16 + rn64 % 16)[:, None] * WORDS + h[None, :]
        for s in tl.range(s0, s1, num_stages=STAGES):
            acc ^= tl.load(base + s * 16 * WORDS, mask=nm[:, None], other=0)
    else:
        base = b32 + rn64[:, None] * (stride_bn // 4) + h[None, :]
        for s in tl.range(s0, s1, num_stages=STAGES):
            acc ^= tl.load(base + s * WORDS, mask=nm[:, None], other=0)
    tl.store(out_ptr + rn * SPLIT_K + split, tl.sum(acc, axis=1), mask=nm)


@triton.jit
def _unpack(p, CHEAP: tl.constexpr):
    if CHEAP:
        return tl.inline_asm_elementwise(_CHEAP_ASM, "=r,=r,=r,=r,r", [p], dtype=(tl.float16, tl.float16),
                                         is_pure=True, pack=4)
    return T._unpack_f16(p, 0, False)


@triton.jit
def probe_t_kernel(a_ptr, b_ptr, be_ptr, y_ptr, M, N, K_PAD, stride_am, stride_bn, stride_be,
                   MP: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr, CHEAP: tl.constexpr,
                   TILED: tl.constexpr = False):
    """osc_gemm_t_kernel's main loop (MXFP4, no branch, no scales), the unpack switchable."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    split = tl.program_id(1)
    nm = rn < N
    rn64 = rn.to(tl.int64)
    rm = tl.arange(0, MP)
    mm = rm < M
    h = tl.arange(0, 32)
    acc = tl.zeros((BN, MP), dtype=tl.float32)
    per_split = tl.cdiv(K_PAD // 128, SPLIT_K)
    c0 = split * per_split * 2
    c1 = tl.minimum(c0 + per_split * 2, K_PAD // 64)
    arow = a_ptr + rm.to(tl.int64)[:, None] * stride_am + h[None, :]
    for ck in range(c0, c1, 2):
        if TILED:  # 16-row x 64-byte tiles contiguous, in step order
            wrow = b_ptr + ((rn64 // 16) * (K_PAD // 128) * 16 + rn64 % 16)[:, None] * 64 + ck * 512 + h[None, :]
        else:
            wrow = b_ptr + rn64[:, None] * stride_bn + ck * 32 + h[None, :]
        p0 = tl.load(wrow, mask=nm[:, None], other=0)
        p1 = tl.load(wrow + 32, mask=nm[:, None], other=0)
        ev = tl.load(be_ptr.to(tl.pointer_type(tl.int32)) + rn64 * (stride_be // 4) + ck // 2, mask=nm, other=0)
        e00, e01, e10, e11 = (ev << 24) >> 24, (ev << 16) >> 24, (ev << 8) >> 24, ev >> 24
        a0 = tl.load(arow + ck * 64, mask=mm[:, None], other=0.0)
        a1 = tl.load(arow + ck * 64 + 32, mask=mm[:, None], other=0.0)
        a2 = tl.load(arow + ck * 64 + 64, mask=mm[:, None], other=0.0)
        a3 = tl.load(arow + ck * 64 + 96, mask=mm[:, None], other=0.0)
        w0, w1 = _unpack(p0, CHEAP)
        w0 = w0 * tl.exp2(e00.to(tl.float32) + 14).to(tl.float16)[:, None]
        w1 = w1 * tl.exp2(e01.to(tl.float32) + 14).to(tl.float16)[:, None]
        acc = tl.dot(w0, tl.trans(a0), acc)
        acc = tl.dot(w1, tl.trans(a1), acc)
        w2, w3 = _unpack(p1, CHEAP)
        w2 = w2 * tl.exp2(e10.to(tl.float32) + 14).to(tl.float16)[:, None]
        w3 = w3 * tl.exp2(e11.to(tl.float32) + 14).to(tl.float16)[:, None]
        acc = tl.dot(w2, tl.trans(a2), acc)
        acc = tl.dot(w3, tl.trans(a3), acc)
    y = y_ptr + rm.to(tl.int64)[None, :] * N + rn64[:, None]
    tl.atomic_add(y, acc, mask=nm[:, None] & mm[None, :])


def b2b_time(make_call, nbytes: int, total: int = 256 << 20) -> float:
    """µs per call of a graph of R back-to-back calls, each on its own copy of the weights."""
    reps = max(2, -(-total // max(nbytes, 1)))
    calls = [functools.partial(make_call, i) for i in range(reps)]

    def run():
        for c in calls:
            c()
    return _graph_time(run) / reps


# (BN, warps, stages, split, int32 words per row per step, tiled)
STREAM = [(32, 2, 4, 1, 16, 0), (32, 2, 4, 1, 16, 1), (32, 2, 6, 1, 32, 0), (32, 2, 6, 1, 32, 1),
          (64, 4, 4, 1, 16, 1), (64, 4, 4, 1, 32, 1), (16, 1, 6, 1, 16, 1), (32, 2, 6, 4, 16, 0),
          (32, 2, 6, 4, 16, 1), (32, 2, 8, 2, 16, 1), (64, 4, 6, 2, 32, 1), (128, 4, 4, 1, 32, 1)]
# (BN, warps, stages, split, cheap unpack, tiled)
GEMMS = [(32, 2, 4, 1, 0, 0), (32, 2, 4, 1, 0, 1), (32, 2, 4, 1, 1, 1), (32, 2, 6, 4, 0, 0), (32, 2, 6, 4, 0, 1),
         (32, 2, 6, 2, 0, 1), (64, 4, 6, 1, 0, 1), (64, 4, 4, 2, 0, 1), (32, 2, 6, 1, 0, 1)]
SHAPES = [("8B gate+up", 24576, 4096), ("8B down", 4096, 12288), ("8B o", 4096, 4096), ("30B-A3B o", 2048, 4096)]


def main():
    torch.manual_seed(0)
    out = sys.stdout
    out.write("| shape | M | what | config (BN, warps, stages, split) | flush µs | b2b µs | weight TB/s (flush) | TB/s (b2b) |\n|---|---|---|---|---|---|---|---|\n")
    for name, n, k in SHAPES:
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        layer = OSCLinear.from_linear(lin, LayerScheme("mxfp4", 128), torch.arange(128))
        kw = layer_weights(layer)
        wbytes = kw.codes.numel() + kw.rel_exp.numel()
        reps = max(2, -(-(256 << 20) // wbytes))
        codes = [kw.codes.clone() for _ in range(reps)]
        rels = [kw.rel_exp.clone() for _ in range(reps)]
        w_f8 = lin.weight.to(torch.float8_e4m3fn)
        w_f8s = [w_f8.clone() for _ in range(max(2, -(-(256 << 20) // w_f8.numel())))]
        w_bf = [lin.weight.clone() for _ in range(max(2, -(-(256 << 20) // (2 * w_f8.numel()))))]
        sw = torch.ones(1, n, device="cuda")

        def row(m, what, cfg, call_i, nbytes):
            f = _graph_time(lambda: call_i(0))
            b = b2b_time(call_i, nbytes)
            out.write(f"| {name} {n}×{k} | {m} | {what} | {cfg} | {f:.1f} | {b:.1f} | {nbytes / f / 1e6:.2f} | {nbytes / b / 1e6:.2f} |\n")
            out.flush()

        for m in (1, 16):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            x_f8 = x.to(torch.float8_e4m3fn)
            sx = torch.ones(m, 1, device="cuda")
            row(m, "BF16 cuBLAS", "", lambda i: torch.matmul(x, w_bf[i % len(w_bf)].T), 2 * n * k)
            row(m, "FP8 cuBLAS", "", lambda i: torch._scaled_mm(x_f8, w_f8s[i % len(w_f8s)].T, scale_a=sx, scale_b=sw,
                                                                out_dtype=torch.bfloat16), n * k)
            xo, a, sa = split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", T.MODE_F16, kw.k_main)
            cfg = gemm_config(m, n, kw.k_main)

            def shipped(i):
                kwi = type(kw)(kw.fmt, codes[i % reps], rels[i % reps], kw.row_scale, kw.k_main, kw.w_outlier,
                               kw.outlier_idx, kw.keep, kw.bias)
                return osc_gemm(a, sa, kwi, xo, torch.bfloat16, cfg)
            row(m, "osc_gemm as shipped", (cfg.bn, cfg.warps, cfg.stages, cfg.split_k), shipped, wbytes)
            mp = max(16, triton.next_power_of_2(m))
            y = torch.zeros(m, n, device="cuda")
            sink = torch.empty(n * 16, dtype=torch.int32, device="cuda")
            if m == 1:
                for bn, w, st, sk, words, tiled in STREAM:
                    grid = (triton.cdiv(n, bn), sk)
                    row(m, "stream" + (" tiled" if tiled else ""), (bn, w, st, sk, 4 * words), lambda i: stream_kernel[grid](
                        codes[i % reps], sink, n, kw.k_main, kw.codes.stride(0), BN=bn, SPLIT_K=sk, STAGES=st,
                        WORDS=words, TILED=tiled, num_warps=w, num_stages=st), kw.codes.numel())
            for bn, w, st, sk, cheap, tiled in GEMMS:
                cfg_t = (bn, w, st, sk)
                grid = (triton.cdiv(n, bn), sk)
                what = ("cheap unpack" if cheap else "real unpack") + (" tiled" if tiled else "")
                row(m, what, cfg_t, lambda i: probe_t_kernel[grid](
                    a, codes[i % reps], rels[i % reps], y, m, n, kw.k_main, a.stride(0), kw.codes.stride(0),
                    kw.rel_exp.stride(0), MP=mp, BN=bn, SPLIT_K=sk, CHEAP=cheap, TILED=tiled, num_warps=w,
                    num_stages=st), wbytes)
        del codes, rels, w_f8s, w_bf
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
