"""On the GPU: the prefill-range paths against a route through cuBLAS, side by side in one process (CUDA graphs, L2
flushed, µs; k = 128 planted channels).
- shipped: osc_linear_2d under gemm_config (split-quantize, then the wgmma, folded or expansion GEMM);
- cublas: split-quantize (e4m3 operands), the weights expanded to e4m3 (decode_weights), then the cuBLAS path of
  FP8-fallback layers (ops._cublas_gemm: torch._scaled_mm with row-wise scales, the BF16 branch added in place);
- fallback Triton / cublas: the FP8-fallback layer (no outlier channels) through split + the Triton FP8 GEMM
  (gemm_config(cublas=False)), or split + ops.CUBLAS_CONFIG (what gemm_config picks at 65-512 tokens where N >= 4096).
"err": relative difference of the cuBLAS route's output from the other one's.
Usage: python3 scripts/cublas_route.py 256,512,1024,2048,4096"""
import sys
from dataclasses import replace

import torch

from oscquant import bench
from oscquant.config import LayerScheme
from oscquant.kernels import ops
from oscquant.kernels.triton_osc import MODE_F8
from oscquant.linear import OSCLinear


def cublas_osc(x, kw):
    """A 4-bit layer through cuBLAS: its weights expanded to e4m3, which are twice the value (decode_weights)."""
    xo, a, sa = ops.split_quantize(x, kw.keep, kw.outlier_idx, kw.fmt, MODE_F8, kw.k_main)
    expanded = replace(kw, fmt="fp8", codes=ops.decode_weights(kw, True), rel_exp=None, row_scale=kw.row_scale * 0.5)
    return ops._cublas_gemm(a, sa, expanded, xo, x.dtype)


ms = [int(v) for v in sys.argv[1].split(",")]
print("| shape | M | BF16 | cuBLAS FP8 | path | shipped | cublas | × shipped | err | fallback Triton | fallback cublas "
      "| × Triton |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
fallback = {}
for c in bench.sweep_cases(ms):
    kw, x = c.kw, c.x
    if c.name not in fallback:  # one FP8-fallback layer per shape
        lin = torch.nn.Linear(c.k_in, c.n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        fallback[c.name] = ops.layer_weights(OSCLinear.from_linear(lin, LayerScheme("fp8"), torch.zeros(0, dtype=torch.long)))
    fb = fallback[c.name]
    triton_fb = ops.gemm_config(c.m, c.n, fb.k_main, "fp8", cublas=False)
    shipped = ops.layer_config(x, kw)
    t_ship = bench._graph_time(lambda: ops.osc_linear_2d(x, kw))
    t_cub = bench._graph_time(lambda: cublas_osc(x, kw))
    ref = ops.osc_linear_2d(x, kw).float()
    err = ((cublas_osc(x, kw).float() - ref).norm() / ref.norm()).item()
    t_fb = bench._graph_time(lambda: ops.osc_linear_2d(x, fb, triton_fb))
    t_fbc = bench._graph_time(lambda: ops.osc_linear_2d(x, fb, ops.CUBLAS_CONFIG))
    ref_fb = ops.osc_linear_2d(x, fb, triton_fb).float()
    err_fb = ((ops.osc_linear_2d(x, fb, ops.CUBLAS_CONFIG).float() - ref_fb).norm() / ref_fb.norm()).item()
    print(f"| {c.name} | {c.m} | {bench._graph_time(c.bf16):.1f} | {bench._graph_time(c.fp8):.1f} | {shipped.path} | "
          f"{t_ship:.1f} | {t_cub:.1f} | {t_ship / t_cub:.2f} | {max(err, err_fb):.1e} | {t_fb:.1f} | {t_fbc:.1f} | "
          f"{t_fb / t_fbc:.2f} |", flush=True)
