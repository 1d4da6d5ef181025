#!/usr/bin/env bash
# On a CUDA machine: `bench gemm` for each 4-bit format of the main path, one format after another in one process
# each, on the same shapes and token counts (MXFP4 the reference row set; NVFP4; INT4 per row; INT4 with a scale per
# 128 columns). Results in ${OUT:-out}/gemm_<format>.md and .json, formats.md and formats.png side by side.
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
# side by side: OSC + split-quantize of each format, its speed over MXFP4's and over BF16's (table and figure)
python3 - "$OUT" <<'PY' | tee "$OUT/formats.md"
import os, sys
from oscquant.bench import formats_table, load, plot_formats
out = sys.argv[1]
runs = {n: load(f"{out}/gemm_{n}.json") for n in ("mxfp4", "nvfp4", "int4", "int4_g128")
        if os.path.exists(f"{out}/gemm_{n}.json")}
print(formats_table(runs))
plot_formats(runs, f"{out}/formats.png")
PY
