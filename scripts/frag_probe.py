"""Where the fragment GEMM's time goes, on the H200: the shipped kernel beside timing probes of it
(wrong values, same loads): PROBE 1 skips the e4m3 -> FP16 conversions (cvt/F2FP), PROBE 2 keeps
only the loads. Back to back (bench._b2b_time), µs per call. Usage on the device:
python3 scripts/frag_probe.py
"""

from __future__ import annotations

import torch

from oscquant.bench import _b2b_time, clone_weights, sweep_cases
from oscquant.kernels.ops import _frag_gemm, frag_config, split_quantize
from oscquant.kernels.triton_osc import MODE_F16


def main(ms=(1, 8), k=128):
    print("| shape | M | warps, split | shipped µs | no cvt µs | loads only µs |\n|---|---|---|---|---|---|")
    for case in sweep_cases(ms, k):
        kw, m, n = case.kw, case.m, case.n
        w_bytes = kw.codes.numel() + kw.rel_exp.numel() + 2 * n * k + 4 * n
        xo, a, sa = split_quantize(case.x, kw.keep, kw.outlier_idx, "mxfp4", MODE_F16, kw.k_main)
        for warps, split in ((2, None), (4, None)):
            cfg = frag_config(m, n, kw.k_main, warps, split)
            ts = []
            for probe in (0, 1, 2):
                ts.append(_b2b_time(lambda w: _frag_gemm(a, sa, w, xo, torch.bfloat16, cfg, probe=probe),
                                    lambda: clone_weights(kw), w_bytes))
            print(f"| {case.name} | {m} | {warps}, {cfg.split_k} | " + " | ".join(f"{t:.1f}" for t in ts) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
