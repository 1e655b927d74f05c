"""`python -m smt_bench.bench` end to end on tiny-llama (every method, both depths, in one process), one
isolated worker, bad input, and the extrapolation arithmetic. No test reads a time's value."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smt_bench.bench.report import summarize

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=tiny-llama", "device=cpu", "bench.steps=3", "bench.skip=1", "bench.seq_len=16", "bench.budgets=[0.05]"]


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "smt_bench.bench", *args, f"bench.out={tmp_path}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)


def test_every_method_at_two_depths_gives_a_full_depth_table(tmp_path):
    p = _bench(tmp_path, *TINY, "bench.isolate=false", "bench.name=t")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "t.json").read_text())
    assert set(res["summary"]) == {"floor", "smt@0.05", "smt_reference@0.05", "lora@0.05", "dora@0.05", "full_ft"}
    for key, s in res["summary"].items():
        assert s["measured"] and set(s["per_depth"]) == {"1", "2"}, key
        for field in ("step_s_full", "per_layer_step_s", "peak_growth_bytes_full", "total_bytes_full",
                      "breakdown_bytes_full", "analytic_state_bytes_full", "memory_to_full_ft", "step_to_floor"):
            assert field in s, (key, field)
    full = res["facts"]["total_params"]
    assert res["summary"]["full_ft"]["trainable_params_full"] == full
    assert res["summary"]["full_ft"]["analytic_state_bytes_full"] == {"weights": 4 * full, "gradients": 4 * full,
                                                                       "optimizer": 8 * full}
    smt, ref = res["summary"]["smt@0.05"], res["summary"]["smt_reference@0.05"]
    # each depth trains its share of the full-depth plan: the 1-layer model half the blocks of the 2-layer one
    assert smt["per_depth"]["1"]["trainable_params"] * 2 == smt["per_depth"]["2"]["trainable_params"] == \
        smt["trainable_params_full"] == ref["per_depth"]["2"]["trainable_params"]
    lora = res["summary"]["lora@0.05"]
    assert lora["per_depth"]["1"]["trainable_params"] * 2 == lora["per_depth"]["2"]["trainable_params"]
    for k in ("step_to_lora", "flop_floor_to_full_ft", "warmup_peak_to_train_peak", "step_to_full_ft"):
        assert k in smt, k
    assert "step_to_lora" in res["summary"]["dora@0.05"] and "memory_to_lora" in res["summary"]["dora@0.05"]
    assert {"smt_step_le_1.05x_floor@0.05", "smt_step_below_lora@0.05", "smt_memory_le_0.25x_full_ft@0.05",
            "smt_warmup_peak_le_1.2x_train_peak@0.05"} <= set(res["goals"])
    assert res["config_hash"] and res["meta_info"]["git"] and res["meta_info"]["versions"]["torch"]
    md = (tmp_path / "t.md").read_text()
    assert all(f"| {k} |" in md for k in res["summary"]) and "not per-method figures" in md


def test_isolated_workers_and_a_method_given_analytically(tmp_path):
    p = _bench(tmp_path, *TINY, "bench.methods=[floor,full_ft]", "bench.analytic_only=[full_ft]", "bench.name=i")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "i.json").read_text())
    assert res["memory_env"] == {"MALLOC_MMAP_THRESHOLD_": 65536}
    assert res["summary"]["floor"]["measured"] and not res["summary"]["full_ft"]["measured"]
    assert res["summary"]["full_ft"]["total_bytes_full"] == res["summary"]["full_ft"]["analytic_total_bytes_full"]
    assert "(analytic: not measured)" in (tmp_path / "i.md").read_text()


@pytest.mark.parametrize("arg,message", [
    ("bench.layers=[2,1]", "bench.layers=[2, 1]: give two depths"),
    ("bench.methods=[smt,nope]", "bench.methods: unknown ['nope']"),
    ("bench.layers=[1,3]", "model tiny-llama has 2 layers"),
    ("bench.steps=1", "bench.steps=1 must be above bench.skip=1"),
])
def test_bad_bench_input_is_one_line_and_exit_2(tmp_path, arg, message):
    p = _bench(tmp_path, *TINY, arg)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not list(tmp_path.glob("*.json"))


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
