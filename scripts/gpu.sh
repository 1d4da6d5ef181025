#!/usr/bin/env bash
# On a CUDA machine (the lent H200): the GPU tests, the GEMM benchmark and the model end to end.
# Usage: bash scripts/gpu.sh [tests] [bench] [model] [moe] [formats]   (tests, bench and model without arguments; on the lent
# device, whose commands stop after 10 minutes, run "tests" in shards (TESTS_SHARD=1/2, then 2/2; TESTS_MAXFAIL=n to go on
# past a failure) and "bench model" (about 3 minutes) as separate calls;
# "moe": the MoE experts' grouped GEMM configs per projection, then `bench model --moe` at 256 and 8192 tokens;
# "formats": `bench gemm` for MXFP4, NVFP4, INT4 and INT4 groups of 128 side by side, scripts/formats_bench.sh)
# Uses the machine's own python3 with torch/triton/transformers; installs nothing.
# Results land in ${OUT:-out}/: gpu.txt, pytest.log, bench.json, bench.md, bench.png, bench.log (with the comparison
# against the newest full run in docs/bench), model.md, moe_tiles.md, moe_256.md, moe_8192.md, formats.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PARTS=" ${*:-tests bench model} "
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
if [[ $PARTS == *" tests "* ]]; then
    # a fresh Inductor cache: a call stopped by its time limit can leave a truncated .so in the shared one
    # ("invalid ELF header" in the next compiled test)
    # 8 workers where pytest-xdist is installed (the lent device has it): the tests are mostly compiling kernels
    XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
    SEL=(tests/test_kernels.py tests/test_moe.py tests/test_linear.py tests/test_siblings.py tests/test_generate.py tests/test_cli.py)
    if [[ -n ${TESTS_SHARD:-} ]]; then
        # TESTS_SHARD=i/n: every n-th test from the i-th (1-based), so that the whole set fits in n calls of 10 minutes
        python3 -m pytest --collect-only -q "${SEL[@]}" -p no:cacheprovider | grep '::' \
            | awk -v i="${TESTS_SHARD%/*}" -v n="${TESTS_SHARD#*/}" '(NR - 1) % n == i - 1' > "$OUT/shard.txt"
        mapfile -t SEL < "$OUT/shard.txt"
        echo "shard $TESTS_SHARD: ${#SEL[@]} tests"
    fi
    # -v: a line a test in pytest.log, so that a call stopped by its time limit still says what passed
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python3 -m pytest -v --maxfail="${TESTS_MAXFAIL:-1}" ${XDIST:-} "${SEL[@]}" \
        -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | grep -v -E ' PASSED | SKIPPED ' | tail -25
fi
if [[ $PARTS == *" bench "* ]]; then
    # compared, row by row, with the newest full run kept in the docs on the same kind of GPU, H100 or H200
    # (BENCH_BASE= to name another, or none)
    KIND=h200
    [[ $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) == *H100* ]] && KIND=h100
    BASE=${BENCH_BASE-$(ls docs/bench/${KIND}_full_*.json 2>/dev/null | sort | tail -1)}
    python3 -m oscquant.cli bench gemm --m "${BENCH_M:-1,8,16,64,256,1024,4096,16384}" --k "${BENCH_K:-64,128}" \
        --json "$OUT/bench.json" --md "$OUT/bench.md" --png "$OUT/bench.png" ${BASE:+--base "$BASE"} 2>&1 \
        | tee "$OUT/bench.log" | tail -${BENCH_TAIL:-80}
fi
if [[ $PARTS == *" model "* ]]; then
    # end to end: a Qwen3-8B-shaped model, BF16 against OSC with q/k/v and gate/up apart and stacked
    # (MODEL_COMPILE=1: also the decode step compiled by torch.compile)
    python3 -m oscquant.cli bench model --layers "${MODEL_LAYERS:-4}" --prefill "${MODEL_PREFILL:-512}" \
        ${MODEL_COMPILE:+--compile} --md "$OUT/model.md" 2>&1 | tail -10
fi
if [[ $PARTS == *" moe "* ]]; then
    # Qwen3-30B-A3B's experts: the transposed GEMM's tiles and the plain FP8 GEMM over them (moe.FP8_PLAIN_PAIRS; for
    # 4-bit experts after their expansion, moe.EXPAND_PAIRS) per projection, then the model end to end
    python3 scripts/moe_tiles.py "${MOE_PAIRS:-2048,16384,65536}" 2>&1 | tee "$OUT/moe_tiles.md"
    for p in ${MOE_PREFILL:-256 8192}; do
        python3 -m oscquant.cli bench model --moe --layers 2 --prefill "$p" --md "$OUT/moe_$p.md" 2>&1 | tail -12
    done
fi
if [[ $PARTS == *" formats "* ]]; then
    OUT=$OUT bash scripts/formats_bench.sh "${FORMATS_M:-1,16,256,4096}" "${FORMATS_K:-128}"
fi
