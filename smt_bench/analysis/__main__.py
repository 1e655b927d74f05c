"""`python -m smt_bench.analysis RESULTS_DIR... --out DIR`: figures, tables and report.md from run JSONs.

Bad input (a missing folder, no run files, a bad option) prints one line
`smt-bench analysis: error: ...`, exits with status 2 and writes nothing.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import EXIT_BAD_INPUT

PROG = "smt-bench analysis"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage first)
        _fail(message)


def _fail(msg: str):
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _warn(msg: str):
    print(f"{PROG}: warning: {msg}", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m smt_bench.analysis", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", metavar="RESULTS_DIR",
                   help="folders searched recursively for run files (<results.dir>/runs/**/*.json, e.g. outputs/results)")
    p.add_argument("--out", required=True, help="output folder: report.md, figures/, runs.csv, cells.csv")
    p.add_argument("--epsilon", type=float, default=0.5,
                   help="plateau threshold: accuracy points gained per doubling of the budget (default 0.5)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the plateau interval")
    p.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed")
    p.add_argument("--published", default=None,
                   help="CSV of published numbers (default: the one shipped in smt_bench/analysis/assets)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .load import AnalysisError
    from .report import Options, analyze

    try:
        report = analyze(args.inputs, args.out, Options(epsilon=args.epsilon, n_boot=args.bootstrap, seed=args.seed,
                                                        published=args.published), warn=_warn)
    except AnalysisError as e:
        _fail(str(e))
    print(f"[smt-bench analysis] wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
