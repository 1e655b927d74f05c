"""Find run JSONs, check each against the results schema, flatten the good ones into a DataFrame.

A run file is any `*.json` below a `runs/` folder (results/runs/<group>/<file>.json), except files
inside a run's export folder (the folder beside a result file with the same name). A file that is
not a valid run is reported with a one-line reason and skipped; the rest are analysed.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

SCHEMA_VERSION = 1
STATUSES = ("finished", "failed", "oom", "cancelled")
MEMORY_PARTS = ("weights", "gradients", "optimizer", "activations")
# SMT projection names -> the groups of the paper's share analysis, in display order
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
PROJ_GROUP = {"q": "q", "k": "k", "v": "v", "o": "o", "gate": "mlp", "up": "mlp", "down": "mlp"}
GROUPS = ("q", "k", "v", "o", "mlp")
# config keys that do not change what a run computes (or are the axes of the analysis)
NOT_SETTING = ("seed", "budget", "results", "logger", "device", "threads", "method")


class AnalysisError(Exception):
    """Bad input to the analysis: one line, exit status 2, nothing written."""


class SchemaError(ValueError):
    pass


@dataclass
class BadFile:
    path: str
    reason: str


@dataclass
class Loaded:
    runs: pd.DataFrame                        # one row per valid run file, sorted by file
    block_maps: dict[str, list] = field(default_factory=dict)    # file -> [[layer, proj, row, col], ...]
    configs: dict[str, dict] = field(default_factory=dict)       # file -> resolved config
    meta: dict[str, dict] = field(default_factory=dict)          # file -> meta_info
    bad: list[BadFile] = field(default_factory=list)
    n_files: int = 0


# --- finding files ----------------------------------------------------------------------------
def find_run_files(inputs: list[str | Path]) -> list[tuple[str, Path]]:
    """(display name, path) of every run file under the inputs, sorted by display name.

    The display name is the path relative to the input folder, prefixed with that folder's name,
    so the report does not depend on where the results tree sits or on the working directory."""
    found: dict[Path, str] = {}
    taken: dict[str, Path] = {}
    for raw in inputs:
        root = Path(raw)
        if not root.exists():
            raise AnalysisError(f"{raw}: no such file or directory; pass a results folder (e.g. results/)")
        if root.is_file():
            if root.suffix != ".json":
                raise AnalysisError(f"{raw}: not a .json file; pass a results folder (e.g. results/)")
            found.setdefault(root.resolve(), root.as_posix())
            taken.setdefault(root.as_posix(), root.resolve())
            continue
        base = root.resolve()
        for p in sorted(base.rglob("*.json")):
            rel = p.relative_to(base)
            parts = (base.name,) + rel.parts
            if p.name.startswith(".") or "runs" not in parts[:-1]:
                continue
            if _in_export_folder(p, base):
                continue
            display = "/".join(parts)
            if display in taken and taken[display] != p.resolve():  # two inputs with the same folder name
                display = "/".join((Path(raw).as_posix(),) + rel.parts)
            if p.resolve() not in found:
                found[p.resolve()] = display
                taken[display] = p.resolve()
    return sorted(((d, p) for p, d in found.items()), key=lambda t: (t[0], str(t[1])))


def _in_export_folder(p: Path, base: Path) -> bool:
    d = p.parent
    while d != base and base in d.parents:
        if (d.parent / f"{d.name}.json").is_file():
            return True
        d = d.parent
    return False


# --- schema -----------------------------------------------------------------------------------
def _get(obj: dict, dotted: str, kinds, *, optional: bool = False):
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
    if not _is(cur, kinds):
        raise SchemaError(f"{dotted}={_short(cur)} is not {_kind_name(kinds)}")
    return cur


def _is(v, kinds) -> bool:
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


def _short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def validate(obj) -> None:
    """Raise SchemaError naming the first problem of a run result."""
    if not isinstance(obj, dict):
        raise SchemaError("top level is not a JSON object")
    sv = obj.get("schema_version")
    if sv is None:
        raise SchemaError("missing key schema_version (not a smt-bench run file?)")
    if sv != SCHEMA_VERSION:
        raise SchemaError(f"schema_version {_short(sv)} is not supported (this analysis reads {SCHEMA_VERSION})")
    _get(obj, "run_info.id", ("str",))
    status = _get(obj, "run_info.status", ("str",))
    if status not in STATUSES:
        raise SchemaError(f"run_info.status={status!r} is not one of {', '.join(STATUSES)}")
    for key in ("method.name", "model.name", "data.name"):
        _get(obj, f"config.{key}", ("str",))
    frac = _get(obj, "config.budget.fraction", ("number",))
    if not 0 < frac <= 1:
        raise SchemaError(f"config.budget.fraction={frac} is not in (0, 1]")
    _get(obj, "config.seed", ("int",))
    if status != "finished":
        return
    for key in ("trainable_pct", "trainable_pct_target"):
        _get(obj, f"train_info.{key}", ("number",))
    for key in ("trainable_params", "trainable_params_target", "base_params"):
        _get(obj, f"train_info.{key}", ("int",))
    for key in ("peak_memory_bytes", "tokens_per_s", "median_step_time_s"):
        _get(obj, f"train_info.{key}", ("number", "null"))
    mb = _get(obj, "train_info.memory_breakdown_bytes", ("dict",), optional=True)
    if mb is not None:
        for part in MEMORY_PARTS:
            _get(obj, f"train_info.memory_breakdown_bytes.{part}", ("number", "null"), optional=True)
    ev = _get(obj, "eval", ("dict",), optional=True)
    if ev is not None:
        _get(obj, "eval.protocol", ("str",))
        acc = _get(obj, "eval.accuracy", ("dict",))
        for task, v in acc.items():  # null: a task that could not be scored (the mean is then null too)
            if not _is(v, ("number", "null")):
                raise SchemaError(f"eval.accuracy.{task}={_short(v)} is not a finite number or null")
        _get(obj, "eval.mean_accuracy", ("number", "null"))
    if _get(obj, "method_info", ("dict",), optional=True):
        bmap = _get(obj, "method_info.block_map", ("list",), optional=True)
        for i, b in enumerate(bmap or []):
            if not (isinstance(b, list) and len(b) == 4 and _is(b[0], ("int", "null")) and isinstance(b[1], str)):
                raise SchemaError(f"method_info.block_map[{i}]={_short(b)} is not [layer, projection, row, col]")
        share = _get(obj, "method_info.block_share", ("dict",), optional=True)
        for p, v in (share or {}).items():
            if not _is(v, ("number",)):
                raise SchemaError(f"method_info.block_share.{p}={_short(v)} is not a finite number")
        eligible = _get(obj, "method_info.eligible_blocks", ("dict",), optional=True)
        for p, v in (eligible or {}).items():
            if not _is(v, ("int",)):
                raise SchemaError(f"method_info.eligible_blocks.{p}={_short(v)} is not an integer")


# --- flattening -------------------------------------------------------------------------------

# Keys a method gained after results were written with it: (method, key) -> the value those older runs
# computed with (absent then, so it was the only behaviour), so old and new runs group and label right.
LEGACY_DEFAULTS = {("smt", "score_accumulation"): "score_sum", ("smt", "accumulator_device"): "same"}


def with_legacy_defaults(cfg: dict) -> dict:
    method = cfg.get("method") or {}
    missing = {k: v for (m, k), v in LEGACY_DEFAULTS.items() if method.get("name") == m and k not in method}
    return {**cfg, "method": {**method, **missing}} if missing else cfg
def short_projection(name: str) -> str:
    """'q_proj' -> 'q', 'model.layers.3.mlp.down_proj' -> 'down'; unknown names are kept as they are."""
    base = name.rsplit(".", 1)[-1]
    base = base[:-5] if base.endswith("_proj") else base
    return base


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
        "protocol": ev.get("protocol") if isinstance(ev.get("protocol"), str) else
        ("no evaluation" if finished else "not evaluated"),
    }
    for key in ("trainable_params", "trainable_params_target", "base_params", "trainable_pct", "trainable_pct_target",
                "peak_memory_bytes", "tokens_per_s", "median_step_time_s", "train_time_s", "final_train_loss"):
        row[key] = _num(ti.get(key))
    row["peak_memory_kind"] = ti.get("peak_memory_kind") if isinstance(ti.get("peak_memory_kind"), str) else ""
    mb = ti.get("memory_breakdown_bytes") or {}
    for part in MEMORY_PARTS:
        row[f"mem_{part}"] = _num(mb.get(part))
    row["mean_accuracy"] = _num(ev.get("mean_accuracy"))
    for task, v in sorted((ev.get("accuracy") or {}).items()):
        row[f"acc.{task}"] = _num(v)
    row["tasks"] = ";".join(sorted(ev.get("accuracy") or {}))
    row["eval_n"] = sum(v for v in (ev.get("n") or {}).values() if isinstance(v, int))
    counts = smt_counts(mi)
    total = sum(counts.values())
    for g in GROUPS:
        row[f"smt_share_{g}"] = counts.get(g, 0) / total if total else math.nan
        row[f"smt_blocks_{g}"] = counts.get(g, 0) if total else math.nan
    row["smt_blocks"] = total if total else math.nan
    eligible = smt_eligible(mi) if total else {}
    for g in GROUPS:  # NaN: the run does not say what was eligible (older runs)
        row[f"smt_eligible_{g}"] = eligible.get(g, 0) if eligible else math.nan
    row["smt_eligible_projections"] = ";".join(sorted({short_projection(p) for p in mi.get("eligible_blocks") or {}}))
    row["kernels_backend"] = mi.get("kernels_backend") if isinstance(mi.get("kernels_backend"), str) else ""
    git = meta.get("git") or {}
    dev = meta.get("device") or {}
    row["git_sha"] = git.get("sha") or ""
    row["git_dirty"] = bool(git.get("dirty"))
    row["device_type"] = str(dev.get("type") or "")
    row["device_name"] = str(dev.get("name") or "")
    return row


def smt_counts(method_info: dict) -> dict[str, float]:
    """Selected blocks per projection group (q, k, v, o, mlp): from block_map, else block_share."""
    counts: dict[str, float] = {}
    bmap = method_info.get("block_map")
    if bmap:
        for b in bmap:
            g = PROJ_GROUP.get(short_projection(b[1]), short_projection(b[1]))
            counts[g] = counts.get(g, 0) + 1
        return counts
    share = method_info.get("block_share") or {}
    for p, v in share.items():  # fractions only: scaled to a total of 1
        g = PROJ_GROUP.get(short_projection(p), short_projection(p))
        counts[g] = counts.get(g, 0) + float(v)
    return counts


def smt_eligible(method_info: dict) -> dict[str, int]:
    """Blocks SMT could choose from, per projection group: the denominator that undoes the size bias of raw
    counts (with grouped-query attention k and v offer fewer blocks than q)."""
    counts: dict[str, int] = {}
    for p, n in (method_info.get("eligible_blocks") or {}).items():
        g = PROJ_GROUP.get(short_projection(p), short_projection(p))
        counts[g] = counts.get(g, 0) + int(n)
    return counts


# --- loading ----------------------------------------------------------------------------------
def load(inputs: list[str | Path], warn=None) -> Loaded:
    files = find_run_files(inputs)
    if not files:
        raise AnalysisError(f"no run files under {', '.join(map(str, inputs))} "
                            f"(expected results/runs/<group>/*.json written by python -m smt_bench)")
    rows, out = [], Loaded(runs=pd.DataFrame(), n_files=len(files))
    for display, path in files:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            reason = "not UTF-8 text"
        except json.JSONDecodeError as e:
            reason = f"not valid JSON (line {e.lineno} column {e.colno}: {e.msg})"
        except OSError as e:
            reason = f"cannot be read ({e.strerror or e})"
        else:
            try:
                validate(obj)
                rows.append(flatten(obj, display))
                out.configs[display] = with_legacy_defaults(obj["config"])
                out.meta[display] = obj.get("meta_info") or {}
                bmap = (obj.get("method_info") or {}).get("block_map")
                if obj["run_info"]["status"] == "finished" and bmap:
                    out.block_maps[display] = bmap
                continue
            except SchemaError as e:
                reason = str(e)
        out.bad.append(BadFile(display, reason))
        if warn:
            warn(f"{display}: {reason}; skipped")
    if not rows:
        raise AnalysisError(f"none of the {len(files)} run files is a valid run result "
                            f"(first: {out.bad[0].path}: {out.bad[0].reason})")
    for row in rows:  # the whole resolved config, flattened (lists as JSON text)
        for k, v in flatten_config(out.configs[row["file"]]).items():
            x = json.loads(v)
            row[f"cfg.{k}"] = v if isinstance(x, (list, dict)) else x
    df = pd.DataFrame(rows)
    acc_cols = sorted(c for c in df.columns if c.startswith("acc."))
    cfg_cols = sorted(c for c in df.columns if c.startswith("cfg."))
    head = [c for c in df.columns if not c.startswith(("acc.", "cfg."))]
    out.runs = df[head + acc_cols + cfg_cols].sort_values("file", kind="stable").reset_index(drop=True)
    _assign_settings(out)
    return out


def _assign_settings(loaded: Loaded) -> None:
    """A setting = everything but method, budget and seed (model, data, train, eval, protocol):
    runs are only compared inside one. A series = a method plus whatever of its own config varies."""
    df = loaded.runs
    flat = {f: flatten_config(loaded.configs[f]) for f in df["file"]}

    def shared(f):
        return {k: v for k, v in flat[f].items() if k.split(".", 1)[0] not in NOT_SETTING}

    keys = []
    for f, proto, tasks, status in zip(df["file"], df["protocol"], df["tasks"], df["status"]):
        s = shared(f)
        if status == "finished":  # the protocol and tasks a run reports are part of what its accuracy means
            s["eval.protocol"] = json.dumps(proto)
            s["eval.tasks"] = json.dumps(tasks)
        keys.append(json.dumps(s, sort_keys=True))
    df["setting_key"] = keys
    # the same computation (a rerun on another device counts as the same): finds superseded failures
    df["config_key"] = [json.dumps({k: v for k, v in flat[f].items()
                                    if k.split(".", 1)[0] not in ("results", "logger", "device", "threads")},
                                   sort_keys=True) for f in df["file"]]
    labels, slugs = {}, {}
    by_md: dict[tuple, list[str]] = {}
    fin_keys = {k for k, st in zip(keys, df["status"]) if st == "finished"}
    for key in sorted(fin_keys):
        s = json.loads(key)
        md = (json.loads(s["model.name"]), json.loads(s["data.name"]))
        by_md.setdefault(md, []).append(key)
    for (model, data), group in sorted(by_md.items()):
        dicts = [json.loads(k) for k in group]
        varying = sorted({k for d in dicts for k in set().union(*dicts) if len({x.get(k) for x in dicts}) > 1})
        for i, (key, d) in enumerate(zip(group, dicts)):
            extra = ", ".join(f"{k}={_label_value(d.get(k))}" for k in varying)
            labels[key] = f"{model} · {data}" + (f" ({extra})" if extra else "")
            slugs[key] = _slug(f"{model}-{data}") + (f"-{i + 1}" if len(group) > 1 else "")
    df["setting"] = [labels.get(k, "") for k in keys]  # figures and tables: finished runs only
    df["setting_slug"] = [slugs.get(k, "") for k in keys]

    series = [""] * len(df)
    for (skey, method), idx in df.groupby(["setting_key", "method"], sort=True).groups.items():
        idx = list(idx)
        mflat = {i: {k: v for k, v in flat[df.at[i, "file"]].items() if k.startswith("method.")
                     and k != "method.name"} for i in idx}
        varying = sorted({k for d in mflat.values() for k in d if len({x.get(k) for x in mflat.values()}) > 1})
        for i in idx:
            extra = ", ".join(f"{k[len('method.'):]}={_label_value(mflat[i].get(k))}" for k in varying)
            series[i] = method + (f" ({extra})" if extra else "")
    df["series"] = series


def _label_value(v, width: int = 32) -> str:
    if v is None:
        return "unset"
    try:
        x = json.loads(v)
    except (TypeError, ValueError):
        x = str(v)
    text = x if isinstance(x, str) else json.dumps(x)
    return text if len(text) <= width else text[:width - 1] + "…"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "setting"
