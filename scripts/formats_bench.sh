#!/usr/bin/env bash
# On a CUDA machine: `bench gemm` for each 4-bit format of the main path, one format after another in one process
# each, on the same shapes and token counts (MXFP4 the reference row set; NVFP4; INT4 per row; INT4 with a scale per
# 128 columns). Results in ${OUT:-out}/gemm_<format>.md and .json; docs/kernels.md compares them.
# Usage: bash scripts/formats_bench.sh [M list] [k list]   (defaults 1,16,64,256,4096 and 128)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
M=${1:-1,16,64,256,4096}
K=${2:-128}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/formats_gpu.txt"
for spec in mxfp4 nvfp4 int4 int4:128; do
    fmt=${spec%%:*}
    group=${spec#*:}
    [[ $group == "$spec" ]] && group=
    name=$fmt${group:+_g$group}
    python3 -m oscquant.cli bench gemm --format "$fmt" ${group:+--group-size "$group"} --m "$M" --k "$K" \
        --json "$OUT/gemm_$name.json" --md "$OUT/gemm_$name.md" > "$OUT/gemm_$name.log" 2>&1
    echo "$name: exit $? ($(grep -c '^| ' "$OUT/gemm_$name.md" 2>/dev/null) table lines)"
done
# side by side: OSC + split-quantize of each format, and each one's speed over MXFP4 and over BF16
python3 - "$OUT" <<'PY' | tee "$OUT/formats.md"
import os, sys
from oscquant.bench import load
out = sys.argv[1]
names = [n for n in ("mxfp4", "nvfp4", "int4", "int4_g128") if os.path.exists(f"{out}/gemm_{n}.json")]
runs = {n: {(r.shape, r.m, r.k_out): r for r in load(f"{out}/gemm_{n}.json")} for n in names}
print("| shape | M | k | BF16 µs | FP8 µs | " + " | ".join(f"{n} µs" for n in names) + " | "
      + " | ".join(f"{n} × mxfp4" for n in names[1:]) + " | " + " | ".join(f"{n} × BF16" for n in names) + " |")
print("|" + "---|" * (5 + 3 * len(names) - 1))
for key, base in runs[names[0]].items():
    rows = [runs[n].get(key) for n in names]
    us = [r.osc_us if r else float("nan") for r in rows]
    print(f"| {key[0]} | {key[1]} | {key[2]} | {base.bf16_us:.1f} | {base.fp8_us:.1f} | "
          + " | ".join(f"{u:.1f}" for u in us) + " | " + " | ".join(f"{us[0] / u:.2f}" for u in us[1:]) + " | "
          + " | ".join(f"{base.bf16_us / u:.2f}" for u in us) + " |")
PY
