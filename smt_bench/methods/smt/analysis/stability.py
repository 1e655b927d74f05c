"""How stable SMT's block selection is: Jaccard overlap of the selected block sets of two selections
that differ in exactly one factor (seed, warm-up length, score accumulation, score kind).

Inputs are plain records: the factor values and the block map ([layer, projection, row, col] rows),
from run files (method_info.block_map) or from the selection study (scripts/smt_selection_study.py).
"""
from __future__ import annotations

import itertools
import statistics

import numpy as np

from smt_bench.analysis.figures import figure, fit, legend, note
from smt_bench.analysis.registry import Setting

FACTORS = ("seed", "warmup_steps", "accumulation", "score")


def block_set(block_map) -> frozenset:
    return frozenset((int(l), str(p), int(r), int(c)) for l, p, r, c in block_map)


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _order(v):
    return (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v))


def pairs(points: list[dict], factors=FACTORS) -> list[dict]:
    """Every pair of points (dicts with the factors, a `budget`, a `fixed` key of everything else that
    must match, and `blocks`) that differ in exactly one factor, with their Jaccard overlap."""
    out = []
    for a, b in itertools.combinations(points, 2):
        if a["budget"] != b["budget"] or a.get("fixed") != b.get("fixed"):
            continue
        diff = [f for f in factors if a[f] != b[f]]
        if len(diff) != 1:
            continue
        f = diff[0]
        lo, hi = sorted((a, b), key=lambda p: _order(p[f]))
        out.append({"factor": f, "budget": a["budget"], "a": lo[f], "b": hi[f],
                    "same": {g: a[g] for g in factors if g != f}, "jaccard": jaccard(a["blocks"], b["blocks"]),
                    "shared": len(a["blocks"] & b["blocks"]), "n": (len(lo["blocks"]), len(hi["blocks"]))})
    return out


def _compared(r: dict) -> str:
    return "two seeds" if r["factor"] == "seed" else f"{r['a']} vs {r['b']}"


def summary(rows: list[dict]) -> list[dict]:
    """Per (factor, budget, what is compared): the number of pairs and the mean and minimum Jaccard
    (all pairs of seeds pool into one row)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["factor"], r["budget"], _compared(r)), []).append(r["jaccard"])
    first: dict[tuple, int] = {}
    for r in sorted(rows, key=lambda r: (_order(r["a"]), _order(r["b"]))):
        first.setdefault((r["factor"], r["budget"], _compared(r)), len(first))
    order = sorted(groups, key=lambda k: (FACTORS.index(k[0]), k[1], first[k]))
    return [{"factor": f, "budget": b, "compared": c, "pairs": len(groups[(f, b, c)]),
             "mean": statistics.fmean(groups[(f, b, c)]), "min": min(groups[(f, b, c)])} for f, b, c in order]


def markdown(rows: list[dict]) -> list[str]:
    """The summary as a markdown table (fixed formats: regenerated output is byte-identical)."""
    out = ["| factor | budget | compared | pairs | mean Jaccard | min Jaccard |", "| --- | --- | --- | --- | --- | --- |"]
    for s in summary(rows):
        out.append(f"| {s['factor']} | {100 * s['budget']:g}% | {s['compared']} | {s['pairs']} | "
                   f"{s['mean']:.3f} | {s['min']:.3f} |")
    return out


def by_context(rows: list[dict]) -> list[str]:
    """A markdown table of the pairs grouped by what else they share (all but the seed, which pools),
    so e.g. the seed's effect is read at each warm-up length and estimator."""
    groups: dict[tuple, list[float]] = {}
    order: dict[tuple, tuple] = {}
    for r in rows:
        same = [(k, v) for k, v in r["same"].items() if k != "seed"]
        key = (r["factor"], r["budget"], _compared(r), ", ".join(f"{k}={v}" for k, v in same))
        groups.setdefault(key, []).append(r["jaccard"])
        order[key] = (FACTORS.index(r["factor"]), r["budget"], _order(r["a"]), _order(r["b"]),
                      tuple(_order(v) for _, v in same))
    out = ["| factor | budget | compared | with | pairs | mean Jaccard | min Jaccard |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(groups, key=order.__getitem__):
        f, b, c, w = key
        js = groups[key]
        out.append(f"| {f} | {100 * b:g}% | {c} | {w} | {len(js)} | {statistics.fmean(js):.3f} | {min(js):.3f} |")
    return out


# --- in the report: the SMT runs of one setting ------------------------------------------------
def stability_points(s: Setting) -> list[dict]:
    """The SMT runs of one setting that have a block map, as selection-stability points."""
    runs = s.runs[[bool(s.method_info[f].get("block_map")) for f in s.runs["file"]]]
    own = {"cfg.method.warmup_steps", "cfg.method.score_accumulation", "cfg.method.score"}
    # the accumulators' placement does not change the sums, so it is not a factor of the selection
    rest = sorted(c for c in runs.columns if c.startswith("cfg.method.") and c not in own
                  and c != "cfg.method.accumulator_device")
    return [{"seed": int(r["seed"]), "warmup_steps": r.get("cfg.method.warmup_steps"),
             "accumulation": r.get("cfg.method.score_accumulation"), "score": r.get("cfg.method.score"),
             "budget": float(r["budget_fraction"]), "fixed": tuple(str(r[c]) for c in rest),
             "blocks": block_set(s.method_info[r["file"]]["block_map"])} for _, r in runs.iterrows()]


TITLE = "SMT selection stability"


def section(s: Setting) -> list[str]:
    """Jaccard overlap of SMT block sets between runs that differ in exactly one selection factor."""
    rows = pairs(stability_points(s))
    if not rows:
        return []
    return [f"### {TITLE}", "",
            "Jaccard overlap |A∩B| / |A∪B| of the selected block sets of two SMT runs at the same budget that "
            "differ in exactly one of seed, warm-up steps, score accumulation and score kind (the seed changes the "
            "warm-up batches).", "", *markdown(rows), "",
            f"![{TITLE}](figures/{s.slug}/smt_stability.png) ([PDF](figures/{s.slug}/smt_stability.pdf))", ""]


def report_figure(s: Setting):
    rows = pairs(stability_points(s))
    return selection_stability(summary(rows), f"{TITLE} — {s.label}") if rows else None


def selection_stability(summary_rows: list[dict], title: str):
    """Mean Jaccard per compared factor (bar) with the lowest pair as a marker, one group per budget."""
    width = max(5.0, 0.95 * len(summary_rows) + 2.6)
    fig, axes = figure(width, 3.9)
    ax = axes[0, 0]
    if not summary_rows:
        note(ax, "no two SMT selections differ in exactly one factor")
    labels = [f"{r['factor']}\n{r['compared'].replace(' vs ', chr(10) + 'vs ')}\n{100 * r['budget']:g}%"
              for r in summary_rows]
    x = np.arange(len(summary_rows))
    colors = dict(zip(FACTORS, ("#4c72b0", "#55a868", "#c44e52", "#8172b2")))
    hatches = dict(zip(FACTORS, ("", "//", "..", "xx")))
    for xi, r in zip(x, summary_rows):
        ax.bar(xi, r["mean"], 0.75, color=colors.get(r["factor"], "#777777"), hatch=hatches.get(r["factor"], ""),
               edgecolor="white", linewidth=0.0)
    ax.plot(x, [r["min"] for r in summary_rows], "k_", ms=14, mew=1.5, label="lowest pair")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("Jaccard of selected blocks (mean over pairs)")
    ax.set_xlabel("factor that differs, the values compared, budget (% of model)")
    ax.grid(False, axis="x")
    if summary_rows:
        legend(ax)
    fig.suptitle(fit(title, width, 10), fontsize=10)
    return fig
