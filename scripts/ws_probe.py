"""On the GPU: the warp-specialized wgmma GEMM beside the one-warpgroup kernel, GEMM alone (operands split
beforehand; CUDA graph, L2 flushed before each replay), each also with its unpack cut out (probe bit 1 of
ops._wgmma_gemm: wrong values, for timing; for the one-warpgroup kernel also bit 3, neither unpack nor MMA).
If the warp-specialized kernel without its unpack is much faster, the unpacking warps bound it.
Usage on the device: python3 scripts/ws_probe.py [Ms] > $OUT/ws_probe.md
"""
import sys

import torch

from oscquant import bench
from oscquant.kernels import ops

ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "256,1024").split(",")]
# (label, bn, bt, unpacking warps of the warp-specialized kernel or 0, probes)
VARIANTS = [("64x128", 64, 128, 0, (0, 1, 3)), ("64x128 ws4", 64, 128, 4, (0, 1)), ("64x128 ws8", 64, 128, 8, (0, 1)),
            ("128x128", 128, 128, 0, (0, 1, 3)), ("128x128 ws4", 128, 128, 4, (0, 1)),
            ("128x128 ws8", 128, 128, 8, (0, 1))]
print("| shape | M | " + " | ".join(f"{v[0]}{'' if p == 0 else ' p' + str(p)}" for v in VARIANTS for p in v[4]) + " |\n"
      + "|---" * (2 + sum(len(v[4]) for v in VARIANTS)) + "|")
for c in bench.sweep_cases(ms):
    kw, x, m, n = c.kw, c.x, c.m, c.n
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    cells = []
    for _, bn, bt, ws, probes in VARIANTS:
        cfg = ops.wgmma_config(m, n, kw.k_main, bn=bn, bt=bt, ws=ws)
        xo, a, sa = ops.split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", cfg.mode, kw.k_main)
        for p in probes:
            cells.append(bench._graph_time(lambda: ops._wgmma_gemm(a, sa, kw, xo, torch.bfloat16, cfg, out, probe=p)))
    print(f"| {c.name} | {m} | " + " | ".join(f"{t:.1f}" for t in cells) + " |", flush=True)
