#!/usr/bin/env bash
# Before refreshing the lock: builds the locked and the newest-allowed environments, runs a smoke subset
# in both (a tiny-llama run of every method, the kernel tests, one evaluation, the analysis) and prints
# which package upgrade breaks what. For a person to run before `bash scripts/lock.sh --upgrade`; not CI.
#   bash scripts/check_latest.sh [--workdir DIR] [--keep] [--only ITEM ...]     (scripts/check_latest.py)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/check_latest.py "$@"
