"""`python -m smt_bench [overrides]`: the Hydra app. Bad input exits 2 with one line on stderr."""
from __future__ import annotations

import functools
import itertools
from collections import Counter
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from .errors import EXIT_BAD_INPUT, EXIT_RUN_FAILED, EXIT_TIMED_OUT, BudgetUnreachable, UserError
from .schema.store import CONF, register
from .summary import Job

from hydra_plugins.smt_bench_launchers import Ended, SubmissionRefused, TasksEnded  # noqa: E402  (after register)

if TYPE_CHECKING:
    from .run import Prepared, Shared

register()  # the config schema, before Hydra composes anything


def _fail(msg: str):
    from .distributed import World

    if World.current().is_main:  # every rank finds the same bad input; one says so
        print(f"smt-bench: error: {msg}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def check_group_choices(argv: list[str], conf: Path = CONF) -> None:
    """Hydra reports an unknown group option with a multi-line dump and exit 1; name it in one line."""
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "+", "~", "hydra.")):
            continue
        key, value = arg.split("=", 1)
        group = conf / key
        if not group.is_dir() or "." in key:
            continue
        choices = sorted(p.relative_to(group).with_suffix("").as_posix() for p in group.rglob("*.yaml"))
        for v in value.split(","):
            if v and v not in choices:
                hint = " (or set budget.fraction=F for any fraction)" if key == "budget" else ""
                _fail(f"unknown {key} {v!r}; choose one of: {', '.join(choices)}{hint}")


# the config groups a user chooses from, with what each decides (`python -m smt_bench --help`); the other
# folders of conf/ are chosen for the user (recipe_method: by recipe and method) or belong to another app
# (bench: python -m smt_bench.bench)
USER_GROUPS = {
    "method": "the fine-tuning method and its own keys (method.<key>=...)",
    "budget": "trainable parameters as a fraction of the model; sweep = 0.5, 1, 2, 5% (or budget.fraction=F)",
    "model": "the base model (smollm2-135m: the embedded default, offline; model.source.path_or_id=DIR for any)",
    "data": "training data (bundled: generated offline; local / commonsense170k / math10k: your files)",
    "train": "optimizer, schedule, steps or epochs, batch, precision, checkpoints",
    "eval": "the evaluation suite, scored with lm-eval on the tuned model (and forgetting)",
    "logger": "where metrics go besides the result file (wandb is offline unless told otherwise)",
    "recipe": "a published protocol's hyper-parameters (embedded: the short CPU default)",
    "experiment": "a paper experiment as a preset sweep (experiment=paper/qkv ...; run it with -m)",
    "hydra/launcher": "where a sweep's jobs run: basic (in this process), local (processes), slurm (submitit)",
}
INTERNAL_GROUPS = {"recipe_method", "bench", "hydra"}
DOCS = "docs/config.md"


def help_text(conf: Path = CONF) -> str:
    """What a user can choose: each user-facing group with a line on what it decides and its options read
    from conf/ (so the list cannot go stale), the keys, and where the docs are."""
    lines = ["smt-bench: fine-tune a model with one method at one trainable-parameter budget, evaluate it, and",
             "write one result file; a sweep (-m) runs every combination of comma-separated values.", "",
             "usage: python -m smt_bench [-m] [group=option ...] [key=value ...]", "", "config groups (group=option):"]
    for group, what in USER_GROUPS.items():
        folder = conf / group
        options = sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))
        if group == "hydra/launcher":
            options = ["basic", *options]
        lines += [f"  {group:<15} {what}", f"  {'':<15}   {', '.join(options)}"]
    lines += ["", "keys: any key of the composed config, e.g. seed=1 train.max_steps=50 results.dir=DIR results.tag=NAME;",
              "  python -m smt_bench <overrides> --cfg job prints the whole config.",
              "examples:",
              "  python -m smt_bench method=smt budget=sweep",
              "  python -m smt_bench -m method=smt,lora,dora budget=sweep seed=0,1,2",
              "  python -m smt_bench.analysis outputs/results --out outputs/results/analysis",
              f"docs: {DOCS} (every group and key), docs/running.md (runs and sweeps), docs/README.md (all topics);",
              "  Hydra's own options: python -m smt_bench --hydra-help"]
    return "\n".join(lines)


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _in_process_sweep() -> bool:
    """A job of a sweep whose jobs run one after another in this process (Hydra's basic launcher)."""
    from hydra.core.hydra_config import HydraConfig

    return _multirun() and "BasicLauncher" in str(HydraConfig.get().launcher.get("_target_", ""))


def job(cfg: DictConfig, prepared: "Prepared | None" = None) -> None:
    """One job of the command line (Hydra's task, in this process or on a cluster node), with what the preflight
    prepared for it when it runs in this process. A run that diverges, runs out of memory or fails is recorded in
    its result file; in a sweep the next job goes on (the sweep's table lists it, and rerunning the sweep runs it
    again)."""
    from .distributed import World
    from .lease import EXIT_HELD, RunHeld
    from .preemption import Preempted, TimedOut
    from .run import RunFailed, execute

    try:
        execute(cfg, prepared)
    except RunHeld as e:  # live in another process (its lease is fresh): not started twice, nothing written
        if World.current().is_main:
            print(f"smt-bench: skipped: {e}", file=sys.stderr, flush=True)
        if not _multirun():  # a sweep goes on (its table lists the run as running)
            sys.exit(EXIT_HELD)
    except BudgetUnreachable as e:
        if not _multirun():
            _fail(str(e))
        print(f"smt-bench: skipped ({cfg.method.name} at budget {cfg.budget.fraction:g}): {e}", file=sys.stderr,
              flush=True)  # the preflight allowed it: a sweep over methods, where this one cannot meet this point
    except UserError as e:
        _fail(str(e))
    except RunFailed as e:
        if e.__cause__ is not None:
            traceback.print_exception(e.__cause__, file=sys.stderr)
        print(f"smt-bench: run failed: {e}", file=sys.stderr, flush=True)
        # in a sweep of this process the next job goes on; a job in a process of its own (a SLURM task) exits
        # with the run's status, so the scheduler records it as failed
        if not _in_process_sweep() or (World.current().distributed and not e.agreed):
            sys.exit(EXIT_RUN_FAILED)
    except TimedOut as e:  # checkpointed, not requeued: the same command resumes it
        print(f"smt-bench: timed out: {e}; checkpoint saved", file=sys.stderr, flush=True)
        sys.exit(EXIT_TIMED_OUT)
    except Preempted as e:  # checkpointed: the same command resumes (submitit requeues it on a cluster)
        print(f"smt-bench: preempted by {e}; checkpoint saved", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


def app(plan: "Plan | None" = None) -> None:
    """Hydra's app over sys.argv. Hydra composes each job's config and launches it; a job this process runs
    takes the Prepared the preflight built for it (each job is built once). The task Hydra sees wraps `job`, so
    Hydra names the jobs after this module, as the launchers and their folders expect."""
    prepared = dict(plan.prepared) if plan is not None else {}

    @functools.wraps(job)
    def task(cfg: DictConfig) -> None:
        job(cfg, prepared.pop(job_key(cfg), None))

    from hydra_plugins.smt_bench_launchers import register

    register()  # conf/hydra/launcher/{slurm,local}.yaml name smt-bench's launchers
    hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")(task)()


def job_key(cfg: DictConfig) -> str:
    """A composed job config's identity, the same for the preflight's composition and Hydra's."""
    from omegaconf import OmegaConf

    from .provenance import config_hash

    return config_hash(OmegaConf.to_container(cfg, resolve=False))


def compose_config(overrides: list[str], hydra: bool = False):
    """The config `python -m smt_bench <overrides>` runs with (for the preflight, scripts and tests)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=list(overrides), return_hydra_config=hydra)
    finally:
        GlobalHydra.instance().clear()


def _value_override(o, conf: Path = CONF) -> bool:
    """A plain `key=value` override of a key (not a config group, not +, ++ or ~, not Hydra's own node): it
    only sets a value once the config is composed, so jobs that differ only in such keys compose alike."""
    key = o.key_or_group
    return (o.package is None and not (o.is_add() or o.is_delete() or o.is_force_add()) and "/" not in key
            and not key.startswith("hydra") and not (conf / key).is_dir())


def _apply_values(values: list, cfg: DictConfig) -> None:
    """Plain `key=value` overrides applied to a composed config as Hydra applies them after composing the defaults
    (OmegaConf.update with merge, in order), with Hydra's errors for a key that is not there or a bad value."""
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    for o in values:
        try:
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
        except (ConfigAttributeError, ConfigKeyError) as e:
            raise ConfigCompositionException(f"Could not override '{o.key_or_group}'.\nTo append to your config use "
                                             f"+{o.input_line}") from e
        except OmegaConfBaseException as e:
            raise ConfigCompositionException(f"Error merging override {o.input_line}") from e


def compose_jobs(points: list[list[str]]) -> list[DictConfig]:
    """Every job's config, as compose_config(job) would give it, composed once per distinct choice of config
    groups: a sweep's jobs that differ only in values (seed=0,1,2, budget.fraction=...) take a copy of that
    composition with their values applied as Hydra applies them (_apply_values). What Hydra composes from the
    config groups is the same for them; only the values differ."""
    import copy

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    bases: dict[tuple[str, ...], DictConfig] = {}
    out = []
    for job in points:
        parsed = parser.parse_overrides(job)
        values = [o for o in parsed if _value_override(o)]
        groups = tuple(o.input_line for o in parsed if not _value_override(o))
        if groups not in bases:
            bases[groups] = compose_config(list(groups))
        cfg = copy.deepcopy(bases[groups])
        _apply_values(values, cfg)
        out.append(cfg)
    return out


def sweep_points(argv: list[str]) -> list[list[str]]:
    """The override list of every job Hydra will launch for this command line (one if not a sweep): the
    basic sweeper's grid, built with Hydra's public override parser (the config's `hydra.sweeper.params`,
    then the command line; a later value of a key replaces an earlier one; the product in key order)."""
    return _grid(argv)[0]


def _grid(argv: list[str]) -> tuple[list[list[str]], bool, DictConfig]:
    """(every job's overrides, whether the command is a multirun, the composed hydra config)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException
    from hydra.types import RunMode

    overrides = [a for a in argv if not a.startswith("-")]
    fixed = [o.input_line for o in OverridesParser.create().parse_overrides(overrides) if not o.is_sweep_override()]
    hcfg = compose_config(fixed, hydra=True)
    multirun = "-m" in argv or "--multirun" in argv or hcfg.hydra.mode == RunMode.MULTIRUN
    params = [f"{k}={v}" for k, v in (hcfg.hydra.sweeper.params or {}).items()]
    if not multirun:
        return [overrides], False, hcfg
    grid: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides(params + overrides):
        key = o.get_key_element()
        if o.is_sweep_override() and not o.is_discrete_sweep():
            raise OverrideParseException(f"{o.input_line}: a sweep of listed values is needed (a,b,c), not a "
                                         f"range or interval")
        grid[key] = ([f"{key}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
                     else [f"{key}={o.get_value_element_as_str()}"])
    return [list(job) for job in itertools.product(*grid.values())], True, hcfg


def _launcher(hcfg: DictConfig) -> str:
    return str((hcfg.hydra.get("launcher") or {}).get("_target_", ""))


def planned_world_size(argv: list[str], hcfg: DictConfig | None = None) -> int | None:
    """The ranks each job will have where the launcher starts them (SLURM: nodes × tasks_per_node, one
    srun task per rank); None: this process's own world (torchrun's, or one process)."""
    if hcfg is None:
        hcfg = _grid(argv)[2]
    launcher = hcfg.hydra.get("launcher") or {}
    if "SlurmLauncher" in _launcher(hcfg):
        return int(launcher.get("nodes") or 1) * int(launcher.get("tasks_per_node") or 1)
    return None


@dataclass
class Plan:
    """What the preflight found for a command line: every job Hydra will launch (its overrides, result file and
    whether it was finished before) with its results.dir, the jobs skipped before training (a budget their method
    cannot meet), whether the command is a multirun (a sweep, even of one job: its table and exit status say
    whether every run finished), and the Prepared runs of the jobs this process will run itself (Hydra's basic
    launcher, or a single run), each used once by its job."""
    jobs: list[Job] = field(default_factory=list)
    results_dirs: list[str] = field(default_factory=list)
    lease_s: list[float] = field(default_factory=list)  # each job's results.lease_s
    skipped: list[str] = field(default_factory=list)
    multirun: bool = False
    prepared: dict[str, Prepared] = field(default_factory=dict)
    all_prepared: list[Prepared] = field(default_factory=list)  # preflight(keep=True): every job's, in order
    world_size: int | None = None  # the ranks each job will have where the launcher starts them
    shared: "Shared | None" = None  # what the jobs shared (run.Shared), with what it computed


def preflight(argv: list[str], keep: bool = False) -> Plan:
    """Validate every job of a sweep before the first one trains (no half-finished sweeps on bad input); bad
    input exits 2 with one line. What the jobs share (the model's shapes, the data, each cell's plan) is computed
    once (run.Shared). `keep`: every job's Prepared in `Plan.all_prepared`, whichever launcher runs it (the
    forecast reads them)."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    from .results import finished
    from .run import Prepared, Shared
    from .schema.validate import error_line

    try:  # a mistyped value or key, or an unquoted list, would otherwise end in a traceback with exit 1
        points, multirun, hcfg = _grid(argv)
        cfgs = compose_jobs(points)
        world_size = planned_world_size(argv, hcfg)
    except (ConfigCompositionException, OverrideParseException) as e:
        _fail(error_line(e))
    in_process = not multirun or "BasicLauncher" in _launcher(hcfg)  # else each job runs in a process of its own
    plan, skipped = Plan(multirun=multirun, world_size=world_size), []
    seen = Counter(o for job in points for o in set(job))  # an override not in every job tells jobs apart
    varying = {o.split("=", 1)[0] for o, n in seen.items() if n < len(points)}
    shared = plan.shared = Shared()  # what depends only on the model, the data or a (method, budget, model) cell
    for overrides, cfg in zip(points, cfgs):
        swept = [o for o in overrides if o.split("=", 1)[0] in varying]  # what tells this job from the others
        key = job_key(cfg)
        try:
            prep = Prepared(cfg, world_size, shared=shared)
        except BudgetUnreachable as e:
            if "method" not in varying:  # one method's own budget list: a point it cannot meet is bad input
                _fail(f"sweep job {' '.join(swept)}: {e}" if len(points) > 1 else str(e))
            skipped.append(f"sweep job {' '.join(swept)}: skipped: {e}")
            continue
        except UserError as e:
            _fail(f"sweep job {' '.join(swept)}: {e}" if len(points) > 1 else str(e))
        plan.jobs.append(Job(swept, prep.path, finished(prep.path)))
        if keep:
            plan.all_prepared.append(prep)
        plan.results_dirs.append(str(cfg.results.dir))
        plan.lease_s.append(float(cfg.results.lease_s))
        if in_process:
            plan.prepared[key] = prep
    if skipped and not plan.jobs:
        _fail(f"no job of the sweep can meet its budget; first: {skipped[0]}")
    for line in skipped:  # a method x budget grid: a method that cannot meet a point skips it, loudly
        print(f"smt-bench: {line}", file=sys.stderr, flush=True)
    plan.skipped = [line.split(": skipped:", 1)[0].removeprefix("sweep job ") for line in skipped]
    return plan


def _agreed_preflight(argv: list[str]) -> Plan:
    """Under torchrun every rank runs the preflight; if one finds bad input, all exit with its status
    (none may go on to wait for the others in a collective)."""
    from .distributed import init

    world = init()
    code, plan = 0, Plan()
    try:
        plan = preflight(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    code = int(world.reduce_floats([code], "max")[0])
    if code:
        sys.exit(code)
    return plan


def main() -> None:
    from .distributed import World
    from .results import finished

    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return
    check_group_choices(argv)
    forecast = [a for a in argv if a.startswith("forecast.")]
    if forecast:  # the forecast's own settings, on the training command: say where they go
        _fail(f"{forecast[0]}: a setting of the forecast, not of a run; run `python -m smt_bench.forecast` with the "
              f"same overrides (docs/forecast.md)")
    if any(a in ("--cfg", "-c", "--info", "--hydra-help") or a.startswith("--cfg") for a in argv):
        app()
        return
    plan = _agreed_preflight(argv)
    sweep = plan.multirun or len(plan.jobs) + len(plan.skipped) > 1
    refused = None
    try:
        app(plan)
    except SubmissionRefused as e:  # nothing was submitted: bad input, in one line
        refused = e
    except TasksEnded as e:  # every task has ended; these without a result (killed, lost, failed hard)
        mark_killed(plan, e.ended)
    finally:
        if sweep and World.current().is_main:
            from .summary import sweep_table

            print(sweep_table(plan.jobs, plan.results_dirs), flush=True)
            if plan.skipped:
                print(f"[smt-bench] skipped before training, budget unreachable for the method: "
                      f"{'; '.join(plan.skipped)}", flush=True)
    if refused is not None:
        _fail(str(refused))
    if sweep and not all(finished(j.path) for j in plan.jobs):
        sys.exit(EXIT_RUN_FAILED)  # the table says which; rerunning the sweep runs only those


def mark_killed(plan: Plan, ended: list[Ended]) -> None:
    """A task the scheduler ended while its run was still `running` (kill -9, a lost node, host memory): its
    result file says so, `killed`, with the scheduler's state, so the table and the analysis tell the truth.
    The run keeps its checkpoint; the same command resumes it."""
    import json

    from .result import RunResult
    from .results import write_json_atomic

    from .lease import Holder, lease_file

    for task in ended:
        i = next((i for i, j in enumerate(plan.jobs) if set(j.overrides) <= set(task.overrides)), None)
        if i is None:
            continue
        job = plan.jobs[i]
        holder = Holder.read(lease_file(job.path))
        if (holder is not None and holder.scheduler_job != task.job_id and plan.lease_s[i]
                and not holder.stale(plan.lease_s[i])):
            continue  # another live process trains this run (a rerun of the sweep): it will say how it ends
        try:
            result = RunResult.from_json(json.loads(job.path.read_text()))
        except (OSError, ValueError):  # never started, or not a result: the table says `not run`
            print(f"[smt-bench] task {task.job_id} ended {task.state} before its run started: {task.reason}",
                  file=sys.stderr, flush=True)
            continue
        if result.run_info.status != "running":
            continue  # it said how it ended (failed, timed_out, ...)
        result.run_info.status = "killed"
        result.run_info.error = f"the scheduler ended task {task.job_id}: {task.state} ({task.reason})"
        if result.run_info.attempts:
            result.run_info.attempts[-1].ended = "killed"
        write_json_atomic(job.path, result.to_json())


if __name__ == "__main__":
    main()
