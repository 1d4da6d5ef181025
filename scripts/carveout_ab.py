"""On the GPU: does split-quantize's shared-memory carve-out decide whether the GEMM after it can start early?

split-quantize uses almost no shared memory, so the driver runs it with a small carve-out (more L1); a GEMM program
that needs 80+ KB of shared memory may then not fit beside it on the same SM until it finishes. This times, per row,
OSC + split-quantize with the launches not overlapped (off), overlapped from split-quantize's start (early) and from
its stores (late), then the same with split-quantize's compiled kernels asking for the largest shared-memory
carve-out (cuFuncSetCacheConfig PREFER_SHARED and the preferred-carve-out attribute at 100 %, as Triton does for
its own kernels above 48 KB), reset after each row. CUDA graphs; flushed = L2 flushed before each replay; back to
back (b2b) = a graph of calls on distinct weight copies, µs per call. k = 128.
Usage: python3 scripts/carveout_ab.py 16,32,64"""
import ctypes
import sys
from dataclasses import replace

from oscquant import bench
from oscquant.kernels import ops
from oscquant.kernels import triton_osc as K

CUDA = ctypes.CDLL("libcuda.so.1")
PREFER_NONE, PREFER_SHARED, CARVEOUT = 0, 1, 9  # CUfunc_cache values; CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT


def split_carveout(shared: bool) -> int:
    """Set (or reset) the carve-out preference of every compiled split-quantize kernel; returns how many."""
    n = 0
    for cache in K.split_quantize_kernel.device_caches.values():
        for kernel in cache[0].values():
            kernel = kernel.result() if hasattr(kernel, "result") else kernel  # a future while compiling asynchronously
            kernel._init_handles()
            fn = ctypes.c_void_p(kernel.function)
            assert CUDA.cuFuncSetCacheConfig(fn, PREFER_SHARED if shared else PREFER_NONE) == 0
            assert CUDA.cuFuncSetAttribute(fn, CARVEOUT, 100 if shared else -1) == 0
            n += 1
    return n


ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "16,32,64").split(",")]
LEVELS = {"off": dict(pdl=False, pdl_late=False), "early": dict(pdl=True, pdl_late=False),
          "late": dict(pdl=True, pdl_late=True)}
names = [f"{n}{'+shared' if s else ''}" for s in (False, True) for n in LEVELS]
print("| shape | M | path | flushed " + " / ".join(names) + " | b2b " + " / ".join(names) + " |\n" + "|---" * 5 + "|")
for c in bench.sweep_cases(ms):
    kw, x = c.kw, c.x
    shipped = ops.gemm_config(c.m, c.n, kw.k_main, kw.fmt, frag=kw.frag is not None, wgmma=ops.wgmma_runs(x))
    w_bytes = kw.codes.numel() + kw.rel_exp.numel()
    flushed, b2b = [], []
    for shared in (False, True):
        for knobs in LEVELS.values():
            cfg = replace(shipped, **knobs)
            ops.osc_linear_2d(x, kw, cfg)  # compiled before the carve-out is set
            split_carveout(shared)
            flushed.append(bench._graph_time(lambda: ops.osc_linear_2d(x, kw, cfg)))
            b2b.append(bench._b2b_time(lambda w: ops.osc_linear_2d(x, w, cfg), lambda: bench.clone_weights(kw), w_bytes))
            split_carveout(False)
    print(f"| {c.name} | {c.m} | {shipped.path} | " + " / ".join(f"{t:.1f}" for t in flushed) + " | "
          + " / ".join(f"{t:.1f}" for t in b2b) + " |", flush=True)
