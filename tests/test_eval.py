"""Evaluation through lm-eval, offline, on tiny-llama: every bundled and local task runs and scores
exactly what the reference generation loop (smt_bench.evaluation.generate) scores; batch size,
peft vs merged do not change results; forgetting; suite planning and its errors in the preflight."""
import copy
import json
import math
import re

import pytest
import torch
from omegaconf import OmegaConf

from smt_bench.data.bundled import BundledSuite
from smt_bench.data.records import prompt_of
from smt_bench.errors import UserError
from smt_bench.evaluation import suites
from smt_bench.evaluation.extract import extract, family_of, is_correct
from smt_bench.evaluation.forgetting import forgetting_entry, general_text, mean_token_nll
from smt_bench.evaluation.generate import generate
from smt_bench.evaluation.harness import _to_result, evaluate_suite
from smt_bench.evaluation.lm_tasks import records_for
from smt_bench.evaluation.suites import TASKS_DIR, data_dir_sets, plan_suite, suite_members

# what the shipped task YAMLs define (the tests' expectations; the YAMLs are the source)
BUNDLED = ["arith_check", "largest", "alphabetical", "sequence", "vowels", "addition"]
COMMONSENSE_GEN = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa"]
MATH = ["gsm8k", "SVAMP", "MultiArith", "AddSub", "AQuA", "SingleEq"]
FAMILY = {**data_dir_sets(), "gsm8k": "numeric"}

MAX_NEW = 8
LABELS = {"true_false": ["true", "false"], "solution": ["solution1", "solution2"],
          "answer": ["answer1", "answer2", "answer3", "answer4", "answer5"],
          "ending": ["ending1", "ending2", "ending3", "ending4"], "option": ["option1", "option2"],
          "letter": ["A", "B", "C", "D", "E"], "numeric": ["7", "42", "3.5"]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and immune to OpenMP oversubscription on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def steered(_tiny_llama_pristine):
    """tiny-llama made to answer: larger layer weights (the output depends on the prompt) and larger
    embeddings of space-led label tokens (the output is full of labels, so some answers are right)."""
    model, tok = copy.deepcopy(_tiny_llama_pristine[0]), _tiny_llama_pristine[1]
    words = [f" {w}" for fam in LABELS.values() for w in fam] + [f" {d}" for d in range(10)] + [" ."]
    ids = sorted({i for w in words for i in tok(w, add_special_tokens=False)["input_ids"]})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layers" in n and p.dim() == 2:
                p.mul_(10)
        model.get_input_embeddings().weight[ids] *= 3
    return model.eval(), tok


def _ev(**kw):
    base = OmegaConf.to_container(OmegaConf.load(suites.TASKS_DIR.parents[2] / "conf" / "eval" / "bundled.yaml"))
    base.update({"max_new_tokens": MAX_NEW, "batch_size": 8, **kw})
    return OmegaConf.create(base)


def _reference(model, tok, recs, batch_size=1):
    return generate(model, tok, [prompt_of(r) for r in recs], MAX_NEW, batch_size)


def _check_against_reference(result, samples, plan, model, tok, records):
    """Every response equals the reference loop's; extraction and accuracy follow from it."""
    by_task = {}
    for s in samples:
        by_task.setdefault(s["task"], []).append(s)
    for spec in plan.tasks:
        recs = records[spec.name][: spec.n]
        rows = sorted(by_task[spec.name], key=lambda s: s["doc_id"])
        assert len(rows) == len(recs) == result["n"][spec.name]
        ref = _reference(model, tok, recs)
        assert [s["response"] for s in rows] == ref, spec.name
        fam = spec.family or family_of(recs[0]["answer"])
        assert [s["extracted"] for s in rows] == [extract(r, fam) or "" for r in ref]
        want = 100.0 * sum(is_correct(r, rec["answer"], fam) for r, rec in zip(ref, recs)) / len(recs)
        assert math.isclose(result["accuracy"][spec.name], want), spec.name
        assert result["protocols"][spec.name] == result["protocol"]
    vals = list(result["accuracy"].values())
    assert math.isclose(result["mean_accuracy"], sum(vals) / len(vals))


# --- the shipped task files -----------------------------------------------------------------------

def test_lm_eval_indexes_every_shipped_task_and_the_suites_are_its_groups():
    """Each task is one lm-eval YAML (found by scanning the folder); a suite is the group smt_<suite>."""
    import yaml
    from lm_eval.tasks import TaskManager

    assert (TASKS_DIR / "_generative.yaml").read_text().count("!function smt_bench.evaluation.lm_tasks.") == 3
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    files = [p for p in TASKS_DIR.rglob("*.yaml") if not p.name.startswith("_")]
    tasks = {yaml.load(p.read_text(), Loader=yaml.BaseLoader)["task"] for p in files}
    assert len(files) == len(tasks) == 20 and tasks <= set(tm.all_subtasks)
    assert {"smt_bundled", "smt_commonsense_gen", "smt_math", "smt_commonsense"} <= set(tm.all_groups)
    assert suites.SUITES == ("bundled", "commonsense", "commonsense_gen", "math")
    assert suite_members("commonsense_gen") == [f"smt_cs_{n.lower().replace('-', '_')}" for n in COMMONSENSE_GEN]
    assert suite_members("math") == [f"smt_math_{n.lower()}" for n in MATH]
    assert sorted(suite_members("bundled")) == sorted(f"smt_bundled_{n}" for n in BUNDLED)
    for name in tasks:  # smt-bench's loader, the set's name as the alias, and its label family
        cfg = tm.task_index[name].cfg
        assert cfg["custom_dataset"].endswith("smt_bench.evaluation.lm_tasks.load_docs")
        assert cfg["task_alias"] == cfg["dataset_kwargs"]["name"] and cfg["metadata"]["version"] == 1.0
        assert cfg["metadata"]["family"] in {"true_false", "solution", "answer", "ending", "option", "numeric",
                                             "letter"}
    assert FAMILY == {"boolq": "true_false", "piqa": "solution", "social_i_qa": "answer", "hellaswag": "ending",
                      "winogrande": "option", "ARC-Challenge": "answer", "ARC-Easy": "answer", "openbookqa": "answer",
                      "SVAMP": "numeric", "MultiArith": "numeric", "AddSub": "numeric", "AQuA": "letter",
                      "SingleEq": "numeric", "gsm8k": "numeric"}


# --- the extractor's new family (AQuA letters); the rest is tabled in test_data.py -----------------

@pytest.mark.parametrize("response,expected", [
    ("The answer is C.", "c"), ("(B) because A is wrong", "b"), ("a cat and a dog", None),
    ("Answer: E", "e"), ("CAB", None), ("F or G", None),
])
def test_letter_family(response, expected):
    assert family_of("B") == "letter" and extract(response, "letter") == expected
    assert is_correct(response, "C") is (expected == "c")


# --- running the suites -----------------------------------------------------------------------------

def test_bundled_suite_runs_every_task_and_scores_like_the_reference(steered):
    model, tok = steered
    test = BundledSuite(n_train_per_task=1, n_val_per_task=1, n_test_per_task=3).load().test
    plan = plan_suite(_ev(), test, True, "bundled")
    assert [t.lm_name for t in plan.tasks] == [f"smt_bundled_{n}" for n in BUNDLED]
    r = evaluate_suite(model, tok, plan, batch_size=8, max_new_tokens=MAX_NEW, keep_samples=True)
    samples = r.pop("samples")
    assert r["protocol"].startswith("generative-first-match (LLM-Adapters)") and "greedy" in r["protocol"]
    assert r["n"] == {n: 3 for n in BUNDLED} and set(r["stderr"]) == set(BUNDLED)
    records = {n: [x for x in test if x["task"] == n] for n in BUNDLED}
    _check_against_reference(r, samples, plan, model, tok, records)
    assert r["lm_eval"]["tasks"]["addition"] == "smt_bundled_addition" and r["wall_s"] > 0


def test_a_local_test_split_gets_generated_tasks(steered, tmp_path):
    """data=local with test_path: tasks named after the file, not shipped: YAMLs made at run time."""
    model, tok = steered
    recs = [{"instruction": f"Is {a} larger than {b}? Answer format: true/false", "input": "", "output": "",
             "answer": "true" if a > b else "false", "task": "my set"} for a, b in ((3, 9), (12, 4), (7, 7))]
    plan = plan_suite(_ev(), recs, False, "local")
    assert plan.generated == ["my set"] and plan.tasks[0].lm_name == "smt_split_my_set"
    r = evaluate_suite(model, tok, plan, batch_size=8, max_new_tokens=MAX_NEW, keep_samples=True)
    _check_against_reference(r, r.pop("samples"), plan, model, tok, {"my set": recs})


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, steered):
    """A fake LLM-Adapters dataset/ folder: 3 records per commonsense and math set, whose gold answers
    are chosen from what the steered model says, so that some are right and some wrong."""
    model, tok = steered
    root = tmp_path_factory.mktemp("dataset")
    for k, (name, fam) in enumerate(data_dir_sets().items()):
        recs = [{"instruction": f"Question {k}.{i} about {name}: pick one of {', '.join(LABELS[fam])}."
                                f"\n\nAnswer format: {'/'.join(LABELS[fam])}", "input": "" if i else "some context",
                 "output": ""} for i in range(3)]
        said = [extract(r, fam) for r in _reference(model, tok, recs)]  # lower case, or None
        for i, (rec, s) in enumerate(zip(recs, said)):
            if s and i != 1:  # the model's own answer: right
                rec["answer"] = s.upper() if fam == "letter" else s
            else:             # another label: wrong
                rec["answer"] = next(l for l in LABELS[fam] if l.lower() != (s or ""))
        (root / name).mkdir()
        (root / name / "test.json").write_text(json.dumps(recs, indent=1))
    return root


@pytest.mark.parametrize("suite", ["commonsense_gen", "math"])
def test_local_suites_run_every_task_and_score_like_the_reference(suite, steered, adapters_dir):
    model, tok = steered
    names = list(COMMONSENSE_GEN if suite == "commonsense_gen" else MATH)
    # math: 3 GSM8K questions of the wheel's 1319 (the cap is taken round-robin over the tasks)
    ev = _ev(suite=suite, tasks=names, data_dir=str(adapters_dir), builtin=None, max_examples=3 * len(names))
    plan = plan_suite(ev, [], False, "x")
    assert [t.name for t in plan.tasks] == names and all(t.n == 3 for t in plan.tasks)
    r = evaluate_suite(model, tok, plan, batch_size=8, max_new_tokens=MAX_NEW, keep_samples=True)
    records = {t.name: records_for(t.source, t.doc_name, data_dir=plan.data_dir) for t in plan.tasks}
    _check_against_reference(r, r.pop("samples"), plan, model, tok, records)
    assert r["data_dir"] == str(adapters_dir.resolve())
    if suite == "math":  # the steered model writes numbers and letters (commonsense labels: see below)
        assert any(r["accuracy"][n] > 0 for n in names) and any(r["accuracy"][n] < 100 for n in names)


# --- the first-match filter inside lm-eval, on known responses (a canned LM) ----------------------------

# task: [(gold, response, right?)]: several labels, none, upper case, a label inside another word
TRICKY = {
    "boolq": [("false", "false, although some say true", True), ("true", "That is untrue.", False),
              ("true", "TRUE!", True), ("false", "truefalse", False)],
    "piqa": [("solution2", "solution2solution1 then solution2", True), ("solution1", "Solution2 and solution1", False),
             ("solution1", "no idea", False)],
    "social_i_qa": [("answer3", "answer10 then answer3", True), ("answer1", "it is answer2, not answer1", False),
                    ("answer2", "ANSWER2", True)],
    "hellaswag": [("ending4", "ending4 (not ending2)", True), ("ending1", "ending5 ending0", False),
                  ("ending2", "the ending2 one", True)],
    "winogrande": [("option2", "options1 or option2", True), ("option1", "Option1 and option2", True),
                   ("option2", "option3", False)],
    "ARC-Challenge": [("answer5", "answer5", True), ("answer4", "the answer is 4", False)],
    "ARC-Easy": [("answer1", "answer1.", True), ("answer1", "answer11", False)],
    "openbookqa": [("answer3", "I choose answer3 because answer1 is wrong", True), ("answer2", "", False)],
    "AQuA": [("C", "The answer is C.", True), ("A", "a cat and a dog", False), ("B", "(B) because A is wrong", True)],
    "SVAMP": [("12", "12 apples and 15 pears", False), ("15", "so 15", True), ("1234", "total: 1,234", True),
              ("-3.5", "it is -3.5 degrees", True), ("42", "no number here", False)],
}


class CannedLM:
    """An lm-eval LM that answers each prompt with a fixed response."""

    def __new__(cls, answers):
        from lm_eval.api.model import LM

        class _Canned(LM):
            def generate_until(self, requests, disable_tqdm=False):
                return [answers[r.args[0]] for r in requests]

            def loglikelihood(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return _Canned()


def test_first_match_filter_in_lm_eval_scores_tricky_responses(tmp_path):
    answers = {}
    for k, (name, rows) in enumerate(TRICKY.items()):
        recs = [{"instruction": f"q{k}.{i}", "input": "", "output": "", "answer": gold} for i, (gold, _, _) in enumerate(rows)]
        for rec, (_, resp, _) in zip(recs, rows):
            answers[prompt_of(rec)] = resp
        (tmp_path / name).mkdir()
        (tmp_path / name / "test.json").write_text(json.dumps(recs))
    for suite, names in (("commonsense_gen", COMMONSENSE_GEN), ("math", ["AQuA", "SVAMP"])):
        plan = plan_suite(_ev(suite=suite, tasks=names, data_dir=str(tmp_path), builtin=None), [], False, "x")
        r = evaluate_suite(None, None, plan, lm=CannedLM(answers), keep_samples=True)
        for name in names:
            fam = FAMILY[name]
            want = [ok for _, _, ok in TRICKY[name]]
            assert [is_correct(resp, gold, fam) for gold, resp, _ in TRICKY[name]] == want, name
            assert math.isclose(r["accuracy"][name], 100.0 * sum(want) / len(want)), name
            got = sorted((s for s in r["samples"] if s["task"] == name), key=lambda s: s["doc_id"])
            assert [s["acc"] for s in got] == [float(ok) for ok in want], name
            assert [s["extracted"] for s in got] == [extract(resp, fam) or "" for _, resp, _ in TRICKY[name]]
        assert math.isclose(r["mean_accuracy"], sum(r["accuracy"].values()) / len(names))  # unweighted mean


def test_batch_size_does_not_change_results(steered):
    model, tok = steered
    test = BundledSuite(n_train_per_task=1, n_val_per_task=1, n_test_per_task=4).load().test
    plan = plan_suite(_ev(), test, True, "bundled")
    one = evaluate_suite(model, tok, plan, batch_size=1, max_new_tokens=MAX_NEW, keep_samples=True)
    eight = evaluate_suite(model, tok, plan, batch_size=8, max_new_tokens=MAX_NEW, keep_samples=True)
    r1, r8 = ([s["response"] for s in r["samples"]] for r in (one, eight))
    assert len(set(r1)) >= 12  # prompt-dependent answers, not one repeated string
    assert r8 == r1 and one["accuracy"] == eight["accuracy"] and one["mean_accuracy"] == eight["mean_accuracy"]


def test_peft_model_and_its_merged_model_give_the_same_accuracy(steered):
    from peft import LoraConfig, get_peft_model

    model, tok = steered
    test = BundledSuite(n_train_per_task=1, n_val_per_task=1, n_test_per_task=3).load().test
    plan = plan_suite(_ev(), test, True, "bundled")
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    kw = dict(batch_size=8, max_new_tokens=MAX_NEW, keep_samples=True)
    a = evaluate_suite(peft_model, tok, plan, **kw)
    b = evaluate_suite(merged, tok, plan, **kw)
    base = evaluate_suite(model, tok, plan, **kw)
    responses = [[s["response"] for s in r["samples"]] for r in (a, b, base)]
    assert responses[0] != responses[2]  # the adapter changes what the model says
    assert responses[0] == responses[1] and a["accuracy"] == b["accuracy"]


# --- forgetting ----------------------------------------------------------------------------------------

def test_general_text_sample_says_where_it_comes_from():
    meta = general_text()
    assert meta["license"].startswith("CC0-1.0") and "original" in meta["source"].lower()
    assert len(meta["passages"]) >= 15 and all(len(p.split()) > 60 for p in meta["passages"])


def test_forgetting_is_the_mean_token_nll_before_and_after(tiny_llama):
    model, tok = tiny_llama
    texts = general_text()["passages"][:2]
    got = mean_token_nll(model, tok, texts)
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    assert got["tokens"] == count and got["passages"] == 2 and math.isclose(got["nll"], total / count, rel_tol=1e-6)
    capped = mean_token_nll(model, tok, max_tokens=100)
    assert capped["tokens"] == 100 and capped["passages"] == 1
    assert mean_token_nll(model, tok, max_tokens=100) == capped  # deterministic
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(3)  # a model that "forgot": general text fits worse
    after = mean_token_nll(model, tok, max_tokens=100)
    entry = forgetting_entry(capped, after)
    assert entry["delta"] == after["nll"] - capped["nll"] > 0 and entry["tokens"] == 100
    assert entry["sample"].startswith("smt-bench general-text sample v1 (CC0-1.0)")


# --- planning, caps, protocols and bad input ------------------------------------------------------------

def test_round_robin_caps():
    rr = suites._round_robin
    assert rr({"a": 5, "b": 1, "c": 5}, 6) == {"a": 3, "b": 1, "c": 2}
    assert rr({"a": 2, "b": None}, 5) == {"a": 2, "b": 3}
    assert rr({"a": 2, "b": 3}, None) == {"a": 2, "b": 3} and rr({"a": 2}, 10) == {"a": 2}


def test_with_the_hub_math_adds_lm_evals_gsm8k_under_its_own_protocol(monkeypatch):
    monkeypatch.setattr(suites, "hub_offline", lambda: None)
    monkeypatch.setattr(suites, "builtin_task_names", lambda: frozenset({"gsm8k", *suite_members("commonsense")}))
    ev = OmegaConf.load(TASKS_DIR.parents[2] / "conf" / "eval" / "math.yaml")
    ev.max_examples = 10
    plan = plan_suite(ev, [], False, "math10k")
    assert [(t.name, t.builtin) for t in plan.tasks] == [("gsm8k", False), ("gsm8k", True)]
    assert plan.max_docs == {"gsm8k": 5} and plan.builtin_limit == 5
    assert plan.protocol.startswith("generative-first-match") and "5-shot" in plan.tasks[1].protocol
    raw = {"smt_math_gsm8k": {"acc,first-match": 0.2, "acc_stderr,first-match": 0.1},
           "gsm8k": {"exact_match,strict-match": 0.4, "exact_match_stderr,strict-match": 0.2,
                     "exact_match,flexible-extract": 0.5}}
    r = _to_result(plan, raw, {"smt_math_gsm8k": {"effective": 5}, "gsm8k": {"effective": 5}}, {}, None, 1.0,
                   "x", {})
    assert r["accuracy"] == {"gsm8k": 20.0} and r["mean_accuracy"] == 20.0 and r["stderr"] == {"gsm8k": 10.0}
    other = r["other_protocols"]["gsm8k"]
    assert other["accuracy"] == 40.0 and other["protocol"] == plan.tasks[1].protocol
    assert other["metrics"]["exact_match,flexible-extract"] == 0.5
    # commonsense: the 8 built-ins, one log-likelihood protocol for all
    cs = plan_suite(OmegaConf.load(TASKS_DIR.parents[2] / "conf" / "eval" / "commonsense.yaml"), [], False, "x")
    assert [t.name for t in cs.tasks] == suite_members("commonsense") and "loglikelihood" in cs.protocol
    assert all(t.protocol == cs.protocol for t in cs.tasks)


def test_offline_math_skips_the_built_in_with_a_note():
    plan = plan_suite(OmegaConf.load(TASKS_DIR.parents[2] / "conf" / "eval" / "math.yaml"), [], False, "math10k")
    assert [t.name for t in plan.tasks] == ["gsm8k"] and plan.tasks[0].n == 1319
    assert "HF_HUB_OFFLINE=1" in plan.skipped["gsm8k"]


def _bad_split():
    return [{"instruction": "q", "input": "", "output": "", "answer": "maybe", "task": "t"}]


BAD_PLAN = {
    "no-data-dir": (dict(suite="commonsense_gen"), r"set eval\.data_dir=DIR"),
    "data-dir-missing": (dict(suite="commonsense_gen", data_dir="/nonexistent/x"), r"is not a folder"),
    "no-test-json": (dict(suite="commonsense_gen", data_dir="{tmp}"), r"boolq/test\.json does not exist"),
    "unknown-task": (dict(suite="math", tasks=["gsm8k", "mmlu"]), r"unknown task\(s\) \['mmlu'\] for eval=math"),
    "offline-commonsense": (dict(suite="commonsense", builtin=None, hub="required"),
                            r"hub is offline \(HF_HUB_OFFLINE=1\); .* eval=commonsense_gen eval\.data_dir=DIR"),
    "bad-answer": (dict(split=_bad_split()), r"record 0 \(t\): answer 'maybe' matches no label family"),
    "no-test-split": (dict(split=[]), r"eval=bundled scores the data's test split, but data=x has none"),
}


@pytest.mark.parametrize("case", list(BAD_PLAN))
def test_bad_eval_input_is_a_user_error(case, tmp_path):
    kw, message = BAD_PLAN[case]
    kw = {k: (v.format(tmp=tmp_path) if isinstance(v, str) else v) for k, v in kw.items()}
    split = kw.pop("split", BundledSuite(n_train_per_task=1, n_val_per_task=1, n_test_per_task=1).load().test)
    with pytest.raises(UserError) as e:
        plan_suite(_ev(**kw), split, True, "x")
    assert re.search(message, str(e.value)) and "\n" not in str(e.value), str(e.value)


def test_wrong_label_in_a_test_file_is_named(tmp_path):
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "test.json").write_text(json.dumps([{"instruction": "q", "output": "", "answer": "option1"}]))
    with pytest.raises(UserError, match=r"boolq/test\.json: record 0 \(boolq\): answer 'option1' is not a "
                                        r"true_false label"):
        plan_suite(_ev(suite="commonsense_gen", tasks=["boolq"], data_dir=str(tmp_path)), [], False, "x")


# --- a user's own lm-eval task folder (eval.include_path) ------------------------------------------------

def write_user_tasks(folder, n=4):
    """What a user who knows lm-eval writes: smt-bench's template copied beside one YAML per task (their
    data read by lm-eval: dataset_path json + data_files), a group of them, and a task of lm-eval's own
    multiple-choice protocol. Returns the records of the generative tasks."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(TASKS_DIR / "_generative.yaml", folder / "_generative.yaml")
    recs = {"my_parity": [{"instruction": f"Is {i} even? Answer format: true/false", "input": "",
                           "output": "", "answer": str(i % 2 == 0).lower()} for i in range(n)],
            "my_sum": [{"instruction": f"What is {i} + {i + 2}?", "answer": str(2 * i + 2)} for i in range(n)]}
    for name, rows in recs.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "parity.yaml").write_text(
        f"include: _generative.yaml\ntask: my_parity\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'my_parity.jsonl'}\nmetadata:\n  version: 1.0\n  family: true_false\n")
    (folder / "sum.yaml").write_text(
        f"include: _generative.yaml\ntask: my_sum\ntask_alias: sum\ndataset_path: json\ndataset_kwargs:\n"
        f"  data_files:\n    test: {folder / 'my_sum.jsonl'}\n")
    (folder / "_mine.yaml").write_text("group: mine\ntask: [my_parity, my_sum]\n")
    (folder / "choice.jsonl").write_text("".join(
        json.dumps({"q": f"{i} is", "choices": ["even", "odd"], "label": i % 2}) + "\n" for i in range(n)))
    (folder / "choice.yaml").write_text(
        f"task: my_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'choice.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
    return recs


def test_a_users_task_folder_is_scored_like_the_shipped_tasks(steered, tmp_path):
    model, tok = steered
    recs = write_user_tasks(tmp_path / "my_tasks")
    ev = _ev(include_path=str(tmp_path / "my_tasks"), tasks=["mine", "addition", "my_choice"], max_examples=9)
    test = BundledSuite(n_train_per_task=1, n_val_per_task=1, n_test_per_task=3).load().test
    plan = plan_suite(ev, test, True, "bundled")
    assert [(t.name, t.lm_name, t.family, t.n) for t in plan.tasks] == [
        ("my_parity", "my_parity", "true_false", 3), ("sum", "my_sum", None, 2), ("addition", "smt_bundled_addition",
                                                                                 "numeric", 2),
        ("my_choice", "my_choice", None, 2)]
    r = evaluate_suite(model, tok, plan, batch_size=8, max_new_tokens=MAX_NEW, keep_samples=True)
    samples = r.pop("samples")
    gen = {"my_parity", "sum", "addition"}
    records = {"my_parity": recs["my_parity"], "sum": recs["my_sum"], "addition": [x for x in test if x["task"] == "addition"]}
    plan.tasks = [t for t in plan.tasks if t.name in gen]
    _check_against_reference(r, [s for s in samples if s["task"] in gen], plan, model, tok, records)
    assert set(r["accuracy"]) == gen and r["include_path"] == str((tmp_path / "my_tasks").resolve())
    other = r["other_protocols"]["my_choice"]  # lm-eval's own protocol: reported apart
    assert other["protocol"].startswith("lm-eval task my_choice (multiple_choice") and other["n"] == 2
    assert other["accuracy"] in (0.0, 50.0, 100.0)
    assert r["lm_eval"]["tasks"] == {"my_parity": "my_parity", "sum": "my_sum", "addition": "smt_bundled_addition",
                                     "my_choice": "my_choice"}


def test_a_task_not_found_or_broken_is_a_user_error(tmp_path):
    write_user_tasks(tmp_path / "my_tasks")
    split = BundledSuite(n_train_per_task=1, n_val_per_task=1, n_test_per_task=1).load().test
    with pytest.raises(UserError, match=r"eval.tasks: unknown task\(s\) \['nope'\] for eval=bundled; choose from "
                                        r"\[.*\], or put the task's lm-eval YAML in a folder and name it: "
                                        r"eval.include_path=.*my_tasks"):
        plan_suite(_ev(include_path=str(tmp_path / "my_tasks"), tasks=["my_parity", "nope"]), split, True, "x")
    with pytest.raises(UserError, match=r"eval.include_path=/nonexistent is not a folder"):
        plan_suite(_ev(include_path="/nonexistent", tasks=["my_parity"]), split, True, "x")
    (tmp_path / "my_tasks" / "my_parity.jsonl").write_text(json.dumps({"instruction": "q", "answer": "option1"}) + "\n")
    with pytest.raises(UserError, match=r"record 0 \(my_parity\): answer 'option1' is not a true_false label"):
        plan_suite(_ev(include_path=str(tmp_path / "my_tasks"), tasks=["my_parity"]), split, True, "x")
    (tmp_path / "my_tasks" / "my_sum.jsonl").unlink()
    with pytest.raises(UserError, match=r"task my_sum .* does not load in lm-eval: .*; fix its YAML or data files"):
        plan_suite(_ev(include_path=str(tmp_path / "my_tasks"), tasks=["my_sum"]), split, True, "x")
