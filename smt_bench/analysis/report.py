"""analyze(): run JSONs -> figures, CSV tables and report.md (byte-identical for the same inputs).

The orchestration only: what is computed where is in stats, the shared sections in sections, each
method's own in its registry contribution.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import anatomy as A
from . import figures as F
from . import registry
from .load import AnalysisError, Loaded, load
from .published import load_published, published_groups, published_section
from .sections import (conventions, details, failures_section, forecast_section, header, headline,
                       provenance_section)
from .stats import cells as make_cells, detect_plateau, pareto_front, reference_method, select_runs


@dataclass
class Options:
    epsilon: float = 0.5
    n_boot: int = 1000
    seed: int = 0
    published: str | None = None  # a CSV path; None = the one shipped with the package


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
    for dropped, used in duplicates:
        if warn:
            warn(f"run present twice: {dropped} and {used} are the same computation, budget and seed; "
                 f"using {used} (the newest finished copy)")
    cells = make_cells(kept)
    pal = _palette(loaded, kept, cells)
    settings = _settings(loaded, kept, cells, pal, opts)

    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / "figures"
    lines, detail_lines = header(loaded, kept, duplicates, opts), []
    with F.styled():
        for s in settings:
            own = [c for c in registry.contributions() if c.method in set(s.runs["method"])]
            listed = []
            for f in (*F.FIGURES, *A.FIGURES, *(f for c in own for f in c.figures)):
                fig = f.draw(s)
                if fig is not None:
                    F.save(fig, fig_dir / s.slug, f.stem)
                    listed += [f] if f.listed else []
            lines += headline(s, listed)
            detail_lines += details(s, [line for c in own for section in c.sections for line in section(s)])
        groups, pub_rows = published_groups(published, cells, pal)
        F.save(F.published_overlay(groups, pal), fig_dir, "published_overlay")

    lines += detail_lines
    lines += published_section(groups, pub_rows)
    lines += forecast_section(loaded)
    lines += failures_section(loaded, duplicates)
    lines += conventions(opts)
    lines += provenance_section(loaded)
    text = "\n".join(lines).rstrip("\n") + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    _write_csv(loaded.runs.drop(columns=["setting_key", "config_key", "series_key"]), out / "runs.csv")
    if len(cells):
        _write_csv(cells.drop(columns=["setting_key"]), out / "cells.csv")
    return out / "report.md"


def _palette(loaded: Loaded, kept: pd.DataFrame, cells: pd.DataFrame) -> F.Palette:
    series_by_method: dict[str, list[str]] = {}
    for m, s in zip(kept["method"], kept["series"]):
        series_by_method.setdefault(m, [])
        if s not in series_by_method[m]:
            series_by_method[m].append(s)
    reference = set(cells[cells["series"] == cells["ft_series"]]["method"]) if len(cells) else set()
    return F.Palette(sorted(set(loaded.runs["method"])), series_by_method, reference)


def _settings(loaded: Loaded, kept: pd.DataFrame, cells: pd.DataFrame, pal: F.Palette,
              opts: Options) -> list[registry.Setting]:
    """Per setting (by label): its cells with the Pareto flags, its runs and each series' plateau."""
    out: list = []
    if not len(cells):
        return out
    for skey in sorted(set(cells["setting_key"]), key=lambda k: (cells[cells["setting_key"] == k]["setting"].iloc[0], k)):
        c = cells[cells["setting_key"] == skey].copy()
        c["pareto"] = pareto_front(c["mem_ratio"].fillna(c["peak_memory_bytes"]).to_numpy(dtype=float),
                                   c["acc_mean"].to_numpy(dtype=float))
        reference = reference_method(c)
        plateaus = {}
        for series in sorted(set(c["series"])):
            sc = c[c["series"] == series]
            if (sc["method"] == reference).all():
                continue
            rng = np.random.default_rng([opts.seed, zlib.crc32(f"{skey}\0{series}".encode())])
            plateaus[series] = detect_plateau(sc, opts.epsilon, opts.n_boot, rng)
        runs = kept[kept["setting_key"] == skey]
        out.append(registry.Setting(label=c["setting"].iloc[0], slug=c["setting_slug"].iloc[0], cells=c, runs=runs,
                                    method_info={f: loaded.method_info[f] for f in runs["file"]}, palette=pal,
                                    plateaus=plateaus))
    return out


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    df = df.copy()
    for col in df.columns:
        if df[col].dtype == object:
            df[col] = df[col].map(lambda v: ";".join(map(str, v)) if isinstance(v, tuple) else v)
    df.to_csv(path, index=False, float_format="%.6g", lineterminator="\n")
