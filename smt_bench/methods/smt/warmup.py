"""SMT's warm-up: a few steps on the method's own batch stream whose gradients (or, with
`method.signal=activation`, input activations: activation.py) score the blocks.

score_only (default) reduces gradients to scores inside backward and never changes a weight;
update (the reference's) also takes AdamW steps on the whole model at `warmup_lr`, so the weights the
sparse phase starts from are the warmed-up ones.

In score_only mode a warm-up step is one global batch, as a training step is: `context.accumulation`
batches on every rank; each rank collects its own share and the sums are all-reduced before the
statistic. In update mode (as in the reference) every batch is an AdamW step: one batch per rank,
whose whole-model gradients are averaged over the ranks first, so every rank's weights stay the same
(the scorer's hooks read each backward's gradient, which accumulation would make cumulative).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..base import Context
from .activation import STATISTIC, run_activation_warmup
from .scoring import BlockScorer


def run_warmup(model: nn.Module, linears: dict[str, nn.Linear], cfg, block_size: int,
               context: Context) -> tuple[dict[str, torch.Tensor], dict]:
    """Returns the block scores of each eligible matrix (summed over ranks) and the facts for the report."""
    if cfg.signal == "activation":
        t0 = time.perf_counter()
        scores, nbytes = run_activation_warmup(model, linears, cfg, block_size, context)
        return scores, {"signal": "activation", "steps": cfg.warmup_steps, "mode": "forward_only",
                        "score": f"{STATISTIC[cfg.score]} of the input per channel", "accumulation": None,
                        "accumulator_device": None, "accumulator_bytes": nbytes,
                        "time_s": time.perf_counter() - t0}
    score_only = cfg.warmup_mode == "score_only"
    for p in model.parameters():
        p.requires_grad_(not score_only)
    for l in linears.values():
        l.weight.requires_grad_(True)
    scorer = BlockScorer(linears, block_size, cfg.score, free_grads=score_only,
                         accumulation=cfg.score_accumulation, accumulator_device=cfg.accumulator_device)
    accumulator_bytes = scorer.accumulator_bytes
    opt = None if score_only else torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.warmup_lr, weight_decay=0.0)
    was = model.training
    model.train()
    t0 = time.perf_counter()
    world = context.world
    try:
        for batch in context.batches(cfg.warmup_steps * (context.accumulation if score_only else 1)):
            context.loss(model, batch).backward()
            if opt is not None:
                if world.distributed:
                    for p in opt.param_groups[0]["params"]:
                        if p.grad is not None:
                            world.all_reduce(p.grad).div_(world.world_size)
                opt.step()
                opt.zero_grad(set_to_none=True)
        scores = scorer.finish(context.world.all_reduce)  # the block statistic of the sums; accumulators freed
    finally:
        scorer.remove()
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        model.train(was)
    info = {"signal": "gradient", "steps": cfg.warmup_steps, "mode": cfg.warmup_mode, "score": cfg.score,
            "accumulation": cfg.score_accumulation,
            "accumulator_device": cfg.accumulator_device if accumulator_bytes else None,
            "accumulator_bytes": accumulator_bytes, "time_s": time.perf_counter() - t0}
    return scores, info
