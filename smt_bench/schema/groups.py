"""Schemas of the generic config groups, one dataclass per option file of conf/ (methods declare theirs
in their own modules). A YAML file sets the values; these say what type and range each key takes.

Fields without a default are set by the YAML (MISSING here), so defaults are stated once.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Optional

from omegaconf import MISSING

from ..data.bundled import TASKS as BUNDLED_TASKS
from ..evaluation.suites import SUITES
from .spec import (Valid, above, count, each, invalid, nonempty, one_of, optional, param, subset_of,
                   within)

SEED = Valid(lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 32,
             "an integer in [0, 2^32)")
DEVICE = Valid(lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
               "auto, cpu, cuda or cuda:N")
RELATIVE = Valid(lambda v: isinstance(v, str) and bool(v.strip()) and not PurePath(v).is_absolute()
                 and ".." not in PurePath(v).parts, "a relative path without '..' (a folder under results.dir/runs)")
WANDB_MODES = ("online", "offline", "disabled", "shared")
TAG = Valid(lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+]{0,47}", v) is not None,
            "up to 48 letters, digits, '_', '.' or '+', starting with a letter or digit (it goes into the file name)")


# --- train -------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def usable_schedules() -> tuple[str, ...]:
    """transformers' scheduler names that run with only warm-up and total steps (the trainer's call)."""
    import torch
    from transformers import SchedulerType, get_scheduler

    names = []
    for s in SchedulerType:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        try:
            sched = get_scheduler(s.value, opt, num_warmup_steps=1, num_training_steps=4)
            opt.step()
            sched.step()
        except (TypeError, ValueError):  # needs metrics or scheduler kwargs the trainer does not pass
            continue
        names.append(s.value)
    return tuple(names)


@dataclass
class Train:
    max_steps: int = param(valid=count(1))
    epochs: Optional[float] = param(valid=optional(above(0), "(train.max_steps steps)"))  # set: max_steps unused
    batch_size: int = param(valid=count(1))
    grad_accum: int = param(valid=count(1))
    max_len: int = param(valid=count(2))  # a prompt token and one label at least
    train_on_inputs: bool = MISSING
    schedule: str = param(valid=nonempty())
    warmup_ratio: float = param(valid=within(0, 1))
    max_grad_norm: Optional[float] = param(valid=optional(above(0), "(no clipping)"))
    betas: list[float] = param(valid=each(within(0, 1, hi_open=True), n=2))
    eps: float = param(valid=above(0))
    gradient_checkpointing: bool = MISSING
    eval_every: int = param(valid=count(0))
    val_batches: int = param(valid=count(0))
    log_every: int = param(valid=count(1))
    checkpoint_every: int = param(valid=count(0))  # 0: only when a preemption signal comes

    @staticmethod
    def check_config(node, at: str) -> None:
        if node.schedule not in usable_schedules():
            raise invalid(f"{at}.schedule", node.schedule, "one of transformers' schedulers that need no extra "
                          f"arguments: {', '.join(usable_schedules())}")


# --- eval --------------------------------------------------------------------------------------------

@dataclass
class Forgetting:
    enabled: bool = MISSING
    max_tokens: int = param(valid=count(2))


@dataclass
class Eval:
    suite: str = param(valid=one_of(SUITES))
    enabled: bool = MISSING
    tasks: Optional[list[str]] = param(valid=optional(Valid(lambda v: len(v) > 0, "a non-empty list of task names"),
                                                      "(every task of the suite)"))
    builtin: Optional[list[str]] = param(valid=optional(each(nonempty()), "(none)"))  # names: checked with the hub
    hub: str = param(valid=one_of(("optional", "required")))
    data_dir: Optional[str] = param(valid=optional(nonempty()))
    # a folder of the user's own lm-eval task YAMLs (TaskManager(include_path=...)); its tasks go in eval.tasks
    include_path: Optional[str] = param(None, valid=optional(nonempty(), "(smt-bench's tasks only)"))
    max_new_tokens: int = param(valid=count(1))
    num_beams: int = param(valid=count(1))
    batch_size: int = param(valid=count(1))
    max_examples: Optional[int] = param(valid=optional(count(1), "(no cap)"))
    merge: bool = MISSING
    forgetting: Forgetting = field(default_factory=Forgetting)


# --- anatomy -----------------------------------------------------------------------------------------

@dataclass
class Anatomy:
    enabled: bool = MISSING
    top_k: int = param(valid=count(1))
    epsilon: float = param(valid=within(0, 1, lo_open=True))
    epsilons: list[float] = param(valid=Valid(lambda v: len(v) > 0 and all(
        isinstance(e, (int, float)) and not isinstance(e, bool) and 0 < e <= 1 for e in v),
        "a non-empty list of thresholds in (0, 1]"))
    svd: str = param(valid=one_of(("auto", "exact", "lowrank")))
    exact_max_dim: int = param(valid=count(1))
    base_share: float = param(valid=within(0, 1, lo_open=True))
    spectrum: int = param(valid=count(1))
    check: bool = MISSING
    arrays: bool = MISSING

    @staticmethod
    def check_config(node, at: str) -> None:
        if node.epsilon not in node.epsilons:
            raise invalid(f"{at}.epsilon", node.epsilon, f"one of {at}.epsilons={list(node.epsilons)} (the headline "
                          "count is one of the counted thresholds)")


# --- budget, results, the top level ------------------------------------------------------------------

@dataclass
class Budget:
    fraction: float = param(valid=Valid(within(0, 1, lo_open=True).ok, "a fraction in (0, 1], e.g. 0.01 for 1%"))


@dataclass
class Results:
    dir: str = param(valid=nonempty())
    group: str = param(valid=RELATIVE)
    tag: Optional[str] = param(valid=optional(TAG, "(no tag)"))
    skip_finished: bool = MISSING
    keep_samples: bool = MISSING
    export: bool = MISSING
    resume: bool = MISSING
    # seconds a run's lease lives without renewal (smt_bench/lease.py); 0: no lease
    lease_s: int = param(valid=count(0))


@dataclass
class Config:
    """conf/config.yaml: the groups whose options differ in shape (model, data, logger, method) are
    typed by each option's own schema; the rest here."""

    model: Any = MISSING
    data: Any = MISSING
    train: Train = MISSING
    eval: Eval = MISSING
    logger: Any = MISSING
    budget: Budget = MISSING
    method: Any = MISSING
    seed: int = param(valid=SEED)
    device: str = param(valid=DEVICE)
    threads: Optional[int] = param(valid=optional(count(1), "(torch's default)"))
    anatomy: Anatomy = MISSING
    results: Results = MISSING


# --- model ---------------------------------------------------------------------------------------------

@dataclass
class Model:
    name: str = param(valid=nonempty())
    source: Any = MISSING
    # Hugging Face hub kernels (smt_bench/hub_kernels.py): off, every layer runs transformers' own code;
    # on, transformers may replace layers (RMSNorm, rotary) with kernels fetched from the hub
    hub_kernels: bool = False


@dataclass
class SmolLM2Source:
    _target_: str = "smt_bench.models.SmolLM2GGUF"


@dataclass
class PretrainedSource:
    _target_: str = "smt_bench.models.Pretrained"
    path_or_id: str = param(valid=nonempty())


@dataclass
class TinyLlamaSource:
    _target_: str = "smt_bench.models.TinyLlama"
    hidden_size: int = param(valid=count(1))
    intermediate_size: int = param(valid=count(1))
    num_hidden_layers: int = param(valid=count(1))
    num_attention_heads: int = param(valid=count(1))
    num_key_value_heads: int = param(valid=count(1))
    vocab_size: int = param(49152, count(1))
    tie_word_embeddings: bool = True
    rope_theta: float = param(10000.0, above(0))
    max_position_embeddings: int = param(2048, count(1))

    @staticmethod
    def check_config(node, at: str) -> None:
        heads, kv = node.num_attention_heads, node.num_key_value_heads
        if node.hidden_size % heads or (node.hidden_size // heads) % 2:
            raise invalid(f"{at}.num_attention_heads", heads, f"a divisor of hidden_size={node.hidden_size} "
                          f"that leaves an even head size (rotary embeddings)")
        if heads % kv:
            raise invalid(f"{at}.num_key_value_heads", kv, f"a divisor of num_attention_heads={heads} (GQA)")


# --- data ----------------------------------------------------------------------------------------------

@dataclass
class BundledData:
    _target_: str = "smt_bench.data.bundled.BundledSuite"
    name: str = param(valid=nonempty())
    n_train_per_task: int = param(valid=count(1))
    n_val_per_task: int = param(valid=count(0))
    n_test_per_task: int = param(valid=count(0))
    tasks: Optional[list[str]] = param(valid=optional(subset_of(BUNDLED_TASKS), "(all six)"))
    seed: int = param(valid=SEED)


@dataclass
class LocalData:
    _target_: str = "smt_bench.data.records.LocalJSON"
    name: str = param(valid=nonempty())
    path: str = param(valid=nonempty())
    test_path: Optional[str] = param(valid=optional(nonempty(), "(no test file)"))
    val_size: int = param(valid=count(0))
    max_train: Optional[int] = param(valid=optional(count(1), "(all records)"))
    split_seed: int = param(valid=SEED)


@dataclass
class LLMAdaptersData(LocalData):
    _target_: str = "smt_bench.data.llm_adapters.LLMAdaptersJSON"
    file_name: str = param(valid=nonempty())


# --- logger --------------------------------------------------------------------------------------------

@dataclass
class NoLogger:
    _target_: str = "smt_bench.loggers.NullLogger"


@dataclass
class WandbLogger:
    _target_: str = "smt_bench.loggers.WandbLogger"
    project: str = param(valid=nonempty())
    entity: Optional[str] = param(valid=optional(nonempty(), "(wandb's default entity)"))
    group: Optional[str] = param(valid=optional(nonempty(), "(<results.dir>/<results.group>)"))
    tags: list[str] = param(valid=each(nonempty()))
    mode: Optional[str] = param(valid=optional(one_of(WANDB_MODES), "($WANDB_MODE, else offline)"))


__all__ = ["Config", "Train", "Eval", "Forgetting", "Budget", "Results", "Model", "SmolLM2Source",
           "PretrainedSource", "TinyLlamaSource", "BundledData", "LocalData", "LLMAdaptersData", "NoLogger",
           "WandbLogger", "usable_schedules"]
