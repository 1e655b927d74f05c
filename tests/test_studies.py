"""The committed studies under results/ are what their own commands make of their committed inputs: each
study's report, tables and figures regenerate byte-identically (so a change to the analysis that changes a
committed report is seen, and the report is regenerated and its README says what changed)."""
from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"


def _differing(a: Path, b: Path) -> list[str]:
    """Files of tree a that are missing from b or differ from it byte for byte (and files only b has)."""
    out = []
    for p in sorted(x for x in a.rglob("*") if x.is_file()):
        q = b / p.relative_to(a)
        if not q.is_file() or not filecmp.cmp(p, q, shallow=False):
            out.append(p.relative_to(a).as_posix())
    out += [q.relative_to(b).as_posix() for q in sorted(b.rglob("*")) if q.is_file() and not (a / q.relative_to(b)).exists()]
    return out


@pytest.mark.slow
def test_embedded_sweep_report_regenerates_byte_identically(tmp_path):
    """`python -m smt_bench.analysis results/embedded-sweep --out results/embedded-sweep/analysis`."""
    from smt_bench.analysis.report import Options, analyze

    study = RESULTS / "embedded-sweep"
    copy = tmp_path / "embedded-sweep"
    shutil.copytree(study / "runs", copy / "runs")  # the display names start with the input folder's name
    analyze([str(copy)], copy / "analysis", Options(), warn=lambda msg: None)
    assert _differing(study / "analysis", copy / "analysis") == []


@pytest.mark.slow
def test_anatomy_study_report_regenerates_byte_identically(tmp_path):
    """`python -m smt_bench.analysis results/anatomy --out results/anatomy/analysis`: the anatomy table, its
    correlations and the three anatomy figures included."""
    from smt_bench.analysis.report import Options, analyze

    study = RESULTS / "anatomy"
    copy = tmp_path / "anatomy"
    shutil.copytree(study / "runs", copy / "runs")
    analyze([str(copy)], copy / "analysis", Options(), warn=lambda msg: None)
    assert _differing(study / "analysis", copy / "analysis") == []
    figures = {p.stem for p in (study / "analysis" / "figures" / "smollm2-135m-bundled").glob("*.png")}
    assert {"intruders", "intruders_forgetting", "spectra"} <= figures


@pytest.mark.slow
def test_selection_study_report_regenerates_byte_identically(tmp_path):
    study = RESULTS / "smt-selection-study"
    copy = tmp_path / "smt-selection-study"
    shutil.copytree(study, copy)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "smt_selection_study.py"), "--report-only",
                           "--out", str(copy)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _differing(study, copy) == []


# the results of python -m smt_bench.bench (worker measurements under "runs"; eval_cpu.json is another script's)
BENCH = sorted(p.stem for p in (RESULTS / "bench").glob("*.json") if "runs" in json.loads(p.read_text()))


def test_every_memory_and_speed_bench_is_checked():
    assert {"smollm2-135m-cpu", "llama-7b-random-cpu", "llama3-8b-random-cpu"} <= set(BENCH)


@pytest.mark.parametrize("name", BENCH)
def test_bench_tables_regenerate_byte_identically(tmp_path, name):
    """`python -m smt_bench.bench.report results/bench/<name>.json` recomputes summary and table from the raw
    measurements."""
    from smt_bench.bench.report import regenerate

    src = RESULTS / "bench" / f"{name}.json"
    shutil.copy(src, tmp_path / src.name)
    shutil.copy(src.with_suffix(".md"), tmp_path / f"{name}.md")
    regenerate(tmp_path / src.name)
    for ext in ("json", "md"):
        assert filecmp.cmp(RESULTS / "bench" / f"{name}.{ext}", tmp_path / f"{name}.{ext}", shallow=False), ext
