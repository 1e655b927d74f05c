"""The Hydra app: sweeps, config groups, bad input (exit 2, one stderr line, nothing written) and the
result file of a real run (subprocess `python -m smt_bench` on tiny-llama)."""
import hashlib
import json
import math
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from smt_bench.__main__ import CONF, sweep_points
from smt_bench.methods.base import Method
from smt_bench.run import Prepared

REPO = Path(__file__).resolve().parents[1]
TINY_N = 3_219_776  # tiny-llama's parameter count (see test_budget)


# --- sweeps ------------------------------------------------------------------------------------

def _fraction_of(job):
    return [float(o.split("=", 1)[1]) for o in job if o.startswith("budget.fraction=")]


def test_budget_sweep_is_one_job_per_budget(compose):
    jobs = sweep_points(["model=tiny-llama", "method=lora", "budget=sweep"])
    assert [_fraction_of(j) for j in jobs] == [[0.005], [0.01], [0.02], [0.05]]
    for job in jobs:
        assert {"model=tiny-llama", "method=lora", "budget=sweep"} <= set(job)
        cfg = compose(*job)
        assert cfg.budget.fraction == _fraction_of(job)[0] and cfg.method.name == "lora"


@pytest.mark.parametrize("argv", [["method=full_ft", "budget=sweep"], ["budget=sweep", "method=full_ft"],
                                  ["-m", "budget=sweep", "method=full_ft", "model=tiny-llama"]])
def test_full_ft_budget_sweep_is_one_job_at_100_percent(argv, compose):
    jobs = sweep_points(argv)
    assert len(jobs) == 1 and _fraction_of(jobs[0]) == [1.0]
    cfg = compose(*jobs[0])
    assert (cfg.method.name, cfg.budget.fraction) == ("full_ft", 1.0)


def test_sweep_points_of_plain_and_explicit_multiruns():
    assert sweep_points(["method=lora", "seed=3"]) == [["method=lora", "seed=3"]]
    jobs = sweep_points(["-m", "method=lora,dora", "seed=0,1"])
    assert sorted(map(tuple, jobs)) == sorted([("method=lora", "seed=0"), ("method=lora", "seed=1"),
                                               ("method=dora", "seed=0"), ("method=dora", "seed=1")])
    jobs = sweep_points(["method=dora", "budget=sweep", "seed=0,1"])  # budget=sweep turns multirun on
    assert len(jobs) == 8 and {tuple(_fraction_of(j)) for j in jobs} == {(0.005,), (0.01,), (0.02,), (0.05,)}


# --- every option of every config group composes ------------------------------------------------

BENCH_ONLY = ("bench",)  # the groups of `python -m smt_bench.bench` (conf/benchmark.yaml): tests/test_bench.py


NESTED = ("experiment",)  # groups whose options sit in subfolders: experiment=paper/qkv


def _group_options():
    out = []
    for d in sorted(p for p in CONF.rglob("*") if p.is_dir() and p.name not in BENCH_ONLY):
        group = d.relative_to(CONF).as_posix()
        if group in NESTED:
            out += [(group, y.relative_to(d).with_suffix("").as_posix()) for y in sorted(d.rglob("*.yaml"))]
        elif group.split("/")[0] not in NESTED:
            out += [(group, y.stem) for y in sorted(d.glob("*.yaml"))]
    return out


def _selecting(group: str, option: str) -> list[str]:
    """A recipe's per-method values are chosen by the recipe and the method, not by name."""
    if group == "recipe_method":
        method = next(m for m in (p.stem for p in (CONF / "method").glob("*.yaml")) if option.endswith(f"_{m}"))
        return [f"recipe={option[:-len(method) - 1]}", f"method={method}"]
    return [f"{group}={option}"]


GROUP_OPTIONS = _group_options()


def test_config_groups_are_all_found():
    groups = {g for g, _ in GROUP_OPTIONS}
    assert groups == {"budget", "data", "eval", "hydra/launcher", "logger", "method", "model", "train", "experiment",
                      "recipe", "recipe_method"}
    assert {("hydra/launcher", "slurm"), ("hydra/launcher", "local"), ("logger", "wandb"), ("method", "lora"),
            ("method", "dora"), ("method", "full_ft"), ("budget", "sweep"), ("model", "tiny-llama")} <= set(GROUP_OPTIONS)


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes(group, option, compose):
    cfg = compose(*_selecting(group, option), hydra=True)
    own = OmegaConf.load(CONF / group / f"{option}.yaml")
    if group == "experiment":  # a paper experiment: a multirun with its own sweep
        assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params
        return
    if group == "recipe":  # @package _global_: what it sets is what the config has
        for key in ("train", "eval"):
            for k, v in (own.get(key) or {}).items():
                assert cfg[key][k] == v, (key, k)
        return
    if group == "recipe_method":
        for k, v in own.items():
            if k != "defaults":
                assert cfg.method[k] == v, k
        return
    if group == "hydra/launcher":
        launcher = get_class(cfg.hydra.launcher._target_)
        assert launcher.__name__ == {"slurm": "SlurmLauncher", "local": "LocalLauncher"}.get(option, launcher.__name__)
        for k, v in own.items():
            if k != "defaults":
                assert cfg.hydra.launcher[k] == v
        return
    node = cfg[group]
    if group == "method":
        method = instantiate(node, _convert_="all")
        assert isinstance(method, Method) and method.name == option and method.lr > 0
    elif group == "model":
        assert node.name == option
        source_cls = get_class(node.source._target_)
        if "???" not in OmegaConf.to_yaml(node):
            assert isinstance(instantiate(node.source), source_cls)
    elif group == "budget":
        assert set(node) == {"fraction"} and 0 < node.fraction <= 1  # only the fraction: one id per budget
        if option.endswith("pct"):
            assert node.fraction == pytest.approx(float(option[:-3]) / 100)
        if option == "sweep":
            assert cfg.hydra.mode.name == "MULTIRUN"
            assert str(cfg.hydra.sweeper.params["budget.fraction"]) == "0.005,0.01,0.02,0.05"
        else:
            assert node.fraction == own.fraction
    elif group == "data":
        assert node.name == option
        if "???" not in OmegaConf.to_yaml(node):
            assert instantiate(node).load().train
    elif group == "logger":
        logger = instantiate(node)
        assert type(logger).__name__ == {"none": "NullLogger", "wandb": "WandbLogger"}.get(option, type(logger).__name__)
    else:  # train, eval: plain values, taken as written
        assert OmegaConf.to_container(node) == OmegaConf.to_container(own)


def test_cluster_combination_composes(compose):
    cfg = compose("hydra/launcher=slurm", "logger=wandb", "method=dora", "budget=sweep", "model=tiny-llama",
                  "seed=0", hydra=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.gpus_per_node == 1
    assert cfg.logger._target_.endswith("WandbLogger") and cfg.method.args.use_dora is True
    assert cfg.results.group == "tiny-llama-bundled"


def test_wandb_logger_runs_without_an_account(monkeypatch, tmp_path):
    from smt_bench.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(project="smt-bench-test")
    logger.start("abc123", {"seed": 0})
    assert logger.run is not None
    logger.log({"train/loss": 1.0}, 1)
    logger.finish({"mean_accuracy": 50.0, "skip": None})
    assert logger.run is None


# --- bad input: exit 2, one line on stderr, nothing under results.dir ---------------------------

TINY = ["model=tiny-llama", "device=cpu"]
# one case per way a bad input is caught: a group option, an OmegaConf type at compose time, a range in
# the schema, a data file, one job of a sweep (the whole catalogue runs in-process: test_bad_input.py)
AS_PROCESS = ["unknown-budget", "steps-text", "clip-negative", "malformed-jsonl", "sweep-one-unreachable"]


@pytest.mark.slow
@pytest.mark.parametrize("case", AS_PROCESS)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, cli, tmp_path, smollm2_path):
    from test_bad_input import CASES

    build, message = CASES[case]
    results = tmp_path / "results"
    proc = cli(*build(tmp_path), f"results.dir={results}", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("smt-bench: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not results.exists() and proc.stdout == ""


@pytest.mark.slow
def test_bad_input_found_once_tokenised_is_one_line_and_no_result_file(cli, tmp_path, smollm2_path):
    """Every record longer than train.max_len loses its whole response: that shows only after
    tokenisation (past the preflight), and still ends as bad input, not as a failed run."""
    results = tmp_path / "results"
    proc = cli(*TINY, "method=lora", "budget.fraction=0.005", "train.max_len=8", f"results.dir={results}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("smt-bench: error: ")]
    assert lines == [lines[0]] and re.search(r"only 0 training examples \(after truncation to train\.max_len\)",
                                             lines[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not results.exists()


# --- the result file of one run -----------------------------------------------------------------

RUN = [*TINY, "method=lora", "budget.fraction=0.005", "train.max_steps=4", "train.batch_size=2",
       "train.max_len=128", "train.eval_every=2", "train.val_batches=1", "data.n_train_per_task=4",
       "data.n_val_per_task=1", "data.n_test_per_task=2", "eval.max_new_tokens=4", "eval.batch_size=4"]


@pytest.mark.slow
def test_run_writes_one_result_file_and_a_rerun_skips_it(cli, tmp_path, compose, smollm2_path, only_progress_bars):
    results = tmp_path / "results"
    proc = cli(*RUN, f"results.dir={results}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in results.rglob("*") if p.is_file()]
    assert len(files) == 1, files  # no temp file left behind
    path = files[0]
    assert only_progress_bars(proc.stderr)
    # the run ends with one line that says what it measured
    assert re.fullmatch(r"\[smt-bench\] finished: lora \| budget 0\.48% \(target 0\.50%\) \| accuracy \d+\.\d% "
                        r"\(bundled, generative-first-match \(LLM-Adapters\), 12 items\) \| peak [\d,]+ MiB "
                        r"\(cpu_peak_rss_growth\) \| [\d,]+ tok/s \| wall \d+ s \| (.*)", proc.stdout.strip())
    assert proc.stdout.strip().endswith(f"| {path}")
    assert path.parent == results / "runs" / "tiny-llama-bundled"
    assert re.fullmatch(r"lora-b0\.005-s0-[0-9a-f]{12}\.json", path.name)
    r = json.loads(path.read_text())

    info = r["run_info"]
    assert info["status"] == "finished" and info["error"] is None
    assert path.name.endswith(f"-{info['id']}.json")
    assert datetime.fromisoformat(info["created_at"]).tzinfo is not None
    assert all(a in info["command"] for a in RUN) and info["wall_time_s"] > 0

    # the id is what an in-process Prepared computes for the same command (stable across processes)
    prep = Prepared(compose(*RUN, f"results.dir={results}"))
    assert prep.run_id == info["id"] and prep.path == path

    cfg = r["config"]
    assert (cfg["method"]["name"], cfg["budget"]["fraction"], cfg["seed"]) == ("lora", 0.005, 0)
    assert cfg["model"]["name"] == "tiny-llama" and cfg["train"]["max_steps"] == 4

    t = r["train_info"]
    assert t["base_params"] == TINY_N
    assert t["trainable_params_target"] == round(0.005 * TINY_N) == 16_099
    assert t["trainable_params"] == 11 * 1408 == prep.plan.achieved_params  # rank 11 is closest
    assert t["plan"] == {"r": 11, "lora_alpha": 22.0, "peft_config": "LoraConfig"}
    assert math.isclose(t["trainable_pct"], 100 * 15_488 / TINY_N)
    assert len(t["loss_curve"]) == 4 and all(math.isfinite(x) and x > 0 for x in t["loss_curve"])
    assert [s for s, _ in t["val_loss_curve"]] == [2, 4]
    for k in ("train_time_s", "median_step_time_s", "load_time_s", "prepare_time_s", "tokens_per_s"):
        assert t[k] > 0, k
    assert isinstance(t["peak_memory_bytes"], int) and t["peak_memory_bytes"] >= 0
    mem = t["memory_breakdown_bytes"]
    assert mem["gradients"] == 4 * 15_488 and mem["optimizer"] == 8 * 15_488
    assert mem["weights"] >= 4 * (TINY_N + 15_488) and mem["activations"] > 0

    ev = r["eval"]
    assert set(ev["accuracy"]) == {"addition", "alphabetical", "arith_check", "largest", "sequence", "vowels"}
    assert ev["n"] == {task: 2 for task in ev["accuracy"]}
    assert all(a in (0.0, 50.0, 100.0) for a in ev["accuracy"].values())
    assert math.isclose(ev["mean_accuracy"], sum(ev["accuracy"].values()) / 6)
    assert ev["model_evaluated"] == "merged" and ev["protocol"].startswith("generative-first-match")
    assert r["summary"]["mean_accuracy"] == ev["mean_accuracy"]

    meta = r["meta_info"]
    sha = meta["git"]["sha"]
    assert re.fullmatch(r"[0-9a-f]{40}", sha)
    assert subprocess.run(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=REPO).returncode == 0
    assert meta["versions"]["torch"] == torch.__version__
    import peft
    import transformers

    assert (meta["versions"]["transformers"], meta["versions"]["peft"]) == (transformers.__version__,
                                                                            peft.__version__)
    assert meta["device"]["type"] == "cpu" and meta["device"]["torch_threads"] >= 1
    # the environment: the lock it was made from (its hash, what differs) and the hub-kernel decision
    lock = REPO / "requirements" / "lock-cpu.txt"
    assert meta["lock"]["sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
    assert isinstance(meta["lock"]["deviations"], dict)
    assert meta["hub_kernels"]["enabled"] is False and "layers" not in meta["hub_kernels"]
    assert r["config"]["model"]["hub_kernels"] is False

    # the same command again: skipped, the file untouched
    before = path.read_bytes()
    again = cli(*RUN, f"results.dir={results}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished; skipping" in again.stdout
    assert [p for p in results.rglob("*") if p.is_file()] == [path] and path.read_bytes() == before


@pytest.mark.slow
def test_sweep_ends_with_a_table_and_the_analysis_command(cli, tmp_path, smollm2_path, only_progress_bars):
    """With the default results.dir (outputs/results, never the committed studies' results/), the printed
    analysis command reports exactly this sweep's runs."""
    results = tmp_path / "cwd" / "outputs" / "results"
    small = [*TINY, "method=lora", "budget.fraction=0.005", "train.max_steps=2", "train.batch_size=2",
             "train.max_len=128", "train.eval_every=0", "train.val_batches=1", "data.n_train_per_task=4",
             "data.n_val_per_task=1", "data.n_test_per_task=1", "eval.max_new_tokens=2", "eval.batch_size=6"]
    proc = cli("-m", *small, "seed=0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert only_progress_bars(proc.stderr)
    out = proc.stdout.splitlines()
    assert sum(l.startswith("[smt-bench] finished: lora") for l in out) == 2
    head = out.index("[smt-bench] sweep of 2 jobs: 2 finished")
    assert re.split(r"\s{2,}", out[head + 1]) == ["#", "job", "status", "trainable %", "accuracy", "peak MiB", "tok/s",
                                                  "wall s", "result"]
    for i, seed in enumerate((0, 1)):
        cells = re.split(r"\s{2,}", out[head + 2 + i])
        r = json.loads(next(results.rglob(f"lora-b0.005-s{seed}-*.json")).read_text())
        assert cells[:4] == [str(i), f"seed={seed}", "finished", f"{r['summary']['trainable_pct']:.2f}"]
        assert cells[4] == f"{r['summary']['mean_accuracy']:.1f}" and cells[-1].startswith(f"lora-b0.005-s{seed}-")
    command = "python -m smt_bench.analysis outputs/results --out outputs/results/analysis"
    assert out[-1] == f"[smt-bench] report and figures: {command}"
    # the printed command works as printed, and reports exactly the sweep's two runs
    ran = subprocess.run([sys.executable, *command.split()[1:]], cwd=tmp_path / "cwd", capture_output=True, text=True)
    assert ran.returncode == 0 and ran.stderr == "", ran.stderr[-2000:]
    report = (results / "analysis" / "report.md").read_text()
    assert report.startswith("# smt-bench analysis\n\nFrom 2 run files: 2 finished, 0 not finished, 0 not readable "
                             "as a run, 0 runs present twice")


def test_run_id_is_stable_and_follows_the_semantic_config(compose, tmp_path, smollm2_path):
    a = Prepared(compose(*RUN, f"results.dir={tmp_path / 'a'}"))
    b = Prepared(compose(*RUN, f"results.dir={tmp_path / 'a'}"))
    assert re.fullmatch(r"[0-9a-f]{12}", a.run_id) and a.run_id == b.run_id and a.path == b.path
    # where results go and how they are logged do not change what is computed
    c = Prepared(compose(*RUN, f"results.dir={tmp_path / 'c'}", "logger=wandb"))
    assert c.run_id == a.run_id and c.path != a.path
    seeds = {Prepared(compose(*RUN, f"seed={s}", f"results.dir={tmp_path / 'a'}")).run_id for s in (1, 2)}
    assert len(seeds | {a.run_id}) == 3
    other = Prepared(compose(*RUN, "train.max_steps=5", f"results.dir={tmp_path / 'a'}"))
    assert other.run_id != a.run_id
    assert Prepared(compose(*RUN, "seed=1", f"results.dir={tmp_path / 'a'}")).path.name.startswith("lora-b0.005-s1-")


def test_default_results_dir_is_not_the_committed_studies(compose, smollm2_path):
    from smt_bench.__main__ import compose_config

    cfg = compose_config([])
    assert cfg.results.dir == "outputs/results" and cfg.results.tag is None
    assert list((REPO / "results").glob("*/runs/*/*.json"))  # where the committed studies are
    assert not (REPO / cfg.results.dir).resolve().is_relative_to((REPO / "results").resolve())
    assert "outputs/" in (REPO / ".gitignore").read_text().split()


def test_a_tag_names_the_file_not_the_run(compose, tmp_path, smollm2_path):
    plain = Prepared(compose(*RUN, f"results.dir={tmp_path}"))
    tagged = Prepared(compose(*RUN, "results.tag=qkv_only", f"results.dir={tmp_path}"))
    assert tagged.run_id == plain.run_id and tagged.path.parent == plain.path.parent
    assert tagged.path.name == plain.path.name.replace("lora-b", "lora-qkv_only-b", 1)


@pytest.mark.slow
def test_help_lists_what_a_user_chooses(cli):
    from smt_bench.__main__ import INTERNAL_GROUPS, USER_GROUPS
    from smt_bench.schema.store import CONF

    proc = cli("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    listed = [l.split()[0] for l in proc.stdout.splitlines() if l.startswith("  ") and not l.startswith("   ")]
    assert listed[:len(USER_GROUPS)] == list(USER_GROUPS)
    for hidden in ("schema/", "recipe_method", "\nbench", "  bench", "== Config =="):
        assert hidden not in proc.stdout
    assert "docs/config.md" in proc.stdout
    folders = {p.name for p in CONF.iterdir() if p.is_dir()}  # every group of conf/ is either listed or internal
    assert folders == {g.split("/")[0] for g in USER_GROUPS} | INTERNAL_GROUPS
    for group in USER_GROUPS:  # each option of each group is named
        for p in (CONF / group).rglob("*.yaml"):
            assert p.relative_to(CONF / group).with_suffix("").as_posix() in proc.stdout


def test_full_ft_in_a_mixed_sweep_is_one_run_id(compose, tmp_path, smollm2_path):
    """`-m method=lora,full_ft budget=sweep`: the full-FT jobs collapse to one id (the rest are skipped)."""
    from smt_bench.__main__ import sweep_points
    from smt_bench.run import Prepared

    jobs = sweep_points(["-m", "method=lora,full_ft", "budget=sweep", "model=tiny-llama"])
    ft = [j for j in jobs if "method=full_ft" in j]
    assert len(ft) == 4
    preps = [Prepared(compose(*j, f"results.dir={tmp_path}")) for j in ft]
    assert {p.run_id for p in preps} == {preps[0].run_id}
    assert {p.path for p in preps} == {preps[0].path} and "b1-" in preps[0].path.name
    assert all(p.target == p.shapes.total_params for p in preps)


def test_no_private_hydra_import():
    """The app uses Hydra's public API only (a private module may move in any release)."""
    found = [f"{p.relative_to(REPO)}:{i}" for p in sorted((REPO / "smt_bench").rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if "hydra._internal" in line]
    assert found == []
