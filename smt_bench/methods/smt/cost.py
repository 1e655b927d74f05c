"""SMT's cost terms for the forecast (smt_bench/forecast/): what its training step and its warm-up hold and
compute beyond the frozen model, from shapes and the plan alone.

Which blocks the warm-up selects is not known before it runs: the k blocks are counted as spread evenly over the
layers and over the eligible matrices in proportion to their sizes (the forecast says so in its notes).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .tuned import PROJ

if TYPE_CHECKING:
    from ...forecast.model import Cost
    from ..base import Plan
    from .method import SMT

from .method import SIBLINGS  # noqa: E402


def smt_cost(method: "SMT", shapes: Any, plan: "Plan") -> "Cost":
    """- trainable: the k fp32 blocks (k·B²), beside the dense weight that holds them (added parameters);
    - saved for backward: per group of linears that read one input (q/k/v; gate/up) the union of their blocks'
      column-blocks, or the whole input once the union covers `full_input_threshold` of it (o_proj's whole input is
      the attention output, saved anyway); expected union of b blocks over n column-blocks: n·(1 − (1 − 1/n)^b);
    - dW for the blocks only (2·k·B² FLOPs per token), dX through every layer;
    - its own layers keep no bf16 copy of their weight for backward (they recast it there);
    - the torch kernels' block gathers in backward (two (T, k, B) copies per layer); Triton (CUDA) has none;
    - BlockAdamW: per layer, its denominator and the cast blocks (no trainable-sized temporary);
    - the warm-up (Warmup): grad_sum keeps one fp32 copy of every eligible weight (on the device, or in host memory
      with pinned staging buffers for accumulator_device=cpu); score_sum only the block scores, but each step's
      statistic copies the gradient; at most one dense weight gradient is alive at a time (score_only);
      warmup_mode=update is full fine-tuning; signal=activation is forward passes only."""
    from ...forecast.model import Arch, Cost, Warmup

    arch = Arch.from_shapes(shapes)
    B = int(plan.detail["block_size"])
    k = int(plan.detail["blocks"])
    L = max(arch.layers, 1)
    names = {PROJ[p] for p in method.projections}
    mats = [(s, o, i) for s, o, i in arch.layer_linear if s in names]
    eligible_layer = sum(o * i for _, o, i in mats)
    per_layer = k / L
    blocks_of = {s: per_layer * o * i / max(eligible_layer, 1) for s, o, i in mats}  # one layer's, per matrix
    saved = 0.0
    for group in [g & names for g in SIBLINGS] + [{s} for s in names if not any(s in g for g in SIBLINGS)]:
        members = [(s, o, i) for s, o, i in mats if s in group]
        if not members:
            continue
        d_in = members[0][2]
        n_cols = d_in // B
        b = sum(blocks_of[s] for s, _, _ in members)
        union = n_cols * (1 - (1 - 1 / n_cols) ** b) if n_cols else 0.0
        if union >= method.full_input_threshold * n_cols:
            saved += 0.0 if members[0][0] == "o_proj" else d_in
        else:
            saved += union * B
    trained = k * B * B
    # matrices holding at least one block: their SMT layer keeps no bf16 weight copy (its own backward recasts)
    n_mats = len(mats) * L
    with_blocks = sum(o * i for _, o, i in mats) * L * (1 - (1 - 1 / max(n_mats, 1)) ** k) if n_mats else 0
    gather = 2.0 * max(blocks_of.values(), default=0.0) * B
    largest = max((4 * o * i for _, o, i in mats), default=0)
    eligible = eligible_layer * L
    warm = None
    if method.signal == "activation":
        warm = Warmup(passes=method.warmup_steps, backward=False, trained_linear=0, trained_inputs=0.0,
                      device_bytes=4 * sum(i for _, _, i in mats) * L, host_bytes=0, grad_temp=0,
                      what="activation warm-up: forward passes, per-channel statistics")
    else:
        grad_sum = method.score_accumulation == "grad_sum"
        host = grad_sum and method.accumulator_device == "cpu"
        acc = 4 * eligible if grad_sum else 4 * eligible // (B * B)
        inputs = L * sum(_input_once(arch, g & names) for g in SIBLINGS) + \
            L * sum(i for s, _, i in mats if not any(s in g for g in SIBLINGS) and s != "o_proj")
        warm = Warmup(passes=method.warmup_steps, backward=True, trained_linear=eligible, trained_inputs=inputs,
                      device_bytes=0 if host else acc, host_bytes=2 * acc if host else 0,
                      grad_temp=largest * (1 if grad_sum else 2), full_ft=method.warmup_mode == "update",
                      what=f"warm-up {method.warmup_mode}, {method.score_accumulation}"
                           + (f" on {method.accumulator_device}" if grad_sum else ""))
    notes = ("smt: blocks counted as spread evenly over the layers and eligible matrices (the warm-up decides where "
             "they go)",)
    return Cost(trainable=trained, added=trained, trained_linear=trained, trained_inputs=L * saved,
                backward_temp=0.0 if method.kernels == "triton" else gather,  # kernels=auto: torch on the CPU
                backward_temp_cuda=gather if method.kernels == "torch" else 0.0, no_cast_linear=int(with_blocks),
                optimizer="blocks", optimizer_temp=int(8 * max(blocks_of.values(), default=0.0) * B * B),
                warmup=warm, notes=notes)


def _input_once(arch: Any, group: set[str]) -> int:
    """One layer's input of a group of linears that read the same tensor (0 for an empty group)."""
    return next((i for s, _, i in arch.layer_linear if s in group), 0)
