"""Per-cell statistics (mean, 95% t-interval over seeds), plateau detection with a seed bootstrap,
and the accuracy/memory Pareto front."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import registry
from .schema import MEMORY_PARTS

# two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959964


def t975(df: int) -> float:
    """t_{0.975, df}: the table up to 30, then the Cornish-Fisher expansion (error < 1e-4)."""
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_ci(values) -> tuple[float, float, int]:
    """(mean, 95% t-interval half-width, n) of the finite values; half-width NaN when n < 2."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    m = float(x.mean())
    if n < 2:
        return m, math.nan, 1
    return m, t975(n - 1) * float(x.std(ddof=1)) / math.sqrt(n), n


def finite_mean(values) -> float:
    """The mean of the finite values (NaN when there are none): how a cell averages its runs."""
    x = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(x)) if x else math.nan


# --- cells ------------------------------------------------------------------------------------
def select_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Finished runs, one per (setting, series, budget, seed). A run present twice (the same computation and
    seed in two files: a copy, or a rerun elsewhere) is never resolved silently: the newest finished copy (by
    `run_info.updated_at`, then file name) is kept and every other one is returned as (dropped, kept) for the
    report and a warning. Returns (kept, dropped)."""
    fin = runs[runs["status"] == "finished"].sort_values(["updated_at", "file"], ascending=[False, True], kind="stable")
    keys = ["setting_key", "series", "budget_fraction", "seed"]
    dup = fin.duplicated(keys, keep="first")
    kept_file = {tuple(r[keys]): r["file"] for _, r in fin[~dup].iterrows()}
    dropped = sorted((r["file"], kept_file[tuple(r[keys])]) for _, r in fin[dup].iterrows())
    return fin[~dup].sort_values("file", kind="stable").reset_index(drop=True), dropped


def cells(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (setting, series, budget): n, seeds, accuracy mean ± CI, means of the rest."""
    rows = []
    acc_cols = [c for c in runs.columns if c.startswith("acc.")]
    for (skey, series, frac), g in runs.groupby(["setting_key", "series", "budget_fraction"], sort=True):
        g = g.sort_values("seed", kind="stable")
        m, ci, n = mean_ci(g["mean_accuracy"])
        row = {
            "setting_key": skey, "setting": g["setting"].iloc[0], "setting_slug": g["setting_slug"].iloc[0],
            "model": g["model"].iloc[0], "data": g["data"].iloc[0], "protocol": g["protocol"].iloc[0],
            "method": g["method"].iloc[0], "series": series, "main": bool(g["main"].iloc[0]),
            "variant": g["variant"].iloc[0], "tag": g["tag"].iloc[0], "budget_fraction": frac,
            "budget_pct": 100.0 * frac, "seeds": tuple(int(s) for s in g["seed"]), "n_runs": len(g),
            "n": n, "acc_mean": m, "acc_ci": ci, "acc_values": tuple(float(v) for v in g["mean_accuracy"]
                                                                      if np.isfinite(v)),
        }
        for col in ("trainable_pct", "trainable_pct_target", "trainable_params", "peak_memory_bytes",
                    "tokens_per_s", "median_step_time_s", *[f"mem_{p}" for p in MEMORY_PARTS]):
            row[col] = finite_mean(g[col])
        for c in registry.contributions():
            for col, aggregate in c.cell_columns.items():
                row[col] = aggregate(g[col])
        for col in ("tokens_per_s", "median_step_time_s"):
            row[f"{col}_ci"] = mean_ci(g[col])[1]
        row["forget_mean"], row["forget_ci"], row["forget_n"] = mean_ci(g["forgetting_nll_delta"])
        if "intruders" in g.columns:  # the update anatomy (smt_bench/anatomy), where the runs measured it
            row["intr_mean"], row["intr_ci"], row["intr_n"] = mean_ci(g["intruders"])
            for col in ("intruders_per_matrix", "anatomy_matrices", "delta_rel_norm", "dw_stable_rank",
                        "dw_effective_rank", "dw_top1_energy", "attention_share", "top_k_drift"):
                row[col] = finite_mean(g[col])
            for col in (c for c in g.columns if c.startswith("intruders@")):
                row[col], row[f"{col}_ci"], _ = mean_ci(g[col])
        for col in acc_cols:
            row[col] = finite_mean(g[col])
        row["tasks"] = g["tasks"].iloc[0]
        row["peak_memory_kind"] = ",".join(sorted(set(g["peak_memory_kind"]) - {""}))
        row["devices"] = ",".join(sorted({f"{t}:{d}" if d else t for t, d in zip(g["device_type"], g["device_name"])}))
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    # ratios against full FT of the same setting (its main series)
    for skey, g in out.groupby("setting_key", sort=True):
        ft = g[g["method"] == reference_method(g)].sort_values(["main", "series", "budget_fraction"],
                                                              ascending=[False, True, True], kind="stable")
        ref = ft.iloc[0] if len(ft) else None
        for col, name in (("peak_memory_bytes", "mem_ratio"), ("tokens_per_s", "tput_ratio"),
                          ("median_step_time_s", "step_ratio")):
            denom = ref[col] if ref is not None else math.nan
            out.loc[g.index, name] = g[col] / denom if denom and np.isfinite(denom) else math.nan
        out.loc[g.index, "ft_series"] = ref["series"] if ref is not None else ""
    return out


def reference_method(cells: pd.DataFrame) -> str | None:
    """Full fine-tuning, told apart by what it does rather than by name: the first method (by name) whose
    every cell trains 100% of the model, target and achieved."""
    whole = (cells["trainable_pct_target"] == 100) & (cells["trainable_pct"] == 100)
    partial = set(cells.loc[~whole, "method"])
    return min((m for m in set(cells["method"]) if m not in partial), default=None)


# --- plateau ----------------------------------------------------------------------------------
def gains_per_doubling(budgets, means) -> list[float]:
    """(a_{i+1} - a_i) / log2(b_{i+1} / b_i) for consecutive budgets (accuracy points per doubling)."""
    return [(means[i + 1] - means[i]) / math.log2(budgets[i + 1] / budgets[i]) for i in range(len(budgets) - 1)]


def plateau_index(budgets, means, eps: float) -> int | None:
    """The smallest j such that every gain per doubling from budget j on is below eps (negative
    included); None when the last gain is still >= eps ("no plateau in range") or there are fewer
    than two budgets."""
    g = gains_per_doubling(budgets, means)
    for j in range(len(g)):
        if all(x < eps for x in g[j:]):
            return j
    return None


@dataclass
class Plateau:
    budgets: tuple          # the budget fractions with an accuracy, ascending
    means: tuple
    gains: tuple
    index: int | None       # into budgets; None = no plateau in range
    ci_low: int | None      # bootstrap 95% interval of the index; len(budgets) stands for "none"
    ci_high: int | None
    p_none: float           # share of bootstrap samples with no plateau in range
    n_boot: int

    @property
    def budget(self):
        return None if self.index is None else self.budgets[self.index]

    def label(self, i) -> str:
        return "none" if i is None or i >= len(self.budgets) else fmt_budget(self.budgets[i])


def detect_plateau(cell_rows: pd.DataFrame, eps: float, n_boot: int, rng: np.random.Generator) -> Plateau | None:
    """Plateau of one series (its cells, any order); None with fewer than two evaluated budgets.

    Bootstrap: each budget's seed accuracies are resampled with replacement, the means recomputed
    and the plateau found again; the 95% interval is taken over the plateau budget index."""
    rows = cell_rows[cell_rows["n"] > 0].sort_values("budget_fraction", kind="stable")
    if len(rows) < 2:
        return None
    budgets = tuple(float(b) for b in rows["budget_fraction"])
    values = [np.asarray(v, dtype=float) for v in rows["acc_values"]]
    means = tuple(float(v.mean()) for v in values)
    idx = plateau_index(budgets, means, eps)
    none = len(budgets)
    boot = np.empty(n_boot, dtype=int)
    for b in range(n_boot):
        m = [float(v[rng.integers(0, len(v), len(v))].mean()) for v in values]
        j = plateau_index(budgets, m, eps)
        boot[b] = none if j is None else j
    if n_boot:
        lo, hi = (int(q) for q in np.quantile(boot, [0.025, 0.975], method="inverted_cdf"))
        p_none = float((boot == none).mean())
    else:
        lo = hi = None  # type: ignore[assignment]  # no bootstrap: no interval
        p_none = math.nan
    return Plateau(budgets, means, tuple(gains_per_doubling(budgets, means)), idx, lo, hi, p_none, n_boot)


# --- Pareto -----------------------------------------------------------------------------------
def pareto_front(memory, accuracy) -> list[bool]:
    """True where no other point has <= memory and >= accuracy with one of them strict."""
    pts = list(zip(memory, accuracy))
    out = []
    for i, (m, a) in enumerate(pts):
        if not (np.isfinite(m) and np.isfinite(a)):
            out.append(False)
            continue
        dominated = any(j != i and np.isfinite(m2) and np.isfinite(a2) and m2 <= m and a2 >= a and (m2 < m or a2 > a)
                        for j, (m2, a2) in enumerate(pts))
        out.append(not dominated)
    return out


# --- formatting (fixed, so the report is byte-identical) ---------------------------------------
def fmt_budget(frac: float) -> str:
    pct = 100.0 * frac
    return f"{pct:.4g}%"


def fmt(x, spec: str = ".1f", missing: str = "—") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return missing
    return format(x, spec)
