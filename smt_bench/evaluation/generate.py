"""Greedy generation on a test split with left padding, accuracy per task: the plain reference
loop of the generative protocol. Runs score through lm-eval (harness.py); the tests check that
lm-eval generates and scores exactly what this loop does.

Left padding plus the attention mask keeps batched generation identical to batch 1
(LLM-Adapters#61 is what happens without them).
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch

from ..data.records import prompt_of
from .extract import is_correct


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    out = []
    try:
        # longest first: fewer pad tokens per batch; results are put back in input order
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        texts: list[Any] = [None] * len(prompts)  # a str in every slot once the batches are done
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for j, i in enumerate(idx):
                texts[i] = tokenizer.decode(gen[j, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out = texts
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def capped(records, max_examples: int | None) -> list:
    """At most max_examples records, taken round-robin over tasks (each in file order), so that a
    capped evaluation still reports every task of a split that is ordered by task."""
    if not max_examples:
        return list(records)
    by_task = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    queues = list(by_task.values())
    out = []
    for i in range(max(map(len, queues), default=0)):
        out += [q[i] for q in queues if i < len(q)]
    return out[:max_examples]


def evaluate_generative(model, tokenizer, records, max_new_tokens: int = 32, batch_size: int = 16,
                        keep_samples: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    responses = generate(model, tokenizer, [prompt_of(r) for r in records], max_new_tokens, batch_size)
    per_task = defaultdict(list)
    samples = []
    for rec, resp in zip(records, responses):
        ok = is_correct(resp, rec["answer"])
        per_task[rec["task"]].append(ok)
        if keep_samples:
            samples.append({"task": rec["task"], "answer": rec["answer"], "response": resp, "correct": ok})
    acc = {t: 100.0 * sum(v) / len(v) for t, v in sorted(per_task.items())}
    result: dict[str, Any] = {
        "protocol": "generative-first-match (LLM-Adapters): Alpaca prompt, greedy, "
                    f"max_new_tokens={max_new_tokens}",
        "accuracy": acc,
        "n": {t: len(v) for t, v in sorted(per_task.items())},
        "mean_accuracy": sum(acc.values()) / len(acc) if acc else None,
        "wall_s": time.perf_counter() - t0,
    }
    if keep_samples:
        result["samples"] = samples
    return result
