"""Analysis of run results: figures, plateau detection and the report (python -m smt_bench.analysis)."""
