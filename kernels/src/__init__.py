"""SMT block kernels: the block-sparse weight gradient and the fused block AdamW + write-back.

Two backends with one interface, chosen by `get_backend`: Triton for CUDA, PyTorch everywhere
else (and as the reference). Triton is imported only when asked for, so machines without it (or
without a GPU) can still import this package and train with kernels=torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import torch_ops

__all__ = ["Backend", "get_backend", "BACKENDS", "triton_available"]

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Backend:
    """What callers hold on to: the name (for logs/results) and the two operations."""

    name: str
    block_weight_grad: Callable
    block_adamw_step_: Callable


_TORCH = Backend("torch", torch_ops.block_weight_grad, torch_ops.block_adamw_step_)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_backend() -> Backend:
    from . import triton_ops  # lazy: triton may be absent

    return Backend("triton", triton_ops.block_weight_grad, triton_ops.block_adamw_step_)


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> Backend:
    """Resolve a kernels= setting for tensors on `device`.

    auto means triton on CUDA when triton imports (and is not in interpreter mode), torch
    otherwise; an explicit "triton" that
    cannot run is an error rather than a silent fallback, so results never mislabel the backend.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if name == "torch":
        return _TORCH
    if name == "auto":
        if device.type == "cuda" and triton_available():
            backend = _triton_backend()
            from . import triton_ops

            if not triton_ops.INTERPRETED:  # interpreted kernels on a GPU would be a trap, not a speed-up
                return backend
        return _TORCH
    # name == "triton"
    if not triton_available():
        raise ValueError("kernels=triton requested but triton is not installed; use kernels=torch")
    if device.type == "cuda":
        return _triton_backend()
    if device.type == "cpu":
        backend = _triton_backend()
        from . import triton_ops

        if not triton_ops.INTERPRETED:  # decided by TRITON_INTERPRET when the kernels were defined
            raise ValueError("kernels=triton on CPU needs TRITON_INTERPRET=1 (set before import); "
                             "or use kernels=torch")
        return backend
    raise ValueError(f"kernels=triton supports cuda (or cpu with TRITON_INTERPRET=1), not {device.type}; "
                     "use kernels=torch")
