"""Budget matching: LoRA/DoRA (the generic peft tuner) pick the rank whose REAL trainable count (numel of requires_grad
parameters after prepare) is closest to the target; unreachable budgets fail with a UserError.

The reference counts here come from peft itself (models prepared on the meta device, or the real
tiny-llama), never from PeftTuner.count(), so a wrong formula in the method cannot pass.
"""
from functools import lru_cache

import pytest
import torch
from transformers import AutoModelForCausalLM

from smt_bench.errors import UserError
from smt_bench.methods.base import Plan
from smt_bench.methods.full_ft import FullFT
from smt_bench.methods.peft_methods import PeftTuner
from smt_bench.models import SmolLM2GGUF, TinyLlama, meta_shapes, shapes_of

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def _method(kind: str) -> PeftTuner:
    return PeftTuner(name=kind, lr=1e-4, target_modules=list(TARGETS), scaled_args={"lora_alpha": 2.0},
                     args={"lora_dropout": 0.05, "use_dora": kind == "dora", "bias": "none"})


def _n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@lru_cache(maxsize=None)
def _hf_config(model: str):
    return TinyLlama().hf_config() if model == "tiny-llama" else SmolLM2GGUF().hf_config()


@lru_cache(maxsize=None)
def _peft_count(model: str, kind: str, rank: int) -> int:
    """Trainable numel after prepare() at this rank, on a meta-device copy of the model."""
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(_hf_config(model))
    prepared = _method(kind).prepare(base, Plan(0, 0, {"r": rank}), None).model
    return _n_trainable(prepared)


def _max_rank(shapes) -> int:
    return min(min(l.d_in, l.d_out) for l in shapes.select(TARGETS))


# ---------------------------------------------------------------------------------------------
# tiny-llama: N = 3,219,776 (49152x64 tied embedding = 3,145,728 of it); 1,408 LoRA params per
# rank, ranks 1..32 (k/v are 64 -> 32), DoRA adds 640 magnitudes. Reachable: ~0.04% .. 1.4%.

def test_tiny_llama_meta_shapes_match_the_real_model(tiny_llama):
    model, _ = tiny_llama
    meta = meta_shapes(TinyLlama().hf_config())
    assert meta == shapes_of(model)
    # tied embeddings counted once: embed 49152*64, per layer 4096+2048+2048+4096 + 3*8192 + 2*64, final norm
    assert meta.total_params == 49152 * 64 + 2 * (4096 + 2048 * 2 + 4096 + 3 * 8192 + 128) + 64 == 3_219_776
    assert len(meta.select(TARGETS)) == 2 * 5
    assert _max_rank(meta) == 32


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("fraction", [0.0005, 0.001, 0.005, 0.01, 0.014])  # ranks 1..32
def test_tiny_llama_plan_is_the_closest_real_count(kind, fraction, tiny_llama):
    model, _ = tiny_llama
    shapes = shapes_of(model)
    target = round(fraction * shapes.total_params)
    method = _method(kind)
    plan = method.plan(shapes, target)
    assert plan.target_params == target

    # the count the plan promises is the real numel of requires_grad parameters after prepare()
    prepared = method.prepare(model, plan, None).model
    real = _n_trainable(prepared)
    assert real == plan.achieved_params
    # only adapter parameters train (DoRA: lora_A, lora_B and lora_magnitude_vector)
    names = {part for n, p in prepared.named_parameters() if p.requires_grad
             for part in n.split(".") if part.startswith("lora_")}
    assert names == ({"lora_A", "lora_B", "lora_magnitude_vector"} if kind == "dora" else {"lora_A", "lora_B"})

    # brute force over every rank the targets allow, counted by peft on meta-device copies
    counts = {r: _peft_count("tiny-llama", kind, r) for r in range(1, _max_rank(shapes) + 1)}
    best = min(abs(c - target) for c in counts.values())
    assert abs(real - target) == best
    assert counts[plan.detail["r"]] == real
    assert plan.detail["lora_alpha"] == 2.0 * plan.detail["r"]


def test_dora_counts_its_magnitude_vectors():
    shapes = meta_shapes(TinyLlama().hf_config())
    d_out = sum(l.d_out for l in shapes.select(TARGETS))
    assert d_out == 2 * (64 + 32 + 32 + 128 + 64) == 640
    for rank in (1, 5, 32):
        assert _peft_count("tiny-llama", "dora", rank) - _peft_count("tiny-llama", "lora", rank) == d_out
        assert _method("dora").count(shapes, rank) == _peft_count("tiny-llama", "dora", rank)
    # same target, same shapes: DoRA's rank is lower or equal, because the magnitudes use budget too
    target = round(0.01 * shapes.total_params)
    assert _method("dora").plan(shapes, target).detail["r"] < _method("lora").plan(shapes, target).detail["r"]


@pytest.mark.parametrize("kind,fraction,why", [
    ("lora", 0.02, "r would be 45.74"),    # 64,396 > 45,056 at rank 32
    ("lora", 0.05, "valid r 1..32"),
    ("lora", 0.0001, "r would be 0.23"),   # 322 params: less than half a rank
    ("dora", 0.0002, "r would be 0.00"),   # 644 params: the 640 magnitudes alone nearly fill it
    ("dora", 0.00005, "r would be -0.34"),  # below the magnitudes
])
def test_unreachable_budget_is_a_user_error(kind, fraction, why):
    shapes = meta_shapes(TinyLlama().hf_config())
    target = round(fraction * shapes.total_params)
    with pytest.raises(UserError) as e:
        _method(kind).plan(shapes, target)
    msg = str(e.value)
    assert f"budget of {target:,} params is unreachable for {kind}" in msg
    assert why in msg
    lo, hi = _peft_count("tiny-llama", kind, 1), _peft_count("tiny-llama", kind, 32)
    assert f"give {lo:,}..{hi:,} params" in msg


def test_target_modules_matching_nothing_is_a_user_error():
    shapes = meta_shapes(TinyLlama().hf_config())
    m = PeftTuner(name="lora", lr=1e-4, target_modules=["qkv_proj"])
    with pytest.raises(UserError, match=r"matches no linear layer; choose from \['down_proj', 'gate_proj', "
                                        r"'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]"):
        m.plan(shapes, 10_000)


def test_full_ft_trains_every_parameter(tiny_llama):
    model, _ = tiny_llama
    for p in list(model.parameters())[::2]:
        p.requires_grad_(False)
    shapes = shapes_of(model)
    plan = FullFT(name="full_ft", lr=1e-5).plan(shapes, 123)
    assert plan.achieved_params == plan.target_params == shapes.total_params == 3_219_776
    prepared = FullFT(name="full_ft", lr=1e-5).prepare(model, plan, None).model
    assert _n_trainable(prepared) == plan.achieved_params


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M (meta shapes of the real config): 30 layers, hidden 576, GQA k/v 192, MLP 1536;
# 207,360 LoRA params per rank, ranks 1..192, DoRA adds 92,160 magnitudes.

@pytest.fixture(scope="module")
def smol_shapes(smollm2_path):
    return meta_shapes(_hf_config("smollm2-135m"))


def test_smollm2_meta_shapes(smol_shapes):
    assert smol_shapes.total_params == 134_515_008
    assert len(smol_shapes.select(TARGETS)) == 30 * 5
    assert _max_rank(smol_shapes) == 192
    assert _peft_count("smollm2-135m", "lora", 1) == 30 * (2 * 576 + 2 * (576 + 192) + 2 * (576 + 1536)) == 207_360


@pytest.mark.slow
@pytest.mark.parametrize("kind,fraction", [("lora", 0.001)] + [(k, f) for k in ("lora", "dora")
                                                                 for f in (0.005, 0.01, 0.02, 0.05)])
def test_smollm2_plan_is_the_closest_real_count(kind, fraction, smol_shapes):
    target = round(fraction * smol_shapes.total_params)
    plan = _method(kind).plan(smol_shapes, target)
    rank = plan.detail["r"]
    # peft's count is affine in the rank: fix it from ranks 1 and 2, check it at the plan and at the
    # largest rank, then search every rank 1..192 for the closest
    c1, c2 = _peft_count("smollm2-135m", kind, 1), _peft_count("smollm2-135m", kind, 2)
    count = lambda r: c1 + (r - 1) * (c2 - c1)  # noqa: E731
    assert _peft_count("smollm2-135m", kind, rank) == count(rank) == plan.achieved_params
    assert _peft_count("smollm2-135m", kind, 192) == count(192)
    best = min(range(1, 193), key=lambda r: abs(count(r) - target))
    assert abs(plan.achieved_params - target) == abs(count(best) - target)
    assert abs(plan.achieved_params - target) <= (c2 - c1) / 2


@pytest.mark.parametrize("kind,fraction,ideal", [
    ("lora", 0.5, "324.35"),   # above rank 192
    ("dora", 0.5, "323.91"),
    ("dora", 0.001, "0.20"),   # 0.1%: DoRA's 92,160 magnitudes leave a fifth of one rank (why budget=sweep skips it)
])
def test_smollm2_unreachable_budget(kind, fraction, ideal, smol_shapes):
    target = round(fraction * smol_shapes.total_params)
    with pytest.raises(UserError, match=rf"unreachable .* r would be {ideal}, valid r 1\.\.192"):
        _method(kind).plan(smol_shapes, target)
