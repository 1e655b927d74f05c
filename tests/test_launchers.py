"""hydra/launcher=slurm and hydra/launcher=local without a cluster.

slurm: the real command line goes through Hydra, the hydra-submitit-launcher plugin and submitit up to the
`sbatch` call, which is intercepted (submitit's `_make_submission_command`): the test reads the sbatch
script submitit wrote and the job pickles it left for the array tasks. local: a real 2-run sweep through
submitit's local executor, one process per run, to finished result files.
"""
import json
import re
import signal
import sys

import pytest
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import DelayedSubmission, JobPaths, UncompletedJobError
from submitit.slurm.slurm import SlurmExecutor, SlurmJob, SlurmJobEnvironment

TINY = ["model=tiny-llama", "device=cpu", "train.max_steps=2", "train.batch_size=2", "train.max_len=64",
        "eval.enabled=false", "data.n_train_per_task=2", "data.n_val_per_task=1", "data.n_test_per_task=1"]
CLUSTER = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=mylab",
           "hydra.launcher.gpus_per_node=4", "hydra.launcher.timeout_min=600", "hydra.launcher.array_parallelism=2",
           "hydra.launcher.setup=[module load cuda/12.4,source .venv/bin/activate]"]


@pytest.fixture
def sbatch(monkeypatch):
    """Stands in for SLURM: srun 'exists', `sbatch <script>` records the script and answers as sbatch
    does, and waiting for the jobs' results returns at once (nothing runs)."""
    from hydra.core.utils import JobReturn, JobStatus

    scripts = []

    def submit(self, path):
        scripts.append(path.read_text())
        return [sys.executable, "-c", "print('Submitted batch job 4242')"]

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    monkeypatch.setattr(SlurmExecutor, "_make_submission_command", submit)
    monkeypatch.setattr(SlurmJob, "results", lambda self: [JobReturn(status=JobStatus.COMPLETED)])
    return scripts


def test_slurm_sweep_is_one_array_job_with_the_requested_resources_requeue_and_signal(
        sbatch, monkeypatch, tmp_path, capsys, smollm2_path):
    from smt_bench.__main__ import main

    sweep = tmp_path / "sweep"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["smt_bench", "-m", *CLUSTER, *TINY, "method=smt,lora", "budget.fraction=0.005",
                                      "seed=0,1", f"results.dir={tmp_path / 'results'}", f"hydra.sweep.dir={sweep}"])
    with pytest.raises(SystemExit) as ended:  # sbatch is intercepted: no job ran, so the sweep is unfinished
        main()
    assert ended.value.code == 1
    assert "sweep of 4 jobs: 4 not run" in capsys.readouterr().out  # submitted; nothing ran here

    (script,) = sbatch  # the whole sweep is one sbatch call: a job array
    lines = script.splitlines()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=mylab", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=600", "#SBATCH --signal=USR2@300", "#SBATCH --requeue", "#SBATCH --array=0-3%2",
                 "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=64GB", "#SBATCH --job-name=smt-bench", "#SBATCH --open-mode=append"):
        assert line in lines, (line, script)
    setup = lines.index("# setup")
    assert lines[setup + 1:setup + 3] == ["module load cuda/12.4", "source .venv/bin/activate"]
    (command,) = [l for l in lines if l.startswith("srun ")]
    assert lines.index(command) > setup + 2
    assert re.search(r"-u -m submitit\.core\._submit \S*\.submitit/%j$", command), command

    # what each array task will run, and what submitit does on SIGUSR2: the plugin's launcher is
    # checkpointable, so a timed-out task is requeued (max_num_timeout=3 times), a 4th timeout ends it
    pickles = sorted(sweep.glob(".submitit/4242_*/4242_*_submitted.pkl"))
    assert len(pickles) == 4
    tasks = [DelayedSubmission.load(p) for p in pickles]
    swept = sorted(tuple(o for o in t.args[0] if o.startswith(("method=", "seed="))) for t in tasks)
    assert swept == [(m, s) for m in ("method=lora", "method=smt") for s in ("seed=0", "seed=1")]
    assert {(t._timeout_min, t._timeout_countdown) for t in tasks} == {(600, 3)}

    monkeypatch.setenv("SLURM_JOB_ID", "4242_0")
    monkeypatch.setenv("SLURM_PROCID", "0")  # rank 0: the task that checkpoints and requeues
    requeued = []
    monkeypatch.setattr(SlurmJobEnvironment, "_requeue", lambda self, countdown: requeued.append(countdown))
    monkeypatch.setattr(SignalHandler, "has_timed_out", lambda self: True)
    monkeypatch.setattr(SignalHandler, "_exit", lambda self: None)
    paths = JobPaths(sweep / ".submitit" / "%j", job_id="4242_0")
    for _ in range(3):
        task = DelayedSubmission.load(paths.submitted_pickle)  # as submitit loads it when the task (re)starts
        SignalHandler(SlurmJobEnvironment(), paths, task).checkpoint_and_try_requeue(signal.SIGUSR2)
    assert requeued == [2, 1, 0]  # submitit re-dumped the same call with one timeout fewer each time
    task = DelayedSubmission.load(paths.submitted_pickle)
    assert task.args[0] == tasks[0].args[0] and task._timeout_countdown == 0
    with pytest.raises(UncompletedJobError, match="timed-out too many times"):
        SignalHandler(SlurmJobEnvironment(), paths, task).checkpoint_and_try_requeue(signal.SIGUSR2)


@pytest.mark.slow
def test_local_launcher_runs_a_sweep_to_finished_results(cli, tmp_path, smollm2_path):
    results, sweep = tmp_path / "results", tmp_path / "sweep"
    proc = cli("-m", "hydra/launcher=local", *TINY, "seed=0,1", f"results.dir={results}", f"hydra.sweep.dir={sweep}",
               timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[smt-bench] sweep of 2 jobs: 2 finished" in proc.stdout, proc.stdout
    files = sorted(results.rglob("*.json"))
    assert [re.sub(r"-[0-9a-f]{12}\.json$", "", f.name) for f in files] == ["lora-b0.01-s0", "lora-b0.01-s1"]
    assert [json.loads(f.read_text())["run_info"]["status"] for f in files] == ["finished", "finished"]
    # each run was its own submitit job (one process each), whose log holds the run's own last line
    logs = sorted(sweep.glob(".submitit/*/*_log.out"))
    assert len(logs) == 2 and len({l.parent for l in logs}) == 2
    assert sorted(next(l for l in p.read_text().splitlines() if l.startswith("[smt-bench] finished: lora"))
                  .rsplit("/", 1)[1] for p in logs) == [f.name for f in files]


def test_tasks_per_node_starts_each_run_as_that_many_ranks_through_srun(sbatch, monkeypatch, tmp_path, capsys,
                                                                         smollm2_path):
    """tasks_per_node=2: one srun task per rank, and the preflight names the runs for 2 ranks (their ids
    carry the world size, as the ranks will compute them on the nodes)."""
    from smt_bench.__main__ import main, planned_world_size, preflight

    sweep = tmp_path / "sweep"
    monkeypatch.chdir(tmp_path)
    args = ["-m", *CLUSTER, "hydra.launcher.tasks_per_node=2", *TINY, "method=lora", f"results.dir={tmp_path / 'r'}",
            f"hydra.sweep.dir={sweep}"]
    monkeypatch.setattr(sys, "argv", ["smt_bench", *args])
    with pytest.raises(SystemExit) as ended:  # one job, submitted (sbatch is intercepted): it did not finish here,
        main()                                # and a multirun of one job says so like any sweep
    assert ended.value.code == 1 and "sweep of 1 jobs: 1 not run" in capsys.readouterr().out
    (script,) = sbatch
    assert "#SBATCH --ntasks-per-node=2" in script.splitlines()
    assert planned_world_size(args) == 2 and planned_world_size(TINY) is None
    (two,) = preflight(args).jobs
    (one,) = preflight([a for a in args if "tasks_per_node" not in a]).jobs
    assert two.path.name != one.path.name and two.path.name.startswith("lora-b0.01-s0-")


def test_a_refused_submission_is_one_line_naming_the_keys_and_nothing_is_submitted(sbatch, monkeypatch, tmp_path,
                                                                                  capsys, smollm2_path):
    """sbatch refuses (a GPU resource this cluster lacks): exit 2, one stderr line with sbatch's own message and
    the hydra.launcher keys behind it, the table saying no job ran, no traceback."""
    from smt_bench.__main__ import main

    def refuse(self, path):
        sbatch.append(path.read_text())
        return [sys.executable, "-c", "import sys; sys.stderr.write('sbatch: error: Invalid generic resource (gres) "
                                      "specification\\n'); sys.exit(1)"]

    monkeypatch.setattr(SlurmExecutor, "_make_submission_command", refuse)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["smt_bench", "-m", *CLUSTER, *TINY, "method=smt,lora", "budget.fraction=0.005",
                                      f"results.dir={tmp_path / 'results'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    with pytest.raises(SystemExit) as ended:
        main()
    out, err = capsys.readouterr()
    assert ended.value.code == 2 and len(sbatch) == 1
    assert [line for line in err.splitlines() if line.strip()] == [
        "smt-bench: error: sbatch refused the submission: sbatch: error: Invalid generic resource (gres) "
        "specification; check hydra.launcher.gpus_per_node / hydra.launcher.gres / hydra.launcher.gpus_per_task; "
        "nothing was submitted"]
    assert "sweep of 2 jobs: 2 not run" in out


def test_the_submitter_waits_for_every_task_and_a_killed_one_reads_killed(sbatch, monkeypatch, tmp_path, capsys,
                                                                          smollm2_path):
    """The first task of two ends without a result (kill -9: submitit's UncompletedJobError): the submitter still
    waits for the second, then the run the first left `running` reads `killed` with SLURM's state, the table
    says so, exit 1 — no traceback."""
    from hydra.core.utils import JobReturn, JobStatus

    from smt_bench.__main__ import main, preflight

    args = ["-m", *CLUSTER, *TINY, "method=lora", "seed=0,1", f"results.dir={tmp_path / 'results'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    first = preflight(args).jobs[0]
    running = json.loads(json.dumps(RUNNING))
    running["config"]["seed"] = 0
    first.path.parent.mkdir(parents=True)
    first.path.write_text(json.dumps(running))
    waited = []

    def results(self):
        waited.append(self.job_id)
        if self.job_id.endswith("_0"):
            raise UncompletedJobError(f"Job {self.job_id} (task: 0) with path x has not produced any output "
                                      f"(state: FAILED)")
        return [JobReturn(status=JobStatus.COMPLETED)]

    monkeypatch.setattr(SlurmJob, "results", results)
    monkeypatch.setattr(SlurmJob, "state", property(lambda self: "FAILED"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["smt_bench", *args])
    with pytest.raises(SystemExit) as ended:
        main()
    out, err = capsys.readouterr()
    assert ended.value.code == 1 and waited == ["4242_0", "4242_1"]
    assert "Traceback" not in err and "sweep of 2 jobs: 1 killed, 1 not run" in out
    info = json.loads(first.path.read_text())["run_info"]
    assert info["status"] == "killed" and info["error"].startswith("the scheduler ended task 4242_0: FAILED (Job ")


def test_ctrl_c_of_the_submitter_leaves_the_tasks_running_and_says_how_to_follow_them(sbatch, monkeypatch, tmp_path,
                                                                                   capsys, smollm2_path):
    from smt_bench.__main__ import main

    def interrupted(self):
        raise KeyboardInterrupt

    cancelled = []
    monkeypatch.setattr(SlurmJob, "results", interrupted)
    monkeypatch.setattr(SlurmJob, "done", lambda self, force_check=False: False)
    monkeypatch.setattr(SlurmJob, "cancel", lambda self, check=True: cancelled.append(self.job_id))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["smt_bench", "-m", *CLUSTER, *TINY, "method=lora", "seed=0,1",
                                      f"results.dir={tmp_path / 'results'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    with pytest.raises(KeyboardInterrupt):
        main()
    out, err = capsys.readouterr()
    assert cancelled == [] and "sweep of 2 jobs: 2 not run" in out
    assert ("[smt-bench] interrupted; 2 task(s) still queued or running, left to run: 4242_0 4242_1. Follow them "
            "with `squeue -j 4242_0,4242_1`, cancel them with `scancel 4242_0,4242_1`. The same command later skips "
            "the runs that finished and resumes the others.") in err


RUNNING = {"schema_version": 1, "run_info": {"id": "x", "created_at": "2026-01-01T00:00:00+00:00", "command": "x",
                                             "status": "running", "error": None, "checkpoint_step": 1},
           "config": {"method": {"name": "lora"}, "model": {"name": "tiny-llama"}, "data": {"name": "bundled"},
                      "budget": {"fraction": 0.01}, "seed": 0},
           "meta_info": {"git": {}, "versions": {}, "device": {}, "argv": [], "hostname": "h"}}


@pytest.mark.slow
def test_a_slurm_task_joins_the_world_slurm_describes(tmp_path):
    """Without torchrun, each SLURM task (srun, or submitit's tasks_per_node) exports RANK / WORLD_SIZE /
    LOCAL_RANK / MASTER_ADDR from SLURM's variables before joining (submitit's TorchDistributedEnvironment)."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                   "MASTER_"))}
    env.update(SLURM_JOB_ID="77", SLURM_NTASKS="4", SLURM_STEP_NUM_TASKS="4", SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_NODEID="1",
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_STEP_NODELIST="gpu[07-08]")
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    code = ("import os; from smt_bench.distributed import _from_slurm\n"
            f"step = os.environ.pop('SLURM_STEP_NUM_TASKS'); _from_slurm(); print(*[os.environ.get(k) for k in {keys}])\n"
            f"os.environ['SLURM_STEP_NUM_TASKS'] = step; _from_slurm(); print(*[os.environ.get(k) for k in {keys}])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    batch_script, srun_step = out.stdout.splitlines()  # the batch script itself (no srun step): one process
    assert batch_script.split() == ["None"] * 4 and srun_step.split() == ["3", "4", "1", "gpu07"], out.stderr[-2000:]
