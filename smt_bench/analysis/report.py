"""analyze(): run JSONs -> figures, CSV tables and report.md (byte-identical for the same inputs)."""
from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from . import figures as F
from .load import GROUPS, AnalysisError, Loaded, load
from .selection import pairs, summary
from .stats import Plateau, cells as make_cells, detect_plateau, fmt, fmt_budget, pareto_front, select_runs

FIGURES = (  # (stem, title, caption) per setting
    ("accuracy_vs_params", "Accuracy vs trainable parameters",
     "Mean accuracy over seeds against the achieved trainable share of the model (log scale); bands are 95% "
     "t-intervals over seeds (none where a budget has one seed). Full FT is the dashed line with its band; a hollow "
     "star marks each method's plateau start."),
    ("memory", "Peak memory relative to full FT",
     "Bars: the analytic breakdown (weights, gradients, optimizer state, activations saved for backward in one "
     "step; `train_info.memory_breakdown_bytes`), stacked. Marker: the measured peak (`peak_memory_bytes`, of the "
     "kind named in the title). Both are divided by full FT's measured peak."),
    ("throughput", "Throughput and step time relative to full FT",
     "Training tokens/s and median step time, each divided by full FT's (mean ± 95% CI over seeds)."),
    ("smt_blocks", "SMT block map",
     "Selected blocks per layer and projection (mean per run) for each SMT budget, and the share of selected "
     "blocks per projection (q, k, v, o, mlp = gate+up+down); where runs record what was eligible, also each "
     "projection's selected / eligible rate, which does not favour the projections that offer more blocks."),
    ("pareto", "Accuracy vs peak memory (Pareto front)",
     "Each point is one method and budget (mean over seeds); the dotted step line joins the runs no other run "
     "beats on both accuracy and peak memory."),
)
PUBLISHED_CSV = "published.csv"
TASK_ALIASES = {"siqa": "socialiqa", "obqa": "openbookqa", "arce": "arceasy", "arcc": "arcchallenge"}


@dataclass
class Options:
    epsilon: float = 0.5
    n_boot: int = 1000
    seed: int = 0
    published: str | None = None  # a CSV path; None = the one shipped with the package


def load_published(path: str | None) -> pd.DataFrame:
    try:
        if path is None:
            text = resources.files("smt_bench.analysis").joinpath("assets", PUBLISHED_CSV).read_text("utf-8")
        else:
            text = Path(path).read_text("utf-8")
    except OSError as e:
        raise AnalysisError(f"published numbers {path or PUBLISHED_CSV}: cannot be read ({e.strerror or e})") from None
    import io

    try:
        df = pd.read_csv(io.StringIO(text), dtype={"lr": str})
    except (ValueError, pd.errors.ParserError) as e:
        raise AnalysisError(f"published numbers {path}: not a CSV ({str(e).splitlines()[0]})") from None
    need = {"model", "tasks", "protocol", "method", "trainable_pct", "mean_accuracy", "source"}
    if missing := sorted(need - set(df.columns)):
        raise AnalysisError(f"published numbers {path}: missing columns {', '.join(missing)}")
    if df["source"].isna().any() or (df["source"].astype(str).str.strip() == "").any():
        raise AnalysisError(f"published numbers {path}: every row needs a source")
    return df


def _norm_task(t: str) -> str:
    n = re.sub(r"[^a-z0-9]", "", t.lower())
    return TASK_ALIASES.get(n, n)


def _task_set(s: str) -> frozenset:
    return frozenset(_norm_task(t) for t in str(s).split(";") if t)


# --- markdown helpers -------------------------------------------------------------------------
def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return out + [""]


def _acc(m, ci) -> str:
    if not np.isfinite(m):
        return "—"
    return f"{m:.1f} ± {ci:.1f}" if np.isfinite(ci) else f"{m:.1f}"


def _pct(x) -> str:
    return fmt(x, ".4g")


# --- the analysis -----------------------------------------------------------------------------
def analyze(inputs: list[str], out: str | Path, opts: Options = Options(), warn=None) -> Path:
    """Load, check, compute and write everything; raises AnalysisError (nothing written) on bad input."""
    if opts.epsilon < 0 or not math.isfinite(opts.epsilon):
        raise AnalysisError(f"--epsilon {opts.epsilon}: use a finite number >= 0 (accuracy points per doubling)")
    if opts.n_boot < 0:
        raise AnalysisError(f"--bootstrap {opts.n_boot}: use a count >= 0")
    published = load_published(opts.published)
    loaded = load(inputs, warn=warn)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {out}: exists and is not a folder")

    kept, duplicates = select_runs(loaded.runs)
    cells = make_cells(kept)
    methods = sorted(set(loaded.runs["method"]))
    series_by_method: dict[str, list[str]] = {}
    for m, s in zip(kept["method"], kept["series"]):
        series_by_method.setdefault(m, [])
        if s not in series_by_method[m]:
            series_by_method[m].append(s)
    pal = F.Palette(methods, series_by_method)

    settings = []
    if len(cells):
        for skey in sorted(set(cells["setting_key"]), key=lambda k: (cells[cells["setting_key"] == k]["setting"].iloc[0], k)):
            c = cells[cells["setting_key"] == skey].copy()
            c["pareto"] = pareto_front(c["mem_ratio"].fillna(c["peak_memory_bytes"]).to_numpy(dtype=float),
                                       c["acc_mean"].to_numpy(dtype=float))
            plateaus = {}
            for series in sorted(set(c["series"])):
                sc = c[c["series"] == series]
                if (sc["method"] == "full_ft").all():
                    continue
                rng = np.random.default_rng([opts.seed, zlib.crc32(f"{skey}\0{series}".encode())])
                plateaus[series] = detect_plateau(sc, opts.epsilon, opts.n_boot, rng)
            settings.append((skey, c, plateaus))

    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / "figures"
    lines: list[str] = []
    with F.styled():
        for skey, c, plateaus in settings:
            slug, label = c["setting_slug"].iloc[0], c["setting"].iloc[0]
            runs = kept[kept["setting_key"] == skey]
            maps, eligible = {}, {}
            for f, s, b, e in zip(runs["file"], runs["series"], runs["budget_fraction"],
                                  runs["smt_eligible_projections"]):
                if f in loaded.block_maps:
                    maps.setdefault((s, b), []).append(loaded.block_maps[f])
                    eligible.setdefault((s, b), set()).update(p for p in e.split(";") if p)
            made = {
                "accuracy_vs_params": F.accuracy_vs_params(c, plateaus, pal, label),
                "memory": F.memory(c, pal, label),
                "throughput": F.throughput(c, pal, label),
                "smt_blocks": F.smt_blocks(c, maps, pal, label, eligible),
                "pareto": F.pareto(c, pal, label),
            }
            stability = pairs(stability_points(runs, loaded.block_maps))
            if stability:
                made["smt_stability"] = F.selection_stability(summary(stability), f"SMT selection stability — {label}")
            for stem, fig in made.items():
                F.save(fig, fig_dir / slug, stem)
        groups, pub_rows = _published_groups(published, cells)
        F.save(F.published_overlay(groups, pal), fig_dir, "published_overlay")

    lines += _header(loaded, kept, duplicates, opts)
    for skey, c, plateaus in settings:
        lines += _setting_section(c, plateaus, kept[kept["setting_key"] == skey], opts, loaded.block_maps)
    lines += _published_section(groups, pub_rows)
    lines += _failures_section(loaded, kept, duplicates)
    lines += _provenance_section(loaded)
    text = "\n".join(lines).rstrip("\n") + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    _write_csv(loaded.runs.drop(columns=["setting_key", "config_key"]), out / "runs.csv")
    if len(cells):
        _write_csv(cells.drop(columns=["setting_key"]), out / "cells.csv")
    return out / "report.md"


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    df = df.copy()
    for col in df.columns:
        if df[col].dtype == object:
            df[col] = df[col].map(lambda v: ";".join(map(str, v)) if isinstance(v, tuple) else v)
    df.to_csv(path, index=False, float_format="%.6g", lineterminator="\n")


# --- report sections --------------------------------------------------------------------------
def _header(loaded: Loaded, kept, duplicates, opts: Options) -> list[str]:
    runs = loaded.runs
    n_fin = int((runs["status"] == "finished").sum())
    n_fail = len(runs) - n_fin
    out = [
        "# smt-bench analysis",
        "",
        f"From {_n(loaded.n_files, 'run file')}: {n_fin} finished, {n_fail} failed/oom/cancelled, {len(loaded.bad)} not "
        f"readable as a run (listed at the end), {_n(len(duplicates), 'duplicate seed')} ignored. Figures and tables use "
        f"finished runs only: {_n(len(kept), 'run')} in {_n(kept['setting_key'].nunique() if len(kept) else 0, 'setting')}.",
        "",
        "Conventions: accuracy in points (%), mean over seeds ± the 95% Student-t half-width (no interval with one "
        "seed). A *setting* is everything but method, budget and seed (model, data, training and evaluation "
        "config, the evaluation protocol); numbers are only compared within one. Ratios are against full FT of the "
        "same setting. *Plateau*: the smallest budget from which every further gain in mean accuracy per doubling "
        f"of the budget is below ε = {opts.epsilon:.2f} points (or negative); \"none\" when the last step still "
        f"gains ≥ ε. Its interval is a 95% bootstrap over seeds ({opts.n_boot} resamples of each budget's seeds, "
        f"RNG seed {opts.seed}).",
        "",
    ]
    if len(kept):
        out += ["Settings:", ""]
        for label, slug in sorted(set(zip(kept["setting"], kept["setting_slug"]))):
            out.append(f"- [{label}](#{_anchor(label)}) (figures in `figures/{slug}/`)")
        out.append("")
    return out


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"


def _anchor(label: str) -> str:
    a = re.sub(r"[^\w\- ]", "", label.lower()).replace(" ", "-")
    return a


def _seeds_label(cell_seeds: tuple, all_seeds: set) -> str:
    missing = sorted(all_seeds - set(cell_seeds))
    n = len(cell_seeds)
    return f"{n} (no {', '.join(f's{s}' for s in missing)})" if missing else str(n)


def _setting_section(c: pd.DataFrame, plateaus: dict[str, Plateau | None], runs: pd.DataFrame,
                     opts: Options, block_maps: dict | None = None) -> list[str]:
    label, slug = c["setting"].iloc[0], c["setting_slug"].iloc[0]
    out = [f"## {label}", ""]
    devices = sorted(set(",".join(c["devices"]).split(",")) - {""})
    kinds = sorted(set(",".join(c["peak_memory_kind"]).split(",")) - {""})
    out.append(f"Protocol: `{c['protocol'].iloc[0]}`. Devices: {', '.join(devices) or 'unknown'}. "
               f"Peak memory: {', '.join(kinds) or 'unknown'}.")
    if len(devices) > 1:
        out.append("**Mixed devices:** memory and throughput ratios compare runs from different machines.")
    ft_series = c["ft_series"].iloc[0]
    if ft_series:
        ft = c[(c["series"] == ft_series)].iloc[-1]
        out.append(f"Full-FT reference: `{ft_series}` ({ft['n_runs']} run{'s' if ft['n_runs'] != 1 else ''}, "
                   f"accuracy {_acc(ft['acc_mean'], ft['acc_ci'])}).")
    else:
        out.append("No full-FT run in this setting: the ratio columns are empty and the figures show absolute values.")
    out.append("")

    out += ["### Results", ""]
    rows = []
    order = sorted(range(len(c)), key=lambda i: (F.method_key(c.iloc[i]["method"]), c.iloc[i]["series"],
                                                 c.iloc[i]["budget_fraction"]))
    seeds_by_series = {s: set(x for t in c[c["series"] == s]["seeds"] for x in t) for s in set(c["series"])}
    first = {}
    for i in order:
        first.setdefault(c.iloc[i]["series"], i)
    for i in order:
        r = c.iloc[i]
        pl = plateaus.get(r["series"])
        if r["series"] not in plateaus:  # full FT
            mark = ""
        elif pl is None:
            mark = "n/a" if first[r["series"]] == i else ""
        elif pl.index is None:
            mark = "none in range" if first[r["series"]] == i else ""
        else:
            mark = "starts here" if pl.budget == r["budget_fraction"] else ""
        rows.append([r["series"], fmt_budget(r["budget_fraction"]), _seeds_label(r["seeds"], seeds_by_series[r["series"]]),
                     _acc(r["acc_mean"], r["acc_ci"]),
                     f"{_pct(r['trainable_pct'])} / {_pct(r['trainable_pct_target'])}",
                     fmt(r["mem_ratio"], ".2f"), fmt(r["tput_ratio"], ".2f"), fmt(r["step_ratio"], ".2f"),
                     "yes" if r["pareto"] else "", mark])
    out += _table(["method", "budget", "seeds", "accuracy", "trainable % (achieved / target)", "peak memory / FT",
                   "tokens/s / FT", "step time / FT", "Pareto", "plateau"], rows)
    out += ["Seeds: runs per budget, naming seeds the method has elsewhere but not here. Budget is the target "
            "fraction of the model's parameters.", ""]

    out += ["### Plateau", ""]
    rows = []
    for series in sorted(plateaus, key=lambda s: (F.method_key(c[c["series"] == s]["method"].iloc[0]), s)):
        pl = plateaus[series]
        if pl is None:
            rows.append([series, "n/a (fewer than two evaluated budgets)", "", "", ""])
            continue
        gains = "; ".join(f"{fmt_budget(pl.budgets[i])}→{fmt_budget(pl.budgets[i + 1])}: {pl.gains[i]:+.2f}"
                          for i in range(len(pl.gains)))
        ci = "—" if pl.ci_low is None else f"[{pl.label(pl.ci_low)}, {pl.label(pl.ci_high)}]"
        p_none = fmt(pl.p_none, ".2f")
        rows.append([series, "none in range" if pl.index is None else fmt_budget(pl.budget), ci, p_none, gains])
    if rows:
        out += _table(["method", "plateau from", "bootstrap 95% interval", "P(no plateau)",
                       "gain per doubling (points)"], rows)
    else:
        out += ["No method with a budget sweep in this setting.", ""]

    acc_cols = [col for col in c.columns if col.startswith("acc.") and c[col].notna().any()]
    if acc_cols:
        out += ["### Per-task accuracy", "", "Mean over seeds."]
        out.append("")
        rows = [[c.iloc[i]["series"], fmt_budget(c.iloc[i]["budget_fraction"])]
                + [fmt(c.iloc[i][col], ".1f") for col in acc_cols] for i in order]
        out += _table(["method", "budget"] + [col[4:] for col in acc_cols], rows)

    out += _smt_section(c, runs)
    out += _stability_section(runs, block_maps, slug)

    out += ["### Figures", ""]
    for n, (stem, title, caption) in enumerate(FIGURES, 1):
        out += [f"{n}. **{title}.** {caption}", "",
                f"   ![{title}](figures/{slug}/{stem}.png) ([PDF](figures/{slug}/{stem}.pdf))", ""]
    return out


def _smt_section(c: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
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
    out += _table(["method", "budget", "runs"] + groups + ["largest"], rows)
    srun = runs[runs["smt_blocks"].notna() & (runs["smt_blocks"] > 0)]
    pooled = {g: float(srun[f"smt_blocks_{g}"].fillna(0).sum()) for g in groups}
    total = sum(pooled.values())
    top = max(pooled.values())
    leaders = [g for g in groups if pooled[g] == top]
    counts_txt = ", ".join(f"{g} {pooled[g]:g} ({100 * pooled[g] / total:.1f}%)" for g in groups)
    verdict = ("**yes**: v has the largest share" if leaders == ["v"] else
               f"**no**: the largest share is {'='.join(leaders)}" + (" (tied with v)" if "v" in leaders else ""))
    from_share = (srun["smt_blocks"] <= 1.0 + 1e-9).any()
    out += [f"\"V matters most\" on these runs: {verdict}. Selected blocks pooled over {_n(len(srun), 'SMT run')}: "
            f"{counts_txt}; v leads alone in {v_top} of {len(sc)} budget cells.",
            "Counts are raw, not divided by how many blocks each projection offers (with grouped-query attention "
            "k and v are smaller than q), and only projections with a selected block appear."
            + (" Some runs carry only `block_share` (no `block_map`): their counts are shares." if from_share else ""),
            ""]
    return out + _smt_rate_section(sc, srun)


def _smt_rate_section(sc: pd.DataFrame, srun: pd.DataFrame) -> list[str]:
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
    out += _table(["method", "budget", "runs"] + groups, rows)
    rate = {g: float(known[f"smt_blocks_{g}"].fillna(0).sum()) / float(known[f"smt_eligible_{g}"].sum())
            for g in groups if known[f"smt_eligible_{g}"].sum() > 0}
    top = max(rate.values())
    leaders = [g for g in rate if rate[g] == top]
    out += [f"Per eligible block, pooled over {_n(len(known), 'SMT run')} that record `eligible_blocks`: "
            + ", ".join(f"{g} {100 * rate[g]:.1f}%" for g in rate)
            + f"; most selected: {'='.join(leaders)}.", ""]
    return out


def stability_points(runs: pd.DataFrame, block_maps: dict | None) -> list[dict]:
    """The SMT runs of one setting that have a block map, as selection-stability points."""
    from .selection import block_set

    smt = runs[runs["file"].isin(list(block_maps or {}))]
    own = {"cfg.method.warmup_steps", "cfg.method.score_accumulation", "cfg.method.score"}
    # the accumulators' placement does not change the sums, so it is not a factor of the selection
    rest = sorted(c for c in smt.columns if c.startswith("cfg.method.") and c not in own
                  and c != "cfg.method.accumulator_device")
    return [{"seed": int(r["seed"]), "warmup_steps": r.get("cfg.method.warmup_steps"),
             "accumulation": r.get("cfg.method.score_accumulation"), "score": r.get("cfg.method.score"),
             "budget": float(r["budget_fraction"]), "fixed": tuple(str(r[c]) for c in rest),
             "blocks": block_set(block_maps[r["file"]])} for _, r in smt.iterrows()]


def _stability_section(runs: pd.DataFrame, block_maps: dict | None, slug: str) -> list[str]:
    """Jaccard overlap of SMT block sets between runs that differ in exactly one selection factor."""
    from .selection import markdown, pairs

    rows = pairs(stability_points(runs, block_maps))
    if not rows:
        return []
    title = "SMT selection stability"
    return ["### SMT selection stability", "",
            "Jaccard overlap |A∩B| / |A∪B| of the selected block sets of two SMT runs at the same budget that "
            "differ in exactly one of seed, warm-up steps, score accumulation and score kind (the seed changes the "
            "warm-up batches).", "", *markdown(rows), "",
            f"![{title}](figures/{slug}/smt_stability.png) ([PDF](figures/{slug}/smt_stability.pdf))", ""]


def _published_groups(published: pd.DataFrame, cells: pd.DataFrame):
    groups = []
    rows = []
    keys = sorted({(m, p, t) for m, p, t in zip(published["model"], published["protocol"], published["tasks"])})
    for model, proto, tasks in keys:
        pub = published[(published["model"] == model) & (published["protocol"] == proto) & (published["tasks"] == tasks)]
        want = _task_set(tasks)
        if len(cells):
            match = cells[(cells["model"].str.lower() == str(model).lower())
                          & cells["protocol"].map(lambda s: str(s).startswith(str(proto)))
                          & cells["tasks"].map(lambda s: _task_set(s) == want) & (cells["n"] > 0)]
        else:
            match = cells
        bench = pub["benchmark"].iloc[0] if "benchmark" in pub.columns else tasks
        title = f"{model} · {bench} · {proto}"
        note = "" if len(match) else (
            f"No run matches model {model} + protocol + task set: published points only "
            f"(this analysis has {', '.join(sorted(set(cells['model']))) if len(cells) else 'no evaluated runs'}).")
        groups.append({"title": title, "published": pub, "cells": match, "note": note,
                       "matched": sorted(set(match["setting"])) if len(match) else []})
        rows += sorted((r for _, r in pub.iterrows()),
                       key=lambda r: (F.method_key(r["method"]), float(r["trainable_pct"])))
    return groups, rows


def _published_section(groups: list[dict], rows) -> list[str]:
    out = ["## Published numbers", ""]
    for g in groups:
        out.append(f"- {g['title']}: " + (f"overlaid on {', '.join(g['matched'])}." if g["matched"] else
                                            "**no run matches this model, protocol and task set**; the figure shows "
                                            "the published points alone (nothing incomparable is mixed in)."))
    out.append("")
    sources = sorted({r["source"] for r in rows})
    table = []
    for r in rows:
        rank = r.get("rank")
        table.append([r["model"], r.get("benchmark", ""), r["method"],
                      "" if rank is None or (isinstance(rank, float) and math.isnan(rank)) else str(int(rank)),
                      "" if pd.isna(r.get("lr")) else str(r.get("lr")), f"{float(r['trainable_pct']):.4g}",
                      f"{float(r['mean_accuracy']):.1f}", f"[{sources.index(r['source']) + 1}]"])
    out += _table(["model", "benchmark", "method", "rank", "lr", "trainable %", "mean accuracy", "source"], table)
    for i, s in enumerate(sources, 1):
        out.append(f"[{i}] {s}")
    notes = sorted({str(r["note"]) for r in rows if "note" in r and pd.notna(r["note"])})
    out += [""] + [f"Note: {n}." for n in notes] + ([""] if notes else [])
    out += ["![published numbers](figures/published_overlay.png) ([PDF](figures/published_overlay.pdf))", ""]
    return out


def _failures_section(loaded: Loaded, kept: pd.DataFrame, duplicates) -> list[str]:
    out = ["## Failed, OOM and cancelled runs", ""]
    runs = loaded.runs
    failed = runs[runs["status"] != "finished"]
    if len(failed):
        finished_keys = set(runs[runs["status"] == "finished"]["config_key"])
        rows = []
        for _, r in failed.iterrows():
            err = r["error"] if len(r["error"]) <= 120 else r["error"][:117] + "..."
            rows.append([f"`{r['file']}`", r["method"], r["model"], fmt_budget(r["budget_fraction"]), str(r["seed"]),
                         r["status"], err or "—", "yes" if r["config_key"] in finished_keys else "no"])
        out += _table(["file", "method", "model", "budget", "seed", "status", "error", "rerun finished"], rows)
    else:
        out += ["None.", ""]
    out += ["## Files that are not valid runs", ""]
    if loaded.bad:
        out += _table(["file", "problem"], [[f"`{b.path}`", b.reason] for b in sorted(loaded.bad, key=lambda b: b.path)])
    else:
        out += ["None.", ""]
    if duplicates:
        out += ["## Duplicate seeds ignored", "",
                "Same setting, method config, budget and seed as an earlier file (e.g. a rerun elsewhere); the "
                "first file by name is used.", ""]
        out += _table(["file", "kept instead"], [[f"`{a}`", f"`{b}`"] for a, b in sorted(duplicates)])
    return out


def _provenance_section(loaded: Loaded) -> list[str]:
    runs = loaded.runs
    out = ["## Provenance", "", "Of the valid run files (all statuses).", ""]
    shas = {}
    for sha, dirty in zip(runs["git_sha"], runs["git_dirty"]):
        n, d = shas.get(sha or "unknown", (0, 0))
        shas[sha or "unknown"] = (n + 1, d + int(bool(dirty)))
    out += _table(["git sha", "runs", "of them with uncommitted changes"],
                  [[f"`{s}`", str(n), str(d)] for s, (n, d) in sorted(shas.items())])
    devs = {}
    for t, name in zip(runs["device_type"], runs["device_name"]):
        key = (t or "unknown", name or "unknown")
        devs[key] = devs.get(key, 0) + 1
    out += _table(["device", "name", "runs"], [[t, n, str(c)] for (t, n), c in sorted(devs.items())])
    versions: dict[str, dict[str, int]] = {}
    for f in runs["file"]:
        for pkg, v in ((loaded.meta.get(f) or {}).get("versions") or {}).items():
            versions.setdefault(str(pkg), {})
            versions[pkg][str(v)] = versions[pkg].get(str(v), 0) + 1
    if versions:
        out += _table(["package", "versions (runs)"],
                      [[p, ", ".join(f"{v} ({n})" for v, n in sorted(vs.items()))] for p, vs in sorted(versions.items())])
    return out
