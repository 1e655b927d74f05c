"""PyTorch implementations of the SMT block operations.

These are the numerical reference for the Triton kernels and the fallback wherever Triton cannot
run (CPU, no Triton installed). Both operations are vectorised over the k selected blocks so the
fallback does not degrade into the per-block Python loop of the reference SMT code.

The argument checks live here too so that both backends reject exactly the same inputs.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["block_weight_grad", "block_adamw_step_", "naive_block_weight_grad"]

TRITON_BLOCK_SIZES = (16, 32, 64, 128, 256)  # what the Triton kernels are written for; torch takes any
_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# argument checks (shared with triton_ops)
# --------------------------------------------------------------------------------------------
def _as_index(idx: Tensor, name: str, device: torch.device) -> Tensor:
    """Index tensors may arrive as any integer dtype or on the host; the kernels want int64 here."""
    if not isinstance(idx, Tensor) or idx.dim() != 1:
        raise ValueError(f"{name} must be a 1-D integer tensor, got {getattr(idx, 'shape', type(idx))}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got {idx.dtype}")
    return idx.to(device=device, dtype=torch.long).contiguous()


def _check_range(idx: Tensor, name: str, bound: int) -> None:
    """Costs a host sync on GPU, hence optional (validate=False) for the hot path."""
    if idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= bound:
        raise ValueError(f"{name} out of range: values span [{lo}, {hi}] but must lie in [0, {bound})")


def check_wgrad_args(dy: Tensor, xs: Tensor, rows: Tensor, slots: Tensor, block_size: int,
                     validate: bool = True, sizes: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor, int, int]:
    """Returns int64 (rows, slots) on dy's device plus the row- and column-block counts."""
    B = int(block_size)
    if B < 1 or (sizes is not None and B not in sizes):
        raise ValueError(f"block_size must be one of {sizes or 'the positive integers'}, got {block_size}")
    if dy.dim() != 2 or xs.dim() != 2:
        raise ValueError(f"dy and xs must be 2-D (tokens, features); got {tuple(dy.shape)} and {tuple(xs.shape)}")
    if dy.shape[0] != xs.shape[0]:
        raise ValueError(f"dy and xs disagree on the token count: {dy.shape[0]} vs {xs.shape[0]}")
    if not dy.dtype.is_floating_point or dy.dtype != xs.dtype:
        raise ValueError(f"dy and xs must share one floating dtype, got {dy.dtype} and {xs.dtype}")
    if dy.device != xs.device:
        raise ValueError(f"dy and xs must be on one device, got {dy.device} and {xs.device}")
    if dy.shape[1] % B or xs.shape[1] % B:
        raise ValueError(f"d_out={dy.shape[1]} and xs width={xs.shape[1]} must be divisible by block_size={B}")
    rows = _as_index(rows, "rows", dy.device)
    slots = _as_index(slots, "slots", dy.device)
    if rows.numel() != slots.numel():
        raise ValueError(f"rows and slots must have the same length k, got {rows.numel()} and {slots.numel()}")
    n_rows, n_slots = dy.shape[1] // B, xs.shape[1] // B
    if validate:
        _check_range(rows, "rows", n_rows)
        _check_range(slots, "slots", n_slots)
    return rows, slots, n_rows, n_slots


def check_adamw_args(blocks: Tensor, grads: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                     weight: Tensor, rows: Tensor, cols: Tensor, step: int,
                     validate: bool = True, sizes: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor, int]:
    """Returns int64 (rows, cols) on the blocks' device and the block size."""
    if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
        raise ValueError(f"blocks must be (k, B, B), got {tuple(blocks.shape)}")
    B = blocks.shape[1]
    if sizes is not None and B not in sizes:
        raise ValueError(f"block size must be one of {sizes}, got {B}")
    for name, t in (("blocks", blocks), ("grads", grads), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != blocks.shape:
            raise ValueError(f"{name} must have shape {tuple(blocks.shape)}, got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 (master copy / optimizer state), got {t.dtype}")
        if t.device != blocks.device:
            raise ValueError(f"{name} is on {t.device} but blocks are on {blocks.device}")
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be a 2-D floating tensor, got {tuple(weight.shape)} {weight.dtype}")
    if weight.device != blocks.device:
        raise ValueError(f"weight is on {weight.device} but blocks are on {blocks.device}")
    if weight.shape[0] % B or weight.shape[1] % B:
        raise ValueError(f"weight shape {tuple(weight.shape)} is not divisible by block size {B}")
    if int(step) < 1:
        raise ValueError(f"step is the 1-based count after increment; got {step}")
    rows = _as_index(rows, "rows", blocks.device)
    cols = _as_index(cols, "cols", blocks.device)
    k = blocks.shape[0]
    if rows.numel() != k or cols.numel() != k:
        raise ValueError(f"rows/cols must have k={k} entries, got {rows.numel()} and {cols.numel()}")
    if validate:
        n_r, n_c = weight.shape[0] // B, weight.shape[1] // B
        _check_range(rows, "rows", n_r)
        _check_range(cols, "cols", n_c)
        if k and torch.unique(rows * n_c + cols).numel() != k:
            raise ValueError("rows/cols select the same block twice; the write-back would be ambiguous")
    return rows, cols, B


def adamw_scalars(lr: float, beta1: float, beta2: float, weight_decay: float, step: int) -> dict:
    """Host-side scalars computed in float64 exactly as torch.optim.AdamW does, so that both
    backends round the same numbers to fp32."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    return dict(
        decay=1 - lr * weight_decay,
        step_size=lr / bias_correction1,
        bc2_sqrt=bias_correction2 ** 0.5,
    )


# --------------------------------------------------------------------------------------------
# operations
# --------------------------------------------------------------------------------------------
def block_weight_grad(dy: Tensor, xs: Tensor, rows: Tensor, slots: Tensor, block_size: int, *,
                      validate: bool = True) -> Tensor:
    """Selected blocks of dW = dyᵀ·xs as one batched matmul over gathered block columns.

    The gather costs two (T, k, B) copies; that is the price of using a stock bmm and the reason
    the Triton kernel exists. Accumulation is fp32: half inputs use bmm's fp32 output on CUDA and
    an fp32 upcast elsewhere (a half-precision output would round and could overflow).
    """
    rows, slots, n_rows, n_slots = check_wgrad_args(dy, xs, rows, slots, block_size, validate)
    B, k, T = int(block_size), rows.numel(), dy.shape[0]
    acc = torch.promote_types(dy.dtype, torch.float32)  # fp32 at least; float64 stays float64 (tests)
    if k == 0 or T == 0:
        return torch.zeros((k, B, B), dtype=acc, device=dy.device)
    a = dy.unflatten(1, (n_rows, B)).index_select(1, rows).permute(1, 2, 0)  # (k, B, T)
    b = xs.unflatten(1, (n_slots, B)).index_select(1, slots).transpose(0, 1)  # (k, T, B)
    if dy.dtype in _HALF and dy.is_cuda:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # older torch / unsupported arch
            pass
    return torch.bmm(a.to(acc), b.to(acc))


def block_adamw_step_(blocks: Tensor, grads: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                      weight: Tensor, rows: Tensor, cols: Tensor, *, lr: float, beta1: float,
                      beta2: float, eps: float, weight_decay: float, step: int,
                      validate: bool = True) -> None:
    """AdamW on the fp32 master blocks, then one scatter of the cast blocks into the dense weight.

    The op sequence mirrors torch.optim.AdamW's single-tensor path (lerp, addcmul, addcdiv) so the
    results agree bit for bit on CPU; writing back once per optimizer step (not per forward) is the
    point of keeping the dense weight as the forward's only copy.
    """
    rows, cols, B = check_adamw_args(blocks, grads, exp_avg, exp_avg_sq, weight, rows, cols, step, validate)
    if blocks.shape[0] == 0:
        return
    s = adamw_scalars(lr, beta1, beta2, weight_decay, step)
    if weight_decay != 0:
        blocks.mul_(s["decay"])
    exp_avg.lerp_(grads, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / s["bc2_sqrt"]).add_(eps)
    blocks.addcdiv_(exp_avg, denom, value=-s["step_size"])
    # Splitting a dimension is always a view, so this writes through to `weight` for any strides.
    grid = weight.unflatten(0, (weight.shape[0] // B, B)).unflatten(2, (weight.shape[1] // B, B))
    grid.permute(0, 2, 1, 3)[rows, cols] = blocks.to(weight.dtype)


def naive_block_weight_grad(dy: Tensor, xs: Tensor, rows, slots, block_size: int) -> Tensor:
    """Float64 per-block loop: the obviously-correct definition the fast paths are tested against."""
    B = int(block_size)
    out = torch.zeros((len(rows), B, B), dtype=torch.float64)
    dy64, xs64 = dy.detach().cpu().double(), xs.detach().cpu().double()
    for i, (r, s) in enumerate(zip(torch.as_tensor(rows).tolist(), torch.as_tensor(slots).tolist())):
        out[i] = dy64[:, r * B:(r + 1) * B].T @ xs64[:, s * B:(s + 1) * B]
    return out
