"""On the GPU: the expansion path's FP8 GEMM alone (weights already expanded to e4m3): the shipped pointer-based
kernel under gemm_config's tiles beside the persistent TMA kernel (ops.gemm_f8) at the same tiles, without and with its
tail of narrower tiles (its default, and forced to 2 and 4 a tile), and cuBLAS (torch._scaled_mm with row-wise scales, then the BF16 branch as
addmm_), side by side in one process (CUDA graphs, L2 flushed; k = 128). "err": the largest difference from the
shipped kernel's output, relative to its norm.
Usage: python3 scripts/expand_ab.py Ms"""
import sys
from dataclasses import replace

import torch

from oscquant import bench
from oscquant.kernels import ops

ms = [int(v) for v in sys.argv[1].split(",")]
cols = ["shipped", "persistent", "+tail cut", "cut 2", "cut 4", "cuBLAS + branch"]
print("| shape | M | tiles | cuBLAS FP8 alone | " + " | ".join(cols) + " | best × shipped | err |\n"
      + "|---" * (6 + len(cols)) + "|")
for c in bench.sweep_cases(ms):
    kw, x = c.kw, c.x
    cfg = ops.layer_config(x, kw)
    if not cfg.expand:
        continue
    xo, a, sa = ops.split_quantize(x, kw.keep, kw.outlier_idx, kw.fmt, cfg.mode, kw.k_main)
    w8 = ops.decode_weights(kw, True)
    kw8 = replace(kw, fmt="fp8", codes=w8, rel_exp=None, row_scale=kw.row_scale * 0.5, frag=None)
    plain = replace(cfg, expand=False, pdl=False)

    def f8(**kv):
        return lambda: ops.gemm_f8(a, sa, w8, kw8.row_scale, xo, kw.w_outlier, kw.bias, torch.bfloat16, cfg.bm, cfg.bn,
                                   cfg.bk, cfg.warps, cfg.stages, **kv)

    def cublas():
        y = torch._scaled_mm(a, w8.T, scale_a=sa[:, None], scale_b=kw8.row_scale[None, :], out_dtype=torch.bfloat16)
        return y.addmm_(xo, kw.w_outlier.T)
    calls = dict(zip(cols, [lambda: ops.osc_gemm(a, sa, kw8, xo, torch.bfloat16, plain), f8(sub=1), f8(), f8(sub=2),
                            f8(sub=4), cublas]))
    ref = calls["shipped"]().float()
    times, errs = {}, []
    for name, fn in calls.items():
        try:
            errs.append(((fn().float() - ref).norm() / ref.norm()).item())
            times[name] = bench._graph_time(fn)
        except Exception as e:  # a config that does not compile or launch: say so, go on
            print(f"<!-- {c.name} {c.m} {name}: {type(e).__name__}: {str(e)[:200]} -->", flush=True)
            times[name] = float("nan")
    best = min(t for name, t in times.items() if t == t and name not in ("shipped", "cuBLAS + branch"))
    tiles = -(-c.m // cfg.bm) * -(-c.n // cfg.bn)
    print(f"| {c.name} | {c.m} | {tiles} ({cfg.bm}x{cfg.bn}) | {bench._graph_time(c.fp8):.1f} | "
          + " | ".join(f"{times[n]:.1f}" for n in cols) + f" | {times['shipped'] / best:.2f} | {max(errs):.1e} |",
          flush=True)
