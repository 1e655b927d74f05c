"""Evaluation suites (conf/eval/): which lm-eval tasks a run scores, checked before training.

The tasks are lm-eval task YAMLs, found by scanning folders: smt-bench's own under
smt_bench/evaluation/tasks/ and the user's folder `eval.include_path` (lm-eval's
`TaskManager(include_path=...)`). A suite is the group `smt_<suite>` of smt-bench's folder (e.g.
tasks/math/_math.yaml): its member tasks, in order. What smt-bench adds to a task is in its YAML:
`dataset_kwargs` of smt-bench's document loader (`source`, `name`: lm_tasks.records_for) and
`metadata.family`, the label family every gold answer must belong to.

`plan_suite` runs in the preflight (run.Prepared): it resolves the tasks (eval.tasks names the suite's
tasks by their names in the result, or any task of eval.include_path), reads and checks every local
test file, caps the evaluation, and checks that the hub is reachable where lm-eval's built-in tasks
are asked for. Bad input raises UserError there, before any weights load.
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
from collections.abc import Mapping
from typing import cast
from urllib.parse import urlparse

import yaml

from ..errors import UserError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
GROUP_PREFIX = "smt_"     # suite S is the group smt_S of TASKS_DIR
LOADER = "smt_bench.evaluation.lm_tasks.load_docs"
GENERATIVE_FILTER = "first-match"  # the filter of the generative protocol (tasks/_generative.yaml)
# lm-eval's headline metric of a built-in task (result key "metric,filter"); default acc,none
BUILTIN_METRIC = {"gsm8k": "exact_match,strict-match"}


def _suite_groups() -> dict[str, Path]:
    """suite -> its group file (tasks/*/_*.yaml holding `group: smt_<suite>`)."""
    out = {}
    for p in sorted(TASKS_DIR.glob("*/_*.yaml")):
        group = (yaml.safe_load(p.read_text(encoding="utf-8")) or {}).get("group", "")
        if group.startswith(GROUP_PREFIX):
            out[group[len(GROUP_PREFIX):]] = p
    return out


SUITES = tuple(sorted(_suite_groups()))


def suite_members(suite: str) -> list[str]:
    """The task names of a suite's group, in order (lm-eval names; eval=commonsense: built-ins)."""
    return list(yaml.safe_load(_suite_groups()[suite].read_text(encoding="utf-8"))["task"])


def split_name(name: str) -> str:
    """The lm-eval name of a test-split task that has no shipped file (a data=local test file)."""
    return "smt_split_" + re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


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


# --- the task folders ---------------------------------------------------------------------------------

def task_manager(include_path: str | None = None, extra: list[str] | None = None, metadata: dict | None = None):
    """lm-eval's TaskManager over smt-bench's task folder, the user's (eval.include_path) and `extra`
    folders (later folders win on a name clash, as in lm-eval)."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([str(include_path)] if include_path else []) + list(extra or [])
    return TaskManager(include_path=paths, include_defaults=False, metadata=metadata)


def _is_loader(value) -> bool:
    return isinstance(value, str) and value.endswith(LOADER)


@dataclass
class TaskSpec:
    name: str                 # the name in the result file (the task's task_alias, else its lm-eval name)
    lm_name: str              # the lm-eval task name
    protocol: str
    builtin: bool = False
    family: str | None = None  # metadata.family: the label family of every gold answer
    source: str | None = None  # smt-bench's document loader: dataset_kwargs.source (None: lm-eval loads)
    doc_name: str | None = None  # its dataset_kwargs.name
    metric: str = "acc,first-match"  # the result key of the headline metric ("metric,filter")
    n: int | None = None      # documents evaluated (None: decided by lm-eval, built-ins)


def _spec(entry, gen: str) -> TaskSpec:
    cfg = entry.cfg or {}
    kwargs = cfg.get("dataset_kwargs") or {}
    meta = cast(dict, cfg.get("metadata")) if isinstance(cfg.get("metadata"), dict) else {}
    filters = [f.get("name") for f in cfg.get("filter_list") or [] if isinstance(f, dict)]
    spec = TaskSpec(cfg.get("task_alias") or entry.name, entry.name, gen, family=meta.get("family"))
    if _is_loader(cfg.get("custom_dataset")):
        spec.source, spec.doc_name = kwargs.get("source"), kwargs.get("name")
    if GENERATIVE_FILTER not in filters:  # not smt-bench's protocol: the task's own, reported apart
        metric = ((cfg.get("metric_list") or [{}])[0] or {}).get("metric", "acc")
        filt = filters[0] if filters else "none"
        spec.metric = f"{metric},{filt}"
        spec.protocol = (f"lm-eval task {entry.name} ({cfg.get('output_type', 'generate_until')}, "
                         f"{cfg.get('num_fewshot') or 0}-shot, metric {metric})")
    return spec


# --- the plan ----------------------------------------------------------------------------------------

@dataclass
class SuitePlan:
    suite: str
    tasks: list[TaskSpec]
    protocol: str             # the headline protocol: accuracy/mean_accuracy are all of this one
    data_dir: str | None = None
    include_path: str | None = None  # the user's task folder (eval.include_path)
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


def _round_robin(sizes: dict[str, int | None], total: int | None) -> Mapping[str, int | None]:
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
    from .extract import family_of

    if not recs:
        raise UserError(f"{where} has no test records; point eval.data_dir at a folder with <name>/test.json files")
    for i, r in enumerate(recs):
        if "answer" not in r:
            raise UserError(f"{where}: record {i} ({name}) has no `answer` field, which the generative protocol "
                            f"scores against; add it, or use a task YAML of your own protocol")
        try:
            fam = family_of(str(r["answer"]))
        except ValueError as e:
            raise UserError(f"{where}: record {i} ({name}): {e}; fix the test file") from None
        if family and fam != family:
            raise UserError(f"{where}: record {i} ({name}): answer {r['answer']!r} is not a {family} label; "
                            f"fix the test file")


def _lm_eval_docs(tm, spec: TaskSpec, where: str) -> list[dict]:
    """The documents lm-eval gives a task that reads its own data (a user's dataset_path/data_files)."""
    try:
        task = tm.load([spec.lm_name])["tasks"][spec.lm_name]
        return list(task.eval_docs)
    except Exception as e:  # a bad YAML or data file: the user's to fix
        msg = " ".join(str(e).split()) or e.__class__.__name__
        raise UserError(f"eval.tasks: task {spec.lm_name} ({where}) does not load in lm-eval: {msg}; fix its "
                        f"YAML or data files") from None


def _doc_name(spec: TaskSpec) -> str:
    """dataset_kwargs.name of a task read by smt-bench's loader (a YAML of one's own may lack it)."""
    if spec.doc_name is None:
        raise UserError(f"task {spec.lm_name}: dataset_kwargs.source={spec.source} needs dataset_kwargs.name, "
                        f"the documents to read (docs/evaluation.md)")
    return spec.doc_name


def plan_suite(ev, test_split: list[dict], data_is_bundled: bool, data_name: str) -> SuitePlan:
    """Resolve and check the suite of eval config `ev` (raises UserError on bad input)."""
    from .lm_tasks import records_for

    # the values themselves (suite name, counts >= 1, ...) are checked by the config schema (smt_bench/schema/)
    suite = ev.get("suite")
    max_new, beams, cap = ev.get("max_new_tokens"), ev.get("num_beams", 1), ev.get("max_examples")
    data_dir, include_path = ev.get("data_dir"), ev.get("include_path")
    gen = generative_protocol(max_new, beams)
    plan = SuitePlan(suite=suite, tasks=[], protocol=gen, data_dir=None)
    if include_path:
        if not Path(include_path).is_dir():
            raise UserError(f"eval.include_path={include_path} is not a folder; point it at the folder of your "
                            f"lm-eval task YAMLs")
        plan.include_path = str(Path(include_path).resolve())
    tm = task_manager(plan.include_path)
    index = tm.task_index
    members = [m for m in suite_members(suite) if m in index]  # the rest: lm-eval built-ins (eval=commonsense)
    suite_specs = {s.name: s for s in (_spec(index[m], gen) for m in members)}

    by_task: dict[str, list[dict]] = defaultdict(list)
    if suite == "bundled":
        for r in test_split:
            by_task[r["task"]].append(r)
        own = list(by_task)
    else:
        own = list(suite_specs)
    requested = ev.get("tasks")
    if requested is None:
        if suite == "bundled" and not test_split:
            raise UserError(f"eval=bundled scores the data's test split, but data={data_name} has none; use "
                            f"eval=commonsense_gen or eval=math with eval.data_dir=DIR (the LLM-Adapters "
                            f"dataset/ folder), or data.test_path=FILE, or eval.enabled=false")
        requested = own
    requested = [requested] if isinstance(requested, str) else list(requested)

    specs: list[TaskSpec] = []
    unknown = []
    for name in requested:
        if name in own and suite == "bundled":
            shipped = suite_specs.get(name) if data_is_bundled else None
            spec = shipped or TaskSpec(name, split_name(name), gen, source="split", doc_name=name)
            specs.append(spec)
            plan.split[name] = by_task[name]
            if shipped is None:
                plan.generated.append(name)
        elif name in own:
            specs.append(suite_specs[name])
        elif name in index and index[name].kind.name in ("TASK", "GROUP", "TAG"):
            entry = index[name]
            if entry.kind.name == "TASK":
                specs.append(_spec(entry, gen))
            else:  # a group or tag of the user's: its tasks
                specs += [_spec(index[t], gen) for t in tm.load([name])["tasks"] if t in index]
        else:
            unknown.append(name)
    if unknown:
        where = f"eval.include_path={include_path}" if include_path else "eval.include_path (unset)"
        raise UserError(f"eval.tasks: unknown task(s) {unknown} for eval={suite}; choose from {own}, or put the "
                        f"task's lm-eval YAML in a folder and name it: {where}")
    if len({s.name for s in specs}) < len(specs):
        raise UserError(f"eval.tasks: two tasks report under one name ({[s.name for s in specs]}); give one a "
                        f"different task_alias")

    if any(s.source == "llm_adapters" for s in specs):
        needs_dir = [s.name for s in specs if s.source == "llm_adapters"]
        if not data_dir:
            raise UserError(f"eval={suite} reads LLM-Adapters test files for {', '.join(needs_dir)}: set "
                            f"eval.data_dir=DIR, the folder with <name>/test.json (LLM-Adapters' dataset/)")
        if not Path(data_dir).is_dir():
            raise UserError(f"eval.data_dir={data_dir} is not a folder; point it at LLM-Adapters' dataset/ "
                            f"(with <name>/test.json)")
        plan.data_dir = str(Path(data_dir).resolve())
    local: dict[str, tuple[TaskSpec, list[dict]]] = {}
    for spec in specs:
        if spec.source == "split" and spec.name in plan.split:
            recs = plan.split[spec.name]
            where = f"test split of data={data_name}"
        elif spec.source == "llm_adapters":
            assert plan.data_dir is not None  # set above: a task reads LLM-Adapters files
            path = Path(plan.data_dir) / _doc_name(spec) / "test.json"
            if not path.is_file():
                raise UserError(f"{path} does not exist: eval={suite} task {spec.name} needs {spec.doc_name}/test.json "
                                f"under eval.data_dir (or drop it: eval.tasks=[...])")
            where = str(path)
            recs = records_for(spec.source, _doc_name(spec), data_dir=plan.data_dir)
        elif spec.source:
            where = f"the {spec.name} test set"
            recs = records_for(spec.source, _doc_name(spec), data_dir=plan.data_dir)
        else:  # a task that names its own data (dataset_path, data_files): lm-eval reads it
            where = f"task {spec.lm_name} of {index[spec.lm_name].yaml_path}"
            recs = _lm_eval_docs(tm, spec, where)
        if spec.metric == "acc,first-match":
            _check_records(spec.name, recs, spec.family, where)
        elif not recs:
            raise UserError(f"{where} has no documents; fix its data files")
        local[spec.name] = (spec, recs)

    builtin_names = list(ev.get("builtin") or [])
    if suite == "commonsense" and ev.get("builtin") is None:
        builtin_names = [m for m in suite_members(suite) if m not in index]

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
            plan.max_docs[name] = cast(int, take[name])  # with a cap, every count is a number
        plan.tasks.append(spec)
    for b in builtins:
        plan.tasks.append(TaskSpec(b, b, builtin_protocol(b), builtin=True, metric=BUILTIN_METRIC.get(b, "acc,none")))
    if builtins and cap:
        plan.builtin_limit = max(cast(int, take[f"lm-eval:{b}"]) for b in builtins) or 1
    if not plan.tasks:
        raise UserError(f"eval={suite} has no task to score (eval.tasks / eval.builtin are empty"
                        + (", and the built-ins were dropped: hub offline" if plan.skipped else "") + ")")
    if not any(t.protocol == gen for t in plan.tasks):
        plan.protocol = plan.tasks[0].protocol if suite != "commonsense" else builtin_protocol("boolq")
    return plan


def split_task_yaml(name: str) -> str:
    """The YAML of a test-split task that has no shipped file (a data=local test file)."""
    return (f"include: {TASKS_DIR / '_generative.yaml'}\ntask: {split_name(name)}\ntask_alias: {json.dumps(name)}\n"
            f"custom_dataset: !function {LOADER}\ndataset_kwargs:\n  source: split\n  name: {json.dumps(name)}\n")


def data_dir_sets() -> dict[str, str | None]:
    """name -> label family of every test set smt-bench's tasks read from eval.data_dir (<name>/test.json)."""
    out = {}
    for entry in task_manager().task_index.values():
        cfg = entry.cfg or {}
        kwargs = cfg.get("dataset_kwargs") or {}
        if _is_loader(cfg.get("custom_dataset")) and kwargs.get("source") == "llm_adapters":
            out[kwargs["name"]] = (cfg.get("metadata") or {}).get("family")
    return out
