"""Checkpoints beside a run's result file, so the same command resumes where a killed run stopped.

`<result>.ckpt/step-<N>/` holds the method's tensors (`tuned.safetensors`: trainable tensors and what
the method needs to rebuild itself, SMT's selection), the optimizer state (`optimizer.safetensors`),
the RNG states and data-stream position (`rng.safetensors`), and `state.json` (step, scheduler, loss
curves so far, the rest). A step folder is written under a temporary name and renamed when complete,
so it exists whole or not at all; the previous one is removed only after that. Resuming from it gives
bitwise the same run on CPU (tests/test_resume.py).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = "smt-bench-checkpoint/1"


@dataclass
class Checkpoint:
    step: int
    tuned: dict[str, torch.Tensor]
    tuned_meta: dict
    optimizer: dict          # torch optimizer state_dict
    scheduler: dict
    stream: dict             # BatchStream.state_dict()
    rng: dict                # rng_state() (of rank 0)
    progress: dict = field(default_factory=dict)  # the trainer's curves and counters so far
    rank_rng: list = field(default_factory=list)  # rng_state() of ranks 1.. (each draws its own dropout masks)


def rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _json_rng(state: dict) -> dict:
    np_state = state["numpy"]
    return {"python": state["python"], "numpy": [np_state[0], np_state[1].tolist(), *[x for x in np_state[2:]]]}


def _rng_from_json(state: dict, tensors: dict[str, torch.Tensor], suffix: str = "") -> dict:
    py, npy = state["python"], state["numpy"]
    rng = {"python": (py[0], tuple(py[1]), py[2]),
           "numpy": (npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:]),
           "torch": tensors["torch" + suffix]}
    if "cuda" + suffix in tensors:
        rng["cuda"] = tensors["cuda" + suffix]
    return rng


def _flat_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state keyed "<param>.<name>": <param> is an index (torch's state_dict) or a parameter's
    name (torch.distributed.checkpoint's whole-model state dict, under FSDP2)."""
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflat_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in [*tensors.items(), *meta["scalars"].items()]:
        idx, k = key.rsplit(".", 1)
        state.setdefault(int(idx) if idx.isdigit() else idx, {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses tensors that share memory (tied weights) and non-contiguous ones: give it copies
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointDir:
    """The checkpoints of one run (one folder beside its result file)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _steps(self) -> list[tuple[int, Path]]:
        if not self.path.is_dir():
            return []
        out = []
        for p in self.path.glob("step-*"):
            try:
                out.append((int(p.name.split("-", 1)[1]), p))
            except ValueError:
                continue
        return sorted(out)

    def latest_step(self) -> int | None:
        steps = self._steps()
        return steps[-1][0] if steps else None

    def save(self, ckpt: Checkpoint) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".tmp-*"):  # a save that was killed half-way
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.path / f".tmp-step-{ckpt.step:08d}-{os.getpid()}"
        tmp.mkdir()
        opt_tensors, opt_meta = _flat_optimizer(ckpt.optimizer)
        _save(ckpt.tuned, tmp / "tuned.safetensors")
        _save(opt_tensors, tmp / "optimizer.safetensors")
        rng = {"stream.generator": ckpt.stream["generator"]}
        for suffix, r in [("", ckpt.rng), *[(f".rank{i + 1}", r) for i, r in enumerate(ckpt.rank_rng)]]:
            rng["torch" + suffix] = r["torch"]
            if "cuda" in r:
                rng["cuda" + suffix] = r["cuda"]
        _save(rng, tmp / "rng.safetensors")
        state = {
            "format": FORMAT, "step": ckpt.step, "tuned_meta": ckpt.tuned_meta, "optimizer": opt_meta,
            "scheduler": ckpt.scheduler, "stream": {k: v for k, v in ckpt.stream.items() if k != "generator"},
            "rng": _json_rng(ckpt.rng), "rank_rng": [_json_rng(r) for r in ckpt.rank_rng],
            "progress": ckpt.progress,
        }
        with open(tmp / "state.json", "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        for p in tmp.iterdir():
            if p.suffix == ".safetensors":
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        final = self.path / f"step-{ckpt.step:08d}"
        if final.exists():  # the same step saved again (a signal right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.path)
        for step, p in self._steps():  # only now: the last good checkpoint is kept until this one is whole
            if step != ckpt.step:
                shutil.rmtree(p, ignore_errors=True)
        return final

    def load(self, optimizer: bool = True) -> Checkpoint | None:
        """The latest checkpoint; `optimizer=False` leaves its optimizer state out (empty): under FSDP2 only
        rank 0 reads it and broadcasts the shards, instead of every rank holding all of it in host memory."""
        steps = self._steps()
        if not steps:
            return None
        _, p = steps[-1]
        state = json.loads((p / "state.json").read_text())
        if state.get("format") != FORMAT:
            raise ValueError(f"{p}: not a {FORMAT} checkpoint")
        rng_t = load_file(str(p / "rng.safetensors"))
        rank_rng = [_rng_from_json(r, rng_t, f".rank{i + 1}") for i, r in enumerate(state.get("rank_rng", []))]
        return Checkpoint(step=state["step"], tuned=load_file(str(p / "tuned.safetensors")),
                          tuned_meta=state["tuned_meta"],
                          optimizer=_unflat_optimizer(load_file(str(p / "optimizer.safetensors")), state["optimizer"])
                          if optimizer else {},
                          scheduler=state["scheduler"], stream={**state["stream"], "generator": rng_t["stream.generator"]},
                          rng=_rng_from_json(state["rng"], rng_t), progress=state["progress"], rank_rng=rank_rng)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
