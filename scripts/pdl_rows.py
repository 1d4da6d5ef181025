"""On the GPU: OSC + split-quantize with and without programmatic dependent launch (kernels/overlap.py),
side by side in one process, beside cuBLAS FP8 (CUDA graphs; flushed = L2 flushed before each replay,
back to back = a graph of calls on distinct weight copies, µs per call). k = 128 planted channels."""
import sys

from oscquant import bench
from oscquant.kernels import ops

ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1,8").split(",")]
LEVELS = (False, True)  # ops.PDL (used where the fragment GEMM runs: MXFP4, M <= 8)
print("| shape | M | FP8 | OSC+split, PDL off / on | × FP8 (best) | b2b FP8 | b2b OSC, PDL off / on | b2b × FP8 (best) |\n"
      + "|---" * 8 + "|")
for c in bench.sweep_cases(ms):
    kw, x = c.kw, c.x
    w_bytes = kw.codes.numel() + kw.rel_exp.numel()
    cells = {"fp8": bench._graph_time(c.fp8),
             "b2b_fp8": bench._b2b_time(c.fp8, c.weight_f8.clone, c.n * c.k_in)}
    for pdl in LEVELS:
        ops.PDL = pdl
        cells[pdl] = bench._graph_time(lambda: ops.osc_linear_2d(x, kw))
        cells["b2b", pdl] = bench._b2b_time(lambda w: ops.osc_linear_2d(x, w), lambda: bench.clone_weights(kw),
                                            w_bytes)
    flushed = [cells[p] for p in LEVELS]
    b2b = [cells["b2b", p] for p in LEVELS]
    print(f"| {c.name} | {c.m} | {cells['fp8']:.1f} | " + " / ".join(f"{t:.1f}" for t in flushed)
          + f" | {cells['fp8'] / min(flushed):.2f} | {cells['b2b_fp8']:.1f} | " + " / ".join(f"{t:.1f}" for t in b2b)
          + f" | {cells['b2b_fp8'] / min(b2b):.2f} |", flush=True)
