"""Forgetting: mean token NLL on held-out general text, before vs after tuning (as peft's
method_comparison measures it).

The text is assets/general_text.json, shipped with the package (original passages written for
smt-bench, CC0-1.0; see the file's metadata). Each passage is scored on its own (no padding, so the
number does not depend on any batch size), without special tokens, as the trainer encodes text; the
mean is over every predicted token of the passages used (the first `max_tokens` of them).
"""
from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

SAMPLE = Path(__file__).resolve().parent / "assets" / "general_text.json"


@lru_cache(maxsize=1)
def general_text() -> dict:
    return json.loads(SAMPLE.read_text(encoding="utf-8"))


@torch.no_grad()
def mean_token_nll(model, tokenizer, passages: list[str] | None = None, max_tokens: int | None = None) -> dict:
    """{"nll": mean NLL per predicted token (nats), "tokens": how many, "passages": how many used}."""
    passages = general_text()["passages"] if passages is None else passages
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count, used = 0.0, 0, 0
    try:
        for text in passages:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if max_tokens:
                ids = ids[: max_tokens - count + 1]
            if len(ids) < 2:
                break
            x = torch.tensor([ids], device=device)
            logits = model(input_ids=x).logits[0, :-1].float()
            total += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += len(ids) - 1
            used += 1
            if max_tokens and count >= max_tokens:
                break
    finally:
        model.train(was_training)
    return {"nll": total / count if count else math.nan, "tokens": count, "passages": used}


def measure(model, tokenizer, max_tokens: int | None) -> dict:
    t0 = time.perf_counter()
    out = mean_token_nll(model, tokenizer, max_tokens=max_tokens)
    out["wall_s"] = time.perf_counter() - t0
    return out


def forgetting_entry(before: dict, after: dict) -> dict:
    """The result file's eval.forgetting: NLL before and after tuning and the change (after - before;
    positive = the tuned model fits general text worse)."""
    meta = general_text()
    return {
        "nll_before": before["nll"], "nll_after": after["nll"], "delta": after["nll"] - before["nll"],
        "tokens": after["tokens"], "passages": after["passages"],
        "protocol": "mean token NLL (nats) on held-out general text, no special tokens, one passage at a time",
        "sample": f"{meta['name']} v{meta['version']} ({meta['license'].split(' ')[0]})",
        "wall_s": before.get("wall_s", 0.0) + after.get("wall_s", 0.0),
    }
