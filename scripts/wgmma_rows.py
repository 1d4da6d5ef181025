"""On the GPU: the Gluon wgmma GEMM (kernels/wgmma_gemm.py) beside the shipped config, side by side in one
process (CUDA graphs, L2 flushed before each replay; k = 128 planted channels). For each shape and M:
cuBLAS BF16 and FP8 (row-wise scales), OSC + split-quantize under gemm_config's choice, and under each
wgmma variant (BN weight rows, warps, BT tokens, split-K; None = wgmma_config's choice), µs; "err" is
the variant's difference from the shipped config's output relative to its norm.
Usage on the device: python3 scripts/wgmma_rows.py [Ms] [variants] > $OUT/wgmma_rows.md
variants: comma-separated BN.warps.BT.split, "-" for wgmma_config's choice (e.g. 64.8.-.-,128.16.256.2); a fifth
field "a" gives wgmma the unpacked weights from registers (64.4.128.-.a)
"""
import sys

from oscquant import bench
from oscquant.kernels import ops

ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "16,64,256,1024,4096").split(",")]
VARIANTS = [tuple(None if f == "-" else int(f) for f in v.split(".")[:4]) + (v.endswith(".a"),) for v in
            (sys.argv[2] if len(sys.argv) > 2 else "64.4.-.-,64.4.64.-,128.8.-.-,128.8.256.-,64.4.256.-").split(",")]
print("| shape | M | BF16 | FP8 | shipped (config) | wgmma variants (BN, warps, BT, split): µs | best × shipped | "
      "best × BF16 | best × FP8 | err |\n" + "|---" * 10 + "|")
for c in bench.sweep_cases(ms):
    kw, x, m, n = c.kw, c.x, c.m, c.n
    bf16, fp8 = bench._graph_time(c.bf16), bench._graph_time(c.fp8)
    ship_cfg = ops.layer_config(x, kw)
    ship = bench._graph_time(lambda: ops.osc_linear_2d(x, kw, ship_cfg))
    ref = ops.osc_linear_2d(x, kw, ship_cfg).float()
    cells, errs = [], []
    for bn, warps, bt, split, reg_a in VARIANTS:
        cfg = ops.wgmma_config(m, n, kw.k_main, bn=bn, bt=bt, warps=warps, split_k=split, reg_a=reg_a)
        y = ops.osc_linear_2d(x, kw, cfg).float()
        errs.append(((y - ref).norm() / ref.norm()).item())
        cells.append((bench._graph_time(lambda: ops.osc_linear_2d(x, kw, cfg)), cfg))
    best = min(t for t, _ in cells)
    tag = ship_cfg.path
    print(f"| {c.name} | {m} | {bf16:.1f} | {fp8:.1f} | {ship:.1f} ({tag} {ship_cfg.bm}x{ship_cfg.bn} s{ship_cfg.split_k}) | "
          + ", ".join(f"{t:.1f} ({cfg.bn},{cfg.warps},{cfg.bm},{cfg.split_k}{',a' if cfg.reg_a else ''})" for t, cfg in cells)
          + f" | {ship / best:.2f} | {bf16 / best:.2f} | {fp8 / best:.2f} | {max(errs):.1e} |", flush=True)
