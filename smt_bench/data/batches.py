"""Tokenised training examples and seeded batches (loss on the response only unless train_on_inputs)."""
from __future__ import annotations

import torch

from ..errors import UserError
from .records import prompt_of

IGNORE = -100


def encode(records, tokenizer, max_len: int, train_on_inputs: bool) -> list[dict]:
    """Prompt + response + EOS, truncated to max_len; labels mask the prompt unless train_on_inputs.

    A record whose response is cut off entirely is left out: it has no label to learn from, and a
    batch of only such records has a NaN loss.
    """
    out = []
    for rec in records:
        prompt = tokenizer(prompt_of(rec), add_special_tokens=False)["input_ids"]
        resp = tokenizer(rec["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + resp)[:max_len]
        labels = list(ids) if train_on_inputs else ([IGNORE] * len(prompt) + resp)[:max_len]
        if all(l == IGNORE for l in labels[1:]):  # the causal LM loss never uses the first label
            continue
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(examples, pad_id: int) -> dict:
    """Right-pad a batch for training (causal LM, attention mask marks real tokens)."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batch_stream(examples, batch_size: int, pad_id: int, seed: int):
    """Endless shuffled batches, reshuffled every epoch from one seeded generator."""
    if len(examples) < batch_size:  # would loop forever without yielding
        raise UserError(f"only {len(examples)} training examples (after truncation to train.max_len) for "
                        f"train.batch_size={batch_size}; use more data, a larger max_len or a smaller batch")
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=g).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([examples[j] for j in order[i:i + batch_size]], pad_id)
