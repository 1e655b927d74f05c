"""The report's shared sections: the header, one section per setting, runs that did not finish, provenance.

Method-specific sections come from the registry and are spliced into each setting's section.
"""
from __future__ import annotations

import json

import numpy as np

from ..result import RunInfo
from .anatomy import section as anatomy_section
from .load import Loaded
from .markdown import acc, anchor, forget, pct, plural, table
from .registry import Figure, Setting
from .stats import fmt, fmt_budget


def header(loaded: Loaded, kept, duplicates, opts) -> list[str]:
    """Counts and the list of settings; the conventions come at the end (conventions())."""
    runs = loaded.runs
    n_fin = int((runs["status"] == "finished").sum())
    by_status = runs[runs["status"] != "finished"]["status"].value_counts()
    not_fin = f"{len(runs) - n_fin} not finished" + (
        f" ({', '.join(f'{n} {s}' for s, n in sorted(by_status.items()))})" if len(by_status) else "")
    out = [
        "# smt-bench analysis",
        "",
        f"From {plural(loaded.n_files, 'run file')}: {n_fin} finished, {not_fin}, {len(loaded.bad)} not "
        f"readable as a run, {plural(len(duplicates), 'run')} present twice (the newest finished copy kept). "
        f"Tables and figures use finished runs only: {plural(len(kept), 'run')} in "
        f"{plural(kept['setting_key'].nunique() if len(kept) else 0, 'setting')}; what was left out is listed under "
        "[Runs left out](#runs-left-out). Accuracy is in points, mean over seeds ± the 95% Student-t half-width; "
        "ratios are against full FT of the same setting ([Conventions](#conventions)).",
        "",
    ]
    if len(kept):
        out += ["Settings:", ""]
        for label, slug in sorted(set(zip(kept["setting"], kept["setting_slug"]))):
            out.append(f"- [{label}](#{anchor(label)}) (figures in `figures/{slug}/`)")
        out.append("")
    return out


def conventions(opts) -> list[str]:
    return ["## Conventions", "",
            "Accuracy in points (%), mean over seeds ± the 95% Student-t half-width (no interval with one seed). "
            "A *setting* is everything but method, budget and seed (model, data, training and evaluation config, "
            "the evaluation protocol); numbers are only compared within one. A *series* is a method's runs that "
            "compute the same thing (the same resolved method config, e.g. a block size as the model's shapes resolved it, under one "
            "`results.tag`); each method's *main* series is the untagged one that covers the most budgets (then the "
            "most runs, then the newest), and every other series is named by its tag or by the keys in which it "
            "differs from the main one. Ratios are against full FT of the same setting. *Plateau*: the smallest "
            "budget from which every further gain in mean accuracy per doubling of the budget is below "
            f"ε = {opts.epsilon:.2f} points (or negative); \"none\" when the last step still gains ≥ ε. Its interval "
            f"is a 95% bootstrap over seeds ({opts.n_boot} resamples of each budget's seeds, RNG seed {opts.seed}).", ""]


def _seeds_label(cell_seeds: tuple, all_seeds: set) -> str:
    missing = sorted(all_seeds - set(cell_seeds))
    n = len(cell_seeds)
    return f"{n} (no {', '.join(f's{s}' for s in missing)})" if missing else str(n)


def _range(values, spec: str = ".2f") -> str:
    v = [x for x in values if x is not None and np.isfinite(x)]
    if not v:
        return "—"
    lo, hi = fmt(min(v), spec), fmt(max(v), spec)
    return lo if lo == hi else f"{lo}–{hi}"


def headline(s: Setting, figures: list[Figure]) -> list[str]:
    """One setting's main comparison: each method's main series, accuracy per budget, memory and step time
    against full FT and the plateau; then the setting's figures, inline."""
    c, pal, label, slug = s.cells, s.palette, s.label, s.slug
    out = [f"## {label}", ""]
    devices = sorted(set(",".join(c["devices"]).split(",")) - {""})
    kinds = sorted(set(",".join(c["peak_memory_kind"]).split(",")) - {""})
    out.append(f"Protocol: `{c['protocol'].iloc[0]}`. Devices: {', '.join(devices) or 'unknown'}. "
               f"Peak memory: {', '.join(kinds) or 'unknown'}.")
    if len(devices) > 1:
        out.append("**Mixed devices:** memory and throughput ratios compare runs from different machines.")
    if not c["ft_series"].iloc[0]:
        out.append("No full-FT run in this setting: the ratio columns are empty and the figures show absolute values.")
    out.append("")
    main = c[c["main"]]
    budgets = sorted(set(main["budget_fraction"]))
    order = sorted(set(main["series"]), key=lambda x: (pal.key(main[main["series"] == x]["method"].iloc[0]), x))
    rows = []
    for series in order:
        sc = main[main["series"] == series]
        at = {b: r for b, r in zip(sc["budget_fraction"], sc.itertuples())}
        pl = s.plateaus.get(series)
        plateau = "" if series not in s.plateaus else ("n/a" if pl is None else
                                                       "none in range" if pl.index is None else fmt_budget(pl.budget))
        rows.append([series, *[acc(at[b].acc_mean, at[b].acc_ci) if b in at else "" for b in budgets],
                     _range(sc["mem_ratio"]), _range(sc["step_ratio"]), plateau])
    n_seeds = sorted(set(main["n_runs"]))
    out += [f"**Main comparison**: each method at its main settings; accuracy (points) per trainable budget, "
            f"{'/'.join(map(str, n_seeds))} seed{'s' if n_seeds != [1] else ''} a cell; memory and step time as the "
            "range over the budgets. Every series, with its exact config, is under Details.", ""]
    out += table(["method", *[fmt_budget(b) for b in budgets], "peak memory / FT", "step time / FT", "plateau from"],
                 rows)
    if "forget_n" in main.columns and (main["forget_n"] > 0).any():
        rows = []
        for series in order:
            sc = main[main["series"] == series]
            at = {b: r for b, r in zip(sc["budget_fraction"], sc.itertuples())}
            rows.append([series, *[forget(at[b].forget_mean, at[b].forget_ci) if b in at else "" for b in budgets]])
        out += ["**Forgetting beside accuracy**: the same cells' change of the mean token NLL on held-out general "
                "text, tuned minus base model (nats, mean ± 95% t-interval over seeds; positive: forgot; "
                "`eval.forgetting`). A method that learns the task while this stays near 0 kept more of the base "
                "model.", ""]
        out += table(["method", *[fmt_budget(b) for b in budgets]], rows)
    out += anatomy_section(s)
    for n, f in enumerate(figures, 1):
        out += [f"**Figure {n}. {f.title}.** {f.caption}", "", figure_link(f.title, slug, f.stem), ""]
    return out


def details(s: Setting, contributed: list[str]) -> list[str]:
    """Every series of one setting: what it is, every cell, the plateaus, per-task accuracy, then the
    methods' own sections."""
    c, plateaus, pal = s.cells, s.plateaus, s.palette
    out = [f"## Details: {s.label}", ""]
    ft_series = c["ft_series"].iloc[0]
    if ft_series:
        ft = c[(c["series"] == ft_series)].iloc[-1]
        out += [f"Full-FT reference: `{ft_series}` ({ft['n_runs']} run{'s' if ft['n_runs'] != 1 else ''}, "
                f"accuracy {acc(ft['acc_mean'], ft['acc_ci'])}).", ""]
    out += series_section(s)

    out += ["### Results", ""]
    rows = []
    order = sorted(range(len(c)), key=lambda i: (pal.key(c.iloc[i]["method"]), not c.iloc[i]["main"],
                                                 c.iloc[i]["series"], c.iloc[i]["budget_fraction"]))
    seeds_by_series = {x: set(v for t in c[c["series"] == x]["seeds"] for v in t) for x in set(c["series"])}
    first: dict = {}
    for i in order:
        first.setdefault(c.iloc[i]["series"], i)
    for i in order:
        r = c.iloc[i]
        pl = plateaus.get(r["series"])
        if r["series"] not in plateaus:  # the reference
            mark = ""
        elif pl is None:
            mark = "n/a" if first[r["series"]] == i else ""
        elif pl.index is None:
            mark = "none in range" if first[r["series"]] == i else ""
        else:
            mark = "starts here" if pl.budget == r["budget_fraction"] else ""
        rows.append([r["series"], fmt_budget(r["budget_fraction"]), _seeds_label(r["seeds"], seeds_by_series[r["series"]]),
                     acc(r["acc_mean"], r["acc_ci"]),
                     f"{pct(r['trainable_pct'])} / {pct(r['trainable_pct_target'])}",
                     fmt(r["mem_ratio"], ".2f"), fmt(r["tput_ratio"], ".2f"), fmt(r["step_ratio"], ".2f"),
                     "yes" if r["pareto"] else "", mark])
    out += table(["series", "budget", "seeds", "accuracy", "trainable % (achieved / target)", "peak memory / FT",
                   "tokens/s / FT", "step time / FT", "Pareto", "plateau"], rows)
    out += ["Seeds: runs per budget, naming seeds the series has elsewhere but not here. Budget is the target "
            "fraction of the model's parameters.", ""]

    out += ["### Plateau", ""]
    rows = []
    for series in sorted(plateaus, key=lambda x: (pal.key(c[c["series"] == x]["method"].iloc[0]), x)):
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
        out += table(["series", "plateau from", "bootstrap 95% interval", "P(no plateau)",
                       "gain per doubling (points)"], rows)
    else:
        out += ["No method with a budget sweep in this setting.", ""]

    acc_cols = [col for col in c.columns if col.startswith("acc.") and c[col].notna().any()]
    if acc_cols:
        out += ["### Per-task accuracy", "", "Mean over seeds."]
        out.append("")
        rows = [[c.iloc[i]["series"], fmt_budget(c.iloc[i]["budget_fraction"])]
                + [fmt(c.iloc[i][col], ".1f") for col in acc_cols] for i in order]
        out += table(["series", "budget"] + [col[4:] for col in acc_cols], rows)
    return out + contributed


def series_section(s: Setting) -> list[str]:
    """What each series label stands for: the main series' whole method config, each variant's difference."""
    runs, pal = s.runs, s.palette
    rows = []
    for (method, series), g in sorted(runs.groupby(["method", "series"], sort=True),
                                      key=lambda t: (pal.key(t[0][0]), not t[1]["main"].iloc[0], t[0][1])):
        r = g.iloc[0]
        cfg = {k[len("cfg.method."):]: r[k] for k in sorted(g.columns) if k.startswith("cfg.method.")
               and k != "cfg.method.name" and not _empty(r[k])}
        what = ", ".join(f"{k}={_short(v)}" for k, v in cfg.items()) if r["main"] else f"main, except {r['variant']}"
        if r["main"] and r["tag"]:
            what = f"tag {r['tag']}: {what}"
        rows.append([series, "yes" if r["main"] else "", str(len(g)), what])
    return ["### Series", "", "Each method's config as it ran (resolved where the model decides, e.g. a block "
            "size); a variant is named by its `results.tag` or by the keys in which it differs from its method's "
            "main series.", "", *table(["series", "main", "runs", "method config"], rows)]


def _empty(v) -> bool:
    return v is None or (isinstance(v, float) and not np.isfinite(v)) or v == ""


def _short(v) -> str:
    if isinstance(v, str):
        try:
            x = json.loads(v)
        except ValueError:
            return v
        if isinstance(x, list):
            return ",".join(str(i) for i in x)
        return v
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def figure_link(title: str, slug: str, stem: str) -> str:
    return f"![{title}](figures/{slug}/{stem}.png) ([PDF](figures/{slug}/{stem}.pdf))"


def _spread(e) -> str:
    """Errors in %: the median and the range."""
    return "—" if not len(e) else f"{np.median(e):+.1f}% ({np.min(e):+.1f}..{np.max(e):+.1f})"


def forecast_section(loaded: Loaded) -> list[str]:
    """The forecast's error per method (docs/forecast.md): each finished run's recorded forecast against what it
    measured (peak memory above the loaded model, median step time, the method's own phase); nothing for runs
    from before the forecast."""
    runs = loaded.runs
    if "forecast_peak_memory_bytes" not in runs.columns:
        return []
    done = runs[(runs["status"] == "finished") & runs["forecast_peak_memory_bytes"].notna()]
    if not len(done):
        return []

    def err(f, m):
        ok = np.isfinite(f) & np.isfinite(m) & (m > 0)
        return (f[ok] / m[ok] - 1) * 100

    rows = []
    for (method, device), g in sorted(done.groupby(["method", "forecast_device"]), key=lambda kv: kv[0]):
        mem = err(g["forecast_peak_memory_bytes"].to_numpy(float), g["peak_memory_bytes"].to_numpy(float))
        step = err(g["forecast_step_time_s"].to_numpy(float), g["median_step_time_s"].to_numpy(float))
        prep = err(g["forecast_prepare_peak_memory_bytes"].to_numpy(float),
                   g["prepare_peak_memory_bytes"].to_numpy(float))
        rows.append([method, device or "—", str(len(g)), _spread(mem), _spread(step), _spread(prep)])
    return ["## Forecast vs measured", "",
            "What each run's own forecast (`train_info.forecast`, recorded before it trained) said against what it "
            "measured: the error (forecast / measured − 1) as the median over the runs (range): peak memory above the "
            "loaded model, median step time, the method's own phase before training (a warm-up). Positive: the "
            "forecast was above. See docs/forecast.md.", ""] + \
        table(["method", "device", "runs", "peak memory", "step time", "own phase"], rows)


def failures_section(loaded: Loaded, duplicates) -> list[str]:
    out = ["## Runs left out", "", "### Runs that did not finish", "",
           "Not in the statistics. Detail: where a diverged run stopped, the batch size an OOM ran with, the last "
           "checkpoint of a running, killed, preempted or timed-out run, and the error.", ""]
    runs = loaded.runs
    unfinished = runs[runs["status"] != "finished"]
    if len(unfinished):
        finished_keys = set(runs[runs["status"] == "finished"]["config_key"])
        rows = []
        for _, r in unfinished.iterrows():
            detail = unfinished_detail(r["status"], loaded.run_info[r["file"]], loaded.configs[r["file"]], r["error"])
            rows.append([f"`{r['file']}`", r["method"], r["model"], fmt_budget(r["budget_fraction"]), str(r["seed"]),
                         r["status"], detail, "yes" if r["config_key"] in finished_keys else "no"])
        out += table(["file", "method", "model", "budget", "seed", "status", "detail", "rerun finished"], rows)
    else:
        out += ["None.", ""]
    out += ["### Files that are not valid runs", ""]
    if loaded.bad:
        out += table(["file", "problem"], [[f"`{b.path}`", b.reason] for b in sorted(loaded.bad, key=lambda b: b.path)])
    else:
        out += ["None.", ""]
    out += ["### Runs present twice", ""]
    if duplicates:
        out += ["The same computation, budget and seed in two files (a copy, or a rerun elsewhere). The newest "
                "finished copy (by `run_info.updated_at`) is used; the other is left out.", ""]
        out += table(["left out", "used instead"], [[f"`{a}`", f"`{b}`"] for a, b in sorted(duplicates)])
    else:
        out += ["None.", ""]
    return out


def unfinished_detail(status: str, run_info: RunInfo, config: dict, error: str) -> str:
    """What a run that did not finish got to, then its error (first line), at most 120 characters."""
    if status == "diverged":
        fact = f"diverged at step {run_info.diverged_at_step}"
    elif status in ("running", "preempted", "timed_out", "killed"):
        step = run_info.checkpoint_step
        fact = "no checkpoint" if step is None else f"last checkpoint at step {step}"
    elif status == "oom":
        bs = run_info.batch_size  # newer runs record it
        bs = (config.get("train") or {}).get("batch_size") if bs is None else bs
        fact = f"batch size {bs}" if bs is not None else ""
    else:
        fact = ""
    text = "; ".join(x for x in (fact, error) if x)
    return (text if len(text) <= 120 else text[:117] + "...") or "—"


def provenance_section(loaded: Loaded) -> list[str]:
    runs = loaded.runs
    out = ["## Provenance", "", "Of the valid run files (all statuses).", ""]
    shas: dict[str, tuple[int, int]] = {}
    for sha, dirty in zip(runs["git_sha"], runs["git_dirty"]):
        n, d = shas.get(sha or "unknown", (0, 0))
        shas[sha or "unknown"] = (n + 1, d + int(bool(dirty)))
    out += table(["git sha", "runs", "of them with uncommitted changes"],
                  [[f"`{s}`", str(n), str(d)] for s, (n, d) in sorted(shas.items())])
    devs: dict[tuple[str, str], int] = {}
    for t, name in zip(runs["device_type"], runs["device_name"]):
        key = (t or "unknown", name or "unknown")
        devs[key] = devs.get(key, 0) + 1
    out += table(["device", "name", "runs"], [[t, n, str(c)] for (t, n), c in sorted(devs.items())])
    versions: dict[str, dict[str, int]] = {}
    for f in runs["file"]:
        for pkg, v in (loaded.meta[f].versions if f in loaded.meta else {}).items():
            versions.setdefault(str(pkg), {})
            versions[pkg][str(v)] = versions[pkg].get(str(v), 0) + 1
    if versions:
        out += table(["package", "versions (runs)"],
                      [[p, ", ".join(f"{v} ({n})" for v, n in sorted(vs.items()))] for p, vs in sorted(versions.items())])
    return out
