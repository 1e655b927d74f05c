"""Peak memory during training, and where it goes.

GPU: the CUDA allocator's peak above what was allocated before training. CPU: the process's peak
RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS before training.
"""
from __future__ import annotations

import ctypes
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), flags=re.M)
    return int(m.group(1)) if m else 0


def _malloc_trim() -> None:
    """Return freed heap to the OS (glibc), so RSS before a phase is live memory, not malloc's cache."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above a baseline, in bytes.

    The baseline is taken once (`mark_baseline`, e.g. right after the model loads) and phases are
    measured against it (`start` resets the peak, `stop` reads it): a phase that runs after another
    (SMT's warm-up, then training) is charged for what it holds, not flattered by memory the earlier
    phase left cached.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_allocator_peak" if device.type == "cuda" else "cpu_peak_rss_growth"
        self.base: int | None = None

    def _current(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        _malloc_trim()
        return _status_kb("VmRSS") * 1024

    def mark_baseline(self) -> "PeakMemory":
        self.base = self._current()
        return self

    def start(self) -> None:
        current = self._current()
        if self.base is None:
            self.base = current
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            self.kind = "cpu_peak_rss_growth(unreset)"

    def stop(self) -> int:
        assert self.base is not None, "PeakMemory.stop() before start()"
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return max(0, _status_kb("VmHWM") * 1024 - self.base)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (FSDP2) tensor: memory is per rank."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(_local(t).numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)


@contextmanager
def saved_activation_bytes(out: dict[str, Any]) -> Iterator[None]:
    """Counts bytes autograd saves for backward (each storage once) while the context is open."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    # parameters are weights, not activations: autograd saves them for backward too
    out["bytes"] = sum(seen.values())
    out["_storages"] = set(seen)


def breakdown(model: nn.Module, trainable: Iterable[torch.Tensor], opt: torch.optim.Optimizer,
              activations: dict[str, Any]) -> dict[str, Any]:
    params = list({id(p): _local(p) for p in model.parameters()}.values())
    weight_ptrs = {p.untyped_storage().data_ptr() for p in params}
    act = activations.get("bytes", 0)
    act_weights = sum(1 for k in activations.get("_storages", ()) if k in weight_ptrs)
    if act_weights:  # remove weight storages that autograd also saved
        act -= tensor_bytes(p for p in params if p.untyped_storage().data_ptr() in activations["_storages"])
    return {
        "weights": tensor_bytes(params) + tensor_bytes(b for b in model.buffers()),
        "gradients": tensor_bytes(trainable),
        "optimizer": optimizer_state_bytes(opt),
        "activations": max(act, 0),
        "activations_note": "bytes saved for backward in one training step (saved_tensors_hooks)",
    }
