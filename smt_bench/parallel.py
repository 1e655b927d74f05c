"""How one run's model is spread over the ranks: one process, DDP, or FSDP2 (torch.distributed only).

A method names its strategy (`Method.parallel`): the adapters and SMT train a small set of tensors, so
every rank holds the whole model and DDP all-reduces their gradients (SMT's dense weights are frozen
tensors DDP never touches); full FT shards parameters, gradients and AdamW states with FSDP2
(`fully_shard` per decoder layer, then the root); LISA, whose trainable set changes during training,
all-reduces the gradients of its active layers itself (`allreduce`). The trainer sees only `wrap`, `accumulating`,
`after_forward_only`, `checkpoint_state`, `load_optimizer` and `gather`; with one process every one of
them is the identity.

Checkpoints and the model that is evaluated are whole tensors on rank 0 (FSDP2 gathers them), so a
checkpoint or export reads the same whatever the world size was.
"""
from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from .distributed import World

if TYPE_CHECKING:
    from .methods.base import Method, Tuned

STRATEGIES = ("ddp", "fsdp2", "allreduce")


class Single:
    name = "single"
    optimizer_on_every_rank = True  # every rank loads the checkpoint's optimizer state itself

    def __init__(self, world: World, device: torch.device) -> None:
        self.world, self.device = world, device

    def wrap(self, tuned: Tuned) -> nn.Module:
        """The module forward and backward run through (it shares its parameters with tuned.model)."""
        return tuned.model

    def accumulating(self, module: nn.Module, last: bool) -> AbstractContextManager[Any]:
        """Around a micro-batch's forward and backward: gradients sync on the last one only."""
        return nullcontext()

    def after_forward_only(self, module: nn.Module) -> None:
        """After a forward with no backward (validation)."""

    def checkpoint_state(self, tuned: Tuned, opt: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
        """(tuned tensors, tuned meta, optimizer state), whole; collective where the model is sharded."""
        tensors, meta = tuned.state_dict()
        return tensors, meta, opt.state_dict()

    def load_optimizer(self, tuned: Tuned, opt: torch.optim.Optimizer, state: dict) -> None:
        opt.load_state_dict(state)

    def gather(self, tuned: Tuned, reload: Callable[[], nn.Module]) -> Tuned | None:
        """The Tuned that rank 0 reports, exports and evaluates (None on the other ranks)."""
        return tuned if self.world.is_main else None


class DDP(Single):
    name = "ddp"

    def wrap(self, tuned: Tuned) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers are not trained (rotary tables): syncing them every forward would only cost time
        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        buffers = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
        return DistributedDataParallel(tuned.model, device_ids=ids, **buffers)

    def accumulating(self, module: nn.Module, last: bool) -> AbstractContextManager[Any]:
        return nullcontext() if last else module.no_sync()


class AllReduce(Single):
    """Every rank holds the whole model; after the last micro-batch the gradients of the parameters that
    are trainable NOW are averaged over ranks. For methods whose trainable set changes during training
    (LISA), which DDP cannot follow: it fixes its gradient buckets when it wraps the model."""

    name = "allreduce"

    def wrap(self, tuned: Tuned) -> nn.Module:
        self.tuned = tuned
        return tuned.model

    @contextmanager
    def accumulating(self, module: nn.Module, last: bool) -> Iterator[None]:
        yield
        if last:
            grads = [p.grad for p in self.tuned.trainable_parameters() if p.grad is not None]
            if grads:
                flat = torch.cat([g.reshape(-1) for g in grads])
                self.world.all_reduce(flat)
                flat /= self.world.world_size
                offset = 0
                for g in grads:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()


def _full(t: torch.Tensor, keep: bool) -> torch.Tensor | None:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()  # collective: every rank calls it, in the same order
    return t.detach().cpu() if keep else None


class FSDP2(Single):
    name = "fsdp2"
    optimizer_on_every_rank = False  # rank 0 reads it and broadcasts: the others get only their shards

    def wrap(self, tuned: Tuned) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = tuned.model
        mesh = init_device_mesh(self.device.type, (self.world.world_size,))
        blocks = set(getattr(model, "_no_split_modules", None) or ())  # transformers: the decoder layer class
        layers = [m for m in model.modules() if type(m).__name__ in blocks]
        if not layers:
            raise RuntimeError(f"FSDP2: {type(model).__name__} names no decoder layer class (_no_split_modules)")
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest (embeddings, final norm, head; tied weights stay together)
        return model

    def after_forward_only(self, module: nn.Module) -> None:
        """FSDP2 keeps the root's parameters gathered after a forward, for the backward that follows; after
        validation none follows, and the model would list gathered tensors, not the optimizer's shards."""
        module.reshard()

    def checkpoint_state(self, tuned: Tuned, opt: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        tensors, meta = tuned.state_dict()
        main = self.world.is_main
        whole = {k: _full(v, main) for k, v in tensors.items()}
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's host
        optim = get_optimizer_state_dict(tuned.model, opt, options=options)
        return ({k: v for k, v in whole.items() if v is not None} if main else {}), meta, optim

    def load_optimizer(self, tuned: Tuned, opt: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(tuned.model, opt, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def gather(self, tuned: Tuned, reload: Callable[[], nn.Module]) -> Tuned | None:
        """Rank 0 reloads the base model and takes the trained weights into it: a plain (unsharded) model
        for the report, the export and evaluation."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(tuned.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.world.is_main:
            return None
        model = reload()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not _tied(model, m) for m in missing):
            raise RuntimeError(f"FSDP2 gather: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return type(tuned)(tuned.method, model)


def _tied(model: nn.Module, name: str) -> bool:
    """A key left out of a gathered state dict because it is another parameter (tied embeddings)."""
    return name in dict(model.named_parameters(remove_duplicate=False)) and \
        name not in dict(model.named_parameters())


def strategy_for(method: Method, world: World, device: torch.device) -> Single:
    if not world.distributed:
        return Single(world, device)
    return {"ddp": DDP, "fsdp2": FSDP2, "allreduce": AllReduce}[method.parallel](world, device)
