"""On the GPU: tile configs of the grouped MoE GEMM (kernels/moe.py), side by side in one process, at Qwen3-30B-A3B's
expert shapes (128 experts of 768, 8 a token; gate_up 1536 x 2048 in MXFP4 with 128 outlier channels, down 2048 x 768
in FP8), each projection's split-quantize + grouped GEMM as one CUDA graph (bench._graph_time: L2 flushed, median µs)
on a uniform random routing; the transposed GEMM's tiles, then the plain FP8 GEMM over the tile table ("expanded":
4-bit experts' weights expanded to e4m3 first; FP8 experts need no expansion, so for down it is the plain GEMM alone). Beside them BF16 torch._grouped_mm on the same pairs sorted by expert (what transformers'
grouped_mm experts run), where this torch has it.
Usage: python3 scripts/moe_tiles.py 2048,16384,65536"""
import sys

import torch

from oscquant.bench import _graph_time
from oscquant.config import LayerScheme
from oscquant.kernels import moe, ops
from oscquant.linear import OSCLinear

E, K_PER_TOKEN = 128, 8
SHAPES = [("gate_up", 1536, 2048, "mxfp4", 128), ("down", 2048, 768, "fp8", 0)]
# (pairs a tile, weight rows, warps, path): "t" the transposed GEMM (folded e4m3 weights for MXFP4), "x" the experts'
# weights expanded to e4m3 first, then the plain FP8 GEMM ("xo": the expansion launched beside split-quantize)
CONFIGS = [(16, 64, 4, "t"), (32, 64, 4, "t"), (64, 64, 4, "t"), (64, 128, 8, "t"), (128, 128, 8, "t"),
           (64, 128, 4, "xo"), (64, 128, 8, "xo"), (128, 128, 8, "x"), (128, 128, 8, "xo"), (128, 256, 8, "xo")]


def experts(n, k_in, fmt, k):
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(E):
        lin = torch.nn.Linear(k_in, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        layers.append(OSCLinear.from_linear(lin, LayerScheme(fmt, k), torch.randperm(k_in, generator=g)[:k]))
    return layers


pairs_list = [int(v) for v in sys.argv[1].split(",")]
print("| projection | pairs | BF16 grouped_mm µs | " + " | ".join(f"{dict(t='', x='expanded ', xo='expanded, overlapped ')[x]}{m}x{bn} ({w} warps) µs"
                                                          for m, bn, w, x in CONFIGS)
      + " | best × BF16 |\n|---|---|---|" + "---|" * (len(CONFIGS) + 1))
for name, n, k_in, fmt, k in SHAPES:
    layers = experts(n, k_in, fmt, k)
    stacked = moe.stack_experts(layers)
    w_bf16 = torch.randn(E, k_in, n, device="cuda", dtype=torch.bfloat16) * 0.02
    for p in pairs_list:
        t = p // K_PER_TOKEN
        top = torch.stack([torch.randperm(E, device="cuda")[:K_PER_TOKEN] for _ in range(t)]).int()
        x = torch.randn(t if name == "gate_up" else p, k_in, device="cuda", dtype=torch.bfloat16)
        times = []
        for m, bn, warps, path in CONFIGS:
            r = moe.route(top, E, m)
            rows = r.tokens if name == "gate_up" else torch.arange(p, device="cuda", dtype=torch.int32)
            if path.startswith("x"):
                cfg = ops.GemmConfig(m, bn, 1, True, warps, 4 if m * bn <= 128 * 128 else 3, expand=fmt != "fp8",
                                     pdl=path == "xo")
            else:
                cfg = ops.GemmConfig(m, bn, 1, fmt != "int4", warps, 4 if m * bn <= 64 * 64 else 3, swap=True,
                                     fold=fmt == "mxfp4")
            times.append(_graph_time(lambda: moe.grouped_linear(x, rows, r, stacked, cfg)))
        bf16 = "n/a"
        if hasattr(torch, "_grouped_mm"):
            r = moe.route(top, E, 16)
            counts = torch.zeros(E, device="cuda", dtype=torch.int32).scatter_add_(0, r.experts.long(),
                                                                                   torch.ones_like(r.experts))
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            xs = x[r.tokens.long()] if name == "gate_up" else x
            bf16 = _graph_time(lambda: torch._grouped_mm(xs, w_bf16, offs=offs))
        best = min(times)
        ratio = f"{bf16 / best:.2f}" if bf16 != "n/a" else "n/a"
        bf = f"{bf16:.1f}" if bf16 != "n/a" else bf16
        print(f"| {name} | {p} | {bf} | " + " | ".join(f"{v:.1f}" for v in times) + f" | {ratio} |", flush=True)
