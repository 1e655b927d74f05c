#!/usr/bin/env python3
"""Before refreshing the lock: which package upgrade breaks what.

Builds two virtual environments with scripts/setup.sh, the lock (requirements/lock-cpu.txt) and the
newest versions pyproject.toml's ranges allow (--unlocked; torch held at the lock's CPU build), runs the
same smoke subset in both (a short tiny-llama run of every method, the kernel tests, one evaluation
through lm-eval, the analysis of the committed sweep) and, for every item that passes on the lock and
fails on the newest versions, upgrades one package at a time in the locked environment to find the
upgrade that breaks it. Prints a report and writes report.md and report.json in the work folder.

    bash scripts/check_latest.sh [--workdir DIR] [--keep] [--only ITEM ...]

Exit status: 0 when every item passes on the newest versions, 1 when one fails, 2 on bad usage. Not part
of CI: the newest versions change from one day to the next. Needs only Python's standard library.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock-cpu.txt"
# tiny-llama budgets every method can meet (LISA: one of its two layers; SMT: blocks of q, k, v)
FRACTION = {"lisa": 0.0115, "smt": 0.002}
SHORT = ["model=tiny-llama", "device=cpu", "train.max_steps=2", "train.batch_size=2", "train.max_len=64",
         "train.eval_every=0", "train.val_batches=1", "data.n_train_per_task=2", "data.n_val_per_task=1",
         "data.n_test_per_task=1"]
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "TRITON_INTERPRET": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def smoke_items(scratch: Path) -> dict[str, list[str]]:
    """name -> the command (after the venv's python) that must exit 0."""
    items = {}
    for cfg in sorted((REPO / "conf" / "method").glob("*.yaml")):
        m = cfg.stem
        items[f"run:{m}"] = ["-m", "smt_bench", *SHORT, f"method={m}", f"budget.fraction={FRACTION.get(m, 0.005)}",
                             "eval.enabled=false", f"results.dir={scratch / 'runs'}", "results.skip_finished=false"]
    items["kernels"] = ["-m", "pytest", "tests/test_kernels.py", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    items["eval"] = ["-m", "smt_bench", *SHORT, "method=lora", "budget.fraction=0.005", "eval.enabled=true",
                     "eval.max_new_tokens=4", f"results.dir={scratch / 'eval'}", "results.skip_finished=false"]
    items["analysis"] = ["-m", "smt_bench.analysis", "results/embedded-sweep", "--out", str(scratch / "analysis")]
    return items


def sh(cmd: list[str], log: Path | None = None, env: dict | None = None, timeout: int = 1800) -> int:
    with open(log, "w") if log else open(os.devnull, "w") as out:
        try:
            return subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            return 124


def installed(venv: Path) -> dict[str, str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json",
                          "--disable-pip-version-check"], capture_output=True, text=True, check=True).stdout
    return {canonical(d["name"]): d["version"] for d in json.loads(out) if canonical(d["name"]) != "smt-bench"}


def run_items(venv: Path, items: dict[str, list[str]], names, logs: Path) -> dict[str, bool]:
    logs.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        t = time.perf_counter()
        rc = sh([str(venv / "bin" / "python"), *items[name]], logs / f"{name.replace(':', '_')}.log", ENV, 900)
        out[name] = rc == 0
        print(f"  {name:<14} {'ok' if rc == 0 else f'FAILED (exit {rc})'}  {time.perf_counter() - t:.0f} s", flush=True)
    return out


def restore(venv: Path, locked: dict[str, str]) -> None:
    """Back to exactly the lock: reinstall its pins, remove what an upgrade brought in."""
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    extra = sorted(set(installed(venv)) - set(locked))
    if extra:
        sh([*pip, "uninstall", "-q", "-y", *extra])
    sh([*pip, "install", "-q", "--no-deps", "-r", str(LOCK)])
    if installed(venv) != locked:
        raise SystemExit("check_latest: could not restore the locked environment; rerun with a new --workdir")


def markdown(report: dict) -> str:
    lines = ["# smt-bench: the newest versions against the lock", "",
             f"Lock: `{report['lock']}` · {report['date']} · python {report['python']}", "",
             "## Upgrades the ranges allow", "", "| package | lock | newest |", "|---|---|---|"]
    lines += [f"| {n} | {a or '—'} | {b or '—'} |" for n, (a, b) in report["upgrades"].items()]
    if not report["upgrades"]:
        lines.append("| (none) | | |")
    lines += ["", "## Smoke items", "", "| item | lock | newest |", "|---|---|---|"]
    for item, ok in report["latest"].items():
        base = report["locked"].get(item)
        lines.append(f"| {item} | {'ok' if base else 'FAILED' if base is False else '—'} | {'ok' if ok else 'FAILED'} |")
    lines += ["", "## What breaks", ""]
    if not report["breaks"]:
        lines.append("Nothing: every item that passes on the lock passes on the newest versions.")
    for item, culprits in report["breaks"].items():
        if culprits:
            lines += [f"- **{item}** fails after upgrading {', '.join(f'`{c}`' for c in culprits)} alone"]
        else:
            lines += [f"- **{item}** fails on the newest versions, but no single upgrade breaks it (a combination)"]
    lines += ["", "Logs: `logs/` beside this report. torch is held at the lock's CPU build in both environments.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="check_latest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, help="where the venvs, logs and report go (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the venvs (else removed at the end)")
    ap.add_argument("--only", nargs="+", metavar="ITEM", help="run only these smoke items (e.g. run:smt eval)")
    args = ap.parse_args(argv)
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="smt-bench-check-latest-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    items = smoke_items(work / "scratch")
    names = args.only or list(items)
    unknown = [n for n in names if n not in items]
    if unknown:
        print(f"check_latest: unknown smoke item {', '.join(unknown)}; choose from {', '.join(items)}", file=sys.stderr)
        return 2
    venvs = {"locked": work / "locked", "latest": work / "latest"}
    for kind, venv in venvs.items():
        print(f"setup: {kind} venv in {venv}", flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        rc = sh(["bash", "scripts/setup.sh", *([] if kind == "locked" else ["--unlocked"])],
                work / f"setup-{kind}.log", {"VENV": str(venv)})
        if rc:
            print(f"check_latest: scripts/setup.sh for the {kind} venv failed (exit {rc}); see "
                  f"{work / f'setup-{kind}.log'}", file=sys.stderr)
            return 1
    locked, latest = installed(venvs["locked"]), installed(venvs["latest"])
    upgrades = {n: (locked.get(n), latest.get(n)) for n in sorted(set(locked) | set(latest))
                if locked.get(n) != latest.get(n)}
    print(f"{len(upgrades)} packages differ from the lock", flush=True)
    results = {}
    for kind, venv in venvs.items():
        print(f"smoke: {kind}", flush=True)
        results[kind] = run_items(venv, items, names, work / "logs" / kind)
    broken = [n for n in names if results["locked"][n] and not results["latest"][n]]
    breaks: dict[str, list[str]] = {}
    if broken:
        pip = [str(venvs["locked"] / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
        torch_pin = next(l for l in LOCK.read_text().splitlines() if l.startswith("torch=="))
        pin_file = work / "torch-pin.txt"
        pin_file.write_text(torch_pin + "\n")
        breaks = {n: [] for n in broken}
        for pkg, (_, new) in upgrades.items():
            if new is None:
                continue
            print(f"bisect: {pkg} {locked.get(pkg)} -> {new} alone", flush=True)
            sh([*pip, "install", "-q", "-c", str(pin_file), f"{pkg}=={new}"], work / "logs" / f"upgrade-{pkg}.log")
            moved = {n: v for n, v in installed(venvs["locked"]).items() if locked.get(n) != v}
            outcome = run_items(venvs["locked"], items, broken, work / "logs" / f"with-{pkg}")
            for n, ok in outcome.items():
                if not ok:
                    also = ", ".join(f"{m} {v}" for m, v in moved.items() if m != pkg)
                    breaks[n].append(f"{pkg} {locked.get(pkg)} -> {new}" + (f" (with {also})" if also else ""))
            restore(venvs["locked"], locked)
    report = {"lock": str(LOCK.relative_to(REPO)), "date": time.strftime("%Y-%m-%d"),
              "python": sys.version.split()[0], "upgrades": upgrades, "locked": results["locked"],
              "latest": results["latest"], "breaks": breaks}
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (work / "report.md").write_text(markdown(report))
    print("\n" + markdown(report))
    print(f"report: {work / 'report.md'}")
    if not args.keep:
        for venv in venvs.values():
            shutil.rmtree(venv, ignore_errors=True)
    return 1 if not all(results["latest"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
