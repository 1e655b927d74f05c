"""Score the tuned model in memory with lm-eval: HFLM(pretrained=<model object>) + simple_evaluate.

The task YAMLs of smt-bench's folder and of eval.include_path (generative protocol, or a user task's
own) and lm-eval's built-in tasks run as two calls: the first encodes prompts without special tokens,
as the trainer does (smt_bench.data.batches.encode), the second with lm-eval's defaults, as those
tasks' published numbers do. A capped evaluation scores the first documents of each task
(simple_evaluate's `samples`). Batched generation pads on the
left with an attention mask (HFLM), so eval.batch_size does not change what is generated.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from .suites import SuitePlan, split_task_yaml, task_manager


def _quiet():
    # lm-eval logs every task config at INFO/WARNING; a run prints its own summary
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _simple_evaluate(model, tokenizer, task_objs, tm, batch_size: int, add_bos: bool | None, keep_samples: bool,
                     limit, lm=None, samples=None):
    import lm_eval.evaluator as ev
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if lm is None:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=add_bos)
    # smt-bench records its own provenance (meta_info); skip lm-eval's (a `git describe` in the working
    # directory that prints to stderr outside a repository, and torch's collect_env)
    with _patched(ev, "get_git_commit_hash", lambda *a, **k: None), _patched(ev, "add_env_info", lambda *a, **k: None):
        return simple_evaluate(model=lm, tasks=task_objs, task_manager=tm, log_samples=keep_samples, limit=limit,
                               samples=samples, bootstrap_iters=1000, random_seed=0, numpy_random_seed=1234,
                               torch_random_seed=1234, fewshot_random_seed=1234)


@contextlib.contextmanager
def _patched(module, name: str, value):
    if not hasattr(module, name):
        yield
        return
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _pct(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else 100.0 * float(x)


def evaluate_suite(model, tokenizer, plan: SuitePlan, *, batch_size: int = 16, max_new_tokens: int = 32,
                   num_beams: int = 1, keep_samples: bool = False, lm=None) -> dict:
    """Run the plan's tasks; returns the result file's `eval` entry (samples under "samples" if kept).

    lm: an lm-eval LM to score instead of wrapping `model` in HFLM (tests; other backends).
    """
    import lm_eval
    import torch

    _quiet()
    t0 = time.perf_counter()
    was_training = model.training if model is not None else False
    side = tokenizer.padding_side if tokenizer is not None else None
    raw: dict[str, dict[str, Any]] = {}  # lm-eval's results and samples, by task
    samples: dict[str, list[dict[str, Any]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="smt-bench-eval-") as tmp, torch.no_grad():
            meta = {"data_dir": plan.data_dir}
            extra = []
            if plan.split:
                for name, recs in plan.split.items():
                    with open(Path(tmp) / f"{name}.jsonl", "w", encoding="utf-8") as f:
                        for r in recs:
                            f.write(json.dumps(r, ensure_ascii=False) + "\n")
                for i, name in enumerate(plan.generated):
                    (Path(tmp) / f"split_{i}.yaml").write_text(split_task_yaml(name))
                meta["split_dir"] = tmp
                extra.append(tmp)
            if plan.local:
                tm = task_manager(plan.include_path, extra, meta)
                tasks = list(tm.load([t.lm_name for t in plan.local])["tasks"].values())
                gen = {"max_gen_toks": max_new_tokens}
                if num_beams > 1:
                    gen["num_beams"] = num_beams
                ours = {s.lm_name for s in plan.local if s.metric == "acc,first-match"}
                for task in tasks:  # the generative protocol's decoding (a user's other tasks keep their own)
                    if task.config.task in ours:
                        task.set_config("generation_kwargs", gen, update=True)
                # a capped evaluation: the first max_docs documents of each task
                first = {t.lm_name: list(range(plan.max_docs[t.name])) for t in plan.local if t.name in plan.max_docs}
                out = _simple_evaluate(model, tokenizer, tasks, tm, batch_size, False, keep_samples, None, lm,
                                       first or None)
                raw.update(out["results"])
                samples.update(out.get("samples") or {})
                n_samples = dict(out.get("n-samples") or {})
                versions = dict(out.get("versions") or {})
            else:
                n_samples, versions = {}, {}
            if plan.builtins:
                from lm_eval.tasks import TaskManager

                tm = TaskManager()
                out = _simple_evaluate(model, tokenizer, [t.lm_name for t in plan.builtins], tm, batch_size, None,
                                       keep_samples, plan.builtin_limit, lm)
                raw.update(out["results"])
                samples.update(out.get("samples") or {})
                n_samples.update(out.get("n-samples") or {})
                versions.update(out.get("versions") or {})
    finally:
        if tokenizer is not None:
            tokenizer.padding_side = side
        if model is not None:
            model.train(was_training)
    return _to_result(plan, raw, n_samples, versions, samples if keep_samples else None,
                      time.perf_counter() - t0, lm_eval.__version__,
                      {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "num_beams": num_beams})


def _to_result(plan: SuitePlan, raw: dict, n_samples: dict, versions: dict, samples, wall_s: float,
               version: str, settings: dict) -> dict:
    headline = [t for t in plan.tasks if t.protocol == plan.protocol]
    others = [t for t in plan.tasks if t.protocol != plan.protocol]

    def block(specs):
        acc, err, n, metrics = {}, {}, {}, {}
        for t in specs:
            r = raw.get(t.lm_name, {})
            key = t.metric
            metric, filt = key.split(",")
            acc[t.name] = _pct(r.get(key))
            stderr = r.get(f"{metric}_stderr,{filt}")
            err[t.name] = _pct(stderr) if isinstance(stderr, (int, float)) else None
            ns = n_samples.get(t.lm_name) or {}
            n[t.name] = int(ns.get("effective", t.n or 0))
            metrics[t.name] = {k: v for k, v in r.items() if k != "alias" and isinstance(v, (int, float))}
        return acc, err, n, metrics

    acc, err, n, metrics = block(headline)
    vals = [v for v in acc.values() if v is not None]
    result = {
        "suite": plan.suite,
        "protocol": plan.protocol,
        "accuracy": acc,
        "stderr": err,
        "n": n,
        "mean_accuracy": sum(vals) / len(vals) if vals and len(vals) == len(acc) else None,
        "mean_over": list(acc),
        "protocols": {t.name: t.protocol for t in headline},
        "metrics": metrics,
        "wall_s": wall_s,
        "lm_eval": {"version": version, "tasks": {t.name: t.lm_name for t in plan.tasks},
                    "task_versions": {t.name: versions.get(t.lm_name) for t in plan.tasks}, **settings},
    }
    if plan.data_dir:
        result["data_dir"] = plan.data_dir
    if plan.include_path:
        result["include_path"] = plan.include_path
    if others:
        o_acc, o_err, o_n, o_metrics = block(others)
        result["other_protocols"] = {t.name: {"protocol": t.protocol, "accuracy": o_acc[t.name],
                                              "stderr": o_err[t.name], "n": o_n[t.name],
                                              "metrics": o_metrics[t.name]} for t in others}
    if plan.skipped:
        result["skipped"] = dict(plan.skipped)
    if samples is not None:
        name_of = {t.lm_name: t.name for t in plan.tasks}
        result["samples"] = [
            {"task": name_of.get(task, task), "doc_id": s.get("doc_id"), "target": s.get("target"),
             "prompt": _first(s.get("arguments")), "response": _first(s.get("resps")),
             "extracted": _first(s.get("filtered_resps")),
             **{m: s[m] for m in s.get("metrics", []) if m in s}}
            for task, rows in samples.items() for s in rows]
    return result


def _first(x):
    while isinstance(x, (list, tuple)) and x:
        x = x[0]
    return x


def write_samples(path: Path, rows: list[dict]) -> None:
    """Per-sample log as JSON Lines, written atomically beside the result file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)
