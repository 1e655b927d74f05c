"""scripts/gpu_check.sh in its smoke mode (GPU_CHECK_SMOKE=1): the same steps at tiny shapes on the CPU,
Triton interpreted, so the check meant for a machine with an NVIDIA GPU cannot rot where there is none."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_step_and_writes_its_files(tmp_path):
    env = dict(os.environ, GPU_CHECK_SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable)
    p = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert "train check exit 0" in p.stdout and "methods bench exit 0" in p.stdout and "device profile exit 0" in p.stdout
    names = {f.name for f in tmp_path.iterdir()}
    assert {"device.txt", "kernel_tests.log", "kernels.json", "train_check.json", "methods.json", "methods.md",
            "device_profile.json"} <= names
    check = json.loads((tmp_path / "train_check.json").read_text())
    assert check["passed"] and check["same_block_map"] and check["max_abs_loss_diff"] <= check["tolerance"]
    assert check["runs"]["triton"]["backend"] == "triton" and check["runs"]["torch"]["backend"] == "torch"
    profile = json.loads((tmp_path / "device_profile.json").read_text())  # what the forecast refines its figures with
    assert profile["kind"] == "cpu" and profile["matmul_flops"] > 0 and profile["copy_bandwidth_bytes_s"] > 0
    methods = json.loads((tmp_path / "methods.json").read_text())
    assert set(methods["summary"]) == {"floor", "smt@0.002"}
