"""`RunResult`: the run result file's one typed, versioned schema.

A run writes its result through `RunResult.to_json()` (smt_bench/run.py), the analysis reads every file through
`RunResult.from_json()` (smt_bench/analysis/load.py), `summary.run_line` prints the line a run ends with from
it, and docs/results.md is generated from it (`python -m smt_bench.result > docs/results.md`; a test holds the
page equal to this module). The models are pydantic v2 models: pydantic is already in every install (wandb
needs it), validates nested data with the path of each problem, and keeps the writer and the reader on one
definition.

Conventions: every section forbids keys it does not declare (a new key is declared here first, with its
description), except `summary` (a method adds its own headline keys) and the free-form `config` (typed by the
config schema, smt_bench/schema/) and `method_info` (each method's analysis contribution checks its own
keys). Numbers keep their JSON type (an int stays an int) and must be finite. A file from an older version of
smt-bench reads through `migrations.upgrade` first.
"""
from __future__ import annotations

import json
import math
from typing import Annotated, Any, Final, Literal, Optional, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError, core_schema

SCHEMA_VERSION: Final = 1

# finished: in the statistics; the rest are listed with what they got to
Status = Literal["finished", "failed", "oom", "cancelled", "running", "preempted", "timed_out", "killed", "diverged"]
STATUSES: tuple[str, ...] = get_args(Status)
# status -> (what happened, the exit status of the run's process, what to do next)
STATUS_MEANING = {
    "finished": ("trained (and evaluated); the result is complete", "0", ""),
    "running": ("training; or killed outright before it could say so (its `updated_at` stops moving)", "—",
                "RESUME"),
    "preempted": ("a signal (SLURM preemption, SIGTERM, SIGUSR1/2 without a requeue) ended it after a checkpoint",
                  "128 + the signal", "RESUME (on SLURM the requeue does it)"),
    "timed_out": ("the time limit came and its requeues are used up (`hydra.launcher.max_num_timeout`); "
                  "checkpointed", "124", "RESUME; or raise hydra.launcher.timeout_min or max_num_timeout"),
    "killed": ("the scheduler ended its task and the run could not say so (kill -9, a node failure, host memory); "
               "written by the submitter", "the scheduler's", "RESUME"),
    "diverged": ("the loss was not finite at `diverged_at_step` (that step is not applied)", "1",
                 "rerunning repeats it: change train.lr (a new config is a new run)"),
    "oom": ("out of device memory at `batch_size`", "1",
            "lower train.batch_size and raise train.grad_accum to keep the global batch (a new run)"),
    "failed": ("an exception ended it (`error`, `traceback`)", "1", "fix its cause, then RESUME"),
    "cancelled": ("Ctrl-C", "130", "RESUME"),
}


def next_step(status: str, checkpoint_step: int | None) -> str:
    """What to do with a run that did not finish, in one phrase."""
    resume = ("the same command resumes it from its checkpoint at step "
              f"{checkpoint_step}" if checkpoint_step is not None else "the same command runs it again")
    return STATUS_MEANING[status][2].replace("RESUME", resume)
MEMORY_PARTS = ("weights", "gradients", "optimizer", "activations")


class SchemaError(ValueError):
    """A file is not a run result this version reads; the message names the first problem in one line."""


# --- value kinds: JSON types as they are (an int stays an int), with the project's one-line messages -----
_KIND_NAMES = {"number": "a finite number", "int": "an integer", "str": "a string", "dict": "an object",
               "list": "a list", "null": "null", "bool": "true or false"}


def is_kind(v: Any, kinds: tuple[str, ...]) -> bool:
    if "number" in kinds and isinstance(v, (int, float)) and not isinstance(v, bool):
        return math.isfinite(v) if isinstance(v, float) else True
    if "int" in kinds and isinstance(v, int) and not isinstance(v, bool):
        return True
    return any((k == "str" and isinstance(v, str)) or (k == "dict" and isinstance(v, dict))
               or (k == "list" and isinstance(v, list)) or (k == "null" and v is None)
               or (k == "bool" and isinstance(v, bool)) for k in kinds)


def kind_name(kinds: tuple[str, ...]) -> str:
    return " or ".join(_KIND_NAMES[k] for k in kinds)


class Kinds:
    """Annotated metadata: a value of exactly the JSON kinds named (see is_kind), kept as it is."""

    def __init__(self, *kinds: str):
        self.kinds = kinds

    def check(self, v: Any) -> Any:
        if not is_kind(v, self.kinds):
            raise PydanticCustomError("kind", "is not {expected}", {"expected": kind_name(self.kinds)})
        return v

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        return core_schema.no_info_plain_validator_function(self.check)

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict:
        return {"anyOf": [{"type": _JSON_TYPES[k]} for k in self.kinds]}


_JSON_TYPES = {"number": "number", "int": "integer", "str": "string", "dict": "object", "list": "array",
               "null": "null", "bool": "boolean"}
Number = Annotated[Any, Kinds("number")]
NumberOrNull = Annotated[Any, Kinds("number", "null")]
Int = Annotated[Any, Kinds("int")]
IntOrNull = Annotated[Any, Kinds("int", "null")]
Text = Annotated[Any, Kinds("str")]
TextOrNull = Annotated[Any, Kinds("str", "null")]
Obj = Annotated[Any, Kinds("dict")]
List = Annotated[Any, Kinds("list")]


def require(obj: dict, dotted: str, kinds: tuple[str, ...], *, optional: bool = False) -> Any:
    """obj[dotted] (a dotted path into free-form JSON: `config`, `method_info`) if it is of one of kinds, else
    SchemaError naming the path; None for a missing optional key."""
    cur: Any = obj
    parts = dotted.split(".")
    for i, k in enumerate(parts):
        if not isinstance(cur, dict):
            raise SchemaError(f"{'.'.join(parts[:i])} is not an object")
        if k not in cur:
            if optional:
                return None
            raise SchemaError(f"missing key {dotted}")
        cur = cur[k]
    if cur is None and optional:
        return None
    if not is_kind(cur, kinds):
        raise SchemaError(f"{dotted}={short(cur)} is not {kind_name(kinds)}")
    return cur


def _problem(msg: str) -> PydanticCustomError:
    return PydanticCustomError("schema", "{problem}", {"problem": msg})


def short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


class Part(BaseModel):
    """A section of the result: its keys are declared (typed, described) or refused."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


def doc(text: str, *, since: str | None = None) -> Any:
    return Field(description=text + (f" (since {since})" if since else ""))


# --- the sections -------------------------------------------------------------------------------
class Attempt(Part):
    """One process's go at the run: the first start, and each resume after a preemption, a time limit, a
    failure or a kill (`run_info.attempts`, in order)."""
    started_at: Text = Field(description="when it started (UTC, ISO 8601)")
    ended_at: TextOrNull = Field(None, description="when it ended; while it runs, its last write of the file (an "
                                                   "attempt killed outright: its last sign of life)")
    host: Text = Field(description="the machine (rank 0's)")
    pid: IntOrNull = Field(description="its process id (rank 0's); null: not recorded (a file written before "
                                       "attempts were)")
    scheduler_job: TextOrNull = Field(description="SLURM's `<array job>_<task>` or job id; null outside a "
                                                  "scheduler")
    from_step: IntOrNull = Field(description="the checkpoint step it resumed from (0: from the start; null: not "
                                             "recorded)")
    to_step: Int = Field(description="the last step it kept: its last checkpoint (its `from_step` if it saved "
                                     "none), or the last step when it finished")
    ended: Status = Field(description="how it ended: the run's status when it did; `killed` for an earlier "
                                      "attempt that ended without saying so (kill -9, a lost node: the next "
                                      "attempt took over); `running` while it runs")
    wall_time_s: Number = Field(description="seconds from its start to its end (or its last write)")


class RunInfo(Part):
    id: Text = Field(description="the run id: sha256 of the resolved config without `results`, `logger` and "
                                 "`train.checkpoint_every`, plus `distributed.world_size` above one rank (12 hex; "
                                 "older forms: smt_bench/migrations.py)")
    created_at: Text = Field(description="when the run's first attempt started (UTC, ISO 8601)")
    command: Text = Field(description="this job's own command line (its overrides, also inside a sweep)")
    status: Status = Field(description="how the run ended, or `running` while it trains (or after it was killed "
                                       "outright): [running.md](running.md#checkpoints-resume-and-failures)")
    error: TextOrNull = Field(None, description="what ended a run that did not finish (one line first)")
    checkpoint_step: IntOrNull = Field(None, description="the last checkpoint's step (running, preempted: the "
                                                         "same command resumes from it; null: none yet)")
    traceback: TextOrNull = Field(None, description="the traceback of a failed or oom run")
    diverged_at_step: IntOrNull = Field(None, description="the step whose loss was not finite (diverged)")
    batch_size: IntOrNull = Field(None, description="the per-rank batch that ran out of memory (oom)")
    wall_time_s: NumberOrNull = Field(None, description="seconds of every attempt together: the sum of "
                                                        "`attempts[].wall_time_s` (older files: the last attempt's "
                                                        "alone)")
    updated_at: TextOrNull = Field(None, description="the last write of this file (UTC); older files: "
                                                     "`created_at`")
    attempts: Optional[list[Attempt]] = Field(None, description="each attempt in order, the current one last "
                                                                "(below); absent in older files")


class MemoryBreakdown(Part):
    weights: NumberOrNull = Field(None, description="bytes of the model's parameters")
    gradients: NumberOrNull = Field(None, description="bytes of the trainable parameters' gradients")
    optimizer: NumberOrNull = Field(None, description="bytes of the optimizer state")
    activations: NumberOrNull = Field(None, description="bytes saved for backward in one training step")
    activations_note: TextOrNull = Field(None, description="how `activations` was measured")


class ForecastInfo(Part):
    """What the forecast (smt_bench/forecast/, docs/forecast.md) said of this run before it trained, from its
    shapes, plan and token lengths, beside what it measured: `peak_memory_bytes`, `median_step_time_s` and
    `prepare_peak_memory_bytes` compare with train_info's keys of the same names."""
    version: Text = Field(description="the forecast's version (`smt-bench forecast N`)")
    device: TextOrNull = Field(None, description="the device profile it used (the run's own device)")
    peak_memory_bytes: NumberOrNull = Field(None, description="forecast peak above the loaded model, the fullest "
                                                              "rank's (as train_info.peak_memory_bytes)")
    total_memory_bytes: NumberOrNull = Field(None, description="forecast peak with the base weights")
    phase: TextOrNull = Field(None, description="the step's phase at the forecast peak (loss, forward temporary, end "
                                                "of backward, optimizer step)")
    memory_breakdown_bytes: Optional[Obj] = Field(None, description="the forecast peak by part (weights, added, "
                                                                    "gradients, optimizer, optimizer_step, "
                                                                    "activations, logits, cast_copies, method, "
                                                                    "parallel, overhead, ...)")
    prepare_peak_memory_bytes: NumberOrNull = Field(None, description="forecast peak of the method's own phase (SMT's "
                                                                      "warm-up), as train_info's")
    median_step_time_s: NumberOrNull = Field(None, description="forecast seconds per optimizer step (null: no "
                                                               "profile of this device)")
    flops_per_step: NumberOrNull = Field(None, description="forecast FLOPs of one optimizer step, one rank")
    seq_len: Optional[Obj] = Field(None, description="the sequence lengths counted: `memory` (the longest the run is "
                                                     "expected to draw) and `time` (a batch's expected longest)")
    notes: Optional[List] = Field(None, description="where the forecast is approximate for this method")
    error: TextOrNull = Field(None, description="why there is no forecast (it never stops a run)")


class TrainInfo(Part):
    """In the order a run writes them; the keys marked required are what the statistics use."""
    steps: IntOrNull = Field(None, description="optimizer steps")
    resumed_from_step: IntOrNull = Field(None, description="the checkpoint step this attempt resumed from (null: "
                                                           "from the start)")
    loss_curve: Optional[List] = Field(None, description="the training loss of every step")
    val_loss_curve: Optional[List] = Field(None, description="[step, validation loss] pairs")
    final_train_loss: NumberOrNull = Field(None, description="the mean training loss of the last 5 steps")
    train_time_s: NumberOrNull = Field(None, description="seconds of training over every attempt, checkpoint "
                                                         "saves excluded")
    checkpoints: IntOrNull = Field(None, description="checkpoints saved")
    checkpoint_time_s: NumberOrNull = Field(None, description="seconds spent saving checkpoints")
    median_step_time_s: NumberOrNull = Field(description="the median optimizer step's seconds")
    tokens: IntOrNull = Field(None, description="training tokens (padding excluded)")
    tokens_per_s: NumberOrNull = Field(description="training tokens per second of train_time_s")
    peak_memory_bytes: NumberOrNull = Field(
        description="peak during training, above the footprint right after the model loaded: CUDA allocator "
                    "peak, or on CPU peak RSS (VmHWM) after `malloc_trim`, so a method's own tensors count (CPU RSS "
                    "also holds freed blocks glibc keeps: fine for the large gaps between methods, coarse for tens "
                    "of MiB; [results/bench/README.md](../results/bench/README.md)); under several ranks the "
                    "fullest rank's")
    peak_memory_kind: TextOrNull = Field(None, description="what peak_memory_bytes measures (cuda_allocator_peak, "
                                                           "cpu_peak_rss_growth)")
    memory_breakdown_bytes: Optional[MemoryBreakdown] = Field(None, description="rank 0's memory by part")
    trainable_params_target: Int = Field(description="the budget in parameters: round(fraction × base_params)")
    trainable_params: Int = Field(description="parameters that train (counted on the tuned model)")
    trainable_pct_target: Number = Field(description="the budget as a % of base_params")
    trainable_pct: Number = Field(description="trainable_params as a % of base_params")
    base_params: Int = Field(description="the base model's parameters")
    plan: Optional[Obj] = Field(None, description="the method's budget plan (rank / blocks per projection)")
    load_time_s: NumberOrNull = Field(None, description="seconds to load the base model")
    prepare_time_s: NumberOrNull = Field(None, description="seconds of the method's prepare phase (SMT's warm-up)")
    prepare_peak_memory_bytes: NumberOrNull = Field(None, description="peak of the prepare phase above the same "
                                                                      "baseline (the fullest rank's)")
    distributed: Optional[Obj] = Field(None, description="`world_size`, `backend`, `strategy` (single / ddp / "
                                                         "fsdp2), `per_rank_batch`, `grad_accum`, `global_batch`; "
                                                         "older files: one process")
    global_batch: IntOrNull = Field(None, description="sequences per optimizer step over every rank")
    forecast: Optional[ForecastInfo] = Field(None, description="what the forecast said of this run before it "
                                                               "trained (below); absent in older files")


class Forgetting(Part):
    nll_before: NumberOrNull = Field(None, description="the base model's mean NLL on the held-out text")
    nll_after: NumberOrNull = Field(None, description="the evaluated model's mean NLL on the same text")
    delta: NumberOrNull = Field(None, description="nll_after − nll_before (positive: forgot)")
    tokens: IntOrNull = Field(None, description="tokens scored")
    passages: IntOrNull = Field(None, description="passages scored")
    protocol: TextOrNull = Field(None, description="how the NLL is measured")
    sample: TextOrNull = Field(None, description="which text was scored (its name, version and license)")
    wall_s: NumberOrNull = Field(None, description="seconds of both measurements")


class Evaluation(Part):
    suite: TextOrNull = Field(None, description="the eval suite (eval.suite)")
    protocol: Text = Field(description="the protocol every number in `accuracy` comes from")
    accuracy: dict[str, NumberOrNull] = Field(description="accuracy per task, % (null: a task that could not "
                                                          "be scored)")
    stderr: Optional[dict[str, NumberOrNull]] = Field(None, description="standard error per task, %")
    n: Optional[dict[str, Any]] = Field(None, description="items scored per task")
    mean_accuracy: NumberOrNull = Field(description="the unweighted mean over `mean_over` (null if a task has "
                                                    "none)")
    mean_over: Optional[List] = Field(None, description="the tasks the mean is over")
    protocols: Optional[Obj] = Field(None, description="the protocol of each task")
    metrics: Optional[Obj] = Field(None, description="lm-eval's raw metrics per task")
    wall_s: NumberOrNull = Field(None, description="seconds of evaluation")
    lm_eval: Optional[Obj] = Field(None, description="lm-eval's version, task names and versions, batch size, "
                                                     "decoding")
    data_dir: TextOrNull = Field(None, description="the folder of the suite's local test files")
    include_path: TextOrNull = Field(None, description="eval.include_path: the user's own lm-eval task folder")
    other_protocols: Optional[Obj] = Field(None, description="tasks scored another way (e.g. lm-eval's built-in "
                                                             "gsm8k), apart from the headline")
    skipped: Optional[Obj] = Field(None, description="tasks of the suite left out, with why")
    model_evaluated: TextOrNull = Field(None, description="merged, or tuned (unmerged) with eval.merge=false")
    forgetting: Optional[Forgetting] = Field(None, description="NLL of the base and the evaluated model on the "
                                                               "same text")
    samples_file: TextOrNull = Field(None, description="with results.keep_samples: `<result>.samples.jsonl` "
                                                       "beside the result")


class ProjectionAnatomy(Part):
    tensors: Int = Field(description="changed tensors of this kind")
    energy_share: Number = Field(description="their share of the whole update's ‖ΔW‖²")
    delta_rel_norm: Number = Field(description="‖ΔW‖_F / ‖W₀‖_F over them")
    intruders: IntOrNull = Field(None, description="intruder dimensions at `epsilon`, summed (matrices only)")
    stable_rank: NumberOrNull = Field(None, description="median stable rank of ΔW over them (matrices only)")
    effective_rank: NumberOrNull = Field(None, description="median effective rank of ΔW over them (matrices only)")


class Anatomy(Part):
    """What the tuning did to the weights: the merged model against the base model, every changed tensor
    (smt_bench/anatomy, docs/anatomy.md). Absent with anatomy.enabled=false and in older files."""
    protocol: Text = Field(description="what is compared and how")
    svd: List = Field(description="the decompositions used: exact and/or lowrank (anatomy.svd)")
    top_k: Int = Field(description="the tuned matrix's top singular vectors tested for intruders (the paper's k)")
    epsilon: Number = Field(description="the headline threshold ε of `intruders`")
    epsilons: List = Field(description="every ε counted")
    changed_tensors: Int = Field(description="tensors the tuning changed")
    unchanged_tensors: Int = Field(description="tensors it left bit-identical")
    matrices: Int = Field(description="changed 2-D tensors (the spectra and intruders are theirs)")
    intruders: dict[str, Int] = Field(description="intruder dimensions summed over the changed matrices, per ε")
    matrices_with_intruders: Int = Field(description="changed matrices with at least one intruder at `epsilon`")
    similarity_mean: NumberOrNull = Field(description="mean over the matrices' top-k vectors of their largest "
                                                      "|cos| with a base singular vector")
    delta_rel_norm: Number = Field(description="‖ΔW‖_F / ‖W₀‖_F over every changed tensor")
    stable_rank: NumberOrNull = Field(description="median over matrices of ‖ΔW‖²_F / σ₁²")
    effective_rank: NumberOrNull = Field(description="median over matrices of exp(entropy of σ / Σσ)")
    top_energy: dict[str, NumberOrNull] = Field(description="mean over matrices of the share of ‖ΔW‖²_F in ΔW's top "
                                                            "1, 4, 16 directions")
    by_projection: dict[str, ProjectionAnatomy] = Field(description="per tensor kind (q_proj, …, embed_tokens, "
                                                                    "input_layernorm)")
    by_layer: dict[str, Number] = Field(description="share of ‖ΔW‖² per decoder layer (`outside`: embeddings, "
                                                    "final norm, head)")
    spectrum: dict[str, List] = Field(description="per matrix kind, the mean over its matrices of the energy share "
                                                  "σᵢ² / ‖ΔW‖²_F of ΔW's top directions (anatomy.spectrum)")
    wall_s: Number = Field(description="seconds, the base model's load included")
    lowrank_check: Optional[Obj] = Field(None, description="with anatomy.check: on the exact matrices, lowrank's "
                                                           "similarity error against exact, both counts per ε, the "
                                                           "matrices counted differently, the seconds of each")
    arrays_file: TextOrNull = Field(None, description="with anatomy.arrays: `<result>.anatomy.json` beside the "
                                                      "result, every changed tensor's record")


class Summary(Part):
    """The run's headline numbers; a method adds its own (SMT: `block_share` per projection)."""
    model_config = ConfigDict(extra="allow")
    method: TextOrNull = Field(None, description="method.name")
    budget_fraction: NumberOrNull = Field(None, description="budget.fraction")
    seed: IntOrNull = Field(None, description="seed")
    trainable_params: IntOrNull = Field(None, description="as in train_info")
    trainable_pct: NumberOrNull = Field(None, description="as in train_info")
    final_train_loss: NumberOrNull = Field(None, description="as in train_info")
    final_val_loss: NumberOrNull = Field(None, description="the last validation loss")
    mean_accuracy: NumberOrNull = Field(None, description="as in eval")
    eval_protocol: TextOrNull = Field(None, description="eval.protocol")
    forgetting_nll_delta: NumberOrNull = Field(None, description="eval.forgetting.delta")
    intruders: IntOrNull = Field(None, description="anatomy.intruders at anatomy.epsilon")
    tokens_per_s: NumberOrNull = Field(None, description="as in train_info")
    peak_memory_bytes: NumberOrNull = Field(None, description="as in train_info")


class MetaInfo(Part):
    git: Obj = Field(description="`sha` and `dirty` of the code that ran")
    versions: Obj = Field(description="python, torch, transformers, peft, lm-eval and the other packages")
    lock: Optional[Obj] = Field(None, description="the lock's file, `sha256` and `deviations` (installed versions "
                                                  "that differ from it)")
    device: Obj = Field(description="device type and name, torch threads")
    argv: List = Field(description="the process's command line (a sweep's or submitit's inside a job)")
    hostname: Text = Field(description="the machine")
    hub_kernels: Optional[Obj] = Field(None, description="`enabled`, `kernels_version`, `layers` when on")


class RunResult(Part):
    """One run's result file."""
    schema_version: Literal[1] = Field(description="this schema's version")
    run_info: RunInfo = Field(description="the run's identity and how it ended")
    config: Obj = Field(description="the resolved Hydra config (every group; docs/config.md)")
    meta_info: MetaInfo = Field(description="what ran it")
    train_info: Optional[TrainInfo] = Field(None, description="the budget, the loop's figures, times and memory "
                                                              "(finished runs)")
    method_info: Optional[Obj] = Field(None, description="what the method reports: SMT's `block_map` ([layer, "
                                                         "projection, row_block, col_block]), `block_share`, "
                                                         "`eligible_blocks` and `selected_blocks` per projection, "
                                                         "`saved_input` per layer, warm-up info, `kernels_backend`; "
                                                         "`exported` files with results.export=true")
    eval: Optional[Evaluation] = Field(None, description="the suite's scores on the tuned model (null or absent: "
                                                         "eval.enabled=false)")
    anatomy: Optional[Anatomy] = Field(None, description="what the tuning did to the weights (finished runs with "
                                                         "anatomy.enabled)")
    summary: Optional[Summary] = Field(None, description="the run's headline numbers")

    @model_validator(mode="after")
    def _rules(self) -> "RunResult":
        """What names the run in its config; what each status must hold: a finished run its train_info, the
        others what the failure table reports (where a run diverged, its last checkpoint)."""
        named = {"config": self.config}
        try:
            for key in ("method.name", "model.name", "data.name"):
                require(named, f"config.{key}", ("str",))
            frac = require(named, "config.budget.fraction", ("number",))
            require(named, "config.seed", ("int",))
        except SchemaError as e:
            raise _problem(str(e)) from None
        if not 0 < frac <= 1:
            raise _problem(f"config.budget.fraction={frac} is not in (0, 1]")
        status, info = self.run_info.status, self.run_info
        if status == "finished" and self.train_info is None:
            raise _problem("missing key train_info")
        if status == "diverged" and "diverged_at_step" not in info.model_fields_set:
            raise _problem("missing key run_info.diverged_at_step")
        if status in ("running", "preempted", "timed_out") and "checkpoint_step" not in info.model_fields_set:
            raise _problem("missing key run_info.checkpoint_step")
        return self

    # --- reading and writing ---------------------------------------------------------------------
    @classmethod
    def from_json(cls, obj: Any) -> "RunResult":
        """A parsed result file -> RunResult (older files upgraded first); SchemaError names the first
        problem in one line."""
        from .migrations import upgrade

        if not isinstance(obj, dict):
            raise SchemaError("top level is not a JSON object")
        sv = obj.get("schema_version")
        if sv is None:
            raise SchemaError("missing key schema_version (not a smt-bench run file?)")
        if sv != SCHEMA_VERSION:
            raise SchemaError(f"schema_version {short(sv)} is not supported (this analysis reads {SCHEMA_VERSION})")
        try:
            return cls.model_validate(upgrade(obj))
        except ValidationError as e:
            raise SchemaError(first_problem(e)) from None

    def to_json(self) -> dict:
        """The file's content: every key that was set (null included), in the order declared here."""
        return self.model_dump(mode="python", exclude_unset=True)

    @property
    def finished(self) -> bool:
        return self.run_info.status == "finished"


def first_problem(e: ValidationError) -> str:
    """pydantic's first error as the project's one line: `missing key a.b`, `a.b=<value> is not <kind>`."""
    err = e.errors(include_url=False)[0]
    path = ".".join(str(p) for p in err["loc"])
    kind, value = err["type"], err.get("input")
    if kind == "schema":
        return err["msg"]
    if kind == "missing":
        return f"missing key {path}"
    if kind == "extra_forbidden":
        return f"unknown key {path} (not in the result schema: smt_bench/result.py)"
    if kind == "literal_error":
        expected = ", ".join(STATUSES) if path == "run_info.status" else err["msg"].split("Input should be ")[-1]
        return f"{path}={value!r} is not one of {expected}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"{path} is not an object" if path else "top level is not a JSON object"
    if kind == "kind":
        return f"{path}={short(value)} {err['msg']}"
    return f"{path}={short(value)}: {err['msg']}"


# --- the schema page ---------------------------------------------------------------------------
SECTIONS = (("run_info", RunInfo), ("run_info.attempts[]", Attempt), ("meta_info", MetaInfo), ("train_info", TrainInfo),
            ("train_info.memory_breakdown_bytes", MemoryBreakdown), ("train_info.forecast", ForecastInfo),
            ("eval", Evaluation),
            ("eval.forgetting", Forgetting), ("anatomy", Anatomy), ("anatomy.by_projection.*", ProjectionAnatomy),
            ("summary", Summary))


_TYPE_WORDS = {"number": "number", "int": "integer", "str": "string", "dict": "object", "list": "list",
               "null": "null", "bool": "boolean"}


def _type_text(annotation: Any, metadata: list | None = None) -> str:
    kinds = next((m for m in metadata or [] if isinstance(m, Kinds)), None)  # pydantic keeps Annotated's here
    if kinds is not None:
        return " or ".join(_TYPE_WORDS[k] for k in kinds.kinds)
    if get_origin(annotation) is Annotated:
        return _type_text(Any, list(annotation.__metadata__))
    if get_origin(annotation) is Literal:
        return " / ".join(map(str, get_args(annotation)))
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is dict:
        return f"object of {_type_text(args[1])}"
    if get_origin(annotation) is list:
        return f"list of {_type_text(args[0])}"
    if args and len(args) < len(get_args(annotation)):  # Optional[X]
        return f"{_type_text(args[0])} or null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object (below)"
    return "any"


def _table(model: type[BaseModel]) -> list[str]:
    rows = ["| key | type | required | content |", "| --- | --- | --- | --- |"]
    for name, f in model.model_fields.items():
        rows.append(f"| `{name}` | {_type_text(f.annotation, f.metadata)} | {'yes' if f.is_required() else ''} | "
                    f"{f.description or ''} |")
    return rows


def schema_page() -> str:
    """docs/results.md, generated from the models above."""
    out = ["# The result schema", "",
           "<!-- generated by `python -m smt_bench.result > docs/results.md` from smt_bench/result.py; "
           "tests/test_result.py holds it equal -->", "",
           "One JSON per run at `<results.dir>/runs/<results.group>/<method>[-<tag>]-b<fraction>-s<seed>-<id>.json` "
           "(`results.dir` defaults to `outputs/results`; the tag is `results.tag`, when set), written atomically "
           "(temp file + rename) through `RunResult` (smt_bench/result.py), a pydantic model: the run writes it, "
           "the analysis reads it ([analysis.md](analysis.md)), and this page is generated from it. Statuses and "
           "checkpoints: [running.md](running.md#checkpoints-resume-and-failures).", "",
           f"`schema_version` is {SCHEMA_VERSION}. Every section refuses keys it does not declare, except "
           "`summary` (a method adds its own headline keys), `config` and `method_info`. Numbers keep their JSON "
           "type and must be finite. A finished run must hold `train_info` with its required keys; a diverged "
           "run `run_info.diverged_at_step`; a running, preempted or timed-out run `run_info.checkpoint_step` (null before "
           "the first checkpoint). Files written by older versions read through `smt_bench/migrations.py`, "
           "each rule with the commit it came from.", "", "## Statuses", "",
           "`run_info.status`, the exit status of the run's process (a sweep exits 1 if any run did not finish), and "
           "what to do next (the line a run ends with says it too):", "",
           "| status | what happened | exit | next |", "| --- | --- | --- | --- |"]
    out += [f"| `{s}` | {what} | {code} | {next_step(s, None).replace('runs it again', 'resumes it from its checkpoint (or runs it again)') or '—'} |"
            for s, (what, code, _) in STATUS_MEANING.items()]
    out += ["", "## The file", ""]
    out += _table(RunResult)
    for name, model in SECTIONS:
        out += ["", f"## `{name}`", ""]
        if model.__doc__ and model in (Summary, ForecastInfo, Anatomy):
            out += [" ".join(model.__doc__.split()), ""]
        out += _table(model)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(schema_page(), end="")
