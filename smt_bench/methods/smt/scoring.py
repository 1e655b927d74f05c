"""Warm-up block scores, reduced from each gradient inside backward as it is produced.

A post-accumulate-grad hook turns a weight's gradient into its (rows/B × cols/B) block scores and,
in score_only mode, frees the gradient at once: the warm-up needs no optimizer state and at most
one dense weight gradient alive at a time. Scores add up over warm-up steps (each step's block
score), which is what a hook that frees the gradient can compute.
"""
from __future__ import annotations

import torch
from torch import nn

SCORES = ("abs_mean", "mean_abs", "l1", "l2")


def block_score(grad: torch.Tensor, block_size: int, kind: str) -> torch.Tensor:
    g = grad.float().unflatten(0, (-1, block_size)).unflatten(2, (-1, block_size))  # (nR, B, nC, B)
    if kind == "abs_mean":
        return g.abs().mean(dim=(1, 3))
    if kind == "mean_abs":
        return g.mean(dim=(1, 3)).abs()
    if kind == "l1":
        return g.abs().sum(dim=(1, 3))
    if kind == "l2":
        return g.square().sum(dim=(1, 3)).sqrt()
    raise ValueError(f"unknown score {kind!r}; choose one of {SCORES}")


class BlockScorer:
    """Accumulates block scores for the given named linears while installed."""

    def __init__(self, linears: dict[str, nn.Linear], block_size: int, kind: str, free_grads: bool):
        self.block_size, self.kind, self.free_grads = block_size, kind, free_grads
        self.scores = {n: torch.zeros(l.out_features // block_size, l.in_features // block_size,
                                      device=l.weight.device) for n, l in linears.items()}
        self.steps = 0
        self._handles = [l.weight.register_post_accumulate_grad_hook(self._hook(n)) for n, l in linears.items()]

    def _hook(self, name):
        def hook(p):
            self.scores[name] += block_score(p.grad, self.block_size, self.kind)
            if self.free_grads:
                p.grad = None
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []
