"""Evaluation inside a run: the result file's `eval` entry (protocol, accuracy, stderr, forgetting,
per-sample log beside it), the LLM-Adapters data configs, and bad eval input stopped in the
preflight (exit 2, one line, nothing written)."""
import json
import math
import re

import pytest

from smt_bench.errors import UserError
from smt_bench.run import Prepared, execute
from test_eval import write_user_tasks

TINY = ["model=tiny-llama", "device=cpu"]
RUN = [*TINY, "method=lora", "budget.fraction=0.005", "train.max_steps=2", "train.batch_size=2",
       "train.max_len=128", "train.val_batches=1", "data.n_train_per_task=4", "data.n_val_per_task=1",
       "data.n_test_per_task=2", "eval.max_new_tokens=4", "eval.batch_size=4", "eval.forgetting.max_tokens=64"]


def test_result_file_eval_entry_with_samples_and_forgetting(compose, tmp_path, smollm2_path):
    results = tmp_path / "results"
    cfg = compose(*RUN, f"results.dir={results}", "results.keep_samples=true", "eval.merge=false")
    r = execute(cfg)
    (path,) = results.rglob("*.json")
    ev = r.to_json()["eval"]
    assert json.loads(path.read_text())["eval"] == ev
    tasks = {"addition", "alphabetical", "arith_check", "largest", "sequence", "vowels"}
    assert ev["suite"] == "bundled" and ev["protocol"].startswith("generative-first-match (LLM-Adapters)")
    assert "max_new_tokens=4" in ev["protocol"] and set(ev["protocols"].values()) == {ev["protocol"]}
    assert set(ev["accuracy"]) == set(ev["stderr"]) == set(ev["metrics"]) == tasks and ev["n"] == {t: 2 for t in tasks}
    assert all(a in (0.0, 50.0, 100.0) for a in ev["accuracy"].values())
    assert math.isclose(ev["mean_accuracy"], sum(ev["accuracy"].values()) / 6) and ev["mean_over"] == list(ev["accuracy"])
    assert ev["wall_s"] > 0 and ev["model_evaluated"] == "tuned (unmerged)"
    assert ev["lm_eval"]["version"] and ev["lm_eval"]["batch_size"] == 4
    f = ev["forgetting"]
    assert f["tokens"] == 64 and math.isfinite(f["nll_before"]) and math.isfinite(f["nll_after"])
    assert f["delta"] == f["nll_after"] - f["nll_before"] and f["delta"] != 0  # LoRA changed the model
    assert r.summary.forgetting_nll_delta == f["delta"] and r.summary.eval_protocol == ev["protocol"]
    # per-sample log beside the result file, named like it
    samples = path.with_name(path.stem + ".samples.jsonl")
    assert ev["samples_file"] == samples.name and "samples" not in ev
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 12 and {row["task"] for row in rows} == tasks
    assert all(set(row) >= {"task", "doc_id", "target", "prompt", "response", "extracted", "acc"} for row in rows)
    for t in tasks:
        accs = [row["acc"] for row in rows if row["task"] == t]
        assert math.isclose(100 * sum(accs) / len(accs), ev["accuracy"][t])


@pytest.fixture
def adapters(tmp_path):
    """A fake LLM-Adapters checkout: ft-training_set/{commonsense_170k,math_10k}.json and dataset/."""
    root = tmp_path / "LLM-Adapters"
    (root / "ft-training_set").mkdir(parents=True)
    train = [{"instruction": f"Is {i} even? Answer format: true/false", "input": "",
              "output": f"the correct answer is {str(i % 2 == 0).lower()}", "answer": str(i % 2 == 0).lower()}
             for i in range(200)]
    for name in ("commonsense_170k.json", "math_10k.json"):
        (root / "ft-training_set" / name).write_text(json.dumps(train))
    (root / "dataset" / "boolq").mkdir(parents=True)
    (root / "dataset" / "boolq" / "test.json").write_text(json.dumps(train[:5]))
    return root


def test_llm_adapters_data_configs(compose, adapters, tmp_path, smollm2_path):
    for data, file in (("commonsense170k", "commonsense_170k.json"), ("math10k", "math_10k.json")):
        for path in (adapters, adapters / "ft-training_set", adapters / "ft-training_set" / file):
            cfg = compose(*TINY, f"data={data}", f"data.path={path}", "eval=commonsense_gen",
                          f"eval.data_dir={adapters / 'dataset'}", "eval.tasks=[boolq]", f"results.dir={tmp_path}")
            prep = Prepared(cfg)
            assert len(prep.splits.train) == 80 and len(prep.splits.val) == 120 and prep.splits.test == []
            assert [t.name for t in prep.eval_plan.tasks] == ["boolq"] and prep.eval_plan.tasks[0].n == 5
    with pytest.raises(UserError, match=r"eval=bundled scores the data's test split, but data=math10k has none; "
                                        r"use eval=commonsense_gen or eval=math"):
        Prepared(compose(*TINY, "data=math10k", f"data.path={adapters}", f"results.dir={tmp_path}"))
    with pytest.raises(UserError, match=r"data=math10k: no math_10k\.json in "):
        Prepared(compose(*TINY, "data=math10k", f"data.path={tmp_path}", f"results.dir={tmp_path}"))


BAD = {
    "offline-commonsense": (["eval=commonsense"], r"eval=commonsense scores lm-eval's built-in tasks \(boolq, piqa, "
                            r"social_iqa, .*\), .* the hub is offline \(HF_HUB_OFFLINE=1\); .* "
                            r"eval=commonsense_gen eval\.data_dir=DIR"),
    "no-data-dir": (["eval=commonsense_gen"], r"eval=commonsense_gen reads LLM-Adapters test files for boolq, .*: "
                    r"set eval\.data_dir=DIR"),
    "missing-test-json": (["eval=commonsense_gen", "eval.data_dir={tmp}"], r"boolq/test\.json does not exist"),
    "unknown-suite": (["eval.suite=poetry"], r"eval\.suite=poetry: must be one of bundled, commonsense, "),
    "unknown-task": (["eval.include_path={tmp}", "eval.tasks=[my_task]"],
                     r"eval\.tasks: unknown task\(s\) \['my_task'\] for eval=bundled; choose from \[.*\], or put the "
                     r"task's lm-eval YAML in a folder and name it: eval\.include_path="),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_eval_input_stops_in_the_preflight(case, compose, tmp_path, smollm2_path):
    args, message = BAD[case]
    with pytest.raises(UserError) as e:
        Prepared(compose(*TINY, *(a.format(tmp=tmp_path) for a in args), f"results.dir={tmp_path / 'r'}"))
    assert re.search(message, str(e.value)) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["offline-commonsense", "no-data-dir", "unknown-task"])
def test_bad_eval_input_exits_2_with_one_line_and_writes_nothing(case, cli, tmp_path, smollm2_path):
    args, message = BAD[case]
    results = tmp_path / "results"
    proc = cli(*TINY, *(a.format(tmp=tmp_path) for a in args), f"results.dir={results}", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("smt-bench: error: "), proc.stderr[-3000:]
    assert re.search(message, lines[0]), lines[0]
    assert not results.exists()


def test_a_users_task_folder_in_a_run(compose, tmp_path, smollm2_path):
    """eval.include_path + eval.tasks: the user's lm-eval task YAMLs, scored on the tuned model in memory; the
    key at its default (null) stays out of the run id."""
    folder = tmp_path / "my_tasks"
    write_user_tasks(folder)
    results = tmp_path / "results"
    base = compose(*RUN, f"results.dir={results}")
    cfg = compose(*RUN, f"results.dir={results}", f"eval.include_path={folder}", "eval.tasks=[my_parity,addition]")
    assert Prepared(base).run_id == Prepared(compose(*RUN, f"results.dir={results}", "eval.include_path=null")).run_id
    assert Prepared(cfg).run_id != Prepared(base).run_id
    ev = execute(cfg).to_json()["eval"]
    assert list(ev["accuracy"]) == ["my_parity", "addition"] and ev["n"] == {"my_parity": 4, "addition": 2}
    assert ev["lm_eval"]["tasks"] == {"my_parity": "my_parity", "addition": "smt_bundled_addition"}
    assert ev["include_path"] == str(folder.resolve()) and ev["protocol"].startswith("generative-first-match")
