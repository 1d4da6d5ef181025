"""On the GPU: NVFP4 and INT4 with group scales from 1 to a few hundred tokens, OSC + split-quantize on the routes
without the wgmma GEMM (gemm_config(wgmma=False): the transposed GEMM up to 64 tokens, then cuBLAS's FP16 GEMM or our
plain GEMM on weights expanded to FP16) against the wgmma GEMM on FP16 operands (codes unpacked in registers,
wgmma_config(f16=True)) with 64 and 128 weight rows a tile, and cuBLAS BF16; one process, CUDA graphs, L2 flushed,
k = 128 outlier channels. "now": what gemm_config picks. "err": the faster wgmma tile's output against the other
route's, relative to its norm.
Usage: python3 scripts/nvfp4_wgmma.py [Ms] [formats: nvfp4,int4_g128]"""
import sys

import torch

from oscquant import bench
from oscquant.kernels import ops

ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1,8,16,32,64,96,128,192,256,512").split(",")]
fmts = (sys.argv[2] if len(sys.argv) > 2 else "nvfp4,int4_g128").split(",")
print("| format | shape | M | BF16 µs | other route | µs | wgmma 64 µs | wgmma 128 µs | best wgmma × other | "
      "best × BF16 | now | err |\n" + "|---" * 12 + "|")
for spec in fmts:
    for name, n, k_in, lin, kw in bench.format_layers(spec):
        fmt = kw.fmt
        for m in ms:
            x = torch.randn(m, k_in, device="cuda").to(torch.bfloat16)
            other = ops.gemm_config(m, n, kw.k_main, fmt, wgmma=False, group=kw.group)
            now = ops.gemm_config(m, n, kw.k_main, fmt, group=kw.group)
            wg = [ops.wgmma_config(m, n, kw.k_main, bn=bn, f16=True) for bn in (64, 128)]
            t_bf16 = bench._graph_time(lambda: x @ lin.weight.t())
            t_other = bench._graph_time(lambda: ops.osc_linear_2d(x, kw, other))
            t_wg = [bench._graph_time(lambda c=c: ops.osc_linear_2d(x, kw, c)) for c in wg]
            best = min(range(2), key=lambda i: t_wg[i])
            ya, yb = ops.osc_linear_2d(x, kw, wg[best]).float(), ops.osc_linear_2d(x, kw, other).float()
            picked = f"wgmma {now.bn}" if now.wgmma else now.path
            print(f"| {spec} | {name} | {m} | {t_bf16:.1f} | {other.path} | {t_other:.1f} | {t_wg[0]:.1f} | "
                  f"{t_wg[1]:.1f} | {t_other / t_wg[best]:.2f} | {t_bf16 / t_wg[best]:.2f} | {picked} | "
                  f"{((ya - yb).norm() / yb.norm()).item():.1e} |", flush=True)
