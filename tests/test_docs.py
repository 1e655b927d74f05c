"""Docs that cannot rot: every command the docs show composes and passes the checks before training, every
link and repository path they name exists, and docs/config.md's groups table is conf/.

Which files: README.md, docs/**/*.md and results/**/README.md.

Commands (fenced code blocks, `\\` continuations joined, and inline code spans):
- `python -m smt_bench ...` and `torchrun ... -m smt_bench ...`: `smt_bench.__main__.preflight(argv)` in
  process, as `python -m smt_bench` runs it before the first job trains (configs, budgets on meta-device
  shapes, data files, a test write in results.dir), from a scratch working directory. `--help` and
  `--cfg` commands compose only. torchrun's own options go through torchrun's parser.
- `python -m smt_bench.analysis ...` and `python -m smt_bench.budget_table ...`: their argument parsers;
  `python -m smt_bench.bench ...`: its Hydra config composes and passes the bench's own checks.
- any other `python -m smt_bench.<module>` and `python scripts/<file>`: the module or file exists. A tool
  named without arguments (`python -m smt_bench.analysis` in prose) is checked as a module only.
- Spans written with `<placeholder>` are schematic and not run.

The user's own files. Paths under /data/ and /scratch/$USER/, and the word DIR, stand for the reader's files
(docs/README.md says so). They are replaced by a scratch folder in which the test writes what the key
needs: data.path (a JSON file of LLM-Adapters records, or a folder with commonsense_170k.json and
math_10k.json), data.test_path (a test file), eval.data_dir (every LLM-Adapters test set the suites read).
A placeholder under any other key fails the test.

Offline. The tests run without the Hugging Face hub, and two things need it. A hub model's config (model=
llama-7b, llama2-7b, llama3-8b) is taken from the random-weight model of the same architecture
(HUB_ARCHITECTURE), so the rest of such a command (budgets, data, evaluation, results folder) is still
validated; lm-eval's built-in tasks (eval=commonsense) fetch their data: a command with them passes only if
its preflight fails with exactly the offline line OFFLINE allows. test_the_offline_reasons_are_what_the_
preflight_prints checks that these are the lines the preflight prints for each.

Cost (the file runs in about 25 s on 2 cores). Sweeps over seeds are checked at their first seed (the others
are checked to be valid seeds). A peft tuner's trainable count on a deep model is its count on a 1-layer copy
times the depth, checked once per tuner and model against the 2-layer copy (every shipped tuner adds the
same count to every layer; tests/test_budget.py counts whole models). Each model's meta-device shapes are
built once, and each choice of config groups is composed once (ComposeOnce, checked against a full
composition once per command).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import io
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import smt_bench.__main__ as app_main
from smt_bench import models

PRETRAINED_HF_CONFIG = models.Pretrained.hf_config

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
DOCS = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md"), *(REPO / "results").rglob("README.md")])
# the repository's tracked top-level entries: a backticked path starting with one of them must exist
TOP_LEVEL = (".ci", "README.md", "conf", "docs", "kernels", "pyproject.toml", "requirements", "results", "scripts",
             "smt_bench", "tests")
OUTPUT_PATHS = ("results/gpu",)  # written by scripts/gpu_check.sh on a GPU machine; not committed yet
USER_GROUPS = ("method", "budget", "model", "data", "train", "eval", "logger", "recipe", "experiment",
               "hydra/launcher")
INTERNAL = ("recipe_method", "bench", "hydra")  # conf/ folders chosen for the user, or another app's
HUB_ARCHITECTURE = {"huggyllama/llama-7b": "llama-7b-random", "meta-llama/Llama-2-7b-hf": "llama-7b-random",
                    "meta-llama/Meta-Llama-3-8B": "llama3-8b-random"}  # same shapes, random weights
OFFLINE = {
    "hub model": re.compile(r"(sweep job .*: )?cannot load model '(?P<id>[^']+)' \(hub id, and the hub is unreachable "
                            r"or has no such model; OSError\): download it where a hub is reachable and set "
                            r"model\.source\.path_or_id=/path/to/hf_dir"),
    "lm-eval built-ins": re.compile(r"(sweep job .*: )?eval=commonsense scores lm-eval's built-in tasks \(.*\), whose "
                                    r"data comes from the Hugging Face hub, but the hub is offline "
                                    r"\(HF_HUB_OFFLINE=1\); run where the hub is reachable, .*"),
}


# --- reading the docs -----------------------------------------------------------------------------------
def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def code_spans(text: str) -> list[str]:
    """Inline code spans of the prose (a span may run over a line break), whitespace collapsed."""
    return [" ".join(m.group(1).split()) for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose(text))]


COMMAND = re.compile(r"^(?:\S*python3?|torchrun)\s")


def commands(text: str) -> list[str]:
    """Every shell command of the fenced bash blocks (continuations joined, `a && b` split) and every
    inline span that is a command."""
    out = []
    for lang, body in FENCE.findall(text):
        if lang.strip() not in ("", "bash", "sh", "shell", "console"):
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = line.strip()
            m = re.fullmatch(r"for (\w+) in ([^;]+); do (.+); done", line)
            if m:  # a shell loop: its command at the first value
                line = m.group(3).replace(f"${m.group(1)}", m.group(2).split()[0])
            for part in line.split("&&"):
                part = part.strip()
                if COMMAND.match(part) and ("-m smt_bench" in part or " scripts/" in part):
                    out.append(part)
    out += [s for s in code_spans(text) if COMMAND.match(s) and ("smt_bench" in s or "scripts/" in s)]
    return out


def all_commands() -> list[tuple[str, str]]:
    return [(str(d.relative_to(REPO)), c) for d in DOCS for c in commands(_read(d))]


# --- the user's files -------------------------------------------------------------------------------------
def _records(answer: str, n: int) -> list[dict]:
    return [{"instruction": f"Question {i}? Answer format: {answer}", "input": "", "output": f"the answer is {answer}",
             "answer": answer} for i in range(n)]


FIRST_LABEL = {"true_false": "true", "solution": "solution1", "answer": "answer1", "ending": "ending1",
               "option": "option1", "numeric": "3", "letter": "A"}


def _write_test_sets(folder: Path) -> None:
    from smt_bench.evaluation.suites import data_dir_sets

    for name, fam in data_dir_sets().items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "test.json").write_text(json.dumps(_records(FIRST_LABEL[fam], 4)))


def _materialize(key: str, path: Path) -> None:
    if key == "data.path" and path.suffix not in (".json", ".jsonl"):  # the folder LLM-Adapters' training files are in
        path.mkdir(parents=True, exist_ok=True)
        for name in ("commonsense_170k.json", "math_10k.json"):
            if not (path / name).exists():
                (path / name).write_text(json.dumps(_records("true", 200)))
        return
    if path.exists():
        return
    if key == "data.path":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_records("true", 200)))
    elif key == "data.test_path":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_records("true", 8)))
    elif key == "eval.data_dir":
        _write_test_sets(path)
    elif key not in ("results.dir", "hydra.launcher.setup"):
        raise DocError(f"a placeholder path under {key}=, which this test cannot make")


def substitute(cmd: str, scratch: Path) -> str:
    """The command with the user's paths replaced by the scratch folder."""
    cmd = cmd.replace("/scratch/$USER", str(scratch / "scratch"))
    cmd = re.sub(r"(?<![\w/.])/data/", f"{scratch}/data/", cmd)
    return re.sub(r"(?<=[=\s])DIR(?=[/\s]|$)", f"{scratch}/DIR", cmd)


def materialize(argv: list[str], scratch: Path) -> None:
    for arg in argv:
        key, _, value = arg.partition("=")
        if value.startswith(str(scratch)) and "," not in value:
            _materialize(key, Path(value))


# --- checking a command -----------------------------------------------------------------------------------
class DocError(Exception):
    def __init__(self, message: str, line: str | None = None):
        super().__init__(message)
        self.line = line  # the preflight's one-line error, without its "smt-bench: error: " prefix


@dataclass
class Checked:
    jobs: int = 0
    offline: str | None = None  # the OFFLINE reason met, if any


def _collapse_seeds(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        if a.startswith("seed=") and "," in a:
            seeds = a[5:].split(",")
            if not all(s.isdigit() and int(s) < 2 ** 32 for s in seeds):
                raise DocError(f"{a}: seeds must be integers in [0, 2^32)")
            a = f"seed={seeds[0]}"
        out.append(a)
    return out


def _preflight(argv: list[str]) -> tuple[int, str]:
    """(number of jobs, stderr) of the preflight; exit status and its stderr line on bad input."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            jobs = app_main.preflight(argv)
        except SystemExit as e:
            lines = [l for l in err.getvalue().splitlines() if l.strip()]
            last = lines[-1] if lines else "(nothing on stderr)"
            raise DocError(f"exit {e.code}: {last}", last.removeprefix("smt-bench: error: ")) from None
    return len(jobs.jobs), err.getvalue()


HUB_USED: list[str] = []  # the hub models the command being checked named


@functools.lru_cache(maxsize=None)
def _architecture_of(hub_id: str):
    from hydra.utils import instantiate

    return instantiate(app_main.compose_config([f"model={HUB_ARCHITECTURE[hub_id]}"]).model.source).hf_config()


def check_app(argv: list[str], monkeypatch) -> Checked:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            app_main.check_group_choices(argv, app_main.CONF)
        except SystemExit:
            raise DocError(err.getvalue().strip()) from None
    if any(a in ("--help", "-h") for a in argv):
        help_text = getattr(app_main, "help_text", None)
        assert help_text is None or "docs/config.md" in help_text()
        return Checked()
    if any(a.startswith("--cfg") or a == "-c" for a in argv):
        rest = [a for i, a in enumerate(argv) if not a.startswith("-") and not (i and argv[i - 1] in ("--cfg", "-c"))]
        try:
            app_main.compose_config(rest)
        except Exception as e:
            raise DocError(f"does not compose: {str(e).splitlines()[0]}") from None
        return Checked()
    argv = _collapse_seeds(argv)
    HUB_USED.clear()
    if isinstance(app_main.compose_config, ComposeOnce):
        app_main.compose_config.verify = True
    try:
        jobs = _preflight(argv)[0]
    except DocError as e:
        reason = next((name for name, pat in OFFLINE.items() if e.line and pat.fullmatch(e.line)), None)
        if reason is None:
            raise
        return Checked(offline=reason)
    return Checked(jobs=jobs, offline="hub model" if HUB_USED else None)


def check_torchrun(argv: list[str], monkeypatch) -> Checked:
    from torch.distributed.run import get_args_parser

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        raise DocError("torchrun does not accept these options") from None
    if not args.module or args.training_script != "smt_bench":
        raise DocError("a torchrun command here must run -m smt_bench")
    return check_app(list(args.training_script_args), monkeypatch)


def check_analysis(argv: list[str]) -> Checked:
    from smt_bench.analysis.__main__ import parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            parser().parse_args(argv)
        except SystemExit:
            raise DocError(err.getvalue().strip()) from None
    return Checked()


def check_budget_table(argv: list[str], monkeypatch) -> Checked:
    """Runs budget_table.main up to its first plan: the arguments parsed."""
    from smt_bench import budget_table

    class Parsed(Exception):
        pass

    def first_plan(model, method, fraction):
        for group, name in (("model", model), ("method", method)):
            if not (CONF / group / f"{name}.yaml").is_file():
                raise DocError(f"--{group}s: no {group} {name!r} in conf/{group}/")
        raise Parsed

    monkeypatch.setattr(budget_table, "plan_row", first_plan)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            budget_table.main(argv)
        except Parsed:
            return Checked()
        except SystemExit:
            raise DocError(err.getvalue().strip()) from None
    raise DocError("budget_table planned nothing")


def check_bench(argv: list[str]) -> Checked:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from smt_bench.bench.__main__ import check
    from smt_bench.errors import UserError

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            app_main.check_group_choices(argv)
        except SystemExit:
            raise DocError(err.getvalue().strip()) from None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("benchmark", overrides=argv)
        check(cfg)
        instantiate(cfg.model.source).hf_config()
    except UserError as e:
        raise DocError(str(e)) from None
    except Exception as e:
        raise DocError(f"does not compose: {str(e).splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()
    return Checked()


def check_command(cmd: str, scratch: Path, monkeypatch) -> Checked:
    """Raises DocError when the documented command would not run as documented."""
    if "<" in cmd and ">" in cmd:
        return Checked()  # schematic
    argv = shlex.split(substitute(cmd, scratch), comments=True)
    materialize(argv, scratch)
    if argv[0] == "torchrun":
        return check_torchrun(argv[1:], monkeypatch)
    if argv[1] != "-m":
        script = argv[1]
        if not (script.startswith("scripts/") and (REPO / script).is_file()):
            raise DocError(f"{script}: no such script")
        return Checked()
    module, args = argv[2], argv[3:]
    if module == "smt_bench":
        if "method=top_layers" in args:  # docs/methods.md's example method, once added as it says
            return check_example_method(args, scratch, monkeypatch)
        return check_app(args, monkeypatch)
    if importlib.util.find_spec(module) is None or not module.startswith("smt_bench."):
        raise DocError(f"no module {module}")
    if not args and module == "smt_bench.analysis":
        return Checked()  # the tool named in prose (it needs arguments to run)
    if module == "smt_bench.analysis":
        return check_analysis(args)
    if module == "smt_bench.budget_table":
        return check_budget_table(args, monkeypatch)
    if module == "smt_bench.bench":
        return check_bench(args)
    missing = [a for a in args if a.split("/", 1)[0] in TOP_LEVEL and not (REPO / a).exists()]
    if missing:
        raise DocError(f"{missing}: no such file")
    return Checked()


def check_example_method(args: list[str], scratch: Path, monkeypatch) -> Checked:
    """docs/methods.md's "Adding a method": tests/example_method/ dropped into a copy of conf/."""
    import shutil

    from smt_bench.schema import store

    example = REPO / "tests" / "example_method"
    conf = scratch / "conf-with-example-method"
    if not conf.exists():
        shutil.copytree(CONF, conf)
        shutil.copy(example / "top_layers.yaml", conf / "method")
    monkeypatch.syspath_prepend(str(example))
    store.register(conf)
    monkeypatch.setattr(app_main, "CONF", conf)
    try:
        return check_app(args, monkeypatch)
    finally:
        monkeypatch.setattr(app_main, "CONF", CONF)
        store.register()


# --- the fixtures ------------------------------------------------------------------------------------------
@pytest.fixture
def offline_scratch(tmp_path, monkeypatch, smollm2_path):
    """Offline, in a scratch working directory (results folders and placeholder files go there), with peft
    counts on deep models extrapolated from 1- and 2-layer copies, and each model's meta-device shapes
    built once."""
    import huggingface_hub.constants

    from smt_bench import run
    from smt_bench.methods import peft_methods
    from smt_bench.models import meta_shapes

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    count, shallow = peft_methods.PeftTuner.count, {}

    def at_depth(shapes, depth):
        key = (shapes, depth)
        if key not in shallow:
            cfg = shapes.hf_config.__class__.from_dict({**shapes.hf_config.to_dict(), "num_hidden_layers": depth})
            shallow[key] = meta_shapes(cfg)
        return shallow[key]

    linear = set()

    def extrapolated(self, shapes, size):
        depth = getattr(shapes.hf_config, "num_hidden_layers", 0)
        if depth <= 2:
            return count(self, shapes, size)
        one = count(self, at_depth(shapes, 1), size)
        if (self.peft_config, shapes) not in linear:  # the same count in every layer, nothing outside them
            assert count(self, at_depth(shapes, 2), size) == 2 * one, (self.name, "peft count not per layer")
            linear.add((self.peft_config, shapes))
        return one * depth

    monkeypatch.setattr(peft_methods.PeftTuner, "count", extrapolated)
    built = {}

    def shapes_once(hf_config):
        key = hf_config.to_json_string()
        if key not in built:
            built[key] = meta_shapes(hf_config)
        return built[key]

    monkeypatch.setattr(run, "meta_shapes", shapes_once)
    hf_config = models.Pretrained.hf_config

    def hub_config(self):  # offline, a hub model is the random-weight model of its architecture
        if self.path_or_id in HUB_ARCHITECTURE:
            HUB_USED.append(self.path_or_id)
            return _architecture_of(self.path_or_id)
        return hf_config(self)

    monkeypatch.setattr(models.Pretrained, "hf_config", hub_config)
    monkeypatch.setattr(app_main, "compose_config", ComposeOnce(app_main.compose_config))
    return tmp_path


class ComposeOnce:
    """compose_config, with each distinct choice of config groups composed once: a job's plain `key=value`
    overrides are then applied by Hydra's own override step, as Hydra applies them after composing the
    defaults. For each command checked, the first job built this way is compared with a full composition."""

    def __init__(self, compose):
        self.compose, self.bases, self.verify, self.with_hydra = compose, {}, True, {}

    @staticmethod
    def _is_group(override: str) -> bool:
        key = override.split("=", 1)[0].lstrip("+~")
        return key.startswith("hydra") or (CONF / key).is_dir()

    def __call__(self, overrides, hydra=False):
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra._internal.config_loader_impl import ConfigLoaderImpl

        if hydra:  # the sweep's and the launcher's view of one command line: the same call twice
            if tuple(overrides) not in self.with_hydra:
                self.with_hydra[tuple(overrides)] = self.compose(list(overrides), True)
            return copy.deepcopy(self.with_hydra[tuple(overrides)])
        if any(o.startswith(("+", "~")) for o in overrides):
            return self.compose(list(overrides))
        key = tuple(o for o in overrides if self._is_group(o))
        if key not in self.bases:
            self.bases[key] = self.compose(list(key))
        cfg = copy.deepcopy(self.bases[key])
        plain = [o for o in overrides if not self._is_group(o)]
        ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides(plain), cfg)
        if self.verify:
            self.verify = False
            full = self.compose(list(overrides))
            assert OmegaConf.to_yaml(cfg) == OmegaConf.to_yaml(full), overrides
        return cfg


# --- the tests ---------------------------------------------------------------------------------------------
def test_the_docs_show_commands_of_every_kind():
    cmds = [c for _, c in all_commands()]
    for kind in ("python -m smt_bench ", "python -m smt_bench -m ", "torchrun ", "python -m smt_bench.analysis ",
                 "python -m smt_bench.bench ", "python -m smt_bench.budget_table"):
        assert any(c.startswith(kind) or f" {kind}" in f" {c}" for c in cmds), kind
    assert ".venv/bin/python -m smt_bench method=smt budget=sweep" in cmds  # README command 1


@pytest.mark.slow
def test_every_documented_command_composes_and_passes_the_preflight(offline_scratch, monkeypatch):
    failures, seen = [], set()
    for doc, cmd in all_commands():
        key = tuple(shlex.split(cmd, comments=True))
        if key in seen:
            continue
        seen.add(key)
        try:
            check_command(cmd, offline_scratch, monkeypatch)
        except DocError as e:
            failures.append(f"{doc}: {cmd}\n    {e}")
    assert not failures, "documented commands that would not run:\n" + "\n".join(failures)


BROKEN = [
    "python -m smt_bench method=smt budget=sweep train.max_stepz=3",         # a mistyped key
    "python -m smt_bench -m method=smt,lorra budget=sweep",                  # an unknown option
    "python -m smt_bench method=lisa budget.fraction=0.005",                 # a budget the method cannot meet
    "python -m smt_bench data=local data.path=/nonexistent/train.json",      # a missing data file
    "python -m smt_bench -m seed=0,x method=smt",                            # a bad seed in a sweep
    "torchrun --nproc_per_node 2 -m smt_bench method=smt eval=nope",        # the same, under torchrun
    "python -m smt_bench.analysis results/embedded-sweep --epsilonn 1 --out x",
    "python -m smt_bench.bench model=llama-7b-random bench.layers=[2,1]",
    "python -m smt_bench.budget_table --models nosuchmodel",
    "python -m smt_bench.nosuchtool x",
    "python scripts/nosuchscript.py",
]


@pytest.mark.parametrize("cmd", BROKEN)
def test_the_checker_fails_a_command_that_does_not_run(cmd, offline_scratch, monkeypatch):
    with pytest.raises(DocError):
        check_command(cmd, offline_scratch, monkeypatch)


def test_the_offline_reasons_are_what_the_preflight_prints(offline_scratch, monkeypatch):
    """Each allowed reason is the exact line the preflight prints for a command that needs the hub."""
    monkeypatch.setattr(models.Pretrained, "hf_config", PRETRAINED_HF_CONFIG)  # the hub models as they are
    cases = [([f"model={m}"], "hub model") for m in ("llama-7b", "llama2-7b", "llama3-8b")]
    for argv, reason in [*cases, (["eval=commonsense"], "lm-eval built-ins")]:
        with pytest.raises(DocError) as e:
            _preflight(argv)
        assert OFFLINE[reason].fullmatch(e.value.line), e.value.line
    assert {app_main.compose_config(argv).model.source.path_or_id for argv, _ in cases} == set(HUB_ARCHITECTURE)


# --- links and paths --------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose(_read(path)), re.M)}


def _expand(span: str) -> list[str]:
    m = re.search(r"\{([^{}]*,[^{}]*)\}", span)
    if not m:
        return [span]
    return [x for alt in m.group(1).split(",") for x in _expand(span[:m.start()] + alt + span[m.end():])]


def repo_paths(text: str) -> list[str]:
    """Every repository path named in backticks: a token that starts with a tracked top-level entry.
    Schematic ones (<placeholder>, globs, ..., $VAR) and what the user creates (outputs/) are not paths."""
    out = []
    for span in code_spans(text):
        for token in span.split():
            token = token.strip("\"'(),;:")
            first = token.split("/", 1)[0]
            if first not in TOP_LEVEL or ("/" not in token and "." not in first):
                continue
            if any(c in token for c in "<>*$") or "..." in token or "…" in token:
                continue
            out += _expand(token)
    return out


def test_every_link_and_repository_path_in_the_docs_exists():
    bad = []
    for doc in DOCS:
        text = _read(doc)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                bad.append(f"{doc.relative_to(REPO)}: link {target}: no such file")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                bad.append(f"{doc.relative_to(REPO)}: link {target}: no such heading in {path.name}")
        for p in repo_paths(text):
            stem = (REPO / p).parent.is_dir() and any((REPO / p).parent.glob(f"{(REPO / p).name}.*"))  # --out STEM
            if not (REPO / p).exists() and not stem and not p.rstrip("/").startswith(OUTPUT_PATHS):
                bad.append(f"{doc.relative_to(REPO)}: `{p}` does not exist")
    assert not bad, "\n".join(bad)


def test_the_path_and_link_checks_catch_what_is_missing(tmp_path):
    assert repo_paths("see `conf/method/nosuch.yaml` and `results/bench/eval_cpu.{json,md}`") == [
        "conf/method/nosuch.yaml", "results/bench/eval_cpu.json", "results/bench/eval_cpu.md"]
    assert repo_paths("`outputs/results`, `results/runs/...`, `conf/<group>/x.yaml`, `**/runs/*.json`") == []
    assert slug("§10 The evaluation protocol of the paper's numbers") == "10-the-evaluation-protocol-of-the-papers-numbers"
    assert slug("Hub kernels (`model.hub_kernels`, default `false`)") == "hub-kernels-modelhub_kernels-default-false"


def test_smt_sections_cited_in_the_repository_exist():
    """`docs/smt.md §N` in configs, code and docs names a numbered section of docs/smt.md."""
    sections = {int(n) for n in re.findall(r"^## §(\d+) ", _read(REPO / "docs" / "smt.md"), re.M)}
    assert sections == set(range(1, max(sections) + 1))
    files = [*CONF.rglob("*.yaml"), *(REPO / "smt_bench").rglob("*.py"), *(REPO / "scripts").iterdir(), *DOCS]
    bad = []
    for f in files:
        for line in _read(f).splitlines():
            if "smt.md" in line:
                for n in re.findall(r"§(\d+)", line):
                    if int(n) not in sections:
                        bad.append(f"{f.relative_to(REPO)}: §{n}")
    assert not bad, bad


def test_docs_named_in_configs_code_and_scripts_exist():
    files = [*CONF.rglob("*.yaml"), *(REPO / "smt_bench").rglob("*.py"), *(REPO / "scripts").iterdir(),
             *(REPO / "tests").glob("*.py")]
    bad = sorted({f"{f.relative_to(REPO)}: {m}" for f in files for m in re.findall(r"\bdocs/[\w/-]+\.md", _read(f))
                  if not (REPO / m).is_file()})
    assert not bad, bad


# --- the config groups table ----------------------------------------------------------------------------
def groups_table() -> dict[str, tuple[list[str], str | None]]:
    """docs/config.md's groups table: group -> (options listed, the one marked default)."""
    text = _read(REPO / "docs" / "config.md")
    table = text.split("| group | options | notes |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        options = re.findall(r"`([^`]+)`", cells[1])
        default = re.search(r"`([^`]+)` \(default", cells[1])
        rows[cells[0].strip("`")] = (options, default and default.group(1))
    return rows


def conf_options(group: str) -> set[str]:
    folder = CONF / group
    options = {p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml")}
    return options | {"basic"} if group == "hydra/launcher" else options


def conf_defaults() -> dict[str, str | None]:
    out = {"hydra/launcher": "basic", "experiment": None}
    for entry in OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))["defaults"]:
        if isinstance(entry, dict):
            (key, value), = entry.items()
            if key in USER_GROUPS:
                out[key] = value
    return out


def test_the_config_groups_table_is_conf():
    table = groups_table()
    assert sorted(table) == sorted(USER_GROUPS)
    if hasattr(app_main, "USER_GROUPS"):  # `python -m smt_bench --help` lists the same groups
        assert sorted(app_main.USER_GROUPS) == sorted(USER_GROUPS)
    folders = {p.name for p in CONF.iterdir() if p.is_dir()}
    assert folders == {g.split("/")[0] for g in USER_GROUPS} | set(INTERNAL), folders
    assert {p.parent.relative_to(CONF / "hydra").as_posix() for p in (CONF / "hydra").rglob("*.yaml")} == {"launcher"}
    defaults = conf_defaults()
    for group in USER_GROUPS:
        options, default = table[group]
        assert len(options) == len(set(options)), group
        assert set(options) == conf_options(group), (group, sorted(set(options) ^ conf_options(group)))
        assert default == defaults[group], (group, default, defaults[group])


def test_the_table_check_fails_when_conf_and_the_table_differ():
    options, _ = groups_table()["method"]
    assert set(options) - {"smt"} != conf_options("method")
    assert set(options) | {"nosuch"} != conf_options("method")


def test_every_doc_page_is_in_the_index():
    index = _read(REPO / "docs" / "README.md")
    pages = {p.name for p in (REPO / "docs").glob("*.md")} - {"README.md"}
    assert pages <= set(re.findall(r"\]\(([\w-]+\.md)\)", index)), pages


def test_no_word_of_how_the_repository_was_made():
    """The docs speak of the project only."""
    # (written with [x] classes so that a grep for these words finds the docs, not this test)
    words = re.compile(r"\bsess[i]ons?\b|\ble[n]t\b|\ble[n]d(s|ing)?\b|device[ ]tool|\bc[a]rry\b|\.\./sh[a]red", re.I)
    bad = [f"{d.relative_to(REPO)}:{i}: {line.strip()}" for d in DOCS
           for i, line in enumerate(_read(d).splitlines(), 1) if words.search(line)]
    assert not bad, "\n".join(bad)
