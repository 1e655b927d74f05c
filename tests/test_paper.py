"""The SMT paper by name: presets that compose and pass the preflight, activation-based selection against
a brute-force top-k of its statistic, and the paper's figures and tables drawn from synthetic results."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import smt_bench.__main__ as app_main
from smt_bench.analysis.report import Options, analyze
from smt_bench.methods.base import Context
from smt_bench.methods.smt import SMT
from smt_bench.models import TinyLlama, shapes_of

from test_analysis import CS8, run_doc, smt_map, write_run

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESETS = sorted(p.relative_to(CONF / "experiment").with_suffix("").as_posix()
                 for p in (CONF / "experiment").rglob("*.yaml"))
TINY = ["model=tiny-llama", "device=cpu"]


# --- presets --------------------------------------------------------------------------------------
def _adapters(tmp: Path) -> list[str]:
    """A fake LLM-Adapters checkout for the recipes: training files and boolq's test file."""
    rec = [{"instruction": f"Is {i} even? Answer format: true/false", "input": "",
            "output": f"the correct answer is {str(i % 2 == 0).lower()}", "answer": str(i % 2 == 0).lower()}
           for i in range(200)]
    (tmp / "ft-training_set").mkdir(parents=True)
    for name in ("commonsense_170k.json", "math_10k.json"):
        (tmp / "ft-training_set" / name).write_text(json.dumps(rec))
    (tmp / "dataset" / "boolq").mkdir(parents=True)
    (tmp / "dataset" / "boolq" / "test.json").write_text(json.dumps(rec[:5]))
    return [f"data.path={tmp}", f"eval.data_dir={tmp / 'dataset'}"]


def _jobs(argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["smt_bench", *argv])
    return app_main.preflight(argv).jobs, capsys.readouterr().err


# tiny-llama cannot meet the paper's budgets on one projection, so those presets run at a fraction it can
TINY_BUDGET = {"anatomy/commonsense": "0.001", "paper/qkv": "0.001", "paper/attn_mlp": "0.0015", "paper/selection": "0.001"}
EXPECTED = {  # the variants each preset sweeps: key -> values
    "anatomy/commonsense": {"method": {"full_ft", "smt", "lora", "dora", "pissa", "rslora", "shira", "miss", "s2ft",
                                       "lisa", "spiel", "hft", "supertuning", "kasa", "corda"}},
    "paper/qkv": {"method.projections": {"[q]", "[k]", "[v]", "[q,k,v]"}},
    "paper/attn_mlp": {"method.projections": {"[q,k,v]", "[gate,up,down]", "[q,k,v,o,gate,up,down]"}},
    "paper/selection": {"method.signal": {"gradient", "activation"}},
    "paper/plateau": {"method": {"lora", "dora", "smt"}},
    "paper/efficiency": {"method": {"full_ft", "lora", "dora", "smt"}},
    "paper/commonsense": {"method": {"full_ft", "lora", "dora", "smt"}},
    "paper/math": {"method": {"full_ft", "lora", "dora", "smt"}},
}


def test_every_preset_is_listed():
    assert PRESETS == sorted(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_composes_and_passes_the_preflight_on_tiny_llama(preset, tmp_path, monkeypatch, capsys,
                                                                      smollm2_path):
    extra = [f"budget.fraction={TINY_BUDGET[preset]}"] if preset in TINY_BUDGET else []
    if preset in ("paper/commonsense", "paper/math", "anatomy/commonsense"):
        extra += _adapters(tmp_path / "adapters") + ["eval.tasks=[boolq]" if preset.endswith("commonsense")
                                                     else "eval.tasks=[gsm8k]"]
    argv = ["-m", f"experiment={preset}", *TINY, *extra, "seed=0,1", f"results.dir={tmp_path / 'results'}"]
    jobs, err = _jobs(argv, monkeypatch, capsys)
    swept = {}
    for j in jobs:
        for o in j.overrides:
            k, v = o.split("=", 1)
            swept.setdefault(k, set()).add(v)
    for key, values in EXPECTED[preset].items():
        skipped = {line.split(f"{key}=", 1)[1].split()[0] for line in err.splitlines() if f"{key}=" in line}
        assert swept.get(key, set()) | skipped == values, (key, swept, err)
    assert swept["seed"] == {"0", "1"}  # composes with the command line's own sweep
    assert not (tmp_path / "results").exists()


def test_the_recipes_set_the_papers_hyper_parameters():
    cfg = app_main.compose_config(["experiment=paper/commonsense", "method=smt"])
    assert (cfg.model.name, cfg.data.name, cfg.eval.suite) == ("llama-7b", "commonsense170k", "commonsense_gen")
    t = cfg.train
    assert (t.epochs, t.batch_size * t.grad_accum, t.schedule, t.gradient_checkpointing) == (3, 64, "linear", True)
    m = cfg.method
    assert (m.lr, m.warmup_steps, m.block_size, cfg.budget.fraction) == (1e-4, 100, 256, 0.0084)
    assert app_main.compose_config(["experiment=paper/commonsense", "method=lora"]).method.lr == 3e-4
    math_cfg = app_main.compose_config(["experiment=paper/math", "method=dora"])
    assert (math_cfg.model.name, math_cfg.data.name, math_cfg.method.lr) == ("llama3-8b", "math10k", 1e-4)
    plain = app_main.compose_config(["method=smt"])  # no recipe: the embedded default is untouched
    assert (plain.method.lr, plain.method.warmup_steps, plain.train.epochs) == (5e-4, 4, None)


@pytest.mark.slow
def test_the_plateau_fractions_are_loras_ranks_8_to_256_on_llama_7b():
    from hydra.utils import instantiate

    from smt_bench.models import meta_shapes

    pts = app_main.sweep_points(["-m", "experiment=paper/plateau", "model=llama-7b-random", "method=lora"])
    cfgs = [app_main.compose_config(p) for p in pts]
    shapes = meta_shapes(instantiate(cfgs[0].model.source).hf_config())
    per_rank = 32 * ((4096 + 4096) * 3 + (4096 + 11008) * 2)  # r(d_in + d_out) over q,k,v,up,down, 32 layers
    targets = [round(c.budget.fraction * shapes.total_params) for c in cfgs]
    assert [round(t / per_rank) for t in targets] == [8, 16, 32, 64, 128, 256]
    lora = instantiate(cfgs[0].method)  # peft's own count agrees (one point: each costs a meta-device 7B)
    plan = lora.plan(shapes, targets[2])
    assert (plan.detail["r"], plan.achieved_params) == (32, 32 * per_rank)


# --- activation-based selection -------------------------------------------------------------------
def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0  # padding: left out of the statistic
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()})
    return out


@pytest.mark.parametrize("kind", ["abs_mean", "l2"])
def test_activation_selection_is_the_top_k_of_the_input_statistic(kind):
    model, _ = TinyLlama(vocab_size=256).load()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = _batches()
    B, k = 16, 20
    names = [l.name for l in shapes_of(model).select(["q_proj", "k_proj", "v_proj"])]
    seen = {n: [] for n in names}  # brute force: every real token's input of every eligible linear
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, a, out, n=n: seen[n].append(a[0].detach())) for n in names]
    model.eval()
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    flat = []
    for n in names:
        x = torch.cat([xb[b["attention_mask"].bool()] for xb, b in zip(seen[n], batches)])
        chan = x.abs().mean(0) if kind == "abs_mean" else x.square().mean(0)
        col = chan.reshape(-1, B).mean(1)
        col = col if kind == "abs_mean" else col.sqrt()
        rows = model.get_submodule(n).out_features // B
        flat += [(n, r, c, float(col[c])) for r in range(rows) for c in range(len(col))]
    order = sorted(range(len(flat)), key=lambda i: -flat[i][3])  # stable: ties keep the lower index
    want = {flat[i][:3] for i in order[:k]}

    m = SMT(name="smt", lr=1e-2, block_size=B, warmup_steps=3, signal="activation", score=kind)
    ctx = Context(batches=lambda n: iter(batches[:n]), loss=lambda mod, b: mod(**b).loss, device=torch.device("cpu"))
    tuned = m.prepare(model, m.plan(shapes_of(model), k * B * B), ctx)
    got = {(n, r, c) for n, l in tuned.layers.items() for r, c in zip(l.rows.tolist(), l.cols.tolist())}
    assert got == want
    info = tuned.report()["warmup"]
    assert info["signal"] == "activation" and info["mode"] == "forward_only"
    for n, p in model.named_parameters():  # forward passes only: nothing changed, no gradient left
        if not n.endswith("blocks"):
            assert torch.equal(p, before[n]) and p.grad is None, n


def test_activation_selection_keeps_the_run_ids_of_gradient_runs():
    from smt_bench.migrations import id_form

    node = {"_target_": "smt_bench.methods.smt.SMT", "name": "smt", "lr": 1e-4, "signal": "gradient"}
    assert id_form(node) == {"_target_": "smt_bench.methods.smt.SMT", "name": "smt", "lr": 1e-4}
    assert id_form({**node, "signal": "activation"}) == {**node, "signal": "activation"}


# --- the paper's figures and tables ---------------------------------------------------------------
QKV_ACC = {"q": 50.0, "k": 48.0, "v": 54.0, "qkv": 55.0, "mlp": 45.0, "all": 52.0}
SETS = {"q": ["q"], "k": ["k"], "v": ["v"], "qkv": ["q", "k", "v"], "mlp": ["gate", "up", "down"],
        "all": ["q", "k", "v", "o", "gate", "up", "down"]}


def _paper_results(root: Path) -> Path:
    res = root / "results"
    for seed, noise in enumerate((-0.5, 0.0, 0.5)):
        for key, a in QKV_ACC.items():
            write_run(res, run_doc("smt", 0.01, seed, a + noise, method_extra={"projections": SETS[key]},
                                   block_map=smt_map(5) if key == "qkv" else None))
        write_run(res, run_doc("smt", 0.01, seed, 53.0 + noise,
                               method_extra={"projections": SETS["qkv"], "signal": "activation"}))
        write_run(res, run_doc("lora", 0.01, seed, 40.0, method_extra={"r": 4}))  # other methods' keys: empty for SMT
    return res


@pytest.fixture(scope="module")
def paper_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    res = _paper_results(root)
    analyze([str(res)], root / "out", Options(n_boot=10))
    return root / "out"


@pytest.mark.slow
def test_the_papers_figures_are_drawn_by_name(paper_report):
    figs = paper_report / "figures" / "tiny-llama-bundled"
    for stem in ("paper_qkv", "paper_attn_mlp", "paper_selection", "paper_qkv_share"):
        assert (figs / f"{stem}.png").stat().st_size > 5000 and (figs / f"{stem}.pdf").is_file(), stem


def test_the_qkv_section_reports_v_against_k_and_q_with_intervals(paper_report):
    report = (paper_report / "report.md").read_text()
    part = report.split("(`paper_qkv`)", 1)[1].split("###", 1)[0]
    assert "| 1% | V | 3 | 54.0 ± 1.2 | -1.0 |" in part and "| 1% | Q,K,V | 3 | 55.0 ± 1.2 | best |" in part
    assert "V − K = +6.0 ± 1.1 (the interval excludes 0); the paper: +4.6" in part
    assert "V − Q = +4.0 ± 1.1 (the interval excludes 0); the paper: +3.2" in part
    sel = report.split("(`paper_selection`)", 1)[1].split("###", 1)[0]
    assert "gradient − activation = +2.0" in sel  # the q,k,v gradient runs against the activation runs
    am = report.split("(`paper_attn_mlp`)", 1)[1].split("###", 1)[0]
    assert "best attention (q,k,v)" in am and "attention (q,k,v) − MLP (gate,up,down) = +10.0" in am


def test_a_comparison_needs_two_variants_that_differ_in_that_key_alone(tmp_path):
    res = tmp_path / "results"
    for seed in range(2):  # q and k at different learning rates: nothing to compare
        write_run(res, run_doc("smt", 0.01, seed, 50.0, method_extra={"projections": ["q"]}))
        write_run(res, run_doc("smt", 0.01, seed, 50.0, method_extra={"projections": ["k"], "lr": 1e-3}))
    analyze([str(res)], tmp_path / "out", Options(n_boot=10))
    assert "paper_qkv" not in (tmp_path / "out" / "report.md").read_text()
    assert not (tmp_path / "out" / "figures" / "tiny-llama-bundled" / "paper_qkv.png").exists()


def test_the_paper_layout_table_puts_the_published_rows_beside_ours(tmp_path):
    res = tmp_path / "results"
    for seed in range(2):
        write_run(res, run_doc("smt", 0.0071, seed, 80.0 + seed, model="llama3-8b", data="commonsense170k", tasks=CS8))
    analyze([str(res)], tmp_path / "out", Options(n_boot=10))
    part = (tmp_path / "out" / "report.md").read_text().split("### Paper layout: accuracy per task", 1)[1]
    head = next(line for line in part.splitlines() if line.startswith("| method"))
    assert head.startswith("| method | trainable % | runs | boolq | piqa | social_i_qa | hellaswag | winogrande | "
                           "ARC-Easy | ARC-Challenge | openbookqa | Avg. |")
    assert "| smt | 0.71 | 2 | 80.5 | 80.5 |" in part
    assert "| SMT(0.71%) | 0.71 | published | 75.7 | 88.4 | 81.4 | 96.2 | 88.2 | 92.7 | 83.2 | 88.6 | 86.8 |" in part
    assert "| LoRA r=32 (lr 3e-4) | 0.705 | published | 70.8 | 85.2 |" in part
    assert "HectorHHZ/Sparse_Matrix_Tuning README.md" in part and "NVlabs/DoRA" in part
    assert "llama-7b" not in part.split("[1]", 1)[0]  # another model's rows are not mixed in


# --- train.epochs (the recipes' 3 epochs) ---------------------------------------------------------
@pytest.mark.slow
def test_epochs_set_the_steps_from_the_tokenised_set_and_null_keeps_the_run_ids(compose, tmp_path, smollm2_path):
    from smt_bench import provenance
    from smt_bench.run import execute

    cfg = compose(*TINY, "method=smt", "budget.fraction=0.001", "method.warmup_steps=1", "data.n_train_per_task=10",
                  "train.epochs=0.2", "eval.enabled=false", f"results.dir={tmp_path}")
    r = execute(cfg)
    assert r.run_info.status == "finished", r.run_info.error
    assert r.train_info.steps == 2 and len(r.train_info.loss_curve) == 2  # ceil(0.2 × 60 / 8)
    node = {"train": {"max_steps": 20, "epochs": None}, "seed": 0}
    assert provenance.config_hash(node) == provenance.config_hash({"train": {"max_steps": 20}, "seed": 0})
    assert provenance.config_hash({**node, "train": {"max_steps": 20, "epochs": 3}}) != provenance.config_hash(node)
