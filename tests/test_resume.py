"""Runs that survive: kill -9 or SIGTERM mid-training, then the same command, gives bitwise the run that was
never interrupted (CPU, fp32); a sweep with broken cells finishes the rest and reruns only the broken ones.

Faults are injected at exact steps by tests/fault_run.py (the real CLI in a patched test process).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
BASE = ["model=tiny-llama", "device=cpu", "eval.enabled=false", "train.max_steps=10", "train.batch_size=4",
        "train.max_len=96", "train.eval_every=4", "budget.fraction=0.001", "results.export=true"]
METHOD = {"lora": ["method=lora"], "smt": ["method=smt", "method.warmup_steps=2"]}


def _run(cwd: Path, args: list[str], faults=()) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if faults:
        cmd = [sys.executable, str(REPO / "tests" / "fault_run.py"), *[x for f in faults for x in ("--fault", f)],
               "--", *args]
    else:
        cmd = [sys.executable, "-m", "smt_bench", *args]
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _result(results: Path) -> tuple[Path, dict]:
    (path,) = sorted(results.glob("runs/*/*.json"))
    return path, json.loads(path.read_text())


def _weights(path: Path) -> dict:
    (export,) = [p for p in path.with_suffix("").glob("*.safetensors")]
    return load_file(str(export))


def _same_run(a: dict, b: dict, wa: dict, wb: dict) -> None:
    assert b["run_info"]["status"] == a["run_info"]["status"] == "finished"
    assert b["train_info"]["loss_curve"] == a["train_info"]["loss_curve"]  # bitwise: float equality
    assert b["train_info"]["val_loss_curve"] == a["train_info"]["val_loss_curve"]
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
    assert b["method_info"].get("block_map") == a["method_info"].get("block_map")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run of each method, with no checkpoint at all."""
    out = {}
    for name, args in METHOD.items():
        root = tmp_path_factory.mktemp(f"ref-{name}")
        p = _run(root / "cwd", [*BASE, *args, "train.checkpoint_every=0", f"results.dir={root / 'results'}"])
        assert p.returncode == 0, p.stderr[-3000:]
        path, res = _result(root / "results")
        out[name] = (res, _weights(path))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smt"])  # LoRA: SIGTERM below, kill -9 in the sweep and under torchrun
def test_kill_9_then_the_same_command_resumes_to_the_uninterrupted_run(name, uninterrupted, tmp_path):
    args = [*BASE, *METHOD[name], "train.checkpoint_every=3", f"results.dir={tmp_path / 'results'}"]
    p = _run(tmp_path / "cwd", args, faults=["kill:7"])
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    path, res = _result(tmp_path / "results")
    assert res["run_info"]["status"] == "running" and res["run_info"]["checkpoint_step"] == 6
    ckpt = path.with_suffix(".ckpt")
    # the newest checkpoint and the one before it, the fallback if the newest is damaged (smt_bench/checkpoint.py)
    assert sorted(d.name for d in ckpt.iterdir()) == ["step-00000003", "step-00000006"]
    saved = json.loads((ckpt / "step-00000006" / "state.json").read_text())

    p = _run(tmp_path / "cwd", args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming {path.name} from its checkpoint at step 6" in p.stdout
    _, resumed = _result(tmp_path / "results")
    assert resumed["train_info"]["resumed_from_step"] == 6
    if name == "smt":  # the selection came from the checkpoint: the warm-up was not redone (its timing is the
        assert resumed["method_info"]["warmup"] == saved["tuned_meta"]["warmup"]  # killed process's, to the bit)
    ref, ref_w = uninterrupted[name]
    _same_run(ref, resumed, ref_w, _weights(path))
    assert not ckpt.exists()  # a finished run keeps its result and export, not its checkpoints


@pytest.mark.slow
def test_a_time_limit_with_its_requeues_used_up_ends_timed_out_resumable(uninterrupted, tmp_path):
    """submitit's handler refuses to requeue (max_num_timeout used up): the run checkpoints, says timed_out
    (not failed), exits 124 (the scheduler records a failure, not COMPLETED), and the same command resumes it."""
    args = [*BASE, *METHOD["lora"], "train.checkpoint_every=0", f"results.dir={tmp_path / 'results'}"]
    p = _run(tmp_path / "cwd", args, faults=["timeout:4"])
    assert p.returncode == 124, p.stderr[-3000:]
    assert ("smt-bench: timed out: SIGUSR2 at step 4: Job not requeued because: timed-out too many times.; "
            "checkpoint saved") in p.stderr and "Traceback" not in p.stderr
    path, res = _result(tmp_path / "results")
    info = res["run_info"]
    assert (info["status"], info["checkpoint_step"], info.get("traceback")) == ("timed_out", 4, None)
    assert "next: the same command resumes it from its checkpoint at step 4" in p.stdout
    p = _run(tmp_path / "cwd", args)
    assert p.returncode == 0 and "from its checkpoint at step 4" in p.stdout, p.stderr[-3000:]
    _, res = _result(tmp_path / "results")
    assert res["train_info"]["loss_curve"] == uninterrupted["lora"][0]["train_info"]["loss_curve"]


@pytest.mark.slow
def test_a_multirun_of_one_job_that_fails_exits_1(tmp_path):
    """Every SLURM submission is a multirun (-m); one of a single job whose run fails must not exit 0."""
    args = ["-m", *BASE, *METHOD["lora"], f"results.dir={tmp_path / 'results'}"]
    p = _run(tmp_path / "cwd", args, faults=["raise:2"])
    assert p.returncode == 1, p.stderr[-3000:]
    assert "[smt-bench] sweep of 1 jobs: 1 failed" in p.stdout


@pytest.mark.slow
def test_sigterm_checkpoints_stops_and_the_same_command_resumes(uninterrupted, tmp_path):
    args = [*BASE, *METHOD["lora"], "train.checkpoint_every=0", f"results.dir={tmp_path / 'results'}"]
    p = _run(tmp_path / "cwd", args, faults=["term:5"])
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-3000:]
    assert "preempted by SIGTERM at step 5; checkpoint saved" in p.stderr
    path, res = _result(tmp_path / "results")
    assert (res["run_info"]["status"], res["run_info"]["checkpoint_step"]) == ("preempted", 5)
    p = _run(tmp_path / "cwd", args)
    assert p.returncode == 0 and "from its checkpoint at step 5" in p.stdout, p.stderr[-3000:]
    _, resumed = _result(tmp_path / "results")
    ref, ref_w = uninterrupted["lora"]
    _same_run(ref, resumed, ref_w, _weights(path))


@pytest.mark.slow
def test_a_sweep_with_broken_cells_finishes_the_rest_and_a_rerun_runs_only_those(tmp_path):
    """Seeds 0..4: seed 1 diverges (NaN loss from step 3), seed 2 raises at step 2, seed 4 is killed -9 at
    step 3 (the sweep's process with it); seeds 0 and 3 finish. The same sweep again runs 1, 2 and 4 only."""
    args = ["-m", *BASE, *METHOD["lora"], "results.export=false", "seed=0,1,2,3,4", "train.checkpoint_every=2",
            f"results.dir={tmp_path / 'results'}"]
    p = _run(tmp_path / "cwd", args, faults=["nan:2:1", "raise:2:2", "kill:3:4"])
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    files = {json.loads(f.read_text())["config"]["seed"]: f for f in (tmp_path / "results").glob("runs/*/*.json")}
    runs = {s: json.loads(f.read_text())["run_info"] for s, f in files.items()}
    assert {s: r["status"] for s, r in runs.items()} == {0: "finished", 1: "diverged", 2: "failed", 3: "finished",
                                                         4: "running"}
    assert runs[1]["diverged_at_step"] == 3 and "non-finite loss nan at step 3" in runs[1]["error"]
    assert runs[2]["error"] == "RuntimeError: injected fault at step 2"
    assert runs[4]["checkpoint_step"] == 2
    kept = {s: files[s].read_bytes() for s in (0, 3)}

    p = _run(tmp_path / "cwd", args)
    assert p.returncode == 0, p.stderr[-3000:]
    for s in (0, 3):
        assert f"{files[s]} already finished; skipping" in p.stdout
        assert files[s].read_bytes() == kept[s]  # not rerun
    assert p.stdout.count("[smt-bench] finished: lora") == 3
    assert "from its checkpoint at step 2" in p.stdout  # seed 4 resumed
    assert all(json.loads(f.read_text())["run_info"]["status"] == "finished" for f in files.values())
    assert "[smt-bench] sweep of 5 jobs: 3 finished, 2 skipped" in p.stdout


@pytest.mark.slow
def test_an_oom_cell_is_recorded_with_its_batch_size_and_the_sweep_exits_1_after_the_others_ran(tmp_path):
    args = ["-m", *BASE, *METHOD["lora"], "results.export=false", "seed=0,1", "train.max_steps=3",
            f"results.dir={tmp_path / 'results'}"]
    p = _run(tmp_path / "cwd", args, faults=["oom:1:0"])
    assert p.returncode == 1, p.stderr[-3000:]
    assert "smt-bench: run failed: OutOfMemoryError: injected out of memory at step 1" in p.stderr
    assert "[smt-bench] sweep of 2 jobs: 1 finished, 1 oom" in p.stdout
    runs = [json.loads(f.read_text())["run_info"] for f in (tmp_path / "results").glob("runs/*/*.json")]
    oom = [r for r in runs if r["status"] == "oom"]
    assert len(oom) == 1 and oom[0]["batch_size"] == 4
