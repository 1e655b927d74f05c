"""Tokenised training examples and seeded batches (loss on the response only unless train_on_inputs)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..errors import UserError
from .records import prompt_of

IGNORE = -100


def encode(records: Iterable[dict[str, Any]], tokenizer: Any, max_len: int,
           train_on_inputs: bool) -> list[dict[str, list[int]]]:
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


def collate(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
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


class BatchStream:
    """Endless shuffled batches, reshuffled every epoch from one seeded generator. Its position (the
    generator's state at the start of this epoch, the epoch and the batch within it) is a checkpoint's:
    a resumed run draws exactly the batches the uninterrupted one would have.

    With several ranks, every rank walks the same sequence and keeps every `world_size`-th batch,
    starting at its rank: the ranks' batches of one step together are the batches one process with
    `grad_accum × world_size` micro-batches would draw for that step.
    """

    def __init__(self, examples: Sequence[dict[str, list[int]]], batch_size: int, pad_id: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if len(examples) < batch_size:  # would loop forever without yielding
            raise UserError(f"only {len(examples)} training examples (after truncation to train.max_len) for "
                            f"train.batch_size={batch_size}; use more data, a larger max_len or a smaller batch")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.pos = -1, 0
        self._new_epoch()

    def _new_epoch(self) -> None:
        self._epoch_start = self.generator.get_state()
        self.order = torch.randperm(len(self.examples), generator=self.generator).tolist()
        self.epoch, self.pos = self.epoch + 1, 0

    def _draw(self) -> list[int]:
        if self.pos + self.batch_size > len(self.order):
            self._new_epoch()
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        mine: list[int] | None = None
        for r in range(self.world_size):
            idx = self._draw()
            if r == self.rank:
                mine = idx
        assert mine is not None  # rank < world_size
        return collate([self.examples[j] for j in mine], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._epoch_start.clone(), "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.epoch = state["epoch"] - 1
        self._new_epoch()
        self.pos = state["pos"]
