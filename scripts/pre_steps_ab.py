"""On the GPU: the fragment GEMM (MXFP4, up to 8 tokens) with its first steps of weights pulled into L2 before its PDL
wait (GemmConfig.pre_steps), side by side in one process: each (shape, M) under gemm_config's choice with pre_steps
0 (off) and the counts given, OSC + split-quantize as one CUDA graph, L2 flushed (lowest median of three rounds,
alternated) and back to back (a graph of calls on distinct weight copies, µs per call), and the outputs compared.
Usage on the device: python3 scripts/pre_steps_ab.py [Ms] [counts] > $OUT/pre_steps.md"""
import dataclasses
import sys

from oscquant import bench
from oscquant.kernels import ops

ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1,8").split(",")]
counts = [int(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "1,2,4,8").split(",")]
print("| shape | M | split-K | steps a program | off µs | " + " | ".join(f"{p} µs" for p in counts)
      + " | b2b off µs | " + " | ".join(f"b2b {p} µs" for p in counts) + " | max |Δ| / max |y| |")
print("|---|---|---|---|---|" + "---|" * len(counts) + "---|" + "---|" * len(counts) + "---|")
for c in bench.sweep_cases(ms):
    kw, x, m, n = c.kw, c.x, c.m, c.n
    base = ops.gemm_config(m, n, kw.k_main)
    if not base.frag:
        continue
    cfgs = [dataclasses.replace(base, pre_steps=p) for p in [0] + counts]
    flushed = [[] for _ in cfgs]
    for _ in range(3):
        for i, cfg in enumerate(cfgs):
            flushed[i].append(bench._graph_time(lambda: ops.osc_linear_2d(x, kw, cfg)))
    w_bytes = kw.frag.words.numel() * 4
    b2b = [bench._b2b_time(lambda w: ops.osc_linear_2d(x, w, cfg), lambda: bench.clone_weights(kw), w_bytes)
           for cfg in cfgs]
    ys = [ops.osc_linear_2d(x, kw, cfg).float() for cfg in cfgs]
    err = max(((y - ys[0]).abs().max() / ys[0].abs().max()).item() for y in ys[1:])
    steps = -(-kw.frag.steps // base.split_k)
    print(f"| {c.name} | {m} | {base.split_k} | {steps} | " + " | ".join(f"{min(t):.1f}" for t in flushed) + " | "
          + " | ".join(f"{t:.1f}" for t in b2b) + f" | {err:.1e} |", flush=True)
