"""A model after SMT's prepare: its block-sparse layers, their optimizer, checkpoints, report and export.

Everything the warm-up and selection decided lives here (not on the frozen SMT config), so one config
can prepare any number of models and the report can be read before or after merging.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from ..base import Tuned
from .layer import SMTLinear
from .optim import BlockAdamW

if TYPE_CHECKING:
    from ...kernels import Backend
    from .method import SMT

PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
        "down": "down_proj"}


def _layer_index(name: str) -> int | None:
    return next((int(p) for p in name.split(".") if p.isdigit()), None)


class SMTTuned(Tuned):
    method: SMT

    def __init__(self, method: SMT, model: nn.Module, layers: dict[str, SMTLinear], block_size: int,
                 backend: Backend, warmup_info: dict[str, Any], eligible_per_proj: dict[str, int]) -> None:
        super().__init__(method, model)
        self.layers, self.block_size, self.backend = layers, block_size, backend
        self.warmup_info, self.eligible_per_proj = warmup_info, eligible_per_proj
        # taken now: merged() turns the layers back into nn.Linear
        self._report = self._make_report()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [l.blocks for l in self.layers.values()]

    def build_optimizer(self, betas: Iterable[float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
        return BlockAdamW(list(self.layers.values()), lr=self.method.lr, betas=betas, eps=eps,
                          weight_decay=self.method.weight_decay)

    # --- checkpoints: the selection and the trained blocks; the warm-up is not redone on resume ---
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for n, l in self.layers.items():
            tensors[f"{n}.rows"], tensors[f"{n}.cols"] = l.rows, l.cols
            tensors[f"{n}.blocks"] = l.blocks.detach()
        if self.method.warmup_mode == "update":  # the warm-up changed every weight: the sparse phase starts there
            tensors.update({f"warmed.{n}": p.detach() for n, p in self.model.named_parameters()
                            if not n.endswith(".blocks")})
        meta = {"block_size": self.block_size, "warmup": self.warmup_info, "eligible_per_proj": self.eligible_per_proj,
                "layers": list(self.layers)}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if sorted(meta["layers"]) != sorted(self.layers):
            raise ValueError("checkpoint's SMT layers differ from this model's")
        for n, l in self.layers.items():
            if not (torch.equal(tensors[f"{n}.rows"].cpu(), l.rows.cpu())
                    and torch.equal(tensors[f"{n}.cols"].cpu(), l.cols.cpu())):
                raise ValueError(f"checkpoint's block selection of {n} differs from this model's")
            l.load_blocks(tensors[f"{n}.blocks"].to(l.blocks.device))

    # --- after training ---
    def block_map(self) -> list[list[Any]]:
        return [[_layer_index(n), n.rsplit(".", 1)[1], int(r), int(c)]
                for n, l in self.layers.items() for r, c in zip(l.rows.tolist(), l.cols.tolist())]

    def _make_report(self) -> dict[str, Any]:
        cfg = self.method
        bmap = self.block_map()
        per_proj = Counter(b[1] for b in bmap)
        total = max(len(bmap), 1)
        share = {PROJ[p]: per_proj.get(PROJ[p], 0) / total for p in cfg.projections}
        return {
            "kernels_backend": self.backend.name,
            "warmup": self.warmup_info,
            "selection": cfg.selection,
            "block_size": self.block_size,
            "block_map_columns": ["layer", "projection", "row_block", "col_block"],
            "block_map": bmap,
            "block_share": share,
            "summary": {"block_share": dict(share)},
            "eligible_blocks": {PROJ[p]: self.eligible_per_proj.get(PROJ[p], 0) for p in cfg.projections},
            "selected_blocks": {PROJ[p]: per_proj.get(PROJ[p], 0) for p in cfg.projections},
            "saved_input": {n: ("full" if l.shared.keep_full else f"{l.shared.union_cols.numel()} col-blocks")
                            for n, l in self.layers.items()},
        }

    def report(self) -> dict[str, Any]:
        return self._report

    def export(self, directory: str | Path, base_model: str) -> list[str]:
        from .export import save_delta

        path = f"{directory}/smt_delta.safetensors"
        save_delta(self.layers, self.block_size, path, base_model)
        return [path]

    def merged(self) -> nn.Module:
        for n, layer in self.layers.items():
            parent, child = n.rsplit(".", 1)
            setattr(self.model.get_submodule(parent), child, layer.to_linear())
        self.layers = {}
        return self.model
