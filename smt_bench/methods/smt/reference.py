"""The reference implementation's way of training SMT blocks, for benchmarks only: one parameter per
block, copied into the dense weight before every forward, the full input saved for backward, and dW
block by block in a Python loop (docs/smt.md §9: the reference code's facts). smt-bench's SMTLinear is measured
against it."""
from __future__ import annotations

import torch
from torch import nn


class _ReferenceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer, *blocks):
        ctx.save_for_backward(x)
        ctx.layer = layer
        return nn.functional.linear(x, layer.weight, layer.bias)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        layer, B = ctx.layer, ctx.layer.block_size
        dx = dy @ layer.weight.to(dy.dtype)
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        grads = [(dy2[:, r * B:(r + 1) * B].T @ x2[:, c * B:(c + 1) * B]).float() for r, c in layer.index]
        return (dx, None, *grads)


class ReferenceBlockLinear(nn.Module):
    def __init__(self, smt_layer):
        super().__init__()
        self.weight, self.bias, self.block_size = smt_layer.weight, smt_layer.bias, smt_layer.block_size
        self.index = list(zip(smt_layer.rows.tolist(), smt_layer.cols.tolist()))
        self.blocks = nn.ParameterList([nn.Parameter(b.detach().clone()) for b in smt_layer.blocks])

    def forward(self, x):
        B = self.block_size
        with torch.no_grad():
            for (r, c), b in zip(self.index, self.blocks):
                self.weight[r * B:(r + 1) * B, c * B:(c + 1) * B].copy_(b)
        return _ReferenceFn.apply(x, self, *self.blocks)


def to_reference(tuned) -> list[nn.Parameter]:
    """Swaps an SMTTuned model's block layers for reference-style ones; returns their parameters."""
    model = tuned.model
    for name, layer in list(tuned.layers.items()):
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, ReferenceBlockLinear(layer))
    return [p for p in model.parameters() if p.requires_grad]
