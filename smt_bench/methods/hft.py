"""HFT, Half Fine-Tuning (Hui et al., ACL 2025, arXiv 2404.18466): half of each decoder layer trains, the
other half stays frozen, chosen at the category level and at random.

In each decoder layer (LLaMA's: the paper's Figure 2):
- attention: 2 of the 4 matrices q, k, v, o train;
- MLP: gate, up, down are three, so a random half of the layers (⌊L/2⌋) train 2 of them and the other
  layers 1 (1.5 of 3 on average; exactly half for an even L);
- norms: 1 of input_layernorm, post_attention_layernorm trains.
Each layer draws its own matrices independently. Everything outside the decoder layers (embedding, LM head,
final norm) trains at every step, as in the paper (`train_embeddings`). Whole tensors train: the model's own,
as in full fine-tuning, so the merged model is the model itself.

The paper draws a new half at each stage of a multi-stage run (SFT, then DPO; each task of a continual
sequence); a single-task run is one stage: one draw (`redraw_every` null, the default). `redraw_every: K`
draws again every K steps; the draws depend only on (seed, draw index), so a resumed run draws the same.

The count is the same at every step. With grouped-query attention k and v are smaller than q and o, so a
free draw of 2 of 4 per layer would train a different count each time; here the attention draw is the
paper's uniform one conditioned on training exactly half of the attention parameters (as many layers train
q+o as train k+v; with equal-size q, k, v, o, as in the paper's LLaMA 2, every draw qualifies). A matrix
that leaves the trainable set drops its Adam moments (each stage of the paper starts a fresh optimizer);
`optimizer_state: keep` keeps them for its return.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..models import ModelShapes
from ..schema.spec import count, one_of, optional, param
from .base import Context, Method, Plan, SwitchingTuned
from .lisa import decoder_layers

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
MODULES = ATTENTION + MLP + NORMS  # a layer's selectable modules, in report order
OPTIMIZER_STATES = ("reset", "keep")  # as LISA's
MAX_TRIES = 100_000  # attention draws until one trains exactly half (LLaMA shapes: a few; equal sizes: 1)


def _size(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class _Layout:
    """The decoder layers' selectable modules by short name, checked: every layer alike, every parameter of a
    layer in one of the 9 modules, gate/up/down of one size, the two norms of one size, and some 2 of q, k, v,
    o holding exactly half of the attention parameters (so that every draw trains the same count)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = decoder_layers(model)
        self.path = next(n for n, m in model.named_modules() if m is self.layers)
        self.modules: list[dict[str, nn.Module]] = []
        for i, layer in enumerate(self.layers):
            found = {n.rsplit(".", 1)[-1]: m for n, m in layer.named_modules() if n}
            missing = [k for k in MODULES if k not in found]
            if missing:
                raise UserError(f"HFT selects among LLaMA's q/k/v/o, gate/up/down and two norms per layer; "
                                f"layer {i} of {type(model).__name__} has no {', '.join(missing)}")
            mods = {k: found[k] for k in MODULES}
            covered = {id(p) for m in mods.values() for p in m.parameters()}
            other = [n for n, p in layer.named_parameters() if id(p) not in covered]
            if other:
                raise UserError(f"HFT's categories do not cover {self.path}.{i}.{other[0]} of "
                                f"{type(model).__name__}; HFT supports LLaMA-style layers")
            self.modules.append(mods)
        sizes = {tuple(_size(m[k]) for k in MODULES) for m in self.modules}
        if len(sizes) != 1:
            raise UserError(f"HFT needs decoder layers of one shape; this model's differ: {sorted(sizes)}")
        self.sizes = dict(zip(MODULES, sizes.pop()))
        for group in (MLP, NORMS):
            if len({self.sizes[k] for k in group}) != 1:
                raise UserError(f"HFT needs {', '.join(group)} of one size (any choice among them the same "
                                f"count); this model's are {[self.sizes[k] for k in group]}")
        self.pairs = list(itertools.combinations(ATTENTION, 2))
        self.pair_sizes = [self.sizes[a] + self.sizes[b] for a, b in self.pairs]
        attention = sum(self.sizes[k] for k in ATTENTION)
        if attention % 2 or attention // 2 not in self.pair_sizes:
            raise UserError(f"no 2 of q, k, v, o hold half of a layer's {attention:,} attention parameters "
                            f"({dict((k, self.sizes[k]) for k in ATTENTION)}); HFT cannot train a fixed half")
        n = len(self.layers)
        self.mlp_two = n // 2  # layers that train 2 of gate/up/down; the others train 1
        self.attention = n * attention // 2
        self.mlp = (2 * self.mlp_two + (n - self.mlp_two)) * self.sizes[MLP[0]]
        self.norms = n * self.sizes[NORMS[0]]
        in_layers = {id(p) for p in self.layers.parameters()}
        self.outside = [p for p in model.parameters() if id(p) not in in_layers]  # embedding, head, final norm

    def count(self, train_embeddings: bool) -> int:
        return self.attention + self.mlp + self.norms + (sum(p.numel() for p in self.outside) if train_embeddings
                                                         else 0)


@dataclass(frozen=True)
class HFT(Method):
    # steps between draws; null or 0: one draw for the whole run (the paper's single-task recipe: one stage,
    # one draw; it draws again only at the next stage)
    redraw_every: Optional[int] = param(None, optional(count(0), "(one draw for the whole run, as 0)"))
    # the paper's: the embedding, the LM head (tied in SmolLM2) and the final norm, outside the per-layer draw,
    # train at every step (SmolLM2: 28.3M of the 81.4M trained; false: 53.1M, 39.5% of the model)
    train_embeddings: bool = True
    # a matrix's Adam moments when it leaves the trainable set: reset (freed; drawn again, it starts afresh, as
    # each of the paper's stages starts a fresh optimizer) | keep (continued when it is drawn again; the state
    # then grows past 8 bytes per trainable parameter)
    optimizer_state: str = param("reset", one_of(OPTIMIZER_STATES))
    selection_seed: Optional[int] = param(None, optional(count(0), "(the run's seed)"))  # null: the run's seed
    fixed_fraction: ClassVar[float] = 0.5  # its budget is not a choice: half of each layer (plan: the exact count)
    parallel: ClassVar[str] = "allreduce"  # the trainable set may change; DDP fixes its buckets at wrap time

    def plan(self, shapes: ModelShapes, target_params: int) -> Plan:
        layout = _Layout(shapes.meta_model())
        outside = sum(p.numel() for p in layout.outside)
        return Plan(target_params, layout.count(self.train_embeddings),
                    {"layers": len(layout.layers), "attention_params": layout.attention, "mlp_params": layout.mlp,
                     "norm_params": layout.norms, "layer_params": len(layout.layers) * sum(layout.sizes.values()),
                     "mlp_two_layers": layout.mlp_two, "non_layer_params": outside if self.train_embeddings else 0,
                     "redraw_every": self.redraw_every or None})

    def prepare(self, model: nn.Module, plan: Plan, context: Context | None) -> "HFTTuned":
        seed = self.selection_seed if self.selection_seed is not None else (context.seed if context else 0)
        return HFTTuned(self, model, seed)


Selection = list[list[str]]  # per layer, the short names of the modules that train


class HFTTuned(SwitchingTuned):
    method: HFT

    def __init__(self, method: HFT, model: nn.Module, seed: int) -> None:
        super().__init__(method, model)
        self.layout = _Layout(model)
        self.seed = seed
        self.always = self.layout.outside if method.train_embeddings else []
        self.draws: dict[int, Selection] = {}  # draw index -> its selection (draw d covers steps dK+1 .. (d+1)K)
        self.active: Selection = [[] for _ in self.layout.layers]
        self.period = 0
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.always:
            p.requires_grad_(True)
        self._set_active(self._draw_at(0))

    # --- the draws ---
    def draw(self, period: int) -> Selection:
        """The selection of draw `period`: a function of (seed, period) only."""
        lay, n = self.layout, len(self.layout.layers)
        rng = np.random.default_rng([self.seed, period])
        for _ in range(MAX_TRIES):  # uniform 2 of 4 per layer, conditioned on exactly half of the attention
            picks = rng.integers(len(lay.pairs), size=n)
            if sum(lay.pair_sizes[i] for i in picks) == lay.attention:
                break
        else:
            raise RuntimeError(f"no attention draw of {MAX_TRIES} trained exactly half; sizes {lay.sizes}")
        two = {int(i) for i in rng.choice(n, lay.mlp_two, replace=False)}
        out = []
        for i in range(n):
            mlp = {MLP[int(j)] for j in rng.choice(len(MLP), 2 if i in two else 1, replace=False)}
            chosen = set(lay.pairs[int(picks[i])]) | mlp | {NORMS[int(rng.integers(len(NORMS)))]}
            out.append([k for k in MODULES if k in chosen])
        return out

    def _draw_at(self, period: int) -> Selection:
        self.draws[period] = self.draws.get(period) or self.draw(period)
        return self.draws[period]

    def _params(self, selection: Selection) -> dict[int, nn.Parameter]:
        return {id(p): p for i, names in enumerate(selection) for k in names
                for p in self.layout.modules[i][k].parameters()}

    def _set_active(self, want: Selection) -> list[nn.Parameter]:
        """Makes `want` the trainable set; returns the parameters that stopped training."""
        old, new = self._params(self.active), self._params(want)
        leaving = [p for i, p in old.items() if i not in new]
        for p in leaving:
            p.requires_grad_(False)
            p.grad = None
        for p in new.values():
            p.requires_grad_(True)
        self.active = [list(names) for names in want]
        return leaving

    def begin_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        k = self.method.redraw_every
        period = (step - 1) // k if k else 0
        if period == self.period:
            return False
        self.period = period
        want = self._draw_at(period)
        if want == self.active:
            return False
        for p in self._set_active(want):
            if self.method.optimizer_state == "reset":
                optimizer.state.pop(p, None)  # only trainable matrices hold Adam moments
        return True

    def candidates(self) -> list[nn.Parameter]:
        """Every parameter that trains in some draw, in the model's order (the optimizer's state indices)."""
        ids = {id(p) for p in [*self.always, *self.layout.layers.parameters()]}
        return [p for p in self.model.parameters() if id(p) in ids]

    # --- checkpoints: every candidate may have trained by now (SwitchingTuned.candidate_names) ---
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return ({n: p.detach() for n, p in self.candidate_names().items()},
                {"draws": {str(d): s for d, s in self.draws.items()}, "period": self.period, "seed": self.seed,
                 "redraw_every": self.method.redraw_every or None})

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        params = self.candidate_names()
        if (set(tensors) != set(params) or meta.get("seed") != self.seed
                or meta.get("redraw_every") != (self.method.redraw_every or None)):
            raise ValueError(f"checkpoint does not match this {self.method.name} run (seed {meta.get('seed')}, "
                             f"redraw_every {meta.get('redraw_every')}; tensors "
                             f"{sorted(set(tensors) ^ set(params))[:3]})")
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)
        self.draws.update({int(d): s for d, s in meta["draws"].items()})
        self.period = int(meta["period"])
        self._set_active(self.draws[self.period])  # the matrices the optimizer state belongs to

    def report(self) -> dict[str, Any]:
        k = self.method.redraw_every or 0
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {"draws": [{"from_step": d * k + 1, "layers": s} for d, s in sorted(self.draws.items())],
                "layers_at": self.layout.path,
                "always_trained": [names[id(p)] for p in self.always]}
