"""The field beside SMT: the generic peft tuner (run ids kept, peft's own count), S2FT's heads and
channels, LISA's layer draws, and sweeps over methods that skip the budgets a method cannot meet.
(Every method's 20-step training, frozen weights and merge: tests/test_methods.py.)"""
from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from smt_bench import provenance
from smt_bench.errors import BudgetUnreachable
from smt_bench.methods.lisa import LISA
from smt_bench.methods.peft_methods import PeftTuner
from smt_bench.methods.s2ft import S2FT, ColumnSliceLinear
from smt_bench.models import TinyLlama, meta_shapes, shapes_of
from smt_bench.run import Prepared

TINY = ["model=tiny-llama", "device=cpu", "eval.enabled=false"]


# --- the generic peft tuner ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lora", "dora"])
def test_lora_and_dora_keep_the_run_ids_of_their_old_class(name, compose):
    """The same experiment hashes as it did under smt_bench.methods.peft_methods.LoRA (results/ keeps
    them: skip_finished finds the old runs); a tuner that never had the old form hashes as it is."""
    cfg = compose(*TINY, f"method={name}", "budget.fraction=0.005", "seed=3")
    prep = Prepared(cfg)
    m = prep.container["method"]
    old = {"_target_": "smt_bench.methods.peft_methods.LoRA", "name": name, "lr": m["lr"], "weight_decay": 0.0,
           "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], "alpha_ratio": 2.0,
           "dropout": 0.05, "use_dora": name == "dora"}
    assert prep.run_id == provenance.config_hash({**prep.container, "method": old})
    assert prep.container["method"]["peft_config"] == "LoraConfig"  # the result records the config as run
    pissa = Prepared(compose(*TINY, "method=pissa", "budget.fraction=0.005"))
    assert pissa.run_id == provenance.config_hash(pissa.container)


@pytest.mark.parametrize("name,fraction,size,count", [
    ("shira", 0.005, 11, 11 * 1408),   # r·(m+n) entries per target, like LoRA's count at rank r
    ("miss", 0.005, 25, 25 * 640),     # r·d_out per target: 640 output rows over the 10 targets
    ("rslora", 0.005, 11, 11 * 1408),
])
def test_each_tuner_is_sized_by_peft_s_own_count(name, fraction, size, count, compose, tiny_llama):
    model, _ = tiny_llama
    method = instantiate(compose(*TINY, f"method={name}").method, _convert_="all")
    shapes = shapes_of(model)
    plan = method.plan(shapes, round(fraction * shapes.total_params))
    assert (plan.detail["r"], plan.achieved_params) == (size, count)
    tuned = method.prepare(model, plan, None)
    assert sum(p.numel() for p in tuned.trainable_parameters()) == count


def test_peft_config_args_are_checked_before_anything_loads():
    with pytest.raises(Exception, match=r"method\.args\.lora_dropoutt: LoraConfig has no argument lora_dropoutt"):
        PeftTuner(name="x", lr=1e-4, args={"lora_dropoutt": 0.1})
    with pytest.raises(Exception, match=r"method\.peft_config=LoRAConfig: must be the name of a peft config class"):
        PeftTuner(name="x", lr=1e-4, peft_config="LoRAConfig")
    with pytest.raises(Exception, match=r"method\.args\.r: set by the budget"):
        PeftTuner(name="x", lr=1e-4, args={"r": 8})


def test_shira_above_its_dense_size_is_refused_by_peft():
    shapes = meta_shapes(TinyLlama().hf_config())
    m = PeftTuner(name="shira", lr=1e-4, peft_config="ShiraConfig", args={"mask_type": "random"})
    with pytest.raises(BudgetUnreachable, match=r"r would be 22\.87, which peft refuses \(The set rank 23"):
        m.plan(shapes, 32_198)


# --- S2FT ---------------------------------------------------------------------------------------

def test_s2ft_plan_is_whole_heads_and_channels_spread_over_the_layers():
    shapes = meta_shapes(TinyLlama().hf_config())  # o_proj 64x64 = 4 heads of 16; down_proj 64x128
    plan = S2FT(name="s2ft", lr=1e-4).plan(shapes, 16_099)
    d = plan.detail
    assert d["head_dim"] == 16 and d["attn_share"] == pytest.approx(1 / 3)  # by pool size: 4096 / (4096 + 8192)
    assert (d["heads"], d["channels"]) == (5, 172)  # 5 heads of 64x16; (16,099 - 5,120) / 64 = 171.5 -> 172
    assert plan.achieved_params == 5 * 1024 + 172 * 64 == 16_128
    assert d["heads_per_layer"] == [2, 3] and d["channels_per_layer"] == [86, 86]
    only_mlp = S2FT(name="s2ft", lr=1e-4, attn_share=0.0).plan(shapes, 16_099)
    assert (only_mlp.detail["heads"], only_mlp.achieved_params) == (0, 252 * 64)
    with pytest.raises(BudgetUnreachable, match=r"hold 64\.\.24,576 params"):
        S2FT(name="s2ft", lr=1e-4).plan(shapes, 30_000)


def test_s2ft_trains_the_selected_columns_and_saves_only_them(tiny_llama, tmp_path):
    model, _ = tiny_llama
    base = copy.deepcopy(model)
    m = S2FT(name="s2ft", lr=1e-4, strategy="weight")
    plan = m.plan(shapes_of(model), 16_099)
    tuned = m.prepare(model, plan, None)
    o = model.model.layers[1].self_attn.o_proj
    assert isinstance(o, ColumnSliceLinear) and len(o.columns) == 3 * 16
    # strategy=weight: the heads whose o_proj columns have the largest norm
    w = base.model.layers[1].self_attn.o_proj.weight
    norms = w.pow(2).reshape(64, 4, 16).sum((0, 2))
    assert sorted(set((o.columns // 16).tolist())) == sorted(torch.topk(norms, 3).indices.tolist())
    with torch.no_grad():
        for _, s in tuned._sliced():
            s.delta.normal_()
    # the export applied to the base model is the merged model
    files = tuned.export(str(tmp_path), "tiny-llama")
    saved = load_file(files[0])
    merged = copy.deepcopy(tuned).merged()
    for name, t in saved.items():
        if name.endswith(".delta"):
            mod = name.removesuffix(".delta")
            w = base.get_submodule(mod).weight.detach().clone()
            w[:, saved[mod + ".columns"]] += t
            assert torch.equal(w, merged.get_submodule(mod).weight)
    # resume rebuilds the checkpoint's columns whatever the strategy would pick now
    tensors, meta = tuned.state_dict()
    again = S2FT(name="s2ft", lr=1e-4, strategy="random").resume(copy.deepcopy(base), plan, None, tensors, meta)
    assert again.columns == tuned.columns
    assert all(torch.equal(a.delta, b.delta) for (_, a), (_, b) in zip(again._sliced(), tuned._sliced()))


# --- LISA ---------------------------------------------------------------------------------------

def test_lisa_budget_is_whole_layers():
    shapes = meta_shapes(TinyLlama(num_hidden_layers=4).hf_config())
    plan = LISA(name="lisa", lr=1e-4).plan(shapes, 80_000)
    assert plan.detail["layers"] == 2 and plan.achieved_params == 2 * 36_992
    with_emb = LISA(name="lisa", lr=1e-4, train_embeddings=True).plan(shapes, 3_200_000)
    assert with_emb.detail["non_layer_params"] == 49152 * 64 + 64  # tied embedding (= the head) and the final norm
    assert with_emb.achieved_params == 49152 * 64 + 64 + 1 * 36_992
    with pytest.raises(BudgetUnreachable, match=r"γ would be 0\.27 layers of 36,992 params; valid γ 1\.\.4"):
        LISA(name="lisa", lr=1e-4).plan(shapes, 10_000)


def test_lisa_draws_depend_on_seed_and_period_and_free_the_optimizer_state():
    model = TinyLlama(num_hidden_layers=6).load()[0]
    m = LISA(name="lisa", lr=1e-2, switch_every=2, sampling_seed=7)
    plan = m.plan(shapes_of(model), 2 * 36_992)
    tuned = m.prepare(model, plan, None)
    opt = tuned.build_optimizer()
    ids = torch.randint(0, 100, (2, 8))
    seen = []
    for step in range(1, 9):
        tuned.begin_step(step, opt)
        assert sum(p.numel() for p in tuned.trainable_parameters()) == 2 * 36_992
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        active = {id(p) for i in tuned.active for p in tuned.layers[i].parameters()}
        assert set(map(id, opt.state)) == active  # Adam moments only for the active layers
        seen.append(tuned.active)
    assert seen[0] == seen[1] and len(set(seen)) > 1  # one draw per 2 steps, not all the same
    fresh = LISA(name="lisa", lr=1e-2, switch_every=2, sampling_seed=7).prepare(
        TinyLlama(num_hidden_layers=6).load()[0], plan, None)
    assert [fresh.draw(p) for p in range(4)] == [seen[2 * p] for p in range(4)]
    assert tuned.report()["active_layers"] == [{"from_step": 2 * p + 1, "layers": list(seen[2 * p])} for p in range(4)]


# --- sweeps over methods ------------------------------------------------------------------------

@pytest.mark.slow
def test_a_sweep_over_methods_skips_a_budget_a_method_cannot_meet(cli, tmp_path):
    """LISA cannot train 0.1% of tiny-llama (one layer is 1.15%): that job is skipped, said so, and the
    rest of the grid runs; the sweep succeeds."""
    p = cli("-m", *TINY, "method=lisa,lora", "budget.fraction=0.001", "train.max_steps=1", "train.batch_size=2",
            "train.max_len=96", f"results.dir={tmp_path / 'r'}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "sweep job method=lisa: skipped: budget of 3,220 params is unreachable for lisa" in p.stderr
    assert "skipped (lisa at budget 0.001)" in p.stderr  # the job itself, as Hydra launches it
    assert "[smt-bench] sweep of 1 jobs: 1 finished" in p.stdout
    assert "[smt-bench] skipped before training, budget unreachable for the method: method=lisa" in p.stdout
    assert [f.name.split("-s0")[0] for f in (tmp_path / "r").glob("runs/*/*.json")] == ["lora-b0.001"]


def test_the_budget_table_lists_achieved_and_unreachable_points(tmp_path):
    from smt_bench.budget_table import main

    main(["--models", "tiny-llama", "--methods", "lora", "lisa", "--budgets", "0.005", "0.0115", "--out", str(tmp_path)])
    import json

    rows = {(r["method"], r["budget_fraction"]): r for r in json.loads((tmp_path / "budget_table.json").read_text())["rows"]}
    assert rows[("lora", 0.005)]["achieved_params"] == 15_488 and rows[("lora", 0.005)]["plan"]["r"] == 11
    assert rows[("lisa", 0.0115)]["achieved_params"] == 36_992
    assert rows[("lisa", 0.005)]["achieved_params"] is None
    md = (tmp_path / "budget_table.md").read_text()
    assert "| lisa | 0.5 | — | — | — | unreachable: γ would be 0.44 layers" in md
    assert "| lora | 0.5 | 0.481 | 0.9620 | 15,488 | r=11, lora_alpha=22.0 |" in md


def test_a_resumed_lisa_run_is_the_uninterrupted_run(_tiny_llama_pristine, tokenizer, compose):
    """Checkpointed at step 6, the end of the second draw (K = 3), and resumed on a fresh model into a third
    draw of the other layer: the same losses, bitwise, and Adam moments only for the active layer (the
    checkpoint says which layer the loaded moments belong to, so the switch frees them)."""
    from smt_bench.data.batches import BatchStream, encode
    from smt_bench.data.bundled import BundledSuite
    from smt_bench.loggers import NullLogger
    from smt_bench.trainer import train

    # sampling seed 2 draws layers 1, 0, 1: the resumed run starts on the prepare-time layer, not the checkpoint's
    cfg = compose(*TINY, "method=lisa", "method.switch_every=3", "method.sampling_seed=2", "train.max_steps=9",
                  "train.batch_size=2",
                  "train.max_len=96", "train.warmup_ratio=0", "train.eval_every=0", "method.lr=1e-3")
    ex = encode(BundledSuite(n_train_per_task=2, n_val_per_task=0, n_test_per_task=0).load().train, tokenizer,
                max_len=96, train_on_inputs=False)
    method = instantiate(cfg.method, _convert_="all")
    model = copy.deepcopy(_tiny_llama_pristine[0])
    plan = method.plan(shapes_of(model), 36_992)
    cpu = torch.device("cpu")

    def run(tuned, resume=None, saved=None):
        stream = BatchStream(ex, 2, tokenizer.pad_token_id, seed=0)
        torch.manual_seed(0)
        save = (lambda c: saved.append(copy.deepcopy(c))) if saved is not None else None  # as written to disk
        return train(tuned, stream, [], cfg.train, cpu, NullLogger(), save=save, resume=resume)

    first = method.prepare(copy.deepcopy(model), plan, None)
    whole = run(first)
    assert first.draws == {0: [1], 1: [0], 2: [1]}
    saved = []
    cfg.train.checkpoint_every = 6
    run(method.prepare(copy.deepcopy(model), plan, None), saved=saved)
    (ckpt,) = saved
    assert ckpt.step == 6 and ckpt.tuned_meta["active"] == first.draws[1]
    tuned = method.resume(copy.deepcopy(model), plan, None, ckpt.tuned, ckpt.tuned_meta)
    again = run(tuned, resume=ckpt)
    assert again["loss_curve"] == whole["loss_curve"] and again["resumed_from_step"] == 6
    assert again["memory_breakdown_bytes"]["optimizer"] == whole["memory_breakdown_bytes"]["optimizer"] == 8 * 36_992
