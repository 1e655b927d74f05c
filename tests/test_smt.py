"""SMT: block gradients against dense autograd (float64), frozen weights, saved bytes, selection,
warm-up side effects, merge and delta round-trips."""
import copy
import itertools

import pytest
import torch
from torch import nn

from smt_bench.kernels import get_backend
from smt_bench.methods.base import Context
from smt_bench.methods.smt import SMT
from smt_bench.methods.smt.layer import SharedInput, SMTLinear
from smt_bench.methods.smt.scoring import block_score
from smt_bench.methods.smt.selection import select
from smt_bench.models import TinyLlama, shapes_of
from smt_bench.errors import UserError

TORCH = get_backend("torch")


def _smt_layers(linears, sels, B, threshold=0.8):
    """One shared input for a group of linears reading the same x, as the method builds it."""
    union = torch.unique(torch.cat([torch.tensor(s)[:, 1] for s in sels]))
    shared = SharedInput(union, linears[0].in_features // B, B, threshold)
    return [SMTLinear(l, torch.tensor(s)[:, 0], torch.tensor(s)[:, 1], B, shared, TORCH)
            for l, s in zip(linears, sels)]


@pytest.mark.parametrize("seed,three_d,bias,threshold", [(0, True, False, 0.8), (1, False, True, 0.8),
                                                         (2, True, True, 1.1), (3, True, False, 0.0)])
def test_block_grad_equals_dense_autograd_float64(seed, three_d, bias, threshold):
    g = torch.Generator().manual_seed(seed)
    B, d_in = 4, 24
    # q (24x24) and GQA-sized k, v (8x24) read one input, as in attention
    dense = [nn.Linear(d_in, d, bias=bias, dtype=torch.float64) for d in (24, 8, 8)]
    for l in dense:
        nn.init.normal_(l.weight, generator=g)
    sels = [[(0, 1), (0, 3), (2, 1), (5, 5)], [(1, 1), (0, 2)], [(1, 3)]]  # shared rows and columns
    smt = _smt_layers([copy.deepcopy(l) for l in dense], sels, B, threshold)
    x = torch.randn((3, 7, d_in) if three_d else (11, d_in), dtype=torch.float64, generator=g)
    xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss_d = sum((l(xd) * (i + 1)).sin().sum() for i, l in enumerate(dense))
    loss_s = sum((l(xs) * (i + 1)).sin().sum() for i, l in enumerate(smt))
    loss_d.backward()
    loss_s.backward()
    torch.testing.assert_close(loss_s, loss_d, rtol=0, atol=0)
    torch.testing.assert_close(xs.grad, xd.grad, rtol=1e-12, atol=1e-12)
    for l, s, sel in zip(dense, smt, sels):
        assert s.weight.grad is None and (s.bias is None or s.bias.grad is None)
        for i, (r, c) in enumerate(sel):
            torch.testing.assert_close(s.blocks.grad[i], l.weight.grad[r * B:(r + 1) * B, c * B:(c + 1) * B],
                                       rtol=1e-12, atol=1e-12)


def test_saved_bytes_are_the_selected_columns_only():
    B, d_in, T = 8, 64, 10
    lin = [nn.Linear(d_in, 64, bias=False), nn.Linear(d_in, 16, bias=False), nn.Linear(d_in, 16, bias=False)]
    sels = [[(0, 1), (3, 1)], [(1, 5)], [(0, 1)]]  # column blocks {1, 5}: 2 of 8, shared by q/k/v
    smt = _smt_layers(lin, sels, B)
    x = torch.randn(T, d_in, requires_grad=True)
    h = x * 2  # the shared input is an intermediate, as in a transformer
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [l(h) for l in smt]
    smt_saved = [t for t in saved if t.shape != ()]  # drop the mul's scalar
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in smt_saved}
    assert sum(storages.values()) == T * 2 * B * 4  # one copy of 2 column-blocks, fp32
    assert all(t.untyped_storage().data_ptr() != h.untyped_storage().data_ptr() for t in smt_saved)
    # the full input is not kept alive by the SMT layers once the caller drops it
    import weakref
    ref = weakref.ref(h)
    del h, saved, smt_saved
    sum(o.sum() for o in outs).backward()
    assert ref() is None


def test_selection_equals_brute_force_topk():
    g = torch.Generator().manual_seed(0)
    scores = {"a.q_proj": torch.rand(3, 4, generator=g), "a.k_proj": torch.rand(1, 4, generator=g),
              "b.v_proj": torch.rand(2, 2, generator=g)}
    for k in (1, 5, 12, 20):
        chosen = select(scores, k, "global")
        got = {(n, int(r), int(c)) for n, s in chosen.items() for r, c in s.tolist()}
        allb = [(float(v[r, c]), n, r, c) for n, v in scores.items() for r, c in itertools.product(*map(range, v.shape))]
        want = {(n, r, c) for _, n, r, c in sorted(allb, key=lambda t: -t[0])[:k]}
        assert got == want
    per = select(scores, 10, "per_matrix")
    assert [len(per[n]) for n in scores] == [6, 2, 2]  # 12:4:4 of 20 blocks
    pools = select(scores, 8, "attn_mlp", attn_share=0.5)
    assert sum(len(v) for v in pools.values()) == 8


def test_block_scores():
    g = (torch.arange(16.0).reshape(4, 4) - 8) * torch.tensor([1.0, -1.0, 1.0, -1.0])  # mixed signs per block
    assert torch.equal(block_score(g, 2, "abs_mean"), torch.tensor([[5.5, 3.5], [2.5, 4.5]]))
    assert torch.equal(block_score(g, 2, "mean_abs"), torch.full((2, 2), 0.5))
    assert torch.equal(block_score(g, 2, "l1"), torch.tensor([[22.0, 14.0], [10.0, 18.0]]))
    torch.testing.assert_close(block_score(g, 2, "l2")[0, 0], torch.tensor(138.0).sqrt())


def _tiny():
    model, _ = TinyLlama(vocab_size=256).load()
    return model


def _warmup(n_batches=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = [{"input_ids": torch.randint(0, 256, (2, 12), generator=g)} for _ in range(n_batches)]
    for b in batches:
        b["labels"] = b["input_ids"].clone()
    return Context(batches=lambda n: iter(batches[:n]), loss=lambda m, b: m(**b).loss,
                   device=torch.device("cpu")), batches


def test_score_only_warmup_leaves_no_grad_no_state_no_change():
    model = _tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = SMT(name="smt", lr=1e-2, block_size=16, warmup_steps=3)
    plan = m.plan(shapes_of(model), 20 * 256)
    warm, _ = _warmup()
    tuned = m.prepare(model, plan, warm)
    for n, p in model.named_parameters():
        if not n.endswith("blocks"):
            assert p.grad is None and not p.requires_grad, n
            assert torch.equal(p, before[n]), n
    assert sum(p.numel() for p in tuned.trainable_parameters()) == plan.achieved_params == 20 * 256


def test_training_changes_only_selected_blocks_and_merge_roundtrips(tmp_path):
    model = _tiny()
    ref = copy.deepcopy(model)
    m = SMT(name="smt", lr=1e-2, block_size=16, warmup_steps=2, projections=["q", "k", "v", "down"])
    plan = m.plan(shapes_of(model), 12 * 256)
    warm, batches = _warmup()
    tuned = m.prepare(model, plan, warm)
    opt = tuned.build_optimizer()
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.endswith("blocks"))
    for b in batches:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    # optimizer state exists only for the blocks
    assert len(opt.state) == len(tuned.layers)
    assert all(p.shape[1:] == (16, 16) and st["exp_avg"].shape == p.shape for p, st in opt.state.items())
    sel = {(n, r, c) for n, l in tuned.layers.items() for r, c in zip(l.rows.tolist(), l.cols.tolist())}
    changed = set()
    for name, p in ref.named_parameters():
        q = model.get_parameter(name)
        if name.rsplit(".", 1)[0] in tuned.layers and name.endswith("weight"):
            layer = tuned.layers[name.rsplit(".", 1)[0]]
            diff = (q != p).unflatten(0, (-1, 16)).unflatten(2, (-1, 16)).any(3).any(1)
            changed |= {(layer_name, r, c) for layer_name in [name.rsplit(".", 1)[0]]
                        for r, c in diff.nonzero().tolist()}
            for r, c in zip(layer.rows.tolist(), layer.cols.tolist()):  # blocks hold the written-back weight
                assert torch.equal(q[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16], layer.blocks[
                    [i for i, rc in enumerate(zip(layer.rows.tolist(), layer.cols.tolist())) if rc == (r, c)][0]])
        else:
            assert torch.equal(q, p), name  # everything else bit-identical
    assert changed and changed <= sel and len(changed) > len(sel) // 2
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    from smt_bench.methods.smt.export import apply_delta, save_delta

    path = tmp_path / "delta.safetensors"
    save_delta(tuned.layers, tuned.block_size, path, base_model="tiny-llama")
    merged = tuned.merged()
    assert not any(isinstance(x, SMTLinear) for x in merged.modules())
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, logits)
        fresh = apply_delta(copy.deepcopy(ref), path)
        assert torch.equal(fresh(input_ids=ids).logits, logits)


def test_update_warmup_trains_everything_then_freezes():
    model = _tiny()
    before = model.model.embed_tokens.weight.detach().clone()
    m = SMT(name="smt", lr=1e-2, block_size=16, warmup_steps=2, warmup_mode="update", warmup_lr=1e-2)
    warm, _ = _warmup()
    m.prepare(model, m.plan(shapes_of(model), 10 * 256), warm)
    assert not torch.equal(model.model.embed_tokens.weight, before)
    assert all(p.grad is None for p in model.parameters())


def test_bad_block_size_and_budget_errors():
    shapes = shapes_of(_tiny())
    with pytest.raises(UserError, match=r"no block size <= method.block_size=8 divides .*\[32, 64\].* at least 16"):
        SMT(name="smt", lr=1e-4, block_size=8).plan(shapes, 10_000)
    with pytest.raises(UserError, match="only 64 blocks"):
        SMT(name="smt", lr=1e-4, block_size=16).plan(shapes, 65 * 256)
    with pytest.raises(UserError, match="below one"):
        SMT(name="smt", lr=1e-4, block_size=16).plan(shapes, 100)
    with pytest.raises(UserError, match="method.score"):
        SMT(name="smt", lr=1e-4, score="max")


# --- the warm-up estimators against dense autograd -------------------------------------------------

def _dense_grads(model, names, batches):
    """Per batch, the dense gradient of each eligible weight (float64 copies), by plain autograd."""
    model = copy.deepcopy(model)
    weights = {n: model.get_submodule(n).weight for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    out = []
    for b in batches:
        for w in weights.values():
            w.requires_grad_(True)
        grads = torch.autograd.grad(model(**b).loss, list(weights.values()))
        out.append({n: g.double() for n, g in zip(weights, grads)})
    return out


def _oracle(per_step, names, B, kind, accumulation, k, mode):
    if accumulation == "grad_sum":  # the reference: one statistic of the summed raw gradients
        scores = {n: block_score(sum(s[n] for s in per_step), B, kind) for n in names}
    else:
        scores = {n: sum(block_score(s[n], B, kind) for s in per_step) for n in names}
    pools = [names] if mode == "global" else [[n] for n in names]
    from smt_bench.methods.smt.selection import _apportion

    quotas = [k] if mode == "global" else _apportion(k, [scores[n].numel() for n in names])
    want = set()
    for pool, quota in zip(pools, quotas):
        allb = sorted(((float(scores[n][r, c]), n, r, c) for n in pool
                       for r, c in itertools.product(*map(range, scores[n].shape))), key=lambda t: -t[0])
        assert quota == 0 or quota == len(allb) or allb[quota - 1][0] - allb[quota][0] > 1e-6 * abs(allb[0][0])
        want |= {(n, r, c) for _, n, r, c in allb[:quota]}
    return want


@pytest.mark.slow
@pytest.mark.parametrize("accumulation,device", [("grad_sum", "same"), ("grad_sum", "cpu"), ("score_sum", "same")])
@pytest.mark.parametrize("mode", ["global", "per_matrix"])
@pytest.mark.parametrize("kind", ["abs_mean", "mean_abs", "l1", "l2"])
def test_warmup_selection_is_the_top_k_of_the_statistic_of_dense_gradients(kind, mode, accumulation, device):
    model = _tiny()
    warm, batches = _warmup(n_batches=3, seed=1)
    m = SMT(name="smt", lr=1e-2, block_size=16, warmup_steps=3, score=kind, selection=mode,
            score_accumulation=accumulation, accumulator_device=device)
    plan = m.plan(shapes_of(model), 20 * 256)
    names = [l.name for l in shapes_of(model).select(["q_proj", "k_proj", "v_proj"])]
    want = _oracle(_dense_grads(model, names, batches), names, 16, kind, accumulation, 20, mode)
    tuned = m.prepare(model, plan, warm)
    got = {(n, r, c) for n, l in tuned.layers.items() for r, c in zip(l.rows.tolist(), l.cols.tolist())}
    assert got == want
    info = tuned.report()["warmup"]
    assert (info["accumulation"], info["steps"], info["score"]) == (accumulation, 3, kind)
    eligible_bytes = 4 * sum(model.get_submodule(n).weight.numel() for n in names)
    assert info["accumulator_bytes"] == (eligible_bytes if accumulation == "grad_sum" else 0)


def test_the_two_estimators_differ_where_signs_cancel_across_steps():
    """Σ|mean G_t| vs |mean Σ G_t|: a block whose gradient flips sign between steps ranks high for one only."""
    flip = torch.ones(4, 4)
    steady = torch.full((4, 4), 0.6)
    g1, g2 = torch.cat([flip, steady], 1), torch.cat([-flip, steady], 1)
    score_sum = block_score(g1, 4, "mean_abs") + block_score(g2, 4, "mean_abs")
    grad_sum = block_score(g1 + g2, 4, "mean_abs")
    assert score_sum.argmax().item() == 0 and grad_sum.argmax().item() == 1


def test_no_accumulator_or_warmup_gradient_outlives_prepare(monkeypatch):
    import weakref

    from smt_bench.methods.smt import scoring

    refs = []
    finish = scoring.BlockScorer.finish

    def spy(self, *args):
        refs.extend(weakref.ref(t) for t in self.acc.values())
        return finish(self, *args)

    monkeypatch.setattr(scoring.BlockScorer, "finish", spy)
    model = _tiny()
    m = SMT(name="smt", lr=1e-2, block_size=16, warmup_steps=3)
    warm, _ = _warmup()
    m.prepare(model, m.plan(shapes_of(model), 20 * 256), warm)
    assert len(refs) == 2 * 3 and all(r() is None for r in refs)  # q, k, v of 2 layers, all freed
    assert all(p.grad is None for p in model.parameters())
