"""On the GPU: where the wgmma GEMM's time goes. Times the GEMM alone (operands split beforehand; CUDA graph,
L2 flushed before each replay) under its config with parts of the main loop cut out (the probe bits of
ops._wgmma_gemm; the cut versions compute wrong values): 1 no unpack (the MMAs read a stale weight buffer), 2 no MMAs, 3 neither
(TMA ring, barriers and epilogue only), 4 no exponent loads; and with other ring depths.
Usage on the device: python3 scripts/wgmma_probe.py [Ms] > $OUT/wgmma_probe.md
"""
import dataclasses
import sys

import torch

from oscquant import bench
from oscquant.kernels import ops

ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "64,256,1024").split(",")]
PROBES = [0, 1, 2, 3, 4]
STAGES = [2, 3, 6]
print("| shape | M | config | steps a program | programs | GEMM µs | no unpack | no MMA | neither | no exp loads | "
      + "".join(f"{s} stages | " for s in STAGES) + "\n" + "|---" * (10 + len(STAGES)) + "|")
for c in bench.sweep_cases(ms):
    kw, x, m, n = c.kw, c.x, c.m, c.n
    cfg = ops.layer_config(x, kw)
    if not cfg.wgmma:
        cfg = ops.wgmma_config(m, n, kw.k_main, bn=64)
    cfg = dataclasses.replace(cfg, reg_a=False)  # the probe bits cut parts of the shared-memory path
    xo, a, sa = ops.split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", cfg.mode, kw.k_main)
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    cells = []
    for p in PROBES:
        cells.append(bench._graph_time(lambda: ops._wgmma_gemm(a, sa, kw, xo, torch.bfloat16, cfg, out, probe=p)))
    for st in STAGES:
        c2 = dataclasses.replace(cfg, stages=st)
        try:
            cells.append(bench._graph_time(lambda: ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, c2, out=out)))
        except Exception as e:  # shared memory
            print(f"<!-- {c.name} {m} stages {st}: {str(e)[:80]} -->")
            cells.append(float("nan"))
    steps = -(-kw.k_main // 128 // cfg.split_k)
    progs = -(-n // cfg.bn) * -(-m // cfg.bm) * cfg.split_k
    print(f"| {c.name} | {m} | {cfg.bn}x{cfg.bm} w{cfg.warps} s{cfg.split_k} st{cfg.stages} | {steps} | {progs} | "
          + " | ".join(f"{t:.1f}" for t in cells) + " |", flush=True)
