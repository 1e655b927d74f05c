"""One run, one process at a time: a lease file beside the result, renewed while the run is live.

`<result>.lease` (beside `<result>.json` and `<result>.ckpt/`) is JSON: `host`, `pid`, `since`, `renewed_at`
(UTC, ISO 8601), `token` (random, one per acquisition), `scheduler_job` (SLURM: `<array job>_<task>` or the
job id; null outside a scheduler), and `pidns` / `pid_start` (the holder's pid namespace and its process's
start time, so a pid is only judged where it means the same process). `flock` is not used: on a filesystem
shared by several nodes (NFS, Lustre, GPFS) it may be a no-op or node-local. What is used instead:

- **Create.** The lease is written whole to a temporary file, then hard-linked to its name: `link` fails if
  the name exists and is atomic on NFS (the classic NFS lock-file way; where hard links are refused, an
  O_CREAT|O_EXCL create, atomic on NFS v3+). No reader ever sees a half-written lease.
- **Held or stale.** An existing lease is *fresh* (held: the run is not started a second time) while it was
  renewed within `results.lease_s` seconds. It is *stale* (the holder is gone: taken over, with one line) when
  it was not renewed for `lease_s`, or at once when its holder ran on this host, in this pid namespace, and
  that process is not alive (no such pid, a zombie, or the pid now belongs to a process that started later).
  A lease that cannot be parsed counts as renewed at its file's mtime. Staleness by time compares the holder's
  clock with ours: the nodes' clocks must agree to well within `lease_s` (NTP does).
- **Changes under a mutex.** Taking over a stale lease, renewing and releasing hold `<result>.lease.lock`
  (created with O_EXCL, held for milliseconds), and each re-reads the lease under it first: a takeover replaces
  only the very lease it judged stale (same token), a renewal and a release touch only a lease whose token is
  still theirs. Two processes that both found the same stale lease cannot both take it: the second re-reads
  the first one's fresh lease under the mutex and is refused. A mutex whose content has not changed for
  MUTEX_STALE_S seconds of our own waiting (its holder died within those milliseconds) is removed. The lease
  is written by temp file + rename (atomic on NFS), and read back after a takeover to confirm our token.
- **Renewal.** A daemon thread renews `renewed_at` every `lease_s / 4` while the run is live: it does not
  depend on the training loop (a step or an evaluation may take minutes). If the lease is found taken by
  another process (ours stalled past `lease_s`), one warning line says so and renewal stops.
- **Release** on every ending (finished, failed, preempted, Ctrl-C: `run.execute`'s `finally`), only if the
  token is still ours. A process killed outright (kill -9, a lost node) leaves its lease: the next start on
  the same host finds the pid dead at once; elsewhere the lease goes stale after `lease_s`.
- **A requeued SLURM task** whose previous attempt has not exited yet (it is still checkpointing, or SLURM
  has not killed it yet) finds a fresh lease of the same scheduler job: it waits, polling, until that lease
  is released or stale, at most `lease_s` + REQUEUE_MARGIN_S seconds, then takes it over. A requeued job is
  never failed by its own previous attempt.

`Lease.acquire` raises `RunHeld` (the one line naming the holder) when the run is live elsewhere; the CLI
skips the job in a sweep and exits EXIT_HELD for a single run (smt_bench/__main__.py `job`).
`results.lease_s=0` disables the lease. Tests: tests/test_lease.py.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .results import write_json_atomic

EXIT_HELD = 75  # sysexits' EX_TEMPFAIL: not started because another process is training the run; try later
MUTEX_STALE_S = 30.0  # a mutex unchanged this long (by our own clock) was left by a process that died
REQUEUE_MARGIN_S = 30.0  # beyond lease_s, how long a requeued task waits for its previous attempt's lease
POLL_S = 2.0  # how often a waiting requeued task reads the lease again
_LIVE: set[str] = set()  # the tokens of the leases this process holds now


class RunHeld(Exception):
    """The run is live in another process (its lease is fresh): not started a second time. The message is the
    line the CLI prints (`smt-bench: skipped: <message>`)."""


def lease_file(result: Path) -> Path:
    """A run's lease goes beside its result file (`<result>.lease`), as its checkpoints do."""
    return Path(result).with_suffix(".lease")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.isoformat()


def _shown(stamp: Any) -> str:
    """A stamp as the lines show it: UTC to the second."""
    try:
        return datetime.fromisoformat(str(stamp)).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return str(stamp)


def scheduler_job() -> str | None:
    """This process's scheduler job: SLURM's `<array job id>_<task id>` for an array task (stable across
    requeues), else its job id; None outside SLURM."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def _pidns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None where there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], fields[19]


def _pid_start(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def pid_alive(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` of this host and pid namespace is alive (and, given `started`, still the process
    that started then: a pid is reused once its process is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    except OSError:
        return True
    stat = _proc_stat(pid)
    if stat is None:  # no /proc: kill(0) said it exists
        return True
    state, start = stat
    if state in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    return started is None or start == started


@dataclass(frozen=True)
class Holder:
    """What a lease file says of its holder."""
    host: str
    pid: int | None
    since: str
    renewed_at: str
    token: str
    scheduler_job: str | None = None
    pidns: str | None = None
    pid_start: str | None = None

    @classmethod
    def read(cls, path: Path) -> "Holder | None":
        """The lease at `path`; None if there is none. A lease that does not parse (written by hand, or a
        filesystem that showed a create before its content) reads as an unknown holder renewed at its mtime."""
        try:
            text = path.read_text()
            st = path.stat()
        except FileNotFoundError:
            return None
        try:
            d = json.loads(text)
            pid = d.get("pid")
            return cls(host=str(d["host"]), pid=pid if isinstance(pid, int) else None, since=str(d["since"]),
                       renewed_at=str(d["renewed_at"]), token=str(d["token"]),
                       scheduler_job=d.get("scheduler_job"), pidns=d.get("pidns"), pid_start=d.get("pid_start"))
        except (ValueError, KeyError, TypeError, AttributeError):
            mtime = _iso(datetime.fromtimestamp(st.st_mtime, timezone.utc))
            return cls(host="?", pid=None, since=mtime, renewed_at=mtime, token=f"unparsed:{st.st_mtime_ns}")

    def age_s(self, now: datetime | None = None) -> float:
        """Seconds since its last renewal, by our clock (infinite if its stamp does not parse)."""
        try:
            renewed = datetime.fromisoformat(self.renewed_at)
        except ValueError:
            return float("inf")
        if renewed.tzinfo is None:
            renewed = renewed.replace(tzinfo=timezone.utc)
        return ((now or _now()) - renewed).total_seconds()

    def local(self) -> bool:
        """Its pid names a process of this host and pid namespace."""
        return (self.pid is not None and self.host == socket.gethostname()
                and (self.pidns is None or _pidns() is None or self.pidns == _pidns()))

    def gone(self) -> bool:
        """Its process is known dead (this host only; elsewhere only time tells)."""
        if not self.local():
            return False
        assert self.pid is not None
        if self.pid == os.getpid():  # ours: held by a live Lease of this process, or left by an earlier one
            return self.token not in _LIVE
        return not pid_alive(self.pid, self.pid_start)

    def stale(self, lease_s: float) -> bool:
        return self.gone() or self.age_s() > lease_s

    def who(self) -> str:
        job = f" (SLURM job {self.scheduler_job})" if self.scheduler_job else ""
        return f"host {self.host} pid {self.pid if self.pid is not None else '?'}{job}"


class _Mutex:
    """`<lease>.lock`, created with O_EXCL and removed when done: serialises the changes to one lease."""

    def __init__(self, lease: Path):
        self.path = lease.with_name(lease.name + ".lock")

    def __call__(self, timeout_s: float = MUTEX_STALE_S + 10) -> "_Held":
        return _Held(self, timeout_s)

    def _try(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()} {secrets.token_hex(4)}\n")
        return True

    def _content(self) -> str | None:
        try:
            return self.path.read_text()
        except OSError:
            return None

    def take(self, timeout_s: float) -> bool:
        """True once we hold it; False after timeout_s (a mutex unchanged for MUTEX_STALE_S is removed)."""
        start = time.monotonic()
        seen, seen_at = None, start
        while True:
            if self._try():
                return True
            now = time.monotonic()
            content = self._content()
            if content != seen:
                seen, seen_at = content, now
            elif content is not None and now - seen_at > MUTEX_STALE_S:  # its holder died holding it
                self.path.unlink(missing_ok=True)
                continue
            if now - start > timeout_s:
                return False
            time.sleep(0.02)

    def give(self) -> None:
        self.path.unlink(missing_ok=True)


class _Held:
    def __init__(self, mutex: _Mutex, timeout_s: float):
        self.mutex, self.timeout_s, self.ok = mutex, timeout_s, False

    def __enter__(self) -> bool:
        self.ok = self.mutex.take(self.timeout_s)
        return self.ok

    def __exit__(self, *exc) -> None:
        if self.ok:
            self.mutex.give()


def _create(path: Path, content: dict) -> bool:
    """The lease at `path` if there is none (True); False if one exists. Never leaves a half-written lease."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f, indent=1)
            f.write("\n")
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            # NFS: a retransmitted link may report EEXIST although it was ours; the link count says
            return os.stat(tmp).st_nlink == 2
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
        try:  # a filesystem without hard links
            out = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(out, "w") as f:
            json.dump(content, f, indent=1)
            f.write("\n")
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


class Lease:
    """This process's lease on one run (see the module docstring). `Lease.acquire(result, lease_s)` takes it or
    raises RunHeld; `release()` gives it back (only if it is still ours); renewal runs on its own thread."""

    def __init__(self, result: Path, lease_s: float, say: Callable[[str], None] = _say):
        self.result, self.lease_s, self.say = Path(result), float(lease_s), say
        self.path = lease_file(self.result)
        self.mutex = _Mutex(self.path)
        self.token = secrets.token_hex(8)
        stamp = _iso(_now())
        self.content: dict[str, Any] = {
            "host": socket.gethostname(), "pid": os.getpid(), "since": stamp, "renewed_at": stamp,
            "token": self.token, "scheduler_job": scheduler_job(), "pidns": _pidns(),
            "pid_start": _pid_start(os.getpid())}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        self.made: list[Path] = []  # folders made for the lease, deepest first

    # --- taking it --------------------------------------------------------------------------------
    @classmethod
    def acquire(cls, result: Path, lease_s: float, *, renew: bool = True,
                say: Callable[[str], None] = _say) -> "Lease":
        """Our lease on the run whose result file is `result`, renewed on a thread from now on (`renew`); RunHeld
        if another live process holds it. A stale lease is taken over with one line; one of a previous attempt of
        our own scheduler job is waited for first (see the module docstring)."""
        lease = cls(result, lease_s, say)
        _LIVE.add(lease.token)  # before it is on disk: a thread of this process must not judge it left over
        try:
            lease._take()
        except BaseException:
            _LIVE.discard(lease.token)
            raise
        if renew:
            lease.start_renewing()
        return lease

    def _take(self) -> None:
        d = self.path.parent
        while not d.exists() and d != d.parent:  # folders made for the lease: removed with it if left empty
            self.made.append(d)
            d = d.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        waited_since: float | None = None
        while True:
            self._stamp()
            if _create(self.path, self.content):
                return
            holder = Holder.read(self.path)
            if holder is None:  # released between our create and our read
                continue
            if holder.stale(self.lease_s):
                if self._take_over(holder, "the holder is gone"):
                    return
                continue  # someone else changed it: judge again
            job = self.content["scheduler_job"]
            if job is not None and holder.scheduler_job == job:  # a previous attempt of this task (requeued)
                now = time.monotonic()
                if waited_since is None:
                    waited_since = now
                    self.say(f"smt-bench: waiting for {self.result}: its lease is held by {holder.who()}, a previous "
                             f"attempt of this job, renewed at {_shown(holder.renewed_at)}; taking it over once "
                             f"it is released or stale (at most {self.lease_s + REQUEUE_MARGIN_S:.0f} s)")
                if now - waited_since > self.lease_s + REQUEUE_MARGIN_S:
                    if self._take_over(holder, f"a previous attempt of SLURM job {job}, waited for "
                                               f"{now - waited_since:.0f} s"):
                        return
                    continue
                time.sleep(min(POLL_S, max(self.lease_s / 8, 0.05)))
                continue
            raise RunHeld(f"{self.result} is being trained by {holder.who()} since {_shown(holder.since)} "
                          f"(lease {self.path}, renewed {max(holder.age_s(), 0):.0f} s ago)")

    def _take_over(self, holder: Holder, why: str) -> bool:
        """Replace the lease `holder` (judged stale) with ours, under the mutex; False if it changed meanwhile."""
        with self.mutex() as ok:
            if not ok:
                return False
            now = Holder.read(self.path)
            if now is None:
                return _create(self.path, self._stamp())
            if now.token != holder.token:
                return False
            write_json_atomic(self.path, self._stamp())
            mine = Holder.read(self.path)
        if mine is None or mine.token != self.token:
            return False
        self.say(f"smt-bench: taking over {self.result}: its lease by {holder.who()} was last renewed at "
                 f"{_shown(holder.renewed_at)} ({why})")
        return True

    def _stamp(self) -> dict:
        stamp = _iso(_now())
        self.content.update(since=stamp, renewed_at=stamp)
        return self.content

    # --- keeping it -------------------------------------------------------------------------------
    def renew(self) -> bool:
        """renewed_at = now, if the lease is still ours (False, and one warning line, if it is not)."""
        with self.mutex(timeout_s=max(self.lease_s / 4, 1.0)) as ok:
            if not ok:
                return True  # busy: the next renewal tries again
            holder = Holder.read(self.path)
            if holder is None or holder.token != self.token:
                self.lost = True
                whom = f"to {holder.who()}" if holder is not None else "(its file is gone)"
                self.say(f"smt-bench: warning: the lease of {self.result} was lost {whom}: this process was not "
                         f"heard from for results.lease_s={self.lease_s:g} s; another may be training it too")
                return False
            self.content["renewed_at"] = _iso(_now())
            write_json_atomic(self.path, self.content)
            return True

    def start_renewing(self) -> None:
        if self._thread is not None or self.lease_s <= 0:
            return
        every = self.lease_s / 4

        def loop() -> None:
            while not self._stop.wait(every):
                try:
                    if not self.renew():
                        return
                except OSError as e:  # a filesystem hiccup: the next renewal tries again
                    self.say(f"smt-bench: warning: cannot renew the lease {self.path} ({e})")

        self._thread = threading.Thread(target=loop, name=f"lease-{self.path.name}", daemon=True)
        self._thread.start()

    # --- giving it back ---------------------------------------------------------------------------
    def release(self) -> bool:
        """Stop renewing; remove the lease if it is still ours (True)."""
        self._stop.set()
        _LIVE.discard(self.token)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(self.lease_s, 5.0))
        released = False
        try:
            with self.mutex(timeout_s=5.0):  # without it after 5 s: go on (the token check still holds)
                holder = Holder.read(self.path)
                if holder is not None and holder.token == self.token:
                    self.path.unlink(missing_ok=True)
                    released = True
        except OSError as e:
            self.say(f"smt-bench: warning: cannot release the lease {self.path} ({e})")
        for d in self.made if released else []:  # a run that wrote nothing (bad input found late) leaves no folder
            try:
                d.rmdir()
            except OSError:  # not empty: the run's files, or another run's
                break
        return released
