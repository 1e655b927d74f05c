"""What a run or a sweep will cost before it runs: peak device memory (broken down), FLOPs and wall time from a
device profile, the cells that will not fit a device and the nearest change that fits, GPU-hours.

- model.py: the cost model (memory phases, FLOPs, traffic, step time) on shapes alone;
- costs.py: each method's cost terms (Method.cost, else per class, else a generic default);
- devices.py: device profiles (vendor figures, refined by scripts/gpu_check.sh; the CPU's fitted);
- sweep.py: the forecast of a command line's jobs (`python -m smt_bench.forecast <overrides>`);
- calibrate.py: held against the committed benchmarks (`python -m smt_bench.forecast.calibrate`);
- record.py: the forecast a run records beside what it measured.
"""
