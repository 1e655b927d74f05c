"""From worker measurements at two depths to full-depth figures, ratios, the goals, JSON and markdown.

Extrapolation is linear in depth: x(D) = x(L1) + (x(L2) - x(L1)) / (L2 - L1) * (D - L1), for step time,
peak memory growth and each measured memory part; with one depth (the model's own) the figures are
the measured ones. Total memory at full depth = the fp32 base weights
(4 bytes x full-depth parameters, exact) + the extrapolated peak growth above them. The analytic state
beside it is weights + gradients + AdamW's two moments, all fp32 (activations are measured only).
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ..results import write_json_atomic
from .worker import FLOOR

GIB = 2 ** 30
WARMED = ("smt", "smt_reference", "corda")  # methods with a data pass of their own before training
PARTS = ("weights", "gradients", "optimizer", "activations")


def _key(method: str, budget) -> str:
    return method if budget is None else f"{method}@{budget:g}"


def _extrapolate(x1: float, x2: float, l1: int, l2: int, depth: int) -> float:
    if l1 == l2:  # measured at full depth
        return x1
    return x1 + (x2 - x1) / (l2 - l1) * (depth - l1)


def _median(rows, field):
    vals = [r[field] for r in rows if field in r]
    return statistics.median(vals) if vals else None


def summarize(runs: list[dict], facts: dict, methods: list[str], budgets: list[float],
              layers: list[int]) -> tuple[dict, dict]:
    l1, l2 = layers[0], layers[-1]
    depth, n_full = facts["depth"], facts["total_params"]
    summary: dict[str, dict] = {}
    fixed = facts.get("fixed", ["full_ft"])  # methods whose budget is their own (benches before HFT: full FT only)
    for m in methods:
        for frac in ([None] if m == FLOOR or m in fixed else budgets):
            key = _key(m, frac)
            plan = facts["plans"].get(f"{m}@{frac}", {})
            if "unreachable" in plan:  # the method cannot meet this budget on this model: nothing ran
                summary[key] = {"method": m, "budget": frac, "unreachable": plan["unreachable"], "measured": False,
                                "trainable_params_full": None, "per_depth": {}, "total_bytes_full": None,
                                "analytic_total_bytes_full": None}
                continue
            trainable = n_full if m == "full_ft" else (0 if m == FLOOR else plan.get("achieved_params", 0))
            mine = [r for r in runs if r["method"] == m and r["budget"] == frac and not r.get("failed")]
            if any("added_params" in r for r in mine):  # measured: the method's tensors beside the base weights
                adapters = trainable if any(r["added_params"] > 0 for r in mine) else 0
            else:  # benches before that was measured: LoRA's and DoRA's adapters
                adapters = trainable if m in ("lora", "dora") else 0
            analytic = {"weights": 4 * (n_full + adapters), "gradients": 4 * trainable, "optimizer": 8 * trainable}
            s = {"method": m, "budget": frac, "trainable_params_full": trainable, "plan": plan,
                 "analytic_state_bytes_full": analytic, "analytic_total_bytes_full": sum(analytic.values())}
            per: dict[int, Any] = {}  # depth -> its medians, {"error": ...} or None (not run)
            for L in layers:
                rows = [r for r in runs if r["method"] == m and r["budget"] == frac and r["layers"] == L
                        and not r.get("failed")]
                failed = [r["error"] for r in runs if r["method"] == m and r["budget"] == frac and r["layers"] == L
                          and r.get("failed")]
                if not rows:
                    per[L] = {"error": failed[0]} if failed else None
                    continue
                per[L] = {"median_step_s": _median(rows, "median_step_s"), "peak_bytes": _median(rows, "peak_bytes"),
                          "prepare_peak_bytes": _median(rows, "prepare_peak_bytes"),
                          "prepare_s": _median(rows, "prepare_s"), "trainable_params": rows[0]["trainable_params"],
                          "breakdown_bytes": {p: statistics.median(r["breakdown_bytes"][p] for r in rows) for p in PARTS},
                          "step_spread_s": [min(min(r["step_times_s"][1:] or r["step_times_s"]) for r in rows),
                                            max(max(r["step_times_s"]) for r in rows)],
                          "rounds": len(rows)}
            s["per_depth"] = {str(L): per[L] for L in layers}
            if all(per[L] and "median_step_s" in per[L] for L in layers):
                a, b = per[l1], per[l2]
                ext = lambda f: _extrapolate(a[f], b[f], l1, l2, depth)  # noqa: E731
                s["step_s_full"] = ext("median_step_s")
                s["peak_growth_bytes_full"] = ext("peak_bytes")
                if l2 > l1:
                    s["per_layer_step_s"] = (b["median_step_s"] - a["median_step_s"]) / (l2 - l1)
                    s["per_layer_peak_bytes"] = (b["peak_bytes"] - a["peak_bytes"]) / (l2 - l1)
                s["total_bytes_full"] = 4 * n_full + s["peak_growth_bytes_full"]
                s["breakdown_bytes_full"] = {p: _extrapolate(a["breakdown_bytes"][p], b["breakdown_bytes"][p], l1, l2,
                                                             depth) for p in PARTS}
                if m in WARMED and a.get("prepare_peak_bytes") is not None:  # SMT's warm-up; peft's prepare is an init
                    s["prepare_peak_bytes_full"] = ext("prepare_peak_bytes")
                    s["warmup_peak_to_train_peak"] = s["prepare_peak_bytes_full"] / s["peak_growth_bytes_full"]
                s["measured"] = True
            else:
                s["measured"] = False
                s["total_bytes_full"] = s["analytic_total_bytes_full"]  # said so in the table
            summary[key] = s
    ft = summary.get("full_ft")
    floor = summary.get(FLOOR)
    goals = {}
    for key, s in summary.items():
        if "unreachable" in s:
            continue
        if ft:
            s["memory_to_full_ft"] = s["total_bytes_full"] / ft["total_bytes_full"]
        if floor and floor.get("measured") and s.get("measured"):
            s["step_to_floor"] = s["step_s_full"] / floor["step_s_full"]
            # at each measured depth: one ratio of two medians, steadier than the extrapolated difference
            s["step_to_floor_by_depth"] = {L: d["median_step_s"] / floor["per_depth"][L]["median_step_s"]
                                           for L, d in s["per_depth"].items()}
    for frac in budgets:
        smt, lora, dora = (summary.get(_key(m, frac)) for m in ("smt", "lora", "dora"))
        tag = f"@{frac:g}"
        if smt and smt.get("measured"):
            if "step_to_floor" in smt:
                goals[f"smt_step_le_1.05x_floor{tag}"] = smt["step_to_floor"] <= 1.05
            if lora and lora.get("measured"):
                smt["step_to_lora"] = smt["step_s_full"] / lora["step_s_full"]
                goals[f"smt_step_below_lora{tag}"] = smt["step_to_lora"] < 1
            if ft and ft.get("measured"):
                smt["step_to_full_ft"] = smt["step_s_full"] / ft["step_s_full"]
            smt["flop_floor_to_full_ft"] = (4 + 2 * smt["trainable_params_full"] / n_full) / 6
            if ft:
                goals[f"smt_memory_le_0.25x_full_ft{tag}"] = smt["memory_to_full_ft"] <= 0.25
            if "warmup_peak_to_train_peak" in smt:
                goals[f"smt_warmup_peak_le_1.2x_train_peak{tag}"] = smt["warmup_peak_to_train_peak"] <= 1.2
        if lora and dora and lora.get("measured") and dora.get("measured"):
            dora["step_to_lora"] = dora["step_s_full"] / lora["step_s_full"]
            dora["memory_to_lora"] = dora["total_bytes_full"] / lora["total_bytes_full"]
    return summary, goals


def _gib(x) -> str:
    return "–" if x is None else f"{x / GIB:.2f}"


def _f(x, fmt=".3f") -> str:
    return "–" if x is None else format(x, fmt)


def markdown(result: dict) -> str:
    f, cfg, meta = result["facts"], result["config"]["bench"], result["meta_info"]
    depths = [int(L) for L in cfg["layers"]]
    dev = meta["device"]
    lines = [
        f"# Memory and speed per method — {f['model']} ({f['total_params'] / 1e9:.2f}B parameters, {f['depth']} layers), "
        f"{f['device']}", "",
        f"Command: `{result['command']}` · config {result['config_hash']} · git {meta['git']['sha']} "
        f"(dirty={meta['git']['dirty']}) · torch {meta['versions']['torch']}, transformers "
        f"{meta['versions']['transformers']}, peft {meta['versions']['peft']} · {dev.get('name')}, "
        f"{dev.get('torch_threads')} threads"
        + (f" · started {result['started']}, {result['wall_s'] / 60:.1f} min" if "wall_s" in result else ""), "",
        ("Measured at " + " and ".join(map(str, depths)) + " decoder layers"
         + (" (the whole model, random weights" if len(depths) == 1 else " (random weights") +
         f", batch {cfg['batch_size']} × {cfg['seq_len']} tokens, {cfg['steps']} steps of which the first "
         f"{cfg['skip']} are left out of the median, {cfg['rounds']} round(s))"
         + ("" if len(depths) == 1 else f", extrapolated linearly to {f['depth']} layers") + ". Precision: ")
        + ("bf16 autocast over fp32 master weights and fp32 AdamW states." if f["device"].startswith("cuda") else
           "fp32.") +
        " Memory: " + ("the CUDA allocator's peak" if f["device"].startswith("cuda") else
                       f"peak RSS growth with MALLOC_MMAP_THRESHOLD_={result['memory_env']['MALLOC_MMAP_THRESHOLD_']} "
                       "(RSS follows live tensors), one process per measurement" if result["memory_env"] else
                       "peak RSS growth, every measurement in one process (bench.isolate=false: a smoke run, "
                       "not per-method figures)") +
        f" above the built model; total = fp32 base weights (4 B × {f['total_params']:,}) + that growth. "
        "Analytic = weights + gradients + AdamW moments in fp32, no activations.", "",
        f"| method | trainable ({f['depth']} layers) | "
        + "".join(f"step {L}L (s) | " for L in depths if L != f["depth"]) +
        f"step {f['depth']}L (s) | step / floor | peak growth " + " / ".join(f"{L}L" for L in depths) +
        f" (GiB) | total {f['depth']}L (GiB) | analytic {f['depth']}L (GiB) | memory / full FT |",
        "|" + " --- |" * (8 + sum(L != f["depth"] for L in depths))]
    for key, s in result["summary"].items():
        if "unreachable" in s:
            lines.append(f"| {key} | unreachable: {s['unreachable']} |" + " |" * (6 + sum(L != f["depth"] for L in depths)))
            continue
        pd = [s["per_depth"].get(str(L)) or {} for L in depths]
        total = _gib(s["total_bytes_full"]) + ("" if s["measured"] else " (analytic: not measured)")
        steps = "".join(f"{_f(d.get('median_step_s'))} | " for L, d in zip(depths, pd) if L != f["depth"])
        lines.append(f"| {key} | {s['trainable_params_full']:,} | {steps}{_f(s.get('step_s_full'), '.2f')} | "
                     f"{_f(s.get('step_to_floor'))} | " + " / ".join(_gib(d.get("peak_bytes")) for d in pd) +
                     f" | {total} | {_gib(s['analytic_total_bytes_full'])} | {_f(s.get('memory_to_full_ft'))} |")
    lines.append("")
    for key, s in result["summary"].items():
        extra = []
        if "step_to_floor_by_depth" in s and key != FLOOR:
            extra.append("step / floor at " + ", ".join(f"{L}L {r:.3f}" for L, r in s["step_to_floor_by_depth"].items()))
        for k, label in (("step_to_lora", "step / LoRA"), ("step_to_full_ft", "step / full FT"),
                         ("flop_floor_to_full_ft", "FLOP floor (4+2d)/6"), ("memory_to_lora", "memory / LoRA"),
                         ("warmup_peak_to_train_peak", "warm-up peak / training peak")):
            if k in s:
                extra.append(f"{label} {s[k]:.3f}")
        errs = [f"{L} layers: {d['error']}" for L, d in s["per_depth"].items() if d and "error" in d]
        if extra or errs:
            lines.append(f"- {key}: " + "; ".join(extra + errs))
    if result["goals"]:
        lines += ["", "Goals: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in result["goals"].items())]
    profiled = set()
    for r in result["runs"]:  # one profile per (method, depth): the first round's
        if r.get("profile_top") and (r["method"], r["layers"]) not in profiled:
            profiled.add((r["method"], r["layers"]))
            lines += ["", f"Profile, one {r['method']} step at {r['layers']} layer(s) (self ms, %):", ""]
            lines += [f"- {k}: {n} calls, {ms} ms, {pct}%" for k, n, ms, pct in r["profile_top"][:10]]
    return "\n".join(lines) + "\n"


def regenerate(path: Path) -> tuple[Path, Path]:
    """The summary, goals and table again from a result's own raw measurements (after a change here)."""
    import json

    result = json.loads(Path(path).read_text())
    b = result["config"]["bench"]
    result["summary"], result["goals"] = summarize(result["runs"], result["facts"],
                                                   result["facts"].get("methods", b["methods"]), b["budgets"], b["layers"])
    return write_report(result, Path(path).parent, Path(path).stem)


def write_report(result: dict, out: Path, name: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{name}.json", out / f"{name}.md"
    write_json_atomic(js, result)
    md.write_text(markdown(result))
    return js, md


if __name__ == "__main__":  # python -m smt_bench.bench.report results/bench/<name>.json
    import sys

    for p in sys.argv[1:]:
        print("rewrote", *regenerate(Path(p)))
