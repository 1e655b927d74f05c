"""Run result files: one JSON per run, written atomically (temp file + rename), never half-written."""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path

from .errors import UserError


def probe_writable(directory: Path, key: str = "results.dir", value=None) -> None:
    """Create and remove a temporary file in `directory` (a run's result, samples and exports go there),
    so an unwritable location fails before any work; folders made for the probe are removed again. Processes
    that probe the same new folder at once (the tasks of a job array) do not fail each other: a folder another
    one made meanwhile is used, and a probe whose folder another one removed is tried again."""
    directory = Path(directory)
    tries = 50
    for attempt in range(tries):
        missing, d = [], directory
        while not d.exists() and d != d.parent:
            missing.append(d)
            d = d.parent
        made: list[Path] = []
        try:
            for m in reversed(missing):
                try:
                    m.mkdir()
                    made.append(m)
                except FileExistsError:  # another process made it meanwhile
                    pass
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".probe-")
            os.close(fd)
            os.unlink(tmp)
            return
        except FileNotFoundError as e:  # another process removed a folder it had made for its own probe
            if attempt == tries - 1:
                raise UserError(f"{key}={value if value is not None else directory}: cannot write in {directory} "
                                f"({e.strerror}); set {key} to a folder you can write to") from None
        except OSError as e:
            raise UserError(f"{key}={value if value is not None else directory}: cannot write in {directory} "
                            f"({e.strerror or type(e).__name__}); set {key} to a folder you can write to") from None
        finally:
            for m in reversed(made):
                try:
                    m.rmdir()
                except OSError:  # not empty: another process is using it
                    pass
        time.sleep(random.uniform(0, 0.002 * (attempt + 1)))  # out of step with the other process


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_file(results_dir: str | Path, group: str, method: str, fraction: float, seed: int, run_id: str,
             tag: str | None = None) -> Path:
    """<dir>/runs/<group>/<method>[-<tag>]-b<fraction>-s<seed>-<id>.json: the tag (results.tag) names a
    variant for people; the id names the computation."""
    name = f"{method}-{tag}" if tag else method
    return Path(results_dir) / "runs" / group / f"{name}-b{fraction:g}-s{seed}-{run_id}.json"


def checkpoint_dir(result_path: Path) -> Path:
    """A run's checkpoints go beside its result file: the same command finds them again."""
    return result_path.with_suffix(".ckpt")


def finished(path: Path) -> bool:
    try:
        return json.loads(path.read_text())["run_info"]["status"] == "finished"
    except (OSError, ValueError, KeyError, TypeError):
        return False
