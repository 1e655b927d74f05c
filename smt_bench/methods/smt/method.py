"""Sparse Matrix Tuning (He et al., 2024): warm-up block scores, global top-k, block-sparse training."""
from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...distributed import World
from ...errors import BudgetUnreachable, UserError
from ...kernels import BACKENDS
from ...kernels.torch_ops import TRITON_BLOCK_SIZES
from ...models import ModelShapes
from ...schema.spec import above, count, invalid, one_of, optional, param, subset_of, within
from ..base import Context, Method, Plan
from .layer import SharedInput, SMTLinear
from .scoring import ACCUMULATIONS, ACCUMULATOR_DEVICES, SCORES
from .selection import SELECTIONS, select
from .tuned import PROJ, SMTTuned
from .warmup import run_warmup

if TYPE_CHECKING:
    from ...forecast.model import Cost

SIBLINGS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})  # modules that read one input
WARMUP_MODES = ("score_only", "update")
SIGNALS = ("gradient", "activation")  # what scores the blocks in the warm-up
POWERS_OF_TWO = (8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class SMT(Method):
    """Each key's default is here only (conf/method/smt.yaml sets name and lr); the paper's values:
    conf/recipe_method/paper_commonsense_smt.yaml. What each key is in SMT: docs/smt.md §11."""

    # the largest block size allowed: plan() takes the largest size <= it that divides the model (SmolLM2: 64)
    block_size: int = param(256, count(1))
    warmup_steps: int = param(4, count(1))  # paper: 100 (its recipe); sized for the embedded CPU run
    # score_only: hooks reduce grads to block scores, no optimizer | update: the reference's (full-FT steps)
    warmup_mode: str = param("score_only", one_of(WARMUP_MODES))
    warmup_lr: float = param(9.65e-6, above(0))  # used by warmup_mode=update
    # gradient | activation: warm-up forward passes, mean |x| per input channel (the reference's channel
    # sparsity), as blocks
    signal: str = param("gradient", one_of(SIGNALS))
    # abs_mean | mean_abs | l1 | l2 (the reference: mean_abs by default, abs_mean in its README)
    score: str = param("abs_mean", one_of(SCORES))
    # grad_sum: Σ raw gradients, one statistic at the end (the reference's estimator) | score_sum: Σ per-step
    # statistics
    score_accumulation: str = param("grad_sum", one_of(ACCUMULATIONS))
    # same (the weights' device) | cpu (host memory, the reference's placement; for 7B-scale warm-ups)
    accumulator_device: str = param("same", one_of(ACCUMULATOR_DEVICES))
    # the eligible matrices: any of q, k, v, o, gate, up, down
    projections: list[str] = param(valid=subset_of(PROJ), factory=lambda: ["q", "k", "v"])
    selection: str = param("global", one_of(SELECTIONS))  # global | per_matrix | attn_mlp (separate attention / MLP pools)
    # attn_mlp: the attention pool's share of k (null: by pool size)
    attn_share: float | None = param(None, optional(within(0, 1, lo_open=True, hi_open=True), "(by pool size)"))
    kernels: str = param("auto", one_of(BACKENDS))  # auto (triton on CUDA) | triton | torch
    # save the whole shared input when the selected columns cover this much of it
    full_input_threshold: float = param(0.8, within(0, 1))

    @staticmethod
    def check_config(cfg, at: str) -> None:
        if cfg.signal == "activation" and cfg.warmup_mode != "score_only":
            raise invalid(f"{at}.warmup_mode", cfg.warmup_mode, f"score_only with {at}.signal=activation (its "
                          f"warm-up is forward passes only, as the reference's channel selection)")
        if cfg.attn_share is not None and cfg.selection != "attn_mlp":
            raise invalid(f"{at}.attn_share", cfg.attn_share, f"null unless {at}.selection=attn_mlp (it splits k "
                          f"between the attention and MLP pools; selection is {cfg.selection})")
        if cfg.kernels == "triton" and cfg.block_size < min(TRITON_BLOCK_SIZES):
            raise invalid(f"{at}.block_size", cfg.block_size, f"at least {min(TRITON_BLOCK_SIZES)} with "
                          f"{at}.kernels=triton (its sizes: {', '.join(map(str, TRITON_BLOCK_SIZES))}; or "
                          f"kernels=torch for any size)")

    # --- planning (shapes only) ---
    def _eligible(self, shapes: ModelShapes):
        mats = shapes.select(PROJ[p] for p in self.projections)
        if not mats:
            raise UserError(f"method.projections={list(self.projections)} matches no linear layer of this model")
        return mats

    def block_size_for(self, shapes: ModelShapes) -> int:
        """The largest block size <= method.block_size that divides every eligible matrix, so one config
        serves every model: one of the kernels' sizes (powers of two; kernels=torch also takes any size,
        method.block_size itself included)."""
        mats = self._eligible(shapes)
        sizes = set(POWERS_OF_TWO) | {self.block_size} if self.kernels == "torch" else set(TRITON_BLOCK_SIZES)
        fits = [b for b in sizes if b <= self.block_size and all(m.d_out % b == 0 and m.d_in % b == 0 for m in mats)]
        if not fits:
            dims = sorted({d for m in mats for d in (m.d_out, m.d_in)})
            valid = sorted(b for b in sizes if all(d % b == 0 for d in dims))
            raise UserError(f"no block size <= method.block_size={self.block_size} divides the eligible matrices "
                            f"(dimensions {dims}); set method.block_size to at least {valid[0] if valid else 1}"
                            + ("" if valid else " with method.kernels=torch"))
        return max(fits)

    def plan(self, shapes: ModelShapes, target_params: int) -> Plan:
        mats = self._eligible(shapes)
        B = self.block_size_for(shapes)
        B2 = B * B
        k = round(target_params / B2)
        total = sum(m.d_out * m.d_in for m in mats) // B2
        if k < 1:
            raise BudgetUnreachable(f"budget of {target_params:,} params is below one {B}x{B} block; raise the budget "
                            f"or lower method.block_size")
        if k > total:
            raise BudgetUnreachable(f"budget of {target_params:,} params needs {k} blocks but {list(self.projections)} have "
                            f"only {total} blocks of {B}x{B}; lower the budget or add method.projections")
        return Plan(target_params, k * B2, {"block_size": B, "blocks": k, "eligible_blocks": total,
                                            "eligible_params": total * B2})

    def cost(self, shapes: ModelShapes, plan: Plan) -> "Cost":
        """Its step's and warm-up's cost terms for the forecast (smt_bench/methods/smt/cost.py)."""
        from .cost import smt_cost

        return smt_cost(self, shapes, plan)

    # --- prepare: warm-up, selection, block-sparse layers ---
    def _linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        names = {m.name for m in self._eligible(_shapes(model))}
        return {n: m for n, m in model.named_modules() if n in names}

    def prepare(self, model: nn.Module, plan: Plan, context: Context) -> SMTTuned:
        linears = self._linears(model)
        scores, info = run_warmup(model, linears, self, plan.detail["block_size"], context)
        chosen = select(scores, plan.detail["blocks"], self.selection, self.attn_share)
        _same_on_every_rank(chosen, context.world)
        return self._build(model, linears, plan.detail["block_size"], chosen, info, context)

    def resume(self, model: nn.Module, plan: Plan, context: Context, state: dict[str, torch.Tensor],
               meta: dict[str, Any]) -> SMTTuned:
        """The checkpoint's selection, without the warm-up (update mode: its warmed-up weights too)."""
        if meta["block_size"] != plan.detail["block_size"]:
            raise ValueError(f"checkpoint has block size {meta['block_size']}, the plan {plan.detail['block_size']}")
        warmed = {n[len("warmed."):]: t for n, t in state.items() if n.startswith("warmed.")}
        if warmed:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, t in warmed.items():
                    params[n].copy_(t)
        linears = self._linears(model)
        chosen = {n: torch.stack([state[f"{n}.rows"], state[f"{n}.cols"]], dim=1).cpu() for n in meta["layers"]}
        tuned = self._build(model, linears, meta["block_size"], chosen, meta["warmup"], context)
        tuned.load_state_dict(state, meta)
        return tuned

    def _build(self, model: nn.Module, linears: dict[str, nn.Linear], B: int, chosen: dict[str, torch.Tensor],
               warmup_info: dict[str, Any], context: Context) -> SMTTuned:
        from ...kernels import get_backend

        for p in model.parameters():
            p.requires_grad_(False)
        eligible: defaultdict[str, int] = defaultdict(int)
        for n, m in linears.items():
            eligible[n.rsplit(".", 1)[1]] += m.weight.numel() // (B * B)
        try:
            backend = get_backend(self.kernels, context.device)
        except ValueError as e:
            raise UserError(str(e)) from None
        groups: defaultdict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
        for n, sel in chosen.items():
            if sel.shape[0]:
                parent, child = n.rsplit(".", 1)
                sib = next((tuple(sorted(s)) for s in SIBLINGS if child in s), (child,))
                groups[(parent, sib)].append(n)
        layers: dict[str, SMTLinear] = {}
        for (parent, _), members in groups.items():
            union = torch.unique(torch.cat([chosen[n][:, 1] for n in members]))
            shared = SharedInput(union, linears[members[0]].in_features // B, B, self.full_input_threshold)
            for n in members:
                layer = SMTLinear(linears[n], chosen[n][:, 0], chosen[n][:, 1], B, shared, backend)
                setattr(model.get_submodule(parent), n.rsplit(".", 1)[1], layer)
                layers[n] = layer
        return SMTTuned(self, model, layers, B, backend, warmup_info, dict(eligible))


def _same_on_every_rank(chosen: dict[str, torch.Tensor], world: World) -> None:
    """The scores were all-reduced, so every rank's top-k is the same; a rank that disagreed (other data,
    other code) would train other blocks than the rest and its DDP gradients would mean nothing. Checked."""
    if not world.distributed:
        return
    digest = 0
    for n in sorted(chosen):
        digest = zlib.crc32(n.encode() + chosen[n].to(torch.int64).cpu().numpy().tobytes(), digest)
    hi, neg_lo = world.reduce_floats([digest, -digest], "max")
    if hi != -neg_lo:
        raise RuntimeError(f"rank {world.rank}: SMT selected other blocks than another rank (all-reduced scores "
                           f"should make them equal); check that every rank runs the same code and data")


def _shapes(model: nn.Module) -> ModelShapes:
    from ...models import shapes_of

    return shapes_of(model)
