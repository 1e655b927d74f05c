#!/usr/bin/env python
"""Benchmark the SMT block kernels against the batched-PyTorch path and a dense dW matmul.

Why: SMT's speed claim rests on the weight gradient costing ~d of a dense dW (d = trained
fraction). This measures, for LLaMA-7B-sized layers (B = 256, bf16), k = 1..64 blocks and T = 2k..16k
tokens, how close the Triton kernel and the torch (batched) path come to that: in TFLOP/s on the
selected blocks (2·T·B²·k flops), as a percentage of a dense cuBLAS GEMM doing the same flops
((B × T) @ (T × kB)), against the layer's whole dense dW, and what the fused AdamW + write-back costs
per optimizer step. Goals (in `goals`): Triton ≥ 80% of the same-flop dense GEMM and ≥ 2× the torch path.

    python scripts/bench_kernels.py                  # needs CUDA; writes results/bench/kernels.{json,md}
    python scripts/bench_kernels.py --smoke --out /tmp/x   # tiny CPU run (triton if TRITON_INTERPRET=1)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FULL_LAYERS = [("q/k/v/o 4096x4096", 4096, 4096), ("up/gate 11008x4096", 11008, 4096)]
FULL_TOKENS, FULL_KS = "2048,4096,8192,16384", "1,2,4,8,16,32,64"
SMOKE_LAYERS = [("smoke 64x48", 64, 48), ("smoke 96x64", 96, 64)]
SMOKE_TOKENS, SMOKE_KS = "37", "1,3"


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, to test the script")
    p.add_argument("--out", default=str(REPO / "outputs" / "bench"), help="output folder")
    p.add_argument("--tokens", default=None, help="T values, comma-separated (default 2048,4096,8192,16384; smoke 37)")
    p.add_argument("--ks", default=None, help="blocks per layer, comma-separated (default 1,2,4,8,16,32,64; smoke 1,3)")
    p.add_argument("--block-size", type=int, default=None, help="B (default 256; smoke 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 50; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10; smoke 1)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _provenance(torch, device) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "git_sha": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "python": platform.python_version(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }


def _timer(torch, device):
    """Median milliseconds of fn(): CUDA events on GPU (no host sync inside the timed region),
    perf_counter on CPU."""
    def measure(fn, warmup, repeats):
        for _ in range(warmup):
            fn()
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return measure


def _goals(rows: list[dict], block_size: int) -> dict:
    """The kernel goals at this block size, over every (layer, T, k) measured: Triton's block dW at
    >= 80% of a dense GEMM doing the same flops, and >= 2x the torch (batched) path."""
    tri = {(r["layer"], r["tokens"], r["k"]): r for r in rows if r["op"] == "wgrad" and r["backend"] == "triton"}
    tor = {(r["layer"], r["tokens"], r["k"]): r for r in rows if r["op"] == "wgrad" and r["backend"] == "torch"}
    if not tri:
        return {}
    pct = [r["pct_of_same_flops_dense"] for r in tri.values()]
    speed = [tor[c]["ms"] / r["ms"] for c, r in tri.items() if c in tor]
    return {"block_size": block_size, "cases": len(tri),
            "triton_pct_of_same_flops_dense": {"min": min(pct), "median": statistics.median(pct)},
            "triton_vs_torch": {"min": min(speed), "median": statistics.median(speed)},
            "triton_ge_80pct_of_dense_in_all_cases": min(pct) >= 80,
            "triton_ge_2x_torch_in_all_cases": min(speed) >= 2}


def _markdown(meta: dict, rows: list[dict], goals: dict) -> str:
    wgrad = {(r["layer"], r["tokens"], r["k"], r["backend"]): r for r in rows if r["op"] == "wgrad"}
    adamw = {(r["layer"], r["k"], r["backend"]): r for r in rows if r["op"] == "adamw"}
    cases = sorted({(r["layer"], r["d_out"], r["d_in"], r["tokens"], r["fraction"], r["k"]) for r in rows
                    if r["op"] == "wgrad"}, key=lambda c: (c[1], c[2], c[3], c[5]))
    backends = [b for b in ("torch", "triton", "triton_det") if any(k[3] == b for k in wgrad)]

    def fmt(x, spec=".3f"):
        return "–" if x is None else format(x, spec)

    head = ["layer", "T", "blocks k (frac)", "dense dW ms", "same-flop GEMM ms"]
    for b in backends:
        head += [f"{b} ms", f"{b} TFLOP/s", f"{b} % of same-flop GEMM"]
    if "triton" in backends:
        head.append("triton vs torch")
    head += [f"AdamW {b} ms" for b in ("torch", "triton") if any(k[2] == b for k in adamw)]
    lines = [
        f"# SMT block kernels — {meta['device']}",
        "",
        f"T = {', '.join(map(str, meta['tokens']))} tokens, B = {meta['block_size']}, inputs {meta['dtype']}, "
        f"median of {meta['repeats']} repeats. TFLOP/s count only the selected blocks (2·T·B²·k); "
        "'% of same-flop GEMM' = a dense (B × T) @ (T × kB) GEMM's time / this time. "
        f"git {str(meta['git_sha'])[:10]}{' (dirty)' if meta['git_dirty'] else ''}, torch {meta['torch']}, "
        f"triton {meta['triton']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for layer, d_out, d_in, T, frac, k in cases:
        dense, eq = wgrad.get((layer, T, k, "dense")), wgrad.get((layer, T, k, "dense_same_flops"))
        cells = [layer, str(T), f"{k} ({frac:.2%})", fmt(dense and dense["ms"]), fmt(eq and eq["ms"])]
        for b in backends:
            r = wgrad.get((layer, T, k, b))
            cells += [fmt(r and r["ms"]), fmt(r and r["tflops"], ".1f"), fmt(r and r.get("pct_of_same_flops_dense"), ".0f")]
        if "triton" in backends:
            t, tt = wgrad.get((layer, T, k, "triton")), wgrad.get((layer, T, k, "torch"))
            cells.append(fmt(t and tt and tt["ms"] / t["ms"], ".2f") + ("×" if t and tt else ""))
        for b in ("torch", "triton"):
            if any(key[2] == b for key in adamw):
                r = adamw.get((layer, k, b)) if T == meta["tokens"][0] else None
                cells.append(fmt(r and r["ms"]))
        lines.append("| " + " | ".join(cells) + " |")
    if goals:
        lines += ["", f"Goals at B = {goals['block_size']} over {goals['cases']} cases: Triton at "
                  f"{goals['triton_pct_of_same_flops_dense']['min']:.0f}% (min) / "
                  f"{goals['triton_pct_of_same_flops_dense']['median']:.0f}% (median) of the same-flop GEMM "
                  f"(goal ≥ 80%: {'yes' if goals['triton_ge_80pct_of_dense_in_all_cases'] else 'NO'}); "
                  f"{goals['triton_vs_torch']['min']:.2f}× / {goals['triton_vs_torch']['median']:.2f}× the torch "
                  f"path (goal ≥ 2×: {'yes' if goals['triton_ge_2x_torch_in_all_cases'] else 'NO'})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = _parse(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; run on a GPU or pass --smoke for a tiny CPU run", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")

    from smt_bench.kernels import torch_ops

    triton_ops = None
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        try:
            from smt_bench.kernels import triton_ops
        except ImportError as e:
            print(f"bench_kernels: triton unavailable ({e}); timing torch only", file=sys.stderr)
    if device.type == "cuda" and triton_ops is not None and triton_ops.INTERPRETED:
        print("bench_kernels: TRITON_INTERPRET=1 is set; unset it to time compiled kernels", file=sys.stderr)
        return 2

    smoke = args.smoke
    tokens = [int(t) for t in (args.tokens or (SMOKE_TOKENS if smoke else FULL_TOKENS)).split(",")]
    ks = [int(k) for k in (args.ks or (SMOKE_KS if smoke else FULL_KS)).split(",")]
    B = args.block_size or (16 if smoke else 256)
    repeats = args.repeats or (3 if smoke else 50)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 10)
    dtype = torch.float16 if smoke else torch.bfloat16  # the interpreter cannot do bf16
    layers = SMOKE_LAYERS if smoke else FULL_LAYERS
    measure = _timer(torch, device)
    gen = torch.Generator().manual_seed(args.seed)

    meta = dict(_provenance(torch, device), tokens=tokens, ks=ks, block_size=B, dtype=str(dtype).replace("torch.", ""),
                repeats=repeats, warmup=warmup, smoke=smoke, seed=args.seed)
    rows: list[dict] = []
    for layer, d_out, d_in in layers:
        n_r, n_c = d_out // B, d_in // B
        for T in tokens:
            dy = torch.randn(T, d_out, generator=gen).to(device=device, dtype=dtype)
            x = torch.randn(T, d_in, generator=gen).to(device=device, dtype=dtype)
            dense_ms = measure(lambda: dy.t() @ x, warmup, repeats)
            for k in [k for k in ks if k <= n_r * n_c]:
                pick = torch.randperm(n_r * n_c, generator=gen)[:k].sort().values
                rows_t, cols_t = (pick // n_c).to(device), (pick % n_c).to(device)
                flops = 2.0 * T * B * B * k
                base = dict(layer=layer, d_out=d_out, d_in=d_in, fraction=k / (n_r * n_c), k=k, tokens=T, block_size=B)
                rows.append(dict(base, op="wgrad", backend="dense", ms=dense_ms,
                                 tflops=2.0 * T * d_out * d_in / dense_ms / 1e9))
                # a dense GEMM doing the blocks' flops: (B x T) @ (T x kB)
                a_eq = dy[:, :B].contiguous()
                b_eq = torch.randn(T, k * B, generator=gen).to(device=device, dtype=dtype)
                eq_ms = measure(lambda: a_eq.t() @ b_eq, warmup, repeats)
                rows.append(dict(base, op="wgrad", backend="dense_same_flops", ms=eq_ms, tflops=flops / eq_ms / 1e9))

                candidates = {"torch": lambda: torch_ops.block_weight_grad(dy, x, rows_t, cols_t, B, validate=False)}
                if triton_ops is not None:
                    candidates["triton"] = lambda: triton_ops.block_weight_grad(dy, x, rows_t, cols_t, B, validate=False)
                    candidates["triton_det"] = lambda: triton_ops.block_weight_grad(
                        dy, x, rows_t, cols_t, B, validate=False, deterministic=True)
                ref = candidates["torch"]()
                for name, fn in candidates.items():
                    err = (fn() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
                    ms = measure(fn, warmup, repeats)
                    rows.append(dict(base, op="wgrad", backend=name, ms=ms, tflops=flops / ms / 1e9,
                                     speedup_vs_dense=dense_ms / ms, pct_of_same_flops_dense=100 * eq_ms / ms,
                                     max_rel_err_vs_torch=err))
                if T == tokens[0]:  # AdamW + write-back does not depend on T
                    weight = torch.zeros(d_out, d_in, device=device, dtype=dtype)
                    hp = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=10)
                    adam_fns = {"torch": torch_ops.block_adamw_step_}
                    if triton_ops is not None:
                        adam_fns["triton"] = triton_ops.block_adamw_step_
                    grads = torch.randn(k, B, B, generator=gen).to(device)
                    for name, step_fn in adam_fns.items():
                        state = [torch.randn(k, B, B, generator=gen).to(device), torch.zeros(k, B, B, device=device),
                                 torch.zeros(k, B, B, device=device)]
                        ms = measure(lambda: step_fn(state[0], grads, state[1], state[2], weight, rows_t, cols_t,
                                                     validate=False, **hp), warmup, repeats)
                        moved = k * B * B * (4 * 4 + 3 * 4 + weight.element_size())  # read p,g,m,v; write p,m,v,w
                        rows.append(dict(base, op="adamw", backend=name, ms=ms, gbytes_per_s=moved / ms / 1e6))
                print(f"{layer:>22}  T={T:<6d} k={k:<3d} " + "  ".join(
                    f"{r['backend']}={r['ms']:.3f}ms" for r in rows if r["k"] == k and r["layer"] == layer
                    and r["op"] == "wgrad" and r["tokens"] == T), flush=True)

    goals = _goals(rows, B)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps({"meta": meta, "goals": goals, "rows": rows}, indent=2) + "\n")
    (out / "kernels.md").write_text(_markdown(meta, rows, goals))
    print(f"wrote {out / 'kernels.json'} and {out / 'kernels.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
