"""SMT step time and memory on CPU against its reference-style implementation, full FT, peft LoRA and
DoRA at the same budget, and the floor (every weight frozen, backward still run to the embeddings).

Each method runs in its own process (peak RSS is per process), methods interleaved over rounds;
reported: median step time and peak-RSS growth per method, as ratios to the floor measured in the
same run. `--profile` adds a torch.profiler table of one SMT step and one floor step.

Peak RSS under glibc's default (dynamic) mmap threshold keeps freed large blocks resident, so it
overstates small differences between methods. After the timing rounds, one memory round per method
runs with MALLOC_MMAP_THRESHOLD_ fixed (large allocations mmapped and returned on free), so its RSS
follows live tensors; the memory checks use that round (it is slower, so it is not timed).

    python scripts/bench_smt.py --rounds 3 --steps 8 --out results/bench
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smt_bench import provenance  # noqa: E402
from smt_bench.memory import PeakMemory, optimizer_state_bytes  # noqa: E402
from smt_bench.methods.base import Context  # noqa: E402

METHODS = ("floor", "smt", "smt_reference", "lora", "dora", "full_ft")
MMAP_THRESHOLD = 65536  # bytes; a fixed value also turns off glibc's dynamic threshold


def _build(name: str, block_size: int, warmup_steps: int):
    from smt_bench.methods.full_ft import FullFT
    from smt_bench.methods.peft_methods import LoRA
    from smt_bench.methods.smt import SMT

    if name == "full_ft":
        return FullFT(name="full_ft", lr=1e-5)
    if name in ("lora", "dora"):
        return LoRA(name=name, lr=2e-4, use_dora=name == "dora", dropout=0.0)
    return SMT(name="smt", lr=1e-4, block_size=block_size, warmup_steps=warmup_steps, kernels="torch")


def worker(args) -> dict:
    from smt_bench.models import SmolLM2GGUF, shapes_of

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, _ = SmolLM2GGUF().load()
    mem = PeakMemory(torch.device("cpu")).mark_baseline()  # all phases measured above the loaded model
    shapes = shapes_of(model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 49152, (args.batch, args.seq), generator=g) for _ in range(max(args.steps, 4))]
    out = {"method": args.worker}
    if args.worker == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()  # backward still runs down to the embeddings
        params, opt = [], None
    else:
        method = _build("smt" if args.worker == "smt_reference" else args.worker, args.block_size, args.warmup_steps)
        plan = method.plan(shapes, round(args.budget * shapes.total_params))
        warm = Context(batches=lambda n: iter({"input_ids": b, "labels": b} for b in batches[:n]),
                       loss=lambda m, b: m(**b).loss, device=torch.device("cpu"))
        mem.start()
        tuned = method.prepare(model, plan, warm)
        model = tuned.model
        if args.worker in ("smt", "smt_reference"):
            out["warmup_peak_bytes"] = mem.stop()
        if args.worker == "smt_reference":
            from smt_bench.methods.smt.reference import to_reference

            params = to_reference(tuned)
            opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        else:
            params = tuned.trainable_parameters()
            opt = tuned.build_optimizer()
        out["trainable_params"] = sum(p.numel() for p in params)
        out["plan"] = plan.detail
        if args.worker == "smt":
            out["saved_column_bytes"] = sum(  # one shared copy per group, fp32
                args.batch * args.seq * (l.shared.union_cols.numel() if not l.shared.keep_full else
                                         l.in_features // l.block_size) * l.block_size * 4
                for l in {id(l.shared): l for l in tuned.layers.values()}.values())
    model.train()

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    mem.start()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(batches[i % len(batches)])
        times.append(time.perf_counter() - t0)
    out["peak_growth_bytes"] = mem.stop()
    out["step_times_s"] = times
    out["median_step_s"] = statistics.median(times[args.skip:])
    if opt is not None:
        out["optimizer_state_bytes"] = optimizer_state_bytes(opt)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(batches[0])
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        out["profile_top_self_cpu"] = [[e.key, e.count, round(e.self_cpu_time_total / 1e3, 1),
                                        round(100 * e.self_cpu_time_total / total, 1)] for e in rows]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the median")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=str(REPO / "results" / "bench"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    methods = args.methods.split(",")
    bad = [m for m in methods if m not in METHODS]
    if bad or args.steps <= args.skip:
        print(f"bench_smt: error: unknown methods {bad} (choose from {METHODS}) or --steps <= --skip", file=sys.stderr)
        sys.exit(2)
    def run_worker(m: str, extra=(), env=None) -> dict:
        cmd = [sys.executable, __file__, "--worker", m] + [a for a in sys.argv[1:] if a != "--profile"] + list(extra)
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
        if p.returncode or line is None:
            print(p.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"worker {m} failed")
        return json.loads(line[7:])

    runs = {m: [] for m in methods}
    for r in range(args.rounds):
        order = methods[r % len(methods):] + methods[:r % len(methods)]  # rotate: no method always first
        for m in order:
            profile = args.profile and r == args.rounds - 1 and m in ("smt", "floor")
            runs[m].append(run_worker(m, ["--profile"] if profile else ()))
            print(f"round {r} {m}: median step {runs[m][-1]['median_step_s']:.3f}s "
                  f"peak +{runs[m][-1]['peak_growth_bytes'] / 2**20:.0f} MiB", flush=True)
    mem_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    mem_runs = {}
    for m in methods:
        mem_runs[m] = run_worker(m, ["--steps", "3", "--skip", "1"], env=mem_env)  # optimizer state exists from step 2
        print(f"memory round {m}: peak +{mem_runs[m]['peak_growth_bytes'] / 2**20:.0f} MiB "
              f"(MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD})", flush=True)
    summary = {}
    for m, rs in runs.items():
        summary[m] = {"median_step_s": statistics.median(x["median_step_s"] for x in rs),
                      "peak_growth_bytes": statistics.median(x["peak_growth_bytes"] for x in rs),
                      "live_peak_growth_bytes": mem_runs[m]["peak_growth_bytes"],
                      **{k: rs[0][k] for k in ("trainable_params", "optimizer_state_bytes", "saved_column_bytes",
                                                "plan") if k in rs[0]}}
        if "warmup_peak_bytes" in rs[0]:
            summary[m]["warmup_peak_bytes"] = statistics.median(x["warmup_peak_bytes"] for x in rs)
            summary[m]["live_warmup_peak_bytes"] = mem_runs[m]["warmup_peak_bytes"]
    fl = summary.get("floor")
    if fl:
        for m, s in summary.items():
            s["step_ratio_to_floor"] = s["median_step_s"] / fl["median_step_s"]
            s["peak_minus_floor_bytes"] = s["peak_growth_bytes"] - fl["peak_growth_bytes"]
            s["live_peak_minus_floor_bytes"] = s["live_peak_growth_bytes"] - fl["live_peak_growth_bytes"]
    checks = {}
    if "smt" in summary and fl:
        s = summary["smt"]
        analytic = 4 * 4 * s["trainable_params"] + s["saved_column_bytes"]  # values, grads, 2 moments (fp32) + columns
        s["analytic_state_bytes"] = analytic
        checks["smt_step_le_1.05x_floor"] = s["step_ratio_to_floor"] <= 1.05
        if "lora" in summary:
            checks["smt_step_below_lora"] = s["median_step_s"] < summary["lora"]["median_step_s"]
        checks["smt_mem_over_floor_le_1.2x_analytic"] = s["live_peak_minus_floor_bytes"] <= 1.2 * analytic
        s["mem_over_floor_to_analytic"] = s["live_peak_minus_floor_bytes"] / analytic
        s["rss_mem_over_floor_to_analytic"] = s["peak_minus_floor_bytes"] / analytic
        s["warmup_peak_to_train_peak"] = s["live_warmup_peak_bytes"] / s["live_peak_growth_bytes"]
        checks["warmup_peak_le_1.2x_smt_train_peak"] = s["warmup_peak_to_train_peak"] <= 1.2
    meta = provenance.meta_info(torch.device("cpu"))
    meta["versions"] = provenance.versions()
    result = {"bench": "smt_cpu_step", "args": {k: v for k, v in vars(args).items() if k != "worker"},
              "summary": summary, "checks": checks, "runs": runs, "memory_runs": mem_runs,
              "memory_round_env": {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}, "meta_info": meta}
    out = Path(args.out)
    from smt_bench.results import write_json_atomic

    write_json_atomic(out / "smt_cpu.json", result)
    lines = [f"# SMT step benchmark (CPU, SmolLM2-135M, batch {args.batch}x{args.seq}, budget {args.budget:.2%})", "",
             f"git {meta['git']['sha']} (dirty={meta['git']['dirty']}), torch {meta['versions']['torch']}, "
             f"{meta['device'].get('name')}, {args.threads} threads; {args.rounds} rounds x {args.steps} steps "
             f"(first {args.skip} skipped), medians. Command: `python scripts/bench_smt.py {' '.join(sys.argv[1:])}`", "",
             f"Memory: peak RSS growth in the timed rounds (median; glibc's default malloc) and in one memory round "
             f"per method with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} (RSS follows live tensors; used by the checks).",
             "",
             "| method | trainable | median step (s) | step / floor | peak RSS growth (MiB) | peak - floor (MiB) "
             "| live peak growth (MiB) | live peak - floor (MiB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, s in summary.items():
        lines.append(f"| {m} | {s.get('trainable_params', 0):,} | {s['median_step_s']:.3f} | "
                     f"{s.get('step_ratio_to_floor', float('nan')):.3f} | {s['peak_growth_bytes'] / 2**20:.0f} | "
                     f"{s.get('peak_minus_floor_bytes', 0) / 2**20:.0f} | {s['live_peak_growth_bytes'] / 2**20:.0f} | "
                     f"{s.get('live_peak_minus_floor_bytes', 0) / 2**20:.0f} |")
    lines += ["", "Checks: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items())]
    if "smt" in summary and "mem_over_floor_to_analytic" in summary["smt"]:
        s = summary["smt"]
        lines.append(f"SMT live memory over floor / analytic state ({s['analytic_state_bytes'] / 2**20:.1f} MiB): "
                     f"{s['mem_over_floor_to_analytic']:.2f} (default-malloc RSS: {s['rss_mem_over_floor_to_analytic']:.2f}); "
                     f"warm-up peak / SMT train peak (live): {s['warmup_peak_to_train_peak']:.2f}")
    for m in ("smt", "floor"):
        prof = runs.get(m, [{}])[-1].get("profile_top_self_cpu")
        if prof:
            lines += ["", f"Profile, one {m} step (self CPU ms, %):", ""] + [f"- {k}: {n} calls, {ms} ms, {pct}%"
                                                                            for k, n, ms, pct in prof[:10]]
    (out / "smt_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
