#!/usr/bin/env python
"""Thin wrapper: `python scripts/analyze.py results/ --out results/analysis` = `python -m smt_bench.analysis ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smt_bench.analysis.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
