"""One run, one process at a time (smt_bench/lease.py), and each attempt of a run in its result.

Unit tests on the lease with files in tmp_path (fresh, stale by a dead pid, stale by time, a takeover that
re-checks the token, racing takers, renewal on its own thread, release of our own token only, a requeued task
waiting for its previous attempt); the CLI's mapping of RunHeld; and real processes (tests/fault_run.py): two
processes of the same command (the second is refused, writes nothing, and the first's killed lease is taken
over by a third that resumes), and a preempted then resumed run recording its two attempts.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from smt_bench import lease as lease_mod
from smt_bench.lease import EXIT_HELD, Holder, Lease, RunHeld, lease_file, pid_alive

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


def _stamp(ago_s: float = 0.0) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=ago_s)).isoformat()


def _plant(result: Path, *, host: str = "node-b", pid: int = 4242, ago_s: float = 0.0, token: str = "theirs",
           job: str | None = None, **extra) -> Path:
    """A lease file as another process would have left it."""
    path = lease_file(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "since": _stamp(ago_s + 60), "renewed_at": _stamp(ago_s),
                                "token": token, "scheduler_job": job, **extra}))
    return path


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def result(tmp_path) -> Path:
    return tmp_path / "runs" / "g" / "lora-b0.01-s0-abc.json"


@pytest.fixture
def said():
    lines: list[str] = []
    return lines


def _acquire(result: Path, said: list[str], lease_s: float = 60.0, renew: bool = False) -> Lease:
    return Lease.acquire(result, lease_s, renew=renew, say=said.append)


# --- the lease ---------------------------------------------------------------------------------------------
def test_a_free_run_is_leased_and_released(result, said):
    lease = _acquire(result, said)
    held = json.loads(lease_file(result).read_text())
    assert (held["host"], held["pid"], held["token"]) == (HOST, os.getpid(), lease.token)
    assert lease.release() and not lease_file(result).exists() and said == []


@pytest.mark.parametrize("where", ["another host", "a live process here"])
def test_a_fresh_lease_refuses_with_one_line_naming_its_holder(result, said, where):
    host, pid = ("node-b", 4242) if where == "another host" else (HOST, os.getppid())
    path = _plant(result, host=host, pid=pid, ago_s=5, job="77_3")
    before = path.read_bytes()
    with pytest.raises(RunHeld) as e:
        _acquire(result, said, lease_s=60)
    msg = str(e.value)
    assert msg.startswith(f"{result} is being trained by host {host} pid {pid} (SLURM job 77_3) since ")
    assert f"(lease {path}, renewed 5 s ago)" in msg and "\n" not in msg
    assert path.read_bytes() == before and said == []


def test_a_lease_whose_process_died_on_this_host_is_taken_over_at_once(result, said):
    pid = _dead_pid()
    _plant(result, host=HOST, pid=pid, ago_s=1)  # renewed a second ago: only the dead pid makes it stale
    lease = _acquire(result, said)
    assert json.loads(lease_file(result).read_text())["token"] == lease.token
    (line,) = said
    assert line.startswith(f"smt-bench: taking over {result}: its lease by host {HOST} pid {pid} was last renewed at ")
    assert line.endswith("(the holder is gone)")


def test_a_lease_not_renewed_for_lease_s_is_stale_wherever_its_holder_ran(result, said):
    _plant(result, host="node-b", pid=1, ago_s=3)
    with pytest.raises(RunHeld):
        _acquire(result, said, lease_s=10)
    lease = _acquire(result, said, lease_s=2)
    assert json.loads(lease_file(result).read_text())["token"] == lease.token
    assert said[0].startswith(f"smt-bench: taking over {result}: its lease by host node-b pid 1 ")


def test_a_zombie_or_a_reused_pid_is_not_its_holder():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = lease_mod._pid_start(child.pid)
        assert pid_alive(child.pid, start) and not pid_alive(child.pid, "1")  # another start time: reused
        child.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(child.pid) and time.monotonic() < deadline:  # killed, not reaped yet: a zombie
            time.sleep(0.05)
        assert not pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()


def test_a_lease_left_by_this_very_process_is_stale_but_a_live_one_is_held(result, said):
    _plant(result, host=HOST, pid=os.getpid(), pidns=lease_mod._pidns())
    lease = _acquire(result, said)  # left over (no live Lease holds that token): taken over
    assert len(said) == 1
    with pytest.raises(RunHeld):  # the live one, held by this process
        _acquire(result, said)
    lease.release()


def test_an_unreadable_lease_counts_from_its_mtime(result, said):
    path = lease_file(result)
    path.parent.mkdir(parents=True)
    path.write_text("{half a lea")
    with pytest.raises(RunHeld, match="by host \\? pid \\?"):
        _acquire(result, said, lease_s=60)
    old = time.time() - 120
    os.utime(path, (old, old))
    _acquire(result, said, lease_s=60)
    assert "taking over" in said[0]


def test_a_takeover_replaces_only_the_lease_it_judged_stale(result, said):
    _plant(result, ago_s=100, token="stale")
    stale = Holder.read(lease_file(result))
    assert stale is not None and stale.stale(10)
    _plant(result, ago_s=0, token="renewed-meanwhile")  # another taker (or the holder) got there first
    taker = Lease(result, 10, say=said.append)
    assert not taker._take_over(stale, "the holder is gone")
    assert json.loads(lease_file(result).read_text())["token"] == "renewed-meanwhile" and said == []


def _race(result: str, barrier, out, done) -> None:
    barrier.wait()
    try:
        lease = Lease.acquire(Path(result), 30, renew=False, say=lambda _: None)
        out.put(("took", lease.token))
    except RunHeld:
        out.put(("held", None))
    done.wait(30)  # the winner stays alive (a dead holder's lease is stale) until every taker has judged


def test_racing_takers_of_one_stale_lease_one_wins(result):
    _plant(result, ago_s=100)
    ctx = multiprocessing.get_context("fork")
    barrier, out, done = ctx.Barrier(4), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_race, args=(str(result), barrier, out, done)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = sorted((out.get(timeout=30) for _ in procs), key=lambda o: o[0])
    done.set()
    for p in procs:
        p.join()
    assert [o for o, _ in outcomes] == ["held", "held", "held", "took"]
    assert json.loads(lease_file(result).read_text())["token"] == outcomes[-1][1]


def test_a_mutex_left_by_a_dead_process_is_removed(result, said, monkeypatch):
    monkeypatch.setattr(lease_mod, "MUTEX_STALE_S", 0.3)
    _plant(result, ago_s=100)
    lock = lease_file(result).with_name(lease_file(result).name + ".lock")
    lock.write_text("node-b 4242 dead\n")
    lease = _acquire(result, said, lease_s=10)
    assert json.loads(lease_file(result).read_text())["token"] == lease.token and not lock.exists()


def test_renewal_runs_on_its_own_thread_and_stops_at_release(result, said):
    lease = _acquire(result, said, lease_s=0.4, renew=True)
    first = json.loads(lease_file(result).read_text())
    time.sleep(0.5)  # the main thread does nothing: renewal does not depend on it
    renewed = json.loads(lease_file(result).read_text())
    assert renewed["renewed_at"] > first["renewed_at"] and renewed["since"] == first["since"]
    assert lease.release() and not lease._thread.is_alive() and not lease_file(result).exists()


def test_release_and_renewal_touch_only_our_own_token(result, said):
    lease = _acquire(result, said)
    _plant(result, token="someone-else")  # taken over while we stalled
    assert not lease.renew() and lease.lost
    assert said[-1].startswith(f"smt-bench: warning: the lease of {result} was lost to host node-b pid 4242")
    assert not lease.release()
    assert json.loads(lease_file(result).read_text())["token"] == "someone-else"


def test_a_requeued_task_waits_for_its_previous_attempt_to_release(result, said, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "991")
    monkeypatch.setattr(lease_mod, "POLL_S", 0.05)
    path = _plant(result, host="node-a", job="991")
    threading.Timer(0.4, path.unlink).start()  # the previous attempt checkpoints, releases, exits
    t0 = time.monotonic()
    lease = _acquire(result, said, lease_s=30)
    assert 0.3 < time.monotonic() - t0 < 5
    assert json.loads(path.read_text())["token"] == lease.token
    (line,) = said
    assert line.startswith(f"smt-bench: waiting for {result}: its lease is held by host node-a pid 4242 (SLURM job "
                           f"991), a previous attempt of this job")


def test_a_requeued_task_takes_over_after_lease_s_and_a_margin_and_another_job_does_not_wait(result, said,
                                                                                            monkeypatch):
    monkeypatch.setattr(lease_mod, "POLL_S", 0.05)
    monkeypatch.setattr(lease_mod, "REQUEUE_MARGIN_S", 0.3)
    path = _plant(result, host="node-a", job="991", ago_s=-3600)  # renewed "in an hour": fresh all along
    monkeypatch.setenv("SLURM_JOB_ID", "992")
    with pytest.raises(RunHeld):  # another job's: held, no waiting
        _acquire(result, said, lease_s=0.5)
    monkeypatch.setenv("SLURM_JOB_ID", "991")
    t0 = time.monotonic()
    lease = _acquire(result, said, lease_s=0.5)
    assert time.monotonic() - t0 >= 0.8 and json.loads(path.read_text())["token"] == lease.token
    assert said[-1].endswith("(a previous attempt of SLURM job 991, waited for 1 s)")


# --- the run and the CLI -------------------------------------------------------------------------------------
SMALL = ["model=tiny-llama", "device=cpu", "method=lora", "budget.fraction=0.001", "eval.enabled=false",
         "train.max_steps=2", "train.batch_size=2", "train.max_len=64", "train.eval_every=0", "train.val_batches=1"]


@pytest.mark.slow  # Prepared for tiny-llama in this process: about 5 s
def test_execute_refuses_a_run_live_elsewhere_and_writes_nothing(compose, tmp_path, smollm2_path):
    from smt_bench.run import Prepared, execute

    cfg = compose(*SMALL, f"results.dir={tmp_path}")
    prep = Prepared(cfg)
    path = _plant(prep.path, ago_s=1)
    with pytest.raises(RunHeld, match="is being trained by host node-b pid 4242 since"):
        execute(cfg, prep)
    assert sorted(p.name for p in prep.path.parent.iterdir()) == [path.name]  # no result, no checkpoint


@pytest.mark.parametrize("sweep", [False, True])
def test_the_cli_says_one_line_and_exits_75_alone_or_goes_on_in_a_sweep(sweep, monkeypatch, capsys):
    import smt_bench.__main__ as app_main
    import smt_bench.run as run

    def held(cfg, prepared):
        raise RunHeld("X.json is being trained by host h pid 7 since T (lease X.lease)")

    monkeypatch.setattr(run, "execute", held)
    monkeypatch.setattr(app_main, "_multirun", lambda: sweep)
    if sweep:
        app_main.job(None)  # type: ignore[arg-type]
    else:
        with pytest.raises(SystemExit) as e:
            app_main.job(None)  # type: ignore[arg-type]
        assert e.value.code == EXIT_HELD == 75
    assert capsys.readouterr().err == "smt-bench: skipped: X.json is being trained by host h pid 7 since T (lease X.lease)\n"


def test_the_earlier_attempts_of_an_unfinished_file_are_carried(tmp_path):
    from smt_bench.run import _earlier_attempts

    path = tmp_path / "run.json"
    info = {"id": "abc", "created_at": "2026-01-01T00:00:00+00:00", "command": "c", "status": "running",
            "error": None, "checkpoint_step": 4, "wall_time_s": 12.5, "updated_at": "2026-01-01T00:01:00+00:00"}
    base = {"schema_version": 1, "config": {"method": {"name": "lora"}, "model": {"name": "m"}, "data": {"name": "d"},
                                            "budget": {"fraction": 0.01}, "seed": 0},
            "meta_info": {"git": {}, "versions": {}, "device": {}, "argv": [], "hostname": "node-a"}}
    path.write_text(json.dumps({**base, "run_info": info}))  # before attempts were recorded; killed outright
    (old,), first = _earlier_attempts(path, "abc")
    assert first == info["created_at"]
    assert (old.host, old.pid, old.from_step, old.to_step, old.ended, old.wall_time_s) == ("node-a", None, None, 4,
                                                                                           "killed", 12.5)
    assert _earlier_attempts(path, "other-id") == ([], None)
    path.write_text(json.dumps({**base, "run_info": {**info, "status": "finished"}}))
    assert _earlier_attempts(path, "abc") == ([], None)


# --- real processes ------------------------------------------------------------------------------------------
BASE = ["model=tiny-llama", "device=cpu", "eval.enabled=false", "method=lora", "budget.fraction=0.001",
        "train.max_steps=4", "train.batch_size=4", "train.max_len=96", "train.eval_every=0", "train.val_batches=1",
        "train.checkpoint_every=2"]


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                **extra)


def _cmd(args: list[str], faults=()) -> list[str]:
    if faults:
        return [sys.executable, str(REPO / "tests" / "fault_run.py"),
                *[x for f in faults for x in ("--fault", f)], "--", *args]
    return [sys.executable, "-m", "smt_bench", *args]


def _run(cwd: Path, args: list[str], faults=()) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(_cmd(args, faults), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _wait_for(check, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def _lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("smt-bench:")]


@pytest.mark.slow
def test_two_processes_of_one_run_train_it_once_and_a_killed_holder_is_taken_over(tmp_path):
    """A takes the lease and trains; B, the same command started meanwhile, is refused in one line naming A and
    writes nothing; A pauses at step 3 (its checkpoint at step 2 saved) and is killed -9; C takes its lease over
    in one line and resumes from step 2. The result records A's and C's attempts, not B's."""
    results, release = tmp_path / "results", tmp_path / "release"
    args = [*BASE, f"results.dir={results}"]
    (tmp_path / "a").mkdir()
    a = subprocess.Popen(_cmd(args, ["hold:3"]), cwd=tmp_path / "a", env=_env(FAULT_RELEASE=str(release)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lease = _wait_for(lambda: next(results.glob("runs/*/*.lease"), None) or a.poll() is not None)
        assert a.poll() is None, a.communicate()[1][-3000:]
        held = json.loads(lease.read_text())
        assert (held["host"], held["pid"]) == (HOST, a.pid)
        path = lease.with_suffix(".json")

        b = _run(tmp_path / "b", args)  # while A trains (or pauses): B's lease check comes after its preflight
        assert a.poll() is None, a.communicate()[1][-3000:]
        assert b.returncode == EXIT_HELD, b.stderr[-3000:]
        (line,) = _lines(b.stderr)
        assert line.startswith(f"smt-bench: skipped: {path} is being trained by host {HOST} pid {a.pid} since "
                               f"{lease_mod._shown(held['since'])} (lease {lease}, renewed "), line
        assert "Traceback" not in b.stderr and "[smt-bench]" not in b.stdout and "train lora" not in b.stderr

        _wait_for(lambda: Path(f"{release}.held").exists() or a.poll() is not None)
        assert a.poll() is None, a.communicate()[1][-3000:]
        assert json.loads(path.read_text())["run_info"]["checkpoint_step"] == 2
        assert sorted(p.name for p in path.with_suffix(".ckpt").iterdir()) == ["step-00000002"]
    finally:
        a.kill()
        a.communicate()
    assert json.loads(lease.read_text())["pid"] == a.pid  # left behind by kill -9

    c = _run(tmp_path / "c", args)
    assert c.returncode == 0, c.stderr[-3000:]
    (line,) = _lines(c.stderr)
    assert line.startswith(f"smt-bench: taking over {path}: its lease by host {HOST} pid {a.pid} was last renewed at ")
    assert line.endswith("(the holder is gone)")
    assert f"resuming {path.name} from its checkpoint at step 2" in c.stdout
    info = json.loads(path.read_text())["run_info"]
    assert info["status"] == "finished" and not lease.exists()
    attempts = info["attempts"]  # A's (killed at step 3, its checkpoint at 2) and C's; B never started one
    assert [(t["from_step"], t["to_step"], t["ended"]) for t in attempts] == [(0, 2, "killed"), (2, 4, "finished")]
    assert attempts[0]["pid"] == a.pid != attempts[1]["pid"] and info["created_at"] == attempts[0]["started_at"]
    assert info["wall_time_s"] == sum(t["wall_time_s"] for t in attempts)


@pytest.mark.slow
def test_a_preempted_then_resumed_run_records_both_attempts_and_their_total(tmp_path):
    args = [*BASE, "train.checkpoint_every=0", f"results.dir={tmp_path / 'results'}"]
    p = _run(tmp_path / "cwd", args, faults=["term:2"])
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-3000:]
    (path,) = (tmp_path / "results").glob("runs/*/*.json")
    assert not lease_file(path).exists()  # released on the way out
    first = json.loads(path.read_text())["run_info"]
    (one,) = first["attempts"]
    assert (one["from_step"], one["to_step"], one["ended"], one["host"], one["pid"]) == (0, 2, "preempted", HOST,
                                                                                          one["pid"])
    assert first["wall_time_s"] == one["wall_time_s"] > 0 and first["created_at"] == one["started_at"]

    p = _run(tmp_path / "cwd", args)
    assert p.returncode == 0 and "from its checkpoint at step 2" in p.stdout, p.stderr[-3000:]
    info = json.loads(path.read_text())["run_info"]
    attempts = info["attempts"]
    assert [(t["from_step"], t["to_step"], t["ended"]) for t in attempts] == [(0, 2, "preempted"), (2, 4, "finished")]
    assert attempts[0] == one and attempts[0]["pid"] != attempts[1]["pid"]
    assert info["created_at"] == one["started_at"] < attempts[1]["started_at"] <= attempts[1]["ended_at"]
    assert info["wall_time_s"] == sum(t["wall_time_s"] for t in attempts)
    assert not lease_file(path).exists()
