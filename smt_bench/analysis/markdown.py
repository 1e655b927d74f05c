"""Markdown pieces with fixed formats, so a regenerated report is byte-identical."""
from __future__ import annotations

import re

import numpy as np

from .stats import fmt


def cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return out + [""]


def acc(m, ci) -> str:
    """Mean accuracy ± the 95% half-width (just the mean with one seed)."""
    if not np.isfinite(m):
        return "—"
    return f"{m:.1f} ± {ci:.1f}" if np.isfinite(ci) else f"{m:.1f}"


def forget(m, ci) -> str:
    """A held-out NLL change in nats, signed, ± its 95% half-width (just the mean with one seed)."""
    if not np.isfinite(m):
        return "—"
    return f"{m:+.3f} ± {ci:.3f}" if np.isfinite(ci) else f"{m:+.3f}"


def pct(x) -> str:
    return fmt(x, ".4g")


def plural(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"


def anchor(label: str) -> str:
    """The id GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", label.lower()).replace(" ", "-")
