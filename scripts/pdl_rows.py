"""On the GPU: OSC + split-quantize under gemm_config's choice, launched one after the other, overlapped from
the start of split-quantize's programs (early), or overlapped from when they have issued their stores (late;
kernels/overlap.py), side by side in one process, beside cuBLAS FP8 (CUDA graphs; flushed = L2 flushed before each
replay, back to back = a graph of calls on distinct weight copies, µs per call). k = 128 planted channels.
Usage: python3 scripts/pdl_rows.py 1,8,16,64"""
import sys
from dataclasses import replace

from oscquant import bench
from oscquant.kernels import ops

ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1,8").split(",")]
LEVELS = {"off": dict(pdl=False, pdl_late=False), "early": dict(pdl=True, pdl_late=False),
          "late": dict(pdl=True, pdl_late=True)}
print("| shape | M | path (shipped pdl) | FP8 | OSC+split, off / early / late | × FP8 (best) | b2b FP8 | "
      "b2b OSC, off / early / late | b2b × FP8 (best) |\n" + "|---" * 9 + "|")
for c in bench.sweep_cases(ms):
    kw, x = c.kw, c.x
    shipped = ops.gemm_config(c.m, c.n, kw.k_main, kw.fmt, frag=kw.frag is not None, wgmma=ops.wgmma_runs(x))
    w_bytes = kw.codes.numel() + kw.rel_exp.numel()
    cells = {"fp8": bench._graph_time(c.fp8),
             "b2b_fp8": bench._b2b_time(c.fp8, c.weight_f8.clone, c.n * c.k_in)}
    for name, knobs in LEVELS.items():
        cfg = replace(shipped, **knobs)
        cells[name] = bench._graph_time(lambda: ops.osc_linear_2d(x, kw, cfg))
        cells["b2b", name] = bench._b2b_time(lambda w: ops.osc_linear_2d(x, w, cfg), lambda: bench.clone_weights(kw),
                                             w_bytes)
    flushed = [cells[p] for p in LEVELS]
    b2b = [cells["b2b", p] for p in LEVELS]
    print(f"| {c.name} | {c.m} | {shipped.path} ({'late' if shipped.pdl_late else 'early' if shipped.pdl else 'off'}) | "
          f"{cells['fp8']:.1f} | " + " / ".join(f"{t:.1f}" for t in flushed)
          + f" | {cells['fp8'] / min(flushed):.2f} | {cells['b2b_fp8']:.1f} | " + " / ".join(f"{t:.1f}" for t in b2b)
          + f" | {cells['b2b_fp8'] / min(b2b):.2f} |", flush=True)
