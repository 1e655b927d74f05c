"""LISA and S2FT against their reference code: LISA's non-layer tensors and LMFlow's kept Adam moments
(OptimalScale/LMFlow, DynamicLayerActivationCallback), S2FT's model-wide draw as the reference makes it
(Infini-AI-Lab/S2FT, experiments/train/finetune.py), its channels-only recipe, and the data-driven selections
(activation, weight × activation, gradient) checked against their statistic computed by hand."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from smt_bench.data.batches import BatchStream, encode
from smt_bench.data.bundled import BundledSuite
from smt_bench.distributed import World
from smt_bench.errors import UserError
from smt_bench.loggers import NullLogger
from smt_bench.memory import optimizer_state_bytes
from smt_bench.methods.base import Context
from smt_bench.methods.lisa import LISA
from smt_bench.methods.s2ft import S2FT, ColumnSliceLinear
from smt_bench.models import TinyLlama, meta_shapes, shapes_of
from smt_bench.trainer import forward_loss, train

TINY = ["model=tiny-llama", "device=cpu", "eval.enabled=false"]
LAYER = 36_992  # one tiny-llama decoder layer
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def examples(tokenizer):
    return encode(BundledSuite(n_train_per_task=2, n_val_per_task=0, n_test_per_task=0).load().train, tokenizer,
                  max_len=96, train_on_inputs=False)


def _batches(examples, tokenizer, n: int, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    stream = BatchStream(examples, 2, tokenizer.pad_token_id, seed=seed)
    return [next(stream) for _ in range(n)]


def _context(batches, world: World | None = None) -> Context:
    def take(n):
        assert n <= len(batches)
        return iter(batches[:n])

    return Context(batches=take, loss=forward_loss, device=torch.device("cpu"), world=world or World())


def _run(tuned, cfg, examples, tokenizer, resume=None, saved=None):
    stream = BatchStream(examples, 2, tokenizer.pad_token_id, seed=0)
    torch.manual_seed(0)
    save = (lambda c: saved.append(copy.deepcopy(c))) if saved is not None else None  # as written to disk
    return train(tuned, stream, [], cfg.train, torch.device("cpu"), NullLogger(), save=save, resume=resume)


# --- LISA ---------------------------------------------------------------------------------------

def test_lisa_train_embeddings_trains_every_non_layer_tensor_and_the_drawn_layers(tiny_llama, examples, tokenizer):
    """As LMFlow freezes only the layer list: the embedding (tied: the head) and the final norm train at every
    step beside the drawn layer; every other tensor stays bit-identical."""
    model, _ = tiny_llama
    m = LISA(name="lisa", lr=1e-3, switch_every=5, sampling_seed=1, train_embeddings=True)
    non_layer = 49152 * 64 + 64  # the tied embedding and head, once, and the final norm
    plan = m.plan(shapes_of(model), non_layer + LAYER)
    assert plan.detail["non_layer_params"] == non_layer and plan.achieved_params == non_layer + LAYER
    tuned = m.prepare(model, plan, None)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in tuned.always) == ["model.embed_tokens.weight", "model.norm.weight"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = tuned.build_optimizer()
    for step, batch in enumerate(_batches(examples, tokenizer, 3), start=1):
        tuned.begin_step(step, opt)
        assert sum(p.numel() for p in tuned.trainable_parameters()) == plan.achieved_params
        forward_loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    (drawn,) = tuned.draw(0)
    trains = {"model.embed_tokens.weight", "model.norm.weight"} | {
        n for n in before if n.startswith(f"model.layers.{drawn}.")}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trains


@pytest.mark.parametrize("keep", [True, False])
def test_lisa_keep_continues_a_returning_layer_s_moments_and_reset_frees_them(keep, tiny_llama, examples, tokenizer):
    """optimizer_state=keep (LMFlow's): a layer that leaves keeps its Adam moments and step count, untouched while
    it is frozen, and continues from them when drawn again; the optimizer then holds the moments of every layer
    drawn so far. reset: only the active layer's."""
    model, _ = tiny_llama
    # sampling seed 2 draws layers 1, 0, 1 (K = 2): layer 1 leaves at step 3 and is drawn again at step 5
    m = LISA(name="lisa", lr=1e-3, switch_every=2, sampling_seed=2, optimizer_state="keep" if keep else "reset")
    tuned = m.prepare(model, m.plan(shapes_of(model), LAYER), None)
    assert [tuned.draw(p) for p in range(3)] == [(1,), (0,), (1,)]
    opt = tuned.build_optimizer()
    returning = list(tuned.layers[1].parameters())
    snapshot: dict = {}
    for step, batch in enumerate(_batches(examples, tokenizer, 5), start=1):
        tuned.begin_step(step, opt)
        if step in (3, 5):  # layer 1 left at step 3; drawn again at step 5, before its update
            held = [opt.state.get(p) for p in returning]
            if keep:
                assert all(torch.equal(v, snapshot[i][k]) for i, st in enumerate(held) for k, v in st.items())
                assert all(int(st["step"]) == 2 for st in held)  # its own step count, not the global one
            else:
                assert all(st is None for st in held)
        forward_loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 2:
            snapshot = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(returning)}
        held_layers = {i for i, layer in enumerate(tuned.layers) if any(p in opt.state for p in layer.parameters())}
        assert held_layers == ({0, 1} if keep and step > 2 else set(tuned.active))
        assert optimizer_state_bytes(opt) == 8 * LAYER * len(held_layers)


def test_a_resumed_lisa_keep_run_is_the_uninterrupted_run(_tiny_llama_pristine, examples, tokenizer, compose):
    """optimizer_state=keep through a checkpoint at step 4, while layer 1 is frozen with its moments held: the
    resumed run loads them and is the uninterrupted run, bitwise; the trainer's memory breakdown counts both
    layers' moments."""
    # sampling seed 2 draws layers 1, 0, 1 (K = 2) on the two-layer tiny-llama
    cfg = compose(*TINY, "method=lisa", "method.switch_every=2", "method.sampling_seed=2", "train.max_steps=6",
                  "train.batch_size=2", "train.max_len=96", "train.warmup_ratio=0", "train.eval_every=0",
                  "train.checkpoint_every=4", "method.lr=1e-3", "method.optimizer_state=keep")
    method = instantiate(cfg.method, _convert_="all")
    assert method.optimizer_state == "keep"
    model = _tiny_llama_pristine[0]
    plan = method.plan(shapes_of(model), LAYER)
    first = method.prepare(copy.deepcopy(model), plan, None)
    saved: list = []
    whole = _run(first, cfg, examples, tokenizer, saved=saved)
    assert first.draws == {0: [1], 1: [0], 2: [1]}
    assert whole["memory_breakdown_bytes"]["optimizer"] == 8 * 2 * LAYER
    (ckpt,) = saved
    assert ckpt.step == 4 and ckpt.tuned_meta["active"] == [0] and len(ckpt.optimizer["state"]) == 2 * 9
    again = _run(method.resume(copy.deepcopy(model), plan, None, ckpt.tuned, ckpt.tuned_meta), cfg, examples,
                 tokenizer, resume=ckpt)
    assert again["loss_curve"] == whole["loss_curve"] and again["resumed_from_step"] == 4
    assert again["memory_breakdown_bytes"]["optimizer"] == 8 * 2 * LAYER


# --- S2FT: where the units go -------------------------------------------------------------------

def _reference_draw(seed: int, layers: int, heads: int, channels: int, n_heads: int, n_channels: int):
    """Infini-AI-Lab/S2FT experiments/train/finetune.py: random.seed, then random.sample over every (layer, head)
    index of v_proj (ratio 0 here: an empty draw) and o_proj, then of up_proj (0) and down_proj; index i is
    layer i // per_layer, unit i % per_layer."""
    random.seed(seed)
    out = {}
    for kind, per, k in (("v", heads, 0), ("o", heads, n_heads), ("u", channels, 0), ("d", channels, n_channels)):
        chosen = sorted(random.sample(list(range(per * layers)), k))
        out[kind] = {i: [c % per for c in chosen if c // per == i] for i in range(layers)}
    return out["o"], out["d"]


def test_model_wide_draw_is_the_reference_s_and_meets_the_budget_exactly():
    shapes = meta_shapes(TinyLlama(num_hidden_layers=6).hf_config())  # 6 layers: 4 heads of 16, 128 channels
    m = S2FT(name="s2ft", lr=1e-4, allocation="model_wide")
    plan = m.plan(shapes, 20_000)
    heads, channels = plan.detail["heads"], plan.detail["channels"]
    assert (heads, channels) == (7, 200) and plan.achieved_params == 7 * 1024 + 200 * 64
    assert "heads_per_layer" not in plan.detail  # drawn in prepare, from the run's seed
    counts = set()
    for seed in range(4):
        cols = m._selection(shapes.meta_model(), plan, seed)
        o, d = _reference_draw(seed, 6, 4, 128, heads, channels)
        for i in range(6):
            attn, mlp = f"model.layers.{i}.self_attn.o_proj", f"model.layers.{i}.mlp.down_proj"
            assert sorted({c // 16 for c in cols.get(attn, [])}) == o[i]
            assert cols.get(mlp, []) == d[i]
        assert sum(len(c) for n, c in cols.items() if "o_proj" in n) == heads * 16
        assert sum(len(c) for n, c in cols.items() if "down_proj" in n) == channels
        counts.add((tuple(len(o[i]) for i in range(6)), tuple(len(d[i]) for i in range(6))))
    assert len(counts) == 4  # the per-layer split varies with the seed; the totals do not
    # even: the counts are the plan's, whatever the seed
    even = S2FT(name="s2ft", lr=1e-4).plan(shapes, 20_000)
    assert even.detail["heads_per_layer"] == [1, 1, 1, 1, 1, 2]
    assert even.detail["channels_per_layer"] == [33, 33, 34, 33, 33, 34]


def test_model_wide_prepare_trains_exactly_the_planned_count(tiny_llama):
    model, _ = tiny_llama
    m = S2FT(name="s2ft", lr=1e-4, allocation="model_wide", selection_seed=3)
    plan = m.plan(shapes_of(model), 16_099)
    tuned = m.prepare(model, plan, None)
    assert sum(p.numel() for p in tuned.trainable_parameters()) == plan.achieved_params
    per = tuned.report()
    assert sum(per["heads_per_layer"]) == plan.detail["heads"] and sum(per["channels_per_layer"]) == plan.detail["channels"]


def test_channels_only_and_the_reference_s_ratios():
    """attn_share 0, or ratios [0, d] (the reference's LLaMA-3 scripts: down_proj alone): no head trains, and a
    budget past the channels' pool is refused rather than spilled into heads. ratios [o, d] split the budget as
    the reference's o_ratio and d_ratio split their pools (LLaMA-2 scripts: 0.052 and 0.02)."""
    shapes = meta_shapes(TinyLlama().hf_config())  # 8 heads of 1,024 params, 256 channels of 64
    for m in (S2FT(name="s2ft", lr=1e-4, attn_share=0.0), S2FT(name="s2ft", lr=1e-4, ratios=[0.0, 0.03])):
        plan = m.plan(shapes, 10_000)
        assert (plan.detail["heads"], plan.detail["channels"], plan.achieved_params) == (0, 156, 156 * 64)
        with pytest.raises(Exception, match=r"its down_proj channels hold 64\.\.16,384 params"):
            m.plan(shapes, 20_000)
    heads_only = S2FT(name="s2ft", lr=1e-4, attn_share=1.0).plan(shapes, 5_000)
    assert (heads_only.detail["heads"], heads_only.detail["channels"]) == (5, 0)
    split = S2FT(name="s2ft", lr=1e-4, ratios=[0.052, 0.02]).plan(shapes, 10_000)
    assert split.detail["attn_share"] == pytest.approx(0.052 * 8192 / (0.052 * 8192 + 0.02 * 16384))
    with pytest.raises(UserError, match=r"method\.attn_share=0\.5: must be null when method\.ratios is set"):
        S2FT(name="s2ft", lr=1e-4, attn_share=0.5, ratios=[0.1, 0.1])
    with pytest.raises(UserError, match=r"method\.ratios=\[0\.0,0\.0\]: must be two numbers >= 0, not both 0"):
        S2FT(name="s2ft", lr=1e-4, ratios=[0.0, 0.0])


def test_channels_only_trains_down_proj_alone(tiny_llama, examples, tokenizer):
    model, _ = tiny_llama
    m = S2FT(name="s2ft", lr=1e-2, ratios=[0.0, 0.03])
    plan = m.plan(shapes_of(model), 5_000)
    tuned = m.prepare(model, plan, None)
    assert all(n.endswith("mlp.down_proj") for n in tuned.columns)
    assert not any(isinstance(model.get_submodule(f"model.layers.{i}.self_attn.o_proj"), ColumnSliceLinear)
                   for i in range(2))
    assert sum(p.numel() for p in tuned.trainable_parameters()) == plan.achieved_params == 78 * 64
    opt = tuned.build_optimizer()
    forward_loss(model, _batches(examples, tokenizer, 1)[0]).backward()
    opt.step()
    assert all(m.delta.abs().sum() > 0 for _, m in tuned._sliced())


# --- S2FT: the data-driven selections -----------------------------------------------------------

def _by_hand(model, batches, strategy: str) -> dict[str, torch.Tensor]:
    """Each o_proj / down_proj's per-column statistic, from its captured inputs or gradients."""
    names = [n for n, _ in model.named_modules() if n.endswith(("o_proj", "down_proj"))]
    if strategy == "gradient":
        grads = {n: torch.zeros_like(model.get_submodule(n).weight) for n in names}
        for batch in batches:
            model.zero_grad(set_to_none=True)
            forward_loss(model, batch).backward()
            for n in names:
                grads[n] += model.get_submodule(n).weight.grad
        model.zero_grad(set_to_none=True)
        return {n: (g ** 2).sum(0) for n, g in grads.items()}
    inputs: dict[str, list] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: inputs[n].append(args[0].detach())) for n in names]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in hooks:
        h.remove()
    out = {}
    for n in names:
        x = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(inputs[n], batches)])  # real tokens only
        sq = (x ** 2).sum(0)
        w = model.get_submodule(n).weight.detach()
        out[n] = sq if strategy == "activation" else sq.sqrt() * w.abs().sum(0)
    return out


@pytest.mark.parametrize("strategy,allocation,largest", [
    ("activation", "even", True), ("weight_activation", "even", True), ("gradient", "even", True),
    ("activation", "model_wide", True), ("gradient", "model_wide", False)])
def test_each_data_driven_strategy_picks_the_top_units_of_its_statistic(strategy, allocation, largest, tiny_llama,
                                                                        examples, tokenizer):
    """S2FT-A (Σ x² of a unit's input columns over the real tokens), S2FT-S (Σ |W_ij|·‖x_j‖), S2FT-G (Σ G² of the
    gradient summed over the calibration batches) over calibration_steps batches of the method's own stream;
    per layer (even) or over the whole model (model_wide); largest or smallest."""
    model, _ = tiny_llama
    batches = _batches(examples, tokenizer, 3)
    stats = _by_hand(copy.deepcopy(model), batches[:2], strategy)
    m = S2FT(name="s2ft", lr=1e-4, strategy=strategy, allocation=allocation, largest=largest, calibration_steps=2)
    plan = m.plan(shapes_of(model), 16_099)  # 5 heads of 16 columns, 172 channels
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = m.prepare(model, plan, _context(batches))
    assert all(torch.equal(p, before[n.replace(".base.", ".")]) for n, p in model.named_parameters()
               if n.replace(".base.", ".") in before)  # the calibration changed no weight
    assert tuned.report()["calibration"]["batches_per_rank"] == 2
    for kind, unit, per_layer in (("o_proj", 16, plan.detail.get("heads_per_layer")),
                                  ("down_proj", 1, plan.detail.get("channels_per_layer"))):
        names = sorted(n for n in stats if n.endswith(kind))
        units = {n: stats[n].reshape(-1, unit).sum(1) for n in names}
        if allocation == "even":
            want = {n: sorted(torch.topk(units[n], k, largest=largest).indices.tolist()) for n, k in zip(names, per_layer)}
        else:
            flat = torch.cat([units[n] for n in names])
            k = plan.detail["heads" if unit > 1 else "channels"]
            top = torch.topk(flat, k, largest=largest).indices
            per = len(units[names[0]])
            want = {n: sorted((top[(top // per) == i] % per).tolist()) for i, n in enumerate(names)}
        got = {n: sorted({c // unit for c in tuned.columns.get(n, [])}) for n in names}
        assert got == want, kind
    assert sum(p.numel() for p in tuned.trainable_parameters()) == plan.achieved_params


class _TwoRanks(World):
    """Two ranks that saw the same batches: every all-reduce doubles (and is recorded)."""

    def all_reduce(self, tensor, op="sum"):
        _TwoRanks.calls.append(tensor.shape)
        return tensor.mul_(2)


def test_the_calibration_statistic_is_reduced_over_ranks(tiny_llama, examples, tokenizer):
    model, _ = tiny_llama
    batches = _batches(examples, tokenizer, 2)
    one = S2FT(name="s2ft", lr=1e-4, strategy="gradient", calibration_steps=2)
    plan = one.plan(shapes_of(model), 16_099)
    single = one.prepare(copy.deepcopy(model), plan, _context(batches))
    _TwoRanks.calls = []
    two = one.prepare(copy.deepcopy(model), plan, _context(batches, _TwoRanks(rank=0, world_size=2)))
    # every summed gradient (4 matrices, before its statistic) and the token count go through the reduction
    assert sorted(map(tuple, _TwoRanks.calls)) == sorted([(64, 64)] * 2 + [(64, 128)] * 2 + [()])
    assert two.columns == single.columns
    assert two.report()["calibration"]["tokens"] == 2 * single.report()["calibration"]["tokens"]


def test_a_resumed_data_driven_s2ft_run_is_the_uninterrupted_run(_tiny_llama_pristine, examples, tokenizer, compose):
    """The selection comes back from the checkpoint: the resumed run calibrates nothing (its batch stream would
    fail) and is the uninterrupted run, bitwise."""
    cfg = compose(*TINY, "method=s2ft", "method.strategy=gradient", "method.calibration_steps=2",
                  "train.max_steps=6", "train.batch_size=2", "train.max_len=96", "train.warmup_ratio=0",
                  "train.eval_every=0", "train.checkpoint_every=3", "method.lr=1e-2")
    method = instantiate(cfg.method, _convert_="all")
    model = _tiny_llama_pristine[0]
    plan = method.plan(shapes_of(model), 16_099)
    first = method.prepare(copy.deepcopy(model), plan, _context(_batches(examples, tokenizer, 2)))
    saved: list = []
    whole = _run(first, cfg, examples, tokenizer, saved=saved)
    (ckpt,) = saved

    def no_batches(n):
        raise AssertionError("a resumed run calibrated again")

    context = Context(batches=no_batches, loss=forward_loss, device=torch.device("cpu"))
    tuned = method.resume(copy.deepcopy(model), plan, context, ckpt.tuned, ckpt.tuned_meta)
    assert tuned.columns == first.columns and tuned.report() == first.report()
    again = _run(tuned, cfg, examples, tokenizer, resume=ckpt)
    assert again["loss_curve"] == whole["loss_curve"] and again["resumed_from_step"] == 3


def test_the_default_selection_is_the_committed_runs(smollm2_path):
    """allocation=even with strategy=random (the defaults, which keep the committed runs' ids) selects the columns
    the committed runs trained."""
    from smt_bench.models import SmolLM2GGUF

    shapes = meta_shapes(SmolLM2GGUF().hf_config())
    path = next((REPO / "results/embedded-sweep/runs/smollm2-135m-bundled").glob("s2ft-b0.01-s1-*.json"))
    run = json.loads(path.read_text())
    m = S2FT(name="s2ft", lr=5e-4)
    plan = m.plan(shapes, round(0.01 * shapes.total_params))
    assert m._selection(shapes.meta_model(), plan, 1) == run["method_info"]["columns"]
