"""One result file -> one flat row: the numbers the statistics use, then each method's own columns.

Every row has every column (NaN or "" where a run has none), so runs.csv has one schema whatever mix
of methods and statuses it holds.
"""
from __future__ import annotations

import json
import math

from . import registry
from .schema import MEMORY_PARTS


def with_resolved(cfg: dict, method_info: dict) -> dict:
    """The method keys a run resolved (its contribution's `resolved`: e.g. a block size given as an upper bound
    the model's shapes reduce) replaced by the value it ran with, where its method_info records one."""
    method = cfg.get("method") or {}
    c = registry.contribution(method.get("name"))
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


def flatten(obj: dict, file: str) -> dict:
    ri, cfg = obj["run_info"], obj["config"]
    ti = obj.get("train_info") or {}
    ev = obj.get("eval") or {}
    mi = obj.get("method_info") or {}
    meta = obj.get("meta_info") or {}
    finished = ri["status"] == "finished"
    row = {
        "file": file,
        "run_id": ri["id"],
        "status": ri["status"],
        "error": (str(ri.get("error") or "").splitlines() or [""])[0],
        "method": cfg["method"]["name"],
        "model": cfg["model"]["name"],
        "data": cfg["data"]["name"],
        # full FT trains 100% whatever budget its config carried (older runs kept the sweep's value)
        "budget_fraction": 1.0 if finished and ti.get("trainable_pct_target") == 100 else float(cfg["budget"]["fraction"]),
        "seed": int(cfg["seed"]),
        "tag": str((cfg.get("results") or {}).get("tag") or ""),  # the user's name for a variant (results.tag)
        "created_at": str(ri.get("created_at") or ""),
        "updated_at": str(ri.get("updated_at") or ri.get("created_at") or ""),
        "protocol": ev.get("protocol") if isinstance(ev.get("protocol"), str) else
        ("no evaluation" if finished else "not evaluated"),
    }
    for key in ("trainable_params", "trainable_params_target", "base_params", "trainable_pct", "trainable_pct_target",
                "peak_memory_bytes", "tokens_per_s", "median_step_time_s", "train_time_s", "final_train_loss"):
        row[key] = _num(ti.get(key))
    dist = ti.get("distributed") or {}  # runs before multi-rank support: one process
    row["world_size"] = int(dist.get("world_size") or (cfg.get("distributed") or {}).get("world_size") or 1)
    row["parallel"] = str(dist.get("strategy") or ("single" if row["world_size"] == 1 else ""))
    tc = cfg.get("train") or {}
    row["global_batch"] = _num(ti.get("global_batch") or (tc.get("batch_size") or math.nan) * (tc.get("grad_accum") or 1)
                               * row["world_size"])
    row["peak_memory_kind"] = ti.get("peak_memory_kind") if isinstance(ti.get("peak_memory_kind"), str) else ""
    mb = ti.get("memory_breakdown_bytes") or {}
    for part in MEMORY_PARTS:
        row[f"mem_{part}"] = _num(mb.get(part))
    row["mean_accuracy"] = _num(ev.get("mean_accuracy"))
    for task, v in sorted((ev.get("accuracy") or {}).items()):
        row[f"acc.{task}"] = _num(v)
    row["tasks"] = ";".join(sorted(ev.get("accuracy") or {}))
    row["eval_n"] = sum(v for v in (ev.get("n") or {}).values() if isinstance(v, int))
    own = registry.contribution(row["method"])
    for c in registry.contributions():  # every contributed column on every row: one table schema
        if c.run_columns is not None:
            row.update(c.run_columns(mi if c is own else {}))
    git = meta.get("git") or {}
    dev = meta.get("device") or {}
    row["git_sha"] = git.get("sha") or ""
    row["git_dirty"] = bool(git.get("dirty"))
    row["device_type"] = str(dev.get("type") or "")
    row["device_name"] = str(dev.get("name") or "")
    return row
