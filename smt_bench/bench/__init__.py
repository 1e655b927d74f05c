"""Benchmarks on the harness's own config groups: `python -m smt_bench.bench` (memory and speed per method)."""
