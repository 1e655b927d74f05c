"""SpIEL: the budget as entries spread over the matrices, drop and regrow by their criteria (SpIEL-AG: accumulated
gradients, AdamW moments seeded; SpIEL-MA: SM3 row·column products), the active set keeps its size and only active
entries move, a checkpoint mid-window or at a reselection resumes bitwise, and the export is the merged model.
(The 20 steps through the shared trainer, frozen weights, memory and merged logits: tests/test_methods.py.)"""
from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from smt_bench.checkpoint import CheckpointDir
from smt_bench.data.batches import BatchStream, encode
from smt_bench.data.bundled import BundledSuite
from smt_bench.errors import BudgetUnreachable, UserError
from smt_bench.loggers import NullLogger
from smt_bench.methods.base import Context
from smt_bench.methods.spiel import (SpIEL, SparseDeltaLinear, allocate, apply_export, regrow_by_gradient,
                                     regrow_by_momentum)
from smt_bench.models import shapes_of
from smt_bench.trainer import train

TINY = ["model=tiny-llama", "device=cpu", "eval.enabled=false"]
POOL = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)  # tiny-llama: q, o 64×64; k, v 32×64; gate, up, down 8,192
CPU = torch.device("cpu")


def _method(**kw) -> SpIEL:
    return SpIEL(**{"name": "spiel", "lr": 1e-2, **kw})


# --- (1) the plan -----------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [1, 13, 16_099, 40_001, POOL])
def test_the_plan_meets_each_budget_exactly_in_proportion_to_the_matrices(budget, _tiny_llama_pristine):
    model = _tiny_llama_pristine[0]
    m = _method()
    plan = m.plan(shapes_of(model), budget)
    assert plan.achieved_params == budget == plan.detail["entries"]
    counts = m.counts(model, budget)
    assert sum(counts.values()) == budget
    sizes = {n: mod.weight.numel() for n, mod in model.named_modules() if n in counts}
    assert all(abs(k - budget * sizes[n] / POOL) < 1 for n, k in counts.items())  # largest remainders
    assert allocate([3, 3, 3], 4) == [2, 1, 1] and allocate([1, 2], 3) == [1, 2]


def test_an_unreachable_budget_or_bad_key_fails_in_one_line_before_weights_load(_tiny_llama_pristine):
    shapes = shapes_of(_tiny_llama_pristine[0])
    for budget in (0, POOL + 1):
        with pytest.raises(BudgetUnreachable, match=rf"budget of {budget:,} params is unreachable for spiel.*"
                                                    rf"hold {POOL:,} weights.*choose another budget") as e:
            _method().plan(shapes, budget)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="qkv_proj matches no linear layer; choose from down_proj, gate_proj"):
        _method(target_modules=["q_proj", "qkv_proj"]).plan(shapes, 100)
    with pytest.raises(UserError, match=r"method.accumulation_steps=5: must be less than method.reselect_every=5"):
        _method(accumulation_steps=5)


# --- (3) the criteria -------------------------------------------------------------------------------
def test_drop_takes_the_smallest_deltas_and_regrow_the_best_candidates_not_kept():
    values = torch.tensor([0.5, -0.01, 0.3, 0.02, -0.4])
    indices = torch.tensor([10, 11, 12, 13, 14], dtype=torch.int32)
    cand = torch.tensor([3, 11, 12, 20, 25])
    # slots 1 and 3 (|δ| 0.01, 0.02) drop; 12 stays active and cannot grow; 25 and 3 are the best of the rest,
    # the best into the smallest slot
    slots, pos, again = regrow_by_gradient(values, indices, 2, cand, torch.tensor([0.9, 0.8, 5.0, 0.1, 0.95]))
    assert slots.tolist() == [1, 3] and cand[pos].tolist() == [25, 3] and again == 0
    # 11 is dropped and grown at once: it stays in its slot with its value; 25 takes slot 3
    slots, pos, again = regrow_by_gradient(values, indices, 2, cand, torch.tensor([0.9, 2.0, 5.0, 0.1, 0.95]))
    assert slots.tolist() == [3] and cand[pos].tolist() == [25] and again == 1
    # SpIEL-MA: the inactive entries of largest score (the active 12 and 14 score more but are taken)
    score = torch.zeros(30)
    score[[12, 14, 7, 29, 2]] = torch.tensor([9.0, 8.0, 3.0, 2.0, 1.0])
    slots, new = regrow_by_momentum(values, indices, 2, score)
    assert slots.tolist() == [1, 3] and new.tolist() == [7, 29]


class _One(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, 5, bias=False)

    def forward(self, x):
        return self.proj(x)


def test_the_window_collects_the_dense_gradient_and_a_reselection_seeds_the_regrown_moments():
    """The candidates are the top-k |dL/dW| of the window's first micro-batch; after the window the n smallest
    deltas make way for the best candidates not still active, whose Adam moments are the window's mean (squared)
    gradient times (1 − βᵗ); outside a window the values' gradient is dL/dW at the active entries."""
    m = _method(target_modules=["proj"], reselect_every=3, accumulation_steps=1, initial_rate=0.6,
                rate_policy="cosine", decay_steps=1000)  # rate 0.6·(1 + cos(π/1000))/2: 4 of 8 entries
    model = _One()
    dense = copy.deepcopy(model.proj)
    tuned = m.prepare(model, m.plan(shapes_of(model), 8), Context(batches=None, loss=None, device=CPU, seed=1))
    layer = tuned.layers["proj"]
    opt = tuned.build_optimizer()
    xs = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    assert tuned.begin_step(1, opt) is False  # a window step (accumulation_steps=1)
    model(xs[0]).square().sum().backward()
    opt.step()
    opt.zero_grad()
    dense(xs[0]).square().sum().backward()  # the weight before step 1 is the base: the same gradient
    g = dense.weight.grad.view(-1)
    win = tuned.windows["proj"]
    assert win.candidates.tolist() == sorted(torch.topk(g.abs(), 8).indices.tolist()) and win.steps == 1
    assert torch.allclose(win.grad_sum, g[win.candidates]) and torch.allclose(win.grad_sq, g[win.candidates] ** 2)
    with torch.no_grad():  # known deltas: slots 1, 3, 5, 7 are the smallest
        layer.spiel_delta.copy_(torch.tensor([0.5, -0.01, 0.3, 0.02, -0.4, 0.03, 0.6, -0.04]))
    old = layer.spiel_indices.long().clone()
    remaining = set(old[[0, 2, 4, 6]].tolist())
    order = torch.sort(win.grad_sum.abs(), descending=True, stable=True).indices.tolist()
    grown = [int(win.candidates[i]) for i in order if int(win.candidates[i]) not in remaining][:4]
    assert tuned.begin_step(2, opt) is True  # the reselection: 1 step done
    new = layer.spiel_indices.long()
    assert set(new.tolist()) == remaining | set(grown) and len(set(new.tolist())) == 8
    moved = (new != old).nonzero().squeeze(1)
    assert set(moved.tolist()) <= {1, 3, 5, 7} and torch.equal(layer.spiel_delta[moved], torch.zeros(len(moved)))
    kept = [i for i in (1, 3, 5, 7) if i not in moved.tolist()]
    assert all(int(old[i]) in grown for i in kept)  # a dropped entry grown again keeps its slot and value
    st, pos = opt.state[layer.spiel_delta], torch.searchsorted(win.candidates.long(), new[moved])
    assert float(st["step"]) == 1
    assert torch.equal(st["exp_avg"][moved], win.grad_sum[pos] * (1 - 0.9))
    assert torch.equal(st["exp_avg_sq"][moved], win.grad_sq[pos] * (1 - 0.999))
    assert tuned.windows == {} and layer.observer is None and tuned.history[-1]["replaced"] == len(moved)
    check = nn.Linear(6, 5, bias=False)
    with torch.no_grad():
        check.weight.copy_(layer.delta_weight(layer.spiel_delta, torch.float32))
    model(xs[1]).square().sum().backward()
    check(xs[1]).square().sum().backward()
    assert torch.allclose(layer.spiel_delta.grad, check.weight.grad.view(-1)[new], atol=1e-6)


def test_under_bf16_autocast_it_computes_as_the_dense_layer_does():
    """The trainer's CUDA path (bf16 autocast), here on the CPU's autocast: the delta is added to the fp32
    weight, then the sum is cast; forward and the gradients are those of a plain nn.Linear under autocast."""
    model = _One()
    dense = copy.deepcopy(model.proj)
    m = _method(target_modules=["proj"])
    tuned = m.prepare(model, m.plan(shapes_of(model), 8), _context())
    layer = tuned.layers["proj"]
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = model(xa), dense(xb)
    assert ya.dtype == yb.dtype == torch.bfloat16 and torch.equal(ya, yb)
    ya.float().square().sum().backward()
    yb.float().square().sum().backward()
    assert torch.equal(xa.grad, xb.grad) and layer.spiel_delta.grad.dtype == torch.float32
    assert torch.equal(layer.spiel_delta.grad, dense.weight.grad.view(-1)[layer.spiel_indices.long()])


# --- (2) and (4): training through the shared trainer ------------------------------------------------
@pytest.fixture(scope="module")
def setup(_tiny_llama_pristine, tokenizer):
    ex = encode(BundledSuite(n_train_per_task=2, n_val_per_task=0, n_test_per_task=0).load().train, tokenizer,
                max_len=64, train_on_inputs=False)
    return _tiny_llama_pristine[0], ex, tokenizer.pad_token_id


def _run(setup, compose, tuned, steps, accumulation=1, save=None, resume=None):
    model, ex, pad = setup
    cfg = compose(*TINY, "method=spiel", f"train.max_steps={steps}", "train.batch_size=2", "train.max_len=64",
                  "train.warmup_ratio=0", "train.eval_every=0", f"train.grad_accum={accumulation}",
                  f"train.checkpoint_every={save[0] if save else 0}")
    torch.manual_seed(0)
    return train(tuned, BatchStream(ex, 2, pad, seed=0), [], cfg.train, CPU, NullLogger(),
                 save=save[1] if save else None, resume=resume)


def _context(accumulation=1):
    return Context(batches=None, loss=None, device=CPU, accumulation=accumulation, seed=3)


def test_the_active_set_keeps_its_size_and_only_active_entries_move(setup, compose):
    model, _, _ = setup
    m = _method(reselect_every=3, accumulation_steps=1, lr=3e-2)
    plan = m.plan(shapes_of(model), 9_000)
    planned = m.counts(model, 9_000)
    tuned = m.prepare(copy.deepcopy(model), plan, _context())
    ever = {n: set(l.spiel_indices.tolist()) for n, l in tuned.layers.items()}
    begin = tuned.begin_step

    def spy(step, opt):
        changed = begin(step, opt)
        for n, layer in tuned.layers.items():
            idx = layer.spiel_indices.tolist()
            assert len(idx) == len(set(idx)) == planned[n]  # no entry twice, never more or fewer
            ever[n] |= set(idx)
        return changed

    tuned.begin_step = spy
    _run(setup, compose, tuned, 9)
    assert [h["step"] for h in tuned.history] == [2, 5, 8] and all(h["replaced"] > 0 for h in tuned.history)
    active = {n: set(l.spiel_indices.tolist()) for n, l in tuned.layers.items()}
    assert any(ever[n] - active[n] for n in ever)  # entries were dropped
    merged = tuned.merged()
    base = dict(model.named_modules())
    for n in planned:
        moved = set((merged.get_submodule(n).weight != base[n].weight).view(-1).nonzero().squeeze(1).tolist())
        assert moved and moved <= active[n] <= ever[n]  # a dropped entry is back at its pretrained value


@pytest.mark.parametrize("variant, accumulation, resume_at", [("ag", 2, (4, 8)), ("ma", 1, (2,))])
def test_a_checkpoint_mid_window_or_at_a_reselection_resumes_bitwise(variant, accumulation, resume_at, setup,
                                                                     compose, tmp_path):
    """reselect_every 3, accumulation_steps 2: windows are steps 1-2, 4-5, 7-8; reselections begin steps 3, 6, 9.
    Checkpoints every 2 steps: after step 4 one step of a window is collected; after steps 2 and 8 the next step
    begins by reselecting. Each resumed run (on a fresh model, through the checkpoint's files for step 8) is the
    checkpointed run from there on, bitwise: losses, deltas, indices, window statistics, the reselections."""
    model, _, _ = setup
    m = _method(variant=variant, reselect_every=3, accumulation_steps=2)
    plan = m.plan(shapes_of(model), 9_000)
    whole_tuned = m.prepare(copy.deepcopy(model), plan, _context(accumulation))
    saved: list = []
    whole = _run(setup, compose, whole_tuned, 9, accumulation, save=(2, lambda c: saved.append(copy.deepcopy(c))))
    assert [c.step for c in saved] == [2, 4, 6, 8]
    assert [h["step"] for h in whole_tuned.history] == [3, 6, 9] and all(h["replaced"] for h in whole_tuned.history)
    for at in resume_at:
        ckpt = saved[at // 2 - 1]
        assert bool(ckpt.tuned_meta["window_steps"]) == (variant == "ag")
        if at == 8:
            ckpts = CheckpointDir(tmp_path / "ckpt", keep=1)
            ckpts.save(ckpt)
            ckpt = ckpts.load()
        tuned = m.resume(copy.deepcopy(model), plan, _context(accumulation), ckpt.tuned, ckpt.tuned_meta)
        again = _run(setup, compose, tuned, 9, accumulation, resume=ckpt)
        assert again["resumed_from_step"] == at and again["loss_curve"] == whole["loss_curve"]
        assert tuned.report() == whole_tuned.report()
        a, b = whole_tuned.state_dict()[0], tuned.state_dict()[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- (5) the export -----------------------------------------------------------------------------------
def test_the_export_applied_to_a_fresh_base_is_the_merged_model(_tiny_llama_pristine, tmp_path):
    model = _tiny_llama_pristine[0]
    m = _method()
    tuned = m.prepare(copy.deepcopy(model), m.plan(shapes_of(model), 5_000), _context())
    with torch.no_grad():
        for layer in tuned.layers.values():
            layer.spiel_delta.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(layer.spiel_delta)))
    (path,) = tuned.export(tmp_path, "tiny-llama")
    assert path.endswith("spiel_delta.safetensors")
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        tuned_logits = tuned.model(input_ids=ids).logits
        merged = tuned.merged()
        assert not any(isinstance(mod, SparseDeltaLinear) for mod in merged.modules())
        applied = apply_export(copy.deepcopy(model), path)
        a, b = merged.state_dict(), applied.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert not torch.equal(a["model.layers.0.mlp.down_proj.weight"], model.state_dict()["model.layers.0.mlp.down_proj.weight"])
        assert torch.equal(applied(input_ids=ids).logits, tuned_logits)  # forward sums W + δ as the merge does
