"""`python -m smt_bench.forecast [-m] <overrides> [forecast.device=NAME] [forecast.memory_gib=N]
[forecast.profile=PATH] [forecast.json=PATH]`: what a command line will cost before it is submitted.

It takes the same overrides as `python -m smt_bench` (paste the sweep's command after it), runs the same
preflight (every job's config composed and checked, budgets planned on meta-device shapes; no weight loads, nothing
trains, nothing is submitted) and prints, per cell (method × budget × model, its seeds together) and in total: the
peak memory per rank and its breakdown, steps, step time and GPU-hours on the device, and the cells that do not fit
the device with the nearest change that does (docs/forecast.md).

- forecast.device: h100-80gb (default), h200, a100-80gb, a100-40gb, cpu
- forecast.memory_gib: the card's memory instead of the profile's
- forecast.profile: the device_profile.json scripts/gpu_check.sh wrote on the card (measured matmul throughput and
  bandwidth instead of the vendor's figures)
- forecast.json: also write the forecast as JSON there
- forecast.ranks: ranks per run where no launcher says (torchrun --nproc_per_node N); SLURM's come from
  hydra.launcher.nodes × tasks_per_node
Bad input is one line `smt-bench: error: ...` and exit 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import EXIT_BAD_INPUT, UserError

KEYS = ("device", "memory_gib", "profile", "json", "ranks")


def split_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(the forecast.* settings, the rest: the app's overrides). A mistyped forecast key is bad input."""
    opts: dict[str, str] = {}
    rest = []
    for a in argv:
        if a.startswith("forecast."):
            key, _, value = a[len("forecast."):].partition("=")
            if key not in KEYS or not _:
                raise UserError(f"{a}: unknown forecast setting; use forecast.<key>=VALUE with key one of "
                                f"{', '.join(KEYS)}")
            opts[key] = value
        else:
            rest.append(a)
    return opts, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        return 0
    from ..__main__ import _fail, check_group_choices, preflight
    from .devices import device as make_device
    from .sweep import forecast_jobs, table, to_json

    try:
        opts, rest = split_args(argv)
        mem = opts.get("memory_gib")
        try:
            gib = float(mem) if mem is not None else None
        except ValueError:
            raise UserError(f"forecast.memory_gib={mem}: a size in GiB, e.g. 80") from None
        dev = make_device(opts.get("device", "h100-80gb"), gib, opts.get("profile"))
        ranks = opts.get("ranks")
        if ranks is not None and not (ranks.isdigit() and int(ranks) >= 1):
            raise UserError(f"forecast.ranks={ranks}: a number of ranks per run, 1 or more")
    except UserError as e:
        _fail(str(e))
    check_group_choices(rest)
    plan = preflight(rest, keep=True)  # bad input: one line, exit 2
    jobs = forecast_jobs(plan.all_prepared, int(ranks) if ranks else plan.world_size, dev)
    print(table(jobs, dev, plan.skipped))
    if opts.get("json"):
        from ..results import write_json_atomic

        write_json_atomic(Path(opts["json"]), to_json(jobs, dev))
        print(f"[forecast] wrote {opts['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
