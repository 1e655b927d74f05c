"""RunResult (smt_bench/result.py): the result file's one schema, written and read through the same models;
docs/results.md is generated from it; every committed result reads through it and writes back unchanged."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from smt_bench import migrations
from smt_bench.result import RunResult, SchemaError, TrainInfo, schema_page
from smt_bench.summary import run_line

REPO = Path(__file__).resolve().parents[1]
COMMITTED = sorted((REPO / "results").glob("*/runs/**/*.json"))


def test_the_schema_page_is_generated_from_the_models():
    assert (REPO / "docs" / "results.md").read_text() == schema_page(), \
        "docs/results.md is stale: python -m smt_bench.result > docs/results.md"


def test_every_committed_result_reads_and_writes_back_as_it_was_upgraded():
    assert len(COMMITTED) >= 100
    for p in COMMITTED:
        obj = json.loads(p.read_text())
        r = RunResult.from_json(obj)
        assert r.to_json() == migrations.upgrade(obj), p.name
        assert migrations.upgrade(r.to_json()) == r.to_json()  # this version's form is a fixed point


def _finished() -> dict:
    return json.loads(next(p for p in COMMITTED if p.name.startswith("smt-")).read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["train_info"].update(foo=1), "unknown key train_info.foo (not in the result schema"),
    (lambda d: d["train_info"].update(tokens_per_s=float("nan")), "train_info.tokens_per_s=NaN is not a finite number "
                                                                  "or null"),
    (lambda d: d["train_info"].update(trainable_params=True), "train_info.trainable_params=true is not an integer"),
    (lambda d: d["train_info"].update(trainable_params=12.0), "train_info.trainable_params=12.0 is not an integer"),
    (lambda d: d["eval"]["accuracy"].update(vowels="high"), 'eval.accuracy.vowels="high" is not a finite number or null'),
    (lambda d: d["run_info"].update(status="paused"), "run_info.status='paused' is not one of finished, failed, oom"),
    (lambda d: d["meta_info"].pop("git"), "missing key meta_info.git"),
    (lambda d: d.pop("train_info"), "missing key train_info"),
    (lambda d: d["config"]["budget"].update(fraction=2), "config.budget.fraction=2 is not in (0, 1]"),
    (lambda d: d["config"].pop("seed"), "missing key config.seed"),
    (lambda d: d.update(schema_version=2), "schema_version 2 is not supported (this analysis reads 1)"),
])
def test_a_file_that_breaks_the_schema_is_named_in_one_line(edit, message):
    d = _finished()
    RunResult.from_json(d)
    edit(d)
    with pytest.raises(SchemaError) as e:
        RunResult.from_json(d)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_numbers_keep_their_json_type_and_assignments_are_checked():
    d = _finished()
    r = RunResult.from_json(d)
    assert isinstance(r.train_info.peak_memory_bytes, int) and isinstance(r.train_info.tokens_per_s, float)
    assert json.dumps(r.to_json()) == json.dumps(migrations.upgrade(d))  # same keys, same order, same values
    with pytest.raises(ValidationError):
        r.run_info.status = "paused"
    with pytest.raises(ValidationError):
        r.train_info = TrainInfo.model_validate({**d["train_info"], "steps": "20"})
    r.run_info.status = "failed"
    r.run_info.error = "RuntimeError: boom"
    assert r.to_json()["run_info"]["status"] == "failed"
    line = run_line(r, "x.json")
    assert line.startswith("[smt-bench] failed: smt | budget ") and line.endswith(
        "| error RuntimeError: boom | next: fix its cause, then the same command runs it again | x.json")


def test_a_running_file_needs_its_checkpoint_step_and_a_diverged_one_its_step():
    d = _finished()
    for key in ("train_info", "method_info", "eval", "summary"):
        d.pop(key)
    d["run_info"].update(status="running", checkpoint_step=None)
    RunResult.from_json(d)
    del d["run_info"]["checkpoint_step"]
    with pytest.raises(SchemaError, match="missing key run_info.checkpoint_step"):
        RunResult.from_json(d)
    d["run_info"]["status"] = "diverged"
    with pytest.raises(SchemaError, match="missing key run_info.diverged_at_step"):
        RunResult.from_json(copy.deepcopy(d))
