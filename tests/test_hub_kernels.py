"""Hub kernels are the harness's decision (model.hub_kernels, default off): every model load is told
explicitly, the decision is in each result's provenance, runs keep the ids they had before the key
existed, and with it on a run is refused (one line) where a hub kernel could bypass what the method trains."""
from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn

import smt_bench.__main__ as app_main
from smt_bench import hub_kernels, migrations, provenance
from smt_bench.errors import UserError
from smt_bench.models import Pretrained, TinyLlama

kernels = pytest.importorskip("kernels", reason="the lock installs kernels (transformers' hub kernels)")


@pytest.fixture
def spy(monkeypatch):
    """Records the keyword arguments of every AutoModelForCausalLM.from_pretrained call."""
    from transformers import AutoModelForCausalLM

    calls, real = [], AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    return calls


def test_pretrained_loads_say_use_kernels_explicitly(spy, smollm2_path):
    model, _ = Pretrained(str(smollm2_path)).load()
    assert spy[-1]["use_kernels"] is False and model.use_kernels is False
    model.train()  # transformers re-kernelizes on a mode switch when kernels are on: here nothing happens
    assert model.use_kernels is False and model.kernels_mode is None
    model, _ = Pretrained(str(smollm2_path)).load(hub_kernels=True)
    assert spy[-1]["use_kernels"] is True and model.use_kernels is True


def test_models_built_from_a_config_follow_the_key(smollm2_path):
    assert TinyLlama().load()[0].use_kernels is False
    model = TinyLlama().load(hub_kernels=True)[0]
    assert model.use_kernels is True
    # Llama's hub layers: every RMSNorm (2 per layer + the final one) and the MLP's SiLU
    assert hub_kernels.record(True, model)["layers"] == {"RMSNorm": 5, "SiLU": 2}


def test_on_cpu_kernelizing_changes_no_number(smollm2_path):
    """The default mapping has no CPU kernels: the same logits and gradients, bit for bit."""
    ids = torch.arange(3, 40).view(1, -1)
    out = []
    for on in (False, True):
        model = TinyLlama().load(hub_kernels=on)[0].train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        out.append((loss.detach(), model.model.norm.weight.grad.clone()))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_the_key_leaves_run_ids_unchanged():
    node = {"model": {"name": "smollm2-135m", "source": {"_target_": "smt_bench.models.SmolLM2GGUF"}}, "seed": 0}
    off = copy.deepcopy(node)
    off["model"]["hub_kernels"] = False
    on = copy.deepcopy(node)
    on["model"]["hub_kernels"] = True
    assert provenance.config_hash(off) == provenance.config_hash(node) != provenance.config_hash(on)


def test_the_committed_embedded_default_run_keeps_its_id(compose):
    """README command 1's 1% job is the committed run smt-b0.01-s0-40256e27beb3 (it must stay comparable)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose("method=smt", "budget=1pct")
    assert cfg.model.hub_kernels is False
    container = OmegaConf.to_container(cfg, resolve=True)
    instantiate(cfg.method, _convert_="all")  # the method the app builds from it
    assert provenance.config_hash({**container, "method": migrations.id_form(container["method"])}) == "40256e27beb3"


# --- what the check refuses -----------------------------------------------------------------------------

@kernels.use_kernel_forward_from_hub("ToyBlock")
class ToyBlock(nn.Module):
    """A module a hub kernel may replace whole, with a projection inside (like an MLP kernel would be)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.proj(x) * self.scale


class Wrapped(nn.Module):  # a method's wrapper (defined outside transformers / torch)
    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x)


class MethodBlock(ToyBlock):  # a method's subclass of a hub layer: the kernel would overwrite its forward
    pass


def _toy():
    model = nn.Sequential(ToyBlock(), nn.Linear(4, 4))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ToyBlock is defined here, so the check would call it foreign; these cases are about what lies below it
@pytest.fixture
def toy_is_the_models_own(monkeypatch):
    real = hub_kernels._own
    monkeypatch.setattr(hub_kernels, "_own", lambda m: type(m) in (ToyBlock,) or real(m))


def test_untouched_hub_layers_pass_and_their_own_parameters_may_train(toy_is_the_models_own):
    model = _toy()
    model[0].scale.requires_grad_(True)  # full FT trains RMSNorm's weight: the kernel computes its gradient
    model[1].weight.requires_grad_(True)  # a projection outside every hub layer
    hub_kernels.check(model, "toy")
    assert hub_kernels.replaceable(model) == {"0": "ToyBlock"}


@pytest.mark.parametrize("change, says", [
    (lambda m: setattr(m[0], "proj", Wrapped(m[0].proj)), r"0\.proj, and it puts Wrapped there"),
    (lambda m: m[0].proj.weight.requires_grad_(True), r"0\.proj, and it trains parameters there"),
    (lambda m: m[0].proj.register_forward_pre_hook(lambda *a: None), r"0\.proj, and it hooks that module's forward"),
    (lambda m: m.__setitem__(0, MethodBlock()), r"replaces 0 \(hub layer ToyBlock\) with MethodBlock"),
])
def test_what_a_kernel_would_bypass_is_refused_in_one_line(change, says, toy_is_the_models_own):
    import re

    model = _toy()
    change(model)
    with pytest.raises(UserError) as e:
        hub_kernels.check(model, "toy")
    msg = str(e.value)
    assert "\n" not in msg and re.search(says, msg), msg
    assert msg.startswith("model.hub_kernels=true is not verified for method toy") and msg.endswith(
        "use model.hub_kernels=false (the default)")


# --- end to end -----------------------------------------------------------------------------------------

def test_a_run_with_hub_kernels_records_them(tmp_path, monkeypatch, capsys, smollm2_path):
    results = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["smt_bench", "model=tiny-llama", "device=cpu", "method=smt",
                                      "budget.fraction=0.002", "model.hub_kernels=true", "train.max_steps=2",
                                      "method.warmup_steps=1", "train.batch_size=2", "train.max_len=64",
                                      "train.eval_every=0", "train.val_batches=1", "eval.enabled=false",
                                      f"results.dir={results}"])
    try:
        app_main.main()
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    path, = results.rglob("*.json")
    r = json.loads(path.read_text())
    assert r["run_info"]["status"] == "finished" and r["config"]["model"]["hub_kernels"] is True
    assert r["meta_info"]["hub_kernels"] == {"enabled": True, "kernels_version": kernels.__version__,
                                             "layers": {"RMSNorm": 5, "SiLU": 2}}
    assert r["meta_info"]["lock"]["file"] == "requirements/lock-cpu.txt"


def test_use_hub_kernels_off_in_the_environment_is_bad_input(tmp_path, monkeypatch, capsys, smollm2_path):
    results = tmp_path / "results"
    monkeypatch.setenv("USE_HUB_KERNELS", "0")
    monkeypatch.setattr(sys, "argv", ["smt_bench", "model=tiny-llama", "device=cpu", "model.hub_kernels=true",
                                      f"results.dir={results}"])
    with pytest.raises(SystemExit) as e:
        app_main.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.splitlines() == [
        "smt-bench: error: model.hub_kernels=true but USE_HUB_KERNELS=0 disables hub kernels in transformers; "
        "unset USE_HUB_KERNELS or use model.hub_kernels=false (the default)"]
    assert not results.exists()
