"""One result file -> one flat row: the numbers the statistics use, then each method's own columns.

Every row has every column (NaN or "" where a run has none), so runs.csv has one schema whatever mix
of methods and statuses it holds.
"""
from __future__ import annotations

import json
import math

from . import registry
from ..result import MEMORY_PARTS, RunResult


def with_resolved(cfg: dict, method_info: dict | None) -> dict:
    """The method keys a run resolved (its contribution's `resolved`: e.g. a block size given as an upper bound
    the model's shapes reduce) replaced by the value it ran with, where its method_info records one."""
    method = cfg.get("method") or {}
    c = registry.contribution(str(method.get("name")))
    ran = {k: v for k, f in (c.resolved if c else {}).items() if (v := f(method_info or {})) is not None}
    changed = {k: v for k, v in ran.items() if method.get(k) != v}
    return {**cfg, "method": {**method, **changed}} if changed else cfg


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def flatten_config(cfg, prefix: str = "") -> dict[str, str]:
    """Dotted key -> canonical JSON text of the value (lists and scalars as leaves)."""
    out = {}
    if isinstance(cfg, dict):
        for k in sorted(cfg):
            out.update(flatten_config(cfg[k], f"{prefix}{k}."))
        if not cfg and prefix:
            out[prefix[:-1]] = "{}"
    else:
        out[prefix[:-1]] = json.dumps(cfg, sort_keys=True, default=str)
    return out


def forecast_columns(ti) -> dict:
    """What the run's own forecast said (train_info.forecast), beside what it measured: only for runs that recorded
    one, so a table of runs from before the forecast keeps its columns (pandas fills NaN where a run has none)."""
    fc = ti.forecast if ti is not None else None
    if fc is None or fc.error is not None:
        return {}
    return {"forecast_peak_memory_bytes": _num(fc.peak_memory_bytes),
            "forecast_step_time_s": _num(fc.median_step_time_s),
            "forecast_prepare_peak_memory_bytes": _num(fc.prepare_peak_memory_bytes),
            "prepare_peak_memory_bytes": _num(ti.prepare_peak_memory_bytes), "forecast_device": str(fc.device or "")}


def flatten(r: RunResult, file: str) -> dict:
    """One row: the run's identity and the numbers the statistics use, read from its RunResult (an older file
    was upgraded to this version's form on reading: smt_bench/migrations.py)."""
    ri, cfg, ti, ev = r.run_info, r.config, r.train_info, r.eval
    mi = r.method_info or {}
    finished = r.finished
    row = {
        "file": file,
        "run_id": ri.id,
        "status": ri.status,
        "error": (str(ri.error or "").splitlines() or [""])[0],
        "method": cfg["method"]["name"],
        "model": cfg["model"]["name"],
        "data": cfg["data"]["name"],
        "budget_fraction": float(cfg["budget"]["fraction"]),
        "seed": int(cfg["seed"]),
        "tag": str((cfg.get("results") or {}).get("tag") or ""),  # the user's name for a variant (results.tag)
        "created_at": ri.created_at,
        "updated_at": ri.updated_at or ri.created_at,
        "protocol": ev.protocol if ev is not None else ("no evaluation" if finished else "not evaluated"),
    }
    for key in ("trainable_params", "trainable_params_target", "base_params", "trainable_pct", "trainable_pct_target",
                "peak_memory_bytes", "tokens_per_s", "median_step_time_s", "train_time_s", "final_train_loss"):
        row[key] = _num(getattr(ti, key) if ti is not None else None)
    dist = (ti.distributed if ti is not None else None) or {}
    row["world_size"] = int(dist.get("world_size") or (cfg.get("distributed") or {}).get("world_size") or 1)
    row["parallel"] = str(dist.get("strategy") or ("single" if row["world_size"] == 1 else ""))
    row["global_batch"] = _num(ti.global_batch if ti is not None else None)
    row["peak_memory_kind"] = (ti.peak_memory_kind if ti is not None else None) or ""
    mb = ti.memory_breakdown_bytes if ti is not None else None
    for part in MEMORY_PARTS:
        row[f"mem_{part}"] = _num(getattr(mb, part) if mb is not None else None)
    row.update(forecast_columns(ti))
    acc = ev.accuracy if ev is not None else {}
    row["mean_accuracy"] = _num(ev.mean_accuracy if ev is not None else None)
    for task, v in sorted(acc.items()):
        row[f"acc.{task}"] = _num(v)
    row["tasks"] = ";".join(sorted(acc))
    fg = ev.forgetting if ev is not None else None  # held-out NLL after − before (nats; positive: forgot)
    row["forgetting_nll_delta"] = _num(fg.delta if fg is not None else None)
    row.update(anatomy_columns(r.anatomy))
    row["eval_n"] = sum(v for v in ((ev.n if ev is not None else None) or {}).values() if isinstance(v, int))
    own = registry.contribution(row["method"])
    for c in registry.contributions():  # every contributed column on every row: one table schema
        if c.run_columns is not None:
            row.update(c.run_columns(mi if c is own else {}))
    git, dev = r.meta_info.git, r.meta_info.device
    row["git_sha"] = git.get("sha") or ""
    row["git_dirty"] = bool(git.get("dirty"))
    row["device_type"] = str(dev.get("type") or "")
    row["device_name"] = str(dev.get("name") or "")
    return row


ANATOMY_EPSILONS = ("0.3", "0.5", "0.7", "0.9")  # the thresholds the intruder figure draws (the run keeps every one)


def anatomy_columns(a) -> dict:
    """A run's update anatomy (its result's `anatomy`) as columns: intruders at the headline ε and at
    ANATOMY_EPSILONS, per changed matrix, the update's relative norm and median spectrum statistics, and its
    mean ΔW energy spectrum over every changed matrix (JSON; the spectra figure)."""
    nan = math.nan
    if a is None:
        return {"intruders": nan, "intruders_per_matrix": nan, "anatomy_matrices": nan, "delta_rel_norm": nan,
                "dw_stable_rank": nan, "dw_effective_rank": nan, "dw_top1_energy": nan, "attention_share": nan,
                "top_k_drift": nan,
                **{f"intruders@{e}": nan for e in ANATOMY_EPSILONS}, "dw_spectrum": ""}
    head = a.intruders.get(f"{a.epsilon:g}")
    kinds = {k: p for k, p in a.by_projection.items() if k in a.spectrum}
    weights = {k: kinds[k].tensors for k in kinds}
    n = min((len(a.spectrum[k]) for k in kinds), default=0)
    total = sum(weights.values())
    spectrum = [sum(weights[k] * a.spectrum[k][i] for k in kinds) / total for i in range(n)] if total else []
    attention = sum(p.energy_share for k, p in a.by_projection.items() if k in ("q_proj", "k_proj", "v_proj", "o_proj"))
    return {
        "intruders": _num(head), "intruders_per_matrix": _num(head / a.matrices if a.matrices and head is not None
                                                               else None),
        "anatomy_matrices": _num(a.matrices), "delta_rel_norm": _num(a.delta_rel_norm),
        "dw_stable_rank": _num(a.stable_rank), "dw_effective_rank": _num(a.effective_rank),
        "dw_top1_energy": _num(a.top_energy.get("1")),
        # how far the tuned top-k directions moved from the base's: 1 - their mean largest |cos| (0: not at all)
        "top_k_drift": _num(1.0 - a.similarity_mean if a.similarity_mean is not None else None),
        "attention_share": _num(attention if a.changed_tensors
                                                                               else None),
        **{f"intruders@{e}": _num(a.intruders.get(e)) for e in ANATOMY_EPSILONS},
        "dw_spectrum": json.dumps([round(x, 8) for x in spectrum]),
    }
