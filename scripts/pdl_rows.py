"""On the GPU: OSC + split-quantize under gemm_config's choice, launched one after the other (off), overlapped from
the start of split-quantize's programs (early), or overlapped from when they have issued their stores (late;
kernels/overlap.py), side by side in one process, beside cuBLAS FP8 (CUDA graphs; flushed = L2 flushed before each
replay, back to back = a graph of calls on distinct weight copies, µs per call). k = 128 planted channels.

With "carveout", each way is timed twice: with split-quantize's compiled kernels set to the largest shared-memory
carve-out (what ops.split_quantize asks for when launched overlapped) and reset to the driver's default, set
explicitly before each timing.
Usage: python3 scripts/pdl_rows.py 1,8,16,64 [carveout]"""
import sys
from dataclasses import replace

from oscquant import bench
from oscquant.kernels import ops
from oscquant.kernels import triton_osc as K
from oscquant.kernels.overlap import set_shared_carveout


def split_carveout(shared: bool) -> None:
    """Set (or reset to the driver's default) the carve-out preference of every compiled split-quantize kernel."""
    for cache in K.split_quantize_kernel.device_caches.values():
        for kernel in cache[0].values():
            kernel = kernel.result() if hasattr(kernel, "result") else kernel  # a future while compiling asynchronously
            assert set_shared_carveout(kernel, shared)


ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1,8").split(",")]
carves = (False, True) if "carveout" in sys.argv[2:] else (None,)  # None: as ops.split_quantize leaves it
LEVELS = {"off": dict(pdl=False, pdl_late=False), "early": dict(pdl=True, pdl_late=False),
          "late": dict(pdl=True, pdl_late=True)}
names = [f"{n}{'' if s is None else ' +shared' if s else ' default'}" for s in carves for n in LEVELS]
print(f"| shape | M | path (shipped pdl) | FP8 | OSC+split, {' / '.join(names)} | × FP8 (best) | b2b FP8 | "
      f"b2b OSC, {' / '.join(names)} | b2b × FP8 (best) |\n" + "|---" * 9 + "|")
for c in bench.sweep_cases(ms):
    kw, x = c.kw, c.x
    shipped = ops.layer_config(x, kw)
    w_bytes = kw.codes.numel() + kw.rel_exp.numel()
    fp8, b2b_fp8 = bench._graph_time(c.fp8), bench._b2b_time(c.fp8, c.weight_f8.clone, c.n * c.k_in)
    flushed, b2b = [], []
    for shared in carves:
        for knobs in LEVELS.values():
            cfg = replace(shipped, **knobs)
            ops.osc_linear_2d(x, kw, cfg)  # compiled, and the carve-out set where split_quantize sets it
            if shared is not None:
                split_carveout(shared)
            flushed.append(bench._graph_time(lambda: ops.osc_linear_2d(x, kw, cfg)))
            b2b.append(bench._b2b_time(lambda w: ops.osc_linear_2d(x, w, cfg), lambda: bench.clone_weights(kw), w_bytes))
    mode = "late" if shipped.pdl_late else "early" if shipped.pdl else "off"
    print(f"| {c.name} | {c.m} | {shipped.path} ({mode}) | {fp8:.1f} | " + " / ".join(f"{t:.1f}" for t in flushed)
          + f" | {fp8 / min(flushed):.2f} | {b2b_fp8:.1f} | " + " / ".join(f"{t:.1f}" for t in b2b)
          + f" | {b2b_fp8 / min(b2b):.2f} |", flush=True)
