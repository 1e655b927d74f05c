"""Triton kernels for the SMT block operations.

Why kernels at all: the batched PyTorch path must gather (T, k, B) copies of dy and x before its
bmm, and per-block loops (the reference SMT code) launch k tiny matmuls. Here each program reads its
block's columns in place by pointer arithmetic, and the token reduction is split across programs
(split-K) because SMT selects few blocks per layer: with k = 1..30 blocks of 256² the block grid
alone cannot fill a GPU, the token dimension (thousands) can.

Importing this module needs triton; `smt_bench.kernels` imports it lazily. On CPU it works only
under TRITON_INTERPRET=1, which triton reads when the kernels are defined (at import).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources
from torch import Tensor

from .torch_ops import TRITON_BLOCK_SIZES, adamw_scalars, check_adamw_args, check_wgrad_args

__all__ = ["block_weight_grad", "block_adamw_step_", "INTERPRETED"]


@triton.jit
def _block_wgrad_kernel(
    dy_ptr, xs_ptr, rows_ptr, slots_ptr, out_ptr,
    T, tokens_per_split, out_split_stride,
    stride_dy_t, stride_dy_c, stride_x_t, stride_x_c,
    B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    TILES_N: tl.constexpr, TILES_PER_BLOCK: tl.constexpr,
    USE_ATOMIC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # program (pid, split): one BLOCK_M x BLOCK_N tile of one selected block, one token range
    pid = tl.program_id(0)
    split = tl.program_id(1)
    blk = pid // TILES_PER_BLOCK
    tile = pid % TILES_PER_BLOCK
    offs_m = (tile // TILES_N) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile % TILES_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.load(rows_ptr + blk)  # int64: column offsets cannot overflow
    s = tl.load(slots_ptr + blk)
    a_cols = (r * B + offs_m) * stride_dy_c
    b_cols = (s * B + offs_n) * stride_x_c

    t_start = split * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, T)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_start, t_end, BLOCK_T):
        offs_t = t + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_end
        offs_t64 = offs_t.to(tl.int64)
        # dy block read transposed (BLOCK_M, BLOCK_T) straight from memory: no tl.trans needed
        a = tl.load(dy_ptr + a_cols[:, None] + offs_t64[None, :] * stride_dy_t,
                    mask=mask_t[None, :], other=0.0)
        b = tl.load(xs_ptr + offs_t64[:, None] * stride_x_t + b_cols[None, :],
                    mask=mask_t[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    out_ptrs = (out_ptr + split.to(tl.int64) * out_split_stride + blk.to(tl.int64) * (B * B)
                + offs_m[:, None] * B + offs_n[None, :])
    if USE_ATOMIC:
        tl.atomic_add(out_ptrs, acc, sem="relaxed")
    else:
        tl.store(out_ptrs, acc)


@triton.jit
def _block_adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, rows_ptr, cols_ptr,
    stride_w0, stride_w1,
    one_minus_beta1, beta2, one_minus_beta2, eps, decay, neg_step_size, bc2_sqrt,
    B: tl.constexpr, BLOCK: tl.constexpr, APPLY_DECAY: tl.constexpr, LERP_FROM_END: tl.constexpr,
):
    # program (block, chunk): BLOCK contiguous elements of one selected block
    blk = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    idx = blk * (B * B) + offs
    p = tl.load(p_ptr + idx)
    g = tl.load(g_ptr + idx)
    m = tl.load(m_ptr + idx)
    v = tl.load(v_ptr + idx)

    # torch.optim.AdamW's op order; host scalars come pre-rounded like torch's, and sqrt/div are
    # the correctly rounded ones (Triton's defaults on GPU are approximations)
    if APPLY_DECAY:
        p = p * decay
    if LERP_FROM_END:  # torch's lerp switches formula at weight 0.5
        m = g - (g - m) * (1.0 - one_minus_beta1)
    else:
        m = m + one_minus_beta1 * (g - m)
    v = v * beta2
    v = v + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt + tl.zeros_like(v)) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)

    tl.store(p_ptr + idx, p)
    tl.store(m_ptr + idx, m)
    tl.store(v_ptr + idx, v)
    r = tl.load(rows_ptr + blk)
    c = tl.load(cols_ptr + blk)
    w_offs = (r * B + offs // B) * stride_w0 + (c * B + offs % B) * stride_w1
    tl.store(w_ptr + w_offs, p.to(w_ptr.dtype.element_ty))


INTERPRETED: bool = type(_block_wgrad_kernel).__name__ == "InterpretedFunction"


def _check_runnable(t: Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRETED:
        raise ValueError("triton kernels on CPU tensors need TRITON_INTERPRET=1 set before import; "
                         "or use kernels=torch")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: any small number; only decides the split heuristic


def _wgrad_config(B: int, dtype: torch.dtype) -> dict:
    """Tile sizes: 128x128 output tiles for big blocks (shared memory: 2 x 128 x BLOCK_T x 2-4 bytes
    per stage), the whole block otherwise. Interpreted runs use whole-block tiles (fewer programs)
    and short token tiles so that small test inputs still exercise masking and split-K."""
    if INTERPRETED:
        return dict(BLOCK_M=B, BLOCK_N=B, BLOCK_T=16, num_warps=4, num_stages=1)
    fp32 = dtype == torch.float32
    if B >= 128:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_T=32 if fp32 else 64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=B, BLOCK_N=B, BLOCK_T=64, num_warps=4, num_stages=3)


def _choose_split(n_tiles: int, T: int, block_t: int, device: torch.device) -> int:
    """Enough programs for ~2 waves, but at least 4 token tiles per program so each keeps its
    pipeline busy and the atomics stay a small fraction of the traffic."""
    t_chunks = triton.cdiv(T, block_t)
    want = triton.cdiv(2 * _num_sms(device), n_tiles)
    return max(1, min(want, t_chunks // 4))


def block_weight_grad(dy: Tensor, xs: Tensor, rows: Tensor, slots: Tensor, block_size: int, *,
                      validate: bool = True, split_k: int | None = None,
                      deterministic: bool | None = None) -> Tensor:
    """All k blocks of dW = dyᵀ·xs in one launch, fp32 accumulation, split-K over tokens.

    split_k overrides the heuristic (1 = no split). Split partial sums meet through fp32 atomics,
    whose order varies run to run; deterministic=True (default: torch's deterministic-algorithms
    flag) writes per-split partials and sums them in a second pass instead.
    """
    rows, slots, _, _ = check_wgrad_args(dy, xs, rows, slots, block_size, validate, TRITON_BLOCK_SIZES)
    _check_runnable(dy)
    B, k, T = int(block_size), rows.numel(), dy.shape[0]
    if k == 0 or T == 0:
        return torch.zeros((k, B, B), dtype=torch.float32, device=dy.device)
    cfg = _wgrad_config(B, dy.dtype)
    tiles_n = B // cfg["BLOCK_N"]
    tiles_per_block = (B // cfg["BLOCK_M"]) * tiles_n
    split = split_k if split_k is not None else _choose_split(k * tiles_per_block, T, cfg["BLOCK_T"], dy.device)
    if split < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    tokens_per_split = triton.cdiv(triton.cdiv(T, split), cfg["BLOCK_T"]) * cfg["BLOCK_T"]
    split = triton.cdiv(T, tokens_per_split)  # drop splits that would have no tokens
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    use_atomic = split > 1 and not deterministic
    n_partials = split if (split > 1 and deterministic) else 1
    alloc = torch.zeros if use_atomic else torch.empty
    out = alloc((n_partials, k, B, B), dtype=torch.float32, device=dy.device)
    precision = None
    if dy.dtype == torch.float32:
        precision = "tf32" if (dy.is_cuda and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    grid = (k * tiles_per_block, split)
    launch = lambda stages: _block_wgrad_kernel[grid](  # noqa: E731
        dy, xs, rows, slots, out,
        T, tokens_per_split, k * B * B if n_partials > 1 else 0,
        dy.stride(0), dy.stride(1), xs.stride(0), xs.stride(1),
        B=B, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_T=cfg["BLOCK_T"],
        TILES_N=tiles_n, TILES_PER_BLOCK=tiles_per_block,
        USE_ATOMIC=use_atomic, INPUT_PRECISION=precision,
        num_warps=cfg["num_warps"], num_stages=stages,
    )
    try:
        launch(cfg["num_stages"])
    except OutOfResources:  # GPUs with ~100 KB shared memory: a shallower pipeline fits
        if cfg["num_stages"] <= 2:
            raise
        launch(2)
    return out.sum(0) if n_partials > 1 else out[0]


def block_adamw_step_(blocks: Tensor, grads: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                      weight: Tensor, rows: Tensor, cols: Tensor, *, lr: float, beta1: float,
                      beta2: float, eps: float, weight_decay: float, step: int,
                      validate: bool = True) -> None:
    """AdamW update of all selected blocks and their write-back into the dense weight, one launch:
    each element is read once and written twice (master fp32, weight in its own dtype)."""
    rows, cols, B = check_adamw_args(blocks, grads, exp_avg, exp_avg_sq, weight, rows, cols, step, validate,
                                 TRITON_BLOCK_SIZES)
    _check_runnable(blocks)
    for name, t in (("blocks", blocks), ("grads", grads), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the triton AdamW kernel")
    k = blocks.shape[0]
    if k == 0:
        return
    s = adamw_scalars(lr, beta1, beta2, weight_decay, step)
    block = min(B * B, 4096 if INTERPRETED else 1024)
    _block_adamw_kernel[(k, (B * B) // block)](
        blocks, grads, exp_avg, exp_avg_sq, weight, rows, cols,
        weight.stride(0), weight.stride(1),
        1 - beta1, beta2, 1 - beta2, eps, s["decay"], -s["step_size"], s["bc2_sqrt"],
        B=B, BLOCK=block, APPLY_DECAY=weight_decay != 0, LERP_FROM_END=(1 - beta1) >= 0.5,
        num_warps=4,
    )
