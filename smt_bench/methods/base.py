"""The one protocol every fine-tuning method implements; the trainer knows nothing else.

A method is a dataclass built from `conf/method/<name>.yaml` by Hydra's instantiate. Lifecycle:
plan() on shapes only (bad budgets fail before any weights load), prepare() turns the loaded base
model into the trainable one, the trainer optimises trainable_parameters() with build_optimizer(),
and merged() gives back a plain HF model for evaluation and export.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from ..models import ModelShapes
from ..schema.spec import REQUIRED, at_least, check_fields, nonempty, param, above


@dataclass
class Plan:
    """How a method meets a budget: target and achieved trainable counts, plus its own knobs."""

    target_params: int
    achieved_params: int
    detail: dict = field(default_factory=dict)


@dataclass
class Warmup:
    """What a method may use before training (SMT scores blocks on it): batches and the loss."""

    batches: Callable[[int], Iterator[dict]]
    loss: Callable[[nn.Module, dict], torch.Tensor]


@dataclass
class Method:
    """Fields are the method's config: their types and `valid` values are its config schema
    (smt_bench/schema/store.py registers it), checked before anything loads."""

    name: str = param(REQUIRED, nonempty())
    lr: float = param(REQUIRED, above(0))
    weight_decay: float = param(0.0, at_least(0))
    fixed_fraction: ClassVar[float | None] = None  # a method whose budget is not a choice (full FT: 1.0)

    def __post_init__(self):
        check_fields(self, "method")

    def plan(self, shapes: ModelShapes, target_params: int) -> Plan:
        raise NotImplementedError

    def prepare(self, model: nn.Module, plan: Plan, warmup: Warmup) -> nn.Module:
        raise NotImplementedError

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def build_optimizer(self, params: list[nn.Parameter], betas=(0.9, 0.999), eps=1e-8) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.lr, betas=betas, eps=eps, weight_decay=self.weight_decay,
                                 foreach=True)

    def merged(self, model: nn.Module) -> nn.Module:
        """A plain HF model with the tuning folded in (may be `model` itself)."""
        return model

    def export(self, model: nn.Module, directory, base_model: str) -> list[str]:
        """Writes the tuned weights (an adapter or delta where the method has one); returns the files."""
        from safetensors.torch import save_model

        path = f"{directory}/model.safetensors"
        save_model(model, path)
        return [path]

    def report(self, model: nn.Module) -> dict[str, Any]:
        """Method-specific entries for the result file (e.g. SMT's block map)."""
        return {}
