"""On the GPU: NVFP4 and INT4 with group scales above 64 tokens, OSC + split-quantize on the two FP16 expansion
routes side by side in one process (CUDA graphs, L2 flushed; k = 128 outlier channels): cuBLAS's FP16 GEMM into FP32
then epilogue_kernel (ops.CUBLAS_F16_CONFIG, at any M) against our plain GEMM on FP16 wgmma (gemm_config(cublas=False)), with
cuBLAS BF16 and row-wise FP8; "err" is the two routes' difference relative to the norm.
Usage: python3 scripts/f16_route.py [Ms] [formats: nvfp4,int4_g128]"""
import sys

import torch

from oscquant import bench
from oscquant.kernels import ops

ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "128,256,1024,4096").split(",")]
fmts = (sys.argv[2] if len(sys.argv) > 2 else "nvfp4,int4_g128").split(",")
print("| format | shape | M | BF16 µs | FP8 µs | ours (expand) µs | cuBLAS FP16 µs | cuBLAS × ours | cuBLAS × BF16 | err |\n"
      + "|---" * 10 + "|")
for spec in fmts:
    for name, n, k_in, lin, kw in bench.format_layers(spec):
        fmt = kw.fmt
        w_f8 = lin.weight.to(torch.float8_e4m3fn)
        for m in ms:
            x = torch.randn(m, k_in, device="cuda").to(torch.bfloat16)
            ours, cub = ops.gemm_config(m, n, kw.k_main, fmt, cublas=False, group=kw.group), ops.CUBLAS_F16_CONFIG
            assert ours.expand, ours
            t_bf16 = bench._graph_time(lambda: x @ lin.weight.t())
            x8, one_m, one_n = x.to(torch.float8_e4m3fn), torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
            t_fp8 = bench._graph_time(lambda: torch._scaled_mm(x8, w_f8.t(), scale_a=one_m, scale_b=one_n,
                                                               out_dtype=torch.bfloat16))
            t_ours = bench._graph_time(lambda: ops.osc_linear_2d(x, kw, ours))
            t_cub = bench._graph_time(lambda: ops.osc_linear_2d(x, kw, cub))
            ya, yb = ops.osc_linear_2d(x, kw, cub).float(), ops.osc_linear_2d(x, kw, ours).float()
            print(f"| {spec} | {name} | {m} | {t_bf16:.1f} | {t_fp8:.1f} | {t_ours:.1f} | {t_cub:.1f} | "
                  f"{t_ours / t_cub:.2f} | {t_bf16 / t_cub:.2f} | {((ya - yb).norm() / yb.norm()).item():.1e} |",
                  flush=True)
