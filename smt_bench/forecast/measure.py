"""`python -m smt_bench.forecast.measure --out DIR [--smoke]`: what the forecast needs of this machine's device,
measured (scripts/gpu_check.sh runs it): the dense matmul throughput in the precision training runs in (bf16 on
CUDA, fp32 on the CPU), the device-memory copy bandwidth, and the memory size. Writes DIR/device_profile.json,
which `python -m smt_bench.forecast ... forecast.profile=DIR/device_profile.json` uses instead of the vendor's
figures. Only torch is needed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _timed(fn, sync, repeats: int) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(smoke: bool = False) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not smoke
    dev = torch.device("cuda" if cuda else "cpu")
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    dtype = torch.bfloat16 if cuda else torch.float32
    n = 8192 if cuda else (256 if smoke else 2048)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    inner = 10 if cuda else 2
    t_mm = _timed(lambda: [a @ b for _ in range(inner)], sync, 5) / inner
    size = (2 ** 30 if cuda else (2 ** 24 if smoke else 2 ** 28)) // 4
    x = torch.empty(size, device=dev, dtype=torch.float32).fill_(1.0)
    y = torch.empty_like(x)
    t_copy = _timed(lambda: y.copy_(x), sync, 5)
    from .devices import _BY_CUDA_NAME

    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    return {"name": name, "kind": dev.type, "profile": next((k for part, k in _BY_CUDA_NAME if part in name), None)
            if cuda else "cpu",
            "memory_bytes": torch.cuda.get_device_properties(dev).total_memory if cuda else None,
            "matmul_dtype": str(dtype).replace("torch.", ""), "matmul_flops": 2 * n ** 3 / t_mm,
            "matmul_size": n, "copy_bandwidth_bytes_s": 2 * 4 * size / t_copy, "copy_bytes": 4 * size,
            "torch": torch.__version__, "smoke": smoke,
            "how": "best of 5: n×n matmuls (2n³ FLOPs each); a tensor copied on the device (read + write)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smt_bench.forecast.measure", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (tests/test_gpu_check.py)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m = measure(args.smoke)
    (out / "device_profile.json").write_text(json.dumps(m, indent=1) + "\n")
    print(f"device profile: {m['name']}: {m['matmul_flops'] / 1e12:.3g} TFLOP/s {m['matmul_dtype']} matmul, "
          f"{m['copy_bandwidth_bytes_s'] / 1e9:.3g} GB/s copy -> {out / 'device_profile.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
