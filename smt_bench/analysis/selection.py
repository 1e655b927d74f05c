"""How stable SMT's block selection is: Jaccard overlap of the selected block sets of two selections
that differ in exactly one factor (seed, warm-up length, score accumulation, score kind).

Inputs are plain records: the factor values and the block map ([layer, projection, row, col] rows),
from run files (method_info.block_map) or from the selection study (scripts/smt_selection_study.py).
"""
from __future__ import annotations

import itertools
import statistics

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
    first = {}
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
