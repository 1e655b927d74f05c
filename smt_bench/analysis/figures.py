"""The figures: one style, one colour per method everywhere, PNG + PDF without dates in them."""
from __future__ import annotations

import math
import textwrap
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402
import pandas as pd  # noqa: E402

from .load import GROUPS, MEMORY_PARTS, PROJECTIONS, short_projection  # noqa: E402
from .stats import Plateau, fmt_budget, pareto_front  # noqa: E402

METHOD_ORDER = ("full_ft", "lora", "dora", "smt")
METHOD_COLORS = {"full_ft": "#404040", "lora": "#1f77b4", "dora": "#ff7f0e", "smt": "#2ca02c"}
EXTRA_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#d62728")
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


def method_key(method: str) -> tuple:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


class Palette:
    """Colour per method (fixed for the four known ones, then by name), marker/line per series."""

    def __init__(self, methods, series_by_method: dict[str, list[str]]):
        extra = sorted(m for m in set(methods) if m not in METHOD_COLORS)
        self.colors = dict(METHOD_COLORS)
        for i, m in enumerate(extra):
            self.colors[m] = EXTRA_COLORS[i % len(EXTRA_COLORS)]
        self.style = {}
        for m, series in series_by_method.items():
            base = METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER) + extra.index(m)
            for i, s in enumerate(sorted(series)):  # a method's variants: other markers and line styles
                self.style[s] = (MARKERS[(base + i) % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)])

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


def _wrap(title: str, width: int = 80) -> str:
    return textwrap.fill(title, width)


def _note(ax, text: str):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True, fontsize=9, color="#555555")


def _ordered_series(cells: pd.DataFrame) -> list[tuple[str, str]]:
    pairs = {(m, s) for m, s in zip(cells["method"], cells["series"])}
    return sorted(pairs, key=lambda p: (method_key(p[0]), p[1]))


def _ft(cells: pd.DataFrame):
    ft = cells[cells["method"] == "full_ft"]
    if not len(ft):
        return None
    return ft[ft["series"] == ft["ft_series"].iloc[0]].sort_values("budget_fraction").iloc[-1]


# --- 1. accuracy vs trainable parameters ------------------------------------------------------
def accuracy_vs_params(cells: pd.DataFrame, plateaus: dict[str, Plateau | None], pal: Palette, title: str):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ev = cells[cells["n"] > 0]
    ft = _ft(ev)
    drawn = False
    for method, series in _ordered_series(ev):
        if method == "full_ft":
            continue
        c = ev[ev["series"] == series].sort_values("budget_fraction")
        x, y = c["trainable_pct"].to_numpy(), c["acc_mean"].to_numpy()
        ci = np.nan_to_num(c["acc_ci"].to_numpy(), nan=0.0)
        col = pal.color(method)
        ax.plot(x, y, color=col, marker=pal.marker(series), ls=pal.line(series), label=f"{series}")
        if (ci > 0).any():
            ax.fill_between(x, y - ci, y + ci, color=col, alpha=0.18, lw=0)
        pl = plateaus.get(series)
        if pl is not None and pl.index is not None:
            k = list(c["budget_fraction"]).index(pl.budget)
            ax.plot([x[k]], [y[k]], marker="*", ms=15, mfc="none", mec=col, mew=1.4, ls="none")
        drawn = True
    if ft is not None:
        col = pal.color("full_ft")
        ax.axhline(ft["acc_mean"], color=col, ls="--", lw=1.2, label=f"{ft['series']} (n={ft['n']})")
        if np.isfinite(ft["acc_ci"]):
            ax.axhspan(ft["acc_mean"] - ft["acc_ci"], ft["acc_mean"] + ft["acc_ci"], color=col, alpha=0.12, lw=0)
        drawn = True
    if drawn:
        ax.plot([], [], marker="*", ms=11, mfc="none", mec="#333333", ls="none", label="plateau start")
        _logx(ax)
        ax.legend(loc="best")
    else:
        _note(ax, "no evaluated runs in this setting")
    ax.set_xlabel("trainable parameters (% of model, achieved; log scale)")
    ax.set_ylabel("mean accuracy (%)")
    ax.set_title(_wrap(title))
    return fig


# --- 2. memory --------------------------------------------------------------------------------
def _bar_cells(cells: pd.DataFrame) -> pd.DataFrame:
    order = sorted(range(len(cells)), key=lambda i: (method_key(cells.iloc[i]["method"]), cells.iloc[i]["series"],
                                                     cells.iloc[i]["budget_fraction"]))
    return cells.iloc[order]


def memory(cells: pd.DataFrame, pal: Palette, title: str):
    c = _bar_cells(cells)
    ft = _ft(cells)
    denom = ft["peak_memory_bytes"] if ft is not None and np.isfinite(ft["peak_memory_bytes"]) else None
    scale, unit = (denom, "relative to full FT's measured peak") if denom else (GIB, "GiB (no full-FT run)")
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(c) + 2.0), 4.2))
    if not len(c):
        _note(ax, "no finished runs in this setting")
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
        ax.axhline(1.0, color=pal.color("full_ft"), ls="--", lw=0.8)
    ax.set_xticks(x, [f"{s}\n{fmt_budget(b)}" for s, b in zip(c["series"], c["budget_fraction"])],
                  rotation=45, ha="right")
    for tick, m in zip(ax.get_xticklabels(), c["method"]):
        tick.set_color(pal.color(m))
    kinds = ",".join(sorted(set(",".join(c["peak_memory_kind"]).split(",")) - {""})) if len(c) else ""
    ax.set_ylabel(f"memory, {unit}")
    ax.set_title(_wrap(title) + (f"\npeak kind: {kinds}" if kinds else ""))
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
        for method, series in _ordered_series(cells):
            if method == "full_ft":
                continue
            c = cells[cells["series"] == series].sort_values("budget_fraction")
            x = c["trainable_pct"].to_numpy()
            y = c[col].to_numpy() / scale
            err = np.nan_to_num(c[f"{col}_ci"].to_numpy(), nan=0.0) / scale
            ax.errorbar(x, y, yerr=err, color=pal.color(method), marker=pal.marker(series), ls=pal.line(series),
                        capsize=2, label=series)
            drawn = True
        if ref:
            ax.axhline(1.0, color=pal.color("full_ft"), ls="--", lw=1.2, label=f"{ft['series']} = 1")
        elif ft is not None:
            ax.axhline(ft[col], color=pal.color("full_ft"), ls="--", lw=1.2, label=ft["series"])
        if drawn:
            _logx(ax)
        if drawn or ft is not None:
            ax.legend(loc="best")
        else:
            _note(ax, "no finished runs in this setting")
        ax.set_xlabel("trainable parameters (% of model, log scale)")
        ax.set_ylabel(f"{name}{' / full FT' if ref else ''}")
    fig.suptitle(_wrap(title))
    return fig


# --- 4. SMT block map -------------------------------------------------------------------------
def block_counts(block_maps: list[list], eligible=()) -> tuple[np.ndarray, list[str], int]:
    """Mean count matrix (layers x projections) over runs, the projection columns, the layer count.
    Eligible projections get a column even when no block of theirs was chosen (a zero is a finding)."""
    projs = set(eligible)
    layers = 0
    for bmap in block_maps:
        for layer, proj, *_ in bmap:
            projs.add(short_projection(proj))
            if layer is not None:
                layers = max(layers, int(layer) + 1)
    cols = [p for p in PROJECTIONS if p in projs] + sorted(projs - set(PROJECTIONS))
    mat = np.zeros((max(layers, 1), len(cols)))
    for bmap in block_maps:
        for layer, proj, *_ in bmap:
            if layer is not None:
                mat[int(layer), cols.index(short_projection(proj))] += 1
    return mat / max(len(block_maps), 1), cols, layers


def smt_blocks(cells: pd.DataFrame, maps: dict[tuple[str, float], list[list]], pal: Palette, title: str,
               eligible: dict[tuple[str, float], set] | None = None):
    """maps: (series, budget) -> block maps of its runs; eligible: -> short names of the projections SMT could
    select. Heatmaps per (series, budget) + share bars."""
    smt_cells = cells[cells["smt_blocks"].notna() & (cells["smt_blocks"] > 0)].sort_values(
        ["series", "budget_fraction"], kind="stable")
    keys = [(s, b) for s, b in zip(smt_cells["series"], smt_cells["budget_fraction"]) if (s, b) in maps]
    has_rate = bool(len(smt_cells)) and smt_cells[[f"smt_eligible_{g}" for g in GROUPS]].fillna(0).to_numpy().sum() > 0
    n_panels = len(keys) + 1 + has_rate
    ncols = min(4, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols + 0.6, 3.3 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    for ax, (series, budget) in zip(flat, keys):
        mat, cols, layers = block_counts(maps[(series, budget)], (eligible or {}).get((series, budget), ()))
        im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest", origin="lower")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_ylabel("layer")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(False)
        n = len(maps[(series, budget)])
        ax.set_title(f"{series} {fmt_budget(budget)}\nblocks per run (mean of {n})", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if not len(smt_cells):
        _note(flat[len(keys)], "no SMT runs with a block map\nin this setting")
    else:
        _group_bars(flat[len(keys)], smt_cells, "smt_blocks", "share of selected blocks", "share per projection")
        if has_rate:
            _group_bars(flat[len(keys) + 1], smt_cells, "smt_eligible", "selected / eligible blocks",
                        "rate per projection (size-fair)")
    fig.suptitle(_wrap(title))
    fig.tight_layout()
    return fig


def _group_bars(ax, smt_cells: pd.DataFrame, denominator: str, ylabel: str, title: str):
    """Bars per projection group for each SMT cell: selected blocks over the total (share) or over the
    group's own eligible blocks (rate)."""
    labels = [f"{s}\n{fmt_budget(b)}" for s, b in zip(smt_cells["series"], smt_cells["budget_fraction"])]
    x = np.arange(len(smt_cells))
    width = 0.8 / len(GROUPS)
    shades = {"q": "#9ecae1", "k": "#6baed6", "v": "#2ca02c", "o": "#fdae6b", "mlp": "#bdbdbd"}
    for i, g in enumerate(GROUPS):
        den = smt_cells[denominator] if denominator == "smt_blocks" else smt_cells[f"{denominator}_{g}"]
        with np.errstate(divide="ignore", invalid="ignore"):
            value = (smt_cells[f"smt_blocks_{g}"] / den.where(den > 0)).to_numpy(dtype=float)
        if np.nan_to_num(value).sum() == 0 and not (denominator != "smt_blocks" and (den > 0).any()):
            continue
        ax.bar(x + (i - (len(GROUPS) - 1) / 2) * width, value, width, color=shades[g], label=g)
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), title="projection", fontsize=7, title_fontsize=7)
    ax.set_title(title, fontsize=8)


# --- 5. Pareto --------------------------------------------------------------------------------
def pareto(cells: pd.DataFrame, pal: Palette, title: str):
    c = _bar_cells(cells[cells["n"] > 0])
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
        ax.legend(loc="best")
    else:
        _note(ax, "no evaluated runs with a measured peak in this setting")
    ax.set_xlabel("peak memory / full FT" if use_ratio else "peak memory (GiB; no full-FT run)")
    ax.set_ylabel("mean accuracy (%)")
    ax.set_title(_wrap(title))
    return fig


# --- 6. published numbers ---------------------------------------------------------------------
def published_overlay(groups: list[dict], pal: Palette):
    """groups: [{'title', 'published': DataFrame, 'cells': DataFrame of matching cells, 'note'}]."""
    n = max(len(groups), 1)
    fig, axes = plt.subplots(1, n, figsize=(6.4 * n, 4.4), squeeze=False)
    if not groups:
        _note(axes[0, 0], "no published numbers")
    for ax, g in zip(axes.flat, groups):
        pub = g["published"]
        for method in sorted(set(pub["method"]), key=method_key):
            p = pub[pub["method"] == method].sort_values("trainable_pct")
            ax.plot(p["trainable_pct"], p["mean_accuracy"], color=pal.color(method), ls="--", marker="o", mfc="white",
                    label=f"{method} (published)")
            for _, r in p.iterrows():
                ax.annotate(f"r={int(r['rank'])}" if pd.notna(r.get("rank")) else "", (r["trainable_pct"],
                            r["mean_accuracy"]), textcoords="offset points", xytext=(3, -9), fontsize=6,
                            color="#555555")
        c = g["cells"]
        if len(c):
            for method, series in _ordered_series(c):
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


# --- SMT selection stability -------------------------------------------------------------------
def selection_stability(summary_rows: list[dict], title: str):
    """Mean Jaccard per compared factor (bar) with the lowest pair as a marker, one group per budget."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(summary_rows) + 2.0), 3.6))
    if not summary_rows:
        _note(ax, "no two SMT selections differ in exactly one factor")
    labels = [f"{r['factor']}\n{r['compared'].replace(' vs ', chr(10) + 'vs ')}\n{100 * r['budget']:g}%"
              for r in summary_rows]
    x = np.arange(len(summary_rows))
    colors = {f: c for f, c in zip(("seed", "warmup_steps", "accumulation", "score"),
                                   ("#4c72b0", "#55a868", "#c44e52", "#8172b2"))}
    ax.bar(x, [r["mean"] for r in summary_rows], color=[colors.get(r["factor"], "#777777") for r in summary_rows])
    ax.plot(x, [r["min"] for r in summary_rows], "k_", ms=14, label="lowest pair")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("Jaccard of selected blocks")
    if summary_rows:
        ax.legend(loc="lower right")
    fig.suptitle(_wrap(title))
    return fig
