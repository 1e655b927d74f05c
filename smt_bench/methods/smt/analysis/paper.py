"""The SMT paper's figures and tables by name, drawn from whichever runs of a setting can show them (the
presets in conf/experiment/paper/ make those runs): paper_qkv, paper_attn_mlp and paper_selection compare
SMT variants that differ in one config key at one budget; paper_qkv_share is the paper's pie of where
the q,k,v blocks go; the paper-layout table lists per-task accuracy with the published rows beside ours
where model, protocol and task set match.

A comparison holds everything else fixed: SMT runs are grouped by every other method key, and a panel is
drawn only where one such group has at least two variants at one budget.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from smt_bench.analysis.figures import figure, fig_legend, fit, wrap
from smt_bench.analysis.markdown import acc, plural, table
from smt_bench.analysis.published import _task_set, _norm_task
from smt_bench.analysis.registry import Figure, Setting
from smt_bench.analysis.stats import fmt_budget, mean_ci, t975

from .columns import PROJECTIONS


@dataclass(frozen=True)
class Comparison:
    stem: str
    title: str
    key: str                                  # the method key that varies (cfg.method.<key>)
    variants: tuple[tuple[str, object], ...]  # (label, value) in display order
    claim: str                                # what the paper found, for the section
    contrasts: tuple[tuple[str, str], ...]    # (a, b): report a − b with its 95% interval
    published: dict                           # (a, b) -> the paper's a − b in points, where it gives one


QKV = Comparison(
    "paper_qkv", "SMT on Q, K or V alone (the paper's Q/K/V figure)", "projections",
    (("Q", frozenset("q")), ("K", frozenset("k")), ("V", frozenset("v")), ("Q,K,V", frozenset("qkv"))),
    "trains SMT on Q, K or V alone at one budget and finds V best, ahead of K by 4.6 points and "
    "of Q by 3.2 (as its summaries quote the figure)",
    (("V", "K"), ("V", "Q")), {("V", "K"): 4.6, ("V", "Q"): 3.2})
ATTN_MLP = Comparison(
    "paper_attn_mlp", "SMT on attention vs MLP projections (the paper's attention-vs-MLP comparison)",
    "projections",
    (("attention (q,k,v)", frozenset("qkv")), ("MLP (gate,up,down)", frozenset({"gate", "up", "down"})),
     ("all seven", frozenset(PROJECTIONS))),
    "spends one budget on attention or on MLP projections and finds attention better",
    (("attention (q,k,v)", "MLP (gate,up,down)"), ("attention (q,k,v)", "all seven")), {})
SELECTION = Comparison(
    "paper_selection", "Gradient- vs activation-based block selection", "signal",
    (("gradient", "gradient"), ("activation", "activation")),
    "keeps gradient-based selection; its reference code also selects by activation magnitude "
    "(`--channel_sparsity`)", (("gradient", "activation"),), {})
COMPARISONS = (QKV, ATTN_MLP, SELECTION)


def _value(key: str, text) -> object:
    """A run's config value of `key` in the form the variants use (projection lists as sets)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        v = json.loads(text)
    except ValueError:
        v = text
    return frozenset(v) if key == "projections" and isinstance(v, list) else v


def panels(s: Setting, comp: Comparison) -> list[dict]:
    """Per (budget, other method keys) with >= 2 variants: {budget, label, rows: [(variant, [accuracies])]}."""
    col = f"cfg.method.{comp.key}"
    runs = s.runs[(s.runs["method"] == "smt") & s.runs["mean_accuracy"].notna()]
    if col not in runs.columns or not len(runs):
        return []
    others = sorted(c for c in runs.columns if c.startswith("cfg.method.") and c not in (col, "cfg.method.name"))
    labels = {v: lbl for lbl, v in comp.variants}
    out = []
    for b, at_b in runs.groupby("budget_fraction", sort=True):
        keys = [at_b[c].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
                for c in others]  # another method's keys are empty here; pandas would drop those groups
        groups = at_b.groupby(keys, sort=True, dropna=False) if others else [((), at_b)]
        found = []
        for rest, g in groups:
            by: dict[str, list[float]] = {}
            for v, a in zip(g[col], g["mean_accuracy"]):
                lbl = labels.get(_value(comp.key, v))
                if lbl is not None:
                    by.setdefault(lbl, []).append(float(a))
            if len(by) >= 2:
                found.append((dict(zip(others, rest if isinstance(rest, tuple) else (rest,))), by))
        varying = sorted({k for f, _ in found for k in f if len({x[0].get(k) for x in found}) > 1})
        for fixed, by in found:
            label = ", ".join(f"{k.removeprefix('cfg.method.')}={fixed[k]}" for k in varying)
            out.append({"budget": float(b), "label": label,
                        "rows": [(lbl, by[lbl]) for lbl, _ in comp.variants if lbl in by]})
    return out


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """mean(a) − mean(b) and its 95% Welch half-width (NaN with fewer than 2 values on a side)."""
    d = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return d, math.nan
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return d, 0.0
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return d, t975(max(1, int(df))) * se


def comparison_section(comp: Comparison):
    def section(s: Setting) -> list[str]:
        found = panels(s, comp)
        if not found:
            return []
        out = [f"### {comp.title} (`{comp.stem}`)", "", f"The paper {comp.claim}.", ""]
        rows, lines = [], []
        for p in found:
            accs = dict(p["rows"])
            best = max(accs, key=lambda k: np.mean(accs[k]))
            where = fmt_budget(p["budget"]) + (f" ({p['label']})" if p["label"] else "")
            for lbl, values in p["rows"]:
                m, ci, n = mean_ci(values)
                rows.append([where, lbl, str(n), acc(m, ci), "best" if lbl == best else f"{m - np.mean(accs[best]):+.1f}"])
            parts = []
            for a, b in comp.contrasts:
                if a in accs and b in accs:
                    d, h = welch(accs[a], accs[b])
                    paper = comp.published.get((a, b))
                    sig = "" if not np.isfinite(h) else (" (the interval excludes 0)" if abs(d) > h else
                                                         " (the interval includes 0)")
                    parts.append(f"{a} − {b} = {d:+.1f}" + (f" ± {h:.1f}" if np.isfinite(h) else "") + sig
                                 + (f"; the paper: {paper:+.1f}" if paper is not None else ""))
            lines.append(f"- {where}: best {best}" + ("; " + "; ".join(parts) if parts else "") + ".")
        out += table(["budget", "variant", "runs", "accuracy", "vs best"], rows)
        out += lines + ["", "Differences are in accuracy points, with 95% Welch intervals over seeds.", ""]
        return out
    return section


def comparison_figure(comp: Comparison):
    def draw(s: Setting):
        found = panels(s, comp)
        if not found:
            return None
        per = 0.4 + 1.0 * max(len(p["rows"]) for p in found)
        width = max(4.6, 1.0 + per * len(found))
        fig, axes = figure(width, 3.9, 1, len(found), sharey=True)
        for k, (ax, p) in enumerate(zip(axes.flat, found)):
            x = np.arange(len(p["rows"]))
            best = int(np.argmax([np.mean(v) for _, v in p["rows"]]))
            for i, (lbl, values) in enumerate(p["rows"]):
                m, ci, n = mean_ci(values)
                ax.bar(i, m, 0.65, color="#2ca02c" if i == best else "#a1d99b", hatch="" if i == best else "//",
                       edgecolor="white", linewidth=0.0, yerr=ci if np.isfinite(ci) else None, capsize=4)
                ax.scatter(np.full(len(values), i) + np.linspace(-0.12, 0.12, len(values)), values, s=10,
                           color="black", zorder=3)
                ax.text(i, 0.01, f"n={n}", ha="center", va="bottom", fontsize=7, transform=ax.get_xaxis_transform())
            names = [lbl for lbl, _ in p["rows"]]
            ax.set_xticks(x, [wrap(n.replace(" (", "\n("), 14) for n in names], fontsize=8)
            ax.set_xlabel(f"SMT's {comp.key} (the darker bar is best)", fontsize=8)
            ax.grid(False, axis="x")
            if k == 0:
                ax.set_ylabel("mean accuracy (%)")
            ax.set_title(fit(f"SMT {fmt_budget(p['budget'])}" + (f" · {p['label']}" if p["label"] else ""),
                             per - 0.2, 8), fontsize=8)
        fig.suptitle(fit(f"{comp.title} · {s.label}", width, 9), fontsize=9)
        return fig
    return draw


# --- the Q/K/V share of the selected blocks (the paper's pie) -------------------------------------------

def _qkv_cells(s: Setting) -> list[tuple[float, dict[str, float], dict[str, float], int]]:
    """(budget, pooled selected blocks per q/k/v, eligible per q/k/v, runs) of the SMT runs on exactly q,k,v."""
    runs = s.runs[s.runs["method"] == "smt"]
    if "cfg.method.projections" not in runs.columns or "smt_blocks_q" not in runs.columns:
        return []
    runs = runs.loc[np.array([_value("projections", v) == frozenset("qkv") for v in runs["cfg.method.projections"]],
                             dtype=bool)]  # (a plain empty list would select columns)
    if "cfg.method.signal" in runs.columns:  # the paper's pie is of gradient-selected blocks
        runs = runs.loc[np.array([_value("signal", v) in (None, "gradient") for v in runs["cfg.method.signal"]],
                                 dtype=bool)]
    runs = runs[runs["smt_blocks"].notna() & (runs["smt_blocks"] > 0)]
    out = []
    for b, g in runs.groupby("budget_fraction", sort=True):
        sel = {p: float(g[f"smt_blocks_{p}"].fillna(0).sum()) for p in "qkv"}
        elig = {p: float(g[f"smt_eligible_{p}"].fillna(0).sum()) for p in "qkv"}
        out.append((float(b), sel, elig, len(g)))
    return out


SHARE_TITLE = "Q/K/V share of the selected blocks (the paper's pie chart)"
SHARE_CAPTION = ("Where gradient-selected SMT on q, k and v puts its blocks, pooled over the runs of each budget "
                 "(series that differ in other SMT keys are pooled too). With grouped-query attention k and v offer fewer blocks than q: "
                 "each panel also gives the eligible share, the split a selection blind to the data would make.")


def share_figure(s: Setting):
    cells = _qkv_cells(s)
    if not cells:
        return None
    width = max(5.0, 2.7 * len(cells) + 0.4)
    fig, axes = figure(width, 3.9, 1, len(cells))
    colors = {"q": "#9ecae1", "k": "#6baed6", "v": "#2ca02c"}
    hatches = {"q": "//", "k": "..", "v": ""}
    for ax, (b, sel, elig, n) in zip(axes.flat, cells):
        keys = [p for p in "qkv" if sel[p] > 0]
        total = sum(sel[p] for p in keys)
        wedges, _, autotexts = ax.pie([sel[p] for p in keys], colors=[colors[p] for p in keys], startangle=90,
                                      counterclock=False, autopct="%1.0f%%", pctdistance=0.62,
                                      wedgeprops={"edgecolor": "white", "linewidth": 0.8}, textprops={"fontsize": 8})
        for w, p in zip(wedges, keys):
            w.set_hatch(hatches[p])
        for t, p in zip(autotexts, keys):  # a slice too thin for its number: the title has it
            t.set_visible(sel[p] / total >= 0.1)
        total_e = sum(elig.values())
        sel_txt = " ".join(f"{p} {100 * sel[p] / total:.0f}%" for p in "qkv")
        e_txt = " ".join(f"{p} {100 * elig[p] / total_e:.0f}%" for p in "qkv") if total_e else "unknown"
        ax.set_title(f"{fmt_budget(b)} · {plural(n, 'run')}\nselected: {sel_txt}\neligible: {e_txt}", fontsize=8)
    handles = [Patch(facecolor=colors[p], hatch=hatches[p], edgecolor="white", label=p) for p in "qkv"]
    fig_legend(fig, handles, [f"{p} projection" for p in "qkv"], where="bottom")
    fig.get_layout_engine().set(h_pad=0.08)  # (the pies' titles would otherwise touch the figure's)
    fig.suptitle(fit(f"{SHARE_TITLE} · {s.label}", width, 9), fontsize=9)
    return fig


# --- the paper-layout table ------------------------------------------------------------------------------

PAPER_TABLES = "paper_tables.csv"


def published_tables() -> list[dict]:
    text = resources.files(__package__).joinpath("assets").joinpath(PAPER_TABLES).read_text("utf-8")
    return list(csv.DictReader(text.splitlines()))


def _published_rows(model: str, protocol: str, tasks: frozenset) -> list[dict]:
    """Published rows (one per method/label, per-task accuracies) for this model, protocol and task set."""
    by: dict[tuple, dict] = {}
    for r in published_tables():
        if r["model"].lower() != model.lower() or not protocol.startswith(r["protocol"]):
            continue
        key = (r["benchmark"], r["method"], r["label"], r["trainable_pct"], r["source"])
        by.setdefault(key, {})[r["task"]] = float(r["accuracy"])
    out = []
    for (bench, method, label, pct, source), accs in by.items():
        if _task_set(";".join(t for t in accs if t != "average")) == tasks:
            out.append({"benchmark": bench, "method": method, "label": label, "pct": float(pct), "source": source,
                        "acc": {_norm_task(t): v for t, v in accs.items()}})
    return sorted(out, key=lambda r: (r["method"], r["pct"]))


def layout_section(s: Setting) -> list[str]:
    """Per-task accuracy of every cell in the paper's table layout, published rows beside ours."""
    c = s.cells
    if not len(c):
        return []
    tasks = [t for t in str(c["tasks"].iloc[0]).split(";") if t]
    if len(tasks) < 2:
        return []
    pub = _published_rows(str(c["model"].iloc[0]), str(c["protocol"].iloc[0]), _task_set(";".join(tasks)))
    if pub:  # the published table's column order
        first = [t for t in pub[0]["acc"] if t != "average"]
        tasks = sorted(tasks, key=lambda t: first.index(_norm_task(t)) if _norm_task(t) in first else len(first))
    order = sorted(range(len(c)), key=lambda i: (s.palette.key(c.iloc[i]["method"]), c.iloc[i]["series"],
                                                 c.iloc[i]["budget_fraction"]))
    rows = []
    for i in order:
        r = c.iloc[i]
        rows.append([f"{r['series']}", f"{r['trainable_pct']:.3g}", str(r["n"])]
                    + [f"{r.get(f'acc.{t}', math.nan):.1f}" for t in tasks] + [f"{r['acc_mean']:.1f}", "this run set"])
    sources = sorted({p["source"] for p in pub})
    for p in pub:
        rows.append([p["label"], f"{p['pct']:.3g}", "published"]
                    + [f"{p['acc'][_norm_task(t)]:.1f}" if _norm_task(t) in p["acc"] else "—" for t in tasks]
                    + [f"{p['acc'].get('average', math.nan):.1f}", f"[{sources.index(p['source']) + 1}]"])
    out = ["### Paper layout: accuracy per task", "",
           "Each cell's mean over its seeds per task, and the unweighted mean of the tasks (the paper's Avg.)."
           + ("" if pub else f" No published table matches {c['model'].iloc[0]} with this protocol and task set; "
                             f"published rows appear where one does (LLaMA-7B/2-7B/3-8B on LLM-Adapters' "
                             f"commonsense-8 or math with the generative protocol)."), ""]
    out += table(["method", "trainable %", "runs"] + tasks + ["Avg.", "source"], rows)
    out += [f"[{k}] {src}" for k, src in enumerate(sources, 1)] + ([""] if sources else [])
    return out


SECTIONS = (*(comparison_section(c) for c in COMPARISONS), layout_section)
FIGURES = (*(Figure(c.stem, c.title, f"SMT runs that differ only in method.{c.key}, per budget: mean accuracy "
                    f"± 95% t-interval over seeds (bars), one dot per seed.", comparison_figure(c))
             for c in COMPARISONS),
           Figure("paper_qkv_share", SHARE_TITLE, SHARE_CAPTION, share_figure))
