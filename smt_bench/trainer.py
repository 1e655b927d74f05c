"""The shared training loop: generic over methods (it only sees trainable parameters and an optimizer)."""
from __future__ import annotations

import math
import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, rng_state, set_rng_state
from .distributed import World
from .memory import PeakMemory, breakdown, saved_activation_bytes
from .parallel import Single
from .preemption import PreemptionWatch

if TYPE_CHECKING:
    from .data.batches import BatchStream
    from .loggers import Logger
    from .methods.base import Tuned
    from .schema.groups import Train


def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def autocast_for(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA; fp32 on CPU (bf16 matmuls on CPU are slow and change numerics)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _checkpointing(model: nn.Module, on: bool) -> None:
    """transformers 5 renamed gradient checkpointing to activation checkpointing (the old names warn);
    older releases (>= 4.46 is supported) have only the old names."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


@torch.no_grad()
def validation_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> float | None:
    if not batches:
        return None
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        with autocast_for(device):
            loss = forward_loss(model, b)
        k = int((b["labels"][:, 1:] != -100).sum())
        tot, n = tot + float(loss) * k, n + k
    model.train(was)
    return tot / max(n, 1)


class Diverged(Exception):
    """A non-finite loss: the run stops before the step that would apply it."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"non-finite loss {loss} at step {step}")
        self.step, self.loss = step, loss


def _scalar(t: torch.Tensor) -> float:
    from torch.distributed.tensor import DTensor

    return float(t.full_tensor() if isinstance(t, DTensor) else t)


def train(tuned: Tuned, stream: BatchStream, val_batches: list[dict[str, torch.Tensor]], cfg: Train,
          device: torch.device, logger: Logger, mem: PeakMemory | None = None,
          save: Callable[[Checkpoint], None] | None = None, resume: Checkpoint | None = None,
          parallel: Single | None = None) -> dict[str, Any]:
    """Runs optimizer steps up to cfg.max_steps; returns losses, timings and memory for the result file.

    `cfg` is the config's train node (a DictConfig of the schema `Train`, smt_bench/schema/groups.py).
    `mem` carries the memory baseline (taken after the model loaded); without one, it is taken here.
    `save` receives a Checkpoint every cfg.checkpoint_every steps and when a preemption signal arrives
    (on rank 0; every rank takes part in gathering it); `resume` (a loaded Checkpoint; the Tuned already
    holds its tensors) continues after its step. `parallel` spreads the model over the ranks
    (smt_bench/parallel.py); `stream` is this rank's share of the batches. Losses, token counts and the
    peak memory are reduced over ranks: every rank reads the same loss, so all stop together.
    """
    from transformers import get_scheduler

    parallel = parallel or Single(World(), device)
    world = parallel.world
    model = tuned.model
    if cfg.gradient_checkpointing:
        _checkpointing(model, True)
    module = parallel.wrap(tuned)  # FSDP2 shards the parameters in place: the optimizer is built after
    params = tuned.trainable_parameters()
    opt = tuned.build_optimizer(betas=tuple(cfg.betas), eps=cfg.eps)
    sched = get_scheduler(cfg.schedule, opt, num_warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
                          num_training_steps=cfg.max_steps)
    progress: dict[str, Any] = {"losses": [], "val_curve": [], "step_times": [], "tokens": 0, "train_s": 0.0,
                                "peak_memory_bytes": 0, "checkpoint_s": 0.0, "checkpoints": 0}
    start = 1
    if resume is not None:
        parallel.load_optimizer(tuned, opt, resume.optimizer)
        sched.load_state_dict(resume.scheduler)
        stream.load_state_dict(resume.stream)
        set_rng_state(resume.rng if world.rank == 0 else resume.rank_rng[world.rank - 1], device)
        progress.update(resume.progress)
        start = resume.step + 1
    model.train()

    losses, val_curve, step_times = progress["losses"], progress["val_curve"], progress["step_times"]
    activations: dict[str, Any] = {}
    mem = mem or PeakMemory(device)
    mem.start()
    t_train, checkpoint_s0 = time.perf_counter(), progress["checkpoint_s"]

    def checkpoint(step: int) -> None:
        """Saving copies tensors to host memory: its time and memory are kept out of the training figures."""
        if save is None:
            return
        t0 = time.perf_counter()
        progress["peak_memory_bytes"] = max(progress["peak_memory_bytes"], mem.stop())
        tensors, meta, optim = parallel.checkpoint_state(tuned, opt)
        rngs = world.gather(rng_state(device))  # every rank's: each draws its own dropout masks
        if world.is_main:
            assert rngs is not None  # gather's list, on rank 0
            save(Checkpoint(step=step, tuned=tensors, tuned_meta=meta, optimizer=optim,
                            scheduler=sched.state_dict(), stream=stream.state_dict(), rng=rngs[0],
                            rank_rng=rngs[1:], progress={**progress, "train_s": progress["train_s"] + elapsed()}))
        del tensors, optim
        world.barrier()  # no rank moves on (or exits on a preemption) while rank 0 is still writing
        mem.start()
        progress["checkpoints"] += 1
        progress["checkpoint_s"] += time.perf_counter() - t0

    def elapsed() -> float:  # training time of this process so far, checkpoint saves excluded
        return time.perf_counter() - t_train - (progress["checkpoint_s"] - checkpoint_s0)

    bar = tqdm(range(start, cfg.max_steps + 1), desc=f"train {tuned.method.name}", dynamic_ncols=True,
               mininterval=1.0, initial=start - 1, total=cfg.max_steps, disable=not world.is_main)
    with PreemptionWatch(world=world) as watch:
        for step in bar:
            _sync(device)
            t0 = time.perf_counter()
            if tuned.begin_step(step, opt):  # the method changed its trainable set (LISA's layer switch)
                params = tuned.trainable_parameters()
            step_loss, step_tokens = 0.0, 0
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
                first = step == start and micro == 0  # activations are measured once per process
                measure = saved_activation_bytes(activations) if first else nullcontext()
                with parallel.accumulating(module, last=micro == cfg.grad_accum - 1):
                    with measure, autocast_for(device):
                        loss = forward_loss(module, batch) / cfg.grad_accum
                        extra = tuned.regularizer()  # a method's own loss term (KaSA); not in the logged loss
                    (loss if extra is None else loss + extra / cfg.grad_accum).backward()
                step_loss += float(loss.detach())
                step_tokens += int(batch["attention_mask"].sum())
            if world.distributed:  # the mean over ranks of their micro-batch means: what the gradient averages
                total_loss, total_tokens = world.reduce_floats([step_loss, step_tokens])
                step_loss, step_tokens = total_loss / world.world_size, int(total_tokens)
            if not math.isfinite(step_loss):
                raise Diverged(step, step_loss)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            progress["tokens"] += step_tokens
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{step_tokens / dt:.0f}")
            if step % cfg.log_every == 0:
                logger.log({"train/loss": step_loss, "train/lr": sched.get_last_lr()[0],
                            "train/tokens_per_s": step_tokens / dt,
                            **({"train/grad_norm": _scalar(grad_norm)} if grad_norm is not None else {})}, step)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
                v = validation_loss(module, val_batches, device)  # every rank: FSDP2's forward is collective
                parallel.after_forward_only(module)
                if v is not None:
                    val_curve.append([step, v])
                    logger.log({"val/loss": v}, step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                checkpoint(step)
            watch.handle(step, lambda: checkpoint(step))
    train_s = progress["train_s"] + elapsed()
    peak = int(world.reduce_floats([max(progress["peak_memory_bytes"], mem.stop())], "max")[0])  # the fullest rank
    if cfg.gradient_checkpointing:
        _checkpointing(model, False)
    return {
        "steps": cfg.max_steps,
        "resumed_from_step": None if resume is None else resume.step,
        "loss_curve": losses,
        "val_loss_curve": val_curve,
        "final_train_loss": statistics.fmean(losses[-5:]),
        "train_time_s": train_s,  # checkpoint saves excluded (checkpoint_time_s)
        "checkpoints": progress["checkpoints"],
        "checkpoint_time_s": progress["checkpoint_s"],
        "median_step_time_s": statistics.median(step_times),
        "tokens": progress["tokens"],
        "tokens_per_s": progress["tokens"] / train_s,
        "peak_memory_bytes": peak,
        "peak_memory_kind": mem.kind,
        "memory_breakdown_bytes": breakdown(model, params, opt, activations),
    }
