"""LISA (Pan et al. 2024, LMFlow): layerwise importance sampling. Every K steps γ decoder layers, drawn
uniformly without replacement, train whole; the others are frozen and hold no gradients. The budget is
the trainable count at any step: γ layers (plus, with `train_embeddings`, every tensor outside the
decoder layers).

A layer's Adam moments when it leaves the active set (`optimizer_state`): `reset` (default) frees them, so
only the active layers hold optimizer state and a layer drawn again starts afresh; `keep` is LMFlow's
DynamicLayerActivationCallback, whose one AdamW (built over every parameter before the first draw) keeps
each parameter's moments and step count in its state while the layer is frozen, so a layer drawn again
continues from them, and the state grows towards full fine-tuning's as layers are drawn.

LISA's own default also trains every non-layer tensor at every step (`train_embeddings`: embeddings, head,
final norm, as LMFlow freezes only the layer list); off here, since on SmolLM2 the (tied) embedding alone
is ≈ 21% of the model and no small budget could be met. The draws depend only on (seed, period), so a
resumed run draws the same layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch import nn

from ..errors import BudgetUnreachable, UserError
from ..models import ModelShapes
from ..schema.spec import count, one_of, optional, param
from .base import Context, Method, Plan, SwitchingTuned


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList of the class transformers names unsplittable."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(type(c).__name__ in blocks for c in m):
            return m
    raise UserError(f"{type(model).__name__} has no list of decoder layers LISA could sample from")


OPTIMIZER_STATES = ("reset", "keep")


def _always(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter outside the decoder layers (embeddings, head, final norm), once each (a tied head is the
    embedding): what LMFlow leaves trainable, as it freezes only the layer list."""
    in_layers = {id(p) for p in decoder_layers(model).parameters()}
    return [p for p in model.parameters() if id(p) not in in_layers]  # parameters() lists a tied tensor once


@dataclass(frozen=True)
class LISA(Method):
    # K: steps between draws (LMFlow's lisa_interval_steps, default 20; 5 fits the embedded 20-step run: 4 draws)
    switch_every: int = param(5, count(1))
    # LISA's default: true (every tensor outside the decoder layers trains at every step: embeddings, head,
    # final norm); on SmolLM2 the tied embedding alone is ~21% of the model
    train_embeddings: bool = False
    # a layer's Adam moments when it leaves the active set: reset (freed; drawn again, it starts afresh) | keep
    # (LMFlow's: kept, and continued when the layer is drawn again; the state grows towards full FT's)
    optimizer_state: str = param("reset", one_of(OPTIMIZER_STATES))
    sampling_seed: Optional[int] = param(None, optional(count(0), "(the run's seed)"))  # null: the run's seed
    parallel: ClassVar[str] = "allreduce"  # the trainable set changes; DDP fixes its buckets at wrap time

    def plan(self, shapes: ModelShapes, target_params: int) -> Plan:
        model = shapes.meta_model()
        layers = decoder_layers(model)
        sizes = {sum(p.numel() for p in layer.parameters()) for layer in layers}
        if len(sizes) != 1:
            raise UserError(f"LISA needs decoder layers of one size; this model's are {sorted(sizes)}")
        per_layer = sizes.pop()
        fixed = sum(p.numel() for p in _always(model)) if self.train_embeddings else 0
        ideal = (target_params - fixed) / per_layer
        gamma = min(range(1, len(layers) + 1), key=lambda g: abs(fixed + g * per_layer - target_params))
        if ideal < 0.5 or ideal > len(layers) + 0.5:
            emb = f" plus {fixed:,} outside the layers (embeddings, head, norm)" if fixed else ""
            raise BudgetUnreachable(f"budget of {target_params:,} params is unreachable for {self.name}: γ would be "
                            f"{ideal:.2f} layers of {per_layer:,} params{emb}; valid γ 1..{len(layers)} give "
                            f"{fixed + per_layer:,}..{fixed + len(layers) * per_layer:,} params; choose another "
                            f"budget" + ("" if fixed else " or method.train_embeddings=true for more"))
        return Plan(target_params, fixed + gamma * per_layer,
                    {"layers": gamma, "num_layers": len(layers), "per_layer_params": per_layer,
                     "non_layer_params": fixed, "switch_every": self.switch_every})

    def prepare(self, model: nn.Module, plan: Plan, context: Context | None) -> "LISATuned":
        seed = self.sampling_seed if self.sampling_seed is not None else (context.seed if context else 0)
        return LISATuned(self, model, plan.detail["layers"], seed)


class LISATuned(SwitchingTuned):
    method: LISA

    def __init__(self, method: LISA, model: nn.Module, gamma: int, seed: int) -> None:
        super().__init__(method, model)
        self.layers = decoder_layers(model)
        self.gamma, self.seed = gamma, seed
        self.always = _always(model) if method.train_embeddings else []
        self.active: tuple[int, ...] = ()
        self.draws: dict[int, list[int]] = {}  # period -> its layers (period p covers steps pK+1 .. (p+1)K)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.always:
            p.requires_grad_(True)
        self._activate(0)

    def draw(self, period: int) -> tuple[int, ...]:
        rng = np.random.default_rng([self.seed, period])
        return tuple(sorted(int(i) for i in rng.choice(len(self.layers), self.gamma, replace=False)))

    def _activate(self, period: int) -> list[nn.Parameter]:
        """Makes the period's layers trainable; returns the parameters that stopped training."""
        self.draws[period] = list(self.draw(period))
        return self._set_active(self.draw(period))

    def _set_active(self, want: tuple[int, ...]) -> list[nn.Parameter]:
        leaving = [p for i in set(self.active) - set(want) for p in self.layers[i].parameters()]
        for p in leaving:
            p.requires_grad_(False)
            p.grad = None
        for i in want:
            for p in self.layers[i].parameters():
                p.requires_grad_(True)
        self.active = tuple(want)
        return leaving

    def begin_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        period = (step - 1) // self.method.switch_every
        if self.draw(period) == self.active:
            self.draws[period] = list(self.active)
            return False
        leaving = self._activate(period)
        if self.method.optimizer_state == "reset":
            for p in leaving:
                optimizer.state.pop(p, None)  # only active layers hold Adam moments
        return True

    def candidates(self) -> list[nn.Parameter]:
        return [*self.always, *self.layers.parameters()]

    # --- checkpoints: every candidate may have trained by now (SwitchingTuned.candidate_names) ---
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return ({n: p.detach() for n, p in self.candidate_names().items()},
                {"draws": {str(k): v for k, v in self.draws.items()}, "active": list(self.active), "seed": self.seed,
                 "layers": self.gamma})

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        params = self.candidate_names()
        if set(tensors) != set(params) or meta.get("seed") != self.seed or meta.get("layers") != self.gamma:
            raise ValueError(f"checkpoint does not match this {self.method.name} run (seed {meta.get('seed')}, "
                             f"γ {meta.get('layers')}; tensors {sorted(set(tensors) ^ set(params))[:3]})")
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)
        self.draws.update({int(k): v for k, v in meta["draws"].items()})
        self._set_active(tuple(meta["active"]))  # the layers the optimizer state belongs to (reset)

    def report(self) -> dict[str, Any]:
        k = self.method.switch_every
        return {"active_layers": [{"from_step": p * k + 1, "layers": layers} for p, layers in sorted(self.draws.items())]}
