#!/usr/bin/env bash
# On the GPU machine: the small-M GEMM tests, then the config sweep of the transposed small-M GEMM
# (what gemm_config's M <= 64 branch was set from). Writes ${OUT:-out}/sweep_small.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -m pytest -q -x tests/test_kernels.py -k "gemm_matches" -p no:cacheprovider 2>&1 | tail -3
python3 -m oscquant.cli bench small > "$OUT/sweep_small.md" 2>&1; tail -25 "$OUT/sweep_small.md"
