"""What the user reads when a run or a sweep ends: one line per run, one table per sweep, and the
command that turns the sweep's files into the report and figures."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .result import Evaluation, RunResult, next_step

MiB = 2 ** 20


def _accuracy(ev: Evaluation | None) -> str:
    if ev is None:
        return "no eval"
    n = sum(v for v in (ev.n or {}).values() if isinstance(v, int))
    protocol = ev.protocol.split(":")[0]
    shown = "n/a" if ev.mean_accuracy is None else f"{ev.mean_accuracy:.1f}%"
    return f"accuracy {shown} ({ev.suite}, {protocol}, {n} items)"


def run_line(result: RunResult, path: Path | str) -> str:
    """`[smt-bench] finished: smt | budget 1.00% (target 1.00%) | accuracy ... | peak ... | tok/s | wall | path`."""
    info, cfg, t = result.run_info, result.config, result.train_info
    parts = [f"[smt-bench] {info.status}: {cfg.get('method', {}).get('name', '?')}"]
    if t is not None:
        parts.append(f"budget {t.trainable_pct:.2f}% (target {t.trainable_pct_target:.2f}%)")
    else:
        parts.append(f"budget target {100 * float(cfg.get('budget', {}).get('fraction', 0)):g}%")
    if result.finished:
        parts.append(_accuracy(result.eval))
    if t is not None and t.peak_memory_bytes is not None:
        parts.append(f"peak {t.peak_memory_bytes / MiB:,.0f} MiB ({t.peak_memory_kind})")
    if t is not None and t.tokens_per_s is not None:
        parts.append(f"{t.tokens_per_s:,.0f} tok/s")
    parts.append(f"wall {info.wall_time_s or 0:.0f} s")
    if info.error:
        parts.append(f"error {info.error.splitlines()[0][:200]}")
    if not result.finished:
        parts.append(f"next: {next_step(info.status, info.checkpoint_step)}")
    parts.append(str(path))
    return " | ".join(parts)


@dataclass
class Job:
    """One job of a sweep: its own overrides, its result file, and whether that was finished before."""

    overrides: list[str]
    path: Path
    finished_before: bool


def _row(i: int, job: Job, first_of: dict) -> list[str]:
    label = " ".join(job.overrides) or "(defaults)"
    if first_of[job.path] != i:
        return [str(i), label, f"same run as #{first_of[job.path]}", "", "", "", "", "", ""]
    try:
        r = RunResult.from_json(json.loads(job.path.read_text()))
    except (OSError, ValueError):  # not there, not JSON, or not a run result (SchemaError)
        return [str(i), label, "not run", "", "", "", "", "", ""]
    status = "skipped" if job.finished_before else r.run_info.status
    t, ev = r.train_info, r.eval
    acc = ev.mean_accuracy if ev is not None else None
    cells = [f"{t.trainable_pct:.2f}" if t is not None else "",
             "" if acc is None else f"{acc:.1f}",
             f"{t.peak_memory_bytes / MiB:,.0f}" if t is not None and t.peak_memory_bytes is not None else "",
             f"{t.tokens_per_s:,.0f}" if t is not None and t.tokens_per_s is not None else "",
             f"{r.run_info.wall_time_s or 0:.0f}"]
    return [str(i), label, status, *cells, job.path.name]


def sweep_table(jobs: list[Job], results_dirs: list[str]) -> str:
    """A fixed-width table of every job, then the analysis command for the sweep's results."""
    first_of: dict = {}
    for i, job in enumerate(jobs):
        first_of.setdefault(job.path, i)
    head = ["#", "job", "status", "trainable %", "accuracy", "peak MiB", "tok/s", "wall s", "result"]
    rows = [head] + [_row(i, job, first_of) for i, job in enumerate(jobs)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    counts: dict[str, int] = {}
    for r in rows[1:]:
        key = "same run" if r[2].startswith("same run") else r[2]
        counts[key] = counts.get(key, 0) + 1
    dirs = " ".join(dict.fromkeys(results_dirs))
    out = results_dirs[0].rstrip("/") + "/analysis" if len(set(results_dirs)) == 1 else "analysis"
    return "\n".join([f"[smt-bench] sweep of {len(jobs)} jobs: "
                      + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
                      *lines,
                      f"[smt-bench] report and figures: python -m smt_bench.analysis {dirs} --out {out}"])
