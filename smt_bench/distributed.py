"""The process group a run belongs to: one process, or the ranks torchrun / SLURM (submitit) started.

smt-bench starts no processes of its own. Under `torchrun` the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR) says who this process is; a SLURM job with several tasks gets the same
variables from submitit's `TorchDistributedEnvironment`. `init()` joins that group once per process
(the same group then serves every job of a sweep).

Every side effect (result files, checkpoints, exports, logs, samples) happens on rank 0 only;
anything that decides for all ranks (SMT's block scores, whether a preemption signal arrived, the
loss a divergence check reads) goes through a reduction first. Control messages (flags, barriers,
small objects) use a gloo group with a long timeout, because the other ranks wait there while rank 0
evaluates, which can take longer than NCCL's watchdog allows.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

CONTROL_TIMEOUT = timedelta(hours=12)  # rank 0 evaluating a 7B model while the others wait
_CONTROL = None  # the gloo group for control messages, made once per process


def _from_slurm() -> None:
    """A SLURM job with several tasks (srun, or submitit's tasks_per_node) but no torchrun: submitit
    derives RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT from SLURM's variables. Only inside an srun
    step of several tasks: a batch script or an salloc shell with --ntasks=N is still one process."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")  # a plain srun: submitit's sbatch script would set it

    # GPUs stay as SLURM exposed them: a task sees all of the node's (cuda:LOCAL_RANK) or only its own (cuda:0)
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def cuda_index() -> int:
    """This rank's GPU: LOCAL_RANK among the GPUs it sees (one per task where SLURM binds them: cuda:0)."""
    return int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)


def init() -> "World":
    """Joins the process group the environment describes (idempotent); the World this process is in."""
    global _CONTROL
    import torch.distributed as dist

    _from_slurm()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and dist.is_available() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(cuda_index())
            backend = "cpu:gloo,cuda:nccl"  # gradients over NCCL; CPU tensors (accumulators, flags) over gloo
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    if dist.is_available() and dist.is_initialized() and _CONTROL is None:
        _CONTROL = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return World.current()


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @classmethod
    def current(cls) -> "World":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                       str(dist.get_backend()))
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max / min) over ranks, in place; the identity in a single process."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                        "min": dist.ReduceOp.MIN}[op])
        return tensor

    def reduce_floats(self, values: list[float], op: str = "sum") -> list[float]:
        """Host scalars reduced over ranks (on the gloo control group: no device sync beyond the values')."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=_CONTROL)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=_CONTROL)

    def broadcast(self, obj):
        """Rank 0's value of obj on every rank (a decision only rank 0 can make, e.g. from the results dir)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=_CONTROL)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=_CONTROL)
        return out

    def describe(self, strategy: str, batch_size: int, grad_accum: int) -> dict:
        """What the result records of how the run was spread (the analysis compares global batches)."""
        return {"world_size": self.world_size, "backend": self.backend, "strategy": strategy,
                "per_rank_batch": batch_size, "grad_accum": grad_accum,
                "global_batch": batch_size * grad_accum * self.world_size}
