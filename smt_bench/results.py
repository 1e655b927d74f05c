"""Run result files: one JSON per run, written atomically (temp file + rename), never half-written."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

SCHEMA_VERSION = 1


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


def run_file(results_dir: str | Path, group: str, method: str, fraction: float, seed: int, run_id: str) -> Path:
    return Path(results_dir) / "runs" / group / f"{method}-b{fraction:g}-s{seed}-{run_id}.json"


def finished(path: Path) -> bool:
    try:
        return json.loads(path.read_text())["run_info"]["status"] == "finished"
    except (OSError, ValueError, KeyError, TypeError):
        return False
