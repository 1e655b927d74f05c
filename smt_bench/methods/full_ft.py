"""Full fine-tuning: every parameter trains; the budget is always 100% of the model (FSDP2 on several ranks)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..models import ModelShapes
from .base import Context, Method, Plan, Tuned


@dataclass(frozen=True)
class FullFT(Method):
    fixed_fraction: ClassVar[float] = 1.0
    parallel: ClassVar[str] = "fsdp2"  # every weight trains: shard weights, gradients and AdamW states

    def plan(self, shapes: ModelShapes, target_params: int) -> Plan:
        return Plan(target_params=shapes.total_params, achieved_params=shapes.total_params)

    def prepare(self, model: nn.Module, plan: Plan, context: Context) -> Tuned:
        for p in model.parameters():
            p.requires_grad_(True)
        return Tuned(self, model)
