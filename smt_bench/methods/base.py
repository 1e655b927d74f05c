"""The one protocol every fine-tuning method implements; the trainer knows nothing else.

A method is two objects, as in peft (config / tuned model) and torchtune (recipe / components):

- `Method`: a frozen dataclass built from `conf/method/<name>.yaml` by Hydra. It is a description
  only: `plan()` meets a budget on meta-device shapes (bad budgets fail before any weights load),
  `prepare()` turns the loaded base model into a `Tuned`, `resume()` rebuilds that `Tuned` from a
  checkpoint without redoing the method's own pre-training phase.
- `Tuned`: everything `prepare()` creates (adapters, block layers, warm-up facts) lives here and only
  here: trainable parameters, optimizer, `state_dict()` / `load_state_dict()` for checkpoints, the
  report, the export and the merged model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import nn

from ..distributed import World
from ..models import ModelShapes
from ..schema.spec import REQUIRED, above, at_least, check_fields, nonempty, param

if TYPE_CHECKING:
    from ..forecast.model import Cost


@dataclass
class Plan:
    """How a method meets a budget: target and achieved trainable counts, plus its own knobs."""

    target_params: int
    achieved_params: int
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What a method may use while it prepares: its own batch stream (seeded apart from the training
    stream, so training batches do not depend on the method, and this rank's share of it), the loss,
    the device, the process group (anything that decides, like SMT's block selection, is reduced
    across ranks first) and the run's seed. One step of it is `accumulation` batches on every rank: the global batch."""

    batches: Callable[[int], Iterator[dict[str, torch.Tensor]]]
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    device: torch.device
    world: World = field(default_factory=World)
    accumulation: int = 1  # micro-batches per rank in one optimizer step (train.grad_accum)
    seed: int = 0  # the run's seed, for a method's own random choices (S2FT's selection, LISA's layers)
    max_steps: int = 0  # the run's optimizer steps (a schedule of the method's own: SpIEL's decaying rate); 0: unknown


@dataclass(frozen=True)
class Method:
    """Fields are the method's config: their types and `valid` values are its config schema
    (smt_bench/schema/store.py registers it), checked before anything loads. A field's default is
    stated here only: conf/method/<name>.yaml sets the fields without one (name, lr) and, for a class
    several files share (PeftTuner), what makes it that method (docs/methods.md)."""

    name: str = param(REQUIRED, nonempty())
    lr: float = param(REQUIRED, above(0))
    weight_decay: float = param(0.0, at_least(0))
    fixed_fraction: ClassVar[float | None] = None  # a method whose budget is not a choice (full FT: 1.0)
    parallel: ClassVar[str] = "ddp"  # how a run spreads over ranks: ddp | fsdp2 | allreduce (smt_bench/parallel.py)

    def __post_init__(self) -> None:
        check_fields(self, "method")

    def plan(self, shapes: ModelShapes, target_params: int) -> Plan:
        raise NotImplementedError

    def prepare(self, model: nn.Module, plan: Plan, context: Context) -> "Tuned":
        raise NotImplementedError

    def cost(self, shapes: ModelShapes, plan: Plan) -> "Cost":
        """What a training step of this method costs beyond the frozen model, for the forecast
        (smt_bench/forecast/): its trainable and added parameters, what its modules save for backward, its own
        FLOPs and temporaries, its phase before training (model.Cost). Default: generic terms from the trainable
        count, read as base weights that train (smt_bench/forecast/costs.py default_cost; approximate for a
        method that adds tensors of its own, exact for full FT). A method states its own by overriding this."""
        from ..forecast.costs import default_cost

        return default_cost(self, shapes, plan)

    def resume(self, model: nn.Module, plan: Plan, context: Context, state: dict[str, torch.Tensor],
               meta: dict[str, Any]) -> "Tuned":
        """The Tuned a checkpoint was taken of. By default: prepare again (cheap for adapters; any random
        init is overwritten), then load the saved tensors. A method with a costly or data-dependent
        prepare (SMT's warm-up) rebuilds from `meta` instead."""
        tuned = self.prepare(model, plan, context)
        tuned.load_state_dict(state, meta)
        return tuned


class Tuned:
    """A prepared model and all runtime state of its method. The default serves methods whose trainable
    tensors are the model's parameters with requires_grad (full FT; peft adapters)."""

    def __init__(self, method: Method, model: nn.Module) -> None:
        self.method, self.model = method, model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def build_optimizer(self, betas: Iterable[float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.method.lr, betas=tuple(betas), eps=eps,
                                 weight_decay=self.method.weight_decay, foreach=True)

    def begin_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """Called before each optimizer step (1-based, also the first after a resume); True when the set of
        trainable parameters changed (LISA samples new layers every K steps). Default: it never does."""
        return False

    def regularizer(self) -> torch.Tensor | None:
        """A method's own term added to each micro-batch's training loss before backward (KaSA's penalties on its
        singular values and factors), or None. The logged loss is the task loss alone. Default: none."""
        return None

    # --- checkpoints ---
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, meta): the trainable tensors by name, and JSON facts a resume needs."""
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        params = dict(self.model.named_parameters())
        missing = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors)
        extra = sorted(set(tensors) - set(params))
        if missing or extra:
            raise ValueError(f"checkpoint does not match the {self.method.name} model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)

    # --- after training ---
    def report(self) -> dict[str, Any]:
        """Method-specific entries for the result file (e.g. SMT's block map)."""
        return {}

    def export(self, directory: str | Path, base_model: str) -> list[str]:
        """Writes the tuned weights (an adapter or delta where the method has one); returns the files."""
        from safetensors.torch import save_model

        path = f"{directory}/model.safetensors"
        save_model(self.model, path)
        return [path]

    def merged(self) -> nn.Module:
        """A plain HF model with the tuning folded in. Call last: it may consume the tuned model."""
        return self.model


class SwitchingTuned(Tuned):
    """A Tuned whose trainable set changes during training (LISA's layers, HFT's draws): the optimizer is built
    over every parameter that may train (`candidates`), and AdamW skips, and holds no state for, those without a
    gradient; a checkpoint holds every candidate, since each may have trained by then."""

    def candidates(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def build_optimizer(self, betas: Iterable[float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.candidates(), lr=self.method.lr, betas=tuple(betas), eps=eps,
                                 weight_decay=self.method.weight_decay, foreach=True)

    def candidate_names(self) -> dict[str, nn.Parameter]:
        ids = {id(p) for p in self.candidates()}
        return {n: p for n, p in self.model.named_parameters() if id(p) in ids}

