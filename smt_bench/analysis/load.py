"""Find run JSONs, check each against the results schema, flatten the good ones into a DataFrame.

A run file is any `*.json` below a `runs/` folder (results/runs/<group>/<file>.json), except files
inside a run's export folder (the folder beside a result file with the same name). A file that is
not a valid run is reported with a one-line reason and skipped; the rest are analysed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Sequence
from pathlib import Path

import pandas as pd

from ..migrations import with_legacy_defaults
from ..result import MetaInfo, RunInfo
from .flatten import flatten, flatten_config, with_resolved
from .schema import SchemaError, validate
from .settings import assign_settings


class AnalysisError(Exception):
    """Bad input to the analysis: one line, exit status 2, nothing written."""


@dataclass
class BadFile:
    path: str
    reason: str


@dataclass
class Loaded:
    runs: pd.DataFrame                        # one row per valid run file, sorted by file
    configs: dict[str, dict] = field(default_factory=dict)       # file -> resolved config
    run_info: dict[str, RunInfo] = field(default_factory=dict)   # file -> run_info (status, error, steps)
    meta: dict[str, MetaInfo] = field(default_factory=dict)      # file -> meta_info
    method_info: dict[str, dict] = field(default_factory=dict)   # file -> method_info (what a method reports)
    bad: list[BadFile] = field(default_factory=list)
    n_files: int = 0


# --- finding files ----------------------------------------------------------------------------
def find_run_files(inputs: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(display name, path) of every run file under the inputs, sorted by display name.

    The display name is the path relative to the input folder, prefixed with that folder's name,
    so the report does not depend on where the results tree sits or on the working directory."""
    found: dict[Path, str] = {}
    taken: dict[str, Path] = {}
    for raw in inputs:
        root = Path(raw)
        if not root.exists():
            raise AnalysisError(f"{raw}: no such file or directory; pass a results folder (e.g. outputs/results)")
        if root.is_file():
            if root.suffix != ".json":
                raise AnalysisError(f"{raw}: not a .json file; pass a results folder (e.g. outputs/results)")
            found.setdefault(root.resolve(), root.as_posix())
            taken.setdefault(root.as_posix(), root.resolve())
            continue
        base = root.resolve()
        for p in sorted(base.rglob("*.json")):
            rel = p.relative_to(base)
            parts = (base.name,) + rel.parts
            if p.name.startswith(".") or "runs" not in parts[:-1]:
                continue
            if _in_export_folder(p, base):
                continue
            display = "/".join(parts)
            if display in taken and taken[display] != p.resolve():  # two inputs with the same folder name
                display = "/".join((Path(raw).as_posix(),) + rel.parts)
            if p.resolve() not in found:
                found[p.resolve()] = display
                taken[display] = p.resolve()
    return sorted(((d, p) for p, d in found.items()), key=lambda t: (t[0], str(t[1])))


def _in_export_folder(p: Path, base: Path) -> bool:
    d = p.parent
    while d != base and base in d.parents:
        if (d.parent / f"{d.name}.json").is_file():
            return True
        d = d.parent
    return False


# --- loading ----------------------------------------------------------------------------------
def load(inputs: Sequence[str | Path], warn=None) -> Loaded:
    files = find_run_files(inputs)
    if not files:
        raise AnalysisError(f"no run files under {', '.join(map(str, inputs))} "
                            f"(expected <results.dir>/runs/<group>/*.json written by python -m smt_bench)")
    rows, out = [], Loaded(runs=pd.DataFrame(), n_files=len(files))
    for display, path in files:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            reason = "not UTF-8 text"
        except json.JSONDecodeError as e:
            reason = f"not valid JSON (line {e.lineno} column {e.colno}: {e.msg})"
        except OSError as e:
            reason = f"cannot be read ({e.strerror or e})"
        else:
            try:
                result = validate(obj)
                rows.append(flatten(result, display))
                # what the run computed with: older keys at the value they had, resolved keys at what ran
                out.configs[display] = with_resolved(with_legacy_defaults(result.config), result.method_info)
                out.run_info[display] = result.run_info
                out.meta[display] = result.meta_info
                out.method_info[display] = result.method_info or {}
                continue
            except SchemaError as e:
                reason = str(e)
        out.bad.append(BadFile(display, reason))
        if warn:
            warn(f"{display}: {reason}; skipped")
    if not rows:
        raise AnalysisError(f"none of the {len(files)} run files is a valid run result "
                            f"(first: {out.bad[0].path}: {out.bad[0].reason})")
    for row in rows:  # the whole resolved config, flattened (lists as JSON text)
        for k, v in flatten_config(out.configs[row["file"]]).items():
            x = json.loads(v)
            row[f"cfg.{k}"] = v if isinstance(x, (list, dict)) else x
    df = pd.DataFrame(rows)
    acc_cols = sorted(c for c in df.columns if c.startswith("acc."))
    cfg_cols = sorted(c for c in df.columns if c.startswith("cfg."))
    head = [c for c in df.columns if not c.startswith(("acc.", "cfg."))]
    out.runs = df[head + acc_cols + cfg_cols].sort_values("file", kind="stable").reset_index(drop=True)
    assign_settings(out)
    return out


