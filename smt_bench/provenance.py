"""Where a number came from: config hash, git sha, package versions and the lock they came from, device,
threads."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .migrations import ADDED_KEYS, without_added_defaults  # noqa: F401  (ADDED_KEYS: the analysis' settings)

if TYPE_CHECKING:
    import torch


PACKAGES = ("torch", "transformers", "peft", "hydra-core", "lm-eval", "triton", "safetensors", "accelerate",
            "numpy", "pandas", "wandb", "kernels")
REPO = Path(__file__).resolve().parents[1]
# the locked environment scripts/setup.sh installs (scripts/lock.sh writes it)
LOCK = Path("requirements") / "lock-cpu.txt"
# what a GPU install takes from its own CUDA build instead of the lock (scripts/setup.sh)
TORCH_STACK = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")

# Config keys that do not change what a run computes: left out of the run id (a resumed run that
# checkpoints at another interval is the same run; the anatomy measures the trained model and changes nothing
# it trains or scores).
NON_SEMANTIC = ("results", "logger", "anatomy", "train.checkpoint_every")
# keys added after results existed, and how old ids stay valid: smt_bench/migrations.py (ADDED_KEYS and
# without_added_defaults are imported from there)


def config_hash(cfg: dict) -> str:
    semantic = {k: v for k, v in without_added_defaults(cfg).items() if k not in NON_SEMANTIC}
    for key in NON_SEMANTIC:
        if "." in key:
            group, name = key.split(".", 1)
            if isinstance(semantic.get(group), dict) and name in semantic[group]:
                semantic[group] = {k: v for k, v in semantic[group].items() if k != name}
    blob = json.dumps(semantic, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def git_info() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    sha = git("rev-parse", "HEAD")
    return {"sha": sha or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if sha else None}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(text: str) -> dict[str, str]:
    """name -> version of every `name==version` line of a requirements lock (canonical names)."""
    pins = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        if m:
            pins[_canonical(m.group(1))] = m.group(2)
    return pins


def lock_info(path: Path | None = None) -> dict[str, Any] | None:
    """The lock's hash, and every package whose installed version is not the locked one (None: not
    installed). Empty deviations: this process runs exactly the locked environment. None without a lock
    (an installed wheel)."""
    path = path or REPO / LOCK
    if not path.is_file():
        return None
    data = path.read_bytes()
    installed: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            installed.setdefault(_canonical(name), dist.version)  # the first on sys.path is the one imported
    deviations = {name: installed.get(name) for name, version in lock_pins(data.decode()).items()
                  if installed.get(name) != version}
    return {"file": LOCK.as_posix(), "sha256": hashlib.sha256(data).hexdigest(),
            "deviations": dict(sorted(deviations.items()))}


def device_info(device: torch.device) -> dict[str, Any]:
    import torch  # here: the analysis reads this module's constants without loading torch

    info: dict[str, Any] = {"type": device.type, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                info["name"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
        except OSError:
            info["name"] = platform.processor() or None
    return info


def meta_info(device: torch.device) -> dict[str, Any]:
    return {"git": git_info(), "versions": versions(), "lock": lock_info(), "device": device_info(device),
            "argv": sys.argv, "hostname": platform.node()}
