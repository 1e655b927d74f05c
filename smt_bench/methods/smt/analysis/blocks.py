"""Where SMT puts its blocks: share and size-fair rate per projection group (tables), and the block map
(heatmaps per layer and projection, with share and rate bars)."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from smt_bench.analysis.figures import figure, fit, main_cells, note, short
from smt_bench.analysis.markdown import plural, table
from smt_bench.analysis.registry import Setting
from smt_bench.analysis.stats import fmt_budget

from .columns import GROUPS, PROJECTIONS, short_projection

TITLE = "SMT block map"
CAPTION = ("Selected blocks per layer and projection (mean per run) for each budget of SMT's main series, and the "
           "share of selected blocks per projection (q, k, v, o, mlp = gate+up+down); where runs record what was "
           "eligible, also each projection's selected / eligible rate, which does not favour the projections that "
           "offer more blocks.")


def share_section(s: Setting) -> list[str]:
    """Selected blocks per projection group, per cell and pooled: does v get the most, as the paper found?"""
    c, runs = s.cells, s.runs
    sc = c[c["smt_blocks"].notna() & (c["smt_blocks"] > 0)].sort_values(["series", "budget_fraction"], kind="stable")
    if not len(sc):
        return []
    out = ["### SMT block share per projection", ""]
    groups = [g for g in GROUPS if sc[f"smt_blocks_{g}"].fillna(0).sum() > 0]
    rows = []
    v_top = 0
    for _, r in sc.iterrows():
        counts = {g: r[f"smt_blocks_{g}"] for g in groups}
        top = max(counts.values())
        leaders = [g for g in groups if counts[g] == top]
        v_top += leaders == ["v"]
        rows.append([r["series"], fmt_budget(r["budget_fraction"]), str(r["n_runs"])]
                    + [f"{counts[g]:.1f} ({100 * counts[g] / r['smt_blocks']:.1f}%)" for g in groups]
                    + ["=".join(leaders)])
    out += table(["method", "budget", "runs"] + groups + ["largest"], rows)
    srun = runs[runs["smt_blocks"].notna() & (runs["smt_blocks"] > 0)]
    pooled = {g: float(srun[f"smt_blocks_{g}"].fillna(0).sum()) for g in groups}
    total = sum(pooled.values())
    top = max(pooled.values())
    leaders = [g for g in groups if pooled[g] == top]
    counts_txt = ", ".join(f"{g} {pooled[g]:g} ({100 * pooled[g] / total:.1f}%)" for g in groups)
    verdict = ("**yes**: v has the largest share" if leaders == ["v"] else
               f"**no**: the largest share is {'='.join(leaders)}" + (" (tied with v)" if "v" in leaders else ""))
    from_share = (srun["smt_blocks"] <= 1.0 + 1e-9).any()
    out += [f"\"V matters most\" on these runs: {verdict}. Selected blocks pooled over {plural(len(srun), 'SMT run')}: "
            f"{counts_txt}; v leads alone in {v_top} of {len(sc)} budget cells.",
            "Counts are raw, not divided by how many blocks each projection offers (with grouped-query attention "
            "k and v are smaller than q), and only projections with a selected block appear."
            + (" Some runs carry only `block_share` (no `block_map`): their counts are shares." if from_share else ""),
            ""]
    return out + _rate_section(sc, srun)


def _rate_section(sc: pd.DataFrame, srun: pd.DataFrame) -> list[str]:
    """Selected / eligible per projection group: the size-fair reading of the share table. A projection
    whose rate nears 100% is saturated, so its share of a larger budget must fall."""
    groups = [g for g in GROUPS if sc[f"smt_eligible_{g}"].fillna(0).sum() > 0]
    known = srun[srun[[f"smt_eligible_{g}" for g in GROUPS]].notna().any(axis=1)]
    if not groups or not len(known):
        return []
    rows = []
    for _, r in sc.iterrows():
        cells = []
        for g in groups:
            sel, elig = r[f"smt_blocks_{g}"], r[f"smt_eligible_{g}"]
            cells.append(f"{100 * sel / elig:.1f}% of {elig:g}" if elig > 0 else "")
        rows.append([r["series"], fmt_budget(r["budget_fraction"]), str(r["n_runs"])] + cells)
    out = ["Selected blocks as a share of the blocks each projection offers (mean per run):", ""]
    out += table(["method", "budget", "runs"] + groups, rows)
    rate = {g: float(known[f"smt_blocks_{g}"].fillna(0).sum()) / float(known[f"smt_eligible_{g}"].sum())
            for g in groups if known[f"smt_eligible_{g}"].sum() > 0}
    top = max(rate.values())
    leaders = [g for g in rate if rate[g] == top]
    out += [f"Per eligible block, pooled over {plural(len(known), 'SMT run')} that record `eligible_blocks`: "
            + ", ".join(f"{g} {100 * rate[g]:.1f}%" for g in rate)
            + f"; most selected: {'='.join(leaders)}.", ""]
    return out


def _maps(s: Setting) -> tuple[dict, dict]:
    """(series, budget) -> the block maps of its runs, and -> the short names of the projections SMT could select."""
    maps: dict[tuple, list] = {}
    eligible: dict[tuple, set[str]] = {}
    for f, series, b, e in zip(s.runs["file"], s.runs["series"], s.runs["budget_fraction"],
                               s.runs["smt_eligible_projections"]):
        if s.method_info[f].get("block_map"):
            maps.setdefault((series, b), []).append(s.method_info[f]["block_map"])
            eligible.setdefault((series, b), set()).update(p for p in e.split(";") if p)
    return maps, eligible


def block_map_figure(s: Setting):
    """The block map of SMT's main series in one setting: a heat map per budget, share and rate bars."""
    maps, eligible = _maps(s)
    return _figure(s.cells, maps, s.label, eligible)


def variant_block_map_figure(s: Setting):
    """The block maps of SMT's other series (one heat map per series and budget); None where it has none."""
    maps, eligible = _maps(s)
    c = _smt_cells(s.cells)
    if "main" not in c.columns:
        return None
    var = c[~c["main"].astype(bool)]
    keys = [(sr, b, v or sr) for sr, b, v in zip(var["series"], var["budget_fraction"], var["variant"])
            if (sr, b) in maps]
    if not keys:
        return None
    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    width = PANEL_W * ncols + 0.4
    fig, axes = figure(width, PANEL_H * nrows + 0.9, nrows, ncols)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, (series, budget, variant) in zip(axes.flat, keys):
        n = len(maps[(series, budget)])
        _heatmap(fig, ax, maps[(series, budget)], eligible.get((series, budget), ()),
                 f"{variant}\n{fmt_budget(budget)} · {plural(n, 'run')}")
    fig.suptitle(fit(f"{VARIANTS_TITLE} · {s.label}", width, 10), fontsize=10)
    return fig


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


PANEL_W, PANEL_H = 2.7, 3.1  # inches per heat map
SHADES = {"q": "#9ecae1", "k": "#6baed6", "v": "#2ca02c", "o": "#fdae6b", "mlp": "#bdbdbd"}
HATCHES = {"q": "//", "k": "\\\\", "v": "", "o": "..", "mlp": "xx"}  # the groups apart in grey-scale print too
VARIANTS_TITLE = "SMT block map of the other series"
VARIANTS_CAPTION = ("Selected blocks per layer and projection (mean per run) of each SMT series that is not the main "
                    "one, per budget; titled by what differs from the main series.")


def _smt_cells(cells: pd.DataFrame) -> pd.DataFrame:
    return cells[cells["smt_blocks"].notna() & (cells["smt_blocks"] > 0)].sort_values(
        ["series", "budget_fraction"], kind="stable")


def _heatmap(fig, ax, block_maps: list[list], eligible, title: str):
    mat, cols, layers = block_counts(block_maps, eligible)
    im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest", origin="lower")
    ax.set_xticks(range(len(cols)), cols, rotation=90 if len(cols) > 5 else 0)
    ax.set_xlabel("projection")
    ax.set_ylabel("layer")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(False)
    ax.set_title(fit(title, PANEL_W - 0.5, 8), fontsize=8)
    cb = fig.colorbar(im, ax=ax, fraction=0.08, pad=0.03)
    cb.set_label("blocks per run", fontsize=7)
    cb.ax.tick_params(labelsize=7)


def _figure(cells: pd.DataFrame, maps: dict[tuple[str, float], list[list]], title: str,
            eligible: dict[tuple[str, float], set] | None = None):
    """maps: (series, budget) -> block maps of its runs; eligible: -> short names of the projections SMT could
    select. A heat map per budget of SMT's main series (of every series where cells has no `main` column)
    above the share bars and, where runs record what was eligible, the rate bars."""
    smt_cells = main_cells(_smt_cells(cells))
    if not len(smt_cells):
        fig, axes = figure(6.0, 2.2)
        note(axes[0, 0], "no SMT runs with a block map in this setting")
        axes[0, 0].set_axis_off()
        fig.suptitle(fit(f"{TITLE} · {title}", 6.0, 10), fontsize=10)
        return fig
    several = smt_cells["series"].nunique() > 1
    keys = [(s, b) for s, b in zip(smt_cells["series"], smt_cells["budget_fraction"]) if (s, b) in maps]
    has_rate = smt_cells[[f"smt_eligible_{g}" for g in GROUPS]].fillna(0).to_numpy().sum() > 0
    ncols = max(2, min(4, len(keys)))
    nrows = math.ceil(len(keys) / ncols)
    width = PANEL_W * ncols + 0.4
    wide = len(smt_cells) > 6  # many cells: the share and the rate bars get a row each
    bar_rows = 1 + (wide and has_rate)
    bar_h = 3.0 + (1.4 if several else 0.0)  # (room for series names under the bars)
    fig = plt.figure(figsize=(width, PANEL_H * nrows + bar_h * bar_rows + 0.9), layout="constrained")
    grid = fig.add_gridspec(nrows + bar_rows, 1, height_ratios=[PANEL_H] * nrows + [bar_h] * bar_rows)
    top = grid[:nrows].subgridspec(nrows, ncols) if nrows else None
    for i, (series, budget) in enumerate(keys):
        assert top is not None  # keys: nrows > 0
        ax = fig.add_subplot(top[i // ncols, i % ncols])
        n = len(maps[(series, budget)])
        _heatmap(fig, ax, maps[(series, budget)], (eligible or {}).get((series, budget), ()),
                 (f"{short(series, 30)}\n" if several else "") + f"{fmt_budget(budget)} · {plural(n, 'run')}")
    if wide:
        ax_share = fig.add_subplot(grid[nrows])
        ax_rate = fig.add_subplot(grid[nrows + 1]) if has_rate else None
    else:
        bottom = grid[nrows].subgridspec(1, 2)
        ax_share = fig.add_subplot(bottom[0, 0])
        ax_rate = fig.add_subplot(bottom[0, 1]) if has_rate else None
    labels = [(f"{short(s, 22)}\n" if several else "") + fmt_budget(b)
              for s, b in zip(smt_cells["series"], smt_cells["budget_fraction"])]
    _group_bars(ax_share, smt_cells, labels, "smt_blocks", "share of selected blocks", "share per projection")
    if ax_rate is not None:
        _group_bars(ax_rate, smt_cells, labels, "smt_eligible", "selected ÷ eligible blocks",
                    "rate per projection (size-fair)")
    handles = [Patch(facecolor=SHADES[g], hatch=HATCHES[g], edgecolor="#555555", label=g) for g in GROUPS]
    ax_share.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                    title="projection", fontsize=7, title_fontsize=7)
    fig.suptitle(fit(f"{TITLE} · {title}" + ("" if several else " · main series"), width, 10), fontsize=10)
    return fig


def _group_bars(ax, smt_cells: pd.DataFrame, labels: list[str], denominator: str, ylabel: str, title: str):
    """Bars per projection group for each SMT cell: selected blocks over the total (share) or over the
    group's own eligible blocks (rate)."""
    x = np.arange(len(smt_cells))
    width = 0.8 / len(GROUPS)
    for i, g in enumerate(GROUPS):
        den = smt_cells[denominator] if denominator == "smt_blocks" else smt_cells[f"{denominator}_{g}"]
        with np.errstate(divide="ignore", invalid="ignore"):
            value = (smt_cells[f"smt_blocks_{g}"] / den.where(den > 0)).to_numpy(dtype=float)
        if np.nan_to_num(value).sum() == 0 and not (denominator != "smt_blocks" and (den > 0).any()):
            continue
        ax.bar(x + (i - (len(GROUPS) - 1) / 2) * width, value, width, color=SHADES[g], hatch=HATCHES[g],
               edgecolor="#555555", linewidth=0.4, label=g)
    long = max(len(line) for lbl in labels for line in lbl.split("\n")) > 8
    ax.set_xticks(x, labels, fontsize=7, rotation=90 if long else 0)
    ax.set_xlabel("trainable budget (% of model)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(False, axis="x")
    ax.set_title(title, fontsize=8)
