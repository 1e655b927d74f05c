"""Super-Tuning, KaSA and CorDA through the generic peft tuner, and SHiRA's mask seed: each is sized by peft's
own count, trains what its paper trains (Super-Tuning: the top-|W| entries; KaSA: with its regularizer, kept
out of the logged loss; CorDA: calibrated on the method's own batches, both modes), and a resumed CorDA run is
the uninterrupted one, bit for bit. (20 steps of each through the shared trainer: tests/test_methods.py.)"""
from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import instantiate

from smt_bench.data.batches import BatchStream, collate, encode
from smt_bench.data.bundled import BundledSuite
from smt_bench.errors import BudgetUnreachable
from smt_bench.loggers import NullLogger
from smt_bench.methods.base import Context
from smt_bench.methods.peft_methods import PeftTuner
from smt_bench.models import shapes_of
from smt_bench.run import method_context
from smt_bench.trainer import train

TINY = ["model=tiny-llama", "device=cpu", "eval.enabled=false"]
CPU = torch.device("cpu")
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def data(tokenizer):
    """(training examples, a validation batch's inputs)."""
    splits = BundledSuite(n_train_per_task=2, n_val_per_task=1, n_test_per_task=0).load()
    train_ex = encode(splits.train[:8], tokenizer, max_len=96, train_on_inputs=False)
    val = collate(encode(splits.val[:4], tokenizer, max_len=96, train_on_inputs=False), tokenizer.pad_token_id)
    return train_ex, {k: val[k] for k in ("input_ids", "attention_mask")}


def _method(compose, name, *overrides):
    cfg = compose(*TINY, f"method={name}", "train.batch_size=2", "train.max_len=96", "train.warmup_ratio=0",
                  "train.eval_every=0", "method.lr=1e-2", *overrides)
    return instantiate(cfg.method, _convert_="all"), cfg.train


def _context(data, tokenizer, seed=0, drawn=None):
    """The method's own stream, as the app builds it; `drawn` records each context.batches(n) call."""
    ctx = method_context(data[0], 2, tokenizer.pad_token_id, seed=seed, dev=CPU)
    if drawn is None:
        return ctx
    inner = ctx.batches

    def batches(n):
        drawn.append(n)
        return inner(n)

    ctx.batches = batches
    return ctx


def _train(tuned, data, tokenizer, train_cfg, **kw):
    torch.manual_seed(0)
    return train(tuned, BatchStream(data[0], 2, tokenizer.pad_token_id, seed=0), [], train_cfg, CPU,
                 NullLogger(), **kw)


def _trainable(tuned) -> int:
    return sum(p.numel() for p in tuned.trainable_parameters())


def _layers(model, kind):
    """(name, peft layer) of each target of a peft model."""
    return [(n, m) for n, m in model.named_modules() if n.endswith(TARGETS) and isinstance(m, kind)]


# --- budgets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,formula", [
    # Super-Tuning: ⌊(1 − sparsity)·m·n⌋ entries per m×n target, one sparsity for all
    ("supertuning", lambda d, shapes: sum(int(t.d_out * t.d_in * (1 - d["sparsity"]))
                                          for t in shapes.select(TARGETS))),
    # KaSA: LoRA's r·(m+n) plus r singular values per target
    ("kasa", lambda d, shapes: sum(d["r"] * (t.d_out + t.d_in + 1) for t in shapes.select(TARGETS))),
    ("corda", lambda d, shapes: sum(d["r"] * (t.d_out + t.d_in) for t in shapes.select(TARGETS))),
])
def test_each_new_tuner_meets_its_budget_with_peft_s_count(name, formula, compose, tiny_llama, data, tokenizer):
    model, _ = tiny_llama
    method, _ = _method(compose, name)
    shapes = shapes_of(model)
    target = round(0.005 * shapes.total_params)  # 16,099
    plan = method.plan(shapes, target)
    assert plan.achieved_params == formula(plan.detail, shapes)
    assert abs(plan.achieved_params - target) < 0.05 * target
    tuned = method.prepare(model, plan, _context(data, tokenizer))
    assert _trainable(tuned) == plan.achieved_params
    with pytest.raises(BudgetUnreachable, match=rf"^budget of 160,989 params is unreachable for {name} on "
                                                r"\['q_proj', 'k_proj', 'v_proj', 'up_proj', 'down_proj'\]: "
                                                r"[^\n]*; choose [^\n]*$"):
        method.plan(shapes, 160_989)  # 5%: more than the targets' 49,152 entries


def test_super_tuning_sparsity_is_searched_to_peft_s_nearest_count(compose, tiny_llama):
    """The knob is a fraction: the plan is the count nearest the target among the grid's sizes (its neighbours
    on the grid count no closer), and a budget below one entry per target is refused."""
    model, _ = tiny_llama
    method, _ = _method(compose, "supertuning")
    shapes = shapes_of(model)
    for target in (16_099, 32_198, 777):
        plan = method.plan(shapes, target)
        s = plan.detail["sparsity"]
        assert round(s, 5) == s  # the grid: 1e-5 here (8,192 entries in the largest target)
        for neighbour in (s - 1e-5, s + 1e-5):
            assert abs(method.count(shapes, neighbour) - target) >= abs(plan.achieved_params - target)
    with pytest.raises(BudgetUnreachable, match=r"which peft refuses \(sparsity=[0-9.]+ leaves no trainable"):
        method.plan(shapes, 5)


# --- Super-Tuning -------------------------------------------------------------------------------------------
def test_super_tuning_trains_exactly_the_top_magnitude_entries(compose, tiny_llama, data, tokenizer):
    """The support of each target is the top-k of |W| of the base weight (k from peft's count, the same on the
    meta device, where there are no values), and the merged weight differs from the base only there."""
    from peft.tuners.supertuning.layer import SupertuningLayer

    model, _ = tiny_llama
    base = copy.deepcopy(model)
    method, train_cfg = _method(compose, "supertuning", "train.max_steps=3")
    plan = method.plan(shapes_of(model), 16_099)
    zeros = copy.deepcopy(model)  # the count does not read values: all-equal weights give the same count
    with torch.no_grad():
        for p in zeros.parameters():
            p.zero_()
    assert _trainable(method.prepare(zeros, plan, None)) == plan.achieved_params
    tuned = method.prepare(model, plan, None)
    _train(tuned, data, tokenizer, train_cfg)
    layers = _layers(tuned.model, SupertuningLayer)
    assert len(layers) == 10
    supports = {n.split("model.", 2)[-1]: set(m.supertuning_indices["default"].tolist()) for n, m in layers}
    merged = tuned.merged()
    moved = 0
    for name, support in supports.items():
        w0 = base.get_submodule(name).weight.detach()
        k = int(w0.numel() * (1 - plan.detail["sparsity"]))
        assert len(support) == k and support == set(torch.topk(w0.abs().flatten(), k).indices.tolist())
        changed = set(torch.nonzero((merged.get_submodule(name).weight - w0).flatten()).flatten().tolist())
        assert changed <= support
        moved += len(changed)
    assert moved > 0.9 * plan.achieved_params  # the test can fail: nearly every selected entry moved
    others = {n: p for n, p in merged.named_parameters() if not n.endswith(tuple(f"{t}.weight" for t in TARGETS))}
    assert all(torch.equal(p, base.get_parameter(n)) for n, p in others.items())


# --- KaSA ---------------------------------------------------------------------------------------------------
def test_kasa_truncates_the_base_and_its_regularizer_trains_but_is_not_logged(compose, tiny_llama, data,
                                                                              tokenizer, tmp_path):
    from peft import PeftModel

    model, _ = tiny_llama
    base = copy.deepcopy(model).eval()
    method, train_cfg = _method(compose, "kasa", "train.max_steps=1")
    plan = method.plan(shapes_of(model), 16_099)
    r = plan.detail["r"]

    def prepared():
        torch.manual_seed(0)
        return method.prepare(copy.deepcopy(model), plan, None)

    tuned, plain = prepared(), prepared()
    assert tuned.report() == {"base_rewritten_at_init": True}
    # the r smallest singular values of each target are cut from its base weight
    q = tuned.model.base_model.model.model.layers[0].self_attn.q_proj
    s0 = torch.linalg.svdvals(base.model.layers[0].self_attn.q_proj.weight)
    s1 = torch.linalg.svdvals(q.base_layer.weight)
    torch.testing.assert_close(s1[:-r], s0[:-r], rtol=0, atol=1e-5)
    assert s1[-r:].abs().max() < 1e-5 < s0[-r:].min()
    reg = tuned.regularizer()
    assert reg is not None and reg.requires_grad and float(reg.detach()) > 0
    plain.regularizer = lambda: None  # the same step without it
    with_reg, without = _train(tuned, data, tokenizer, train_cfg), _train(plain, data, tokenizer, train_cfg)
    assert with_reg["loss_curve"] == without["loss_curve"]  # the logged loss is the task loss alone
    diag = lambda t: t.model.base_model.model.model.layers[0].self_attn.q_proj.lora_diag["default"]  # noqa: E731
    assert not torch.equal(diag(tuned), diag(plain))  # ... and the regularizer's gradient moved the step
    inputs = data[1]
    with torch.no_grad():
        logits = tuned.model.eval()(**inputs).logits
        # the export applies to the original base: peft truncates it again when it loads the adapter
        tuned.export(tmp_path, "tiny-llama")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
        torch.testing.assert_close(loaded(**inputs).logits, logits, rtol=0, atol=1e-4)
        merged = tuned.merged().eval()
        assert type(merged).__name__ == "LlamaForCausalLM"
        torch.testing.assert_close(merged(**inputs).logits, logits, rtol=0, atol=1e-5)


# --- CorDA --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_calibrates_on_the_method_s_batches_and_keeps_the_function(mode, compose, tiny_llama, data,
                                                                        tokenizer):
    """Both modes: the covariance comes from calibration_steps of context.batches; the base becomes W − s·BA, so
    W_res + s·BA = W (to rounding) and the model's function at step 0 is the base model's. IPM's adapter holds
    the largest components of SVD(WC), KPM's the smallest."""
    from peft.tuners.lora.layer import LoraLayer

    model, _ = tiny_llama
    base = copy.deepcopy(model).eval()
    method, _ = _method(compose, "corda", f"method.args.corda_config.corda_method={mode}",
                        "method.calibration_steps=2")
    plan = method.plan(shapes_of(model), 16_099)
    drawn = []
    tuned = method.prepare(model, plan, _context(data, tokenizer, drawn=drawn))
    assert drawn == [2] and _trainable(tuned) == plan.achieved_params
    assert tuned.report() == {"base_rewritten_at_init": True}
    norms = []
    for name, layer in _layers(tuned.model, LoraLayer):
        w = base.get_submodule(name.split("model.", 2)[-1]).weight
        assert not torch.equal(layer.base_layer.weight, w)
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(layer.base_layer.weight + delta, w, rtol=0, atol=1e-6)
        norms.append(float(delta.norm() / w.norm()))
    with torch.no_grad():
        torch.testing.assert_close(tuned.model.eval()(**data[1]).logits, base(**data[1]).logits, rtol=0, atol=1e-5)
    # r = 11 of 32..64 components: IPM's are most of each weight, KPM's a small part of it
    assert (min(norms) > 0.5) if mode == "ipm" else (max(norms) < 0.5)
    if mode == "ipm":  # the calibration is the data's: other batches (another seed's stream) decompose otherwise
        other = method.prepare(copy.deepcopy(base), plan, _context(data, tokenizer, seed=1))
        key = next(iter(tuned.eigens))
        assert key.startswith("corda_eigens.") and not torch.equal(other.eigens[key], tuned.eigens[key])


def test_a_resumed_corda_run_is_the_uninterrupted_run(compose, tiny_llama, data, tokenizer, tmp_path):
    """Checkpointed at step 2 and resumed on a freshly loaded base: the checkpoint's decomposition rewrites the
    base weights exactly as the first run did (no new calibration), and the run goes on bit for bit; the export
    applies to the original base model (peft converts it against the initial adapter)."""
    from peft import PeftModel

    model, _ = tiny_llama
    method, train_cfg = _method(compose, "corda", "method.calibration_steps=1", "train.max_steps=3",
                                "train.checkpoint_every=2")
    plan = method.plan(shapes_of(model), 16_099)
    first, saved = method.prepare(copy.deepcopy(model), plan, _context(data, tokenizer)), []
    whole = _train(first, data, tokenizer, train_cfg, save=lambda c: saved.append(copy.deepcopy(c)))  # as on disk
    (ckpt,) = saved
    assert any(k.startswith("corda_eigens.") for k in ckpt.tuned)
    drawn = []
    tuned = method.resume(copy.deepcopy(model), plan, _context(data, tokenizer, drawn=drawn), ckpt.tuned,
                          ckpt.tuned_meta)
    assert drawn == []  # the decomposition came from the checkpoint
    again = _train(tuned, data, tokenizer, train_cfg, resume=ckpt)
    assert again["loss_curve"] == whole["loss_curve"] and again["resumed_from_step"] == 2
    ends = dict(first.model.named_parameters())
    assert all(torch.equal(p, ends[n]) for n, p in tuned.model.named_parameters())  # base and adapter
    with torch.no_grad():
        logits = tuned.model.eval()(**data[1]).logits
        files = tuned.export(tmp_path, "tiny-llama")
        assert [f.rsplit("/", 1)[1] for f in files] == ["adapter_config.json", "adapter_model.safetensors"]
        loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
        torch.testing.assert_close(loaded(**data[1]).logits, logits, rtol=0, atol=1e-4)


def test_corda_options_are_checked_before_anything_loads():
    from smt_bench.methods.peft_methods import CordaTuner

    with pytest.raises(Exception, match=r"^method\.args\.corda_config\.corda_method=xpm: must be one of ipm"):
        CordaTuner(name="corda", lr=1e-4, args={"init_lora_weights": "corda", "corda_config": {"corda_method": "xpm"}})
    with pytest.raises(Exception, match=r"^method\.args\.init_lora_weights=pissa: must be corda"):
        CordaTuner(name="corda", lr=1e-4, args={"init_lora_weights": "pissa"})
    with pytest.raises(Exception, match=r"^method\.args\.corda_config\.covariance_file: .*; remove it$"):
        CordaTuner(name="corda", lr=1e-4, args={"init_lora_weights": "corda",
                                                "corda_config": {"covariance_file": "/tmp/c.pt"}})


# --- SHiRA's mask seed --------------------------------------------------------------------------------------
def _shira_masks(method, model, seed):
    from peft.tuners.shira.layer import ShiraLayer

    ctx = Context(batches=lambda n: iter(()), loss=lambda m, b: torch.zeros(()), device=CPU, seed=seed)
    plan = method.plan(shapes_of(model), 16_099)
    tuned = method.prepare(copy.deepcopy(model), plan, ctx)
    return tuned, [m.shira_indices["default"] for _, m in _layers(tuned.model, ShiraLayer)]


def test_shira_s_mask_follows_the_run_s_seed_unless_pinned(compose, tiny_llama):
    model, _ = tiny_llama
    method, _ = _method(compose, "shira")
    (t0, m0), (t1, m1) = _shira_masks(method, model, 0), _shira_masks(method, model, 1)
    assert len(m0) == 10 and not any(torch.equal(a, b) for a, b in zip(m0, m1))
    assert t0.report() == {"seeded_args": {"random_seed": 0}} and t1.report() == {"seeded_args": {"random_seed": 1}}
    assert all(torch.equal(a, b) for a, b in zip(m0, _shira_masks(method, model, 0)[1]))  # a seed is one mask
    pinned, _ = _method(compose, "shira", "+method.args.random_seed=7")
    (p0, n0), (_, n1) = _shira_masks(pinned, model, 0), _shira_masks(pinned, model, 1)
    assert all(torch.equal(a, b) for a, b in zip(n0, n1)) and p0.report() == {}
    assert not any(torch.equal(a, b) for a, b in zip(n0, m0))
    assert isinstance(pinned, PeftTuner) and pinned.args["random_seed"] == 7
