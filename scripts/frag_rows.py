"""On the GPU: fragment GEMM variants side by side in one process (CUDA graphs, k = 128 planted channels).

Variants (tiles a warp, L2 prefetch steps, split-K factor over frag_config's): 1 tile a warp without
prefetch is the shipped kernel before this experiment. Columns: split-quantize + GEMM flushed
(bench._graph_time) and the GEMM alone back to back on distinct weight copies (bench._b2b_time),
µs per call, beside cuBLAS FP8; "err" is the largest difference from the first variant's output
relative to its largest magnitude (the variants must agree: same products, another order).
Usage on the device: python3 scripts/frag_rows.py [Ms] [variants as tpw:pf:splitx,...]
"""
import sys
from dataclasses import replace

import torch

from oscquant import bench
from oscquant.kernels import ops

ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1,8").split(",")]
VARIANTS = [tuple(int(p) for p in v.split(":")) for v in
            (sys.argv[2] if len(sys.argv) > 2 else "1:0:1,1:2:1,1:4:1,1:8:1,2:0:1,2:0:2,2:4:1,2:4:2").split(",")]
print("| shape | M | FP8 flush / b2b | variant (tpw, pf, warps, split) | OSC+split flush | GEMM b2b | weight TB/s b2b | "
      "× FP8 flush | × FP8 b2b | err |\n" + "|---" * 10 + "|")
for c in bench.sweep_cases(ms):
    kw, x, m, n = c.kw, c.x, c.m, c.n
    fw = kw.frag
    w_bytes = 4 * (fw.words.numel() + fw.exps.numel())
    f8 = bench._graph_time(c.fp8)
    f8_b2b = bench._b2b_time(c.fp8, c.weight_f8.clone, n * c.k_in)
    base = ops.frag_config(m, n, kw.k_main)
    xo, a, sa = ops.split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", base.mode, kw.k_main)
    first = None
    for tpw, pf, splitx in VARIANTS:
        cfg = replace(base, tpw=tpw, prefetch=pf, bn=base.bn * tpw,
                      split_k=min(16, max(1, base.split_k * splitx)))
        y = ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, cfg).float()
        first = y if first is None else first
        err = ((y - first).abs().max() / first.abs().max()).item()
        t = bench._graph_time(lambda: ops.osc_linear_2d(x, kw, cfg))
        b = bench._b2b_time(lambda w: ops.osc_gemm(a, sa, w, xo, torch.bfloat16, cfg), lambda: bench.clone_weights(kw),
                            w_bytes)
        print(f"| {c.name} | {m} | {f8:.1f} / {f8_b2b:.1f} | {tpw}, {pf}, {cfg.warps}, {cfg.split_k} | {t:.1f} | "
              f"{b:.1f} | {w_bytes / b / 1e6:.2f} | {f8 / t:.2f} | {f8_b2b / b:.2f} | {err:.1e} |", flush=True)
