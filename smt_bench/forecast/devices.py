"""Device profiles: what the forecast needs of a device to turn a step's FLOPs and bytes into seconds and to say
whether its memory holds the step.

A GPU profile starts from the vendor's figures (each with its source) and is refined by what
`scripts/gpu_check.sh` measures on the card (`forecast.profile=<its device_profile.json>`): the bf16 matmul
throughput and the device-memory bandwidth it achieves. The share of that matmul peak a whole training step
reaches (`efficiency`) comes from this project's own step measurements where there are some: the CPU's from
the committed CPU benchmarks (results/forecast/calibration.json, `python -m smt_bench.forecast.calibrate`); a
GPU's is the stated assumption below until a GPU benchmark is committed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import UserError

GIB = 2 ** 30
CALIBRATION = Path(__file__).resolve().parents[2] / "results" / "forecast" / "calibration.json"
# the share of the matmul peak a training step of these models reaches on a GPU (bf16 autocast, fp32 masters,
# eager PyTorch): an assumption, stated with every GPU forecast, until a GPU benchmark refines it
GPU_EFFICIENCY = 0.40
GPU_BANDWIDTH_EFFICIENCY = 0.70
GPU_STEP_OVERHEAD_S = 2e-4  # kernel launches and Python per decoder layer and step (eager mode)


@dataclass(frozen=True)
class Device:
    """`memory_bytes`: what one device holds (None: not a limit, the CPU's host memory); `flops`: the dense
    matmul peak in the precision training runs in (bf16 on CUDA, fp32 on the CPU), FLOP/s; `bandwidth`: memory
    bandwidth, bytes/s; `interconnect`: bytes/s between the ranks of one run (NVLink); `efficiency`: the share
    of `flops` a training step reaches; `bandwidth_efficiency` the same for bandwidth; `step_overhead_s`: fixed
    seconds per decoder layer and step; `source`: where each figure comes from."""

    name: str
    kind: str  # cuda | cpu
    memory_bytes: int | None
    flops: float
    bandwidth: float
    interconnect: float = 0.0
    efficiency: float = GPU_EFFICIENCY
    bandwidth_efficiency: float = GPU_BANDWIDTH_EFFICIENCY
    step_overhead_s: float = GPU_STEP_OVERHEAD_S
    memory_overhead: int = 64 * 2 ** 20  # bytes a process's first step holds beyond tensors (CUDA: cuBLAS workspaces)
    source: str = ""
    refined: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def precision(self) -> str:
        """bf16 autocast over fp32 master weights on CUDA, fp32 on the CPU (smt_bench/trainer.py autocast_for)."""
        return "bf16" if self.kind == "cuda" else "fp32"

    def usable_bytes(self) -> int | None:
        """What a run's tensors may use: the capacity less the CUDA context and runtime (1 GiB) and a 5% margin for
        the allocator's fragmentation."""
        if self.memory_bytes is None:
            return None
        return int(0.95 * (self.memory_bytes - GIB))

    def with_memory(self, gib: float) -> "Device":
        return replace(self, memory_bytes=int(gib * GIB), name=f"{self.name} ({gib:g} GiB)")

    def describe(self) -> str:
        mem = "host memory" if self.memory_bytes is None else f"{self.memory_bytes / GIB:.1f} GiB"
        return (f"{self.name}: {mem}, {self.flops / 1e12:.4g} TFLOP/s {self.precision} matmul peak × "
                f"{self.efficiency:.2f} step efficiency, {self.bandwidth / 1e9:.4g} GB/s × "
                f"{self.bandwidth_efficiency:.2f}; {self.source}")


# nvidia-smi's memory.total, as the capacity (the marketing GB are 10^9 bytes: 80 GB ≈ 79.6 GiB usable total)
VENDOR: dict[str, Device] = {
    "h100-80gb": Device("h100-80gb", "cuda", int(79.6 * GIB), 989.4e12, 3.35e12, 450e9,
                        source="NVIDIA H100 SXM5 datasheet (nvidia.com/en-us/data-center/h100): 989 TFLOP/s dense "
                               "BF16 (1,979 with sparsity), 3.35 TB/s HBM3, 80 GB, NVLink 900 GB/s both ways"),
    "h200": Device("h200", "cuda", int(139.8 * GIB), 989.4e12, 4.8e12, 450e9,
                   source="NVIDIA H200 SXM datasheet (nvidia.com/en-us/data-center/h200): 989 TFLOP/s dense BF16 "
                          "(1,979 with sparsity), 4.8 TB/s HBM3e, 141 GB, NVLink 900 GB/s both ways"),
    "a100-80gb": Device("a100-80gb", "cuda", int(79.2 * GIB), 312e12, 2.039e12, 300e9,
                        source="NVIDIA A100 SXM4 80GB datasheet (nvidia.com/en-us/data-center/a100): 312 TFLOP/s "
                               "dense BF16 (624 with sparsity), 2,039 GB/s HBM2e, 80 GB, NVLink 600 GB/s both ways"),
    "a100-40gb": Device("a100-40gb", "cuda", int(39.4 * GIB), 312e12, 1.555e12, 300e9,
                        source="NVIDIA A100 SXM4 40GB datasheet (nvidia.com/en-us/data-center/a100): 312 TFLOP/s "
                               "dense BF16, 1,555 GB/s HBM2, 40 GB, NVLink 600 GB/s both ways"),
}
NAMES = (*VENDOR, "cpu")
# CUDA device names (torch.cuda.get_device_name) -> profile, for a run that records its own forecast
_BY_CUDA_NAME = (("H200", "h200"), ("H100", "h100-80gb"), ("A100-SXM4-80GB", "a100-80gb"), ("A100 80GB", "a100-80gb"),
                 ("A100-SXM4-40GB", "a100-40gb"), ("A100-PCIE-40GB", "a100-40gb"))


def calibration(path: Path = CALIBRATION) -> dict[str, Any]:
    """The committed calibration (python -m smt_bench.forecast.calibrate); {} where there is none."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def cpu(cal: dict[str, Any] | None = None) -> Device:
    """The CPU the committed benchmarks ran on: its figures are fitted to their step times (not a vendor's)."""
    cal = cal if cal is not None else calibration()
    fit = cal.get("time", {}).get("cpu")
    overhead = int(cal.get("memory", {}).get("cpu_overhead_bytes", 0))
    if not fit:  # no calibration yet: round figures of 2 cores of a server CPU, said so
        return Device("cpu", "cpu", None, 1.0e11, 1.0e10, efficiency=1.0, bandwidth_efficiency=1.0,
                      step_overhead_s=0.0, memory_overhead=overhead,
                      source="uncalibrated round figures (100 GFLOP/s, 10 GB/s)")
    return Device("cpu", "cpu", None, fit["flops"], fit["bandwidth"], efficiency=1.0, bandwidth_efficiency=1.0,
                  step_overhead_s=fit["step_overhead_s"], memory_overhead=overhead,
                  source=f"fitted to the committed CPU benchmarks ({fit['calibrated_on']}; "
                         f"results/forecast/calibration.json)")


def refine(device: Device, measured: dict[str, Any]) -> Device:
    """The profile with what scripts/gpu_check.sh measured on the card (`device_profile.json`): its matmul
    throughput replaces the vendor peak, its copy bandwidth the vendor bandwidth; the step efficiency stays a share
    of the matmul throughput, now the achieved one, so the assumption covers less."""
    flops, bw = measured.get("matmul_flops"), measured.get("copy_bandwidth_bytes_s")
    if not (isinstance(flops, (int, float)) and isinstance(bw, (int, float)) and flops > 0 and bw > 0):
        raise UserError("forecast.profile: not a device profile of scripts/gpu_check.sh (matmul_flops and "
                        "copy_bandwidth_bytes_s are needed); rerun scripts/gpu_check.sh on the GPU")
    if measured.get("kind") != device.kind:
        raise UserError(f"forecast.profile: measured on {measured.get('kind')} ({measured.get('name')}), not on the "
                        f"{device.kind} of forecast.device={device.name}")
    mem = measured.get("memory_bytes")
    return replace(device, flops=float(flops), bandwidth=float(bw),
                   memory_bytes=int(mem) if isinstance(mem, (int, float)) and mem > 0 else device.memory_bytes,
                   efficiency=min(1.0, device.efficiency * device.flops / float(flops)),
                   source=f"measured by scripts/gpu_check.sh on {measured.get('name', '?')} "
                          f"({float(flops) / 1e12:.0f} TFLOP/s {measured.get('matmul_dtype', '')} matmul, "
                          f"{float(bw) / 1e9:.0f} GB/s copy); "
                          f"vendor: {device.source}",
                   refined=dict(measured))


def device(name: str, memory_gib: float | None = None, profile: str | None = None) -> Device:
    """The profile `forecast.device` names, with `forecast.memory_gib` and a gpu_check measurement applied; bad
    input is a UserError (one line)."""
    if name == "cpu":
        dev = cpu()
    elif name in VENDOR:
        dev = VENDOR[name]
        fit = calibration().get("time", {}).get("cuda", {}).get(name)
        if fit:  # a committed GPU benchmark of this card measured its step efficiency
            dev = replace(dev, efficiency=fit["efficiency"], bandwidth_efficiency=fit["bandwidth_efficiency"],
                          source=f"{dev.source}; step efficiency fitted to {fit['calibrated_on']} of its benchmark")
    else:
        raise UserError(f"forecast.device={name}: unknown device; choose one of {', '.join(NAMES)} "
                        f"(or set forecast.memory_gib=N for another card's memory)")
    if profile:
        try:
            measured = json.loads(Path(profile).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"forecast.profile={profile}: cannot read it ({type(e).__name__}); give the "
                            f"device_profile.json scripts/gpu_check.sh wrote") from None
        if not isinstance(measured, dict):
            raise UserError(f"forecast.profile={profile}: not a device profile of scripts/gpu_check.sh")
        dev = refine(dev, measured)
    if memory_gib is not None:
        if not memory_gib > 0:
            raise UserError(f"forecast.memory_gib={memory_gib}: a size in GiB above 0, e.g. 80")
        dev = dev.with_memory(memory_gib)
    return dev


def for_torch_device(dev: Any) -> Device | None:
    """The profile of the device a run trains on (its own forecast), None for an unknown GPU."""
    if dev.type == "cpu":
        return cpu()
    if dev.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(dev)
        for part, key in _BY_CUDA_NAME:
            if part in name:
                return replace(VENDOR[key], memory_bytes=torch.cuda.get_device_properties(dev).total_memory)
    return None
