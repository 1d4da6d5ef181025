#!/usr/bin/env bash
# On the GPU machine: compare tile configs of the OSC GEMM (used to set gemm_config).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -m oscquant.cli bench sweep 2>&1 | tee "$OUT/sweep.md" | tail -70
