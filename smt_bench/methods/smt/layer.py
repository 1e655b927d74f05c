"""Block-sparse linear layer: dense frozen weight in forward, gradients only for selected blocks.

The dense weight is the one tensor forward reads; the selected B×B blocks are one fp32 parameter
(k, B, B), the only trainable tensor, written back into the weight once per optimizer step. Backward
computes dX densely and dW only for the selected blocks, from a real copy of just the input
column-blocks those need. Modules that read the same input (q/k/v, gate/up) share one such copy.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn


class SharedInput:
    """The saved input columns of a group of layers that read the same tensor.

    The first layer of the group to see an input gathers the union of the group's selected
    column-blocks (or keeps the input itself when the union covers most of it); the others reuse
    that tensor, so autograd holds one copy per group instead of one per module.
    """

    _version: int  # x_ref's version when its columns were saved (set with _src)

    def __init__(self, union_cols: torch.Tensor, n_col_blocks: int, block_size: int, full_threshold: float):
        self.block_size = block_size
        self.keep_full = union_cols.numel() >= full_threshold * n_col_blocks
        self.union_cols = union_cols  # sorted unique column-block indices
        # slot of each column block inside the saved tensor
        slot = torch.full((n_col_blocks,), -1, dtype=torch.long)
        slot[union_cols] = torch.arange(union_cols.numel())
        self.slot_of = torch.arange(n_col_blocks) if self.keep_full else slot
        self._src: weakref.ref[torch.Tensor] | None = None
        self._saved: weakref.ref[torch.Tensor] | None = None

    def saved_columns(self, x2d: torch.Tensor, x_ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # Any, not Tensor | None: mypy would narrow x_ref to that type on `src is x_ref`
        src: Any = self._src() if self._src is not None else None
        saved = self._saved() if self._saved is not None else None
        if src is x_ref and saved is not None and self._version == x_ref._version and saved.dtype == dtype:
            return saved
        if self.keep_full:
            saved = x2d.to(dtype)
        else:
            B = self.block_size
            cols = self.union_cols.to(x2d.device)
            saved = x2d.unflatten(1, (-1, B)).index_select(1, cols).flatten(1).to(dtype)
        # weak references only: autograd owns the saved copy (freed after backward), and a freed
        # input can never be mistaken for a new one at the same address
        self._src, self._version, self._saved = weakref.ref(x_ref), x_ref._version, weakref.ref(saved)
        return saved

    def release(self):
        self._src = self._saved = None


class _SMTLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, blocks, layer):
        x2d = x.reshape(-1, x.shape[-1])
        weight = layer.weight
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.nn.functional.linear(x2d.to(dtype), weight.to(dtype),
                                       None if layer.bias is None else layer.bias.to(dtype))
        ctx.layer = layer  # weight and indices are parameters/buffers, alive anyway: not saved tensors
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        if blocks.requires_grad and blocks.shape[0] > 0:
            ctx.save_for_backward(layer.shared.saved_columns(x2d, x, dtype))
        else:
            ctx.save_for_backward(None)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        layer = ctx.layer
        (xs,) = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1])
        dx = dblocks = None
        if ctx.needs_input_grad[0]:
            dx = (dy2d @ layer.weight.to(dy2d.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1] and xs is not None:
            dblocks = layer.backend.block_weight_grad(dy2d.to(xs.dtype), xs, layer.rows, layer.slots,
                                                      layer.block_size, validate=False)
        return dx, dblocks, None


class SMTLinear(nn.Module):
    """Drop-in for nn.Linear whose trainable part is the `blocks` parameter (k, B, B)."""

    def __init__(self, linear: nn.Linear, rows: torch.Tensor, cols: torch.Tensor, block_size: int,
                 shared: SharedInput, backend):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.block_size = block_size
        dev = self.weight.device
        self.register_buffer("rows", rows.to(dev), persistent=False)
        self.register_buffer("cols", cols.to(dev), persistent=False)
        self.register_buffer("slots", shared.slot_of[cols].to(dev), persistent=False)
        self.shared = shared
        self.backend = backend
        with torch.no_grad():
            init = self.weight.unflatten(0, (-1, block_size)).unflatten(2, (-1, block_size))
            init = init[self.rows, :, self.cols, :] if rows.numel() else init.new_zeros((0, block_size, block_size))
        # fp32 master copy (float64 stays float64, for exact tests)
        self.blocks = nn.Parameter(init.to(torch.promote_types(init.dtype, torch.float32)).clone())

    def forward(self, x):
        return _SMTLinearFn.apply(x, self.blocks, self)

    @torch.no_grad()
    def load_blocks(self, values: torch.Tensor) -> None:
        """Restores trained blocks (a checkpoint's): the fp32 master copy and the dense weight that holds
        them, as the optimizer step leaves them."""
        self.blocks.copy_(values)
        if self.rows.numel():
            B = self.block_size
            view = self.weight.unflatten(0, (-1, B)).unflatten(2, (-1, B))
            view[self.rows, :, self.cols, :] = self.blocks.to(self.weight.dtype)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this layer's dense weight (which already holds the blocks)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta")
        lin.weight = self.weight
        if self.bias is not None:
            lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"blocks={self.rows.numel()}x{self.block_size}x{self.block_size}, backend={self.backend.name}")
