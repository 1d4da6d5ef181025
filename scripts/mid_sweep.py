"""Middle-M (9-2048 tokens) GEMM configs on the H200, side by side in one process.

Candidates: the transposed GEMM with e4m3 operands and the MX block factors folded into the weights
("fold": wgmma with the unpacked weights from registers, several token tiles, split-K) and
gemm_config's current choice ("now"). Each config is (operands, MP tokens a tile, BN weight rows a
tile, warps, stages, split-K). Times: the GEMM alone, CUDA graph, L2 flushed (bench._graph_time),
beside cuBLAS; split+GEMM is measured as one graph for "now" and is split-quantize's own time plus
the GEMM's for the others. Results: docs/bench/h200_mid_sweeps_2026-11-29.md.
Usage on the device: python3 scripts/mid_sweep.py [Ms] > $OUT/mid_sweep.md
"""

from __future__ import annotations

import sys

import torch

from oscquant.bench import _graph_time, sweep_cases
from oscquant.kernels.ops import GemmConfig, fold_config, gemm_config, osc_gemm, osc_linear_2d, split_quantize
from oscquant.kernels.triton_osc import MODE_F8

FOLD = [(64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3), (128, 128, 8, 3), (256, 128, 8, 3),
        (16, 64, 4, 3), (16, 64, 4, 4), (16, 128, 8, 3)]  # 16-token tiles for 9-16 tokens
CONFIGS = [("now", None), ("fold", "default")] + [("fold", c + (s,)) for c in FOLD for s in (1, 2, 4, 8)]


def config(m, n, k_pad, ops_, c):
    if ops_ == "now":
        return gemm_config(m, n, k_pad)
    if c == "default":  # fold_config's tiles for this M
        return fold_config(m, n, k_pad)
    mp, bn, warps, stages, split = c
    return GemmConfig(mp, bn, split, True, warps, stages, swap=True, fold=True)


def main(ms=(32, 64, 128, 256, 512, 1024, 2048), k=128):
    out = sys.stdout
    out.write("| shape | M | config (ops, MP, BN, warps, stages, split-K) | GEMM µs | split+GEMM µs | × BF16 (split+GEMM) |\n"
              "|---|---|---|---|---|---|\n")
    for case in sweep_cases(ms, k):
        name, m, x, kw = case.name, case.m, case.x, case.kw
        bf16 = _graph_time(case.bf16)
        out.write(f"| {name} | {m} | cuBLAS BF16 | {bf16:.1f} | | |\n")
        out.write(f"| {name} | {m} | cuBLAS FP8 (row-wise) | {_graph_time(case.fp8):.1f} | | |\n")
        xo, a, sa = split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", MODE_F8, kw.k_main)
        split = _graph_time(lambda: split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", MODE_F8, kw.k_main))
        out.write(f"| {name} | {m} | split-quantize (e4m3) | {split:.1f} | | |\n")
        for ops_, c in CONFIGS:
            cfg = config(m, case.n, kw.k_main, ops_, c)
            if cfg.swap and (cfg.bm > max(64, 2 * m) or (cfg.bm < min(m, 64)) or (kw.k_main // 128) // cfg.split_k < 4):
                continue  # token tiles far beyond M or below it, or fewer than 4 steps of K a split
            try:
                if ops_ == "now":
                    xo_, a_, sa_ = split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", cfg.mode, kw.k_main)
                    t = _graph_time(lambda: osc_gemm(a_, sa_, kw, xo_, torch.bfloat16, cfg))
                    f = _graph_time(lambda: osc_linear_2d(x, kw, cfg))
                else:
                    t = _graph_time(lambda: osc_gemm(a, sa, kw, xo, torch.bfloat16, cfg))
                    f = t + split
            except Exception as e:  # a config the compiler rejects
                out.write(f"| {name} | {m} | {ops_} {c} | failed: {type(e).__name__}: {str(e)[:80]} | | |\n")
                continue
            desc = f"{ops_}, {cfg.bm}, {cfg.bn}, {cfg.warps}, {cfg.stages}, {cfg.split_k}" + (
                " expand" if cfg.expand else "")
            out.write(f"| {name} | {m} | {desc} | {t:.1f} | {f:.1f} | {bf16 / f:.2f} |\n")
            out.flush()


if __name__ == "__main__":
    main(tuple(int(m) for m in sys.argv[1].split(",")) if len(sys.argv) > 1 else (32, 64, 128, 256, 512, 1024, 2048))
