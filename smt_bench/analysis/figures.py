"""The figures: one style, one colour per method everywhere, PNG + PDF without dates in them."""
from __future__ import annotations

import textwrap
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402
import pandas as pd  # noqa: E402

from . import registry  # noqa: E402
from .schema import MEMORY_PARTS  # noqa: E402
from .stats import Plateau, fmt_budget, pareto_front  # noqa: E402

REFERENCE_COLOR = "#404040"  # the method every ratio is taken against
# the rest, in display order (tab10 without its grey, red last)
GENERIC_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#d62728")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", ":", "-.")
PART_COLORS = {"weights": "#d9d9d9", "gradients": "#a8a8a8", "optimizer": "#6f6f6f", "activations": "#e6d3a3"}
GIB = 1024 ** 3

STYLE = {
    "figure.dpi": 100, "savefig.dpi": 150, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
    "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3,
    "axes.spines.top": False, "axes.spines.right": False, "font.family": "DejaVu Sans",
    "svg.hashsalt": "smt-bench",
}
PNG_META = {"Software": None}
PDF_META = {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}


class Palette:
    """Display order, colour per method and marker/line per series, the same in every figure and table.

    Order: the reference methods first (full fine-tuning: what the ratios divide by), then by each method's
    contributed `order`, then by name. Colours: grey for a reference, a contributed colour where one is
    given, else the next generic colour not already taken (deterministic for a given set of methods)."""

    def __init__(self, methods, series_by_method: dict[str, list[str]], reference=()):
        self.reference = set(reference)
        self.known = sorted(set(methods) | set(series_by_method), key=self.key)
        self.colors = {m: REFERENCE_COLOR for m in self.known if m in self.reference}
        for m in self.known:
            c = registry.contribution(m)
            if m not in self.colors and c is not None and c.color:
                self.colors[m] = c.color
        free = [c for c in GENERIC_COLORS if c not in self.colors.values()]
        for i, m in enumerate(m for m in self.known if m not in self.colors):
            self.colors[m] = free[i % len(free)]
        self.style = {}
        for m, series in series_by_method.items():
            base = self.known.index(m)
            for i, s in enumerate(sorted(series)):  # a method's variants: other markers and line styles
                self.style[s] = (MARKERS[(base + i) % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)])

    def key(self, method: str) -> tuple:
        c = registry.contribution(method)
        return (method not in self.reference, c.order if c else 0, method)

    def color(self, method: str) -> str:
        return self.colors.get(method, "#000000")

    def marker(self, series: str) -> str:
        return self.style.get(series, ("o", "-"))[0]

    def line(self, series: str) -> str:
        return self.style.get(series, ("o", "-"))[1]


@contextmanager
def styled():
    with plt.rc_context(STYLE):
        yield


def save(fig, out_dir: Path, stem: str) -> list[str]:
    """Write stem.png and stem.pdf under out_dir; returns their names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / f"{stem}.png", metadata=PNG_META, bbox_inches="tight")
    fig.savefig(out_dir / f"{stem}.pdf", metadata=PDF_META, bbox_inches="tight")
    plt.close(fig)
    return [f"{stem}.png", f"{stem}.pdf"]


def _logx(ax):
    """Log x axis labelled 0.5, 1, 2, 5 ... rather than 5x10^-1."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def legend(ax, inside: int = 8):
    """Inside the axes while it is short; beside them (the saved figure grows to fit) once it would cover
    the data."""
    if len(ax.get_legend_handles_labels()[1]) <= inside:
        ax.legend(loc="best")
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)


def wrap(title: str, width: int = 80) -> str:
    return textwrap.fill(title, width)


def note(ax, text: str):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True, fontsize=9, color="#555555")


def _ordered_series(cells: pd.DataFrame, pal: Palette) -> list[tuple[str, str]]:
    pairs = {(m, s) for m, s in zip(cells["method"], cells["series"])}
    return sorted(pairs, key=lambda p: (pal.key(p[0]), p[1]))


def _reference_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells of one setting's reference series (full fine-tuning; see stats.cells)."""
    return cells[(cells["ft_series"] != "") & (cells["series"] == cells["ft_series"])] if len(cells) else cells


def _ft(cells: pd.DataFrame):
    ft = _reference_cells(cells)
    return ft.sort_values("budget_fraction").iloc[-1] if len(ft) else None


def _reference_method(cells: pd.DataFrame) -> str | None:
    """Drawn as a line to compare against, not as a series of its own."""
    ref = _reference_cells(cells)
    return ref["method"].iloc[0] if len(ref) else None


# --- 1. accuracy vs trainable parameters ------------------------------------------------------
def accuracy_vs_params(cells: pd.DataFrame, plateaus: dict[str, Plateau | None], pal: Palette, title: str):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ev = cells[cells["n"] > 0]
    ft = _ft(ev)
    drawn = False
    for method, series in _ordered_series(ev, pal):
        if method == _reference_method(cells):
            continue
        c = ev[ev["series"] == series].sort_values("budget_fraction")
        x, y = c["trainable_pct"].to_numpy(), c["acc_mean"].to_numpy()
        ci = np.nan_to_num(c["acc_ci"].to_numpy(), nan=0.0)
        col = pal.color(method)
        # a variant run at one budget is a point, not a curve (the paper figures compare those)
        ax.plot(x, y, color=col, marker=pal.marker(series), ls=pal.line(series) if len(c) > 1 else "none",
                label=f"{series}")
        if (ci > 0).any():
            ax.fill_between(x, y - ci, y + ci, color=col, alpha=0.18, lw=0)
        pl = plateaus.get(series)
        if pl is not None and pl.index is not None:
            k = list(c["budget_fraction"]).index(pl.budget)
            ax.plot([x[k]], [y[k]], marker="*", ms=15, mfc="none", mec=col, mew=1.4, ls="none")
        drawn = True
    if ft is not None:
        col = pal.color(ft["method"])
        ax.axhline(ft["acc_mean"], color=col, ls="--", lw=1.2, label=f"{ft['series']} (n={ft['n']})")
        if np.isfinite(ft["acc_ci"]):
            ax.axhspan(ft["acc_mean"] - ft["acc_ci"], ft["acc_mean"] + ft["acc_ci"], color=col, alpha=0.12, lw=0)
        drawn = True
    if drawn:
        ax.plot([], [], marker="*", ms=11, mfc="none", mec="#333333", ls="none", label="plateau start")
        _logx(ax)
        legend(ax)
    else:
        note(ax, "no evaluated runs in this setting")
    ax.set_xlabel("trainable parameters (% of model, achieved; log scale)")
    ax.set_ylabel("mean accuracy (%)")
    ax.set_title(wrap(title))
    return fig


# --- 2. memory --------------------------------------------------------------------------------
def _bar_cells(cells: pd.DataFrame, pal: Palette) -> pd.DataFrame:
    order = sorted(range(len(cells)), key=lambda i: (pal.key(cells.iloc[i]["method"]), cells.iloc[i]["series"],
                                                     cells.iloc[i]["budget_fraction"]))
    return cells.iloc[order]


def memory(cells: pd.DataFrame, pal: Palette, title: str):
    c = _bar_cells(cells, pal)
    ft = _ft(cells)
    denom = ft["peak_memory_bytes"] if ft is not None and np.isfinite(ft["peak_memory_bytes"]) else None
    scale, unit = (denom, "relative to full FT's measured peak") if denom else (GIB, "GiB (no full-FT run)")
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(c) + 2.0), 4.2))
    if not len(c):
        note(ax, "no finished runs in this setting")
    x = np.arange(len(c))
    bottom = np.zeros(len(c))
    for part in MEMORY_PARTS:
        v = np.nan_to_num(c[f"mem_{part}"].to_numpy(dtype=float), nan=0.0) / scale
        ax.bar(x, v, bottom=bottom, color=PART_COLORS[part], label=f"{part} (analytic)",
               edgecolor=[pal.color(m) for m in c["method"]], linewidth=1.0)
        bottom += v
    peak = c["peak_memory_bytes"].to_numpy(dtype=float) / scale
    ax.plot(x, peak, ls="none", marker="D", color="black", ms=5, label="measured peak")
    if denom:
        ax.axhline(1.0, color=pal.color(ft["method"]), ls="--", lw=0.8)
    ax.set_xticks(x, [f"{s}\n{fmt_budget(b)}" for s, b in zip(c["series"], c["budget_fraction"])],
                  rotation=45, ha="right")
    for tick, m in zip(ax.get_xticklabels(), c["method"]):
        tick.set_color(pal.color(m))
    kinds = ",".join(sorted(set(",".join(c["peak_memory_kind"]).split(",")) - {""})) if len(c) else ""
    ax.set_ylabel(f"memory, {unit}")
    ax.set_title(wrap(title) + (f"\npeak kind: {kinds}" if kinds else ""))
    if len(c):
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


# --- 3. throughput ----------------------------------------------------------------------------
def throughput(cells: pd.DataFrame, pal: Palette, title: str):
    ft = _ft(cells)
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.9))
    for ax, col, name in ((axes[0], "tokens_per_s", "training throughput (tokens/s)"),
                          (axes[1], "median_step_time_s", "median step time (s)")):
        ref = ft[col] if ft is not None and np.isfinite(ft[col]) and ft[col] > 0 else None
        scale = ref if ref else 1.0
        drawn = False
        for method, series in _ordered_series(cells, pal):
            if method == _reference_method(cells):
                continue
            c = cells[cells["series"] == series].sort_values("budget_fraction")
            x = c["trainable_pct"].to_numpy()
            y = c[col].to_numpy() / scale
            err = np.nan_to_num(c[f"{col}_ci"].to_numpy(), nan=0.0) / scale
            ax.errorbar(x, y, yerr=err, color=pal.color(method), marker=pal.marker(series), ls=pal.line(series),
                        capsize=2, label=series)
            drawn = True
        if ref:
            ax.axhline(1.0, color=pal.color(ft["method"]), ls="--", lw=1.2, label=f"{ft['series']} = 1")
        elif ft is not None:
            ax.axhline(ft[col], color=pal.color(ft["method"]), ls="--", lw=1.2, label=ft["series"])
        if drawn:
            _logx(ax)
        if drawn or ft is not None:
            legend(ax)
        else:
            note(ax, "no finished runs in this setting")
        ax.set_xlabel("trainable parameters (% of model, log scale)")
        ax.set_ylabel(f"{name}{' / full FT' if ref else ''}")
    fig.suptitle(wrap(title))
    return fig


# --- 4. Pareto --------------------------------------------------------------------------------
def pareto(cells: pd.DataFrame, pal: Palette, title: str):
    c = _bar_cells(cells[cells["n"] > 0], pal)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    use_ratio = c["mem_ratio"].notna().any() if len(c) else False
    xcol = "mem_ratio" if use_ratio else "peak_memory_bytes"
    x = c[xcol].to_numpy(dtype=float) / (1.0 if use_ratio else GIB)
    y = c["acc_mean"].to_numpy(dtype=float)
    front = pareto_front(x, y)
    seen = set()
    for xi, yi, m, s, b in zip(x, y, c["method"], c["series"], c["budget_fraction"]):
        ax.plot([xi], [yi], marker=pal.marker(s), color=pal.color(m), ls="none",
                label=s if s not in seen else None)
        seen.add(s)
        ax.annotate(fmt_budget(b), (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=6, color="#555555")
    pts = sorted((xi, yi) for xi, yi, f in zip(x, y, front) if f)
    if pts:
        px, py = zip(*pts)
        ax.step(px, py, where="post", color="black", lw=0.8, ls=":", label="Pareto front")
        ax.plot(px, py, ls="none", marker="o", ms=11, mfc="none", mec="black", mew=0.6)
        legend(ax)
    else:
        note(ax, "no evaluated runs with a measured peak in this setting")
    ax.set_xlabel("peak memory / full FT" if use_ratio else "peak memory (GiB; no full-FT run)")
    ax.set_ylabel("mean accuracy (%)")
    ax.set_title(wrap(title))
    return fig


# --- 5. published numbers ---------------------------------------------------------------------
def published_overlay(groups: list[dict], pal: Palette):
    """groups: [{'title', 'published': DataFrame, 'cells': DataFrame of matching cells, 'note'}]."""
    n = max(len(groups), 1)
    fig, axes = plt.subplots(1, n, figsize=(6.4 * n, 4.4), squeeze=False)
    if not groups:
        note(axes[0, 0], "no published numbers")
    for ax, g in zip(axes.flat, groups):
        pub = g["published"]
        for method in sorted(set(pub["method"]), key=pal.key):
            p = pub[pub["method"] == method].sort_values("trainable_pct")
            ax.plot(p["trainable_pct"], p["mean_accuracy"], color=pal.color(method), ls="--", marker="o", mfc="white",
                    label=f"{method} (published)")
            for _, r in p.iterrows():
                ax.annotate(f"r={int(r['rank'])}" if pd.notna(r.get("rank")) else "", (r["trainable_pct"],
                            r["mean_accuracy"]), textcoords="offset points", xytext=(3, -9), fontsize=6,
                            color="#555555")
        c = g["cells"]
        if len(c):
            for method, series in _ordered_series(c, pal):
                s = c[c["series"] == series].sort_values("budget_fraction")
                ax.errorbar(s["trainable_pct"], s["acc_mean"], yerr=np.nan_to_num(s["acc_ci"].to_numpy(), nan=0.0),
                            color=pal.color(method), marker=pal.marker(series), ls="-", capsize=2,
                            label=f"{series} (this benchmark)")
        _logx(ax)
        ax.set_xlabel("trainable parameters (% of model, log scale)")
        ax.set_ylabel("mean accuracy (%)")
        ax.set_title(g["title"], fontsize=9)
        if g.get("note"):
            ax.text(0.0, -0.16, textwrap.fill(g["note"], 100), transform=ax.transAxes, fontsize=7.5,
                    color="#a00000", va="top")
        ax.legend(loc="best", fontsize=7)
    return fig


FIGURES = (  # per setting; methods add their own (registry.Contribution.figures)
    registry.Figure(
        "accuracy_vs_params", "Accuracy vs trainable parameters",
        "Mean accuracy over seeds against the achieved trainable share of the model (log scale); bands are 95% "
        "t-intervals over seeds (none where a budget has one seed). Full FT is the dashed line with its band; a "
        "hollow star marks each method's plateau start.",
        lambda s: accuracy_vs_params(s.cells, s.plateaus, s.palette, s.label)),
    registry.Figure(
        "memory", "Peak memory relative to full FT",
        "Bars: the analytic breakdown (weights, gradients, optimizer state, activations saved for backward in one "
        "step; `train_info.memory_breakdown_bytes`), stacked. Marker: the measured peak (`peak_memory_bytes`, of "
        "the kind named in the title). Both are divided by full FT's measured peak.",
        lambda s: memory(s.cells, s.palette, s.label)),
    registry.Figure(
        "throughput", "Throughput and step time relative to full FT",
        "Training tokens/s and median step time, each divided by full FT's (mean ± 95% CI over seeds).",
        lambda s: throughput(s.cells, s.palette, s.label)),
    registry.Figure(
        "pareto", "Accuracy vs peak memory (Pareto front)",
        "Each point is one method and budget (mean over seeds); the dotted step line joins the runs no other run "
        "beats on both accuracy and peak memory.",
        lambda s: pareto(s.cells, s.palette, s.label)),
)
