"""Data: the bundled suite, the LLM-Adapters record reader, prompt masking and batching, and the
first-match answer extractor of the generative protocol."""
import json
import re

import pytest

from smt_bench.data.batches import IGNORE, BatchStream, collate, encode
from smt_bench.data.bundled import TASKS, BundledSuite
from smt_bench.data.records import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, LocalJSON, prompt_of, read_records
from smt_bench.errors import UserError
from smt_bench.evaluation.extract import extract, family_of, is_correct
from smt_bench.evaluation.generate import capped

# --- the bundled suite --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suite():
    return BundledSuite().load()


def test_bundled_suite_is_deterministic(suite):
    again = BundledSuite().load()
    assert (again.train, again.val, again.test) == (suite.train, suite.val, suite.test)
    other = BundledSuite(seed=99).load()
    assert other.test != suite.test


def test_bundled_suite_sizes_and_disjoint_splits(suite):
    for split, n in ((suite.train, 400), (suite.val, 8), (suite.test, 20)):
        counts = {t: sum(r["task"] == t for r in split) for t in TASKS}
        assert counts == {t: n for t in TASKS}
    instr = {name: {r["instruction"] for r in getattr(suite, name)} for name in ("train", "val", "test")}
    assert len(instr["train"]) == len(suite.train)  # no duplicates inside train either
    assert not instr["train"] & instr["test"]
    assert not instr["train"] & instr["val"]
    assert not instr["val"] & instr["test"]
    # train is shuffled across tasks, test is ordered by task
    assert len({r["task"] for r in suite.train[:30]}) > 1
    assert [r["task"] for r in suite.test[::20]] == list(TASKS)


def test_bundled_suite_has_every_answer_style(suite):
    families = {family_of(r["answer"]) for r in suite.test}
    assert families == {"true_false", "answer", "option", "ending", "solution", "numeric"}
    for r in suite.train + suite.test:
        assert set(r) == {"instruction", "input", "output", "answer", "task"}
        assert r["output"] == f"the correct answer is {r['answer']}" and is_correct(r["output"], r["answer"])


def _solve(r):
    """Recompute the gold answer from the instruction text alone."""
    text, task = r["instruction"], r["task"]
    if task == "addition":
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", text).groups())
        return str(a + b)
    if task == "arith_check":
        a, b, c = map(int, re.search(r"(\d+) \+ (\d+) = (\d+)", text).groups())
        return "true" if a + b == c else "false"
    if task == "largest":
        nums = [int(x) for x in re.findall(r"Answer\d: (\d+)", text)]
        return f"answer{nums.index(max(nums)) + 1}"
    if task == "alphabetical":
        words = re.findall(r"Option\d: (\w+)", text)
        return f"option{words.index(min(words)) + 1}"
    if task == "sequence":
        seq = [int(x) for x in re.search(r"sequence ([\d, ]+)\?", text).group(1).split(", ")]
        ends = [int(x) for x in re.findall(r"Ending\d: (\d+)", text)]
        return f"ending{ends.index(2 * seq[-1] - seq[-2]) + 1}"
    if task == "vowels":
        word = re.search(r"word '(\w+)'", text).group(1)
        sols = [int(x) for x in re.findall(r"Solution\d: (\d+)", text)]
        return f"solution{sols.index(sum(ch in 'aeiou' for ch in word)) + 1}"
    raise AssertionError(task)


def test_bundled_answers_are_right(suite):
    for r in suite.test + suite.train[:300]:
        assert _solve(r) == r["answer"], r
    # both labels of two-way tasks occur (a model cannot score by always answering one)
    for task in ("arith_check", "alphabetical", "vowels"):
        assert len({r["answer"] for r in suite.test if r["task"] == task}) == 2


# --- the LLM-Adapters record reader ---------------------------------------------------------------

RECORDS = [
    {"instruction": "Please answer the following question with true or false. Is the sky green?",
     "input": "", "output": "the correct answer is false", "answer": "false"},
    {"instruction": "Solve.", "input": "2 + 3", "output": "5", "answer": "5"},
    {"instruction": "Pick one.", "input": "", "output": "option2", "answer": "option2", "task": "x"},
]


def test_reader_accepts_a_json_list_and_json_lines(tmp_path):
    lst = tmp_path / "train.json"
    lst.write_text(json.dumps(RECORDS, indent=2))
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n\n" + json.dumps(RECORDS[2]) + "\n")
    assert read_records(lst) == RECORDS
    assert read_records(jsonl, need_answer=True) == RECORDS


@pytest.mark.parametrize("content,where,what", [
    ('{"instruction": "a", "output": "b"}\n{"output": "b"}\n', "line 2", "field 'instruction' missing"),
    ('{"instruction": "a", "output": "b"}\n\n[1, 2]\n', "line 3", "record is not a JSON object"),
    ('{"instruction": "a", "output": 3}\n', "line 1", "field 'output' missing or not a non-empty string"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"\n', "line 2", "malformed JSON"),
    ('[{"instruction": "a", "output": "b"}, {"instruction": " ", "output": "b"}]', "record 1", "field 'instruction'"),
    ('[\n {"instruction": "a",\n  "output": "b",,\n}]', "line 3 column", "malformed JSON"),
    ("\n\n", "whole file", "no records"),
    ("[]", "whole file", "no records"),
])
def test_reader_names_the_bad_line(tmp_path, content, where, what):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(UserError) as e:
        read_records(p)
    assert str(e.value).startswith(f"data file {p}: {where}")
    assert what in str(e.value)


def test_reader_requires_answers_for_test_files(tmp_path):
    p = tmp_path / "test.json"
    p.write_text(json.dumps([{"instruction": "a", "output": "true"}]))
    assert read_records(p)
    with pytest.raises(UserError, match="record 0: field 'answer' missing"):
        read_records(p, need_answer=True)


def test_local_json_splits(tmp_path):
    train = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(20)]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "boolq.json").write_text(json.dumps(RECORDS[:1] + RECORDS[2:]))
    s = LocalJSON(str(tmp_path / "train.json"), str(tmp_path / "boolq.json"), val_size=5, max_train=10).load()
    assert len(s.val) == 5 and len(s.train) == 10
    assert not {r["instruction"] for r in s.val} & {r["instruction"] for r in s.train}
    assert LocalJSON(str(tmp_path / "train.json"), val_size=5).load().val == s.val  # split_seed fixed
    assert [r["task"] for r in s.test] == ["boolq", "x"]  # file stem unless the record names its task
    with pytest.raises(UserError, match="all used for validation"):
        LocalJSON(str(tmp_path / "train.json"), val_size=20).load()


# --- prompts, masking, batches ----------------------------------------------------------------------

def test_alpaca_prompts():
    assert prompt_of(RECORDS[0]) == PROMPT_NO_INPUT.format(instruction=RECORDS[0]["instruction"])
    assert prompt_of(RECORDS[0]).endswith("Is the sky green?\n\n### Response:\n")
    p = prompt_of(RECORDS[1])
    assert p == PROMPT_WITH_INPUT.format(instruction="Solve.", input="2 + 3")
    assert "### Instruction:\nSolve.\n\n### Input:\n2 + 3\n\n### Response:\n" in p


@pytest.mark.parametrize("rec", RECORDS[:2])
def test_prompt_tokens_are_masked_and_the_response_plus_eos_labelled(rec, tokenizer):
    prompt = tokenizer(prompt_of(rec), add_special_tokens=False)["input_ids"]
    (ex,) = encode([rec], tokenizer, max_len=512, train_on_inputs=False)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) > len(prompt)
    assert ids[:len(prompt)] == prompt
    assert labels[:len(prompt)] == [IGNORE] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):]
    assert ids[-1] == labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(labels[len(prompt):-1]) == rec["output"]
    (full,) = encode([rec], tokenizer, max_len=512, train_on_inputs=True)
    assert full["input_ids"] == ids and full["labels"] == ids


def test_truncation_keeps_only_records_with_a_label(tokenizer):
    rec = RECORDS[0]
    n_prompt = len(tokenizer(prompt_of(rec), add_special_tokens=False)["input_ids"])
    (cut,) = encode([rec], tokenizer, max_len=n_prompt + 2, train_on_inputs=False)
    assert len(cut["input_ids"]) == n_prompt + 2
    assert [l != IGNORE for l in cut["labels"]] == [False] * n_prompt + [True, True]
    # the response cut off entirely: no label to learn from (a batch of these has a NaN loss)
    assert encode([rec], tokenizer, max_len=n_prompt, train_on_inputs=False) == []
    assert len(encode([rec], tokenizer, max_len=n_prompt, train_on_inputs=True)) == 1


def test_collate_right_pads_and_masks(tokenizer):
    exs = encode(RECORDS, tokenizer, max_len=512, train_on_inputs=False)
    b = collate(exs, pad_id=tokenizer.pad_token_id)
    lens = [len(e["input_ids"]) for e in exs]
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, max(lens))
    for i, n in enumerate(lens):
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (max(lens) - n)
        assert b["input_ids"][i, :n].tolist() == exs[i]["input_ids"]
        assert (b["input_ids"][i, n:] == tokenizer.pad_token_id).all() and (b["labels"][i, n:] == IGNORE).all()


def test_batch_stream_is_seeded_and_covers_each_epoch():
    exs = [{"input_ids": [i, i], "labels": [i, i]} for i in range(10)]

    def firsts(seed, n):
        s = BatchStream(exs, 3, pad_id=0, seed=seed)
        return [next(s)["input_ids"][:, 0].tolist() for _ in range(n)]

    a = firsts(0, 6)
    assert a == firsts(0, 6) and a != firsts(1, 6)
    epoch = sum(a[:3], [])  # 3 full batches per epoch of 10 (the remainder is dropped)
    assert len(set(epoch)) == 9
    with pytest.raises(UserError, match="only 2 training examples .* train.batch_size=3"):
        next(BatchStream(exs[:2], 3, pad_id=0, seed=0))


def test_capped_eval_keeps_every_task():
    recs = [{"task": t, "i": i} for t in "abc" for i in range(4)]
    assert [(r["task"], r["i"]) for r in capped(recs, 5)] == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1)]
    assert capped(recs, None) == recs and len(capped(recs, 100)) == 12


# --- the first-match extractor ------------------------------------------------------------------

EXTRACT = [
    # (response, family, expected)
    ("the correct answer is true", "true_false", "true"),
    ("false. Well, maybe true", "true_false", "false"),              # first match wins
    ("TRUE!", "true_false", "true"),                                 # case-insensitive
    ("that is untrue", "true_false", None),                          # not inside another word
    ("untrue, so false", "true_false", "false"),
    ("truefalse", "true_false", None),
    ("", "true_false", None),
    ("options1 or option2", "option", "option2"),
    ("option3", "option", None),                                     # outside the family
    ("Option1 and option2", "option", "option1"),
    ("answer10 then answer6, finally answer3 or answer1", "answer", "answer3"),
    ("ANSWER5", "answer", "answer5"),
    ("ending4 (not ending2)", "ending", "ending4"),
    ("ending0 ending5", "ending", None),
    ("solution2solution1 then solution1", "solution", "solution1"),
    ("I pick solution2.", "solution", "solution2"),
    ("the answer is option1", "true_false", None),                   # another family's label
    ("12 apples and 15 pears", "numeric", "15"),                     # numeric: the last number
    ("total: 1,234", "numeric", "1234"),
    ("it is -3.5 degrees", "numeric", "-3.5"),
    ("answer 42.", "numeric", "42"),
    ("no number here", "numeric", None),
]


@pytest.mark.parametrize("response,family,expected", EXTRACT)
def test_extract_first_match(response, family, expected):
    assert extract(response, family) == expected


@pytest.mark.parametrize("response,answer,ok", [
    ("the correct answer is true", "true", True),
    ("the correct answer is false, not true", "true", False),
    ("Answer2", "answer2", True),
    ("answer1 answer2", "answer2", False),
    ("that makes 1,000", "1000", True),
    ("42.0", "42", True),
    ("41.5", "42", False),
    ("nothing", "option1", False),
])
def test_is_correct(response, answer, ok):
    assert is_correct(response, answer) is ok


def test_family_of():
    assert [family_of(a) for a in ("true", "False", "solution2", "answer5", "ending1", "option2", "17", "-2.5")] == \
        ["true_false", "true_false", "solution", "answer", "ending", "option", "numeric", "numeric"]
    for bad in ("answer6", "ending5", "option3", "maybe", ""):
        with pytest.raises(ValueError, match="matches no label family"):
            family_of(bad)
