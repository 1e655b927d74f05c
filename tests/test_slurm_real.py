"""hydra/launcher=slurm against a real SLURM: every test runs the real CLI (`python -m smt_bench -m
hydra/launcher=slurm ...`) in a subprocess, which submits through hydra-submitit-launcher and submitit to the
cluster and waits for its jobs, as a user's sweep does.

Needs a cluster that answers `sinfo` and `sacct` (submitit asks sacct for job states), on this machine or one
sharing its filesystem (results and the sweep folder live in pytest's tmp folder). scripts/slurm_local.sh up
brings up a single-node one on localhost (Debian packages, root); without one every test here skips.

    bash scripts/slurm_local.sh up && .venv/bin/python -m pytest -m slurm tests/test_slurm_real.py

Faults inside a job (a raise, a kill -9 at an exact step) are injected as tests/fault_run.py does, through a
sitecustomize.py on the job's PYTHONPATH (sbatch passes the submitter's environment to the job): it patches the
job's own process only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("SMT_SLURM_STATE", "/tmp/smt-bench-slurm"))  # scripts/slurm_local.sh's state folder

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# one run: tiny-llama on the CPU, one torch thread (the same floats in any process), checkpoints only on a signal
TRAIN = ["model=tiny-llama", "device=cpu", "eval.enabled=false", "method=lora", "budget.fraction=0.001",
         "train.batch_size=4", "train.max_len=96", "train.eval_every=0", "train.checkpoint_every=0", "threads=1"]


@dataclass
class Cluster:
    env: dict
    partition: str
    cpus: int


def _cmd(cluster: Cluster, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), env=cluster.env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    """The cluster `sinfo` answers for (SLURM_CONF, else /etc/slurm/slurm.conf, else scripts/slurm_local.sh's)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if "SLURM_CONF" not in env and not Path("/etc/slurm/slurm.conf").exists() and (STATE / "slurm.conf").is_file():
        env["SLURM_CONF"] = str(STATE / "slurm.conf")
    how = "bring one up on this machine with `bash scripts/slurm_local.sh up` (root, apt)"
    if not shutil.which("sinfo") or not shutil.which("sbatch") or not shutil.which("sacct"):
        pytest.skip(f"no SLURM client commands (sinfo, sbatch, sacct) on PATH: {how}")
    probe = Cluster(env, "", 0)
    try:
        info = _cmd(probe, "sinfo", "-h", "-o", "%P|%a|%c|%T", timeout=10)
        acct = _cmd(probe, "sacct", "-n", "-X", "-S", "now-1minutes", timeout=10)
    except subprocess.TimeoutExpired:
        pytest.skip(f"no SLURM cluster answers (sinfo or sacct timed out after 10 s): {how}")
    if info.returncode or not info.stdout.strip():
        pytest.skip(f"no SLURM cluster answers (sinfo: {(info.stderr.strip() or 'no partitions')[:300]}): {how}")
    if acct.returncode:
        pytest.skip(f"SLURM has no accounting (sacct: {acct.stderr.strip()[:300]}); submitit needs it: {how}")
    rows = [line.split("|") for line in info.stdout.split()]
    up = [r for r in rows if r[1] == "up" and r[3] in ("idle", "mixed", "allocated", "completing")]
    if not up:
        pytest.skip(f"no partition is up with a usable node (sinfo: {info.stdout.strip()[:300]})")
    default = [r for r in up if r[0].endswith("*")] or up
    return Cluster(env, default[0][0].rstrip("*"), int(default[0][2].rstrip("+")))


class Sweep:
    """`python -m smt_bench -m hydra/launcher=slurm <args>` started in the background, its output in files."""

    def __init__(self, cluster: Cluster, root: Path, args: list[str], faults: tuple[str, ...] = (), **launcher):
        self.cluster, self.root = cluster, root
        self.results, self.sweep = root / "results", root / "sweep"
        keys = dict(partition=cluster.partition, gpus_per_node="null", cpus_per_task=1, mem_gb=1, timeout_min=240,
                    array_parallelism=2)
        keys.update(launcher)
        cmd = [sys.executable, "-m", "smt_bench", "-m", "hydra/launcher=slurm",
               *[f"hydra.launcher.{k}={v}" for k, v in keys.items()], f"hydra.sweep.dir={self.sweep}",
               f"results.dir={self.results}", *args]
        env = dict(cluster.env)
        if faults:  # the job's python imports it at startup: tests/fault_run.py's faults, in the job only
            site = root / "site"
            site.mkdir(parents=True)
            (site / "sitecustomize.py").write_text(
                "import os, sys\n"
                "if os.environ.get('SLURM_STEP_ID') is not None:\n"
                f"    sys.path.insert(0, {str(REPO / 'tests')!r})\n"
                "    import fault_run\n"
                f"    fault_run.install({[_fault(f) for f in faults]!r})\n")
            env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
        cwd = root / "cwd"
        cwd.mkdir(parents=True)
        self.out_path, self.err_path = root / "submitter.out", root / "submitter.err"
        self.t0 = time.monotonic()
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)

    def wait(self, timeout: float) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout=timeout)
        self.wall = time.monotonic() - self.t0
        return rc, self.out_path.read_text(), self.err_path.read_text()

    def submitted(self) -> list[str]:
        """The jobs' ids so far: `<job>_<task>` for an array's tasks, `<job>` where submitit submitted one job
        (a one-job sweep is a plain job, not an array)."""
        ids = [p.name for p in self.sweep.glob(".submitit/*") if p.is_dir() and re.fullmatch(r"\d+(_\d+)?", p.name)]
        arrays = {i.split("_")[0] for i in ids if "_" in i}  # an array's own folder (`<job>`) is not a task
        return sorted((i for i in ids if "_" in i or i not in arrays), key=lambda i: [int(x) for x in i.split("_")])

    def job_ids(self, n: int = 1, timeout: float = 120) -> list[str]:
        """The first n ids, once sbatch has answered."""
        return _until(lambda: self.submitted()[:n] if len(self.submitted()) >= n else None, timeout,
                      "the sweep's job ids")

    def runs(self) -> dict[int, tuple[Path, dict]]:
        """seed -> (result file, its json)"""
        out = {}
        for f in self.results.glob("runs/*/*.json"):
            res = json.loads(f.read_text())
            out[res["config"]["seed"]] = (f, res)
        return out

    def running(self, seed: int = 0, timeout: float = 180) -> Path:
        """Waits until that run is training (its result file says running); returns the file."""
        def check():
            run = self.runs().get(seed)
            return run[0] if run and run[1]["run_info"]["status"] == "running" else None
        return _until(check, timeout, f"run seed={seed} training")

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        jobs = {i.split("_")[0] for i in self.submitted()}
        if jobs:
            subprocess.run(["scancel", *sorted(jobs)], env=self.cluster.env, capture_output=True, timeout=30)


def _fault(spec: str) -> tuple:
    kind, step, *seed = spec.split(":")
    return kind, int(step), int(seed[0]) if seed else None


def _until(check, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _sacct(cluster: Cluster, job: str) -> list[tuple[str, str]]:
    """Every attempt of the job (-D: the requeued ones too), as (state, exit code)."""
    p = _cmd(cluster, "sacct", "-n", "-P", "-X", "-D", "-j", job, "-o", "JobID,State,ExitCode")
    return [tuple(line.split("|")[1:3]) for line in p.stdout.splitlines() if line.strip()]


def _state(cluster: Cluster, job: str) -> list[tuple[str, str]]:
    """The job's attempts, once the last has ended (sacct may lag a moment behind the job's end)."""
    def ended():
        rows = _sacct(cluster, job)
        return rows if rows and rows[-1][0].split()[0] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING") \
            else None
    return _until(ended, 60, f"sacct to show job {job} ended")


@pytest.fixture
def sweeps(request):
    """sweeps(args, ...) -> a running Sweep; its jobs are cancelled at the end of the test, whatever happened."""
    started = []

    def start(cluster, root, args, **kw):
        s = Sweep(cluster, root, args, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.cleanup()


def _reference(root: Path, args: list[str]) -> subprocess.Popen:
    """The same run in this machine's own process (the basic launcher), uninterrupted."""
    (root / "cwd").mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-m", "smt_bench", *args, f"results.dir={root / 'results'}"],
                            cwd=root / "cwd", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _reference_result(proc: subprocess.Popen, root: Path) -> dict:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    (path,) = (root / "results").glob("runs/*/*.json")
    return json.loads(path.read_text())


def _report(s: Sweep, rc: int, out: str, err: str, job: str | None = None) -> str:
    """What a failed assertion shows: exit status, the submitter's last lines, the runs, sacct."""
    runs = {seed: (r["run_info"]["status"], r["run_info"].get("checkpoint_step"), r["run_info"].get("error"))
            for seed, (_, r) in s.runs().items()}
    lines = [f"submitter exit {rc} after {getattr(s, 'wall', 0):.0f} s", "stdout tail:", out[-1500:],
             "stderr tail:", err[-2500:], f"runs (status, checkpoint_step, error): {runs}"]
    if job:
        lines.append(f"sacct {job}: {_sacct(s.cluster, job)}")
    return "\n".join(lines)


# a ------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_a_two_job_array_finishes_and_the_submitter_exits_0(cluster, sweeps, tmp_path, smollm2_path):
    s = sweeps(cluster, tmp_path, [*TRAIN, "train.max_steps=4", "seed=0,1"])
    rc, out, err = s.wait(timeout=280)
    (job, _) = s.job_ids(2)
    assert rc == 0, _report(s, rc, out, err, job)
    assert "[smt-bench] sweep of 2 jobs: 2 finished" in out, _report(s, rc, out, err, job)
    assert {seed: r["run_info"]["status"] for seed, (_, r) in s.runs().items()} == {0: "finished", 1: "finished"}
    assert all(state == "COMPLETED" for j in s.job_ids(2) for state, _ in _state(cluster, j))


# b ------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(480)
@pytest.mark.parametrize("how", ["scancel-usr2", "scontrol-requeue"])
def test_b_preempted_mid_training_checkpoints_requeues_and_resumes_to_the_uninterrupted_curve(
        how, cluster, sweeps, tmp_path, smollm2_path):
    """scancel --signal=USR2 (what SLURM sends signal_delay_s before a time limit or preemption) and scontrol
    requeue (SIGTERM, then SIGKILL after KillWait): the run checkpoints at the next step boundary, the job is
    requeued, and the requeued job resumes from the checkpoint to the very curve of a run never interrupted."""
    args = [*TRAIN, "train.max_steps=60"]
    ref = _reference(tmp_path / "ref", args)
    s = sweeps(cluster, tmp_path / "slurm", args)
    (job,) = s.job_ids()
    s.running()
    time.sleep(2)  # a few steps in
    if how == "scancel-usr2":
        p = _cmd(cluster, "scancel", "--signal=USR2", job)
    else:
        p = _cmd(cluster, "scontrol", "requeue", job)
    assert p.returncode == 0, p.stderr
    rc, out, err = s.wait(timeout=420)
    assert rc == 0, _report(s, rc, out, err, job)
    ((_, res),) = s.runs().values()
    assert res["run_info"]["status"] == "finished", _report(s, rc, out, err, job)
    assert (res["train_info"].get("resumed_from_step") or 0) > 0, _report(s, rc, out, err, job)
    attempts = _state(cluster, job)
    assert [a[0] for a in attempts][-1] == "COMPLETED" and any(a[0] == "REQUEUED" for a in attempts), attempts
    want = _reference_result(ref, tmp_path / "ref")
    assert res["train_info"]["loss_curve"] == want["train_info"]["loss_curve"]  # bitwise: float equality
    assert res["train_info"]["val_loss_curve"] == want["train_info"]["val_loss_curve"]


# c ------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_c_a_time_limit_with_requeue_finishes_with_the_uninterrupted_curve(cluster, sweeps, tmp_path, smollm2_path):
    """timeout_min=1, signal_delay_s=30. slurmctld checks time limits once a minute and sends the signal up to
    60 s early, so each attempt gets SIGUSR2 at its first check (0-60 s in; the requeued attempts ~25 s in, as
    they start ~35 s after a check: cred_expire=30): the run takes 2-4 attempts, each resuming from the last
    checkpoint (max_num_timeout=5 leaves room for a signal during start-up, before training, too)."""
    args = [*TRAIN, "train.max_steps=120"]
    ref = _reference(tmp_path / "ref", args)
    s = sweeps(cluster, tmp_path / "slurm", args, timeout_min=1, signal_delay_s=30, max_num_timeout=5)
    (job,) = s.job_ids()
    rc, out, err = s.wait(timeout=560)
    if rc and not s.runs() and _state(cluster, job)[-1] == ("FAILED", "12:0"):
        # the minute's signal came in the task's first seconds, before submitit's handler was installed (python
        # starting, the job's pickle loading): SLURM's default action ends it. Only a time limit this close to
        # the signal delay makes that likely; the run had not started, and the same command runs it (docs/slurm.md)
        s = sweeps(cluster, tmp_path / "slurm-again", args, timeout_min=1, signal_delay_s=30, max_num_timeout=5)
        (job,) = s.job_ids()
        rc, out, err = s.wait(timeout=560)
    assert rc == 0, _report(s, rc, out, err, job)
    ((_, res),) = s.runs().values()
    assert res["run_info"]["status"] == "finished", _report(s, rc, out, err, job)
    assert (res["train_info"].get("resumed_from_step") or 0) > 0, _report(s, rc, out, err, job)
    attempts = _state(cluster, job)
    # the last attempt may end FAILED (signal 12) rather than COMPLETED where the minute's signal comes after the
    # run finished, while python exits (its handlers gone): the result is written by then
    assert any(a[0] == "REQUEUED" for a in attempts), attempts
    want = _reference_result(ref, tmp_path / "ref")
    assert res["train_info"]["loss_curve"] == want["train_info"]["loss_curve"]


# d ------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(400)
def test_d_timeouts_used_up_leave_a_timed_out_run_with_its_checkpoint_and_a_failing_submitter(
        cluster, sweeps, tmp_path, smollm2_path):
    """max_num_timeout=0 and far too little time: the signal before the limit checkpoints the run, submitit
    gives up on it; the run is `timed_out` (not failed) with its checkpoint kept, for a rerun to resume.
    timeout_min=2, signal_delay_s=30: the signal comes 30-90 s in (once-a-minute checks, up to 60 s early),
    when the run is surely training."""
    s = sweeps(cluster, tmp_path, [*TRAIN, "train.max_steps=100000"], timeout_min=2, signal_delay_s=30,
               max_num_timeout=0)
    (job,) = s.job_ids()
    rc, out, err = s.wait(timeout=360)
    ((path, res),) = s.runs().values()
    report = _report(s, rc, out, err, job)
    assert res["run_info"]["status"] == "timed_out", report
    ckpt = path.with_suffix(".ckpt")
    assert res["run_info"].get("checkpoint_step") and ckpt.is_dir() and any(ckpt.iterdir()), report
    assert rc != 0, report
    assert all(state != "COMPLETED" for state, _ in _state(cluster, job)), report


# e ------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(480)
def test_e_a_killed_array_task_does_not_stop_the_submitter_from_waiting_for_the_others(
        cluster, sweeps, tmp_path, smollm2_path):
    """seed 0's python is killed -9 at step 2 while seed 1 trains: the submitter waits for seed 1, prints the
    sweep's table (seed 1 finished, seed 0 not) and exits 1, without a traceback."""
    if cluster.cpus < 2:
        pytest.skip(f"the partition's node has {cluster.cpus} CPU: the two tasks would not run at once")
    s = sweeps(cluster, tmp_path, [*TRAIN, "train.max_steps=200", "seed=0,1"], faults=("kill:2:0",))
    jobs = s.job_ids(2)
    rc, out, err = s.wait(timeout=440)
    report = _report(s, rc, out, err, jobs[0]) + f"\nsacct {jobs[1]}: {_sacct(cluster, jobs[1])}"
    assert "UncompletedJobError" not in err and "Traceback" not in err, report
    assert rc == 1, report
    runs = s.runs()
    assert runs[1][1]["run_info"]["status"] == "finished", report  # it was waited for
    assert runs[0][1]["run_info"]["status"] != "finished", report
    assert "[smt-bench] sweep of 2 jobs: 1 finished" in out, report
    assert _state(cluster, jobs[0])[-1][0] != "COMPLETED"


# f ------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_f_a_one_job_multirun_whose_run_fails_exits_non_zero(cluster, sweeps, tmp_path, smollm2_path):
    s = sweeps(cluster, tmp_path, [*TRAIN, "train.max_steps=6"], faults=("raise:2",))
    (job,) = s.job_ids()
    rc, out, err = s.wait(timeout=280)
    ((_, res),) = s.runs().values()
    report = _report(s, rc, out, err, job)
    assert res["run_info"]["status"] == "failed" and "injected fault at step 2" in res["run_info"]["error"], report
    assert rc != 0, report


# g ------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(180)
@pytest.mark.parametrize("key,value,message", [
    ("gpus_per_node", 1, "Invalid generic resource"),  # on a cluster without GPUs
    ("partition", "no-such-partition", "invalid partition"),
])
def test_g_a_submission_sbatch_refuses_is_one_line_naming_the_key_and_exit_2(key, value, message, cluster, sweeps,
                                                                             tmp_path, smollm2_path):
    """sbatch refuses the job array: one line on stderr with sbatch's message and the hydra.launcher key, exit 2
    (bad input), no traceback, nothing submitted."""
    if key == "gpus_per_node" and "gpu" in _cmd(cluster, "sinfo", "-h", "-o", "%G").stdout:
        pytest.skip("this cluster has GPUs: sbatch would accept gpus_per_node=1")
    s = sweeps(cluster, tmp_path, [*TRAIN, "train.max_steps=2"], **{key: value})
    rc, out, err = s.wait(timeout=170)
    report = _report(s, rc, out, err)
    assert "Traceback" not in err, report
    assert rc == 2, report
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, report
    assert message.lower() in lines[0].lower() and f"hydra.launcher.{key}" in lines[0], report
    assert not s.submitted(), "no job was submitted"
