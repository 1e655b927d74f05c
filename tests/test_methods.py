"""Each method trains tiny-llama for 20 steps through the shared trainer: the loss falls, LoRA/DoRA
leave every base weight bit-identical, full FT changes every tensor, and merging LoRA/DoRA gives the
adapter model's logits."""
import copy
import math

import pytest
import torch
from hydra.utils import instantiate
from transformers import LlamaForCausalLM

from smt_bench.data.bundled import BundledSuite
from smt_bench.data.batches import BatchStream, collate, encode
from smt_bench.loggers import NullLogger
from smt_bench.models import shapes_of
from smt_bench.trainer import train

STEPS = 20
# higher than the configs' defaults so that 20 steps on a random model move the loss clearly
LR = {"full_ft": 1e-3, "lora": 1e-2, "dora": 1e-2}
FRACTION = 0.005  # tiny-llama: rank 11 (LoRA 15,488 / DoRA 16,128 trainable)


class _Recorder(NullLogger):
    def __init__(self):
        self.logged = []

    def log(self, metrics, step):
        self.logged.append((step, metrics))


@pytest.fixture(scope="module")
def examples(tokenizer):
    splits = BundledSuite(n_train_per_task=2, n_val_per_task=1, n_test_per_task=1).load()
    train_ex = encode(splits.train[:8], tokenizer, max_len=128, train_on_inputs=False)
    val_ex = encode(splits.val[:4], tokenizer, max_len=128, train_on_inputs=False)
    assert len(train_ex) == 8 and len(val_ex) == 4
    return train_ex, collate(val_ex, tokenizer.pad_token_id)


@pytest.fixture(scope="module", params=["full_ft", "lora", "dora"])
def trained(request, _tiny_llama_pristine, tokenizer, examples, compose):
    """(name, Tuned, tuned model, {name: (live parameter, copy before training)}, train_info)."""
    name = request.param
    cfg = compose("model=tiny-llama", f"method={name}", f"method.lr={LR[name]}", f"budget.fraction={FRACTION}",
                  f"train.max_steps={STEPS}", "train.batch_size=4", "train.max_len=128", "train.warmup_ratio=0",
                  "train.eval_every=10", "train.log_every=5")
    method = instantiate(cfg.method, _convert_="all")
    assert method.name == name and method.lr == LR[name]
    model = copy.deepcopy(_tiny_llama_pristine[0])
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    shapes = shapes_of(model)
    plan = method.plan(shapes, round(FRACTION * shapes.total_params))
    torch.manual_seed(0)
    tuned = method.prepare(model, plan, None)
    train_ex, val_batch = examples
    logger = _Recorder()
    info = train(tuned, BatchStream(train_ex, 4, tokenizer.pad_token_id, seed=0), [val_batch], cfg.train,
                 torch.device("cpu"), logger)
    info["_plan"], info["_logged"] = plan, logger.logged
    return name, tuned, tuned.model, before, info


def test_loss_falls(trained):
    name, _, _, _, info = trained
    losses = info["loss_curve"]
    assert len(losses) == STEPS and all(math.isfinite(l) for l in losses)
    assert abs(losses[0] - math.log(49152)) < 0.3  # random init: about uniform over the vocabulary
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, f"{name}: loss {first:.3f} -> {last:.3f}"
    # validation at steps 10 and 20 on held-out records
    assert [s for s, _ in info["val_loss_curve"]] == [10, 20]
    (_, v10), (_, v20) = info["val_loss_curve"]
    assert v20 < v10 < math.log(49152) - 0.3
    assert [s for s, m in info["_logged"] if "train/loss" in m] == [5, 10, 15, 20]


def test_trainer_accounts_trainable_memory(trained):
    name, tuned, model, _, info = trained
    n = sum(p.numel() for p in tuned.trainable_parameters())
    assert n == info["_plan"].achieved_params
    mem = info["memory_breakdown_bytes"]
    assert mem["gradients"] == 4 * n            # fp32 gradient per trainable parameter
    assert mem["optimizer"] == 8 * n            # AdamW: exp_avg + exp_avg_sq
    assert mem["weights"] >= 4 * (shapes_of(model).total_params if name == "full_ft" else 3_219_776 + n)
    assert mem["activations"] > 0
    assert info["tokens"] > 0 and info["median_step_time_s"] > 0


def test_base_weights(trained):
    name, _, model, before, _ = trained
    live = {id(p) for p in model.parameters()}
    assert len(before) == 2 * 9 + 2  # 9 weights per layer (7 linears + 2 norms), embedding, final norm
    for n, (p, old) in before.items():
        assert id(p) in live, f"{n} is no longer part of the model"
        if name == "full_ft":
            assert p.requires_grad and not torch.equal(p, old), f"full FT left {n} unchanged"
        else:
            assert not p.requires_grad and torch.equal(p, old), f"{name} changed base weight {n}"
    if name != "full_ft":  # the adapters did train: lora_B starts at zero
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert len(lora_b) == 10 and all(p.abs().max() > 0 for p in lora_b)


def test_merged_model_gives_the_adapter_logits(trained, _tiny_llama_pristine, examples):
    name, tuned_model, _, _, _ = trained
    _, val_batch = examples
    inputs = {k: val_batch[k] for k in ("input_ids", "attention_mask")}
    tuned_model = copy.deepcopy(tuned_model)
    model = tuned_model.model.eval()
    with torch.no_grad():
        tuned = model(**inputs).logits
        base = copy.deepcopy(_tiny_llama_pristine[0]).eval()(**inputs).logits
        merged = tuned_model.merged()
        if name == "full_ft":
            assert merged is model
            return
        assert type(merged) is LlamaForCausalLM
        assert not any("lora" in n for n, _ in merged.named_modules())
        assert sum(p.numel() for p in merged.parameters()) == 3_219_776
        after = merged.eval()(**inputs).logits
    # the check can fail: the tuned logits are far from the base model's (about 1.6 here)
    assert (tuned - base).abs().max() > 0.5
    # fp32 merge: W + s*B@A (DoRA: rescaled by magnitude / column norm) -> only rounding differences
    # (about 8e-7 here); tolerance atol 1e-5, rtol 0
    torch.testing.assert_close(after, tuned, rtol=0, atol=1e-5)
