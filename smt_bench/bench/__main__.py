"""`python -m smt_bench.bench [model=...] [bench.<key>=...]`: memory and speed of every method at one
model's real shapes, from two depths extrapolated to the full one (docs/benchmarks.md).

Each (method, budget, depth) runs in its own process (smt_bench/bench/worker.py), methods interleaved
over rounds. On CPU every worker runs with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_), so
peak RSS follows live tensors instead of blocks malloc keeps; on CUDA the allocator's peak is read.
Budgets are fractions of the full-depth model: the plan is made there (rank, blocks) and each depth
trains its share of it, so the per-layer figures add up to the full model's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ..errors import EXIT_BAD_INPUT, BudgetUnreachable, UserError
from ..schema.store import CONF, register
from .report import summarize, write_report
from .worker import FLOOR, REFERENCE

register()
MMAP_THRESHOLD = 65536  # bytes; a fixed value also turns off glibc's dynamic threshold


def methods() -> tuple[str, ...]:
    """What `bench.methods` may name: the floor, every method of conf/method/ (read from the folder) and
    reference-style SMT. `bench.methods=all` is all of them."""
    return (FLOOR, *sorted(p.stem for p in (CONF / "method").glob("*.yaml")), REFERENCE)


def _named(bench) -> list[str]:
    return [bench.methods] if isinstance(bench.methods, str) else list(bench.methods)


def selected(bench) -> list[str]:
    names = _named(bench)
    return list(methods()) if names == ["all"] else names


def fixed_fraction(method_cfg: dict | None) -> float | None:
    """The method's own budget where it has one (full FT 1.0, HFT 0.5): Method.fixed_fraction of its class."""
    from hydra.utils import get_class

    return None if method_cfg is None else getattr(get_class(method_cfg["_target_"]), "fixed_fraction", None)


def _method_config(name: str, bench) -> dict | None:
    """The harness's own config of the method (conf/method/<name>.yaml), as a run would use it."""
    from ..__main__ import compose_config

    if name == FLOOR:
        return None
    smt = name in ("smt", REFERENCE)
    extra = [f"method.{o}" for o in bench.smt_overrides] if smt else []
    try:
        node = compose_config([f"method={'smt' if name == REFERENCE else name}", *extra]).method
    except Exception as e:  # a mistyped override: Hydra's own message, in one line
        raise UserError(f"bench.smt_overrides={list(bench.smt_overrides)}: {str(e).splitlines()[0]}") from None
    container = OmegaConf.to_container(node, resolve=True)
    if smt:
        container["warmup_steps"] = int(bench.smt_warmup_steps)
    return container


def check(cfg: DictConfig) -> None:
    b = cfg.bench
    known = methods()
    bad = [m for m in _named(b) if m not in known] if _named(b) != ["all"] else []
    if bad or not _named(b):
        raise UserError(f"bench.methods: unknown {bad}; choose from {list(known)}, or all")
    if not (len(b.layers) == 2 and 0 < b.layers[0] < b.layers[1] or len(b.layers) == 1 and b.layers[0] > 0):
        raise UserError(f"bench.layers={list(b.layers)}: give two depths, the smaller first, e.g. [1,2], "
                        "or the model's own depth alone")
    if b.steps <= b.skip or b.skip < 0:
        raise UserError(f"bench.steps={b.steps} must be above bench.skip={b.skip} (>= 0)")
    if any(not 0 < f <= 1 for f in b.budgets):
        raise UserError(f"bench.budgets={list(b.budgets)}: fractions in (0, 1]")
    if b.batch_size < 1 or b.seq_len < 2 or b.rounds < 1:
        raise UserError("bench.batch_size >= 1, bench.seq_len >= 2 and bench.rounds >= 1 are required")
    if not set(b.analytic_only) <= set(selected(b)):
        raise UserError(f"bench.analytic_only={list(b.analytic_only)}: methods from bench.methods "
                        f"{selected(b)}")


def plan_jobs(cfg: DictConfig) -> tuple[list[dict], dict]:
    """Every worker spec, and the full-depth facts (shapes, plans) the report extrapolates to."""
    from hydra.utils import instantiate

    from ..models import meta_shapes
    from ..run import _build

    from .. import hub_kernels

    b = cfg.bench
    hub_kernels.preflight(cfg.model.hub_kernels)
    source = instantiate(cfg.model.source)
    full = meta_shapes(source.hf_config())
    depth = source.hf_config().num_hidden_layers
    if b.layers[-1] > depth or len(b.layers) == 1 and b.layers[0] != depth:
        raise UserError(f"bench.layers={list(b.layers)}: model {cfg.model.name} has {depth} layers; "
                        f"give two depths up to {depth} to extrapolate from, or [{depth}] to measure it whole")
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if cfg.device == "auto" else str(cfg.device))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={cfg.device}: CUDA is not available here; use device=cpu or device=auto")
    facts: dict = {"model": cfg.model.name, "depth": depth, "total_params": full.total_params, "device": device,
                   "plans": {}, "fixed": [], "methods": selected(b)}
    jobs = []
    model_source = OmegaConf.to_container(cfg.model.source, resolve=True)
    for name in selected(b):
        method_cfg = _method_config(name, b)
        fixed = fixed_fraction(method_cfg)
        if fixed is not None:
            facts["fixed"].append(name)
        budgets = [None] if name == FLOOR or fixed is not None else list(b.budgets)
        for frac in budgets:
            achieved = 0
            if method_cfg is not None:  # the floor has no method
                method = _build(OmegaConf.create(method_cfg), "method")  # bad values: UserError, one line
                share = frac if frac is not None else fixed
                assert share is not None  # a budgeted method has frac; a fixed-fraction one its own share
                target = round(share * full.total_params)
                try:
                    plan = method.plan(full, target)
                except BudgetUnreachable as e:  # LISA's whole layers at a small budget: a row that says so
                    facts["plans"][f"{name}@{frac}"] = {"unreachable": str(e)}
                    continue
                achieved = plan.achieved_params
                if name != "full_ft":  # full FT's plan is the whole model (facts.total_params)
                    facts["plans"][f"{name}@{frac}"] = {"achieved_params": achieved, **plan.detail}
            for layers in b.layers:
                jobs.append({"name": name, "budget": frac, "layers": int(layers), "device": device,
                             "model_source": model_source, "hub_kernels": bool(cfg.model.hub_kernels),
                             "method": method_cfg,
                             # a budgeted method trains its share of the full-depth plan; a fixed one plans itself
                             "target_params": round(achieved * layers / depth) if fixed is None else None,
                             "batch_size": int(b.batch_size), "seq_len": int(b.seq_len), "steps": int(b.steps),
                             "skip": int(b.skip), "threads": b.threads, "profile": bool(b.profile),
                             "analytic_only": name in b.analytic_only})
    if not jobs:
        raise UserError(f"bench.budgets={list(b.budgets)}: no method of {selected(b)} can meet them on "
                        f"{cfg.model.name}; choose other budgets")
    return jobs, facts


def _run_worker(spec: dict, isolate: bool = True) -> dict:
    if not isolate:  # one process for all (smoke runs, tests): its memory figures are not per method
        from .worker import measure

        return measure(spec)
    env = dict(os.environ)
    if spec["device"] == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    p = subprocess.run([sys.executable, "-m", "smt_bench.bench.worker", json.dumps(spec)], capture_output=True,
                       text=True, env=env)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if p.returncode or line is None:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"method": spec["name"], "layers": spec["layers"], "budget": spec["budget"], "failed": True,
                "error": f"exit {p.returncode}: {tail}"}
    return json.loads(line[len("RESULT "):])


@hydra.main(config_path=str(CONF), config_name="benchmark", version_base="1.3")
def app(cfg: DictConfig) -> None:
    from .. import hub_kernels, provenance

    try:
        check(cfg)
        jobs, facts = plan_jobs(cfg)
    except UserError as e:
        print(f"smt-bench bench: error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    b = cfg.bench
    started, t0 = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.monotonic()
    measured = [j for j in jobs if not j["analytic_only"]]
    runs: list[dict] = []
    for r in range(int(b.rounds)):
        k = r % max(len(measured), 1)
        for spec in measured[k:] + measured[:k]:  # rotate: no method always runs first
            res = _run_worker(spec, bool(b.isolate))
            res["round"] = r
            runs.append(res)
            what = f"{spec['name']}" + (f" @ {spec['budget']:g}" if spec["budget"] else "")
            print(f"[bench] round {r} {what}, {spec['layers']} layer(s): " +
                  (res["error"] if res.get("failed") else
                   f"step {res['median_step_s']:.3f}s, peak +{res['peak_bytes'] / 2**20:.0f} MiB"), flush=True)
    container = OmegaConf.to_container(cfg, resolve=True)
    result = {
        "bench": "methods_at_shape", "config": container, "config_hash": provenance.config_hash(container),
        "command": " ".join(["python -m smt_bench.bench", *sys.argv[1:]]),
        "memory_env": {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD} if facts["device"] == "cpu" and b.isolate else {},
        "started": started, "wall_s": round(time.monotonic() - t0, 1), "facts": facts, "runs": runs,
        "meta_info": {**provenance.meta_info(torch.device(facts["device"])),
                      "hub_kernels": hub_kernels.record(cfg.model.hub_kernels)},
    }
    result["summary"], result["goals"] = summarize(runs, facts, selected(b), list(b.budgets), list(b.layers))
    name = b.name or f"{cfg.model.name}-{facts['device'].split(':')[0]}"
    paths = write_report(result, Path(b.out), name)
    print(Path(paths[1]).read_text())
    print(f"[bench] wrote {paths[0]} and {paths[1]}")


def main() -> None:
    from ..__main__ import check_group_choices

    check_group_choices(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
