"""SIGTERM / SIGUSR1 / SIGUSR2 during training: finish the step, checkpoint, then do what the signal meant.

SLURM sends SIGTERM on preemption; submitit asks for SIGUSR2 `signal_delay_s` before a time limit
(and installs its own handlers: requeue on SIGUSR2, ignore SIGTERM); Lightning-style setups use
SIGUSR1. A handler here only records the signal, so a step is never cut in half. After the
checkpoint, a handler that was installed before ours (submitit's) is called: if it returns, training
goes on; if it exits (submitit requeued the job), so do we; if it refuses to requeue (submitit, once the
job's timeouts are used up: `max_num_timeout`), the run stops as `timed_out` (exit status 124). Without one,
the run stops as `preempted` with the exit status the signal would have given (128 + its number).

With several ranks a signal may reach some ranks a step before others (torchrun forwards it to each
worker; SLURM signals each task): at every step boundary the ranks agree on a signal any of them
got (the highest-numbered if they differ), so all checkpoint together (a collective under FSDP2) and
stop at the same step.
"""
from __future__ import annotations

import signal
import threading

SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, n))


class Preempted(Exception):
    def __init__(self, signum: int, step: int, exit_code):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.exit_code = signum, step, exit_code


class TimedOut(Preempted):
    """The scheduler's time limit came and the run may not be requeued again (submitit: "timed-out too many
    times", `max_num_timeout`): checkpointed, resumable by the same command, but not finished."""

    def __init__(self, signum: int, step: int, reason: str):
        super().__init__(signum, step, 124)
        self.reason = reason

    def __str__(self) -> str:
        return f"{super().__str__()}: {self.reason}"


def _not_requeued(e: Exception) -> bool:
    """submitit's handler refusing to requeue (its UncompletedJobError), without importing submitit here."""
    return type(e).__name__ == "UncompletedJobError" and type(e).__module__.startswith("submitit")


class PreemptionWatch:
    def __init__(self, signals=SIGNALS, world=None):
        self.signals, self.pending, self._previous, self.world = signals, [], {}, world

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc):
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous = {}
        return False

    def _record(self, signum, frame):
        self.pending.append(signum)

    def handle(self, step: int, checkpoint) -> None:
        """At a step boundary: if a signal came, checkpoint, then pass it on (see the module docstring)."""
        signum = self.pending[0] if self.pending else 0
        if self.world is not None and self.world.distributed:
            signum = int(self.world.reduce_floats([signum], "max")[0])
        if not signum:
            return
        self.pending.clear()
        checkpoint()
        prev = self._previous.get(signum)
        if callable(prev):
            try:
                prev(signum, None)
            except SystemExit as e:
                raise Preempted(signum, step, e.code) from None
            except Exception as e:
                if _not_requeued(e):  # timeouts used up: the checkpoint is saved, the run ends timed_out
                    raise TimedOut(signum, step, str(e)) from None
                raise
            return
        if prev == signal.SIG_IGN:
            return
        raise Preempted(signum, step, 128 + signum)
