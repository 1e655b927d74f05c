"""HFT (Half Fine-Tuning): half of each decoder layer's matrices per category, an exact count that is the same
at every draw (also with grouped-query attention), exactly the drawn tensors change, a re-draw frees or keeps
Adam moments as configured, a resumed run is bitwise the uninterrupted one, and a budget sweep is one job.
(Its 20-step run, memory accounting and merge with every other method: tests/test_methods.py.)"""
from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import instantiate

from smt_bench.errors import UserError
from smt_bench.methods.hft import ATTENTION, HFT, MLP, NORMS
from smt_bench.models import TinyLlama, meta_shapes, shapes_of

TINY = ["model=tiny-llama", "device=cpu", "eval.enabled=false"]
# SmolLM2-135M: 30 layers, hidden 576, MLP 1536, GQA 9/3 heads (q, o 576x576; k, v 192x576), tied embedding
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3)


def _module_sizes(model, layer: int) -> dict[str, int]:
    return {n.rsplit(".", 1)[-1]: sum(p.numel() for p in m.parameters())
            for n, m in model.model.layers[layer].named_modules() if n}


@pytest.mark.parametrize("kw,n_total,n_emb", [
    ({}, 3_219_776, 49152 * 64 + 64),                       # tiny-llama: q, o 64x64; k, v 32x64; MLP 128
    (SMOLLM2, 134_515_008, 49152 * 576 + 576),
])
def test_the_plan_is_half_of_each_category_per_layer(kw, n_total, n_emb):
    shapes = meta_shapes(TinyLlama(**kw).hf_config())
    assert shapes.total_params == n_total
    model = shapes.meta_model()
    n_layers = len(model.model.layers)
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    with_emb = HFT(name="hft", lr=1e-4).plan(shapes, n_total // 2)
    blocks = HFT(name="hft", lr=1e-4, train_embeddings=False).plan(shapes, n_total // 2)
    # even layer counts: exactly half of the decoder layers; the embedding (tied head) and final norm on top
    assert blocks.achieved_params * 2 == layer_params
    assert with_emb.achieved_params == blocks.achieved_params + n_emb
    assert with_emb.detail["mlp_two_layers"] == n_layers // 2
    # every draw: 2 of 4 attention, 2 or 1 of 3 MLP (half the layers each), 1 of 2 norms; the count is the plan's
    tuned = HFT(name="hft", lr=1e-4, redraw_every=1, selection_seed=3).prepare(model, with_emb, None)  # meta
    sizes = _module_sizes(model, 0)
    whole_pairs = 0
    for d in range(12):
        sel = tuned.draw(d)
        assert [sum(k in ATTENTION for k in s) for s in sel] == [2] * n_layers
        assert sorted(sum(k in MLP for k in s) for s in sel) == [1] * (n_layers - n_layers // 2) + [2] * (n_layers // 2)
        assert [sum(k in NORMS for k in s) for s in sel] == [1] * n_layers
        assert sum(sizes[k] for s in sel for k in s) == blocks.achieved_params
        whole_pairs += sum(set(s) & set(ATTENTION) in ({"q_proj", "o_proj"}, {"k_proj", "v_proj"}) for s in sel)
    assert whole_pairs > 0  # GQA: q+o and k+v are drawn too (as often as each other), not only a large + a small
    assert sum(p.numel() for p in tuned.trainable_parameters()) == with_emb.achieved_params


def test_the_draws_are_per_layer_and_depend_only_on_seed_and_index():
    shapes = meta_shapes(TinyLlama(num_hidden_layers=8).hf_config())
    m = HFT(name="hft", lr=1e-3, redraw_every=2, selection_seed=5)
    plan = m.plan(shapes, 0)
    tuned, again = m.prepare(shapes.meta_model(), plan, None), m.prepare(shapes.meta_model(), plan, None)
    assert [tuned.draw(d) for d in range(4)] == [again.draw(d) for d in range(4)]
    assert tuned.draw(0) != tuned.draw(1)
    assert len({tuple(s) for s in tuned.draw(0)}) > 1  # each layer draws its own
    other = HFT(name="hft", lr=1e-3, redraw_every=2, selection_seed=6).prepare(shapes.meta_model(), plan, None)
    assert other.draw(0) != tuned.draw(0)


def _step(tuned, ids):
    tuned.model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("keep", [False, True])
def test_exactly_the_drawn_matrices_change_and_a_redraw_frees_or_keeps_moments(keep):
    """Every step: the trainable tensors are the draw's (plus embedding and final norm), each of them changes and
    every other tensor stays bit-identical, across re-draws too; a matrix that leaves drops its Adam moments
    (optimizer_state=keep: keeps them, and continues from them when it is drawn again)."""
    model = TinyLlama(num_hidden_layers=4).load()[0]
    m = HFT(name="hft", lr=1e-2, redraw_every=2, selection_seed=1, optimizer_state="keep" if keep else "reset")
    plan = m.plan(shapes_of(model), 0)
    tuned = m.prepare(model, plan, None)
    opt = tuned.build_optimizer()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    names = dict(model.named_parameters())
    ever, left_and_back = set(), set()
    adam_steps = {n: 0 for n in names}  # the step count each tensor's Adam state should have
    for step in range(1, 11):
        before_active = {n for n, p in names.items() if p.requires_grad}
        changed = tuned.begin_step(step, opt)
        active = {n for n, p in names.items() if p.requires_grad}
        assert changed == (active != before_active)
        assert sum(p.numel() for p in tuned.trainable_parameters()) == plan.achieved_params
        drawn = tuned.report()["draws"][-1]
        assert drawn["from_step"] == 2 * ((step - 1) // 2) + 1
        expect = {n for n in names if n in ("model.embed_tokens.weight", "model.norm.weight")
                  or (n.startswith("model.layers.") and n.split(".")[-2] in drawn["layers"][int(n.split(".")[2])])}
        assert active == expect
        left_and_back |= {n for n in active if n in ever and n not in before_active}
        for n in before_active - active:  # their moments: gone, or (keep) still there
            assert (names[n] in opt.state) == keep
            adam_steps[n] = adam_steps[n] if keep else 0
        old = {n: p.detach().clone() for n, p in names.items()}
        _step(tuned, ids)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for n, p in names.items():
            assert (not torch.equal(p, old[n])) == (n in active), (step, n)
        assert {id(p) for p in opt.state} >= {id(names[n]) for n in active}
        if not keep:
            assert {id(p) for p in opt.state} == {id(names[n]) for n in active}
        ever |= active
        for n in active:
            adam_steps[n] += 1
    assert left_and_back  # some matrix left the trainable set and was drawn again
    # keep: a returning matrix's Adam step count runs on over every step it trained; reset: since its return
    assert {n: int(opt.state[p]["step"]) for n, p in names.items() if p in opt.state} == \
        {n: c for n, c in adam_steps.items() if c and (keep or n in active)}


def test_a_resumed_hft_run_is_the_uninterrupted_run(_tiny_llama_pristine, tokenizer, compose):
    """Checkpointed at step 4, the end of the second draw (redraw_every 2), resumed on a fresh model into a third
    draw: the same losses and weights, bitwise, and the same draws in the report."""
    from smt_bench.data.batches import BatchStream, encode
    from smt_bench.data.bundled import BundledSuite
    from smt_bench.loggers import NullLogger
    from smt_bench.trainer import train

    cfg = compose(*TINY, "method=hft", "method.redraw_every=2", "method.selection_seed=4", "train.max_steps=6",
                  "train.batch_size=2", "train.max_len=64", "train.warmup_ratio=0", "train.eval_every=0",
                  "method.lr=1e-3")
    ex = encode(BundledSuite(n_train_per_task=1, n_val_per_task=0, n_test_per_task=0).load().train, tokenizer,
                max_len=64, train_on_inputs=False)
    method = instantiate(cfg.method, _convert_="all")
    model = copy.deepcopy(_tiny_llama_pristine[0])
    plan = method.plan(shapes_of(model), 0)
    cpu = torch.device("cpu")

    def run(tuned, resume=None, saved=None):
        stream = BatchStream(ex, 2, tokenizer.pad_token_id, seed=0)
        torch.manual_seed(0)
        save = (lambda c: saved.append(copy.deepcopy(c))) if saved is not None else None
        return train(tuned, stream, [], cfg.train, cpu, NullLogger(), save=save, resume=resume)

    first = method.prepare(copy.deepcopy(model), plan, None)
    whole = run(first)
    assert len({str(s) for s in first.draws.values()}) == 3  # three different draws
    saved: list = []
    cfg.train.checkpoint_every = 4
    run(method.prepare(copy.deepcopy(model), plan, None), saved=saved)
    (ckpt,) = saved
    assert ckpt.step == 4 and ckpt.tuned_meta["period"] == 1
    tuned = method.resume(copy.deepcopy(model), plan, None, ckpt.tuned, ckpt.tuned_meta)
    assert tuned.active == first.draws[1]
    again = run(tuned, resume=ckpt)
    assert again["loss_curve"] == whole["loss_curve"] and again["resumed_from_step"] == 4
    assert again["memory_breakdown_bytes"]["optimizer"] == whole["memory_breakdown_bytes"]["optimizer"]
    assert again["memory_breakdown_bytes"]["optimizer"] == 8 * plan.achieved_params
    a, b = dict(first.model.named_parameters()), dict(tuned.model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert tuned.report() == first.report()
    assert tuned.merged() is tuned.model


def test_a_checkpoint_of_another_selection_seed_is_refused(tiny_llama):
    model, _ = tiny_llama
    m = HFT(name="hft", lr=1e-3, selection_seed=1)
    tensors, meta = m.prepare(copy.deepcopy(model), m.plan(shapes_of(model), 0), None).state_dict()
    other = HFT(name="hft", lr=1e-3, selection_seed=2).prepare(model, m.plan(shapes_of(model), 0), None)
    with pytest.raises(ValueError, match="checkpoint does not match this hft run"):
        other.load_state_dict(tensors, meta)


@pytest.mark.parametrize("argv", [["method=hft", "budget=sweep"], ["budget=sweep", "method=hft"],
                                  ["-m", "budget=sweep", "method=hft", "model=tiny-llama"]])
def test_hft_budget_sweep_is_one_job_at_its_fixed_fraction(argv, compose):
    from smt_bench.__main__ import sweep_points

    jobs = sweep_points(argv)
    assert len(jobs) == 1 and [o for o in jobs[0] if o.startswith("budget.fraction=")] == ["budget.fraction=0.5"]
    cfg = compose(*jobs[0])
    assert (cfg.method.name, cfg.budget.fraction) == ("hft", 0.5)


def test_in_a_mixed_sweep_hft_is_one_run_id_with_the_exact_count(compose, tmp_path):
    from smt_bench.__main__ import sweep_points
    from smt_bench.run import Prepared

    jobs = [j for j in sweep_points(["-m", "method=lora,hft", "budget=sweep", "model=tiny-llama"]) if "method=hft" in j]
    assert len(jobs) == 4
    preps = [Prepared(compose(*j, f"results.dir={tmp_path}")) for j in jobs]
    assert {p.run_id for p in preps} == {preps[0].run_id} and "b0.5-" in preps[0].path.name
    assert {p.plan.achieved_params for p in preps} == {3_182_784}  # tiny-llama: half its layers + embedding


def test_a_model_hft_cannot_halve_fails_in_the_plan():
    class Odd(torch.nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([type("Block", (torch.nn.Module,), {})()])
            self.layers[0].fc = torch.nn.Linear(4, 4)

    from smt_bench.methods.hft import _Layout

    with pytest.raises(UserError, match="layer 0 of Odd has no q_proj, k_proj"):
        _Layout(Odd())
