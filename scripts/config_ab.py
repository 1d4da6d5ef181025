"""On the GPU: OSC + split-quantize under gemm_config's choice beside the same config with fields changed, side by
side in one process (CUDA graphs, L2 flushed; k = 128 planted channels), with cuBLAS BF16 and FP8; "err" is the
largest difference of a variant's output from the shipped config's, relative to its norm.
Usage: python3 scripts/config_ab.py Ms [shape names, comma-separated, or "all"] [path to keep, or "any"] VARIANT...
a VARIANT is GemmConfig fields, e.g. "split_k=2" or "bm=64,bn=128,warps=4,stages=4". Example:
python3 scripts/config_ab.py 256,512,1024 all expand split_k=2"""
import sys
from dataclasses import replace

from oscquant import bench
from oscquant.kernels import ops


def fields(spec: str) -> dict:
    out = {}
    for item in spec.split(","):
        key, value = item.split("=")
        out[key] = value == "True" if value in ("True", "False") else int(value)
    return out


ms = [int(v) for v in sys.argv[1].split(",")]
names = None if sys.argv[2] == "all" else sys.argv[2].split(",")
path = sys.argv[3]
variants = {spec: fields(spec) for spec in sys.argv[4:]}
shapes = [s for s in bench.qwen3_shapes() if names is None or s[0] in names]
print("| shape | M | BF16 | FP8 | path | shipped | " + " | ".join(variants) + " | best × shipped | err |\n"
      + "|---" * (8 + len(variants)) + "|")
for c in bench.sweep_cases(ms, shapes=shapes):
    kw, x = c.kw, c.x
    shipped = ops.layer_config(x, kw)
    if path != "any" and shipped.path != path:
        continue
    cfgs = [shipped] + [replace(shipped, **f) for f in variants.values()]
    times = [bench._graph_time(lambda: ops.osc_linear_2d(x, kw, cfg)) for cfg in cfgs]
    ref = ops.osc_linear_2d(x, kw, shipped).float()
    err = max(((ops.osc_linear_2d(x, kw, cfg).float() - ref).norm() / ref.norm()).item() for cfg in cfgs[1:])
    print(f"| {c.name} | {c.m} | {bench._graph_time(c.bf16):.1f} | {bench._graph_time(c.fp8):.1f} | {shipped.path} | "
          + " | ".join(f"{t:.1f}" for t in times) + f" | {times[0] / min(times):.2f} | {err:.1e} |", flush=True)
