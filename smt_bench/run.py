"""One run: validate everything, then load, tune, evaluate and write the result file.

All input checks (config values, budget reachability on meta-device shapes, data files) happen
before weights load; a failure there raises UserError and nothing is written.
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import random
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue
from hydra.errors import InstantiationException

from . import hub_kernels, migrations, provenance
from .checkpoint import CheckpointDir
from .data.batches import BatchStream, collate, encode
from .data.bundled import BundledSuite
from .distributed import World, cuda_index
from .distributed import init as init_world
from .errors import BudgetUnreachable, UserError
from .lease import Lease, RunHeld, scheduler_job
from .loggers import Logger, NullLogger
from .memory import PeakMemory
from .methods.base import Context, Plan
from .models import ModelShapes, meta_shapes
from .parallel import strategy_for
from .preemption import Preempted, TimedOut
from .result import (SCHEMA_VERSION, Anatomy, Attempt, Evaluation, MetaInfo, RunInfo, RunResult, SchemaError,
                     Summary, TrainInfo)
from .results import checkpoint_dir, finished, probe_writable, run_file, write_json_atomic
from .schema.validate import validate
from .summary import run_line
from .trainer import Diverged, autocast_for, forward_loss, train


def _build(node, what: str):
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, UserError):
            raise cause from None
        raise UserError(f"cannot build {what} from its config ({str(cause).splitlines()[0]}); check the {what} "
                        f"group's keys") from None


def _device(name: str, world: World) -> torch.device:
    """The schema checked the name; this checks that the machine has it. Under several ranks each uses
    its own GPU (torchrun and SLURM give one per rank: cuda:LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}: CUDA is not available here; use device=cpu or device=auto")
    if dev.type == "cuda" and world.distributed:
        if dev.index is not None:
            raise UserError(f"device={name} with {world.world_size} ranks: each rank uses cuda:LOCAL_RANK; "
                            f"use device=cuda or device=auto")
        return torch.device("cuda", cuda_index())
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                        f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return dev


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)


class Shared:
    """What the jobs of one sweep share, computed once per sweep instead of once per job: the data splits (by
    data config), the model's meta-device shapes (by model source), the method's budget plan (by method config,
    target and model: a seed never changes it), the evaluation plan (by eval config and data). `computed` counts
    each kind of work actually done (the preflight's cost grows with distinct models and cells, not jobs)."""

    def __init__(self) -> None:
        from collections import Counter

        self.splits: dict[str, Any] = {}
        self.shapes: dict[str, ModelShapes] = {}
        self.plans: dict[str, Plan | BaseException] = {}
        self.evals: dict[str, Any] = {}
        self.computed: Counter[str] = Counter()

    @staticmethod
    def key(*parts: Any) -> str:
        """A key for resolved config values (dicts, lists, scalars): equal values, equal keys."""
        import hashlib

        return hashlib.sha256(json.dumps(list(parts), sort_keys=True, default=str).encode()).hexdigest()


class Prepared:
    """Everything validated and decided before any weights load.

    `world_size` is the number of ranks the run will have (default: this process's world); it is part
    of the run's identity: the same config on 1 and on 4 ranks trains with different global batches.
    `shared`: what the other jobs of the sweep already computed (Shared); `splits` (older callers): the data
    splits alone."""

    def __init__(self, cfg: DictConfig, world_size: int | None = None, splits: dict | None = None,
                 shared: Shared | None = None):
        try:
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as e:
            raise UserError(f"config value {e.full_key} is required but not set; add {e.full_key}=... "
                            f"to the command") from None
        validate(cfg)  # every key's type and valid values, and the cross-field rules (smt_bench/schema/)
        hub_kernels.preflight(cfg.model.hub_kernels)
        self.cfg = cfg
        self.method = _build(cfg.method, "method")
        if self.method.fixed_fraction is not None:
            # full FT in a mixed sweep: every budget point is the same run, so give it one id
            with open_dict(cfg):
                cfg.budget.fraction = self.method.fixed_fraction
        frac = cfg.budget.fraction
        self.world = World.current()
        self.world_size = world_size or self.world.world_size
        self.container = OmegaConf.to_container(cfg, resolve=True)
        if self.world_size > 1:  # one process keeps the run ids it always had
            self.container["distributed"] = {"world_size": self.world_size}
        self.run_id = provenance.config_hash({**self.container,
                                              "method": migrations.id_form(self.container["method"])})
        self.source = _build(cfg.model.source, "model")
        self.data = _build(cfg.data, "data")
        self.device = _device(cfg.device, self.world)
        self.path = run_file(cfg.results.dir, cfg.results.group, self.method.name, float(frac), cfg.seed, self.run_id,
                             cfg.results.get("tag"))
        shared = shared if shared is not None else Shared()
        if splits is not None:
            shared.splits = splits
        model_key = Shared.key(self.container["model"]["source"])
        if model_key not in shared.shapes:
            shared.computed["shapes"] += 1
            shared.shapes[model_key] = meta_shapes(self.source.hf_config())
        self.shapes = shared.shapes[model_key]
        self.target = round(frac * self.shapes.total_params)
        self.plan = self._plan(shared, model_key)
        data_key = provenance.config_hash(self.container["data"])  # a sweep's jobs share equal data
        if data_key not in shared.splits:
            shared.computed["data"] += 1
            shared.splits[data_key] = self.data.load()
        self.splits = shared.splits[data_key]
        batch = cfg.train.batch_size
        if len(self.splits.train) < batch:  # (truncation to max_len may drop more, found once tokenised)
            raise UserError(f"data={cfg.data.name} has {len(self.splits.train)} training records, fewer than "
                            f"train.batch_size={batch}; use more data or a smaller train.batch_size")
        self.eval_plan = None
        if cfg.eval.enabled:  # the suite's tasks, local test files, caps and hub access, checked now
            from .evaluation.suites import plan_suite

            eval_key = Shared.key(self.container["eval"], data_key)
            if eval_key not in shared.evals:
                shared.computed["eval"] += 1
                shared.evals[eval_key] = plan_suite(cfg.eval, self.splits.test, isinstance(self.data, BundledSuite),
                                                    cfg.data.name)
            self.eval_plan = shared.evals[eval_key]  # read-only: the harness only reads its plan
        # the result, its samples and exports go beside each other: an unwritable place fails now, not
        # after training and evaluation (rank 0 writes them all)
        if self.world.is_main:
            probe_writable(self.path.parent, "results.dir", cfg.results.dir)

    def _plan(self, shared: Shared, model_key: str) -> Plan:
        """The method's plan on meta shapes, once per (method config, target, model) in a sweep. Planning runs
        with the meta device as the default: a plan reads shapes only, so whatever tensors it builds (a peft
        tuner injected to count its parameters) hold no memory and take no time to initialise."""
        key = Shared.key(self.container["method"], self.target, model_key)
        if key not in shared.plans:
            shared.computed["plan"] += 1
            try:
                with torch.device("meta"):
                    shared.plans[key] = self.method.plan(self.shapes, self.target)
            except (UserError, BudgetUnreachable) as e:  # the same answer for every job of this cell
                shared.plans[key] = e
        plan = shared.plans[key]
        if isinstance(plan, BaseException):
            raise plan.with_traceback(None)
        return copy.deepcopy(plan)  # each job's own (a method may keep facts in its detail)


def method_context(train_ex: list[dict], batch_size: int, pad_id: int, seed: int, dev: torch.device,
                   world: World | None = None, accumulation: int = 1, max_steps: int = 0) -> Context:
    """What a method's own pre-training phase (SMT's warm-up) uses: a stream of its own, seeded apart from
    the training stream, so the training batches do not depend on the method; each rank gets its share."""
    world = world or World.current()
    warm_stream = BatchStream(train_ex, batch_size, pad_id, seed=seed + 10_000, rank=world.rank,
                              world_size=world.world_size)

    def batches(n):
        for _ in range(n):
            yield {k: v.to(dev) for k, v in next(warm_stream).items()}

    def loss(m, batch):
        with autocast_for(dev):
            return forward_loss(m, batch)

    return Context(batches=batches, loss=loss, device=dev, world=world, accumulation=accumulation, seed=seed,
                   max_steps=max_steps)


def _command() -> str:
    """This job's own command line: under a sweep or submitit, sys.argv is the sweep's or submitit's."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return " ".join(["python -m smt_bench", *HydraConfig.get().overrides.task])
    return " ".join(sys.argv)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class RunFailed(Exception):
    """The run ended as diverged, oom or failed; its result file says how (a sweep goes on). `agreed`: every
    rank ended the same way (a divergence reads the loss reduced over ranks), so the ranks can go on to
    the next job together; otherwise a multi-rank process must exit (torchrun then stops the others)."""

    def __init__(self, msg: str, agreed: bool = False):
        super().__init__(msg)
        self.agreed = agreed


def execute(cfg: DictConfig, prep: Prepared | None = None) -> RunResult | None:
    """Validates (UserError on bad input; `prep`: what the preflight already built for this config), then runs
    or resumes; returns the result (None if skipped).

    Ends: finished; preempted (Preempted, after a checkpoint); diverged / oom / failed (RunFailed, recorded);
    cancelled (KeyboardInterrupt). A run killed outright leaves its file `running` and its last checkpoint.

    One process at a time: before its checkpoints are loaded or removed, rank 0 takes the run's lease
    (smt_bench/lease.py; results.lease_s, 0: none) and gives it back at every ending; RunHeld (nothing written)
    if the run is live in another process. Each process is an attempt (`run_info.attempts`): the attempts of an
    unfinished file of this run are carried over when it resumes (results.resume), `created_at` stays the first
    one's start and `wall_time_s` is their total.
    """
    init_world()  # torchrun's or SLURM's ranks (a no-op in one process); submitit jobs start here
    prep = prep if prep is not None else Prepared(cfg)
    world = prep.world
    if _skip_finished(cfg, prep, world):
        return None
    leased = bool(cfg.results.lease_s)  # the same on every rank
    lease = _take_lease(prep, float(cfg.results.lease_s), world) if leased else None  # RunHeld: live elsewhere
    try:
        if leased and _skip_finished(cfg, prep, world):  # it finished while we looked
            return None
        return _execute(cfg, prep, world)
    finally:
        if lease is not None:
            lease.release()


def _skip_finished(cfg: DictConfig, prep: Prepared, world: World) -> bool:
    if world.broadcast(cfg.results.skip_finished and finished(prep.path)):  # rank 0 decides for all
        if world.is_main:
            print(f"[smt-bench] {prep.path} already finished; skipping (results.skip_finished=false to rerun)")
        return True
    return False


def _take_lease(prep: Prepared, lease_s: float, world: World) -> Lease | None:
    """Rank 0 takes the run's lease (smt_bench/lease.py) and tells the others: RunHeld on every rank if another
    live process holds it."""
    lease, outcome = None, None
    if world.is_main:
        try:
            lease = Lease.acquire(prep.path, lease_s)
        except RunHeld as e:
            outcome = ("held", str(e))
        except BaseException as e:
            outcome = ("error", f"{type(e).__name__}: {e}")
            world.broadcast(outcome)
            raise
    outcome = world.broadcast(outcome)
    if outcome is not None and outcome[0] == "held":
        raise RunHeld(outcome[1])
    if outcome is not None:
        raise RuntimeError(f"rank 0 could not take the lease of {prep.path}: {outcome[1]}")
    return lease


def _earlier_attempts(path: Path, run_id: str) -> tuple[list[Attempt], str | None]:
    """The attempts recorded in an unfinished result file of this run (the earlier ones of the run this process
    resumes) and its first start; ([], None) if there is none. An attempt that never said how it ended (killed
    outright) reads `killed`; a file from before attempts were recorded gives one attempt from its run_info."""
    try:
        old = RunResult.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, SchemaError):
        return [], None
    info = old.run_info
    if info.status == "finished" or info.id != run_id:
        return [], None
    if info.attempts is not None:
        attempts = [a.model_copy(update={"ended": "killed"}) if a.ended == "running" else a for a in info.attempts]
    else:
        attempts = [Attempt(started_at=info.created_at, ended_at=info.updated_at or info.created_at,
                            host=old.meta_info.hostname, pid=None, scheduler_job=None, from_step=None,
                            to_step=info.checkpoint_step or 0,
                            ended="killed" if info.status == "running" else info.status,
                            wall_time_s=info.wall_time_s or 0.0)]
    return attempts, info.created_at


def _execute(cfg: DictConfig, prep: Prepared, world: World) -> RunResult:
    """execute's run, once the lease is ours."""
    ckpts = CheckpointDir(checkpoint_dir(prep.path))
    if not cfg.results.resume and world.is_main:
        ckpts.remove()
    world.barrier()
    # the earlier attempts of an unfinished run this one resumes (its file on rank 0, who writes it)
    earlier, first_start = (_earlier_attempts(prep.path, prep.run_id) if cfg.results.resume and world.is_main
                            else ([], None))
    logger = _build(cfg.logger, "logger") if world.is_main else NullLogger()  # side effects: rank 0 only
    start = _now()
    result = RunResult(
        schema_version=SCHEMA_VERSION,
        run_info=RunInfo(id=prep.run_id, created_at=first_start or start, command=_command(), status="running",
                         error=None, checkpoint_step=ckpts.latest_step()),
        config=prep.container,
        meta_info=MetaInfo(**provenance.meta_info(prep.device), hub_kernels=hub_kernels.record(cfg.model.hub_kernels)))
    info = result.run_info
    heartbeat = Heartbeat(prep.path, result, world, earlier, start)
    try:
        recipe = Recipe(prep, logger, ckpts, heartbeat, result.meta_info)
        if recipe.run():
            result.train_info, result.method_info = recipe.train_info, recipe.method_report
            result.eval, result.anatomy = recipe.evaluation, recipe.anatomy
            result.summary = recipe.summarize()
        info.status = "finished"
    except UserError:  # bad input found only once the data is tokenised: one line, exit 2, no result file
        if heartbeat.started and world.is_main:
            prep.path.unlink(missing_ok=True)
        raise
    except TimedOut as e:
        _ended(info, "timed_out", str(e), checkpoint_step=ckpts.latest_step())
        raise
    except Preempted as e:
        _ended(info, "preempted", str(e), checkpoint_step=ckpts.latest_step())
        raise
    except KeyboardInterrupt:
        _ended(info, "cancelled", "KeyboardInterrupt")
        raise
    except Diverged as e:
        _ended(info, "diverged", str(e), diverged_at_step=e.step)
        raise RunFailed(str(e), agreed=True) from None
    except Exception as e:
        oom = isinstance(e, torch.OutOfMemoryError)
        _ended(info, "oom" if oom else "failed", f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        if oom:
            info.batch_size = int(cfg.train.batch_size)
            _release_memory(prep.device)
        raise RunFailed(info.error or "") from e
    finally:
        heartbeat.ended(info.status, int(prep.cfg.train.max_steps) if info.status == "finished" else
                        info.checkpoint_step if info.status in ("preempted", "timed_out") else None)
        unwritten = None
        if info.status != "running" and world.is_main:  # still running: bad input (its file removed)
            try:
                write_json_atomic(prep.path, result.to_json())
                print(run_line(result, prep.path), flush=True)
            except OSError as e:  # a full disk: the file keeps its last state (running) and the checkpoints stay
                unwritten = e
                print(f"smt-bench: error: cannot write {prep.path} ({e}); it still reads running and its "
                      f"checkpoints are kept: the same command resumes once it can write", file=sys.stderr, flush=True)
        logger.finish(result.summary.model_dump(exclude_unset=True) if result.summary else {})
        if unwritten is not None and info.status == "finished":  # nothing recorded it: keep its checkpoints
            raise RunFailed(f"the result could not be written ({unwritten})") from unwritten
    if world.is_main:
        ckpts.remove()  # the result (and export) hold what a finished run keeps
    world.barrier()  # the other ranks wait here while rank 0 evaluates and writes: the next job starts together
    return result


def _ended(info: RunInfo, status: str, error: str, **detail) -> None:
    """How a run that did not finish ended, in its run_info."""
    info.status, info.error = status, error  # type: ignore[assignment]  # a Status; pydantic checks it
    for key, value in detail.items():
        setattr(info, key, value)


class Heartbeat:
    """Keeps the result file saying `running` (and the last checkpoint) while training, so a run killed
    outright is listed by the analysis and rerun by the sweep. Called once when training starts and at every
    checkpoint; rank 0 writes. It keeps this attempt's entry of `run_info.attempts` (after the `earlier` ones
    of the run it resumes) and `run_info.wall_time_s`, the total over them, up to date."""

    def __init__(self, path: Path, result: RunResult, world: World, earlier: list[Attempt] | None = None,
                 started_at: str | None = None):
        self.path, self.result, self.world = path, result, world
        self.started = False
        self.t0 = time.perf_counter()
        info = result.run_info
        step = info.checkpoint_step or 0
        info.attempts = [*(earlier or []), Attempt(
            started_at=started_at or _now(), ended_at=None, host=platform.node(), pid=os.getpid(),
            scheduler_job=scheduler_job(), from_step=step, to_step=step, ended="running", wall_time_s=0.0)]
        self.attempt = info.attempts[-1]

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def resumed_from(self, step: int | None) -> None:
        """The checkpoint this attempt resumed from (after a fallback to an older one), None: the start."""
        self.result.run_info.checkpoint_step = step
        self.attempt.from_step = self.attempt.to_step = step or 0

    def _account(self) -> None:
        info, now = self.result.run_info, _now()
        self.attempt.ended_at, self.attempt.wall_time_s = now, self.elapsed()
        info.updated_at, info.wall_time_s = now, sum(a.wall_time_s for a in info.attempts or [])

    def ended(self, status: str, to_step: int | None = None) -> None:
        """How this attempt ended (the run's status), and the last step it kept (None: its last checkpoint)."""
        self.attempt.ended = status  # type: ignore[assignment]  # a Status; pydantic checks it
        if to_step is not None:
            self.attempt.to_step = to_step
        self._account()

    def __call__(self, step: int | None = None) -> None:
        self.started = True
        if step is not None:
            self.result.run_info.checkpoint_step = self.attempt.to_step = step
        self._account()
        if self.world.is_main:
            write_json_atomic(self.path, self.result.to_json())


def _release_memory(device: torch.device) -> None:
    """After an OOM the next job of the sweep gets the device back."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Recipe:
    """One run as named phases, after torchtune's recipes: `setup_model`, `setup_data`, `prepare_method`,
    `train`, `record_training`, `evaluate`, `measure_anatomy`, `summarize`; `run()` calls them in this order (the
    order is part of what a run computes: the seeds, the forgetting baseline before tuning, the memory baseline
    after the load). Each phase leaves what the next needs on the recipe."""

    def __init__(self, prep: Prepared, logger: Logger, ckpts: CheckpointDir, heartbeat: "Heartbeat", meta: MetaInfo):
        self.prep, self.cfg, self.tc, self.dev = prep, prep.cfg, prep.cfg.train, prep.device
        self.world, self.logger, self.ckpts, self.heartbeat, self.meta = prep.world, logger, ckpts, heartbeat, meta
        self.hub = bool(self.cfg.model.hub_kernels)
        self._merged: torch.nn.Module | None = None

    def merged(self) -> torch.nn.Module:
        """The tuned model with the tuning folded in, made once (a method's merge may consume its tuned model)."""
        if self._merged is None:
            self._merged = self.tuned.merged()
        return self._merged

    def run(self) -> bool:
        """True when this rank has the tuned model and its results (`train_info`, `method_report`, `evaluation`,
        `summarize()`); False on a rank other than 0 under FSDP2 (rank 0 reports)."""
        self.setup_model()
        self.setup_data()
        self.prepare_method()
        if not self.train():
            return False
        self.record_training()
        self.evaluate()
        self.measure_anatomy()
        return True

    def setup_model(self) -> None:
        """Seeds, the base model on its device, and what is measured on it before any tuning."""
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        seed_everything(cfg.seed, self.dev)
        self.logger.start(self.prep.run_id, self.prep.container)
        t0 = time.perf_counter()
        self.model, self.tok = self.prep.source.load(torch.float32, hub_kernels=self.hub)
        self.model.to(self.dev)
        self.meta.hub_kernels = hub_kernels.record(self.hub, self.model)
        self.load_s = time.perf_counter() - t0
        self.nll_before = None
        evaluates = self.prep.eval_plan is not None and self.world.is_main  # evaluation runs on rank 0 alone
        if evaluates and cfg.eval.forgetting.enabled:  # the base model, before any tuning
            from .evaluation.forgetting import measure

            self.nll_before = measure(self.model, self.tok, cfg.eval.forgetting.max_tokens)
        self.mem = PeakMemory(self.dev).mark_baseline()  # every method's peak is measured above the loaded model

    def setup_data(self) -> None:
        """Tokenised training and validation sets, the training stream and the method's own stream."""
        tc, tok, world, prep = self.tc, self.tok, self.world, self.prep
        train_ex = encode(prep.splits.train, tok, tc.max_len, tc.train_on_inputs)
        self.lengths = [len(ex["input_ids"]) for ex in train_ex]  # what the run's own forecast counts with
        val_ex = encode(prep.splits.val, tok, tc.max_len, tc.train_on_inputs)
        self.val_batches = [collate(val_ex[i:i + tc.batch_size], tok.pad_token_id)
                            for i in range(0, len(val_ex), tc.batch_size)][: tc.val_batches]
        if tc.epochs:  # the steps N epochs of the tokenised set take at the global batch (max_steps is unused)
            with open_dict(self.cfg):
                tc.max_steps = math.ceil(tc.epochs * len(train_ex) / (tc.batch_size * tc.grad_accum * world.world_size))
        self.stream = BatchStream(train_ex, tc.batch_size, tok.pad_token_id, seed=self.cfg.seed, rank=world.rank,
                                  world_size=world.world_size)
        self.context = method_context(train_ex, tc.batch_size, tok.pad_token_id, self.cfg.seed, self.dev, world,
                                      tc.grad_accum, int(tc.max_steps))

    def prepare_method(self) -> None:
        """The method applied to the model (or rebuilt from the run's checkpoint), with its parallel strategy;
        its own phase (SMT's warm-up) has its peak memory recorded apart."""
        prep, world = self.prep, self.world
        self.parallel = strategy_for(prep.method, world, self.dev)
        # every rank reads it (results.dir must be a filesystem all ranks see); FSDP2's optimizer state: rank 0
        self.saved = saved = self.ckpts.load(optimizer=self.parallel.optimizer_on_every_rank or world.is_main)
        self.heartbeat.resumed_from(None if saved is None else saved.step)  # after a fallback
        step = world.broadcast(None if saved is None else saved.step)
        if (None if saved is None else saved.step) != step:
            raise RuntimeError(f"rank {world.rank} sees checkpoint step {saved and saved.step} of {self.ckpts.path}, "
                               f"rank 0 sees {step}: results.dir must be on a filesystem every rank shares")
        t0 = time.perf_counter()
        self.mem.start()
        if saved is None:
            self.tuned = prep.method.prepare(self.model, prep.plan, self.context)
        else:
            if world.is_main:
                print(f"[smt-bench] resuming {prep.path.name} from its checkpoint at step {saved.step}", flush=True)
            self.tuned = prep.method.resume(self.model, prep.plan, self.context, saved.tuned, saved.tuned_meta)
        if self.hub:  # before any step: nothing the method trains or wraps may sit where a hub kernel replaces a forward
            hub_kernels.check(self.tuned.model, prep.method.name)
        self.prepare_peak = int(world.reduce_floats([self.mem.stop()], "max")[0])  # the fullest rank's
        self.prepare_s = time.perf_counter() - t0
        self.n_trainable = sum(p.numel() for p in self.tuned.trainable_parameters())
        if self.n_trainable != prep.plan.achieved_params:
            raise RuntimeError(f"{prep.method.name} planned {prep.plan.achieved_params} trainable params "
                               f"but the model has {self.n_trainable}")
        from .forecast.record import for_run

        # what the forecast says of this run, from its shapes, plan and token lengths: recorded beside what it measures
        self.forecast = for_run(prep, self.lengths, int(self.tc.max_steps), world.world_size, self.parallel.name)

    def train(self) -> bool:
        """The training loop (checkpoints through the heartbeat); then the whole, plain model on rank 0.
        False on the ranks that have no model to report."""
        def save(ckpt) -> None:  # called on rank 0
            self.ckpts.save(ckpt)
            self.heartbeat(ckpt.step)

        self.heartbeat()
        if self.world.rank:  # the same init on every rank (above); from here each rank draws its own dropout masks
            torch.manual_seed(self.cfg.seed + 1_000_003 * self.world.rank)
        self.loop = train(self.tuned, self.stream, self.val_batches, self.tc, self.dev, self.logger, self.mem,
                                save=save, resume=self.saved, parallel=self.parallel)
        # the model rank 0 reports, exports and evaluates: whole (FSDP2 gathers it), plain (no DDP wrapper)
        self.tuned = self.parallel.gather(
            self.tuned, lambda: self.prep.source.load(torch.float32, hub_kernels=self.hub)[0].to(self.dev))
        return self.tuned is not None

    def record_training(self) -> None:
        """The budget, times and parallel layout beside the loop's figures; the method's report and export."""
        prep, tc, world = self.prep, self.tc, self.world
        N = prep.shapes.total_params
        self.train_info = TrainInfo.model_validate({**self.loop,
            "trainable_params_target": prep.target,
            "trainable_params": self.n_trainable,
            "trainable_pct_target": 100.0 * prep.target / N,
            "trainable_pct": 100.0 * self.n_trainable / N,
            "base_params": N,
            "plan": prep.plan.detail,
            "load_time_s": self.load_s,
            "prepare_time_s": self.prepare_s,
            "prepare_peak_memory_bytes": self.prepare_peak,
            "distributed": world.describe(self.parallel.name, tc.batch_size, tc.grad_accum),
            "global_batch": tc.batch_size * tc.grad_accum * world.world_size,
            "forecast": self.forecast,
        })
        self.method_report = dict(self.tuned.report())
        if self.cfg.results.export:  # beside the result file, named like it
            out_dir = prep.path.with_suffix("")
            out_dir.mkdir(parents=True, exist_ok=True)
            self.method_report["exported"] = self.tuned.export(str(out_dir), self.cfg.model.name)

    def evaluate(self) -> None:
        """The suite on the tuned model (merged unless eval.merge=false), forgetting against the base model,
        the samples beside the result file."""
        prep, cfg = self.prep, self.cfg
        self.evaluation: Evaluation | None = None
        if prep.eval_plan is None:
            return
        from .evaluation.forgetting import forgetting_entry, measure
        from .evaluation.harness import evaluate_suite, write_samples

        model, evaluated = (self.tuned.model, "tuned (unmerged)") if not cfg.eval.merge else (self.merged(), "merged")
        ec = cfg.eval
        evaluation = evaluate_suite(model, self.tok, prep.eval_plan, batch_size=ec.batch_size,
                                    max_new_tokens=ec.max_new_tokens, num_beams=ec.num_beams,
                                    keep_samples=cfg.results.keep_samples)
        evaluation["model_evaluated"] = evaluated
        if self.nll_before is not None:
            evaluation["forgetting"] = forgetting_entry(self.nll_before, measure(model, self.tok,
                                                                                 ec.forgetting.max_tokens))
        samples = evaluation.pop("samples", None)
        if samples is not None:  # beside the result file, named like it
            path = prep.path.with_name(prep.path.stem + ".samples.jsonl")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_samples(path, samples)
            evaluation["samples_file"] = path.name
        logged = {f"eval/{k}": v for k, v in evaluation["accuracy"].items() if v is not None}
        if "forgetting" in evaluation:
            logged["eval/forgetting_nll_delta"] = evaluation["forgetting"]["delta"]
        self.logger.log(logged, self.tc.max_steps)
        self.evaluation = Evaluation.model_validate(evaluation)

    def measure_anatomy(self) -> None:
        """What the tuning did to the weights (smt_bench/anatomy): the merged model against a fresh load of the base
        model, on rank 0 after evaluation; the per-matrix records beside the result with anatomy.arrays=true."""
        self.anatomy: Anatomy | None = None
        ac = self.cfg.anatomy
        if not ac.enabled or not self.world.is_main:
            return
        from .anatomy import Settings, analyse, write_arrays

        t0 = time.perf_counter()
        base = self.prep.source.load(torch.float32)[0]  # on the host: the device holds only the matrix in hand
        found = analyse(base, self.merged(), Settings.from_config(ac), self.dev)
        del base
        found.wall_s = time.perf_counter() - t0  # the base model's load included: the whole cost to the run
        summary = found.summary()
        if ac.arrays:
            path = self.prep.path.with_name(self.prep.path.stem + ".anatomy.json")
            write_arrays(path, found)
            summary["arrays_file"] = path.name
        self.anatomy = Anatomy.model_validate(summary)
        self.logger.log({"anatomy/intruders": summary["intruders"][f"{ac.epsilon:g}"],
                         "anatomy/delta_rel_norm": summary["delta_rel_norm"]}, self.tc.max_steps)

    def summarize(self) -> Summary:
        """The run's headline numbers (the result's `summary`)."""
        ti, ev = self.train_info, self.evaluation
        return Summary.model_validate({
            "method": self.prep.method.name, "budget_fraction": self.cfg.budget.fraction, "seed": self.cfg.seed,
            "trainable_params": self.n_trainable, "trainable_pct": ti.trainable_pct,
            "final_train_loss": ti.final_train_loss,
            "final_val_loss": ti.val_loss_curve[-1][1] if ti.val_loss_curve else None,
            "mean_accuracy": ev.mean_accuracy if ev else None,
            "eval_protocol": ev.protocol if ev else None,
            "forgetting_nll_delta": ev.forgetting.delta if ev and ev.forgetting else None,
            "intruders": self.anatomy.intruders[f"{self.anatomy.epsilon:g}"] if self.anatomy else None,
            "tokens_per_s": ti.tokens_per_s, "peak_memory_bytes": ti.peak_memory_bytes,
            **self.method_report.get("summary", {}),
        })
