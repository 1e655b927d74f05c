"""smt-bench's SLURM and local launchers: hydra-submitit-launcher's, with a submitter that outlives its tasks.

Installed as `hydra_plugins.smt_bench_launchers` (pyproject.toml maps this folder there: Hydra instantiates
launchers only from the `hydra_plugins` package) and registered with Hydra by `smt_bench.__main__`;
conf/hydra/launcher/{slurm,local}.yaml name them. They submit exactly as the plugin does (its executor
parameters, its job array); what changes is what happens after:

- **The submitter waits for every task**, whatever happens to any one of them (a task killed, failed, timed
  out for good, cancelled, lost with its node). The plugin waits for each task's result in turn and raises at
  the first that has none, ending the submitting process while the other tasks run on unseen. Here each task's
  wait ends with its scheduler state instead; `TasksEnded` then lists the tasks that did not finish and the
  command line prints its table from the runs' own result files.
- **A refused submission is one line**: `SubmissionRefused` carries the scheduler's own message (sbatch's
  stderr) and the `hydra.launcher.*` keys that feed the option it names; nothing was submitted.
- **Ctrl-C of the submitter** leaves the tasks running and says which are still queued or running, and how to
  follow and cancel them.
"""
from __future__ import annotations

import contextlib
import io
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin

# an sbatch message -> the hydra.launcher keys that feed the option it names
REFUSAL_KEYS = (
    (r"gres|generic resource|gpu", "gpus_per_node, gres, gpus_per_task"),
    (r"partition", "partition"),
    (r"account|association", "account"),
    (r"qos", "qos"),
    (r"time limit|time_limit|--time", "timeout_min"),
    (r"memory|--mem", "mem_gb, mem_per_gpu, mem_per_cpu"),
    (r"node|cpus|ntasks|tasks per node", "nodes, tasks_per_node, cpus_per_task"),
    (r"constraint|feature", "constraint"),
)


class LaunchEnded(BaseException):
    """How a launch ended, for `smt_bench.__main__` to report. A BaseException, as KeyboardInterrupt is: Hydra
    turns any Exception raised while it launches into a printed traceback and exit status 1."""


class SubmissionRefused(LaunchEnded):
    """The scheduler refused the submission; nothing was submitted."""

    def __init__(self, message: str, scheduler: str):
        self.message = " ".join(message.split()) or f"{scheduler} exited with an error and no message"
        keys = next((k for pattern, k in REFUSAL_KEYS if re.search(pattern, self.message, re.I)), None)
        self.keys = keys
        where = (f"check hydra.launcher.{keys.replace(', ', ' / hydra.launcher.')}" if keys
                 else "check the hydra.launcher.* keys (docs/slurm.md)")
        super().__init__(f"{scheduler} refused the submission: {self.message}; {where}; nothing was submitted")


@dataclass
class Ended:
    """A task that ended without a result: its job's overrides, its scheduler id, the scheduler's state, and why
    submitit says so."""
    overrides: list[str]
    job_id: str
    state: str
    reason: str


class TasksEnded(LaunchEnded):
    """Every task has ended; these did not return a result (their runs' result files say how far they got)."""

    def __init__(self, ended: list[Ended]):
        self.ended = ended
        super().__init__("; ".join(f"task {e.job_id}: {e.state}" for e in ended))


class _Waiting:
    """A submitted task whose `results()` waits for it to end and never raises: a task that ended without a
    result gives a JobReturn holding what the scheduler says (the submitter goes on to wait for the others)."""

    def __init__(self, job: Any, overrides: list[str], ended: list[Ended]):
        self.job, self.overrides, self.ended = job, overrides, ended

    def results(self) -> list[JobReturn]:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            return self.job.results()
        except (UncompletedJobError, FailedJobError) as e:
            try:
                state = str(self.job.state)
            except Exception:  # the scheduler cannot be asked (accounting down): its own words are all we have
                state = "UNKNOWN"
            self.ended.append(Ended(self.overrides, str(self.job.job_id), state, str(e).strip().splitlines()[0][:300]))
            ret = JobReturn()
            ret.status, ret.return_value = JobStatus.COMPLETED, None  # the run's result file tells its status
            return [ret]


@contextlib.contextmanager
def _patient(scheduler: str, submitted: list, ended: list[Ended]) -> Iterator[None]:
    """While the plugin launches: its executor's map_array (the one submission of the whole array) returns
    tasks that wait patiently, and a refusal becomes SubmissionRefused. The plugin builds its executor inside
    `launch`, so this is where its submission can be reached without copying its parameter handling."""
    import submitit
    from submitit.core.utils import FailedJobError

    original = submitit.AutoExecutor.map_array

    def map_array(executor: Any, fn: Any, *iterable: Any) -> list:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):  # submitit prints sbatch's stderr; the one line says it
                jobs = original(executor, fn, *iterable)
        except FailedJobError as e:
            raise SubmissionRefused(str(e) or err.getvalue(), scheduler) from None
        sys.stderr.write(err.getvalue())
        submitted.extend(jobs)
        if jobs:
            ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
            print(f"[smt-bench] submitted {len(jobs)} task(s) as {scheduler} job {', '.join(ids)}; waiting for every "
                  f"task to end (Ctrl-C leaves them running)", flush=True)
        return [_Waiting(j, list(params[0]), ended) for j, params in zip(jobs, zip(*iterable))]

    submitit.AutoExecutor.map_array = map_array
    try:
        yield
    finally:
        submitit.AutoExecutor.map_array = original


def _still_live(submitted: list) -> list[str]:
    live = []
    for j in submitted:
        try:
            if not j.done():
                live.append(str(j.job_id))
        except Exception:  # cannot ask: count it as live, the user checks
            live.append(str(j.job_id))
    return live


class _Patient:
    """What both launchers add to the plugin's `launch` (see the module docstring)."""
    _SCHEDULER = "the scheduler"
    _FOLLOW = ""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        submitted: list = []
        ended: list[Ended] = []
        try:
            with _patient(self._SCHEDULER, submitted, ended):
                returns = super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]
        except KeyboardInterrupt:
            live = _still_live(submitted)
            if live:
                print(f"\n[smt-bench] interrupted; {len(live)} task(s) still queued or running, left to run: "
                      f"{' '.join(live)}. {self._FOLLOW.format(ids=','.join(live))}The same command later skips "
                      f"the runs that finished and resumes the others.", file=sys.stderr, flush=True)
            raise
        if ended:
            raise TasksEnded(ended)
        return returns


class SlurmLauncher(_Patient, plugin.SlurmLauncher):
    _SCHEDULER = "sbatch"
    _FOLLOW = "Follow them with `squeue -j {ids}`, cancel them with `scancel {ids}`. "


class LocalLauncher(_Patient, plugin.LocalLauncher):
    _SCHEDULER = "the local executor"
    _FOLLOW = "They run as processes of their own (see <hydra.sweep.dir>/.submitit/). "


def register() -> None:
    """Hydra finds plugins by scanning the installed `hydra_plugins` package, which misses a folder mapped there
    by an editable install: register these by hand (harmless where the scan found them)."""
    from hydra.core.plugins import Plugins

    for launcher in (SlurmLauncher, LocalLauncher):
        Plugins.instance().register(launcher)
