"""The forecast a run records beside what it measures (train_info.forecast), so the analysis can show the
forecast's error per method as runs accumulate.

A run knows more than a pre-submission forecast: its tokenised sequence lengths. Memory is forecast at the longest
sequence the run is expected to draw (the peak comes with the longest batch), time at the expected longest
sequence of one batch (batches are padded to their longest). The device is the run's own (CPU: the calibrated
profile; a GPU by its name; an unknown GPU gets a memory forecast and no time).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from .costs import method_cost
from .devices import VENDOR, for_torch_device
from .model import Arch, Setup, memory, step_time
from .sweep import VERSION


def expected_max(lengths: list[int], draws: int) -> float:
    """The expected longest of `draws` lengths drawn uniformly (with replacement) from `lengths`."""
    xs = sorted(lengths)
    n = len(xs)
    if not n:
        return 0.0
    draws = max(1, draws)
    return sum(x * (((k + 1) / n) ** draws - (k / n) ** draws) for k, x in enumerate(xs))


def for_run(prep: Any, lengths: list[int], steps: int, world_size: int, strategy: str) -> dict[str, Any]:
    """train_info.forecast of this run: never raises (a forecast that fails says why in `error`)."""
    try:
        return _for_run(prep, lengths, steps, world_size, strategy)
    except Exception as e:  # the forecast must not cost the run; the record says what went wrong
        return {"version": VERSION, "error": f"{type(e).__name__}: {e}"}


def _for_run(prep: Any, lengths: list[int], steps: int, world_size: int, strategy: str) -> dict[str, Any]:
    tc = prep.cfg.train
    dev = for_torch_device(prep.device)
    timed = dev is not None
    if dev is None:  # an unknown GPU: its memory still follows the CUDA precision
        dev = replace(VENDOR["h100-80gb"], name="cuda (unknown card)")
    per_step = tc.batch_size * tc.grad_accum
    seq_mem = expected_max(lengths, steps * per_step) if lengths else float(tc.max_len)
    seq_time = expected_max(lengths, tc.batch_size) if lengths else float(tc.max_len)
    arch = Arch.from_shapes(prep.shapes)
    cost = method_cost(prep.method, prep.shapes, prep.plan)
    base = Setup(batch=int(tc.batch_size), seq=max(1, round(seq_mem)), grad_accum=int(tc.grad_accum),
                 checkpointing=bool(tc.gradient_checkpointing), world=world_size, strategy=strategy, padded=True)
    mem = memory(arch, cost, base, dev, dev.memory_overhead)
    out: dict[str, Any] = {
        "version": VERSION, "device": dev.name, "peak_memory_bytes": mem.growth, "total_memory_bytes": mem.peak,
        "phase": mem.phase, "memory_breakdown_bytes": mem.parts(), "prepare_peak_memory_bytes": mem.warmup_growth,
        "median_step_time_s": None, "flops_per_step": None,
        "seq_len": {"memory": round(seq_mem, 1), "time": round(seq_time, 1)}, "notes": list(cost.notes),
        "error": None}
    if timed:
        t_setup = replace(base, seq=max(1, round(seq_time)))
        st = step_time(arch, cost, t_setup, dev, memory(arch, cost, t_setup, dev, dev.memory_overhead))
        out["median_step_time_s"], out["flops_per_step"] = st.seconds, st.flops
    return out
