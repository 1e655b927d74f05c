"""Settings and series: which runs may be compared, and how each method's variants are labelled.

A setting = everything but method, budget and seed (model, data, train, eval, protocol): runs are only
compared inside one. A series = a method's runs that compute the same thing (its resolved config, see
flatten.with_resolved) under one `results.tag`, named by what differs from the method's main series.
"""
from __future__ import annotations

import json
import re

from ..migrations import ADDED_KEYS, RETIRED_KEYS
from .flatten import flatten_config

# config keys that do not change what a run computes (or are the axes of the analysis)
NOT_SETTING = ("seed", "budget", "results", "logger", "anatomy", "device", "threads", "method")


def not_computed() -> set[str]:
    """Config keys that do not change what a run computes although they are outside the axes: the run id's
    own non-semantic keys, and keys that were retired (migrations.RETIRED_KEYS). Runs with and without them
    are one setting; each file keeps its own value."""
    from ..provenance import NON_SEMANTIC

    return {k for k in NON_SEMANTIC if "." in k} | set(RETIRED_KEYS)


def assign_settings(loaded) -> None:
    """Adds setting_key, config_key, setting, setting_slug and series to loaded.runs (a load.Loaded)."""
    df = loaded.runs
    flat = {f: flatten_config(loaded.configs[f]) for f in df["file"]}
    ignored = not_computed()

    def shared(f):
        return global_batch({k: v for k, v in flat[f].items()
                             if k.split(".", 1)[0] not in NOT_SETTING and k not in ignored
                             and not (k in ADDED_KEYS and v == json.dumps(ADDED_KEYS[k]))})

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
                                    if k.split(".", 1)[0] not in ("results", "logger", "anatomy", "device", "threads")},
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

    assign_series(df, flat)


def assign_series(df, flat: dict[str, dict[str, str]]) -> None:
    """Series: within a setting, a method's runs that compute the same thing (the same resolved method
    config) under the same `results.tag`. Each method's *main* series is the untagged one that covers the
    most budgets, then the most finished runs, then the newest; every other series is named by its tag, else
    by the method keys whose values differ from the main series' (`variant`). Adds series_key, series, main
    and variant to df."""
    method_cfg = {f: {k[len("method."):]: v for k, v in flat[f].items() if k.startswith("method.") and k != "method.name"}
                  for f in df["file"]}
    df["series_key"] = [json.dumps([sk, m, method_cfg[f], tag], sort_keys=True)
                        for sk, m, f, tag in zip(df["setting_key"], df["method"], df["file"], df["tag"])]
    series, main, variant = {}, {}, {}
    for _, g in df.groupby(["setting_key", "method"], sort=True):
        fin = g[g["status"] == "finished"]
        pool = fin if len(fin) else g
        rank = {k: ((x["tag"] != "").all(), -x["budget_fraction"].nunique(), -len(x), _newest_first(x["updated_at"]), k)
                for k, x in pool.groupby("series_key", sort=True)}
        head = min(rank, key=lambda k: rank[k])
        ref = method_cfg[g[g["series_key"] == head]["file"].iloc[0]]
        labels = {}
        for key, x in g.groupby("series_key", sort=True):
            cfg, tag = method_cfg[x["file"].iloc[0]], x["tag"].iloc[0]
            diff = ", ".join(f"{k}={_label_value(cfg.get(k))}" for k in sorted(set(cfg) | set(ref))
                             if cfg.get(k) != ref.get(k))
            labels[key] = [tag, diff]
        names = {key: tag or diff for key, (tag, diff) in labels.items()}
        for key, (tag, diff) in labels.items():  # one tag on two computations: say how they differ
            if tag and diff and list(names.values()).count(tag) > 1:
                names[key] = f"{tag}, {diff}"
        seen: dict[str, int] = {}
        method = g["method"].iloc[0]
        for key, v in names.items():
            if list(names.values()).count(v) > 1:  # still the same name: number them
                seen[v] = seen.get(v, 0) + 1
                v = f"{v} #{seen[v]}"
            series[key], main[key], variant[key] = method + (f" ({v})" if v else ""), key == head, v
    df["series"] = [series[k] for k in df["series_key"]]
    df["main"] = [main[k] for k in df["series_key"]]
    df["variant"] = [variant[k] for k in df["series_key"]]


def _newest_first(stamps) -> tuple:
    """Sorts the newest (latest ISO time stamp) first."""
    latest = max((str(t) for t in stamps), default="")
    return tuple(-ord(ch) for ch in latest)


def global_batch(flat: dict[str, str]) -> dict[str, str]:
    """Per-rank batch × grad_accum × ranks is what one optimizer step averages over: 2 ranks with
    grad_accum 1 train the run 1 process with grad_accum 2 trains (bitwise, under DDP), so the setting
    holds the global batch (beside the micro-batch, whose token mean the loss is) instead of the
    accumulation and the world size."""
    out = {k: v for k, v in flat.items() if k not in ("train.grad_accum", "distributed.world_size")}
    if "train.batch_size" in flat:
        n = json.loads(flat["train.batch_size"]) * json.loads(flat.get("train.grad_accum", "1"))
        out["train.global_batch"] = json.dumps(n * json.loads(flat.get("distributed.world_size", "1")))
    return out


def _label_value(v, width: int = 32) -> str:
    """Short text of a flattened config value: lists as `a,b,c`, strings bare, null as `none`."""
    if v is None:
        return "unset"
    try:
        x = json.loads(v)
    except (TypeError, ValueError):
        x = str(v)
    if x is None:
        text = "none"
    elif isinstance(x, list):
        text = ",".join(i if isinstance(i, str) else json.dumps(i) for i in x)
    else:
        text = x if isinstance(x, str) else json.dumps(x)
    return text if len(text) <= width else text[:width - 1] + "…"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "setting"
