"""LLM-Adapters training sets (commonsense_170k.json, math_10k.json) from a local copy.

`path` is the JSON file itself, or a folder holding it (directly or under ft-training_set/, the
LLM-Adapters repository layout). Records: instruction, input, output, answer.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .records import LocalJSON


class LLMAdaptersJSON(LocalJSON):
    def __init__(self, path: str, file_name: str, test_path: str | None = None, val_size: int = 120,
                 max_train: int | None = None, split_seed: int = 1234, name: str = "llm-adapters"):
        super().__init__(path, test_path, val_size, max_train, split_seed, name)
        self.file_name, self.name = file_name, name

    def load(self):
        p = Path(str(self.path))
        if p.is_dir():
            found = [c for c in (p / self.file_name, p / "ft-training_set" / self.file_name) if c.is_file()]
            if not found:
                raise UserError(f"data={self.name}: no {self.file_name} in {p} or {p / 'ft-training_set'}; set "
                                f"data.path to the file or to the folder that holds it")
            self.path = str(found[0])
        return super().load()
