"""Every method of conf/method/ trains tiny-llama for 20 steps through the shared trainer: the loss falls, its
trainable count is the plan's, exactly the tensors it trains change (every other one stays bit-identical; full
FT changes every tensor), and its merged plain model gives the tuned model's logits. And each method key has its
default in one place (the dataclass), never restated by its YAML."""
import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from transformers import LlamaForCausalLM

from smt_bench.data.bundled import BundledSuite
from smt_bench.data.batches import BatchStream, collate, encode
from smt_bench.loggers import NullLogger
from smt_bench.models import shapes_of
from smt_bench.run import method_context
from smt_bench.trainer import train

CONF = Path(__file__).resolve().parents[1] / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))  # every method the harness ships
STEPS = 20
# higher than the configs' defaults so that 20 steps on a random model move the loss clearly
LR = {  # they train whole tensors; every other method: 1e-2
    "full_ft": 1e-3,
    "lisa": 1e-3,
    "hft": 1e-3,
}
# tiny-llama: rank 11 (LoRA 15,488 / DoRA 16,128 trainable); LISA: one of the 2 layers (36,992);
# SMT: 16 blocks of 32x32, all of q, k, v (16,384)
FRACTION = {  # every other method: 0.005
    "lisa": 0.0115,
}
# the parameters a method adds and trains, by name (full FT and LISA train the model's own: _trained_names)
TRAINED_BY = {
    "lora": ("lora_A", "lora_B"),
    "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
    "pissa": ("lora_A", "lora_B"),
    "rslora": ("lora_A", "lora_B"),
    "shira": ("shira_weight",),
    "miss": ("miss_block",),
    "supertuning": ("supertuning_values",),
    "kasa": ("lora_A", "lora_B", "lora_diag"),
    "corda": ("lora_A", "lora_B"),
    "s2ft": ("delta",),
    "smt": ("blocks",),
    "spiel": ("spiel_delta",),
}


def _lisa_drawn(tuned, names: set[str]) -> set[str]:
    drawn = {i for d in tuned.report()["active_layers"] for i in d["layers"]}
    return {n for n in names if any(n.startswith(f"model.layers.{i}.") for i in drawn)}


# methods that train the model's own tensors (no tensors of their own): (tuned, all parameter names) -> the
# names of those it trained at some step
TRAINS_OWN = {
    "full_ft": lambda tuned, names: names,
    "lisa": _lisa_drawn,
    "hft": lambda tuned, names: _hft_drawn(tuned, names),
}


def _hft_drawn(tuned, names: set[str]) -> set[str]:
    """The non-layer tensors, and each layer's modules of any draw (report: per draw, per layer, module names)."""
    rep = tuned.report()
    drawn: set[tuple[int, str]] = set()
    for d in rep["draws"]:
        for i, modules in enumerate(d["layers"]):
            drawn |= {(i, m) for m in modules}
    prefix = rep["layers_at"] + "."
    return {n for n in names if n in rep["always_trained"] or
            n.startswith(prefix) and (int(n[len(prefix):].split(".")[0]), n.split(".")[-2]) in drawn}


def test_every_method_is_covered():
    assert {"smt", "lora", "dora", "full_ft"} <= set(METHODS)
    assert set(TRAINED_BY) | set(TRAINS_OWN) == set(METHODS), "add the new method's trained tensors"


# --- each default is stated once ------------------------------------------------------------------
def _own(name: str) -> dict:
    """The method keys conf/method/<name>.yaml itself sets (full_ft's file is @package _global_)."""
    node = OmegaConf.to_container(OmegaConf.load(CONF / "method" / f"{name}.yaml"))
    node = node if "_target_" in node else node["method"]
    return {k: v for k, v in node.items() if k != "defaults"}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@pytest.mark.parametrize("name", METHODS)
def test_each_default_is_stated_once(name, compose):
    """The rule (docs/methods.md): a key's default is its dataclass's; the YAML sets the keys without one
    (name, lr) and, where several files share one class (PeftTuner), what makes it that method: never a
    defaulted key of a class of its own, never a value equal to the default."""
    own = _own(name)
    cls = get_class(own.pop("_target_"))
    shared = [m for m in METHODS if m != name and get_class(_own(m)["_target_"]) is cls]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    assert set(own) <= set(fields), f"{name}.yaml sets keys {cls.__name__} does not have"
    required = {k for k, f in fields.items() if _default(f) is dataclasses.MISSING}
    assert required <= set(own), f"{name}.yaml leaves required keys unset"
    for key, value in own.items():
        default = _default(fields[key])
        if default is dataclasses.MISSING:
            continue
        assert shared, (f"{name}.yaml sets {key}={value!r}; its default is {cls.__name__}'s ({default!r}): "
                        f"change it there, or make it required")
        assert value != default, f"{name}.yaml restates {cls.__name__}.{key}'s default {default!r}"
    # the composed method, built as the app builds it, is the dataclass's defaults plus the file's keys
    built = instantiate(compose(f"method={name}").method, _convert_="all")
    assert type(built) is cls and built == cls(**own)


# --- 20 steps of each method on tiny-llama -------------------------------------------------------
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


@pytest.fixture(scope="module", params=METHODS)
def trained(request, _tiny_llama_pristine, tokenizer, examples, compose):
    """(name, Tuned, tuned model, {name: (live parameter, copy after prepare)}, train_info)."""
    name = request.param
    fraction, lr = FRACTION.get(name, 0.005), LR.get(name, 1e-2)
    cfg = compose("model=tiny-llama", f"method={name}", f"method.lr={lr}", f"budget.fraction={fraction}",
                  f"train.max_steps={STEPS}", "train.batch_size=4", "train.max_len=128", "train.warmup_ratio=0",
                  "train.eval_every=10", "train.log_every=5")
    method = instantiate(cfg.method, _convert_="all")
    assert method.name == name and method.lr == lr
    model = copy.deepcopy(_tiny_llama_pristine[0])
    shapes = shapes_of(model)
    plan = method.plan(shapes, round(fraction * shapes.total_params))
    train_ex, val_batch = examples
    device = torch.device("cpu")
    # the method's own batch stream (SMT's warm-up), as the app builds it
    context = method_context(train_ex, 4, tokenizer.pad_token_id, seed=0, dev=device, max_steps=STEPS)
    torch.manual_seed(0)
    tuned = method.prepare(model, plan, context)
    assert sum(p.numel() for p in tuned.trainable_parameters()) == plan.achieved_params
    before = {n: (p, p.detach().clone()) for n, p in tuned.model.named_parameters()}
    logger = _Recorder()
    info = train(tuned, BatchStream(train_ex, 4, tokenizer.pad_token_id, seed=0), [val_batch], cfg.train,
                 device, logger)
    info["_plan"], info["_logged"] = plan, logger.logged
    return name, tuned, tuned.model, before, info


@pytest.mark.slow
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


@pytest.mark.slow
def test_trainer_accounts_trainable_memory(trained):
    name, tuned, model, _, info = trained
    n = sum(p.numel() for p in tuned.trainable_parameters())
    assert n == info["_plan"].achieved_params
    mem = info["memory_breakdown_bytes"]
    assert mem["gradients"] == 4 * n            # fp32 gradient per trainable parameter
    assert mem["optimizer"] == 8 * n            # AdamW: exp_avg + exp_avg_sq (LISA: only the active layer's)
    whole = name in TRAINS_OWN  # they train the model's own tensors; the others add theirs
    assert mem["weights"] >= 4 * (3_219_776 + (0 if whole else n))
    assert mem["activations"] > 0
    assert info["tokens"] > 0 and info["median_step_time_s"] > 0


def _trained_names(name, tuned, model) -> set[str]:
    """The parameters the method trains (LISA: the layers it drew at some point)."""
    names = {n for n, _ in model.named_parameters()}
    if name in TRAINS_OWN:
        return TRAINS_OWN[name](tuned, names)
    added = {n for n in names if any(part in TRAINED_BY[name] for part in n.split("."))}
    if name == "smt":  # the trained blocks are written into their frozen dense weight once per step
        added |= {n.rsplit(".", 1)[0] + ".weight" for n in added}
    return added


@pytest.mark.slow
def test_exactly_the_trained_tensors_change(trained):
    name, tuned, model, before, _ = trained
    live = {id(p) for p in model.parameters()}
    trains = _trained_names(name, tuned, model)
    assert trains and len(trains) < len(before) or name == "full_ft"
    for n, (p, old) in before.items():
        assert id(p) in live, f"{n} is no longer part of the model"
        if n in trains:
            assert not torch.equal(p, old), f"{name} left its trainable {n} unchanged"
        else:
            assert not p.requires_grad and torch.equal(p, old), f"{name} changed frozen weight {n}"
    if name == "full_ft":
        assert len(before) == 2 * 9 + 2  # 9 weights per layer (7 linears + 2 norms), embedding, final norm


@pytest.mark.slow
def test_no_hub_kernel_can_bypass_what_it_trains(trained):
    """model.hub_kernels=true, verified per method: every module whose forward a hub kernel may replace
    (Llama's RMSNorms and SiLU) is transformers' own and holds nothing of the method's below it."""
    from smt_bench import hub_kernels

    name, tuned, model, _, _ = trained
    pytest.importorskip("kernels")
    assert set(hub_kernels.replaceable(model).values()) == {"RMSNorm", "SiLU"}
    hub_kernels.check(model, name)


def test_pissa_rewrites_the_base_but_not_the_function(_tiny_llama_pristine, examples):
    """PiSSA's init moves the principal part of each target into the adapter: W_res + BA = W."""
    from smt_bench.methods.peft_methods import PeftTuner

    _, val_batch = examples
    inputs = {k: val_batch[k] for k in ("input_ids", "attention_mask")}
    base = copy.deepcopy(_tiny_llama_pristine[0]).eval()
    m = PeftTuner(name="pissa", lr=1e-3, args={"init_lora_weights": "pissa"}, scaled_args={"lora_alpha": 1.0})
    tuned = m.prepare(copy.deepcopy(base), m.plan(shapes_of(base), 15_000), None)
    q = tuned.model.base_model.model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert tuned.report() == {"base_rewritten_at_init": True}
    with torch.no_grad():
        torch.testing.assert_close(tuned.model.eval()(**inputs).logits, base(**inputs).logits, rtol=0, atol=1e-4)


@pytest.mark.slow
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
        if name in TRAINS_OWN:  # they train the model's own tensors
            assert merged is model
            return
        assert type(merged) is LlamaForCausalLM
        assert all(type(m).__module__.startswith(("torch.", "transformers.")) for m in merged.modules())
        assert sum(p.numel() for p in merged.parameters()) == 3_219_776
        after = merged.eval()(**inputs).logits
    # the check can fail: the tuned logits are far from the base model's (about 1.6 here)
    assert (tuned - base).abs().max() > 0.5
    # fp32 merge: W + s*B@A (DoRA: rescaled by magnitude / column norm; S2FT: W[:, S] + D) -> only
    # rounding differences (about 8e-7 here); tolerance atol 1e-5, rtol 0
    torch.testing.assert_close(after, tuned, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_anatomy_sees_exactly_what_trained(trained, _tiny_llama_pristine):
    """Every method's merged model through the update anatomy: the changed tensors are base tensors, all of them
    are matrices or norms the method can reach, and for the methods that train the model's own tensors they are
    exactly those it trained; an adapter method changes only weights of the modules it wraps."""
    from smt_bench.anatomy import Settings, analyse

    name, tuned, model, _, _ = trained
    base = _tiny_llama_pristine[0]
    base_names = {n for n, _ in base.named_parameters()}
    trains = _trained_names(name, tuned, model)
    merged = copy.deepcopy(tuned).merged()
    found = analyse(base, merged, Settings())
    changed = set(found.tensors)
    assert changed and changed <= base_names
    s = found.summary()
    assert s["matrices"] >= 1 and sum(s["by_layer"].values()) == pytest.approx(1.0)
    if name in TRAINS_OWN:
        assert changed == trains
    else:
        wrapped = {n.split(".lora_")[0].split(f".{TRAINED_BY[name][0]}")[0].replace("base_model.model.", "")
                   for n in trains}
        assert {n.rsplit(".", 1)[0] for n in changed} <= wrapped, (changed, wrapped)
