#!/usr/bin/env bash
# On the GPU machine: correctness of the one-launch small-M kernel, then its config sweep.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -m pytest -q -x tests/test_kernels.py -k "gemm_matches or fused" -p no:cacheprovider 2>&1 | tail -8
python3 -c "from oscquant.bench import sweep_small; print(sweep_small())" > "$OUT/sweep_fused.md" 2>&1; tail -25 "$OUT/sweep_fused.md"
