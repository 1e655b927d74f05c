"""`python -m smt_bench.bench` end to end on tiny-llama (every method, both depths, in one process), one
isolated worker, bad input, and the extrapolation arithmetic. No test reads a time's value."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smt_bench.bench.report import summarize

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=tiny-llama", "device=cpu", "bench.steps=3", "bench.skip=1", "bench.seq_len=16", "bench.budgets=[0.002]"]


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "smt_bench.bench", *args, f"bench.out={tmp_path}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_every_method_at_two_depths_gives_a_full_depth_table(tmp_path):
    p = _bench(tmp_path, *TINY, "bench.isolate=false", "bench.name=t")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "t.json").read_text())
    # every method of conf/method/ (read from the folder), the floor and reference-style SMT; a fixed-fraction
    # method once, the others at the budget
    from smt_bench.bench.__main__ import methods

    shipped = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
    assert methods() == ("floor", *shipped, "smt_reference") and res["facts"]["methods"] == list(methods())
    fixed = set(res["facts"]["fixed"])
    assert {"full_ft"} <= fixed
    assert set(res["summary"]) == {"floor", *fixed, *(f"{m}@0.002" for m in [*shipped, "smt_reference"]
                                                      if m not in fixed)}
    unreachable = {k for k, s in res["summary"].items() if "unreachable" in s}
    assert unreachable == {"lisa@0.002"}  # one whole layer is 1.15% of tiny-llama
    for key, s in res["summary"].items():
        if key in unreachable:
            continue
        assert s["measured"] and set(s["per_depth"]) == {"1", "2"}, key
        for field in ("step_s_full", "per_layer_step_s", "peak_growth_bytes_full", "total_bytes_full",
                      "breakdown_bytes_full", "analytic_state_bytes_full", "memory_to_full_ft", "step_to_floor"):
            assert field in s, (key, field)
    full = res["facts"]["total_params"]
    assert res["summary"]["full_ft"]["trainable_params_full"] == full
    assert res["summary"]["full_ft"]["analytic_state_bytes_full"] == {"weights": 4 * full, "gradients": 4 * full,
                                                                       "optimizer": 8 * full}
    smt, ref = res["summary"]["smt@0.002"], res["summary"]["smt_reference@0.002"]
    # each depth trains its share of the full-depth plan: the 1-layer model half the blocks of the 2-layer one
    assert smt["per_depth"]["1"]["trainable_params"] * 2 == smt["per_depth"]["2"]["trainable_params"] == \
        smt["trainable_params_full"] == ref["per_depth"]["2"]["trainable_params"]
    lora = res["summary"]["lora@0.002"]
    assert lora["per_depth"]["1"]["trainable_params"] * 2 == lora["per_depth"]["2"]["trainable_params"]
    for k in ("step_to_lora", "flop_floor_to_full_ft", "warmup_peak_to_train_peak", "step_to_full_ft"):
        assert k in smt, k
    assert "step_to_lora" in res["summary"]["dora@0.002"] and "memory_to_lora" in res["summary"]["dora@0.002"]
    assert {"smt_step_le_1.05x_floor@0.002", "smt_step_below_lora@0.002", "smt_memory_le_0.25x_full_ft@0.002",
            "smt_warmup_peak_le_1.2x_train_peak@0.002"} <= set(res["goals"])
    assert res["config_hash"] and res["meta_info"]["git"] and res["meta_info"]["versions"]["torch"]
    md = (tmp_path / "t.md").read_text()
    assert all(f"| {k} |" in md for k in res["summary"]) and "not per-method figures" in md
    assert "| lisa@0.002 | unreachable: budget of 6,440 params is unreachable for lisa" in md
    table = [l for l in md.splitlines() if l.startswith("|")]
    assert len({l.count("|") for l in table}) == 1 and table[0].count("|") == 10, table[:2]  # 2L is the full depth


def _bench_config(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from smt_bench.schema.store import CONF, register

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("benchmark", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.slow
def test_the_bench_follows_model_hub_kernels_and_records_it(tmp_path):
    """The bench builds its models from a config: with the key on they are kernelized as a run's are, each
    method's tuned model passes the hub-kernel check, and the result says so."""
    pytest.importorskip("kernels")
    p = _bench(tmp_path, *TINY, "bench.isolate=false", "bench.name=h", "bench.methods=[smt,lora]",
               "model.hub_kernels=true")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "h.json").read_text())
    assert res["meta_info"]["hub_kernels"]["enabled"] is True and res["config"]["model"]["hub_kernels"] is True
    assert res["runs"] and not [r for r in res["runs"] if r.get("failed")]


@pytest.mark.slow
def test_an_isolated_worker_is_a_process_of_its_own_with_the_fixed_mmap_threshold():
    from smt_bench.bench.__main__ import _run_worker, plan_jobs

    jobs, _ = plan_jobs(_bench_config(*TINY, "bench.methods=[floor]"))
    spec = {**jobs[0], "steps": 2, "skip": 1}
    res = _run_worker(spec, isolate=True)
    assert not res.get("failed"), res
    assert res["method"] == "floor" and res["layers"] == 1 and res["trainable_params"] == 0
    assert res["peak_kind"] == "cpu_peak_rss_growth" and len(res["step_times_s"]) == 2


@pytest.mark.parametrize("overrides,message", [
    (["bench.methods=[smt,nope]"], "bench.methods: unknown ['nope']"),
    (["bench.methods=[lisa]"], "bench.budgets=[0.002]: no method of ['lisa'] can meet them on tiny-llama"),
    (["bench.layers=[1,3]"], "model tiny-llama has 2 layers"),
    (["bench.layers=[1]"], "or [2] to measure it whole"),
    (["bench.steps=1"], "bench.steps=1 must be above bench.skip=1"),
    (["bench.budgets=[0]"], "bench.budgets=[0]: fractions in (0, 1]"),
    (["bench.methods=[floor,smt]", "bench.analytic_only=[lora]"], "bench.analytic_only=['lora']: methods from"),
    (["bench.smt_overrides=['no_such_key=1']"], "bench.smt_overrides=['no_such_key=1']"),
])
def test_bad_bench_config_is_named(overrides, message):
    from smt_bench.bench.__main__ import check, plan_jobs
    from smt_bench.errors import UserError

    cfg = _bench_config(*TINY, *overrides)
    with pytest.raises(UserError, match=re.escape(message)):
        check(cfg)
        plan_jobs(cfg)


@pytest.mark.slow
def test_bad_bench_input_is_one_line_exit_2_and_writes_nothing(tmp_path):
    p = _bench(tmp_path, *TINY, "bench.layers=[2,1]")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "bench.layers=[2, 1]: give two depths" in p.stderr and not list(tmp_path.glob("*.*"))


def test_a_method_given_analytically_is_said_so():
    runs = [{"method": "floor", "budget": None, "layers": L, "median_step_s": 1.0, "peak_bytes": 10.0,
             "trainable_params": 0, "step_times_s": [1.0], "breakdown_bytes": dict.fromkeys(
                 ("weights", "gradients", "optimizer", "activations"), 1.0)} for L in (1, 2)]
    summary, _ = summarize(runs, {"depth": 4, "total_params": 100, "plans": {}}, ["floor", "full_ft"], [], [1, 2])
    ft = summary["full_ft"]
    assert not ft["measured"] and ft["total_bytes_full"] == ft["analytic_total_bytes_full"] == 1600
    assert summary["floor"]["memory_to_full_ft"] == (400 + 10) / 1600


def test_extrapolation_is_linear_in_depth():
    def run(m, L, step, peak):
        return {"method": m, "budget": None, "layers": L, "median_step_s": step, "peak_bytes": peak,
                "trainable_params": 0, "step_times_s": [step], "breakdown_bytes": dict.fromkeys(
                    ("weights", "gradients", "optimizer", "activations"), peak)}

    facts = {"depth": 32, "total_params": 1000, "plans": {}}
    runs = [run("floor", 1, 1.0, 100), run("floor", 2, 1.5, 130), run("full_ft", 1, 2.0, 400), run("full_ft", 2, 3.0, 700)]
    summary, _ = summarize(runs, facts, ["floor", "full_ft"], [], [1, 2])
    fl, ft = summary["floor"], summary["full_ft"]
    assert fl["step_s_full"] == 1.0 + 0.5 * 31 and fl["peak_growth_bytes_full"] == 100 + 30 * 31
    assert ft["total_bytes_full"] == 4 * 1000 + 400 + 300 * 31
    assert fl["memory_to_full_ft"] == (4000 + 1030) / (4000 + 9700) and fl["step_to_floor"] == 1.0
    assert ft["step_to_floor_by_depth"] == {"1": 2.0, "2": 2.0}


def test_one_depth_is_the_whole_model_measured_not_extrapolated():
    from smt_bench.bench.report import markdown

    def run(m, step, peak):
        return {"method": m, "budget": None, "layers": 4, "median_step_s": step, "peak_bytes": peak,
                "trainable_params": 0, "step_times_s": [step], "breakdown_bytes": dict.fromkeys(
                    ("weights", "gradients", "optimizer", "activations"), peak)}

    facts = {"model": "m", "depth": 4, "total_params": 1000, "plans": {}, "device": "cpu"}
    summary, _ = summarize([run("floor", 2.0, 100), run("full_ft", 3.0, 700)], facts, ["floor", "full_ft"], [], [4])
    fl, ft = summary["floor"], summary["full_ft"]
    assert fl["step_s_full"] == 2.0 and ft["peak_growth_bytes_full"] == 700 and "per_layer_step_s" not in fl
    assert ft["step_to_floor"] == 1.5 and fl["memory_to_full_ft"] == (4000 + 100) / (4000 + 700)
    result = {"facts": facts, "summary": summary, "goals": {}, "runs": [], "command": "c", "config_hash": "h",
              "memory_env": {"MALLOC_MMAP_THRESHOLD_": 65536},
              "config": {"bench": {"layers": [4], "batch_size": 1, "seq_len": 8, "steps": 3, "skip": 1, "rounds": 1}},
              "meta_info": {"device": {"name": "cpu", "torch_threads": 2}, "git": {"sha": "s", "dirty": False},
                            "versions": {"torch": "t", "transformers": "t", "peft": "p"}}}
    md = markdown(result)
    assert "the whole model" in md and "extrapolated" not in md
    row = next(l for l in md.splitlines() if l.startswith("| full_ft |"))
    header = next(l for l in md.splitlines() if l.startswith("| method |"))
    sep = next(l for l in md.splitlines() if l.startswith("| --- "))
    assert row.count("|") == header.count("|") == sep.count("|") == 9 and "| 3.00 | 1.500 |" in row
