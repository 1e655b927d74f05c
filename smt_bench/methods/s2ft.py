"""S2FT (Yang et al., NeurIPS 2024): structured sparse fine-tuning of the output side of each block.

It trains whole attention heads of the output projection (o_proj's input columns of one head) and whole
channels of the MLP's down projection (down_proj's input columns), the coupled structures whose
selection leaves the rest of the network untouched. Each trained slice is a dense matrix, so forward
and backward are dense GEMMs, and backward saves only the selected columns of each input.

Here each selected slice trains as a delta D beside the frozen weight, y = x Wᵀ + x[:, S] Dᵀ
(D starts at zero, so step 0 is the base model; merged: W[:, S] += D). With Adam the updates equal
training W[:, S] itself; only weight decay differs: it pulls D towards 0, i.e. towards the pretrained
weights, as for an adapter. Budget → heads and channels, spread evenly over the layers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BudgetUnreachable, UserError
from ..models import LinearShape, ModelShapes
from ..schema.spec import count, nonempty, one_of, optional, param, within
from .base import Context, Method, Plan, Tuned

STRATEGIES = ("random", "weight")  # S2FT-R (the paper's default) and S2FT-W: columns by weight norm


class ColumnSliceLinear(nn.Module):
    """A frozen nn.Linear plus a trainable delta on some of its input columns."""

    columns: torch.Tensor  # a buffer

    def __init__(self, base: nn.Linear, columns: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("columns", columns.to(torch.long).to(base.weight.device))
        self.delta = nn.Parameter(torch.zeros(base.out_features, len(columns), dtype=base.weight.dtype,
                                              device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(x.index_select(-1, self.columns), self.delta)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight[:, self.columns] += self.delta.to(self.base.weight.dtype)
        return self.base


def _head_dim(shapes: ModelShapes) -> int:
    c = shapes.hf_config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _spread(total: int, n: int) -> list[int]:
    """`total` units over n layers as evenly as possible; the extra ones at evenly spaced layers."""
    return [(i + 1) * total // n - i * total // n for i in range(n)]


@dataclass(frozen=True)
class S2FT(Method):
    attn_module: str = param("o_proj", nonempty())  # trained by whole heads (input columns of one head)
    mlp_module: str = param("down_proj", nonempty())  # trained by channels (one input column each)
    # share of the budget on heads; null: by pool size (SmolLM2: 27%)
    attn_share: Optional[float] = param(None, optional(within(0, 1), "(by pool size)"))
    # random (S2FT-R, the paper's default) | weight (S2FT-W: by column-block norm)
    strategy: str = param("random", one_of(STRATEGIES))
    largest: bool = True  # strategy=weight: the columns of largest norm (false: smallest)
    selection_seed: Optional[int] = param(None, optional(count(0), "(the run's seed)"))  # null: the run's seed

    def _modules(self, shapes: ModelShapes) -> tuple[list[LinearShape], list[LinearShape]]:
        attn, mlp = shapes.select([self.attn_module]), shapes.select([self.mlp_module])
        for key, found in (("attn_module", attn), ("mlp_module", mlp)):
            if not found:
                have = sorted({l.name.rsplit(".", 1)[-1] for l in shapes.linears})
                raise UserError(f"method.{key}={getattr(self, key)} matches no linear layer; choose from {have}")
        if len(attn) != len(mlp):
            raise UserError(f"method.attn_module={self.attn_module} and mlp_module={self.mlp_module} are in "
                            f"{len(attn)} and {len(mlp)} layers; S2FT needs one of each per block")
        return attn, mlp

    def plan(self, shapes: ModelShapes, target_params: int) -> Plan:
        attn, mlp = self._modules(shapes)
        hd = _head_dim(shapes)
        if attn[0].d_in % hd:
            raise UserError(f"{self.attn_module} has {attn[0].d_in} input columns, not whole heads of {hd}")
        per_head, per_channel = attn[0].d_out * hd, mlp[0].d_out
        n_heads, n_channels = sum(a.d_in // hd for a in attn), sum(m.d_in for m in mlp)
        pool_attn, pool_mlp = n_heads * per_head, n_channels * per_channel
        share = self.attn_share if self.attn_share is not None else pool_attn / (pool_attn + pool_mlp)
        if target_params > pool_attn + pool_mlp or target_params < min(per_head, per_channel) / 2:
            raise BudgetUnreachable(f"budget of {target_params:,} params is unreachable for {self.name}: its "
                            f"{self.attn_module} heads and {self.mlp_module} channels hold "
                            f"{min(per_head, per_channel):,}..{pool_attn + pool_mlp:,} params; choose another budget")
        heads = min(n_heads, round(share * target_params / per_head))
        channels = min(n_channels, max(0, round((target_params - heads * per_head) / per_channel)))
        if channels == n_channels:  # the MLP pool is full: the rest goes to heads
            heads = min(n_heads, round((target_params - channels * per_channel) / per_head))
        achieved = heads * per_head + channels * per_channel
        return Plan(target_params, achieved, {
            "heads": heads, "channels": channels, "attn_share": share, "head_dim": hd,
            "heads_per_layer": _spread(heads, len(attn)), "channels_per_layer": _spread(channels, len(mlp))})

    # --- selection ---
    def _choose(self, weight: torch.Tensor, unit: int, k: int, gen: torch.Generator) -> torch.Tensor:
        """k units of `unit` input columns each; returns the sorted column indices."""
        n = weight.shape[1] // unit
        if self.strategy == "random":
            units = torch.randperm(n, generator=gen)[:k]
        else:
            norms = weight.detach().float().reshape(weight.shape[0], n, unit).pow(2).sum((0, 2))
            units = torch.topk(norms, k, largest=self.largest).indices.cpu()
        units = units.sort().values
        return (units[:, None] * unit + torch.arange(unit)).reshape(-1)

    def _selection(self, model: nn.Module, plan: Plan, seed: int) -> dict[str, list[int]]:
        gen = torch.Generator().manual_seed(seed)
        modules = dict(model.named_modules())
        out: dict[str, list[int]] = {}
        for suffix, unit, counts in ((self.attn_module, plan.detail["head_dim"], plan.detail["heads_per_layer"]),
                                     (self.mlp_module, 1, plan.detail["channels_per_layer"])):
            names = [n for n, m in modules.items() if n.rsplit(".", 1)[-1] == suffix and isinstance(m, nn.Linear)]
            for name, k in zip(names, counts):
                if k:
                    out[name] = self._choose(modules[name].weight, unit, k, gen).tolist()
        return out

    def prepare(self, model: nn.Module, plan: Plan, context: Context | None) -> "S2FTTuned":
        seed = self.selection_seed if self.selection_seed is not None else (context.seed if context else 0)
        return self._build(model, self._selection(model, plan, seed))

    def resume(self, model: nn.Module, plan: Plan, context: Context | None, state: dict[str, torch.Tensor],
               meta: dict[str, Any]) -> "S2FTTuned":
        tuned = self._build(model, meta["columns"])  # the checkpoint's selection, whatever the strategy
        tuned.load_state_dict(state, meta)
        return tuned

    def _build(self, model: nn.Module, columns: dict[str, list[int]]) -> "S2FTTuned":
        for p in model.parameters():
            p.requires_grad_(False)
        for name, cols in columns.items():
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, child, ColumnSliceLinear(getattr(owner, child), torch.tensor(cols)))
        return S2FTTuned(self, model, columns)


class S2FTTuned(Tuned):
    method: S2FT

    def __init__(self, method: S2FT, model: nn.Module, columns: dict[str, list[int]]) -> None:
        super().__init__(method, model)
        self.columns = columns

    def _sliced(self) -> list[tuple[str, ColumnSliceLinear]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, ColumnSliceLinear)]

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, _ = super().state_dict()
        return tensors, {"columns": self.columns}

    def report(self) -> dict[str, Any]:
        return {"columns": self.columns}

    def export(self, directory: str | Path, base_model: str) -> list[str]:
        """The deltas and their columns (W[:, columns] += delta applies them to the base model)."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for name, m in self._sliced():
            tensors[f"{name}.delta"] = m.delta.detach().contiguous().cpu()
            tensors[f"{name}.columns"] = m.columns.cpu()
        path = f"{directory}/s2ft_delta.safetensors"
        save_file(tensors, path, metadata={"base_model": base_model, "method": json.dumps(
            {"attn_module": self.method.attn_module, "mlp_module": self.method.mlp_module})})
        return [path]

    def merged(self) -> nn.Module:
        for name, m in self._sliced():
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, m.merged())
        return self.model

