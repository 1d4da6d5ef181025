"""On the GPU: OSC + split-quantize under gemm_config's choice beside gemm_config(wgmma=False) (the paths it
would take without the wgmma GEMM), side by side in one process (CUDA graphs, L2 flushed; k = 128 planted
channels), with cuBLAS BF16 and FP8; "err" is the two outputs' difference relative to the norm.
Usage: python3 scripts/route_ab.py [Ms] [shape names, comma-separated; default all Qwen3 shapes]"""
import sys

from oscquant import bench
from oscquant.kernels import ops

ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "256,512,1024").split(",")]
names = sys.argv[2].split(",") if len(sys.argv) > 2 else None
shapes = [s for s in bench.qwen3_shapes() if names is None or s[0] in names]


print("| shape | M | BF16 | FP8 | OSC+split, gemm_config | path | wgmma=False | path | × | err |\n" + "|---" * 10 + "|")
for c in bench.sweep_cases(ms, shapes=shapes):
    kw, x = c.kw, c.x
    a, b = ops.layer_config(x, kw), ops.gemm_config(c.m, c.n, kw.k_main, wgmma=False)
    ta = bench._graph_time(lambda: ops.osc_linear_2d(x, kw, a))
    tb = bench._graph_time(lambda: ops.osc_linear_2d(x, kw, b))
    ya, yb = ops.osc_linear_2d(x, kw, a).float(), ops.osc_linear_2d(x, kw, b).float()
    print(f"| {c.name} | {c.m} | {bench._graph_time(c.bf16):.1f} | {bench._graph_time(c.fp8):.1f} | {ta:.1f} | {a.path} | "
          f"{tb:.1f} | {b.path} | {tb / ta:.2f} | {((ya - yb).norm() / yb.norm()).item():.1e} |", flush=True)
