"""The analysis (python -m smt_bench.analysis) on synthetic result sets written in the run schema."""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import numpy as np
import pytest

from smt_bench.analysis.load import AnalysisError, load, validate
from smt_bench.analysis.report import Options, analyze
from smt_bench.analysis.stats import detect_plateau, mean_ci, plateau_index, t975

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = "generative-first-match (LLM-Adapters): Alpaca prompt, greedy, max_new_tokens=32"
TASKS = ("addition", "vowels")
CS8 = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
STEMS = ("accuracy_vs_params", "memory", "throughput", "smt_blocks", "pareto")
N = 3_219_776  # tiny-llama's parameter count


# --- synthetic run files ----------------------------------------------------------------------
def run_doc(method: str, budget: float, seed: int, acc: float | None = None, *, status: str = "finished",
            model: str = "tiny-llama", data: str = "bundled", tasks=TASKS, max_steps: int = 20,
            method_extra: dict | None = None, block_map: list | None = None, tokens_per_s: float = 1000.0,
            peak: float = 4e8, device: str = "AMD EPYC") -> dict:
    """A result dict shaped like smt_bench.run.execute writes (schema_version 1)."""
    frac = 1.0 if method == "full_ft" else budget
    config = {
        "model": {"name": model, "source": {"_target_": "smt_bench.models.TinyLlama", "hidden_size": 64}},
        "data": {"name": data, "_target_": "smt_bench.data.bundled.BundledSuite", "seed": 1234},
        "train": {"max_steps": max_steps, "batch_size": 8, "betas": [0.9, 0.999]},
        "eval": {"enabled": True, "max_new_tokens": 32, "batch_size": 16, "max_examples": None},
        "logger": {"_target_": "smt_bench.loggers.NullLogger"},
        "budget": {"name": "fixed" if method == "full_ft" else f"{100 * budget:g}pct", "fraction": frac},
        "method": {"_target_": f"smt_bench.methods.{method}", "name": method, "lr": 1e-4, **(method_extra or {})},
        "seed": seed, "device": "auto", "threads": None,
        "results": {"dir": "results", "group": f"{model}-{data}"},
    }
    run_id = hashlib.sha256(json.dumps([config, status], sort_keys=True).encode()).hexdigest()[:12]
    doc = {
        "schema_version": 1,
        "run_info": {"id": run_id, "created_at": f"2026-01-01T00:00:{seed:02d}+00:00", "command": "x",
                     "status": status, "error": None if status == "finished" else "RuntimeError: boom | bad",
                     "wall_time_s": 1.0},
        "config": config,
        "meta_info": {"git": {"sha": "abc123", "dirty": False},
                      "versions": {"python": "3.11.7", "torch": "2.13.0+cpu"},
                      "device": {"type": "cpu", "name": device, "torch_threads": 2}, "argv": [], "hostname": "h"},
    }
    if status != "finished":
        return doc
    target = round(frac * N)
    achieved = target if method in ("full_ft", "smt") else int(target * 0.97)
    trainable = achieved if method != "full_ft" else N
    doc["train_info"] = {
        "steps": max_steps, "loss_curve": [1.0], "val_loss_curve": [[max_steps, 1.0]], "final_train_loss": 1.0,
        "train_time_s": 10.0, "median_step_time_s": 1000.0 / tokens_per_s, "tokens": 10000,
        "tokens_per_s": tokens_per_s, "peak_memory_bytes": peak, "peak_memory_kind": "cpu_peak_rss_growth",
        "memory_breakdown_bytes": {"weights": 1.3e7, "gradients": 4 * trainable, "optimizer": 8 * trainable,
                                   "activations": 1.7e8, "activations_note": "bytes saved for backward"},
        "trainable_params_target": target, "trainable_params": trainable,
        "trainable_pct_target": 100.0 * target / N, "trainable_pct": 100.0 * trainable / N, "base_params": N,
        "plan": {}, "load_time_s": 0.1, "prepare_time_s": 0.1,
    }
    doc["method_info"] = {}
    if block_map is not None:
        from collections import Counter

        per = Counter(b[1] for b in block_map)
        doc["method_info"] = {"kernels_backend": "torch", "block_map_columns": ["layer", "projection", "row_block",
                                                                                "col_block"],
                              "block_map": block_map, "block_share": {p: c / len(block_map) for p, c in per.items()}}
    doc["eval"] = {"protocol": PROTOCOL, "accuracy": {t: acc for t in tasks}, "n": {t: 20 for t in tasks},
                   "mean_accuracy": acc, "wall_s": 0.1, "model_evaluated": "merged"}
    doc["summary"] = {"method": method, "mean_accuracy": acc}
    return doc


def write_run(root: Path, doc: dict) -> Path:
    c = doc["config"]
    path = (root / "runs" / c["results"]["group"] /
            f"{c['method']['name']}-b{c['budget']['fraction']:g}-s{c['seed']}-{doc['run_info']['id']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


def smt_map(v_per_layer: int = 5) -> list:
    """2 layers: q 2, k 1, v v_per_layer blocks each."""
    out = []
    for layer in range(2):
        out += [[layer, "q_proj", 0, i] for i in range(2)] + [[layer, "k_proj", 0, 0]]
        out += [[layer, "v_proj", i % 2, i // 2] for i in range(v_per_layer)]
    return out


BUDGETS = (0.005, 0.01, 0.02, 0.05)
# SMT: +10 points from 0.5% to 1%, then flat -> plateau from 1%. LoRA: +4 per doubling throughout -> none.
SMT_ACC = {0.005: 50.0, 0.01: 60.0, 0.02: 60.2, 0.05: 60.3}
LORA_ACC = {0.005: 40.0, 0.01: 44.0, 0.02: 48.0, 0.05: 48.0 + 4 * math.log2(2.5)}
NOISE = (-0.3, 0.0, 0.3)


def make_results(root: Path) -> Path:
    res = root / "results"
    for seed in range(3):
        for b in BUDGETS:
            write_run(res, run_doc("smt", b, seed, SMT_ACC[b] + NOISE[seed], block_map=smt_map(),
                                   tokens_per_s=1200.0, peak=3e8 + 1e9 * b))
            if not (b == 0.02 and seed == 2):  # a missing seed
                write_run(res, run_doc("lora", b, seed, LORA_ACC[b] + NOISE[seed], tokens_per_s=900.0,
                                       peak=3.2e8 + 1e9 * b))
        write_run(res, run_doc("full_ft", 1.0, seed, 62.0 + NOISE[seed], tokens_per_s=800.0, peak=5e8))
    write_run(res, run_doc("dora", 0.01, 0, 55.0))  # one budget, one seed
    write_run(res, run_doc("dora", 0.02, 0, status="oom"))
    write_run(res, run_doc("lora", 0.02, 2, status="failed"))  # the missing seed failed
    write_run(res, run_doc("smt", 0.05, 9, status="cancelled"))
    # bad files: not JSON, wrong schema version, a missing key, a wrong type
    bad = res / "runs" / "tiny-llama-bundled"
    (bad / "broken.json").write_text('{"schema_version": 1, "run_info": ')
    (bad / "future.json").write_text(json.dumps(dict(run_doc("smt", 0.01, 0, 1.0), schema_version=2)))
    d = run_doc("smt", 0.01, 5, 1.0)
    del d["train_info"]["tokens_per_s"]
    (bad / "nokey.json").write_text(json.dumps(d))
    d = run_doc("smt", 0.01, 6, 1.0)
    d["eval"]["accuracy"]["vowels"] = "high"
    (bad / "badtype.json").write_text(json.dumps(d))
    (res / "bench.json").write_text("[]")  # not under runs/: not a run file
    return res


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """One synthetic result set analysed twice (to two output folders)."""
    root = tmp_path_factory.mktemp("ana")
    res = make_results(root)
    warnings = []
    analyze([str(res)], root / "out1", Options(), warn=warnings.append)
    analyze([str(res)], root / "out2", Options())
    return root, res, warnings


def _rows(report: str, heading: str) -> list[list[str]]:
    """The table rows under a '### heading' (cells stripped)."""
    part = report.split(f"### {heading}\n", 1)[1]
    rows = []
    for line in part.splitlines()[2:]:
        if line.startswith("#"):
            break
        if line.startswith("| ") and not line.startswith("| ---"):
            rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


# --- plateau ----------------------------------------------------------------------------------
def test_plateau_index_definition():
    b = [0.005, 0.01, 0.02, 0.05]
    assert plateau_index(b, [50, 60, 60.2, 60.3], 0.5) == 1
    assert plateau_index(b, [50, 50.1, 50.2, 50.3], 0.5) == 0            # flat from the start
    assert plateau_index(b, [50, 52, 54, 56], 0.5) is None                 # still gaining: none in range
    assert plateau_index(b, [50, 60, 55, 54], 0.5) == 1                    # turning negative counts
    assert plateau_index(b, [50, 50.1, 50.2, 58], 0.5) is None             # a late jump undoes the plateau
    assert plateau_index(b[:2], [50, 50.2], 0.5) == 0
    assert plateau_index(b[:1], [50], 0.5) is None
    # per doubling: 0.02 -> 0.05 is log2(2.5) = 1.32 doublings, so +0.6 there is +0.45 per doubling
    assert plateau_index(b, [50, 60, 60.2, 60.8], 0.5) == 1
    assert plateau_index(b, [50, 60, 60.2, 60.9], 0.5) is None


def test_plateau_bootstrap_is_seeded_and_brackets_the_estimate():
    import pandas as pd

    cells = pd.DataFrame({"budget_fraction": list(BUDGETS), "n": [3] * 4,
                          "acc_values": [tuple(SMT_ACC[b] + x for x in NOISE) for b in BUDGETS]})
    a = detect_plateau(cells, 0.5, 200, np.random.default_rng(0))
    b = detect_plateau(cells, 0.5, 200, np.random.default_rng(0))
    assert a == b and a.budget == 0.01
    assert a.ci_low <= a.index <= a.ci_high
    noisy = cells.assign(acc_values=[(50, 50, 50), (52, 60, 68), (55, 60, 65), (60, 60, 60)])
    p = detect_plateau(noisy, 0.5, 300, np.random.default_rng(1))
    assert 0 < p.p_none < 1 and p.ci_high == 4  # "none" lies inside the interval


def test_t_interval():
    m, ci, n = mean_ci([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and ci == pytest.approx(4.3027 * 1.0 / math.sqrt(3), rel=1e-4)
    assert math.isnan(mean_ci([5.0])[1]) and mean_ci([])[2] == 0
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 30, 31, 60, 200):
        assert t975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=2e-4)


@pytest.mark.slow
def test_known_plateau_found_and_none_reported(analysed):
    root, _, _ = analysed
    report = (root / "out1" / "report.md").read_text()
    rows = {r[0]: r for r in _rows(report, "Plateau")}
    assert rows["smt"][1] == "1%"
    assert rows["lora"][1] == "none in range"
    assert rows["dora"][1].startswith("n/a")
    assert "full_ft" not in rows
    res = {(r[0], r[1]): r for r in _rows(report, "Results")}
    assert res[("smt", "1%")][-1] == "starts here" and res[("smt", "0.5%")][-1] == ""
    assert res[("lora", "0.5%")][-1] == "none in range" and res[("lora", "1%")][-1] == ""
    assert res[("dora", "1%")][-1] == "n/a" and res[("full_ft", "100%")][-1] == ""


# --- runs, seeds, failures, bad files ---------------------------------------------------------
def test_missing_seeds_and_failed_runs(analysed):
    root, _, _ = analysed
    report = (root / "out1" / "report.md").read_text()
    res = {(r[0], r[1]): r for r in _rows(report, "Results")}
    assert res[("lora", "2%")][2] == "2 (no s2)" and res[("lora", "1%")][2] == "3"
    assert res[("dora", "1%")][2:4] == ["1", "55.0"]           # n = 1: no interval
    assert res[("smt", "1%")][3] == f"60.0 ± {4.3027 * 0.3 / math.sqrt(3):.1f}"
    assert ("dora", "2%") not in res                             # the OOM run is not in the tables
    assert res[("full_ft", "100%")][5:8] == ["1.00", "1.00", "1.00"]
    assert res[("smt", "0.5%")][6] == "1.50"                     # 1200 / 800 tokens/s
    failed = report.split("## Runs that did not finish\n", 1)[1].split("## ", 1)[0]
    for status in ("oom", "failed", "cancelled"):
        assert f"| {status} |" in failed
    assert "RuntimeError: boom \\| bad" in failed                # a pipe in the error is escaped
    cells = __import__("pandas").read_csv(root / "out1" / "cells.csv")
    assert set(cells["method"]) == {"smt", "lora", "dora", "full_ft"}
    assert int(cells[(cells["method"] == "smt") & (cells["budget_fraction"] == 0.05)]["n"].iloc[0]) == 3


def test_malformed_files_reported_not_fatal(analysed):
    root, _, warnings = analysed
    report = (root / "out1" / "report.md").read_text()
    bad = dict((r[0].strip("`"), r[1]) for r in
               _rows(report.replace("## Files that are not valid runs", "### Bad"), "Bad"))
    base = "results/runs/tiny-llama-bundled"
    assert bad[f"{base}/broken.json"].startswith("not valid JSON (line 1")
    assert bad[f"{base}/future.json"] == "schema_version 2 is not supported (this analysis reads 1)"
    assert bad[f"{base}/nokey.json"] == "missing key train_info.tokens_per_s"
    assert bad[f"{base}/badtype.json"] == 'eval.accuracy.vowels="high" is not a finite number or null'
    assert len(bad) == 4 and len(warnings) == 4                # bench.json is not a run file
    assert all(": " in w and "\n" not in w for w in warnings)


def test_run_files_found_and_export_folders_skipped(tmp_path):
    from smt_bench.analysis.load import find_run_files

    res = tmp_path / "results"
    a = write_run(res, run_doc("lora", 0.01, 0, 50.0))
    (a.with_suffix("") / "adapter").mkdir(parents=True)             # results.export=true beside the result
    (a.with_suffix("") / "adapter" / "adapter_config.json").write_text("{}")
    (a.with_suffix("") / "meta.json").write_text("{}")
    nested = res / "runs" / "sweep1" / "a" / "smt-b0.01-s0-x.json"   # results.group with a slash
    nested.parent.mkdir(parents=True)
    nested.write_text("{}")
    (a.parent / f".{a.name}.123.tmp").write_text("{}")              # an atomic write in progress
    (res / "bench.json").write_text("{}")                            # outside runs/
    found = [d for d, _ in find_run_files([res])]
    assert found == ["results/runs/sweep1/a/smt-b0.01-s0-x.json", f"results/runs/tiny-llama-bundled/{a.name}"]
    assert [d for d, _ in find_run_files([res / "runs", res])] == sorted(  # overlapping inputs: each file once
        [f"runs/tiny-llama-bundled/{a.name}", "runs/sweep1/a/smt-b0.01-s0-x.json"])
    other = tmp_path / "b" / "results"  # another folder named results: names stay apart
    b = write_run(other, run_doc("lora", 0.01, 0, 50.0))
    names = [d for d, _ in find_run_files([res, other])]
    assert len(names) == 3 and f"{other.as_posix()}/runs/tiny-llama-bundled/{b.name}" in names
    with pytest.raises(AnalysisError, match="no run files under"):
        (tmp_path / "empty").mkdir()
        load([tmp_path / "empty"])


def test_validate_accepts_a_real_result_shape():
    validate(run_doc("smt", 0.01, 0, 50.0, block_map=smt_map()))
    validate(run_doc("lora", 0.01, 0, status="failed"))
    d = run_doc("lora", 0.01, 0, 50.0)
    d["eval"] = None  # eval disabled
    validate(d)
    d = run_doc("lora", 0.01, 0, 50.0)
    d["eval"]["accuracy"]["vowels"], d["eval"]["mean_accuracy"] = None, None  # a task that could not be scored
    validate(d)


def test_smt_share_v_matters_most(analysed):
    root, _, _ = analysed
    report = (root / "out1" / "report.md").read_text()
    assert '"V matters most" on these runs: **yes**' in report
    rows = _rows(report, "SMT block share per projection")
    assert rows[0][:6] == ["smt", "0.5%", "3", "4.0 (25.0%)", "2.0 (12.5%)", "10.0 (62.5%)"] and rows[0][-1] == "v"
    assert "v 120 (62.5%)" in report  # pooled over 12 runs
    assert "Selected blocks as a share of the blocks each projection offers" not in report  # no eligible_blocks


def test_smt_rate_per_eligible_block(tmp_path):
    """Rates divide by what each projection offers; an eligible projection never chosen shows 0% in the
    table and gets a heatmap column; a saturated projection reads 100%."""
    from smt_bench.methods.smt.analysis.blocks import block_counts

    res = tmp_path / "results"
    for seed in range(2):
        d = run_doc("smt", 0.01, seed, 50.0, block_map=smt_map())  # per run: q 4, k 2, v 10, o 0
        d["method_info"]["eligible_blocks"] = {"q_proj": 8, "k_proj": 4, "v_proj": 10, "o_proj": 8}
        write_run(res, d)
    analyze([str(res)], tmp_path / "out", Options())
    report = (tmp_path / "out" / "report.md").read_text()
    part = report.split("Selected blocks as a share of the blocks each projection offers", 1)[1].split("###", 1)[0]
    table = [ln for ln in part.splitlines() if ln.startswith("| smt")]
    assert table == ["| smt | 1% | 2 | 50.0% of 8 | 50.0% of 4 | 100.0% of 10 | 0.0% of 8 |"]
    assert "pooled over 2 SMT runs that record `eligible_blocks`: q 50.0%, k 50.0%, v 100.0%, o 0.0%; " \
           "most selected: v." in report
    mat, cols, layers = block_counts([smt_map()], {"q", "k", "v", "o"})
    assert cols == ["q", "k", "v", "o"] and layers == 2 and mat[:, 3].sum() == 0 and mat[0].tolist() == [2, 1, 5, 0]
    bad = run_doc("smt", 0.01, 0, 50.0, block_map=smt_map())
    bad["method_info"]["eligible_blocks"] = {"q_proj": 1.5}
    with pytest.raises(ValueError, match=r"method_info.eligible_blocks.q_proj=1.5 is not an integer"):
        validate(bad)


@pytest.mark.slow
def test_settings_series_duplicates_no_ft_and_no_eval(tmp_path):
    """Runs differing in training config are separate settings; a method's own config variants are
    separate series; a repeated seed is used once; no full FT and no evaluation still give every output."""
    res = tmp_path / "results"
    for seed in range(2):
        for b in (0.01, 0.02):
            write_run(res, run_doc("smt", b, seed, 50.0 + 100 * b))
            write_run(res, run_doc("smt", b, seed, 40.0, method_extra={"selection": "per_matrix"}))
            write_run(res, run_doc("smt", b, seed, 30.0, max_steps=50))
    dup = run_doc("smt", 0.01, 0, 99.0)
    dup["config"]["device"] = "cpu"  # same computation, another run id
    dup["run_info"]["id"] = "dup000000000"
    write_run(res, dup)
    noeval = run_doc("lora", 0.01, 0, 1.0)
    noeval["eval"] = None
    write_run(res, noeval)
    loaded = load([res])
    from smt_bench.analysis.stats import cells as make_cells, select_runs

    kept, dropped = select_runs(loaded.runs)
    assert len(dropped) == 1 and dropped[0][0].endswith("dup000000000.json")
    c = make_cells(kept)
    labels = sorted(set(c["setting"]))
    assert len(labels) == 3 and all(l.startswith("tiny-llama · bundled (eval.protocol=") for l in labels)
    assert sum("train.max_steps=50" in l for l in labels) == 1 and sum("no evaluation" in l for l in labels) == 1
    assert "eval.protocol=generative-first-match (LLM-Ada…," in labels[0]  # long values are cut
    main = c[c["setting"].str.contains("max_steps=20") & ~c["setting"].str.contains("no evaluation")]
    assert sorted(set(main["series"])) == ["smt", "smt (selection=per_matrix)"]  # the main series, then the variant
    assert main[(main["series"] == "smt") & (main["budget_fraction"] == 0.01)]["acc_mean"].item() == 51.0
    assert set(main[main["main"]]["series"]) == {"smt"} and set(main["variant"]) == {"", "selection=per_matrix"}
    assert main["mem_ratio"].isna().all()  # no full FT
    analyze([str(res)], tmp_path / "out", Options(n_boot=20))
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.count("No full-FT run in this setting") == 3
    assert "### Runs present twice" in report and "dup000000000.json` | `" in report
    runs = __import__("pandas").read_csv(tmp_path / "out" / "runs.csv")
    smt_slugs = set(runs[runs["method"] == "smt"]["setting_slug"])
    for slug in ("tiny-llama-bundled-1", "tiny-llama-bundled-2", "tiny-llama-bundled-3"):
        for stem in STEMS:  # a method's own figure only where it ran (the setting without evaluation is LoRA's)
            path = tmp_path / "out" / "figures" / slug / f"{stem}.png"
            assert path.stat().st_size > 1000 if slug in smt_slugs or stem != "smt_blocks" else not path.exists()
    assert len(smt_slugs) == 2


def _smt(budget, seed, acc, configured, ran, **kw):
    d = run_doc("smt", budget, seed, acc, block_map=smt_map(), method_extra={"block_size": configured}, **kw)
    d["method_info"]["block_size"] = ran  # what the model's shapes reduced the configured bound to
    return d


def test_configs_that_compute_the_same_thing_are_one_series_and_a_copy_is_named(tmp_path):
    """block_size=256 and block_size=64 both ran 64² blocks: one series, labelled by what ran; the same run
    in two files is reported with both paths (stderr and report), the newest finished copy used."""
    res = tmp_path / "results"
    for seed in (0, 1):
        write_run(res, _smt(0.01, seed, 50.0 + seed, 64, 64))
        write_run(res, _smt(0.02, seed, 55.0 + seed, 256, 64))
    newer = _smt(0.01, 0, 58.0, 256, 64)  # seed 0 at 1% again, under the other bound, finished later
    newer["run_info"]["updated_at"] = "2026-02-01T00:00:00+00:00"
    newer_path = write_run(res, newer).relative_to(tmp_path).as_posix()
    older_path = next(p for p in res.rglob("smt-b0.01-s0-*.json") if p.name != Path(newer_path).name)
    older_path = older_path.relative_to(tmp_path).as_posix()
    other = _smt(0.01, 0, 20.0, 256, 32)  # a bound that resolved otherwise (another model) is another computation
    other["run_info"]["id"] = "other0000000"
    write_run(res, other)
    warnings = []
    analyze([str(res)], tmp_path / "out", Options(n_boot=10), warn=warnings.append)
    assert warnings == [f"run present twice: {older_path} and {newer_path} are the same computation, budget and "
                        f"seed; using {newer_path} (the newest finished copy)"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"| `{older_path}` | `{newer_path}` |" in report
    series = {r[0]: r for r in _rows(report, "Series")[1:]}
    assert set(series) == {"smt", "smt (block_size=32)"} and series["smt"][2] == "4"  # runs used
    assert "block_size=64" in series["smt"][3] and series["smt (block_size=32)"][3] == "main, except block_size=32"
    cells = __import__("pandas").read_csv(tmp_path / "out" / "cells.csv")
    one = cells[(cells["series"] == "smt") & (cells["budget_fraction"] == 0.01)]
    assert one["acc_mean"].item() == (58.0 + 51.0) / 2  # the newer copy of seed 0, and seed 1


def test_a_tag_names_its_series(tmp_path):
    res = tmp_path / "results"
    for seed in (0, 1):
        write_run(res, run_doc("lora", 0.01, seed, 40.0))
        tagged = run_doc("lora", 0.01, seed, 45.0, method_extra={"lr": 3e-4})
        tagged["config"]["results"]["tag"] = "hot_lr"
        write_run(res, tagged)
    analyze([str(res)], tmp_path / "out", Options(n_boot=10))
    report = (tmp_path / "out" / "report.md").read_text()
    series = {r[0]: r for r in _rows(report, "Series")[1:]}
    assert set(series) == {"lora", "lora (hot_lr)"} and series["lora"][1] == "yes"
    assert series["lora (hot_lr)"][3] == "main, except hot_lr"
    head = _rows(report.split("## Details", 1)[0] + "\n### end\n", "end")  # nothing: the headline has no ### table
    assert head == []
    assert "| lora | 40.0 ± 0.0 |" in report.split("## Details", 1)[0]  # the main comparison shows the main series


# --- outputs ----------------------------------------------------------------------------------
def test_every_figure_produced_and_nonempty(analysed):
    root, _, _ = analysed
    figs = root / "out1" / "figures"
    expected = [figs / "tiny-llama-bundled" / f"{s}.{ext}" for s in STEMS for ext in ("png", "pdf")]
    expected += [figs / f"published_overlay.{ext}" for ext in ("png", "pdf")]
    for p in expected:
        assert p.is_file() and p.stat().st_size > 1000, p
        assert p.read_bytes()[:4] in (b"\x89PNG", b"%PDF")
    report = (root / "out1" / "report.md").read_text()
    for p in expected:  # linked relatively from the report
        assert f"]({p.relative_to(root / 'out1').as_posix()})" in report


def test_report_byte_identical_when_regenerated(analysed):
    root, _, _ = analysed
    a, b = root / "out1", root / "out2"
    assert (a / "report.md").read_bytes() == (b / "report.md").read_bytes()
    for p in sorted(a.rglob("*")):
        if p.is_file():  # figures and CSVs too: no dates, fixed formatting
            assert p.read_bytes() == (b / p.relative_to(a)).read_bytes(), p
    text = (a / "report.md").read_text()
    assert "2026-01-01" not in text and str(root) not in text  # no timestamps, no absolute paths


def test_provenance_listed(analysed):
    root, _, _ = analysed
    report = (root / "out1" / "report.md").read_text()
    prov = report.split("## Provenance", 1)[1]
    assert "| `abc123` | 30 | 0 |" in prov and "| cpu | AMD EPYC | 30 |" in prov  # 27 finished + 3 not
    assert "| torch | 2.13.0+cpu (30) |" in prov


@pytest.mark.slow
def test_published_overlay_only_where_model_and_protocol_match(tmp_path):
    res = tmp_path / "results"
    for b, acc in ((0.005, 70.0), (0.01, 75.0)):
        write_run(res, run_doc("smt", b, 0, acc, model="llama-7b", data="local", tasks=CS8))
    write_run(res, run_doc("lora", 0.01, 0, 30.0, model="llama-7b", data="local", tasks=("boolq",)))  # 1 task
    analyze([str(res)], tmp_path / "out", Options(n_boot=10))
    report = (tmp_path / "out" / "report.md").read_text()
    pub = report.split("## Published numbers", 1)[1]
    assert "**no run matches" not in pub and "overlaid on llama-7b · local (eval.tasks=" in pub
    assert "| llama-7b | commonsense-8 | dora | 32 | 1e-4 | 0.8455 | 78.4 | [1] |" in pub
    assert "[1] NVlabs/DoRA commonsense_reasoning/README.md" in pub
    # the boolq-only LoRA run is another setting and is not overlaid
    from smt_bench.analysis.figures import Palette
    from smt_bench.analysis.published import load_published, published_groups
    from smt_bench.analysis.stats import cells, select_runs

    loaded = load([str(res)])
    groups, _ = published_groups(load_published(None), cells(select_runs(loaded.runs)[0]), Palette(["smt", "lora"], {}))
    assert set(groups[0]["cells"]["method"]) == {"smt"} and len(groups[0]["cells"]) == 2


def test_published_not_mixed_when_nothing_matches(analysed):
    root, _, _ = analysed
    report = (root / "out1" / "report.md").read_text()
    assert "**no run matches this model, protocol and task set**" in report
    assert (root / "out1" / "figures" / "published_overlay.png").stat().st_size > 1000


# --- CLI --------------------------------------------------------------------------------------
def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "smt_bench.analysis", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["empty", "missing", "all_bad", "no_out"])
def test_cli_bad_input_exit_2_nothing_written(tmp_path, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "runs").mkdir()
    (empty / "notes.json").write_text("{}")  # not under runs/: not a run file
    args = {"empty": [empty, "--out", tmp_path / "out"],
            "missing": [tmp_path / "nope", "--out", tmp_path / "out"],
            "all_bad": [tmp_path / "bad", "--out", tmp_path / "out"],
            "no_out": [empty]}[case]
    if case == "all_bad":
        (tmp_path / "bad" / "runs" / "g").mkdir(parents=True)
        (tmp_path / "bad" / "runs" / "g" / "x.json").write_text("nope")
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    errors = [l for l in r.stderr.splitlines() if "error" in l]
    assert len(errors) == 1 and errors[0].startswith("smt-bench analysis: error: "), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_and_wrapper_write_the_report(tmp_path):
    res = tmp_path / "results"
    for seed in range(2):
        write_run(res, run_doc("smt", 0.01, seed, 50.0 + seed, block_map=smt_map()))
    (res / "runs" / "tiny-llama-bundled" / "junk.json").write_text("[1, 2")
    r = _cli(res, "--out", tmp_path / "a", "--bootstrap", "20", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("smt-bench analysis: warning: results/runs/tiny-llama-bundled/junk.json: not valid") == 1
    r2 = subprocess.run([sys.executable, str(REPO / "scripts" / "analyze.py"), res, "--out", tmp_path / "b",
                         "--bootstrap", "20"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert (tmp_path / "a" / "report.md").read_bytes() == (tmp_path / "b" / "report.md").read_bytes()


@pytest.mark.slow
def test_selection_stability_pairs_runs_that_differ_in_one_factor(tmp_path):
    """Jaccard of block sets between SMT runs differing only in the seed, or only in the warm-up length;
    runs that differ in two factors are not compared."""
    res = tmp_path / "results"
    base = smt_map()  # 16 blocks
    other = base[:-2] + [[1, "v_proj", 5, 5], [1, "v_proj", 6, 6]]  # 14 shared of 18 in the union
    for seed, bmap in ((0, base), (1, other)):
        write_run(res, run_doc("smt", 0.01, seed, 50.0, block_map=bmap, method_extra={"warmup_steps": 4}))
    write_run(res, run_doc("smt", 0.01, 0, 50.0, block_map=base, method_extra={"warmup_steps": 16}))
    write_run(res, run_doc("smt", 0.01, 1, 50.0, block_map=base, method_extra={"warmup_steps": 64}))
    analyze([str(res)], tmp_path / "out", Options())
    rows = _rows((tmp_path / "out" / "report.md").read_text(), "SMT selection stability")[1:]  # after the header
    assert rows == [["seed", "1%", "two seeds", "1", f"{14 / 18:.3f}", f"{14 / 18:.3f}"],
                    ["warmup_steps", "1%", "4 vs 16", "1", "1.000", "1.000"],
                    ["warmup_steps", "1%", "4 vs 64", "1", f"{14 / 18:.3f}", f"{14 / 18:.3f}"]]


def test_jaccard_and_pairs():
    from smt_bench.methods.smt.analysis.stability import block_set, by_context, jaccard, pairs, summary

    a, b = block_set([[0, "v_proj", 0, 0], [0, "v_proj", 0, 1]]), block_set([[0, "v_proj", 0, 1]])
    assert jaccard(a, b) == 0.5 and jaccard(a, a) == 1.0 and jaccard(frozenset(), frozenset()) == 1.0
    pts = [dict(seed=s, warmup_steps=w, accumulation=acc, score="abs_mean", budget=0.01, blocks=blk)
           for s, w, acc, blk in ((0, 4, "grad_sum", a), (1, 4, "grad_sum", b), (0, 4, "score_sum", b),
                                  (1, 16, "score_sum", a))]
    rows = pairs(pts)
    assert sorted((r["factor"], r["jaccard"]) for r in rows) == [("accumulation", 0.5), ("seed", 0.5)]
    assert [s["compared"] for s in summary(rows)] == ["two seeds", "grad_sum vs score_sum"]
    table = by_context(rows)
    assert table[2:] == ["| seed | 1% | two seeds | warmup_steps=4, accumulation=grad_sum, score=abs_mean | 1 | 0.500 | 0.500 |",
                         "| accumulation | 1% | grad_sum vs score_sum | warmup_steps=4, score=abs_mean | 1 | 0.500 | 0.500 |"]


def test_smt_runs_from_before_the_accumulation_option_read_as_score_sum(tmp_path):
    res = tmp_path / "results"
    write_run(res, run_doc("smt", 0.01, 0, 50.0, block_map=smt_map()))  # written before the key existed
    write_run(res, run_doc("smt", 0.01, 0, 52.0, block_map=smt_map(4),
                           method_extra={"score_accumulation": "grad_sum", "accumulator_device": "cpu"}))
    analyze([str(res)], tmp_path / "out", Options())
    report = (tmp_path / "out" / "report.md").read_text()
    series = dict(r[:1] + r[3:] for r in _rows(report, "Series")[1:])  # label -> method config (long form)
    variant = next(k for k in series if k != "smt")  # one series is the main one, the other named by its difference
    legacy, new = "accumulator_device=same", "accumulator_device=cpu"
    assert "score_accumulation=score_sum" in series["smt"] + variant and "score_accumulation=grad_sum" in series["smt"] + variant
    assert variant in (f"smt ({new}, score_accumulation=grad_sum)", f"smt ({legacy}, score_accumulation=score_sum)")
    rows = _rows(report, "SMT selection stability")[1:]
    assert rows == [["accumulation", "1%", "grad_sum vs score_sum", "1", f"{14 / 16:.3f}", f"{14 / 16:.3f}"]]


# --- runs that did not finish -----------------------------------------------------------------
def _unfinished(method, budget, seed, status, **run_info):
    d = run_doc(method, budget, seed, status=status)
    d["run_info"].update(run_info)
    return d


def test_every_unfinished_status_listed_with_its_detail_and_kept_out_of_the_statistics(tmp_path):
    """diverged: its step; oom: the batch size; running (maybe killed) and preempted: the last checkpoint;
    failed: the error; and whether a finished run of the same config exists."""
    res = tmp_path / "results"
    for seed in range(2):
        write_run(res, run_doc("lora", 0.01, seed, 50.0 + seed))
    write_run(res, _unfinished("lora", 0.01, 0, "running", checkpoint_step=40,  # killed; the seed finished since
                               updated_at="2026-01-02T00:00:00+00:00", error=None))
    write_run(res, _unfinished("lora", 0.01, 2, "running", checkpoint_step=None, error=None))
    write_run(res, _unfinished("lora", 0.02, 0, "preempted", checkpoint_step=100, error="preempted by the scheduler"))
    write_run(res, _unfinished("lora", 0.05, 0, "diverged", diverged_at_step=57, error="non-finite loss nan"))
    write_run(res, _unfinished("lora", 0.05, 1, "oom", error="OutOfMemoryError: CUDA out of memory"))
    write_run(res, _unfinished("lora", 0.05, 2, "failed", error="ValueError: bad shape\nTraceback ..."))
    write_run(res, _unfinished("lora", 0.05, 3, "oom", error="OutOfMemoryError", batch_size=4))  # as run.py records
    analyze([str(res)], tmp_path / "out", Options(n_boot=10))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "9 run files: 2 finished, 7 not finished (1 diverged, 1 failed, 2 oom, 1 preempted, 2 running)" in report
    part = report.split("## Runs that did not finish\n", 1)[1].split("\n## ", 1)[0]
    rows = {(r[0].rsplit("-", 1)[0].split("/")[-1], r[5]): r[6:] for r in
            ([c.strip() for c in line.strip("|").split(" | ")] for line in part.splitlines()
             if line.startswith("| `"))}
    assert rows == {
        ("lora-b0.01-s0", "running"): ["last checkpoint at step 40", "yes"],
        ("lora-b0.01-s2", "running"): ["no checkpoint", "no"],
        ("lora-b0.02-s0", "preempted"): ["last checkpoint at step 100; preempted by the scheduler", "no"],
        ("lora-b0.05-s0", "diverged"): ["diverged at step 57; non-finite loss nan", "no"],
        ("lora-b0.05-s1", "oom"): ["batch size 8; OutOfMemoryError: CUDA out of memory", "no"],
        ("lora-b0.05-s2", "failed"): ["ValueError: bad shape", "no"],
        ("lora-b0.05-s3", "oom"): ["batch size 4; OutOfMemoryError", "no"],
    }
    cells = __import__("pandas").read_csv(tmp_path / "out" / "cells.csv")
    assert cells[["budget_fraction", "n"]].values.tolist() == [[0.01, 2]]  # none of them in the statistics


@pytest.mark.parametrize("status, drop, message", [
    ("diverged", "diverged_at_step", "missing key run_info.diverged_at_step"),
    ("running", "checkpoint_step", "missing key run_info.checkpoint_step"),
    ("preempted", "checkpoint_step", "missing key run_info.checkpoint_step"),
])
def test_unfinished_status_needs_its_detail(status, drop, message):
    d = _unfinished("lora", 0.01, 0, status, diverged_at_step=3, checkpoint_step=None)
    validate(d)
    del d["run_info"][drop]
    with pytest.raises(ValueError, match=message):
        validate(d)
    d["run_info"]["status"] = "paused"
    with pytest.raises(ValueError, match="run_info.status='paused' is not one of finished, failed, oom"):
        validate(d)


# --- the registry -----------------------------------------------------------------------------
CORE = REPO / "smt_bench" / "analysis"
METHOD_NAMES = re.compile(r"(?<![a-z0-9])(smt|lora|dora)(?![a-z0-9])|full_ft", re.IGNORECASE)


def test_analysis_core_names_no_method():
    """No method name in the core's identifiers, strings, docstrings or comments (the project's own name,
    smt-bench / smt_bench, aside): a method's knowledge stays in its own package."""
    found = []
    for path in sorted(CORE.glob("*.py")):
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
            if tok.type in (tokenize.NAME, tokenize.STRING, tokenize.COMMENT):
                text = re.sub(r"smt[_-]bench", "", tok.string, flags=re.IGNORECASE)
                found += [f"{path.name}:{tok.start[0]}: {m.group(0)}" for m in METHOD_NAMES.finditer(text)]
    assert found == []
    assert METHOD_NAMES.search("smt_counts") and METHOD_NAMES.search('"full_ft"') and METHOD_NAMES.search("LoRA")


@pytest.fixture
def toy_method(monkeypatch):
    """A method the core has never heard of, contributing a column, a section and a figure (and a key it
    gained after its first results, read through smt_bench.migrations)."""
    from smt_bench import migrations
    from smt_bench.analysis import registry

    monkeypatch.setitem(migrations.LEGACY_DEFAULTS, "toy", {"flavour": "plain"})

    def figure(s):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        ax.plot(s.runs["toy_knobs"].to_numpy())
        return fig

    c = registry.register(registry.Contribution(
        method="toy", run_columns=lambda mi: {"toy_knobs": mi.get("knobs", math.nan)},
        cell_columns={"toy_knobs": lambda v: float(v.max())},
        sections=(lambda s: ["### Toy knobs", "", f"Most knobs: {s.cells['toy_knobs'].max():g}.", ""],),
        figures=(registry.Figure("toy_knobs", "Toy knobs", "Knobs per run.", figure),), color="#123456"))
    yield c
    registry.unregister("toy")


def test_a_registered_method_contributes_columns_a_section_and_a_figure(tmp_path, toy_method):
    res = tmp_path / "results"
    for seed, knobs in ((0, 3), (1, 7)):
        d = run_doc("toy", 0.01, seed, 50.0)
        d["method_info"] = {"knobs": knobs}
        write_run(res, d)
    write_run(res, run_doc("lora", 0.01, 0, 40.0))
    analyze([str(res)], tmp_path / "out", Options(n_boot=10))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "### Toy knobs\n\nMost knobs: 7.\n" in report
    assert "**Figure 5. Toy knobs.** Knobs per run." in report  # after the four shared figures
    assert (tmp_path / "out" / "figures" / "tiny-llama-bundled" / "toy_knobs.png").stat().st_size > 1000
    import pandas as pd

    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert runs["toy_knobs"].fillna(-1).tolist() == [-1, 3, 7]  # by file: lora, toy s0, toy s1
    assert set(runs[runs["method"] == "toy"]["cfg.method.flavour"]) == {"plain"}  # the legacy default
    assert "smt_blocks" in runs.columns  # every contribution's columns, on every row
    assert "### SMT block share" not in report  # SMT's sections only where SMT ran


def test_the_analysis_imports_no_torch():
    code = ("import sys, smt_bench.analysis.report as r; from smt_bench.analysis import registry; "
            "assert [c.method for c in registry.contributions()] == ['smt'], registry.contributions(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_keys_that_change_no_computation_do_not_split_a_setting(tmp_path):
    """A run from before `train.checkpoint_every` existed, or with SMT's retired `model.smt_block_size`, is
    in the setting of today's runs; a key that does change the run (max_steps) still splits."""
    old = run_doc("lora", 0.01, 0, 40.0)
    old["config"]["model"]["smt_block_size"] = 64
    new = run_doc("pissa", 0.01, 0, 41.0)
    new["config"]["train"]["checkpoint_every"] = 50
    other = run_doc("lora", 0.01, 1, 42.0, max_steps=40)
    for doc in (old, new, other):
        write_run(tmp_path, doc)
    runs = load([tmp_path]).runs.set_index("method")
    assert runs.loc["pissa", "setting_key"] == runs[runs["seed"] == 0].loc["lora", "setting_key"]
    assert runs[runs["seed"] == 1].loc["lora", "setting_key"] != runs.loc["pissa", "setting_key"]
