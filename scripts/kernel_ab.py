"""On the GPU: a kernel change side by side with the version before it, in one process. The earlier
versions of frag_gemm.py and wgmma_gemm.py are copied beside them as oscquant/kernels/_ab_frag_gemm.py and
_ab_wgmma_gemm.py (e.g. `git show HEAD~1:oscquant/kernels/frag_gemm.py > oscquant/kernels/_ab_frag_gemm.py`;
same kernel signatures); each (shape, M) is timed under gemm_config's choice with the current and the
earlier kernels, alternating three times (OSC + split-quantize, CUDA graph, L2 flushed; the lowest median),
and the outputs compared.
Usage on the device: python3 scripts/kernel_ab.py [Ms] > $OUT/kernel_ab.md
"""
import importlib
import sys

from oscquant import bench
from oscquant.kernels import frag_gemm, ops, wgmma_gemm

ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1,8,16,64,256,1024").split(",")]
NAMES = {frag_gemm: ("_ab_frag_gemm", "osc_frag_gemm_kernel"), wgmma_gemm: ("_ab_wgmma_gemm", "osc_wgmma_gemm_kernel")}
new = {mod: getattr(mod, k) for mod, (_, k) in NAMES.items()}
old = {mod: getattr(importlib.import_module(f"oscquant.kernels.{f}"), k) for mod, (f, k) in NAMES.items()}


def use(kernels):
    for mod, (_, k) in NAMES.items():
        setattr(mod, k, kernels[mod])


print("| shape | M | path | earlier µs | now µs | now × earlier | max |Δ| / max |y| |\n|---|---|---|---|---|---|---|")
for c in bench.sweep_cases(ms):
    kw, x, m, n = c.kw, c.x, c.m, c.n
    cfg = ops.gemm_config(m, n, kw.k_main)
    path = "wgmma" if cfg.wgmma else "frag" if cfg.frag else None
    if path is None:
        continue
    times = {"old": [], "new": []}
    for _ in range(3):
        for tag, ks in (("old", old), ("new", new)):
            use(ks)
            times[tag].append(bench._graph_time(lambda: ops.osc_linear_2d(x, kw, cfg)))
    outs = {}
    for tag, ks in (("old", old), ("new", new)):
        use(ks)
        outs[tag] = ops.osc_linear_2d(x, kw, cfg).float()
    t0, t1 = min(times["old"]), min(times["new"])
    err = ((outs["new"] - outs["old"]).abs().max() / outs["old"].abs().max()).item()
    print(f"| {c.name} | {m} | {path} | {t0:.1f} | {t1:.1f} | {t0 / t1:.3f} | {err:.1e} |", flush=True)
