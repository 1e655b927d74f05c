"""One measurement, in a process of its own (peak memory is per process): one method at one budget on
the model cut to `layers` decoder layers, with random weights.

`python -m smt_bench.bench.worker '<spec json>'` prints `RESULT <json>`. The spec is built by
smt_bench.bench.__main__ from the Hydra config; nothing here reads a config file.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from .. import hub_kernels
from ..memory import PeakMemory, breakdown, saved_activation_bytes, tensor_bytes
from ..methods.base import Context
from ..trainer import autocast_for

REFERENCE = "smt_reference"  # SMT's selection, trained the reference implementation's way
FLOOR = "floor"              # every weight frozen; backward still runs down to the embeddings


def _model(spec: dict, device: torch.device):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from transformers import AutoModelForCausalLM

    config = instantiate(OmegaConf.create(spec["model_source"])).hf_config()  # any source: only its architecture
    config.num_hidden_layers = spec["layers"]
    torch.manual_seed(0)
    with torch.device(device):  # random init where it will run: a 7B model never exists on the host
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if spec.get("hub_kernels"):  # model.hub_kernels, as a run loads it (smt_bench/hub_kernels.py)
        hub_kernels.enable(model)
    return model


def _method(spec: dict):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.create(spec["method"]), _convert_="all")


def measure(spec: dict) -> dict:
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    model = _model(spec, device)
    mem = PeakMemory(device).mark_baseline()  # every phase above the built model
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (spec["batch_size"], spec["seq_len"]), generator=g).to(device)
               for _ in range(4)]
    out = {"method": spec["name"], "layers": spec["layers"], "budget": spec["budget"]}
    opt, tuned = None, None
    if spec["name"] == FLOOR:
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
        params = []
    else:
        from ..models import shapes_of

        method = _method(spec)
        shapes = shapes_of(model)
        target = spec["target_params"]
        if target is None:  # a fixed-fraction method (full FT, HFT) plans its own share at this depth
            target = round(type(method).fixed_fraction * shapes.total_params)
        plan = method.plan(shapes, target)
        out["plan"] = plan.detail
        context = Context(batches=lambda n: iter({"input_ids": batches[i % 4], "labels": batches[i % 4],
                                                  "attention_mask": torch.ones_like(batches[i % 4])}
                                                 for i in range(n)),
                          loss=lambda m, b: _loss(m, b["input_ids"], device), device=device)
        base_params = sum(p.numel() for p in model.parameters())
        mem.start()
        t0 = time.perf_counter()
        tuned = method.prepare(model, plan, context)
        out["prepare_s"] = time.perf_counter() - t0
        out["prepare_peak_bytes"] = mem.stop()
        model = tuned.model
        # tensors the method adds beside the base weights (adapters, SMT's blocks, sparse deltas)
        out["added_params"] = sum(p.numel() for p in model.parameters()) - base_params
        if spec.get("hub_kernels"):
            hub_kernels.check(model, spec["name"])
        if spec["name"] == REFERENCE:
            from ..methods.smt.reference import to_reference

            params = to_reference(tuned)
            opt = torch.optim.AdamW(params, lr=method.lr, foreach=True)
        else:
            params = tuned.trainable_parameters()
            opt = tuned.build_optimizer()
    out["trainable_params"] = sum(p.numel() for p in params)
    model.train()
    activations: dict = {}

    def step(ids, measure_activations=False, number=0):
        """The trainer's step (smt_bench/trainer.py): the method's step hook, its loss term, backward, AdamW."""
        nonlocal params
        if tuned is not None and opt is not None and tuned.begin_step(number, opt):  # LISA's, HFT's, SpIEL's switches
            params = tuned.trainable_parameters()
        with saved_activation_bytes(activations) if measure_activations else nullcontext():
            loss = _loss(model, ids, device)
            extra = tuned.regularizer() if tuned is not None else None
        (loss if extra is None else loss + extra).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    times = []
    mem.start()
    for i in range(spec["steps"]):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step(batches[i % 4], measure_activations=i == 0, number=i + 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    out["peak_bytes"] = mem.stop()
    out["peak_kind"] = mem.kind
    out["step_times_s"] = times
    out["median_step_s"] = statistics.median(times[spec["skip"]:])
    out["tokens_per_s"] = spec["batch_size"] * spec["seq_len"] / out["median_step_s"]
    measured = breakdown(model, params, opt, activations) if opt is not None else {
        "weights": tensor_bytes(model.parameters()), "gradients": 0, "optimizer": 0,
        "activations": activations.get("bytes", 0)}
    measured.pop("activations_note", None)
    out["breakdown_bytes"] = measured
    if spec.get("profile") and spec["name"] in ("smt", FLOOR):
        out["profile_top"] = _profile(lambda: step(batches[0], number=spec["steps"] + 1), device)
    return out


def _loss(model, ids, device):
    with autocast_for(device):  # bf16 autocast over fp32 master weights on CUDA (what papers use); fp32 on CPU
        return model(input_ids=ids, labels=ids).loss


def _profile(fn, device) -> list:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, key, 0) for e in events) or 1
    rows = sorted(events, key=lambda e: -getattr(e, key, 0))[:12]
    return [[e.key, e.count, round(getattr(e, key, 0) / 1e3, 2), round(100 * getattr(e, key, 0) / total, 1)]
            for e in rows]


def main() -> None:
    print("RESULT " + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)


if __name__ == "__main__":
    main()
