"""What the user reads when a run or a sweep ends: one line per run, one table per sweep, and the
command that turns the sweep's files into the report and figures."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MiB = 2 ** 20


def _accuracy(ev: dict | None) -> str:
    if not ev:
        return "no eval"
    acc = ev.get("mean_accuracy")
    n = sum(v for v in (ev.get("n") or {}).values() if isinstance(v, int))
    protocol = str(ev.get("protocol") or "").split(":")[0]
    shown = "n/a" if acc is None else f"{acc:.1f}%"
    return f"accuracy {shown} ({ev.get('suite')}, {protocol}, {n} items)"


def run_line(result: dict, path: Path | str) -> str:
    """`[smt-bench] finished: smt | budget 1.00% (target 1.00%) | accuracy ... | peak ... | tok/s | wall | path`."""
    info, cfg = result["run_info"], result.get("config") or {}
    t = result.get("train_info") or {}
    parts = [f"[smt-bench] {info['status']}: {cfg.get('method', {}).get('name', '?')}"]
    if "trainable_pct" in t:
        parts.append(f"budget {t['trainable_pct']:.2f}% (target {t['trainable_pct_target']:.2f}%)")
    else:
        parts.append(f"budget target {100 * float(cfg.get('budget', {}).get('fraction', 0)):g}%")
    if info["status"] == "finished":
        parts.append(_accuracy(result.get("eval")))
    if "peak_memory_bytes" in t:
        parts.append(f"peak {t['peak_memory_bytes'] / MiB:,.0f} MiB ({t['peak_memory_kind']})")
        parts.append(f"{t['tokens_per_s']:,.0f} tok/s")
    parts.append(f"wall {info.get('wall_time_s', 0):.0f} s")
    if info.get("error"):
        parts.append(f"error {str(info['error']).splitlines()[0][:200]}")
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
        r = json.loads(job.path.read_text())
    except (OSError, ValueError):
        return [str(i), label, "not run", "", "", "", "", "", ""]
    status = "skipped" if job.finished_before else r["run_info"]["status"]
    s, t = r.get("summary") or {}, r.get("train_info") or {}
    acc = s.get("mean_accuracy")
    cells = [f"{s['trainable_pct']:.2f}" if "trainable_pct" in s else "",
             "" if acc is None else f"{acc:.1f}",
             f"{t['peak_memory_bytes'] / MiB:,.0f}" if "peak_memory_bytes" in t else "",
             f"{t['tokens_per_s']:,.0f}" if "tokens_per_s" in t else "",
             f"{r['run_info'].get('wall_time_s', 0):.0f}"]
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
