#!/usr/bin/env bash
# The pure-Python packages smt_bench.bench needs that a GPU machine's Python may lack (hydra-core, omegaconf
# and omegaconf's parser runtime, antlr4), as wheels in .whl/ (git-ignored): copy .whl/ along with the
# repository, and scripts/gpu_check.sh installs them there. Versions: those setup.sh installs here.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PY=${PYTHON:-.venv/bin/python}
ver() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }
"$PY" -m pip wheel -q --no-deps -w .whl "hydra-core==$(ver hydra-core)" "omegaconf==$(ver omegaconf)" \
  "antlr4-python3-runtime==$(ver antlr4-python3-runtime)"
ls .whl
