"""Analysis of run results: figures, plateau detection and the report (python -m smt_bench.analysis)."""


def load_runs(*dirs):
    """One row per valid run file under dirs (finished or not): flattened config and metrics.

    For notebooks: `from smt_bench.analysis import load_runs; df = load_runs("results")`.
    Files that are not valid runs are skipped (see `load.load(...).bad` for the reasons)."""
    from .load import load

    return load(list(dirs)).runs
