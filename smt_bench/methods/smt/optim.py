"""AdamW over SMT blocks whose step also writes the new blocks into the dense weights.

One kernel call per layer (fused in Triton, vectorised in torch): the dense weight is updated
once per optimizer step, never per forward.
"""
from __future__ import annotations

import torch


class BlockAdamW(torch.optim.Optimizer):
    def __init__(self, layers, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.layers = {id(l.blocks): l for l in layers}
        super().__init__([l.blocks for l in layers], dict(lr=lr, betas=tuple(betas), eps=eps,
                                                           weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                layer = self.layers[id(p)]
                layer.backend.block_adamw_step_(p, p.grad, st["exp_avg"], st["exp_avg_sq"], layer.weight,
                                                layer.rows, layer.cols, lr=group["lr"], beta1=b1, beta2=b2,
                                                eps=group["eps"], weight_decay=group["weight_decay"],
                                                step=st["step"], validate=False)
        return loss
