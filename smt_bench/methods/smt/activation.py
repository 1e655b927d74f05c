"""Activation-based block scores: how large each eligible matrix's inputs are during the warm-up.

The reference's alternative to gradients (`--channel_sparsity`, deepspeed/fine_tune.py and
smt_helper.select_channel_based_on_activation): forward passes only (no backward, no optimizer step),
a hook on each linear adds |x| of its input, and the input channels with the largest mean |x| train.
Here the statistic is per input channel over the warm-up's real tokens (padding excluded; the
reference also sums padded positions), and a B×B block scores the mean over its B input channels, so
the budget, the block grid and the top-k are SMT's own. Every row block of one column block scores
the same (the signal says nothing about output rows): the top-k takes whole column stripes, and
where a stripe is cut by k the lower rows are taken (the stable order). q, k and v read one input, so
their stripes score alike too, as in the reference's selections.
"""
from __future__ import annotations

import torch
from torch import nn

# method.score -> the per-channel statistic: the mean |x| (the reference's mean_abs; abs_mean and l1
# rank the blocks the same, as every matrix sees the same tokens) or the root mean square (l2)
STATISTIC = {"abs_mean": "mean_abs", "mean_abs": "mean_abs", "l1": "mean_abs", "l2": "rms"}


class ActivationScorer:
    """Sums |x| and x² per input channel of the given linears while installed; `mask` (set per batch)
    marks the real tokens."""

    def __init__(self, linears: dict[str, nn.Linear], block_size: int, kind: str):
        if kind not in STATISTIC:
            raise ValueError(f"unknown score {kind!r}; choose one of {tuple(STATISTIC)}")
        self.block_size, self.statistic = block_size, STATISTIC[kind]
        self.mask: torch.Tensor | None = None
        self.abs_sum = {n: torch.zeros(l.in_features, device=l.weight.device) for n, l in linears.items()}
        self.sq_sum = {n: torch.zeros(l.in_features, device=l.weight.device) for n, l in linears.items()}
        self.tokens = torch.zeros((), device=next(iter(linears.values())).weight.device)
        self._handles = [l.register_forward_pre_hook(self._hook(n)) for n, l in linears.items()]

    @property
    def accumulator_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.abs_sum, self.sq_sum) for t in d.values())

    def _hook(self, name):
        def hook(module, args):
            x = args[0].detach()
            x = x[self.mask] if self.mask is not None else x.reshape(-1, x.shape[-1])
            x = x.float()
            self.abs_sum[name] += x.abs().sum(dim=0)
            self.sq_sum[name] += x.square().sum(dim=0)
        return hook

    def count(self, batch: dict[str, torch.Tensor]) -> None:
        """The next forward's real tokens (every position when the batch has no attention mask)."""
        mask = batch.get("attention_mask")
        self.mask = None if mask is None else mask.bool()
        self.tokens += batch["input_ids"].numel() if self.mask is None else self.mask.sum()

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def finish(self, reduce=lambda t: t) -> dict[str, torch.Tensor]:
        """Scores per column block of each matrix, (d_in/B,); `reduce` sums the ranks' sums first."""
        self.remove()
        tokens = float(reduce(self.tokens))
        scores = {}
        for n in list(self.abs_sum):
            a, q = reduce(self.abs_sum.pop(n)), reduce(self.sq_sum.pop(n))
            if self.statistic == "mean_abs":
                scores[n] = (a / tokens).unflatten(0, (-1, self.block_size)).mean(dim=1)
            else:  # a block's RMS over its columns: the mean of the squares, then the root
                scores[n] = (q / tokens).unflatten(0, (-1, self.block_size)).mean(dim=1).sqrt()
        return scores


def run_activation_warmup(model: nn.Module, linears: dict[str, nn.Linear], cfg, block_size: int,
                          context) -> tuple[dict[str, torch.Tensor], int]:
    """Forward passes over the warm-up batches (eval mode, no gradients); the block scores of every
    eligible matrix (summed over ranks) and the bytes the statistic held."""
    scorer = ActivationScorer(linears, block_size, cfg.score)
    nbytes = scorer.accumulator_bytes
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in context.batches(cfg.warmup_steps * context.accumulation):
                scorer.count(batch)
                context.loss(model, batch)
        cols = scorer.finish(context.world.all_reduce)
    finally:
        scorer.remove()
        model.train(was)
    scores = {n: c.unsqueeze(0).expand(linears[n].out_features // block_size, -1).contiguous()
              for n, c in cols.items()}
    return scores, nbytes
