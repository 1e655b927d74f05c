"""Where SMT puts its blocks: share and size-fair rate per projection group (tables), and the block map
(heatmaps per layer and projection, with share and rate bars)."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from smt_bench.analysis.figures import note, wrap
from smt_bench.analysis.markdown import plural, table
from smt_bench.analysis.registry import Setting
from smt_bench.analysis.stats import fmt_budget

from .columns import GROUPS, PROJECTIONS, short_projection

TITLE = "SMT block map"
CAPTION = ("Selected blocks per layer and projection (mean per run) for each SMT budget, and the share of selected "
           "blocks per projection (q, k, v, o, mlp = gate+up+down); where runs record what was eligible, also each "
           "projection's selected / eligible rate, which does not favour the projections that offer more blocks.")


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


def block_map_figure(s: Setting):
    """The block map of one setting: the maps of its runs per (series, budget)."""
    maps, eligible = {}, {}
    for f, series, b, e in zip(s.runs["file"], s.runs["series"], s.runs["budget_fraction"],
                               s.runs["smt_eligible_projections"]):
        if s.method_info[f].get("block_map"):
            maps.setdefault((series, b), []).append(s.method_info[f]["block_map"])
            eligible.setdefault((series, b), set()).update(p for p in e.split(";") if p)
    return _figure(s.cells, maps, s.label, eligible)


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


def _figure(cells: pd.DataFrame, maps: dict[tuple[str, float], list[list]], title: str,
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
        note(flat[len(keys)], "no SMT runs with a block map\nin this setting")
    else:
        _group_bars(flat[len(keys)], smt_cells, "smt_blocks", "share of selected blocks", "share per projection")
        if has_rate:
            _group_bars(flat[len(keys) + 1], smt_cells, "smt_eligible", "selected / eligible blocks",
                        "rate per projection (size-fair)")
    fig.suptitle(wrap(title))
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
