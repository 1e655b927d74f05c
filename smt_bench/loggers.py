"""Metric loggers: none by default; wandb optional and offline-safe.

A logger is started with the run's id and its resolved config (a plain dict), so whatever it names or
tags is read from that config and callers pass nothing else.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

WANDB_GROUP_MAX = 128  # wandb's limit on a group name


class Logger(Protocol):
    """What the run and the trainer call on a logger (conf/logger/*.yaml builds one; any class with these
    three methods is one): `start` once, `log` a step's metrics any number of times, `finish` once."""

    def start(self, run_id: str, config: dict[str, Any]) -> None: ...

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def finish(self, summary: Mapping[str, Any]) -> None: ...


class NullLogger:
    def start(self, run_id: str, config: dict[str, Any]) -> None:
        pass

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def finish(self, summary: Mapping[str, Any]) -> None:
        pass


def _at(config: dict[str, Any], dotted: str) -> Any:
    """config["a"]["b"] for "a.b", or None where a key is missing (a partial config, e.g. from a script)."""
    for key in dotted.split("."):
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def run_name(run_id: str, config: dict[str, Any]) -> str:
    """method[-tag]-budget-model-seed, e.g. smt-b0.01-smollm2-135m-s0 (the result file's name, plus the model)."""
    method, tag, frac, model, seed = (_at(config, k) for k in ("method.name", "results.tag", "budget.fraction",
                                                                "model.name", "seed"))
    parts = [method, tag or None, None if frac is None else f"b{float(frac):g}", model,
             None if seed is None else f"s{seed}"]
    return "-".join(str(p) for p in parts if p is not None) or run_id


def sweep_group(config: dict[str, Any]) -> str | None:
    """<results.dir>/<results.group>: where the sweep's result files go, so the same sweep rerun or requeued
    lands in the same group; the tail is kept where it is longer than wandb allows."""
    where, group = _at(config, "results.dir"), _at(config, "results.group")
    if where is None or group is None:
        return None
    name = f"{os.path.normpath(str(where))}/{group}"
    return name[-WANDB_GROUP_MAX:]


def run_tags(config: dict[str, Any]) -> list[str]:
    """key:value tags to filter runs by in the wandb UI (the full config is there too)."""
    keys = {"method": "method.name", "model": "model.name", "data": "data.name", "budget": "budget.fraction"}
    tags: list[str] = []
    for tag, key in keys.items():
        value = _at(config, key)
        if value is not None:
            tags.append(f"{tag}:{float(value):g}" if tag == "budget" else f"{tag}:{value}")
    return tags


def wandb_dir() -> str | None:
    """Where wandb writes its wandb/ folder: $WANDB_DIR, else the job's Hydra output folder (beside its
    .hydra logs, outside results/ whose JSON files the analysis reads), else wandb's default (the cwd)."""
    if os.environ.get("WANDB_DIR"):
        return os.environ["WANDB_DIR"]
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        out = Path(HydraConfig.get().runtime.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        return str(out)
    return None


class WandbLogger(NullLogger):
    """One wandb run per smt-bench run, offline unless WANDB_MODE or `mode` says otherwise (no account or
    network needed; `wandb sync` uploads later).

    The wandb id is the run's config-hash id and resuming is allowed, so a run that is requeued and resumes
    from its checkpoint continues the same wandb run instead of starting a second one.
    """

    def __init__(self, project: str = "smt-bench", entity: str | None = None, group: str | None = None,
                 tags: list[str] | None = None, mode: str | None = None):
        self.project, self.entity, self.group, self.tags, self.mode = project, entity, group, list(tags or []), mode
        self.run: Any = None  # the wandb Run while started

    def start(self, run_id: str, config: dict[str, Any]) -> None:
        import wandb

        mode = self.mode or os.environ.get("WANDB_MODE") or "offline"
        tags = run_tags(config)
        tags += [t for t in self.tags if t not in tags]
        self.run = wandb.init(project=self.project, entity=self.entity, id=run_id, resume="allow",
                              name=run_name(run_id, config), group=self.group or sweep_group(config), tags=tags,
                              config=config, mode=mode, reinit="finish_previous", dir=wandb_dir())

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self, summary: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.run.finish()
            self.run = None


if TYPE_CHECKING:  # mypy checks that each logger class is a Logger
    _loggers: tuple[Logger, ...] = (NullLogger(), WandbLogger())
