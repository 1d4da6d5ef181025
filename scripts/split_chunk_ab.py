"""On the GPU: split-quantize reading long rows (K > ops.CHUNK_K) whole against in chunks, side by side in one
process (CUDA graphs, L2 flushed, µs): split-quantize alone on 8B down's K = 12288 (MXFP4 operands, k = 128), then
OSC + split on the 8B down layer under gemm_config's config, flushed and back to back, and at 9-64 tokens also with
the GEMM released from split-quantize's start (early) instead of late.
Usage: python3 scripts/split_chunk_ab.py [Ms for the layer, default 1,8,16,32,64,256,1024,4096]"""
import sys
from dataclasses import replace

import torch

from oscquant import bench
from oscquant.bench import HBM_BYTES_PER_S, _graph_time
from oscquant.kernels import ops
from oscquant.kernels.triton_osc import MODE_F8, MODE_F16

CHUNK = ops.CHUNK_K
WHOLE = 1 << 30  # ops.CHUNK_K so large that no row is chunked


def chunked(on: bool) -> None:
    ops.CHUNK_K = CHUNK if on else WHOLE


ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1,8,16,32,64,256,1024,4096").split(",")]
case = next(bench.sweep_cases([1], shapes=[("8B down", 4096, 12288)]))
kw = case.kw
print("split-quantize alone, K = 12288\n\n| M | mode | rows | whole | chunks | whole / chunks | chunks, % of memory roofline |\n"
      "|---|---|---|---|---|---|---|")
for m in (1, 16, 64, 256, 1024, 4096, 16384):
    x = torch.randn(m, 12288, device="cuda").to(torch.bfloat16)
    for mode, name in ((MODE_F16, "f16"), (MODE_F8, "e4m3")):
        if m >= 1024 and mode == MODE_F16:
            continue
        for rows in ((None,) if m < 1024 else (None, 1, 2, 4)):
            t = []
            for on in (False, True):
                chunked(on)
                t.append(_graph_time(lambda: ops.split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", mode, kw.k_main,
                                                                rows=rows)))
            nbytes = m * 12288 * 2 + m * kw.k_main * (2 if mode == MODE_F16 else 1) + m * 128 * 2
            print(f"| {m} | {name} | {rows or 'default'} | {t[0]:.1f} | {t[1]:.1f} | {t[0] / t[1]:.2f} | "
                  f"{100 * nbytes / HBM_BYTES_PER_S / (t[1] * 1e-6):.0f} |", flush=True)

print("\nOSC + split, 8B down (4096 x 12288), k = 128: flushed, then back to back (µs per call)\n\n"
      "| M | path (release) | FP8 | whole | chunks | chunks, early | b2b FP8 | b2b whole | b2b chunks | b2b chunks, early |\n"
      "|---|---|---|---|---|---|---|---|---|---|")
w_bytes = kw.codes.numel() + kw.rel_exp.numel()
for c in bench.sweep_cases(ms, shapes=[("8B down", 4096, 12288)]):
    x = c.x
    cfg = ops.layer_config(x, kw)
    runs = [(False, cfg), (True, cfg)] + ([(True, replace(cfg, pdl_late=False))] if cfg.pdl_late and c.m <= 64 else [])
    flushed, b2b = [], []
    for on, cf in runs:
        chunked(on)
        flushed.append(_graph_time(lambda: ops.osc_linear_2d(x, c.kw, cf)))
        b2b.append(bench._b2b_time(lambda w: ops.osc_linear_2d(x, w, cf), lambda: bench.clone_weights(c.kw), w_bytes))
    pad = [float("nan")] * (3 - len(runs))
    release = "late" if cfg.pdl_late else "early" if cfg.pdl else "off"
    print(f"| {c.m} | {cfg.path} ({release}) | {_graph_time(c.fp8):.1f} | "
          + " | ".join(f"{t:.1f}" for t in flushed + pad)
          + f" | {bench._b2b_time(c.fp8, c.weight_f8.clone, c.n * c.k_in):.1f} | "
          + " | ".join(f"{t:.1f}" for t in b2b + pad) + " |", flush=True)
chunked(True)
