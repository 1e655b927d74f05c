"""Checkpoints beside a run's result file, so the same command resumes where a killed run stopped.

`<result>.ckpt/step-<N>/` holds the method's tensors (`tuned.safetensors`: trainable tensors and what
the method needs to rebuild itself, SMT's selection), the optimizer state (`optimizer.safetensors`),
the RNG states and data-stream position (`rng.safetensors`), `state.json` (step, scheduler, loss
curves so far, the rest) and `manifest.json` (the size and sha256 of each of those files; written
last). A step folder is written under a temporary name (`.tmp-*`, never read) and renamed when
complete, so it exists whole or not at all. Resuming from it gives bitwise the same run on CPU
(tests/test_resume.py).

Integrity (tests/test_checkpoint_integrity.py):
- Load verifies the newest step folder against its manifest (every file present, its size, its
  sha256) before reading it. A damaged one (truncated or altered file, missing or invalid manifest,
  unreadable state) is reported in one line on stderr and the previous checkpoint that verifies is
  used; if none does, `UserError` says which checkpoint is damaged and how to start over
  (`results.resume=false`): exit 2, one line, no traceback, never silently wrong weights.
- Two checkpoints are kept: the newest and the previous good one, its fallback. Before a save the
  older ones are removed, so the disk holds at most two complete checkpoints while the new one is
  written: the peak is what it was with one kept (the previous one stayed until the new one was
  whole), and between saves a run holds two checkpoints instead of one. `CheckpointDir(path, keep=1)`
  keeps only the newest between saves.
- A save that fails (ENOSPC, EIO, in any file, the manifest or the rename) removes its temporary
  folder and raises `OSError` naming the step and the checkpoint that is kept: the earlier
  checkpoints are untouched and the same command resumes from the newest of them.
- FORMAT 2 adds the manifest; a `smt-bench-checkpoint/1` folder (no manifest, written before
  checksums) still loads, unverified and said so in one line; if it cannot be read it counts as
  damaged. A FORMAT-2 folder without its manifest is damaged (so deleting a manifest cannot switch
  verification off).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError

FORMAT = "smt-bench-checkpoint/2"  # /2: manifest.json with each file's size and sha256
OLD_FORMATS = ("smt-bench-checkpoint/1",)  # no manifest: loaded unverified
MANIFEST = "manifest.json"
FILES = ("state.json", "tuned.safetensors", "optimizer.safetensors", "rng.safetensors")
_CHUNK = 4 << 20


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


def _sha256(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _step_of(p: Path) -> int:
    return int(p.name.split("-", 1)[1])


def _one_line(text: object, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _os_error(e: BaseException) -> tuple[int, str]:
    """errno and reason of a failed write: an OSError's own; safetensors reports its I/O errors as
    SafetensorError('... (os error 28)')."""
    if isinstance(e, OSError) and e.errno:
        return e.errno, e.strerror or os.strerror(e.errno)
    m = re.search(r"os error (\d+)", str(e))
    code = int(m.group(1)) if m else errno.EIO
    return code, os.strerror(code)


def _say(line: str) -> None:
    """One line on stderr, from rank 0 only (every rank loads the same checkpoint and finds the same)."""
    from .distributed import World

    if World.current().is_main:
        print(line, file=sys.stderr, flush=True)


class Damaged(Exception):
    """A step folder that does not verify or cannot be read; the message is one line naming the problem."""


class CheckpointDir:
    """The checkpoints of one run (one folder beside its result file)."""

    def __init__(self, path: Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep={keep}: at least the newest checkpoint is kept")
        self.path = Path(path)
        self.keep = keep
        self._damaged: set[Path] = set()  # folders load() found damaged: never kept as a fallback

    def _steps(self) -> list[tuple[int, Path]]:
        if not self.path.is_dir():
            return []
        out = []
        for p in self.path.glob("step-*"):
            try:
                out.append((_step_of(p), p))
            except ValueError:
                continue
        return sorted(out)

    def latest_step(self) -> int | None:
        """The newest step folder's step (not verified: that is load's work), leaving out those load found
        damaged."""
        steps = [s for s, p in self._steps() if p not in self._damaged]
        return steps[-1] if steps else None

    def _fallbacks(self, step: int) -> list[Path]:
        """The checkpoints before `step`, oldest first, leaving out those load found damaged (after a
        fallback, every folder newer than the one resumed from is one of those)."""
        return [p for s, p in self._steps() if s < step and p not in self._damaged]

    def save(self, ckpt: Checkpoint) -> Path:
        """Writes step folder `step-<N>` whole or not at all. Raises OSError (the step, the reason and the
        checkpoint that is kept) if it cannot be written; the earlier checkpoints are then untouched."""
        final = self.path / f"step-{ckpt.step:08d}"
        older = self._fallbacks(ckpt.step)
        during = older[-max(1, self.keep - 1):]  # kept while this one is written: the fallback(s), at least one
        after = older[max(0, len(older) - (self.keep - 1)):] if self.keep > 1 else []  # kept once it is whole
        tmp = self.path / f".tmp-step-{ckpt.step:08d}-{os.getpid()}"
        replaced = None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in self.path.glob(".tmp-*"):  # a save that was killed half-way
                shutil.rmtree(stale, ignore_errors=True)
            for _, p in self._steps():  # room for this one: only the fallback (and this step's own) stay
                if p not in during and (p != final or p in self._damaged):
                    shutil.rmtree(p, ignore_errors=True)
            tmp.mkdir()
            self._write(ckpt, tmp)
            if final.exists():  # the same step saved again (a signal right after a periodic save)
                replaced = self.path / f".tmp-replaced-{final.name}-{os.getpid()}"
                os.rename(final, replaced)
            os.rename(tmp, final)
            _fsync_dir(self.path)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if replaced is not None and not final.exists():
                try:
                    os.rename(replaced, final)
                except OSError:
                    pass
            if not isinstance(e, (OSError, SafetensorError)):
                raise
            code, reason = _os_error(e)
            intact = [s for s, p in self._steps() if p not in self._damaged]
            kept = intact[-1] if intact else None
            raise OSError(code, f"{reason} while saving checkpoint step {ckpt.step} into {self.path}; "
                          + (f"the checkpoint at step {kept} is kept" if kept is not None
                             else "there is no earlier checkpoint")) from e
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        for _, p in self._steps():  # only now: the last good checkpoint is kept until this one is whole
            if p != final and p not in after:
                shutil.rmtree(p, ignore_errors=True)
        return final

    def _write(self, ckpt: Checkpoint, tmp: Path) -> None:
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
        _write_bytes(tmp / "state.json", json.dumps(state).encode())
        # what is on disk, read back (and flushed to it): the manifest records the bytes a later load must find
        files = {name: {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name, fsync=True)}
                 for name in FILES}
        _write_bytes(tmp / MANIFEST, json.dumps({"format": FORMAT, "files": files}, indent=1).encode())
        _fsync_dir(tmp)

    def _verify(self, p: Path) -> bool:
        """Raises Damaged if step folder `p` does not match its manifest; False: an old-format folder
        without one (unverified)."""
        try:
            text = (p / MANIFEST).read_text()
        except FileNotFoundError:
            try:
                fmt = json.loads((p / "state.json").read_text()).get("format")
            except FileNotFoundError:
                raise Damaged("it has neither manifest.json nor state.json") from None
            except (OSError, ValueError, AttributeError) as e:
                raise Damaged(f"manifest.json is missing and state.json cannot be read: {_one_line(e)}") from None
            if fmt in OLD_FORMATS:
                return False
            if fmt != FORMAT:
                raise Damaged(f"state.json has format {fmt!r}; this smt-bench reads "
                              f"{', '.join((FORMAT, *OLD_FORMATS))}") from None
            raise Damaged("manifest.json is missing") from None
        except (OSError, ValueError) as e:
            raise Damaged(f"manifest.json cannot be read: {_one_line(e)}") from None
        try:
            manifest = json.loads(text)
        except ValueError as e:
            raise Damaged(f"manifest.json is not valid JSON: {_one_line(e)}") from None
        try:
            files = manifest["files"]
            if manifest["format"] != FORMAT:
                raise Damaged(f"manifest.json has format {manifest['format']!r}, not {FORMAT!r}")
            entries = [(name, int(files[name]["size"]), str(files[name]["sha256"])) for name in FILES]
        except (KeyError, TypeError, ValueError) as e:
            raise Damaged(f"manifest.json is malformed ({type(e).__name__}: {_one_line(e)})") from None
        for name, size, digest in entries:
            f = p / name
            try:
                actual = f.stat().st_size
                if actual != size:
                    raise Damaged(f"{name} has {actual} bytes, its manifest says {size}")
                if _sha256(f) != digest:
                    raise Damaged(f"{name} does not match its sha256 checksum")
            except FileNotFoundError:
                raise Damaged(f"{name} is missing") from None
            except OSError as e:
                raise Damaged(f"{name} cannot be read: {_one_line(e)}") from None
        return True

    def _read(self, p: Path, optimizer: bool) -> Checkpoint:
        try:
            state = json.loads((p / "state.json").read_text())
            if state.get("format") not in (FORMAT, *OLD_FORMATS):
                raise Damaged(f"state.json has format {state.get('format')!r}; this smt-bench reads "
                              f"{', '.join((FORMAT, *OLD_FORMATS))}")
            rng_t = load_file(str(p / "rng.safetensors"))
            rank_rng = [_rng_from_json(r, rng_t, f".rank{i + 1}") for i, r in enumerate(state.get("rank_rng", []))]
            return Checkpoint(step=state["step"], tuned=load_file(str(p / "tuned.safetensors")),
                              tuned_meta=state["tuned_meta"],
                              optimizer=_unflat_optimizer(load_file(str(p / "optimizer.safetensors")),
                                                          state["optimizer"]) if optimizer else {},
                              scheduler=state["scheduler"],
                              stream={**state["stream"], "generator": rng_t["stream.generator"]},
                              rng=_rng_from_json(state["rng"], rng_t), progress=state["progress"], rank_rng=rank_rng)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, SafetensorError) as e:
            raise Damaged(f"it cannot be read: {type(e).__name__}: {_one_line(e)}") from None

    def load(self, optimizer: bool = True) -> Checkpoint | None:
        """The newest checkpoint that verifies against its manifest (None if there is none at all);
        `optimizer=False` leaves its optimizer state out (empty): under FSDP2 only rank 0 reads it and
        broadcasts the shards, instead of every rank holding all of it in host memory (every rank still
        verifies every file, so all of them pick the same step).

        A damaged newer one is named in one line on stderr; if none verifies: UserError."""
        damaged: list[tuple[Path, str]] = []
        for _, p in reversed(self._steps()):
            try:
                verified = self._verify(p)
                ckpt = self._read(p, optimizer)
            except Damaged as e:
                damaged.append((p, str(e)))
                self._damaged.add(p)
                continue
            if damaged:
                _say("smt-bench: warning: " + "; ".join(f"checkpoint {d} is damaged ({why})" for d, why in damaged)
                     + f"; resuming from the previous one, {p.name}")
            if not verified:
                _say(f"smt-bench: note: checkpoint {p} has no checksums (written in {OLD_FORMATS[0]} format); "
                     f"loading it unverified")
            return ckpt
        if not damaged:
            return None
        newest, why = damaged[0]
        n = len(damaged) - 1
        earlier = ("; there is no earlier checkpoint to fall back to" if n == 0 else
                   "; the earlier one is damaged too" if n == 1 else f"; the {n} earlier ones are damaged too")
        raise UserError(f"the checkpoint at {newest} is damaged ({why}){earlier}; rerun with results.resume=false "
                        f"to start over (it deletes {self.path})")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
