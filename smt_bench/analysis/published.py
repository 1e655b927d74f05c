"""Published numbers beside ours, only where model, protocol and task set match (nothing incomparable mixed)."""
from __future__ import annotations

import io
import math
import re
from importlib import resources
from pathlib import Path

import pandas as pd

from .load import AnalysisError
from .markdown import table

PUBLISHED_CSV = "published.csv"
TASK_ALIASES = {"siqa": "socialiqa", "obqa": "openbookqa", "arce": "arceasy", "arcc": "arcchallenge"}


def load_published(path: str | None) -> pd.DataFrame:
    try:
        if path is None:
            text = resources.files("smt_bench.analysis").joinpath("assets").joinpath(PUBLISHED_CSV).read_text("utf-8")
        else:
            text = Path(path).read_text("utf-8")
    except OSError as e:
        raise AnalysisError(f"published numbers {path or PUBLISHED_CSV}: cannot be read ({e.strerror or e})") from None
    try:
        df = pd.read_csv(io.StringIO(text), dtype={"lr": str})
    except (ValueError, pd.errors.ParserError) as e:
        raise AnalysisError(f"published numbers {path}: not a CSV ({str(e).splitlines()[0]})") from None
    need = {"model", "tasks", "protocol", "method", "trainable_pct", "mean_accuracy", "source"}
    if missing := sorted(need - set(df.columns)):
        raise AnalysisError(f"published numbers {path}: missing columns {', '.join(missing)}")
    if df["source"].isna().any() or (df["source"].astype(str).str.strip() == "").any():
        raise AnalysisError(f"published numbers {path}: every row needs a source")
    return df


def _norm_task(t: str) -> str:
    n = re.sub(r"[^a-z0-9]", "", t.lower())
    return TASK_ALIASES.get(n, n)


def _task_set(s: str) -> frozenset:
    return frozenset(_norm_task(t) for t in str(s).split(";") if t)


def published_groups(published: pd.DataFrame, cells: pd.DataFrame, pal):
    """Per (model, protocol, task set) of the published numbers: the matching cells; and the rows to list."""
    groups = []
    rows = []
    keys = sorted({(m, p, t) for m, p, t in zip(published["model"], published["protocol"], published["tasks"])})
    for model, proto, tasks in keys:
        pub = published[(published["model"] == model) & (published["protocol"] == proto) & (published["tasks"] == tasks)]
        want = _task_set(tasks)
        if len(cells):
            match = cells[(cells["model"].str.lower() == str(model).lower())
                          & cells["protocol"].map(lambda s: str(s).startswith(str(proto)))
                          & cells["tasks"].map(lambda s: _task_set(s) == want) & (cells["n"] > 0)]
        else:
            match = cells
        bench = pub["benchmark"].iloc[0] if "benchmark" in pub.columns else tasks
        title = f"{model} · {bench} · {proto}"
        note = "" if len(match) else (
            f"No run matches model {model} + protocol + task set: published points only "
            f"(this analysis has {', '.join(sorted(set(cells['model']))) if len(cells) else 'no evaluated runs'}).")
        groups.append({"title": title, "published": pub, "cells": match, "note": note,
                       "matched": sorted(set(match["setting"])) if len(match) else []})
        rows += sorted((r for _, r in pub.iterrows()),
                       key=lambda r: (pal.key(r["method"]), float(r["trainable_pct"])))
    return groups, rows


def published_section(groups: list[dict], rows) -> list[str]:
    out = ["## Published numbers", ""]
    for g in groups:
        out.append(f"- {g['title']}: " + (f"overlaid on {', '.join(g['matched'])}." if g["matched"] else
                                            "**no run matches this model, protocol and task set**; the figure shows "
                                            "the published points alone (nothing incomparable is mixed in)."))
    out.append("")
    sources = sorted({r["source"] for r in rows})
    listing = []
    for r in rows:
        rank = r.get("rank")
        listing.append([r["model"], r.get("benchmark", ""), r["method"],
                      "" if rank is None or (isinstance(rank, float) and math.isnan(rank)) else str(int(rank)),
                      "" if pd.isna(r.get("lr")) else str(r.get("lr")), f"{float(r['trainable_pct']):.4g}",
                      f"{float(r['mean_accuracy']):.1f}", f"[{sources.index(r['source']) + 1}]"])
    out += table(["model", "benchmark", "method", "rank", "lr", "trainable %", "mean accuracy", "source"], listing)
    for i, s in enumerate(sources, 1):
        out.append(f"[{i}] {s}")
    notes = sorted({str(r["note"]) for r in rows if "note" in r and pd.notna(r["note"])})
    out += [""] + [f"Note: {n}." for n in notes] + ([""] if notes else [])
    out += ["![published numbers](figures/published_overlay.png) ([PDF](figures/published_overlay.pdf))", ""]
    return out
