"""`python -m smt_bench.forecast.calibrate [--bench results/bench] [--out results/forecast]`: the forecast held
against every measurement in the committed benchmark tables (python -m smt_bench.bench), and the CPU's time
figures fitted on one part of them and checked on the rest.

Memory: every (method, budget, depth) a benchmark measured is forecast from its shapes, plan and batch alone and
set beside its measured peak growth (the peak above the built model: what the forecast's `growth` is) and, at
a benchmark's extrapolated full depth, beside its total (fp32 weights + growth). The one fitted memory figure is
the CPU's fixed per-process overhead (allocator arenas, thread pools, kernels' scratch that the first step
touches): the median gap at the calibration depth. Time: effective FLOP/s, bandwidth and a fixed cost per
decoder layer and step, fitted (non-negative least squares on relative error) to the step times at the
calibration depth (1 layer) and checked on every other depth and on SmolLM2 (30 layers, batch 4).

A method of conf/method/ that no benchmark measured is listed as not measured; nothing is invented for it.
Writes calibration.json (what devices.cpu() reads), forecast_vs_measured.json and forecast_vs_measured.md;
the same inputs give the same bytes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EXIT_BAD_INPUT, UserError
from .costs import floor_cost, method_cost
from .devices import Device
from .model import Arch, Cost, Setup, memory, step_time, traffic, flops

REPO = Path(__file__).resolve().parents[2]
GOAL = 0.15  # memory: within ±15% of the measured peak growth
CALIBRATION_DEPTH = 1
MIB = 2 ** 20


def bench_files(folder: Path) -> list[Path]:
    """The benchmark results of smt_bench.bench in a folder (their worker rows under `runs`)."""
    out = []
    for p in sorted(Path(folder).glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and d.get("bench") == "methods_at_shape" and d.get("runs"):
            out.append(p)
    return out


class _Shapes:
    """Meta shapes of a benchmark's model at a depth, built once each."""

    def __init__(self) -> None:
        self.cache: dict[str, Any] = {}

    def at(self, source: dict, layers: int):
        key = json.dumps([source, layers], sort_keys=True)
        if key not in self.cache:
            from hydra.utils import instantiate
            from omegaconf import OmegaConf

            from ..models import meta_shapes

            cfg = instantiate(OmegaConf.create(source)).hf_config()
            cfg.num_hidden_layers = layers
            self.cache[key] = meta_shapes(cfg)
        return self.cache[key]


def _method(name: str, bench_cfg: dict):
    """The method as the benchmark built it (smt_bench/bench/__main__.py _method_config)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ..bench.__main__ import _method_config

    bench = {"smt_overrides": [], "smt_warmup_steps": 2, **bench_cfg}  # older benches: the defaults they ran with
    bench = {k: v for k, v in bench.items() if v is not None or k != "smt_overrides"}
    node = _method_config(name, OmegaConf.create(bench))
    return None if node is None else instantiate(OmegaConf.create(node), _convert_="all")


def row_cost(name: str, method: Any, shapes: Any, row: dict) -> Cost:
    from ..methods.base import Plan

    if method is None:
        return floor_cost(shapes)
    plan = Plan(int(row["trainable_params"]), int(row["trainable_params"]), dict(row.get("plan") or {}))
    cost = method_cost(method, shapes, plan)
    if name == "smt_reference":  # the reference's layers: the whole input saved, torch AdamW over per-block tensors,
        # beside the SMT layers' own blocks, which the benchmark's SMTTuned still holds (bench/worker.py to_reference)
        from ..methods.smt.tuned import PROJ
        from .costs import _group_inputs

        arch = Arch.from_shapes(shapes)
        full = arch.layers * _group_inputs(arch, {PROJ[p] for p in method.projections})
        cost = replace(cost, added=2 * cost.added, trained_inputs=full, optimizer="foreach", backward_temp=0.0,
                       no_cast_linear=0)
    return cost


def collect(folder: Path) -> tuple[list[dict], list[str]]:
    """One entry per measured (bench file, method, budget, depth): its forecast inputs and medians."""
    shapes = _Shapes()
    methods: dict[tuple[str, str], Any] = {}
    rows: list[dict] = []
    files = []
    for path in bench_files(folder):
        d = json.loads(path.read_text())
        files.append(path.name)
        bench, facts = d["config"]["bench"], d["facts"]
        source = d["config"]["model"]["source"]
        groups: dict[tuple, list[dict]] = {}
        for r in d["runs"]:
            if r.get("failed"):
                continue
            groups.setdefault((r["method"], r["budget"], int(r["layers"])), []).append(r)
        for (name, budget, layers), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2])):
            key = (path.name, name)
            if key not in methods:
                methods[key] = _method(name, bench)
            sh = shapes.at(source, layers)
            cost = row_cost(name, methods[key], sh, rs[0])
            rows.append({
                "bench": path.stem, "model": facts["model"], "depth": int(facts["depth"]), "method": name,
                "budget": budget, "layers": layers, "batch": int(bench["batch_size"]), "seq": int(bench["seq_len"]),
                "measured_growth": statistics.median(r["peak_bytes"] for r in rs),
                "measured_step_s": statistics.median(r["median_step_s"] for r in rs),
                "measured_prepare": statistics.median(r["prepare_peak_bytes"] for r in rs)
                if all(r.get("prepare_peak_bytes") is not None for r in rs) else None,
                "rounds": len(rs), "arch": Arch.from_shapes(sh), "cost": cost,
                "source": source, "device": str(facts.get("device", "cpu")).split(":")[0],
                "device_name": str((d.get("meta_info") or {}).get("device", {}).get("name") or "")})
    return rows, files


def _gpu(row: dict) -> Device:
    """A CUDA benchmark's card, by its name (the vendor profile; H100 where the name is not known)."""
    from .devices import _BY_CUDA_NAME, VENDOR

    return VENDOR[next((k for part, k in _BY_CUDA_NAME if part in row["device_name"]), "h100-80gb")]


def _predict(row: dict, device: Device, overhead: int) -> dict:
    if row["device"] == "cuda":  # a GPU benchmark: its card's profile; memory and time are checks only
        device = _gpu(row)
        overhead = device.memory_overhead
    setup = Setup(batch=row["batch"], seq=row["seq"], padded=False)  # the benchmark passes no padding mask
    mem = memory(row["arch"], row["cost"], setup, device, overhead)
    st = step_time(row["arch"], row["cost"], setup, device, mem)
    return {"mem": mem, "time": st}


def _nnls(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a few unknowns: the best of the least-squares fits on every subset of the
    columns whose coefficients are all non-negative (the others held at 0)."""
    from itertools import combinations

    k = A.shape[1]
    best, best_res = np.zeros(k), float(np.sum(y ** 2))
    for n in range(1, k + 1):
        for cols in combinations(range(k), n):
            c, *_ = np.linalg.lstsq(A[:, cols], y, rcond=None)
            if (c < 0).any():
                continue
            res = float(np.sum((A[:, cols] @ c - y) ** 2))
            if res < best_res:
                best, best_res = np.zeros(k), res
                best[list(cols)] = c
    return best


def fit_time(rows: list[dict], device: Device, overhead: int) -> dict:
    """Effective FLOP/s, bandwidth (bytes/s) and seconds per decoder layer and step, non-negative, minimising the
    relative error of the step times of `rows`."""
    A, y = [], []
    for r in rows:
        setup = Setup(batch=r["batch"], seq=r["seq"], padded=False)
        mem = memory(r["arch"], r["cost"], setup, device, overhead)
        f = flops(r["arch"], r["cost"], setup)
        b = traffic(r["arch"], r["cost"], setup, device, mem)
        t = r["measured_step_s"]
        A.append([f / t, b / t, r["arch"].layers / t])
        y.append(1.0)
    a, beta, gamma = (float(c) for c in _nnls(np.array(A), np.array(y)))
    return {"flops": 1.0 / a if a > 0 else 1e30, "bandwidth": 1.0 / beta if beta > 0 else 1e30,
            "step_overhead_s": gamma}


def calibrate(folder: Path) -> dict:
    from .devices import cpu

    rows, files = collect(folder)
    if not rows:
        raise UserError(f"--bench {folder}: no results of python -m smt_bench.bench there (JSONs with runs)")
    cal_rows = [r for r in rows if r["layers"] == CALIBRATION_DEPTH and r["depth"] != CALIBRATION_DEPTH
                and r["device"] == "cpu"]
    if not cal_rows:
        raise UserError(f"--bench {folder}: no measurement at {CALIBRATION_DEPTH} layer to calibrate on")
    base = cpu({})  # round figures; memory does not depend on them
    gaps = [r["measured_growth"] - _predict(r, base, 0)["mem"].growth for r in cal_rows]
    overhead = int(statistics.median(gaps))
    fit = fit_time(cal_rows, base, overhead)
    dev = replace(base, flops=fit["flops"], bandwidth=fit["bandwidth"], step_overhead_s=fit["step_overhead_s"])
    out_rows = []
    for r in rows:
        p = _predict(r, dev, overhead)
        mem, st = p["mem"], p["time"]
        growth_err = mem.growth / r["measured_growth"] - 1
        entry = {"bench": r["bench"], "device": r["device"], "model": r["model"], "method": r["method"],
                 "budget": r["budget"],
                 "layers": r["layers"], "batch": r["batch"], "seq": r["seq"], "rounds": r["rounds"],
                 "role": "calibration" if r in cal_rows else "check",
                 "measured_growth_bytes": int(r["measured_growth"]), "forecast_growth_bytes": int(mem.growth),
                 "growth_error": round(growth_err, 4), "forecast_phase": mem.phase,
                 "measured_total_bytes": int(4 * r["arch"].total_params + r["measured_growth"]),
                 "forecast_total_bytes": int(mem.peak),
                 "total_error": round(mem.peak / (4 * r["arch"].total_params + r["measured_growth"]) - 1, 4),
                 "measured_step_s": round(r["measured_step_s"], 4), "forecast_step_s": round(st.seconds, 4),
                 "time_error": round(st.seconds / r["measured_step_s"] - 1, 4)}
        if r["measured_prepare"] is not None and mem.warmup_growth is not None:
            entry["measured_warmup_bytes"] = int(r["measured_prepare"])
            entry["forecast_warmup_bytes"] = int(mem.warmup_growth)
            entry["warmup_error"] = round(mem.warmup_growth / r["measured_prepare"] - 1, 4)
        out_rows.append(entry)
    full = _full_depth(rows, dev, overhead)
    cuda = _gpu_efficiency(rows, out_rows)
    measured = sorted({r["method"] for r in rows})
    conf = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
    on_cpu = [e for e in out_rows if e["device"] == "cpu"]  # the goal and the fit are the CPU's
    check = [e for e in on_cpu if e["role"] == "check"]
    cal = [e for e in on_cpu if e["role"] == "calibration"]
    summary = {
        "memory_goal": GOAL,
        "memory_within_goal": sum(abs(e["growth_error"]) <= GOAL for e in on_cpu),
        "memory_rows": len(on_cpu),
        "memory_max_abs_error": round(max(abs(e["growth_error"]) for e in on_cpu), 4),
        "memory_per_method": {m: round(max(abs(e["growth_error"]) for e in on_cpu if e["method"] == m), 4)
                              for m in measured if any(e["method"] == m for e in on_cpu)},
        "gpu_rows": len(out_rows) - len(on_cpu),
        "time_calibration_median_abs_error": round(statistics.median(abs(e["time_error"]) for e in cal), 4),
        "time_check_median_abs_error": round(statistics.median(abs(e["time_error"]) for e in check), 4)
        if check else None,
        "time_check_max_abs_error": round(max(abs(e["time_error"]) for e in check), 4) if check else None,
        "time_check_per_method": {m: round(statistics.median(abs(e["time_error"]) for e in check
                                                             if e["method"] == m), 4)
                                  for m in measured if any(e["method"] == m for e in check)},
    }
    return {
        "command": "python -m smt_bench.forecast.calibrate",
        "inputs": files,
        "memory": {"cpu_overhead_bytes": overhead,
                   "calibrated_on": f"{len(cal_rows)} measurements at {CALIBRATION_DEPTH} layer (median gap)"},
        "time": {"cpu": {"flops": round(fit["flops"], -6), "bandwidth": round(fit["bandwidth"], -6),
                         "step_overhead_s": round(fit["step_overhead_s"], 6),
                         "calibrated_on": f"{len(cal_rows)} step times at {CALIBRATION_DEPTH} layer"},
                 **({"cuda": cuda} if cuda else {})},
        "not_measured": [m for m in conf if m not in measured],
        "summary": summary,
        "rows": out_rows,
        "full_depth": full,
    }


def _gpu_efficiency(rows: list[dict], out_rows: list[dict]) -> dict:
    """Per GPU profile that a committed GPU benchmark measured: the step efficiency that makes the vendor profile's
    forecast meet the measured step times at the calibration depth (the median ratio applied to the assumed
    compute and bandwidth efficiencies, at most 1). The forecast then uses it for that card (devices.device)."""
    from .devices import GPU_BANDWIDTH_EFFICIENCY, GPU_EFFICIENCY

    by: dict[str, list[float]] = {}
    for r, e in zip(rows, out_rows):
        if r["device"] == "cuda" and r["layers"] == CALIBRATION_DEPTH and r["depth"] != CALIBRATION_DEPTH:
            by.setdefault(_gpu(r).name, []).append(e["forecast_step_s"] / e["measured_step_s"])
    return {name: {"efficiency": round(min(1.0, GPU_EFFICIENCY * statistics.median(x)), 4),
                   "bandwidth_efficiency": round(min(1.0, GPU_BANDWIDTH_EFFICIENCY * statistics.median(x)), 4),
                   "calibrated_on": f"{len(x)} step times at {CALIBRATION_DEPTH} layer"}
            for name, x in sorted(by.items())}


def _full_depth(rows: list[dict], dev: Device, overhead: int) -> list[dict]:
    """Where a benchmark measured two depths: its extrapolation to the full depth (total = fp32 weights + the
    growth extrapolated linearly) beside the forecast at full depth."""
    out = []
    by: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        by.setdefault((r["bench"], r["method"], r["budget"]), {})[r["layers"]] = r
    for (bench, method, budget), depths in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)):
        if len(depths) < 2:
            continue
        (l1, a), (l2, b) = sorted(depths.items())[:2]
        D = a["depth"]
        grow = a["measured_growth"] + (b["measured_growth"] - a["measured_growth"]) / (l2 - l1) * (D - l1)
        full_arch = a["arch"].at_depth(D)
        # the full-depth plan: the benchmark trains each depth's share of it (trainable ∝ depth)
        scale = D / l1
        cost = _scaled(a["cost"], scale, a["arch"], full_arch)
        d = _gpu(a) if a["device"] == "cuda" else dev
        mem = memory(full_arch, cost, Setup(batch=a["batch"], seq=a["seq"], padded=False), d,
                     d.memory_overhead if a["device"] == "cuda" else overhead)
        measured_total = 4 * full_arch.total_params + grow
        out.append({"bench": bench, "method": method, "budget": budget, "depth": D,
                    "measured_total_bytes": int(measured_total), "forecast_total_bytes": int(mem.peak),
                    "total_error": round(mem.peak / measured_total - 1, 4),
                    "measured_growth_bytes": int(grow), "forecast_growth_bytes": int(mem.growth),
                    "growth_error": round(mem.growth / grow - 1, 4)})
    return out


def _scaled(cost: Cost, k: float, arch: Arch, full: Arch) -> Cost:
    """A depth's cost terms scaled to the full depth: what grows with the layers grows by k (the benchmark's plans
    are the full-depth plan's share per depth); per-layer temporaries stay."""
    def s(x):
        return type(x)(x * k)
    n = cost.trainable
    if cost.grad_from_embeddings and cost.head_trains:  # full FT: the whole model trains
        n_full = full.total_params
        return replace(cost, trainable=n_full, trained_linear=full.linear_params + full.head_params,
                       trained_inputs=cost.trained_inputs * k)
    return replace(cost, trainable=s(n), added=s(cost.added), trained_linear=s(cost.trained_linear),
                   trained_inputs=cost.trained_inputs * k, own_saved=cost.own_saved * k, own_masks=cost.own_masks * k,
                   own_flops_per_token=cost.own_flops_per_token * k,
                   own_flops_per_forward=cost.own_flops_per_forward * k,
                   own_bytes_per_forward=cost.own_bytes_per_forward * k, no_cast_linear=s(cost.no_cast_linear),
                   state_params=None if cost.state_params is None else s(cost.state_params), warmup=None)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f}%"


def _budget(b: float | None) -> str:
    return "–" if b is None else f"{b:g}"


def _mib(x: float | None) -> str:
    return "–" if x is None else f"{x / MIB:,.0f}"


def markdown(cal: dict) -> str:
    s, t = cal["summary"], cal["time"]["cpu"]
    lines = ["# Forecast vs measured", "",
             "<!-- generated by `python -m smt_bench.forecast.calibrate` from the benchmark JSONs in results/bench/; "
             "tests/test_forecast.py holds it equal -->", "",
             f"Inputs: {', '.join(cal['inputs'])}. Every (method, budget, depth) a benchmark measured, forecast from "
             "its shapes, plan and batch alone (smt_bench/forecast/; docs/forecast.md) and set beside the measured "
             "median. *Growth* is the peak above the built model, what a run measures (CPU: peak RSS growth); "
             "*total* adds the fp32 weights. Memory goal: growth within ±"
             f"{100 * cal['summary']['memory_goal']:.0f}%.", "",
             f"Fitted on the {cal['memory']['calibrated_on']}: the CPU's fixed per-process memory "
             f"{cal['memory']['cpu_overhead_bytes'] / MIB:.0f} MiB; on the {t['calibrated_on']}: "
             f"{t['flops'] / 1e9:.1f} GFLOP/s effective, {t['bandwidth'] / 1e9:.2f} GB/s, "
             f"{1e3 * t['step_overhead_s']:.1f} ms per layer and step. Every other row is a check.", "",
             f"Memory on the CPU: {s['memory_within_goal']} of {s['memory_rows']} within "
             f"±{100 * s['memory_goal']:.0f}% "
             f"(largest error {100 * s['memory_max_abs_error']:.1f}%). Time: median |error| "
             f"{100 * s['time_calibration_median_abs_error']:.1f}% where calibrated, "
             f"{_pct(s['time_check_median_abs_error']).lstrip('+')} on the checks (largest "
             f"{_pct(s['time_check_max_abs_error']).lstrip('+')}).", "",
             "GPU benchmarks (none yet, or listed below with their device) are checks of the vendor profiles: not in "
             "the fit or the goal.", "",
             "| method | largest memory error | time: median absolute error on the checks |", "| --- | --- | --- |"]
    for m, e in s["memory_per_method"].items():
        lines.append(f"| {m} | {100 * e:.1f}% | {_pct(s['time_check_per_method'].get(m)).lstrip('+')} |")
    for m in cal["not_measured"]:
        lines.append(f"| {m} | not measured | not measured |")
    lines += ["", "## Every measurement", "",
              "| bench | method | budget | layers | batch × seq | growth measured (MiB) | forecast (MiB) | error | "
              "peak phase | total error | step measured (s) | forecast (s) | error | role |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in cal["rows"]:
        flag = "" if abs(e["growth_error"]) <= GOAL else " **miss**"
        lines.append(f"| {e['bench']} | {e['method']} | {_budget(e['budget'])} | "
                     f"{e['layers']} | {e['batch']} × {e['seq']} | {_mib(e['measured_growth_bytes'])} | "
                     f"{_mib(e['forecast_growth_bytes'])} | {_pct(e['growth_error'])}{flag} | {e['forecast_phase']} | "
                     f"{_pct(e['total_error'])} | {e['measured_step_s']:.3f} | {e['forecast_step_s']:.3f} | "
                     f"{_pct(e['time_error'])} | {e['role']} |")
    warm = [e for e in cal["rows"] if "warmup_error" in e]
    if warm:
        lines += ["", "## SMT's warm-up (its prepare phase's peak growth)", "",
                  "| bench | method | budget | layers | measured (MiB) | forecast (MiB) | error |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for e in warm:
            lines.append(f"| {e['bench']} | {e['method']} | {_budget(e['budget'])} | {e['layers']} | "
                         f"{_mib(e['measured_warmup_bytes'])} | {_mib(e['forecast_warmup_bytes'])} | "
                         f"{_pct(e['warmup_error'])} |")
    if cal["full_depth"]:
        lines += ["", "## At full depth (the benchmarks' linear extrapolation from two depths)", "",
                  "| bench | method | budget | layers | total measured (GiB) | forecast (GiB) | error | growth error |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for e in cal["full_depth"]:
            lines.append(f"| {e['bench']} | {e['method']} | {_budget(e['budget'])} | "
                         f"{e['depth']} | {e['measured_total_bytes'] / 2 ** 30:.2f} | "
                         f"{e['forecast_total_bytes'] / 2 ** 30:.2f} | {_pct(e['total_error'])} | "
                         f"{_pct(e['growth_error'])} |")
    return "\n".join(lines) + "\n"


def write(cal: dict, out: Path) -> list[Path]:
    from ..results import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    keep = {k: v for k, v in cal.items() if k not in ("rows", "full_depth")}
    paths = [out / "calibration.json", out / "forecast_vs_measured.json", out / "forecast_vs_measured.md"]
    write_json_atomic(paths[0], keep)
    write_json_atomic(paths[1], {"rows": cal["rows"], "full_depth": cal["full_depth"]})
    paths[2].write_text(markdown(cal))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smt_bench.forecast.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--bench", default=str(REPO / "results" / "bench"), help="folder of smt_bench.bench JSONs")
    p.add_argument("--out", default=str(REPO / "results" / "forecast"), help="where the tables go")
    args = p.parse_args(argv)
    try:
        cal = calibrate(Path(args.bench))
    except UserError as e:
        print(f"smt-bench forecast: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for path in write(cal, Path(args.out)):
        print(f"[forecast] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
