"""S2FT (Yang et al., NeurIPS 2024): structured sparse fine-tuning of the output side of each block.

It trains whole attention heads of the output projection (o_proj's input columns of one head) and whole
channels of the MLP's down projection (down_proj's input columns), the coupled structures whose
selection leaves the rest of the network untouched. Each trained slice is a dense matrix, so forward
and backward are dense GEMMs, and backward saves only the selected columns of each input.

Here each selected slice trains as a delta D beside the frozen weight, y = x Wᵀ + x[:, S] Dᵀ
(D starts at zero, so step 0 is the base model; merged: W[:, S] += D). With Adam the updates equal
training W[:, S] itself; only weight decay differs: it pulls D towards 0, i.e. towards the pretrained
weights, as for an adapter.

Budget → a count of heads and of channels (`plan`, on shapes: seed-independent). Where they go
(`allocation`): `even` spreads each count evenly over the layers and selects inside each layer; `model_wide`
is the reference's (Infini-AI-Lab/S2FT, experiments/train/finetune.py): the heads, and then the channels,
are drawn among all (layer, unit) pairs of the model at once (Python's `random.sample` seeded with the
run's seed, as the reference draws them), or, for a scoring strategy, are the top units of the model,
so the per-layer counts are fixed in `prepare` and the totals stay exact.

Which units (`strategy`): random (S2FT-R, the paper's default), or the units of largest (or, with
`largest: false`, smallest) score: weight (S2FT-W, Σ W² over the unit's columns), activation (S2FT-A, Σ x²
of the unit's input columns over the calibration tokens), weight_activation (S2FT-S, Σ |W_ij|·‖x_j‖), gradient
(S2FT-G, Σ G² over the unit's columns, G the weight's gradient summed over the calibration batches). The
data-driven ones run a calibration pass of `calibration_steps` global batches of the method's own batch
stream first; every rank's sums are all-reduced before the statistic, so every rank selects the same.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BudgetUnreachable, UserError
from ..models import LinearShape, ModelShapes
from ..schema.spec import at_least, count, each, invalid, nonempty, one_of, optional, param, within
from .base import Context, Method, Plan, Tuned

# S2FT-R (the paper's default), S2FT-W, S2FT-A, S2FT-S, S2FT-G
STRATEGIES = ("random", "weight", "activation", "weight_activation", "gradient")
CALIBRATED = ("activation", "weight_activation", "gradient")  # need a calibration pass over batches
ALLOCATIONS = ("even", "model_wide")


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


def _top(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The indices of the k largest (smallest) scores; ties go to the lower index."""
    return torch.sort(scores, descending=largest, stable=True).indices[:k]


def _columns(units: torch.Tensor, unit: int) -> list[int]:
    """Sorted unit indices -> their input columns."""
    units = units.sort().values
    return (units[:, None] * unit + torch.arange(unit)).reshape(-1).tolist()


@dataclass(frozen=True)
class S2FT(Method):
    attn_module: str = param("o_proj", nonempty())  # trained by whole heads (input columns of one head)
    mlp_module: str = param("down_proj", nonempty())  # trained by channels (one input column each)
    # share of the budget on heads; null: by pool size (SmolLM2: 27%), or by `ratios`; 0: channels only; 1: heads
    # only
    attn_share: Optional[float] = param(None, optional(within(0, 1), "(by pool size, or by ratios)"))
    # [heads, channels] as the reference states them (its o_ratio, d_ratio: fractions of each pool); they set
    # the split of the budget (null: attn_share decides)
    ratios: Optional[list[float]] = param(None, optional(each(at_least(0), n=2), "(attn_share decides)"))
    # even (each count spread evenly over the layers) | model_wide (the reference's: over all (layer, unit) pairs)
    allocation: str = param("even", one_of(ALLOCATIONS))
    # random (S2FT-R, the paper's default) | weight (S2FT-W) | activation (S2FT-A) | weight_activation (S2FT-S) |
    # gradient (S2FT-G)
    strategy: str = param("random", one_of(STRATEGIES))
    largest: bool = True  # a scoring strategy: the units of largest score (false: smallest)
    # activation, weight_activation, gradient: global batches of the method's own stream the statistic sums over
    calibration_steps: int = param(4, count(1))
    selection_seed: Optional[int] = param(None, optional(count(0), "(the run's seed)"))  # null: the run's seed

    @staticmethod
    def check_config(cfg, at: str) -> None:
        if cfg.ratios is not None and cfg.attn_share is not None:
            raise invalid(f"{at}.attn_share", cfg.attn_share, f"null when {at}.ratios is set (the ratios split "
                          f"the budget)")
        if cfg.ratios is not None and not sum(cfg.ratios) > 0:
            raise invalid(f"{at}.ratios", list(cfg.ratios), "two numbers >= 0, not both 0 ([heads, channels])")

    def _modules(self, shapes: ModelShapes) -> tuple[list[LinearShape], list[LinearShape]]:
        attn, mlp = shapes.select([self.attn_module]), shapes.select([self.mlp_module])
        for key, found in (("attn_module", attn), ("mlp_module", mlp)):
            if not found:
                have = sorted({l.name.rsplit(".", 1)[-1] for l in shapes.linears})
                raise UserError(f"method.{key}={getattr(self, key)} matches no linear layer; choose from {have}")
        if len(attn) != len(mlp):
            raise UserError(f"method.attn_module={self.attn_module} and mlp_module={self.mlp_module} are in "
                            f"{len(attn)} and {len(mlp)} layers; S2FT needs one of each per block")
        for key, found in (("attn_module", attn), ("mlp_module", mlp)):
            if len({(l.d_out, l.d_in) for l in found}) > 1:
                raise UserError(f"method.{key}={getattr(self, key)} has layers of several shapes; S2FT needs one")
        return attn, mlp

    def _share(self, pool_attn: int, pool_mlp: int) -> float:
        if self.ratios is not None:
            ra, rm = self.ratios
            return ra * pool_attn / (ra * pool_attn + rm * pool_mlp)
        return self.attn_share if self.attn_share is not None else pool_attn / (pool_attn + pool_mlp)

    def plan(self, shapes: ModelShapes, target_params: int) -> Plan:
        attn, mlp = self._modules(shapes)
        hd = _head_dim(shapes)
        if attn[0].d_in % hd:
            raise UserError(f"{self.attn_module} has {attn[0].d_in} input columns, not whole heads of {hd}")
        per_head, per_channel = attn[0].d_out * hd, mlp[0].d_out
        n_heads, n_channels = sum(a.d_in // hd for a in attn), sum(m.d_in for m in mlp)
        pool_attn, pool_mlp = n_heads * per_head, n_channels * per_channel
        share = self._share(pool_attn, pool_mlp)
        # share 0 or 1: one kind of unit only (the reference's LLaMA-3 recipe trains down_proj alone)
        pools = ([(per_head, pool_attn, f"{self.attn_module} heads")] if share > 0 else []) + \
                ([(per_channel, pool_mlp, f"{self.mlp_module} channels")] if share < 1 else [])
        lo, hi = min(p[0] for p in pools), sum(p[1] for p in pools)
        if target_params > hi or target_params < lo / 2:
            what = " and ".join(p[2] for p in pools)
            raise BudgetUnreachable(f"budget of {target_params:,} params is unreachable for {self.name}: its "
                            f"{what} hold {lo:,}..{hi:,} params; choose another budget")
        if share == 0:
            heads, channels = 0, max(1, min(n_channels, round(target_params / per_channel)))
        elif share == 1:
            heads, channels = max(1, min(n_heads, round(target_params / per_head))), 0
        else:
            heads = min(n_heads, round(share * target_params / per_head))
            channels = min(n_channels, max(0, round((target_params - heads * per_head) / per_channel)))
            if channels == n_channels:  # the MLP pool is full: the rest goes to heads
                heads = min(n_heads, round((target_params - channels * per_channel) / per_head))
        achieved = heads * per_head + channels * per_channel
        detail: dict[str, Any] = {"heads": heads, "channels": channels, "attn_share": share, "head_dim": hd,
                                  "allocation": self.allocation}
        if self.allocation == "even":  # model_wide: the per-layer counts are drawn in prepare (method_info)
            detail.update(heads_per_layer=_spread(heads, len(attn)), channels_per_layer=_spread(channels, len(mlp)))
        return Plan(target_params, achieved, detail)

    # --- selection ---
    def _targets(self, model: nn.Module) -> tuple[list[str], list[str]]:
        """The names of the attention and of the MLP matrices, each in layer order."""
        def named(suffix: str) -> list[str]:
            return [n for n, m in model.named_modules()
                    if n.rsplit(".", 1)[-1] == suffix and isinstance(m, (nn.Linear, ColumnSliceLinear))]

        return named(self.attn_module), named(self.mlp_module)

    def _unit_scores(self, weight: torch.Tensor, unit: int, stat: Optional[torch.Tensor]) -> torch.Tensor:
        """One score per unit of `unit` input columns: the strategy's per-column score summed over the unit."""
        w = weight.detach().float()
        if self.strategy == "weight":
            col = w.square().sum(0)
        else:
            assert stat is not None
            stat = stat.to(w.device)
            col = stat.sqrt() * w.abs().sum(0) if self.strategy == "weight_activation" else stat
        return col.reshape(-1, unit).sum(1).cpu()

    def _selection(self, model: nn.Module, plan: Plan, seed: int,
                   stats: Optional[dict[str, torch.Tensor]] = None) -> dict[str, list[int]]:
        modules = dict(model.named_modules())
        attn, mlp = self._targets(model)
        hd = plan.detail["head_dim"]
        out: dict[str, list[int]] = {}
        kinds = ((attn, hd, "heads"), (mlp, 1, "channels"))
        if self.allocation == "even":
            gen = torch.Generator().manual_seed(seed)
            for names, unit, kind in kinds:
                for name, k in zip(names, plan.detail[f"{kind}_per_layer"]):
                    if not k:
                        continue
                    weight = modules[name].weight
                    if self.strategy == "random":
                        units = torch.randperm(weight.shape[1] // unit, generator=gen)[:k]
                    else:
                        units = _top(self._unit_scores(weight, unit, (stats or {}).get(name)), k, self.largest)
                    out[name] = _columns(units, unit)
            return out
        rng = random.Random(seed)  # the reference: random.sample over all (layer, unit) pairs, heads then channels
        for names, unit, kind in kinds:
            per = modules[names[0]].weight.shape[1] // unit
            k = plan.detail[kind]
            if self.strategy == "random":
                picked = torch.tensor(rng.sample(range(len(names) * per), k), dtype=torch.long)
            else:
                scores = torch.cat([self._unit_scores(modules[n].weight, unit, (stats or {}).get(n)) for n in names])
                picked = _top(scores, k, self.largest)
            for i, name in enumerate(names):
                mine = picked[(picked >= i * per) & (picked < (i + 1) * per)] - i * per
                if len(mine):
                    out[name] = _columns(mine, unit)
        return out

    # --- calibration (activation, weight_activation, gradient) ---
    def _calibrate(self, model: nn.Module, names: list[str], context: Context) -> tuple[dict[str, torch.Tensor], dict]:
        """Per input column of each named linear: Σ x² over the calibration's real tokens (activation,
        weight_activation) or Σ_i G_ij² of the gradient summed over the calibration batches (gradient); each
        rank's sums are all-reduced first."""
        linears = {n: model.get_submodule(n) for n in names}
        world, t0 = context.world, time.perf_counter()
        device = next(iter(linears.values())).weight.device
        tokens = torch.zeros((), dtype=torch.float64, device=device)
        n_batches = self.calibration_steps * context.accumulation
        was = model.training
        handles = []
        if self.strategy == "gradient":
            acc = {n: torch.zeros(l.weight.shape, dtype=torch.float32, device=l.weight.device)
                   for n, l in linears.items()}
            nbytes = sum(a.numel() * a.element_size() for a in acc.values())

            def grad_hook(name):
                def hook(p):
                    acc[name].add_(p.grad.detach().float())
                    p.grad = None  # one weight gradient alive at a time
                return hook

            flags = {id(p): p.requires_grad for p in model.parameters()}
            for p in model.parameters():
                p.requires_grad_(False)
            try:
                for n, l in linears.items():
                    l.weight.requires_grad_(True)
                    handles.append(l.weight.register_post_accumulate_grad_hook(grad_hook(n)))
                model.train()
                for batch in context.batches(n_batches):
                    tokens += batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
                    context.loss(model, batch).backward()
            finally:
                for h in handles:
                    h.remove()
                for p in model.parameters():
                    p.requires_grad_(flags[id(p)])
                    p.grad = None
                model.train(was)
            stats = {}
            for n in list(acc):  # one accumulator at a time: the temporaries stay small
                stats[n] = world.all_reduce(acc.pop(n)).square().sum(0)
        else:
            sq = {n: torch.zeros(l.in_features, dtype=torch.float32, device=l.weight.device)
                  for n, l in linears.items()}
            nbytes = sum(a.numel() * a.element_size() for a in sq.values())
            mask: list[Optional[torch.Tensor]] = [None]

            def act_hook(name):
                def hook(module, args):
                    x = args[0].detach()
                    x = x[mask[0]] if mask[0] is not None else x.reshape(-1, x.shape[-1])
                    sq[name] += x.float().square().sum(0)
                return hook

            try:
                handles = [l.register_forward_pre_hook(act_hook(n)) for n, l in linears.items()]
                model.eval()
                with torch.no_grad():
                    for batch in context.batches(n_batches):
                        m = batch.get("attention_mask")
                        mask[0] = None if m is None else m.bool()
                        tokens += batch["input_ids"].numel() if m is None else m.sum()
                        context.loss(model, batch)
            finally:
                for h in handles:
                    h.remove()
                model.train(was)
            stats = {n: world.all_reduce(s) for n, s in sq.items()}
        info = {"strategy": self.strategy, "steps": self.calibration_steps, "batches_per_rank": n_batches,
                "tokens": int(world.all_reduce(tokens)), "accumulator_bytes": nbytes,
                "time_s": time.perf_counter() - t0}
        return stats, info

    def prepare(self, model: nn.Module, plan: Plan, context: Context | None) -> "S2FTTuned":
        seed = self.selection_seed if self.selection_seed is not None else (context.seed if context else 0)
        stats, info = None, None
        if self.strategy in CALIBRATED:
            if context is None:
                raise UserError(f"method.strategy={self.strategy} needs the method's batch stream to calibrate on")
            attn, mlp = self._targets(model)
            stats, info = self._calibrate(model, attn + mlp, context)
        return self._build(model, self._selection(model, plan, seed, stats), plan.detail["head_dim"], info)

    def resume(self, model: nn.Module, plan: Plan, context: Context | None, state: dict[str, torch.Tensor],
               meta: dict[str, Any]) -> "S2FTTuned":
        # the checkpoint's selection, whatever the strategy would pick now: no calibration pass again
        tuned = self._build(model, meta["columns"], plan.detail["head_dim"], meta.get("calibration"))
        tuned.load_state_dict(state, meta)
        return tuned

    def _build(self, model: nn.Module, columns: dict[str, list[int]], head_dim: int,
               calibration: Optional[dict] = None) -> "S2FTTuned":
        for p in model.parameters():
            p.requires_grad_(False)
        for name, cols in columns.items():
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, child, ColumnSliceLinear(getattr(owner, child), torch.tensor(cols)))
        return S2FTTuned(self, model, columns, head_dim, calibration)


class S2FTTuned(Tuned):
    method: S2FT

    def __init__(self, method: S2FT, model: nn.Module, columns: dict[str, list[int]], head_dim: int = 1,
                 calibration: Optional[dict] = None) -> None:
        super().__init__(method, model)
        self.columns, self.head_dim, self.calibration = columns, head_dim, calibration

    def _sliced(self) -> list[tuple[str, ColumnSliceLinear]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, ColumnSliceLinear)]

    def per_layer(self) -> dict[str, list[int]]:
        """Heads and channels of each layer, in layer order (layers without any count 0)."""
        out = {}
        for names, kind, unit in zip(self.method._targets(self.model), ("heads", "channels"), (self.head_dim, 1)):
            out[f"{kind}_per_layer"] = [len(self.columns.get(n, ())) // unit for n in names]
        return out

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, _ = super().state_dict()
        return tensors, {"columns": self.columns, **({"calibration": self.calibration} if self.calibration else {})}

    def report(self) -> dict[str, Any]:
        return {"columns": self.columns, **self.per_layer(),
                **({"calibration": self.calibration} if self.calibration else {})}

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
