"""Hugging Face hub kernels (the `kernels` package): the harness decides, and records what it decided.

transformers 5.25 kernelizes every model `from_pretrained` loads unless told otherwise
(`use_kernels=None` becomes `True`): on CUDA it replaces Llama's RMSNorm forward with a Liger kernel and
the rotary embedding with a hub kernel, both fetched from the hub when the model is kernelized (again at
each `train()` / `eval()` switch). For a benchmark that is a silent change of the computation under
every method, and a download that fails on offline compute nodes. smt-bench passes `model.hub_kernels`
(default false) to every model it loads, so every method runs on the same implementation of every layer
and nothing is fetched unless asked for.

With `model.hub_kernels=true` a kernel replaces a module's whole forward. A method that trains or wraps
something *inside* such a module (a projection wrapped in a LoRA layer, an SMT or S2FT linear, a forward
hook) would then be bypassed silently. `check` proves per run, on the method's own tuned model, that
this cannot happen: every module whose forward the hub may replace is transformers' own class, and
nothing below it belongs to the method. Otherwise the run is refused before it trains.
"""
from __future__ import annotations

import os
from collections import Counter
from importlib import metadata
from typing import Any

from torch import nn

from .errors import UserError

OFF_FIX = "use model.hub_kernels=false (the default)"


def supported() -> bool:
    """This transformers loads with `use_kernels` (older releases take no such argument)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return hasattr(PreTrainedModel, "set_use_kernels")


def load_kwargs(enabled: bool) -> dict:
    """What every `from_pretrained` of the harness passes: the decision, explicitly (None means on)."""
    return {"use_kernels": bool(enabled)} if supported() else {}


def preflight(enabled: bool) -> None:
    """Before any weights load: hub_kernels=true must be able to mean what it says."""
    if not enabled:
        return
    if not supported():
        import transformers

        raise UserError(f"model.hub_kernels=true: transformers {transformers.__version__} has no hub kernels "
                        f"(PreTrainedModel.set_use_kernels); install the locked versions "
                        f"(bash scripts/setup.sh) or {OFF_FIX}")
    from transformers.utils.import_utils import is_kernels_available

    if not is_kernels_available():
        raise UserError(f"model.hub_kernels=true needs the package `kernels` in the version range transformers "
                        f"supports; install the locked versions (bash scripts/setup.sh) or {OFF_FIX}")
    env = os.environ.get("USE_HUB_KERNELS")
    if env is not None and env.strip().upper() not in ("1", "ON", "YES", "TRUE"):
        raise UserError(f"model.hub_kernels=true but USE_HUB_KERNELS={env} disables hub kernels in transformers; "
                        f"unset USE_HUB_KERNELS or {OFF_FIX}")


def enable(model: nn.Module) -> None:
    """Kernelize a model built from a config (`from_config` never kernelizes; `from_pretrained` is told)."""
    model.set_use_kernels(True)


def replaceable(model: nn.Module) -> dict[str, str]:
    """Module name -> hub layer name, for every module whose forward a hub kernel may replace."""
    return {name: layer for name, m in model.named_modules()
            if (layer := getattr(type(m), "kernel_layer_name", None))}


def _own(module: nn.Module) -> bool:
    """A module of the model's own code (transformers, or a hub model's remote code) or of torch, not one a
    method brought."""
    return type(module).__module__.split(".")[0] in ("transformers", "transformers_modules", "torch")


def check(model: nn.Module, method: str) -> None:
    """Refuse (one line) a tuned model in which a hub kernel could bypass what the method trains."""
    for name, layer in replaceable(model).items():
        module = model.get_submodule(name)
        where = f"{name} (hub layer {layer})"
        if not _own(module):
            raise UserError(f"model.hub_kernels=true is not verified for method {method}: it replaces {where} "
                            f"with {type(module).__qualname__}, whose forward a hub kernel would overwrite; "
                            f"{OFF_FIX}")
        for sub_name, sub in module.named_modules():
            if not sub_name:
                continue
            problem = (f"it puts {type(sub).__qualname__} there" if not _own(sub) else
                       "it trains parameters there" if any(p.requires_grad for p in sub.parameters(recurse=False))
                       else "it hooks that module's forward" if sub._forward_hooks or sub._forward_pre_hooks
                       else None)
            if problem:
                raise UserError(f"model.hub_kernels=true is not verified for method {method}: a hub kernel replaces "
                                f"the forward of {where}, which would bypass {name}.{sub_name}, and {problem}; "
                                f"{OFF_FIX}")


def record(enabled: bool, model: nn.Module | None = None) -> dict[str, Any]:
    """What goes into a result's provenance: the decision, the `kernels` package, and (when on) the hub
    layers this model exposes to it."""
    try:
        version = metadata.version("kernels")
    except metadata.PackageNotFoundError:
        version = None
    out: dict[str, Any] = {"enabled": bool(enabled), "kernels_version": version}
    if enabled and model is not None:
        out["layers"] = dict(sorted(Counter(replaceable(model).values()).items()))
    return out
