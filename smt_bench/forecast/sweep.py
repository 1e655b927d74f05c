"""The forecast of a command line's jobs: each run's peak memory (per rank, broken down), its steps, FLOPs and
wall time on a device, the cells that do not fit the device with the nearest change that does, and the sweep's
GPU-hours. Built on the preflight's Prepared jobs (configs composed, plans made on meta shapes): no weight loads.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .costs import method_cost
from .devices import GIB, Device
from .model import Arch, Cost, Memory, Setup, memory, step_time, warmup_time

VERSION = "smt-bench forecast 1"


@dataclass
class JobForecast:
    """One run's forecast (every rank alike; memory is one rank's)."""

    method: str
    budget: float
    model: str
    seeds: list[int]
    trainable: int
    setup: Setup
    memory: Memory
    step_s: float
    flops_per_step: float
    steps: int
    warmup_s: float
    seconds: float  # warm-up + training, wall time of one run
    gpu_hours: float  # seconds × ranks / 3600, one run
    fits: bool | None  # None: the device sets no limit (CPU)
    peak: int  # the larger of the training step's and the warm-up's peak, one rank
    fix: dict[str, Any] | None = None  # the nearest change that fits
    runs: int = 1  # distinct runs of this cell (its seeds)
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["setup"] = asdict(self.setup)
        d["memory"] = asdict(self.memory)
        return d


def steps_of(cfg: Any, n_train: int, setup: Setup) -> int:
    """train.max_steps, or with train.epochs the steps N epochs of the training records take at the global batch
    (the run counts its tokenised records; records a tokeniser drops for length are not known here)."""
    tc = cfg.train
    if tc.epochs:
        return math.ceil(float(tc.epochs) * n_train / (setup.batch * setup.grad_accum * setup.world))
    return int(tc.max_steps)


def setup_of(cfg: Any, method: Any, world: int | None, seq: int | None = None, padded: bool = True) -> Setup:
    w = int(world or 1)
    return Setup(batch=int(cfg.train.batch_size), seq=int(seq or cfg.train.max_len),
                 grad_accum=int(cfg.train.grad_accum), checkpointing=bool(cfg.train.gradient_checkpointing), world=w,
                 strategy=method.parallel if w > 1 else "single", padded=padded)


def estimate(arch: Arch, cost: Cost, setup: Setup, device: Device, steps: int) -> dict[str, Any]:
    mem = memory(arch, cost, setup, device, device.memory_overhead)
    st = step_time(arch, cost, setup, device, mem)
    warm = 0.0
    if cost.warmup is not None:
        w = cost.warmup
        passes = w.passes * (setup.grad_accum if w.backward and not w.full_ft else 1)
        warm = warmup_time(arch, replace(w, passes=passes), setup, device)
    peak = max(mem.peak, mem.warmup_peak or 0)
    limit = device.usable_bytes()
    seconds = warm + steps * st.seconds
    return {"memory": mem, "time": st, "warmup_s": warm, "seconds": seconds, "peak": peak,
            "fits": None if limit is None else peak <= limit, "gpu_hours": seconds * setup.world / 3600.0}


def _candidates(setup: Setup, method: Any, cost: Cost) -> list[tuple[list[str], Setup, Cost]]:
    """Changes that lower a rank's peak, each with its overrides: the batch split into accumulation steps (same
    global batch), gradient checkpointing, both, SMT's warm-up accumulators in host memory, and more
    ranks per run (FSDP2 shards full FT's state; per-rank batch lowered to keep the global batch)."""
    out: list[tuple[list[str], Setup, Cost]] = []
    splits = []
    b, a = setup.batch, setup.grad_accum
    while b > 1 and b % 2 == 0:
        b, a = b // 2, a * 2
        splits.append((b, a))
    ckpts = [False, True] if not setup.checkpointing else [True]
    for ck in ckpts:
        for bb, aa in [(setup.batch, setup.grad_accum), *splits]:
            if not ck and (bb, aa) == (setup.batch, setup.grad_accum):
                continue
            ov = ([f"train.batch_size={bb}", f"train.grad_accum={aa}"] if bb != setup.batch else []) + \
                 (["train.gradient_checkpointing=true"] if ck and not setup.checkpointing else [])
            if ov:
                out.append((ov, replace(setup, batch=bb, grad_accum=aa, checkpointing=ck), cost))
    w = cost.warmup
    if w is not None and w.device_bytes and getattr(method, "score_accumulation", None) == "grad_sum":
        host = replace(w, device_bytes=0, host_bytes=2 * w.device_bytes)
        out.append((["method.accumulator_device=cpu"], setup, replace(cost, warmup=host)))
    if getattr(method, "parallel", "ddp") == "fsdp2":
        for W in (2, 4, 8):
            if W <= setup.world:
                continue
            for ck in (False, True):
                # keep the global batch: fewer accumulation steps first, then a smaller per-rank batch
                k = W // max(setup.world, 1)
                aa, bb = setup.grad_accum, setup.batch
                while k > 1 and aa % 2 == 0:
                    aa, k = aa // 2, k // 2
                while k > 1 and bb % 2 == 0:
                    bb, k = bb // 2, k // 2
                if k > 1:
                    continue
                ov = [f"hydra.launcher.tasks_per_node={W}", f"hydra.launcher.gpus_per_node={W}"]
                ov += [f"train.batch_size={bb}"] if bb != setup.batch else []
                ov += [f"train.grad_accum={aa}"] if aa != setup.grad_accum else []
                ov += ["train.gradient_checkpointing=true"] if ck and not setup.checkpointing else []
                out.append((ov, replace(setup, world=W, strategy="fsdp2", batch=bb, grad_accum=aa,
                                        checkpointing=ck or setup.checkpointing), cost))
    return out


def nearest_fix(arch: Arch, cost: Cost, setup: Setup, device: Device, method: Any, steps_at: Any) -> dict | None:
    """Of the changes that fit, the one with the fewest GPU-hours (ties: fewer overrides)."""
    best = None
    for ov, s, c in _candidates(setup, method, cost):
        e = estimate(arch, c, s, device, steps_at(s))
        if not e["fits"]:
            continue
        key = (e["gpu_hours"], len(ov))
        if best is None or key < best[0]:
            best = (key, {"overrides": ov, "peak": e["peak"], "phase": e["memory"].phase,
                          "gpu_hours": e["gpu_hours"], "seconds": e["seconds"], "world": s.world})
    return None if best is None else best[1]


def forecast_jobs(preps: list[Any], world: int | None, device: Device) -> list[JobForecast]:
    """One JobForecast per distinct run (full FT across a budget list is one run), seeds of a cell grouped."""
    cells: dict[str, JobForecast] = {}
    costs: dict[str, Cost] = {}
    seen: set[str] = set()
    for prep in preps:
        if str(prep.path) in seen:
            continue
        seen.add(str(prep.path))
        cfg = prep.cfg
        cell_cfg = {k: v for k, v in prep.container.items() if k not in ("seed", "results", "logger")}
        from ..run import Shared

        key = Shared.key(cell_cfg)
        if key in cells:
            cells[key].seeds.append(int(cfg.seed))
            cells[key].runs += 1
            continue
        ck = Shared.key(prep.container["method"], prep.target, prep.container["model"]["source"])
        if ck not in costs:
            costs[ck] = method_cost(prep.method, prep.shapes, prep.plan)
        cost = costs[ck]
        arch = Arch.from_shapes(prep.shapes)
        setup = setup_of(cfg, prep.method, world)
        n_train = len(prep.splits.train)

        def steps_at(s: Setup, cfg: Any = cfg, n_train: int = n_train) -> int:
            return steps_of(cfg, n_train, s)

        steps = steps_at(setup)
        e = estimate(arch, cost, setup, device, steps)
        job = JobForecast(method=prep.method.name, budget=float(cfg.budget.fraction), model=str(cfg.model.name),
                          seeds=[int(cfg.seed)], trainable=cost.trainable, setup=setup, memory=e["memory"],
                          step_s=e["time"].seconds, flops_per_step=e["time"].flops, steps=steps, warmup_s=e["warmup_s"],
                          seconds=e["seconds"], gpu_hours=e["gpu_hours"], fits=e["fits"], peak=e["peak"],
                          notes=list(cost.notes))
        if job.fits is False:
            job.fix = nearest_fix(arch, cost, setup, device, prep.method, steps_at)
        cells[key] = job
    order = {m: i for i, m in enumerate(dict.fromkeys(j.method for j in cells.values()))}
    return sorted(cells.values(), key=lambda j: (j.model, order[j.method], j.budget))


def _wall(seconds: float) -> str:
    """A run's wall time in the unit that reads best."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _h(hours: float) -> str:
    """Hours to three significant digits (a short run's are small)."""
    return f"{hours:.3g}" if hours < 100 else f"{hours:,.0f}"


def table(jobs: list[JobForecast], device: Device, skipped: list[str] | None = None) -> str:
    """The per-cell table, the memory breakdown, what does not fit with its fix, and the totals."""
    limit = device.usable_bytes()
    lines = [f"[forecast] {VERSION} on {device.describe()}",
             "[forecast] training only (evaluation not included); memory per rank; sequences counted at "
             "train.max_len (an upper bound for time); no weight was loaded", ""]
    head = ("| method | budget | model | runs | trainable | batch×seq (accum, ranks) | peak GiB (phase) | fits "
            f"{'' if limit is None else f'{limit / GIB:.1f} GiB'} | step s | steps | time per run | GPU-h |")
    lines += [head, "|" + " --- |" * 12]
    for j in jobs:
        s = j.setup
        fit = "–" if j.fits is None else ("yes" if j.fits else "**no**")
        phase = j.memory.phase if j.peak == j.memory.peak else "warm-up"
        lines.append(f"| {j.method} | {j.budget:g} | {j.model} | {j.runs} | {j.trainable:,} | {s.batch}×{s.seq} "
                     f"({s.grad_accum}, {s.world}) | {j.peak / GIB:.1f} ({phase}) | {fit} | {j.step_s:.3g} | "
                     f"{j.steps:,} | {_wall(j.seconds)} | {_h(j.gpu_hours * j.runs)} |")
    lines += ["", "Memory per rank at the peak (GiB): weights fp32, the method's added tensors, gradients, AdamW "
                  "moments, the optimizer step's temporary, activations saved for backward (as configured; without / "
                  "with gradient checkpointing), the loss's vocabulary-sized tensors, bf16 weight copies kept for "
                  "backward (CUDA), the method's own temporary, DDP/FSDP2 buffers, the warm-up's peak:", "",
              "| method | budget | model | weights | added | grads | AdamW | opt. step | activations (full / ckpt) | "
              "logits | bf16 copies | method | parallel | warm-up peak |", "|" + " --- |" * 14]
    g = lambda x: f"{x / GIB:.2f}"  # noqa: E731
    for j in jobs:
        m = j.memory
        warm = "–" if m.warmup_peak is None else g(m.warmup_peak) + (f" (+{g(m.warmup_host)} host)" if m.warmup_host
                                                                   else "")
        lines.append(f"| {j.method} | {j.budget:g} | {j.model} | {g(m.weights)} | {g(m.added)} | {g(m.gradients)} | "
                     f"{g(m.optimizer)} | {g(m.optimizer_step)} | {g(m.activations)} ({g(m.activations_full)} / "
                     f"{g(m.activations_checkpointed)}) | {g(m.logits)} | {g(m.cast_copies)} | {g(m.method)} | "
                     f"{g(m.parallel)} | {warm} |")
    bad = [j for j in jobs if j.fits is False]
    if bad and limit is not None:
        lines += ["", f"Does not fit {device.name} ({limit / GIB:.1f} GiB usable per rank) — the nearest change that "
                      "fits (fewest GPU-hours):", ""]
        for j in bad:
            what = f"{j.method} budget {j.budget:g} on {j.model} ({j.peak / GIB:.1f} GiB, {j.memory.phase})"
            if j.fix is None:
                lines.append(f"- {what}: no change tried fits (batch split, checkpointing, warm-up accumulators on the "
                             "host, FSDP2 up to 8 ranks)")
            else:
                f = j.fix
                lines.append(f"- {what}: add `{' '.join(f['overrides'])}` → {f['peak'] / GIB:.1f} GiB per rank "
                             f"({f['phase']}), {_h(f['gpu_hours'])} GPU-h per run on {f['world']} rank(s)")
    notes = sorted({n for j in jobs for n in j.notes})
    if notes:
        lines += ["", "Approximate: " + "; ".join(notes)]
    if skipped:
        lines += ["", f"Skipped (budget unreachable for the method): {'; '.join(skipped)}"]
    runs = sum(j.runs for j in jobs)
    total = sum(j.gpu_hours * j.runs for j in jobs)
    fixed = sum((j.fix["gpu_hours"] if j.fix else j.gpu_hours) * j.runs for j in jobs)
    lines += ["", f"[forecast] total: {runs} runs in {len(jobs)} cells, {_h(total)} GPU-hours on {device.name}"
              + (f"; {len(bad)} cell(s) do not fit; with the changes above {_h(fixed)} GPU-hours" if bad else "")]
    return "\n".join(lines)


def to_json(jobs: list[JobForecast], device: Device) -> dict[str, Any]:
    return {"forecast": VERSION, "device": {**asdict(device), "usable_bytes": device.usable_bytes()},
            "cells": [j.row() for j in jobs],
            "total": {"runs": sum(j.runs for j in jobs), "gpu_hours": sum(j.gpu_hours * j.runs for j in jobs),
                      "not_fitting": sum(1 for j in jobs if j.fits is False)}}
