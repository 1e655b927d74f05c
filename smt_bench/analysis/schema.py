"""Is a file a run result this analysis can read? The first problem is named, in one line.

Finished runs must carry what the statistics use; other statuses only what names the run and its
config (plus the facts the failure table reports). A method's own `method_info` keys are checked by
its contribution (registry.Contribution.check).
"""
from __future__ import annotations

import json
import math

from ..results import SCHEMA_VERSION
from . import registry

# finished: in the statistics; the rest are listed with what they got to
STATUSES = ("finished", "failed", "oom", "cancelled", "running", "preempted", "diverged")
MEMORY_PARTS = ("weights", "gradients", "optimizer", "activations")


class SchemaError(ValueError):
    pass


def require(obj: dict, dotted: str, kinds, *, optional: bool = False):
    """obj[dotted] (a dotted path) if it is of one of kinds ("number", "int", "str", "dict", "list", "null"),
    else SchemaError naming the path; None for a missing optional key."""
    cur = obj
    parts = dotted.split(".")
    for i, k in enumerate(parts):
        if not isinstance(cur, dict):
            raise SchemaError(f"{'.'.join(parts[:i])} is not an object")
        if k not in cur:
            if optional:
                return None
            raise SchemaError(f"missing key {dotted}")
        cur = cur[k]
    if cur is None and optional:
        return None
    if not is_kind(cur, kinds):
        raise SchemaError(f"{dotted}={short(cur)} is not {_kind_name(kinds)}")
    return cur


def is_kind(v, kinds) -> bool:
    if "number" in kinds and isinstance(v, (int, float)) and not isinstance(v, bool):
        return math.isfinite(v) if isinstance(v, float) else True
    if "int" in kinds and isinstance(v, int) and not isinstance(v, bool):
        return True
    if "str" in kinds and isinstance(v, str):
        return True
    if "dict" in kinds and isinstance(v, dict):
        return True
    if "list" in kinds and isinstance(v, list):
        return True
    if "null" in kinds and v is None:
        return True
    return False


def _kind_name(kinds) -> str:
    return " or ".join({"number": "a finite number", "int": "an integer", "str": "a string", "dict": "an object",
                        "list": "a list", "null": "null"}[k] for k in kinds)


def short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def _check_unfinished(obj: dict, status: str) -> None:
    """What the failure table reports: where a run diverged, its last checkpoint, the batch that ran out."""
    if status == "diverged":
        require(obj, "run_info.diverged_at_step", ("int",))
    elif status in ("running", "preempted"):  # running: in progress, or killed before it could say so
        require(obj, "run_info.checkpoint_step", ("int", "null"))  # null: killed before the first checkpoint
        require(obj, "run_info.updated_at", ("str",), optional=True)
    elif status == "oom":
        require(obj, "run_info.batch_size", ("int",), optional=True)
        require(obj, "config.train.batch_size", ("int",), optional=True)


def validate(obj) -> None:
    """Raise SchemaError naming the first problem of a run result."""
    if not isinstance(obj, dict):
        raise SchemaError("top level is not a JSON object")
    sv = obj.get("schema_version")
    if sv is None:
        raise SchemaError("missing key schema_version (not a smt-bench run file?)")
    if sv != SCHEMA_VERSION:
        raise SchemaError(f"schema_version {short(sv)} is not supported (this analysis reads {SCHEMA_VERSION})")
    require(obj, "run_info.id", ("str",))
    status = require(obj, "run_info.status", ("str",))
    if status not in STATUSES:
        raise SchemaError(f"run_info.status={status!r} is not one of {', '.join(STATUSES)}")
    for key in ("method.name", "model.name", "data.name"):
        require(obj, f"config.{key}", ("str",))
    frac = require(obj, "config.budget.fraction", ("number",))
    if not 0 < frac <= 1:
        raise SchemaError(f"config.budget.fraction={frac} is not in (0, 1]")
    require(obj, "config.seed", ("int",))
    if status != "finished":
        _check_unfinished(obj, status)
        return
    for key in ("trainable_pct", "trainable_pct_target"):
        require(obj, f"train_info.{key}", ("number",))
    for key in ("trainable_params", "trainable_params_target", "base_params"):
        require(obj, f"train_info.{key}", ("int",))
    for key in ("peak_memory_bytes", "tokens_per_s", "median_step_time_s"):
        require(obj, f"train_info.{key}", ("number", "null"))
    mb = require(obj, "train_info.memory_breakdown_bytes", ("dict",), optional=True)
    if mb is not None:
        for part in MEMORY_PARTS:
            require(obj, f"train_info.memory_breakdown_bytes.{part}", ("number", "null"), optional=True)
    ev = require(obj, "eval", ("dict",), optional=True)
    if ev is not None:
        require(obj, "eval.protocol", ("str",))
        acc = require(obj, "eval.accuracy", ("dict",))
        for task, v in acc.items():  # null: a task that could not be scored (the mean is then null too)
            if not is_kind(v, ("number", "null")):
                raise SchemaError(f"eval.accuracy.{task}={short(v)} is not a finite number or null")
        require(obj, "eval.mean_accuracy", ("number", "null"))
    if require(obj, "method_info", ("dict",), optional=True):
        c = registry.contribution(obj["config"]["method"]["name"])
        if c is not None and c.check is not None:
            c.check(obj)
