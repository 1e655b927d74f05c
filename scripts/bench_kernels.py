#!/usr/bin/env python
"""Benchmark the SMT block kernels against the batched-PyTorch path and a dense dW matmul.

Why: SMT's speed claim rests on the weight gradient costing ~d of a dense dW (d = trained
fraction). This measures, for LLaMA-7B-sized layers (T = 4096 tokens, B = 256, bf16), how close
the Triton kernel and the torch fallback come to that, in TFLOP/s on the selected blocks
(2·T·B²·k flops), and what the fused AdamW + write-back costs per optimizer step.

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
FULL_FRACTIONS = (0.005, 0.01, 0.05)
SMOKE_LAYERS = [("smoke 64x48", 64, 48), ("smoke 96x64", 96, 64)]
SMOKE_FRACTIONS = (0.1, 0.5)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, to test the script")
    p.add_argument("--out", default=str(REPO / "results" / "bench"), help="output folder")
    p.add_argument("--tokens", type=int, default=None, help="T (default 4096; smoke 37)")
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


def _markdown(meta: dict, rows: list[dict]) -> str:
    wgrad = {(r["layer"], r["k"], r["backend"]): r for r in rows if r["op"] == "wgrad"}
    adamw = {(r["layer"], r["k"], r["backend"]): r for r in rows if r["op"] == "adamw"}
    cases = sorted({(r["layer"], r["d_out"], r["d_in"], r["fraction"], r["k"]) for r in rows if r["op"] == "wgrad"},
                   key=lambda c: (c[1], c[2], c[4]))
    backends = [b for b in ("torch", "triton", "triton_det") if any(k[2] == b for k in wgrad)]

    def fmt(x, spec=".3f"):
        return "–" if x is None else format(x, spec)

    head = ["layer", "blocks k (frac)", "dense dW ms"]
    for b in backends:
        head += [f"{b} ms", f"{b} TFLOP/s", f"{b} vs dense"]
    if "triton" in backends:
        head.append("triton vs torch")
    head += [f"AdamW {b} ms" for b in ("torch", "triton") if any(k[2] == b for k in adamw)]
    lines = [
        f"# SMT block kernels — {meta['device']}",
        "",
        f"T = {meta['tokens']} tokens, B = {meta['block_size']}, inputs {meta['dtype']}, median of "
        f"{meta['repeats']} repeats. TFLOP/s count only the selected blocks (2·T·B²·k); "
        "'vs dense' = dense dW time / this time (a speed-up; the flop ratio is 1/frac). "
        f"git {str(meta['git_sha'])[:10]}{' (dirty)' if meta['git_dirty'] else ''}, torch {meta['torch']}, "
        f"triton {meta['triton']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for layer, d_out, d_in, frac, k in cases:
        dense = wgrad.get((layer, k, "dense"))
        cells = [layer, f"{k} ({frac:.2%})", fmt(dense and dense["ms"])]
        for b in backends:
            r = wgrad.get((layer, k, b))
            cells += [fmt(r and r["ms"]), fmt(r and r["tflops"], ".1f"),
                      fmt(r and dense and dense["ms"] / r["ms"], ".2f") + ("×" if r and dense else "")]
        if "triton" in backends:
            t, tt = wgrad.get((layer, k, "triton")), wgrad.get((layer, k, "torch"))
            cells.append(fmt(t and tt and tt["ms"] / t["ms"], ".2f") + ("×" if t and tt else ""))
        for b in ("torch", "triton"):
            if any(key[2] == b for key in adamw):
                r = adamw.get((layer, k, b))
                cells.append(fmt(r and r["ms"]))
        lines.append("| " + " | ".join(cells) + " |")
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
    T = args.tokens or (37 if smoke else 4096)
    B = args.block_size or (16 if smoke else 256)
    repeats = args.repeats or (3 if smoke else 50)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 10)
    dtype = torch.float16 if smoke else torch.bfloat16  # the interpreter cannot do bf16
    layers = SMOKE_LAYERS if smoke else FULL_LAYERS
    fractions = SMOKE_FRACTIONS if smoke else FULL_FRACTIONS
    measure = _timer(torch, device)
    gen = torch.Generator().manual_seed(args.seed)

    meta = dict(_provenance(torch, device), tokens=T, block_size=B, dtype=str(dtype).replace("torch.", ""),
                repeats=repeats, warmup=warmup, smoke=smoke, seed=args.seed)
    rows: list[dict] = []
    for layer, d_out, d_in in layers:
        n_r, n_c = d_out // B, d_in // B
        dy = torch.randn(T, d_out, generator=gen).to(device=device, dtype=dtype)
        x = torch.randn(T, d_in, generator=gen).to(device=device, dtype=dtype)
        dense_ms = measure(lambda: dy.t() @ x, warmup, repeats)
        for frac in fractions:
            k = max(1, round(frac * n_r * n_c))
            pick = torch.randperm(n_r * n_c, generator=gen)[:k].sort().values
            rows_t, cols_t = (pick // n_c).to(device), (pick % n_c).to(device)
            flops = 2.0 * T * B * B * k
            base = dict(layer=layer, d_out=d_out, d_in=d_in, fraction=frac, k=k, tokens=T, block_size=B)
            rows.append(dict(base, op="wgrad", backend="dense", ms=dense_ms,
                             tflops=2.0 * T * d_out * d_in / dense_ms / 1e9))

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
                                 speedup_vs_dense=dense_ms / ms, max_rel_err_vs_torch=err))

            # AdamW + write-back of the k blocks into a dense weight of the layer's shape and dtype
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
            print(f"{layer:>22}  k={k:<4d} " + "  ".join(
                f"{r['backend']}={r['ms']:.3f}ms" for r in rows if r["k"] == k and r["layer"] == layer
                and r["op"] == "wgrad"), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (out / "kernels.md").write_text(_markdown(meta, rows))
    print(f"wrote {out / 'kernels.json'} and {out / 'kernels.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
