"""Warm-up block scores, from gradients taken inside backward as they are produced.

Two estimators (`method.score_accumulation`):
- grad_sum (the reference's): a post-accumulate-grad hook adds each eligible weight's raw, signed
  gradient into an fp32 accumulator and frees the gradient; after the last warm-up step the block
  statistic is computed once from the sum (docs/smt.md §2–§3: warmup_grads[key] += grad.float(), then e.g.
  mean |ΣG| per block). Accumulators hold one fp32 copy of every eligible weight, on the weight's device
  or (`accumulator_device=cpu`, the reference's placement) in host memory.
- score_sum: each step's gradient is reduced to block statistics at once and those add up
  (Σ_t mean|G_t|): only the (rows/B × cols/B) scores are kept, but signs that cancel across steps in
  the sum of gradients do not cancel here, so the ranking differs from the reference's.
Either way, in score_only mode at most one dense weight gradient is alive at a time and no optimizer
state exists.
"""
from __future__ import annotations

import torch
from torch import nn

SCORES = ("abs_mean", "mean_abs", "l1", "l2")
ACCUMULATIONS = ("grad_sum", "score_sum")
ACCUMULATOR_DEVICES = ("same", "cpu")


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
    """Collects warm-up gradients of the given named linears while installed; `finish()` gives the
    block scores (and frees everything it held)."""

    def __init__(self, linears: dict[str, nn.Linear], block_size: int, kind: str, free_grads: bool,
                 accumulation: str = "grad_sum", accumulator_device: str = "same"):
        if kind not in SCORES or accumulation not in ACCUMULATIONS or accumulator_device not in ACCUMULATOR_DEVICES:
            raise ValueError(f"unknown score {kind!r}, accumulation {accumulation!r} or device {accumulator_device!r}")
        self.block_size, self.kind, self.free_grads, self.accumulation = block_size, kind, free_grads, accumulation
        self.acc: dict[str, torch.Tensor] = {}
        self.scores: dict[str, torch.Tensor] = {}
        self._pending: dict[str, tuple] = {}  # name -> (event, pinned staging buffer): copies in flight
        self._staging: dict[str, torch.Tensor] = {}
        for n, l in linears.items():
            w = l.weight
            if accumulation == "score_sum":
                self.scores[n] = torch.zeros(w.shape[0] // block_size, w.shape[1] // block_size, device=w.device)
                continue
            host = accumulator_device == "cpu" and w.device.type != "cpu"
            self.acc[n] = torch.zeros(w.shape, dtype=torch.float32, device="cpu" if host else w.device,
                                      pin_memory=host)
        self._handles = [l.weight.register_post_accumulate_grad_hook(self._hook(n)) for n, l in linears.items()]

    @property
    def accumulator_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.acc.values())

    def _hook(self, name):
        def hook(p):
            if self.accumulation == "score_sum":
                self.scores[name] += block_score(p.grad, self.block_size, self.kind)
            else:
                self._accumulate(name, p.grad)
            if self.free_grads:
                p.grad = None
        return hook

    def _accumulate(self, name: str, grad: torch.Tensor) -> None:
        acc = self.acc[name]
        if acc.device == grad.device:
            acc.add_(grad.detach().float())
            return
        # device -> pinned host buffer without stalling backward; the add waits for that copy only.
        # Freeing the gradient right after is safe: the allocator orders its reuse after the copy.
        self._drain(name)
        buf = self._staging.get(name)
        if buf is None:
            buf = self._staging[name] = torch.empty(grad.shape, dtype=grad.dtype, pin_memory=True)
        buf.copy_(grad.detach(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending[name] = (event, buf)

    def _drain(self, name: str) -> None:
        if name in self._pending:
            event, buf = self._pending.pop(name)
            event.synchronize()
            self.acc[name].add_(buf.float())

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def snapshot(self, kind: str | None = None) -> dict[str, torch.Tensor]:
        """Block scores of what has been collected so far, without releasing it (a warm-up of the first
        t steps gives exactly these: score_only warm-up does not change the weights). grad_sum can give
        any score kind from its sums; score_sum only its own."""
        kind = kind or self.kind
        for name in list(self._pending):
            self._drain(name)
        if self.accumulation == "score_sum":
            if kind != self.kind:
                raise ValueError(f"score_sum collected {self.kind} scores, not {kind}")
            return {n: s.clone() for n, s in self.scores.items()}
        return {n: block_score(a, self.block_size, kind) for n, a in self.acc.items()}

    def finish(self, reduce=lambda t: t) -> dict[str, torch.Tensor]:
        """Block scores per matrix (on the weight's device for score_sum, the accumulator's for grad_sum);
        the accumulators and staging buffers are released. `reduce` sums what each rank collected (the
        gradient sums, or the score sums) before the statistic, so every rank selects the same blocks."""
        self.remove()
        for name in list(self._pending):
            self._drain(name)
        self._staging.clear()
        if self.accumulation == "grad_sum":
            for n in list(self.acc):  # one accumulator at a time: the statistic's temporaries stay small
                self.scores[n] = block_score(reduce(self.acc.pop(n)), self.block_size, self.kind)
        else:
            self.scores = {n: reduce(s) for n, s in self.scores.items()}
        return self.scores
