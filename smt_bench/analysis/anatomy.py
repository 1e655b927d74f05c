"""The update anatomy in the report (smt_bench/anatomy measures it in each run): intruder dimensions against the
trainable budget (the analogue of Shuttleworth et al.'s figure 4), intruders against forgetting per run, and the
ΔW spectra of every method at one budget side by side; and the table and correlations the report prints.
Every piece returns nothing for a setting whose runs did not measure the anatomy."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from . import registry
from .figures import (_errorbar, _ft, _ordered_series, _reference_method, _styles, dodge, fig_legend, figure, fit,
                      main_cells, note, short, _logx)
from .flatten import ANATOMY_EPSILONS
from .markdown import forget, table
from .stats import fmt_budget


def _measured(cells: pd.DataFrame) -> pd.DataFrame:
    return cells[cells["intr_n"] > 0] if "intr_n" in cells.columns else cells.iloc[:0]


def _runs(s: registry.Setting) -> pd.DataFrame:
    r = s.runs
    if "intruders" not in r.columns:
        return r.iloc[:0]
    r = r[np.isfinite(r["intruders"].to_numpy(dtype=float))]
    return r[r["main"].astype(bool)] if "main" in r.columns else r


# --- figure 1: intruders vs budget -----------------------------------------------------------------
def intruders_vs_budget(cells: pd.DataFrame, pal, title: str):
    """One panel per ε of ANATOMY_EPSILONS: each method's intruder count (summed over its changed matrices; mean
    ± 95% CI over seeds) against its achieved trainable share; the reference (full FT) dashed with its band."""
    c = _measured(cells)
    if not len(c):
        return None
    fig, axes = figure(3.4 * len(ANATOMY_EPSILONS) + 2.2, 4.2, 1, len(ANATOMY_EPSILONS), sharey=True)
    main = main_cells(c)
    ref = _reference_method(c)
    ft = _ft(c)
    drawn = [(m, s) for m, s in _ordered_series(main, pal) if m != ref]
    styles = _styles(pal, drawn)
    top = 1.0
    for ax, eps in zip(axes[0], ANATOMY_EPSILONS):
        col = f"intruders@{eps}"
        for k, (method, series) in enumerate(drawn):
            sc = main[main["series"] == series].sort_values("budget_fraction")
            x = sc["trainable_pct"].to_numpy() * dodge(k, len(drawn))
            _errorbar(ax, x, sc[col].to_numpy(), sc[f"{col}_ci"], pal.color(method), *styles[series], short(series),
                      zorder=3)
            top = max(top, float(np.nanmax(sc[col].to_numpy(dtype=float))))
        if ft is not None and np.isfinite(ft[col]):
            color = pal.color(ft["method"])
            ax.axhline(ft[col], color=color, ls="--", lw=1.2, label=f"{ft['series']} (n={int(ft['intr_n'])})")
            if np.isfinite(ft[f"{col}_ci"]):
                ax.axhspan(ft[col] - ft[f"{col}_ci"], ft[col] + ft[f"{col}_ci"], color=color, alpha=0.1, lw=0)
            top = max(top, float(ft[col]))
        _logx(ax)
        ax.set_yscale("symlog", linthresh=1.0, linscale=0.6)
        ax.set_title(f"ε = {eps}" + (" (the paper's headline)" if eps == "0.5" else ""), fontsize=9)
        ax.set_xlabel("trainable parameters (% of model; log)")
    axes[0, 0].set_ylim(-0.3, top * 2.5)
    axes[0, 0].set_ylabel("intruder dimensions (sum over changed matrices; symlog)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig_legend(fig, handles, labels)
    fig.suptitle(fit(f"{title}: intruder dimensions per method and budget (top-10 vectors, mean ± 95% CI over "
                     "seeds)", fig.get_figwidth()), fontsize=10)
    return fig


# --- figure 2: intruders vs forgetting ------------------------------------------------------------
def spearman(x, y) -> tuple[float, int]:
    """Spearman's rank correlation of the finite pairs (NaN where fewer than 3, or either side is constant)."""
    d = pd.DataFrame({"x": x, "y": y}).replace([np.inf, -np.inf], np.nan).dropna()
    if len(d) < 3 or d["x"].nunique() < 2 or d["y"].nunique() < 2:
        return math.nan, len(d)
    return float(d["x"].rank().corr(d["y"].rank())), len(d)


def intruders_vs_forgetting(s: registry.Setting):
    """Each run of each method's main series against its held-out NLL change: left, its intruder count at the
    paper's ε = 0.5; right, how far its top-k directions moved (1 − their mean largest |cos| with the base's), the
    continuous measure behind the counts. Spearman's ρ over all runs in each panel's title."""
    r = _runs(s)
    r = r[np.isfinite(r["forgetting_nll_delta"].to_numpy(dtype=float))]
    if not len(r):
        return None
    pal = s.palette
    fig, axes = figure(11.0, 4.4, 1, 2, sharey=True)
    methods = sorted(set(r["method"]), key=pal.key)
    y = r["forgetting_nll_delta"].to_numpy(dtype=float)
    for ax, col in zip(axes[0], ("intruders", "top_k_drift")):
        for k, method in enumerate(methods):
            m = r[r["method"] == method]
            x = m[col].to_numpy(dtype=float)
            if col == "intruders":  # counts are integers: each method's points side by side
                nudge = 0.3 * (k - (len(methods) - 1) / 2) / max(len(methods) - 1, 1)
                x = x * (1 + 0.1 * nudge) + nudge
            ax.scatter(x, m["forgetting_nll_delta"], color=pal.color(method), marker=pal.method_marker(method),
                       s=26, alpha=0.85, label=short(method), zorder=3, edgecolors="none")
        rho, n = spearman(r[col], r["forgetting_nll_delta"])
        ax.set_title(f"Spearman ρ = {rho:+.2f} over {n} runs" if np.isfinite(rho)
                     else f"{n} runs: ρ undefined (no spread)", fontsize=9)
        ax.axhline(0, color="#999999", lw=0.6, zorder=0)
        ax.set_yscale("symlog", linthresh=0.01, linscale=0.5)
    axes[0, 0].set_ylim(min(-0.01, 2 * y.min()), max(0.01, 2 * y.max()))
    axes[0, 0].set_xscale("symlog", linthresh=1.0, linscale=0.6)
    axes[0, 0].set_xlim(-0.6, max(2.0, 2 * float(r["intruders"].max())))
    axes[0, 0].set_xlabel("intruder dimensions at ε = 0.5 (symlog; points nudged per method)")
    drift = r["top_k_drift"].to_numpy(dtype=float)
    if (drift > 0).any():
        axes[0, 1].set_xscale("log")
        axes[0, 1].set_xlim(float(drift[drift > 0].min()) / 2, float(drift.max()) * 2)
    axes[0, 1].set_xlabel("1 − mean top-10 |cos| with the base's vectors (log)")
    axes[0, 0].set_ylabel("held-out NLL change (nats; + = forgot; symlog)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig_legend(fig, handles, labels)
    fig.suptitle(fit(f"{s.label}: intruders and drift of the top directions vs forgetting, one point per run",
                     fig.get_figwidth()), fontsize=10)
    return fig


# --- figure 3: the spectra side by side -----------------------------------------------------------
def spectrum_budget(r: pd.DataFrame) -> float | None:
    """The budget most swept methods (those measured at two budgets or more) measured (ties: the smallest, where
    a low rank still shows inside the recorded directions); None where no method was swept."""
    per = r.groupby("method")["budget_fraction"].nunique()
    swept = r[r["method"].isin(per[per > 1].index)]
    counts = swept.groupby("budget_fraction")["method"].nunique()
    if not len(counts):
        return None
    return float(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0])


def _mean_spectrum(texts) -> np.ndarray:
    spectra = [json.loads(t) for t in texts if t]
    n = min((len(x) for x in spectra), default=0)
    return np.mean([x[:n] for x in spectra], axis=0) if n else np.array([])


def spectra(s: registry.Setting):
    """One panel per method (its main series) at one budget (spectrum_budget), a method measured at one budget
    only (full FT, HFT's half, LISA where its layers cannot meet the smaller budget) at its own: the energy share
    σᵢ² / ‖ΔW‖²_F of ΔW's top directions, averaged over every changed matrix and then over seeds; the reference
    method's spectrum dashed grey in every panel."""
    r = _runs(s)
    budget = spectrum_budget(r)
    if budget is None:
        return None
    pal = s.palette
    ref = _reference_method(s.cells)
    ref_spec = _mean_spectrum(r[r["method"] == ref]["dw_spectrum"]) if ref else np.array([])
    items: list[tuple[str, pd.DataFrame]] = [(ref, r[r["method"] == ref])] if ref and len(ref_spec) else []
    for m in sorted(set(r["method"]) - {ref}, key=pal.key):
        mr = r[r["method"] == m]
        at = mr[mr["budget_fraction"] == budget]
        if len(at) or mr["budget_fraction"].nunique() == 1:
            items.append((m, at if len(at) else mr))
    cols = min(5, max(len(items), 1))
    rows = math.ceil(max(len(items), 1) / cols)
    fig, axes = figure(2.6 * cols + 0.6, 2.3 * rows + 0.9, rows, cols, sharex=True, sharey=True)
    for ax, (method, mr) in zip(axes.flat, items):
        spec = _mean_spectrum(mr["dw_spectrum"])
        idx = np.arange(1, len(spec) + 1)
        if len(ref_spec) and method != ref:
            ax.plot(np.arange(1, len(ref_spec) + 1), ref_spec, color="#888888", ls="--", lw=1.0)
        ax.plot(idx, np.clip(spec, 1e-9, None), color=pal.color(method), marker=pal.method_marker(method), ms=2.5,
                lw=1.2)
        at = fmt_budget(mr["budget_fraction"].iloc[0]) if len(mr) else ""
        ax.set_title(f"{short(method, 18)} @ {at} (n={len(mr)})", fontsize=8.5)
        ax.set_yscale("log")
        ax.set_ylim(1e-6, 1.2)
    for ax in axes.flat[len(items):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("direction i of ΔW")
    for ax in axes[:, 0]:
        ax.set_ylabel("σᵢ² / ‖ΔW‖²")
    if not items:
        note(axes[0, 0], "no method measured at a shared budget")
    fig.suptitle(fit(f"{s.label}: the update's spectrum per method at {fmt_budget(budget)}, a method measured at "
                     f"one budget only at its own (mean over changed matrices and seeds; dashed: "
                     f"{ref or 'no reference'})", fig.get_figwidth()), fontsize=10)
    return fig


FIGURES = (
    registry.Figure(
        "intruders", "Intruder dimensions vs trainable budget",
        "Each method at its main settings: the number of intruder dimensions (top-10 left singular vectors of a "
        "tuned matrix whose largest |cosine| with every base singular vector is below ε; Shuttleworth et al. "
        "2024), summed over the matrices the method changed, mean ± 95% t-interval over seeds, at four ε. Full FT "
        "dashed with its band. A method that changes fewer matrices has fewer places for intruders: the report's "
        "table gives the count per changed matrix.",
        lambda s: intruders_vs_budget(s.cells, s.palette, s.label)),
    registry.Figure(
        "intruders_forgetting", "Intruder dimensions vs forgetting",
        "One point per run (each method's main series, every budget and seed) against its held-out NLL change "
        "(`eval.forgetting.delta`): left, its intruder count at ε = 0.5 (each method's points nudged sideways so "
        "equal counts stay apart); right, how far its top-10 directions moved, 1 − their mean largest |cos| with "
        "a base singular vector, the continuous measure behind the counts. Spearman's ρ over all runs above each "
        "panel; per method in the report's anatomy section.",
        intruders_vs_forgetting),
    registry.Figure(
        "spectra", "The update's spectrum per method",
        "Each method at one budget (the one most of the methods swept over budgets measured; ties: the smaller), "
        "a method measured at one budget only (full FT, HFT, LISA where it cannot meet the smaller) at its own: the "
        "energy share "
        "σᵢ²/‖ΔW‖²_F of ΔW's top 32 directions, averaged over the changed matrices and then the seeds (log scale). "
        "A low-rank update falls off a cliff after its rank; a sparse or full update spreads its energy.",
        spectra),
)


# --- the report's table -----------------------------------------------------------------------------
def section(s: registry.Setting) -> list[str]:
    """The anatomy table (each method's main series per budget) and the intruders-forgetting correlations."""
    c = main_cells(_measured(s.cells))
    if not len(c):
        return []
    pal = s.palette
    rows = []
    for method, series in _ordered_series(c, pal):
        for _, x in c[c["series"] == series].sort_values("budget_fraction").iterrows():
            count = f"{x['intr_mean']:.1f} ± {x['intr_ci']:.1f}" if np.isfinite(x["intr_ci"]) else f"{x['intr_mean']:.1f}"
            rows.append([series, fmt_budget(x["budget_fraction"]), f"{int(x['intr_n'])}", count,
                         f"{x['intruders_per_matrix']:.2f}", f"{x['anatomy_matrices']:.0f}",
                         f"{x['delta_rel_norm']:.2e}", f"{x['dw_stable_rank']:.2f}", f"{x['dw_effective_rank']:.1f}",
                         f"{x['dw_top1_energy']:.2f}", f"{x['attention_share']:.2f}",
                         forget(x["forget_mean"], x["forget_ci"])])
    out = ["**Update anatomy** (`anatomy` in each result; docs/anatomy.md): per method and budget, over the seeds "
           "(n), the intruder dimensions at ε = 0.5 summed over the changed matrices (mean ± 95% t-interval) and per "
           "changed matrix, the changed matrices, ‖ΔW‖_F/‖W₀‖_F over every changed tensor, the median stable and "
           "effective rank of a matrix's ΔW, the mean share of ‖ΔW‖² in its top direction, the attention "
           "projections' share of the whole update, and forgetting (nats).", ""]
    out += table(["method", "budget", "n", "intruders", "per matrix", "matrices", "‖ΔW‖/‖W₀‖", "stable rank",
                  "eff. rank", "top-1 energy", "attention share", "forgetting"], rows)
    r = _runs(s)
    rows = []
    for label, col in (("intruders at ε = 0.5", "intruders"), ("intruders at ε = 0.9", "intruders@0.9"),
                       ("1 − mean top-10 similarity", "top_k_drift")):
        cells = []
        for who, sub in (("all", r), *((m, r[r["method"] == m]) for m in sorted(set(r["method"]), key=pal.key))):
            rho, n = spearman(sub[col], sub["forgetting_nll_delta"])
            cells.append(f"{rho:+.2f} (n={n})" if np.isfinite(rho) else f"— (n={n})")
        rows.append([label, *cells])
    out += ["Spearman's rank correlation with forgetting over runs (— : undefined, fewer than 3 runs or no spread in "
            "either measure):", ""]
    out += table(["measure", "all runs", *sorted(set(r["method"]), key=pal.key)], rows)
    return out
