"""Decode (M <= 16) configs on the H200, side by side in one process.

Each config is (operands, MP, BN, warps, stages, split-K): operands f16 / f8 for the transposed
GEMM (FP16 A, weights unpacked to FP16 with the block factor folded in; or e4m3 A, weights moved
bit-wise to e4m3 and each block's factor applied to its FP32 partial product), MP the padded
token count of the A tile ("min": M's power of two); operands "frag" for the fragment GEMM
(frag_gemm.py; only warps and split-K apply); None: gemm_config's choice. Columns: the GEMM alone back to back
(bench._b2b_time, µs per call on distinct weight copies) and split-quantize + GEMM flushed
(bench._graph_time; only for configs that keep gemm_config's warps), beside cuBLAS. Results:
docs/bench/h200_decode_sweeps_2026-11-29.md, docs/bench/h200_frag_sweeps_2026-11-29.md.
Usage on the device: python3 scripts/decode_sweep.py > $OUT/decode_sweep.md
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from oscquant.bench import _b2b_time, _graph_time, clone_weights, sweep_cases
from oscquant.kernels.ops import frag_config, gemm_config, osc_gemm, osc_linear_2d, split_quantize

CONFIGS = [("old", None, None, None, None, None), ("frag", None, None, None, None, None)] + [
    ("frag", None, None, w, None, s) for w in (1, 2, 4) for s in (1, 2, 4, 8, 16)]  # (operands, MP, BN, warps, stages, split-K)


def config(m, n, k_pad, ops_, mp, bn, warps, stages, split):
    if ops_ == "old":  # the transposed GEMM's config, as before the fragment GEMM
        return gemm_config(m, n, k_pad, frag=False)
    if ops_ == "frag":
        return frag_config(m, n, k_pad, warps, split)
    base = gemm_config(m, n, k_pad, frag=False)
    mp = (1 << (m - 1).bit_length()) if mp == "min" else mp
    return replace(base, bm=mp, op_f8=ops_ == "f8", bn=bn or base.bn, warps=warps or base.warps,
                   stages=stages or base.stages, split_k=split or base.split_k)


def main(ms=(1, 8, 16), k=128):
    out = sys.stdout
    out.write("| shape | M | config (ops, MP, BN, warps, stages, split) | GEMM b2b µs | split+GEMM flush µs | "
              "weight TB/s b2b |\n|---|---|---|---|---|---|\n")
    for case in sweep_cases(ms, k):
        name, m, n, x, kw = case.name, case.m, case.n, case.x, case.kw
        w_bytes = kw.codes.numel() + kw.rel_exp.numel() + 2 * n * k + 4 * n
        b = _b2b_time(case.bf16, case.weight.clone, 2 * n * case.k_in)
        out.write(f"| {name} | {m} | cuBLAS BF16 | {b:.1f} | {_graph_time(case.bf16):.1f} | |\n")
        out.write(f"| {name} | {m} | cuBLAS FP8 | {_b2b_time(case.fp8, case.weight_f8.clone, n * case.k_in):.1f} | "
                  f"{_graph_time(case.fp8):.1f} | |\n")
        for c in CONFIGS:
            cfg = config(m, n, kw.k_main, *c)
            if cfg.bm < m:
                continue
            try:
                xo, a, sa = split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", cfg.mode, kw.k_main)
                t = _b2b_time(lambda w: osc_gemm(a, sa, w, xo, torch.bfloat16, cfg), lambda: clone_weights(kw), w_bytes)
                f = _graph_time(lambda: osc_linear_2d(x, kw, cfg)) if c[3] is None else float("nan")
            except Exception as e:  # a config the compiler rejects
                out.write(f"| {name} | {m} | {c} | failed: {type(e).__name__}: {str(e)[:80]} | | |\n")
                continue
            out.write(f"| {name} | {m} | {c[0]}, {cfg.bm}, {cfg.bn}, {cfg.warps}, {cfg.stages}, {cfg.split_k} | "
                      f"{t:.1f} | {f:.1f} | {w_bytes / t / 1e6:.2f} |\n")
            out.flush()


if __name__ == "__main__":
    main(tuple(int(m) for m in sys.argv[1].split(",")) if len(sys.argv) > 1 else (1, 8, 16))
