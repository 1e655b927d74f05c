"""How stable is SMT's block selection? Warm-up + selection only (no training, no evaluation).

For each seed, one score_only warm-up of max(--steps) steps on the run's own warm-up stream (the batches
`python -m smt_bench method=smt seed=S` warms up on). After step t of --steps, the selection of every
accumulation (grad_sum: the reference's statistic of the summed gradients; score_sum: the sum of
per-step statistics) and score kind is taken from the running sums. score_only warm-up never changes
the weights, so that is exactly what a t-step warm-up selects; the script checks it at the end against
SMT.prepare itself. Writes one JSON per selection (factors, block map, per-projection counts,
provenance) under --out/selections/ and --out/report.md (Jaccard overlaps of selections that differ in
one factor; per-projection shares and size-fair rates).

    python scripts/smt_selection_study.py --seeds 0 1 2 --steps 4 16 64 --out results/smt-selection-study
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from smt_bench import provenance  # noqa: E402
from smt_bench.__main__ import compose_config  # noqa: E402
from smt_bench.analysis import figures as F  # noqa: E402
from smt_bench.methods.smt.analysis.stability import (block_set, by_context, markdown, pairs,  # noqa: E402
                                                      selection_stability, summary)
from smt_bench.data.batches import encode  # noqa: E402
from smt_bench.methods.smt.tuned import PROJ  # noqa: E402
from smt_bench.methods.smt.scoring import BlockScorer  # noqa: E402
from smt_bench.methods.smt.selection import select  # noqa: E402
from smt_bench.models import shapes_of  # noqa: E402
from smt_bench.results import write_json_atomic  # noqa: E402
from smt_bench.run import Prepared, method_context, seed_everything  # noqa: E402

ACCUMULATIONS = ("grad_sum", "score_sum")


def _prepared(overrides: list[str]) -> Prepared:
    return Prepared(compose_config(overrides))


def _block_map(chosen: dict) -> list[list]:
    out = []
    for name, sel in chosen.items():
        layer = next(int(p) for p in name.split(".") if p.isdigit())
        out += [[layer, name.rsplit(".", 1)[1], int(r), int(c)] for r, c in sel.tolist()]
    return sorted(out)


def _setup(prep: Prepared):
    """The loaded base model, its eligible linears (only their weights need gradients) and the warm-up."""
    cfg, dev = prep.cfg, prep.device
    seed_everything(cfg.seed, dev)
    model, tok = prep.source.load(torch.float32)
    model.to(dev).train()
    m = prep.method
    names = {l.name for l in shapes_of(model).select(PROJ[p] for p in m.projections)}
    linears = {n: mod for n, mod in model.named_modules() if n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    for l in linears.values():
        l.weight.requires_grad_(True)
    train_ex = encode(prep.splits.train, tok, cfg.train.max_len, cfg.train.train_on_inputs)
    return model, linears, method_context(train_ex, cfg.train.batch_size, tok.pad_token_id, cfg.seed, dev)


def study_seed(seed: int, args) -> list[dict]:
    longest = max(args.steps)
    prep = _prepared(_overrides(args, seed, longest, "grad_sum"))
    m, B, k = prep.method, prep.plan.detail["block_size"], prep.plan.detail["blocks"]
    model, linears, warmup = _setup(prep)
    eligible = Counter()
    for n, l in linears.items():
        eligible[n.rsplit(".", 1)[1]] += l.weight.numel() // (B * B)
    grad_sum = BlockScorer(linears, B, args.kinds[0], free_grads=False, accumulation="grad_sum")
    score_sum = {kind: BlockScorer(linears, B, kind, free_grads=(i == len(args.kinds) - 1), accumulation="score_sum")
                 for i, kind in enumerate(args.kinds)}  # hooks run in order; the last frees the gradient
    points, t0 = [], time.perf_counter()
    for t, batch in enumerate(warmup.batches(longest), 1):
        warmup.loss(model, batch).backward()
        if t not in args.steps:
            continue
        for kind in args.kinds:
            for acc, scores in (("grad_sum", grad_sum.snapshot(kind)), ("score_sum", score_sum[kind].snapshot())):
                chosen = select(scores, k, m.selection, m.attn_share)
                points.append({"factors": {"seed": seed, "warmup_steps": t, "accumulation": acc, "score": kind},
                               "budget": float(prep.cfg.budget.fraction), "block_size": B, "blocks": k,
                               "block_map": _block_map(chosen), "eligible_blocks": dict(sorted(eligible.items())),
                               "warmup_time_s": time.perf_counter() - t0})
        print(f"[study] seed {seed}: {t} warm-up steps, {time.perf_counter() - t0:.0f} s", flush=True)
    grad_sum.finish()
    for s in score_sum.values():
        s.finish()
    return points


def _overrides(args, seed: int, steps: int, accumulation: str, score: str | None = None) -> list[str]:
    return [*args.overrides, "method=smt", f"budget.fraction={args.budget}", f"seed={seed}",
            f"method.warmup_steps={steps}", f"method.score_accumulation={accumulation}",
            f"method.score={score or args.kinds[0]}", "method.warmup_mode=score_only", "eval.enabled=false",
            f"results.dir={args.out}"]


def self_check(args, points: list[dict]) -> list[str]:
    """SMT.prepare itself, at the shortest warm-up of the first seed, selects what the snapshot did."""
    seed, steps, out = args.seeds[0], min(args.steps), []
    for acc in ACCUMULATIONS:
        prep = _prepared(_overrides(args, seed, steps, acc))
        model, tok = prep.source.load(torch.float32)
        seed_everything(seed, prep.device)
        model.to(prep.device)
        cfg = prep.cfg
        train_ex = encode(prep.splits.train, tok, cfg.train.max_len, cfg.train.train_on_inputs)
        tuned = prep.method.prepare(model, prep.plan, method_context(train_ex, cfg.train.batch_size, tok.pad_token_id,
                                                                     seed, prep.device))
        got = block_set(tuned.block_map())
        want = next(block_set(p["block_map"]) for p in points if p["factors"] == {
            "seed": seed, "warmup_steps": steps, "accumulation": acc, "score": args.kinds[0]})
        if got != want:
            raise SystemExit(f"self-check failed: SMT.prepare ({acc}, {steps} steps) differs from the snapshot")
        out.append(f"SMT.prepare with {acc}, {steps} warm-up steps, seed {seed}: the same {len(got)} blocks")
    return out


def _shares(p: dict) -> dict:
    sel = Counter(b[1] for b in p["block_map"])
    return {proj: (sel.get(proj, 0) / len(p["block_map"]), sel.get(proj, 0) / n)
            for proj, n in p["eligible_blocks"].items()}


def report(args, points: list[dict], checks: list[str], meta: dict) -> str:
    rows = pairs([{**p["factors"], "budget": p["budget"], "blocks": block_set(p["block_map"])} for p in points])
    projs = list(points[0]["eligible_blocks"])
    git = meta["git"]
    lines = ["# SMT selection stability", "",
             f"`python {' '.join(meta['argv'])}` at {(git['sha'] or '?')[:7]}"
             f"{' (dirty)' if git['dirty'] else ''}; {meta['device']['name']}, torch {meta['versions']['torch']}. "
             f"{points[0]['blocks']} blocks of {points[0]['block_size']}² ({100 * points[0]['budget']:g}% budget), "
             f"selection `{args.selection}`, score_only warm-up on the run's own warm-up stream.", "",
             "Self-check: " + "; ".join(checks) + ".", "",
             "## Overlap of selections that differ in one factor", "",
             "Jaccard |A∩B| / |A∪B| of the block sets.", "", *markdown(rows), "",
             "![SMT selection stability](stability.png) ([PDF](stability.pdf))", "",
             "The same pairs by what else they share (pooled over seeds where the seed is not the factor):", "",
             *by_context(rows), "",
             "## Per projection", "",
             "Share of the selected blocks, and selected / eligible blocks (size-fair: GQA makes k and v smaller).", "",
             "| accumulation | score | warm-up steps | seed | " + " | ".join(f"{p} share / rate" for p in projs)
             + " | largest share | largest rate |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in projs) + " | --- | --- |"]
    for p in sorted(points, key=lambda p: (p["factors"]["accumulation"], p["factors"]["score"],
                                           p["factors"]["warmup_steps"], p["factors"]["seed"])):
        f, sh = p["factors"], _shares(p)
        lines.append(f"| {f['accumulation']} | {f['score']} | {f['warmup_steps']} | {f['seed']} | "
                     + " | ".join(f"{100 * sh[q][0]:.1f}% / {100 * sh[q][1]:.1f}%" for q in projs)
                     + f" | {max(projs, key=lambda q: sh[q][0])} | {max(projs, key=lambda q: sh[q][1])} |")
    v_first = {acc: sum(max(projs, key=lambda q: _shares(p)[q][0]) == "v_proj" for p in points
                        if p["factors"]["accumulation"] == acc) for acc in ACCUMULATIONS}
    n_acc = {acc: sum(p["factors"]["accumulation"] == acc for p in points) for acc in ACCUMULATIONS}
    lines += ["", "v_proj holds the largest share of the selected blocks in "
              + ", ".join(f"{v_first[a]} of {n_acc[a]} {a} selections" for a in ACCUMULATIONS) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--kinds", nargs="+", default=["abs_mean", "mean_abs"], help="score kinds; the first is the main one")
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--selection", default="global")
    ap.add_argument("--out", default=str(REPO / "outputs" / "smt-selection-study"))
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite report.md and the figure from the selection files under --out")
    ap.add_argument("overrides", nargs="*", help="more smt_bench overrides, e.g. model=tiny-llama")
    args = ap.parse_args()
    args.steps = sorted(set(args.steps))
    args.overrides = [*args.overrides, f"method.selection={args.selection}"]
    out = Path(args.out)
    if args.report_only:
        points = [json.loads(p.read_text()) for p in sorted((out / "selections").glob("*.json"))]
        if not points:
            raise SystemExit(f"no selection files under {out / 'selections'}")
        meta, checks = points[0]["meta_info"], json.loads((out / "self_check.json").read_text())
    else:
        meta = provenance.meta_info(torch.device("cpu"))  # the code that runs: read before it does
        points = [p for s in args.seeds for p in study_seed(s, args)]
        checks = self_check(args, points)
        for p in points:
            f = p["factors"]
            p["meta_info"] = meta
            write_json_atomic(out / "selections" / f"{f['accumulation']}-{f['score']}-w{f['warmup_steps']}-s{f['seed']}.json", p)
        write_json_atomic(out / "self_check.json", checks)
    text = report(args, points, checks, meta)
    (out / "report.md").write_text(text, encoding="utf-8")
    rows = pairs([{**p["factors"], "budget": p["budget"], "blocks": block_set(p["block_map"])} for p in points])
    with F.styled():
        F.save(selection_stability(summary(rows), "SMT selection stability (warm-up + selection only)"), out,
               "stability")
    print(text)


if __name__ == "__main__":
    main()
