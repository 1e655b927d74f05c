"""Sparse Matrix Tuning (He et al., 2024): warm-up block scores, global top-k, block-sparse training."""
from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import UserError
from ...kernels import BACKENDS
from ...kernels.torch_ops import TRITON_BLOCK_SIZES
from ...models import ModelShapes
from ...schema.spec import above, count, invalid, one_of, optional, param, subset_of, within
from ..base import Method, Plan, Warmup
from .layer import SharedInput, SMTLinear
from .optim import BlockAdamW
from .scoring import ACCUMULATIONS, ACCUMULATOR_DEVICES, SCORES, BlockScorer
from .selection import SELECTIONS, select

PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
        "down": "down_proj"}
SIBLINGS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})  # modules that read one input
WARMUP_MODES = ("score_only", "update")


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    return next((int(p) for p in parts if p.isdigit()), None)


@dataclass
class SMT(Method):
    block_size: int = param(256, count(1))
    warmup_steps: int = param(100, count(1))
    warmup_mode: str = param("score_only", one_of(WARMUP_MODES))
    warmup_lr: float = param(9.65e-6, above(0))  # warmup_mode=update
    score: str = param("abs_mean", one_of(SCORES))
    score_accumulation: str = param("grad_sum", one_of(ACCUMULATIONS))  # grad_sum: the reference's estimator
    accumulator_device: str = param("same", one_of(ACCUMULATOR_DEVICES))  # cpu: the reference's placement
    projections: list[str] = param(valid=subset_of(PROJ), factory=lambda: ["q", "k", "v"])
    selection: str = param("global", one_of(SELECTIONS))
    attn_share: float | None = param(None, optional(within(0, 1, lo_open=True, hi_open=True), "(by pool size)"))
    kernels: str = param("auto", one_of(BACKENDS))
    full_input_threshold: float = param(0.8, within(0, 1))

    @staticmethod
    def check_config(cfg, at: str) -> None:
        if cfg.attn_share is not None and cfg.selection != "attn_mlp":
            raise invalid(f"{at}.attn_share", cfg.attn_share, f"null unless {at}.selection=attn_mlp (it splits k "
                          f"between the attention and MLP pools; selection is {cfg.selection})")
        if cfg.kernels == "triton" and cfg.block_size not in TRITON_BLOCK_SIZES:
            raise invalid(f"{at}.block_size", cfg.block_size, f"one of {', '.join(map(str, TRITON_BLOCK_SIZES))} "
                          f"with {at}.kernels=triton (or kernels=torch for any size)")

    def __post_init__(self):
        super().__post_init__()
        self._layers: dict[str, SMTLinear] = {}
        self._warmup_info: dict = {}

    # --- planning (shapes only) ---
    def _eligible(self, shapes: ModelShapes):
        mats = shapes.select(PROJ[p] for p in self.projections)
        if not mats:
            raise UserError(f"method.projections={list(self.projections)} matches no linear layer of this model")
        B = self.block_size
        for m in mats:
            if m.d_out % B or m.d_in % B:
                g = math.gcd(*[d for x in mats for d in (x.d_out, x.d_in)])
                valid = [b for b in (8, 16, 32, 64, 128, 256, 512) if g % b == 0]
                raise UserError(f"block size {B} does not divide {m.name} ({m.d_out}x{m.d_in}); "
                                f"set method.block_size to one of {valid}")
        return mats

    def plan(self, shapes: ModelShapes, target_params: int) -> Plan:
        mats = self._eligible(shapes)
        B2 = self.block_size ** 2
        k = round(target_params / B2)
        total = sum(m.d_out * m.d_in for m in mats) // B2
        if k < 1:
            raise UserError(f"budget of {target_params:,} params is below one {self.block_size}x{self.block_size} "
                            f"block; raise the budget or lower method.block_size")
        if k > total:
            raise UserError(f"budget of {target_params:,} params needs {k} blocks but {list(self.projections)} have "
                            f"only {total} blocks of {self.block_size}x{self.block_size}; lower the budget or add "
                            f"method.projections")
        return Plan(target_params, k * B2, {"block_size": self.block_size, "blocks": k, "eligible_blocks": total,
                                            "eligible_params": total * B2})

    # --- warm-up and selection ---
    def _warmup(self, model: nn.Module, linears: dict[str, nn.Linear], warmup: Warmup) -> dict[str, torch.Tensor]:
        score_only = self.warmup_mode == "score_only"
        for p in model.parameters():
            p.requires_grad_(not score_only)
        for l in linears.values():
            l.weight.requires_grad_(True)
        scorer = BlockScorer(linears, self.block_size, self.score, free_grads=score_only,
                             accumulation=self.score_accumulation, accumulator_device=self.accumulator_device)
        accumulator_bytes = scorer.accumulator_bytes
        opt = None if score_only else torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=self.warmup_lr, weight_decay=0.0)
        was = model.training
        model.train()
        t0 = time.perf_counter()
        try:
            for batch in warmup.batches(self.warmup_steps):
                warmup.loss(model, batch).backward()
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            scores = scorer.finish()  # the block statistic of the sums; accumulators freed
        finally:
            scorer.remove()
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
            model.train(was)
        self._warmup_info = {"steps": self.warmup_steps, "mode": self.warmup_mode, "score": self.score,
                             "accumulation": self.score_accumulation,
                             "accumulator_device": self.accumulator_device if accumulator_bytes else None,
                             "accumulator_bytes": accumulator_bytes, "time_s": time.perf_counter() - t0}
        return scores

    def prepare(self, model: nn.Module, plan: Plan, warmup: Warmup) -> nn.Module:
        from ...kernels import get_backend

        names = {m.name for m in self._eligible(_shapes(model))}
        linears = {n: m for n, m in model.named_modules() if n in names}
        B = self.block_size
        self._eligible_per_proj: dict[str, int] = {}
        for n, m in linears.items():
            proj = n.rsplit(".", 1)[1]
            self._eligible_per_proj[proj] = self._eligible_per_proj.get(proj, 0) + m.weight.numel() // (B * B)
        scores = self._warmup(model, linears, warmup)
        chosen = select(scores, plan.detail["blocks"], self.selection, self.attn_share)
        device = next(model.parameters()).device
        try:
            backend = get_backend(self.kernels, device)
        except ValueError as e:
            raise UserError(str(e)) from None
        groups = defaultdict(list)
        for n, sel in chosen.items():
            if sel.shape[0]:
                parent, child = n.rsplit(".", 1)
                sib = next((tuple(sorted(s)) for s in SIBLINGS if child in s), (child,))
                groups[(parent, sib)].append(n)
        self._layers = {}
        for (parent, _), members in groups.items():
            union = torch.unique(torch.cat([chosen[n][:, 1] for n in members]))
            shared = SharedInput(union, linears[members[0]].in_features // B, B, self.full_input_threshold)
            for n in members:
                layer = SMTLinear(linears[n], chosen[n][:, 0], chosen[n][:, 1], B, shared, backend)
                setattr(model.get_submodule(parent), n.rsplit(".", 1)[1], layer)
                self._layers[n] = layer
        self._backend = backend
        return model

    # --- training and after ---
    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [l.blocks for l in self._layers.values()]

    def build_optimizer(self, params, betas=(0.9, 0.999), eps=1e-8) -> torch.optim.Optimizer:
        return BlockAdamW(list(self._layers.values()), lr=self.lr, betas=betas, eps=eps,
                          weight_decay=self.weight_decay)

    def export(self, model: nn.Module, directory, base_model: str) -> list[str]:
        from .export import save_delta

        path = f"{directory}/smt_delta.safetensors"
        save_delta(self, path, base_model)
        return [path]

    def merged(self, model: nn.Module) -> nn.Module:
        for n, layer in self._layers.items():
            parent, child = n.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, layer.to_linear())
        self._layers = {}
        return model

    def block_map(self) -> list[list]:
        return [[_layer_index(n), n.rsplit(".", 1)[1], int(r), int(c)]
                for n, l in self._layers.items() for r, c in zip(l.rows.tolist(), l.cols.tolist())]

    def report(self, model: nn.Module) -> dict:
        bmap = self.block_map()
        per_proj = Counter(b[1] for b in bmap)
        total = max(len(bmap), 1)
        return {
            "kernels_backend": self._backend.name,
            "warmup": self._warmup_info,
            "selection": self.selection,
            "block_size": self.block_size,
            "block_map_columns": ["layer", "projection", "row_block", "col_block"],
            "block_map": bmap,
            "block_share": {PROJ[p]: per_proj.get(PROJ[p], 0) / total for p in self.projections},
            "summary": {"block_share": {PROJ[p]: per_proj.get(PROJ[p], 0) / total for p in self.projections}},
            "eligible_blocks": {PROJ[p]: self._eligible_per_proj.get(PROJ[p], 0) for p in self.projections},
            "selected_blocks": {PROJ[p]: per_proj.get(PROJ[p], 0) for p in self.projections},
            "saved_input": {n: ("full" if l.shared.keep_full else f"{l.shared.union_cols.numel()} col-blocks")
                            for n, l in self._layers.items()},
        }


def _shapes(model: nn.Module) -> ModelShapes:
    from ...models import shapes_of

    return shapes_of(model)
