"""Where does the small-M (decode) GEMM's time go? H200 probe, one run, all in one process.

For each shape at M = 1 and 16, side by side with cuBLAS BF16 and FP8:
  osc_gemm   the shipped transposed GEMM under gemm_config's config;
  stream     (M = 1) a kernel that only streams the 4-bit weight bytes with the GEMM's tiling
             (no unpack, no MMA), optionally from a pre-tiled layout: the load ceiling of that
             structure in Triton.
Timed two ways: "flush" (one graph replay after an L2 flush, as `oscquant bench gemm`) and
"b2b" (bench._b2b_time: a graph of calls in a row on distinct weight copies, per call).
The GEMM-loop variants of docs/kernels.md (cheap unpack, tiled addresses) ran from this script
at commit 0185fd7 as a copy of the GEMM's main loop; they are not kept here.
Usage on the device: python3 scripts/decode_probe.py > $OUT/probe.md
"""

from __future__ import annotations

import sys
import torch
import triton
import triton.language as tl

from oscquant.bench import _b2b_time, _graph_time, clone_weights, sweep_cases
from oscquant.kernels.ops import gemm_config, osc_gemm, split_quantize


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



# (BN, warps, stages, split, int32 words per row per step, tiled)
STREAM = [(32, 2, 4, 1, 16, 0), (32, 2, 4, 1, 16, 1), (32, 2, 6, 1, 32, 0), (32, 2, 6, 1, 32, 1),
          (64, 4, 4, 1, 16, 1), (64, 4, 4, 1, 32, 1), (16, 1, 6, 1, 16, 1), (32, 2, 6, 4, 16, 0),
          (32, 2, 6, 4, 16, 1), (32, 2, 8, 2, 16, 1), (64, 4, 6, 2, 32, 1), (128, 4, 4, 1, 32, 1)]
SHAPES = [("8B gate+up", 24576, 4096), ("8B down", 4096, 12288), ("8B o", 4096, 4096), ("30B-A3B o", 2048, 4096)]


def main():
    torch.manual_seed(0)
    out = sys.stdout
    out.write("| shape | M | what | config | flush µs | b2b µs | weight TB/s (flush) | TB/s (b2b) |\n"
              "|---|---|---|---|---|---|---|---|\n")
    for case in sweep_cases((1, 16), 128, SHAPES):
        name, m, n, k, x, kw = case.name, case.m, case.n, case.k_in, case.x, case.kw
        sink = torch.empty(n * 16, dtype=torch.int32, device="cuda")

        def row(what, cfg, call, weights, nbytes):
            w0 = weights()  # cloned outside the timed graph
            f = _graph_time(lambda: call(w0))
            b = _b2b_time(call, weights, nbytes)
            out.write(f"| {name} {n}×{k} | {m} | {what} | {cfg} | {f:.1f} | {b:.1f} | {nbytes / f / 1e6:.2f} | "
                      f"{nbytes / b / 1e6:.2f} |\n")
            out.flush()

        row("BF16 cuBLAS", "", case.bf16, case.weight.clone, 2 * n * k)
        row("FP8 cuBLAS", "", case.fp8, case.weight_f8.clone, n * k)
        cfg = gemm_config(m, n, kw.k_main)
        xo, a, sa = split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", cfg.mode, kw.k_main)
        # the bytes the config's kernel streams: the fragment layout or the chunk layout
        w_bytes = (4 * (kw.frag.words.numel() + kw.frag.exps.numel()) if cfg.frag
                   else kw.codes.numel() + kw.rel_exp.numel())
        row("osc_gemm as shipped", (cfg.bn, cfg.warps, cfg.stages, cfg.split_k),
            lambda w: osc_gemm(a, sa, w, xo, torch.bfloat16, cfg), lambda: clone_weights(kw), w_bytes)
        if m == 1:
            for bn, w, st, sk, words, tiled in STREAM:
                grid = (triton.cdiv(n, bn), sk)
                row("stream" + (" tiled" if tiled else ""), (bn, w, st, sk, 4 * words),
                    lambda c: stream_kernel[grid](c, sink, n, kw.k_main, kw.codes.stride(0), BN=bn, SPLIT_K=sk,
                                                  STAGES=st, WORDS=words, TILED=tiled, num_warps=w,
                                                  num_stages=st),
                    kw.codes.clone, kw.codes.numel())


if __name__ == "__main__":
    main()
