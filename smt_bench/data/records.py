"""Instruction records in the LLM-Adapters format (instruction, input, output, answer).

Loading validates every record up front, so a broken file fails before training with a message
naming the file and the line (or record) at fault.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

# The Alpaca template used by LLM-Adapters and DoRA for commonsense and math evaluation.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
REQUIRED = ("instruction", "output")


def prompt_of(rec: dict) -> str:
    if rec.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=rec["instruction"], input=rec["input"])
    return PROMPT_NO_INPUT.format(instruction=rec["instruction"])


@dataclass
class Splits:
    train: list[dict]
    val: list[dict]
    test: list[dict]  # each test record carries "task" (for per-task accuracy) and "answer"


def _bad(path: Path, where: str, what: str) -> UserError:
    return UserError(f"data file {path}: {where}: {what}; fix the file or point data.path at a valid "
                     f"LLM-Adapters JSON/JSONL file")


def read_records(path: str | Path, need_answer: bool = False) -> list[dict]:
    """Read a JSON list (LLM-Adapters) or JSON Lines file and check each record's fields."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; set data.path to an existing JSON/JSONL file")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    records: list = []
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise _bad(path, f"line {e.lineno} column {e.colno}", f"malformed JSON ({e.msg})") from None
        locate = lambda i: f"record {i}"  # noqa: E731
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise _bad(path, f"line {lineno}", f"malformed JSON ({e.msg})") from None
        lines = [i for i, l in enumerate(text.splitlines(), 1) if l.strip()]
        locate = lambda i: f"line {lines[i]}"  # noqa: E731
    if not records:
        raise _bad(path, "whole file", "no records")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise _bad(path, locate(i), "record is not a JSON object")
        for key in REQUIRED + (("answer",) if need_answer else ()):
            if not isinstance(rec.get(key), str) or (key != "output" and not rec[key].strip()):
                raise _bad(path, locate(i), f"field {key!r} missing or not a non-empty string")
    return records


class LocalJSON:
    """Training (and optionally test) records from local files, e.g. commonsense_170k.json."""

    def __init__(self, path: str, test_path: str | None = None, val_size: int = 64, max_train: int | None = None,
                 split_seed: int = 1234, name: str = "local"):
        self.path, self.test_path = path, test_path
        self.val_size, self.max_train, self.split_seed = val_size, max_train, split_seed

    def load(self) -> Splits:
        import random

        if self.path in (None, "", "???"):
            raise UserError("data=local needs a file: add data.path=/path/to/train.json")
        train = read_records(self.path)
        rng = random.Random(self.split_seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        val = [train[i] for i in order[: self.val_size]]
        train = [train[i] for i in order[self.val_size:]]
        if self.max_train:
            train = train[: self.max_train]
        if not train:
            raise UserError(f"data file {self.path} has only {len(val)} records, all used for validation; "
                            f"lower data.val_size")
        test = []
        if self.test_path:
            test = read_records(self.test_path, need_answer=True)
            task = Path(self.test_path).stem
            test = [dict(r, task=r.get("task", task)) for r in test]
        return Splits(train, val, test)
