"""Host time of one OSC layer call against its GPU time, on Qwen3-8B layer shapes (stacked q/k/v and gate/up, o, down
on FP8): per call, the wall clock of a loop of calls that do not wait for the GPU (the host's cost, once it exceeds
the GPU's) and a CUDA graph replay of the same calls (the GPU's cost alone), for the layer's whole forward, the
custom op, the kernels' Python entry (osc_linear_2d), and BF16 nn.Linear beside them; then cProfile of the layer.

    python3 scripts/host_overhead.py [--m 1,512] [--out out/host.txt]
"""
import argparse
import cProfile
import io
import pstats
import time

import torch
from torch import nn

from oscquant.config import LayerScheme
from oscquant.kernels import ops
from oscquant.linear import OSCLinear

SHAPES = {"qkv": (6144, 4096, "mxfp4"), "o": (4096, 4096, "mxfp4"), "gate+up": (24576, 4096, "mxfp4"),
          "down (fp8)": (4096, 12288, "fp8")}


def host_us(fn, calls=200):
    """µs a call spent on the host: the clock stops before waiting for the GPU."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return 1e6 * host / calls


def graph_us(fn, calls=50):
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    g.replay()
    t1.record()
    torch.cuda.synchronize()
    return 1e3 * t0.elapsed_time(t1) / calls


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--m", default="1,512")
    p.add_argument("--out", default="out/host.txt")
    a = p.parse_args()
    lines = ["| layer | M | path | host µs a call | GPU µs a call (graph) |", "|---|---|---|---|---|"]
    prof_text = []
    for name, (n, k, fmt) in SHAPES.items():
        lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        layer = OSCLinear.from_linear(lin, LayerScheme(fmt),
                                      torch.arange(0, 1024, 8) if fmt != "fp8" else torch.arange(0)).cuda()
        kw = ops.layer_weights(layer)
        for m in map(int, a.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            paths = {
                "OSCLinear forward": lambda: layer(x),
                "custom op": lambda: ops.osc_linear_2d_op(x, kw),
                "osc_linear_2d": lambda: ops.osc_linear_2d(x, kw),
                "BF16 nn.Linear": lambda: lin(x),
            }
            for path, fn in paths.items():
                lines.append(f"| {name} | {m} | {path} | {host_us(fn):.1f} | {graph_us(fn):.1f} |")
            cp = cProfile.Profile()
            cp.enable()
            for _ in range(100):
                layer(x)
            cp.disable()
            torch.cuda.synchronize()
            s = io.StringIO()
            pstats.Stats(cp, stream=s).sort_stats("tottime").print_stats(18)
            prof_text.append(f"-- {name}, M={m}: 100 OSCLinear forwards, by own time\n{s.getvalue()}")
            print(*lines[-5:], sep="\n", flush=True)
    text = "\n".join(lines) + "\n\n" + "\n".join(prof_text)
    with open(a.out, "w") as f:
        f.write(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
