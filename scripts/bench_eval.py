"""Eval wall time on the real SmolLM2-135M-Instruct (CPU): the default suite and a GSM8K slice.

Tests check what the suites compute; how long they take depends on the machine, so it is measured
here: each suite `--repeats` times in one process (after one untimed warm-up pass of the default
suite), medians and ranges, written with provenance to results/bench/eval_cpu.{json,md}.

    python scripts/bench_eval.py --repeats 3 --gsm8k 200
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from smt_bench import provenance  # noqa: E402
from smt_bench.__main__ import compose_config  # noqa: E402
from smt_bench.evaluation.harness import evaluate_suite  # noqa: E402
from smt_bench.evaluation.suites import plan_suite  # noqa: E402
from smt_bench.models import SmolLM2GGUF  # noqa: E402


def _plan(*overrides):
    cfg = compose_config(list(overrides))
    test = instantiate(cfg.data).load().test
    return cfg.eval, plan_suite(cfg.eval, test, True, cfg.data.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gsm8k", type=int, default=200, help="questions in the GSM8K slice")
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench" / "eval_cpu"))
    args = ap.parse_args()

    model, tok = SmolLM2GGUF().load()
    suites = {"bundled (default, 120 items)": _plan(),
              f"gsm8k slice ({args.gsm8k} questions)": _plan("eval=math", f"eval.max_examples={args.gsm8k}")}
    first = next(iter(suites.values()))
    evaluate_suite(model, tok, first[1], batch_size=first[0].batch_size, max_new_tokens=first[0].max_new_tokens)
    rows = []
    for name, (ev, plan) in suites.items():
        walls, acc = [], None
        for _ in range(args.repeats):
            r = evaluate_suite(model, tok, plan, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                               num_beams=ev.num_beams)
            walls.append(r["wall_s"])
            acc = r["mean_accuracy"]
        rows.append({"suite": name, "protocol": r["protocol"], "batch_size": ev.batch_size,
                     "wall_s": walls, "median_wall_s": statistics.median(walls), "mean_accuracy": acc})
        print(f"[bench_eval] {name}: median {statistics.median(walls):.1f} s ({min(walls):.1f}-{max(walls):.1f}), "
              f"accuracy {acc:.1f}", flush=True)
    meta = provenance.meta_info(torch.device("cpu"))
    out = {"model": "smollm2-135m (SmolLM2-135M-Instruct, fp32)", "repeats": args.repeats, "rows": rows,
           "meta_info": meta}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    git = meta["git"]
    lines = ["# Eval wall time on SmolLM2-135M (CPU)\n",
             f"`python scripts/bench_eval.py --repeats {args.repeats} --gsm8k {args.gsm8k}` at "
             f"{(git['sha'] or '?')[:7]}{' (dirty)' if git['dirty'] else ''}; {meta['device']['name']}, "
             f"{meta['device']['torch_threads']} threads; torch {meta['versions']['torch']}, lm-eval "
             f"{meta['versions']['lm-eval']}. One process, one untimed warm-up pass, then {args.repeats} timed "
             f"passes per suite.\n",
             "| suite | median eval wall (s) | range (s) | mean accuracy | batch |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['suite']} | {r['median_wall_s']:.1f} | {min(r['wall_s']):.1f}-{max(r['wall_s']):.1f} | "
                     f"{r['mean_accuracy']:.1f} | {r['batch_size']} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"[bench_eval] wrote {path.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
