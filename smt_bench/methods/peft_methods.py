"""Any peft tuner at a matched budget: the config names peft's config class and its fixed arguments;
this module only solves for the size argument (`r` for LoRA, PiSSA, rsLoRA, SHiRA, MiSS, ...).

The solver asks peft itself: it counts the trainable parameters of the tuner injected into a
meta-device copy of the model, so a tuner's own accounting (DoRA's magnitudes, MiSS's block shape,
SHiRA's r·(m+n) entries) is never re-derived here.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List

from torch import nn

from ..errors import BudgetUnreachable, UserError
from ..models import ModelShapes
from ..schema.spec import Valid, above, invalid, nonempty, nonempty_list, param, within
from .base import Context, Method, Plan, Tuned

if TYPE_CHECKING:
    from peft import PeftConfig

# Arguments that only decide initial values, set so peft can inject the tuner into a meta-device model
# (PiSSA's SVD and SHiRA's random mask read weight values); the trainable count does not depend on them.
COUNT_NEUTRAL: dict[str, dict[str, Any]] = {
    "LoraConfig": {"init_lora_weights": True},
    "ShiraConfig": {"mask_fn": lambda base_layer, r, **kw: None},
}
# LoRA initialisations that rewrite the base weights (W_res = W - s·BA): an export is only an adapter
# of the original base model after peft converts it against the initial adapter.
REWRITES_BASE: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "LoraConfig": ("init_lora_weights", lambda v: isinstance(v, str) and
                   v.lower().startswith(("pissa", "olora", "corda")))}
# The largest size that adds capacity, where peft itself allows more: a LoRA rank above min(d_in, d_out)
# adds parameters but no rank.
MAX_SIZE = {"LoraConfig": lambda t: min(t.d_in, t.d_out)}
# run ids of LoRA / DoRA from before this class: their configs hashed in that class's form
# (shapes, tuner config, size) -> trainable count: plans re-ask for the same sizes
_COUNTS: dict[tuple[ModelShapes, str, int], int] = {}


# args / scaled_args: names and values are peft's to check (check_config builds the peft config with them)
ARGUMENTS = Valid(lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v),
                  "a mapping of argument names of method.peft_config to values")


def peft_config_class(name: str) -> type[PeftConfig]:
    import peft

    cls = getattr(peft, name, None)
    if not (isinstance(cls, type) and issubclass(cls, peft.PeftConfig)):
        raise ValueError(name)
    return cls


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


@dataclass(frozen=True)
class PeftTuner(Method):
    """Defaults: LoRA's peft config on the DoRA commonsense protocol's targets. conf/method/<name>.yaml
    sets only what makes it that method (peft_config, args, scaled_args; docs/methods.md)."""

    peft_config: str = param("LoraConfig", nonempty())  # a class of peft: LoraConfig, ShiraConfig, MissConfig, ...
    knob: str = param("r", nonempty())  # the config argument the budget sets (SHiRA: r·(m+n) entries per m×n target)
    target_modules: List[str] = param(valid=nonempty_list(),  # the DoRA commonsense protocol
                                      factory=lambda: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    args: Dict[str, Any] = param(valid=ARGUMENTS, factory=dict)  # fixed arguments of the peft config
    scaled_args: Dict[str, float] = param(valid=ARGUMENTS, factory=dict)  # set to ratio × knob (LoRA: lora_alpha = 2r)

    @staticmethod
    def check_config(cfg: Any, at: str) -> None:
        try:
            cls = peft_config_class(cfg.peft_config)
        except ValueError:
            raise invalid(f"{at}.peft_config", cfg.peft_config, "the name of a peft config class, e.g. "
                          "LoraConfig, ShiraConfig, MissConfig") from None
        fields = set(cls.__dataclass_fields__)
        if cfg.knob not in fields:
            raise invalid(f"{at}.knob", cfg.knob, f"an integer argument of {cfg.peft_config}, e.g. r")
        args, scaled = _plain(cfg.args), _plain(cfg.scaled_args)
        for group, keys in (("args", args), ("scaled_args", scaled)):
            for key in keys:
                if key not in fields:
                    raise UserError(f"{at}.{group}.{key}: {cfg.peft_config} has no argument {key}")
                if key in (cfg.knob, "target_modules"):
                    raise UserError(f"{at}.{group}.{key}: set by the budget or {at}.target_modules; remove it")
        for key, v in args.items():  # peft takes any float here and fails, or silently drops everything, later
            if key.endswith("dropout") and not within(0, 1, hi_open=True).ok(v):
                raise invalid(f"{at}.args.{key}", v, within(0, 1, hi_open=True).says)
        for key, v in scaled.items():
            if not above(0).ok(v):
                raise invalid(f"{at}.scaled_args.{key}", v, above(0).says + f" (the ratio {key} / {cfg.knob})")
        if set(args) & set(scaled):
            raise UserError(f"{at}.scaled_args.{sorted(set(args) & set(scaled))[0]}: also in {at}.args; keep one")
        try:  # peft's own checks of the values (a misspelt init, a bad combination), at the smallest size
            cls(**{**args, **{k: v for k, v in scaled.items()}, cfg.knob: 1,
                   "target_modules": list(_plain(cfg.target_modules))})
        except (ValueError, TypeError) as e:
            raise UserError(f"{at}.args: {cfg.peft_config} refuses them: {e}") from None
        dora = bool(args.get("use_dora", False))  # the analysis groups runs by name
        if cfg.name == "lora" and (cfg.peft_config != "LoraConfig" or dora):
            raise invalid(f"{at}.args.use_dora", dora, "false (with LoraConfig) for method=lora; DoRA is method=dora")
        if cfg.name == "dora" and not dora:
            raise invalid(f"{at}.args.use_dora", dora, "true for method=dora; LoRA is method=lora")

    # --- the budget ---
    def peft_config_for(self, size: int, count_only: bool = False) -> PeftConfig:
        args = {**self.args, **{k: ratio * size for k, ratio in self.scaled_args.items()},
                self.knob: size, "target_modules": list(self.target_modules)}
        if "task_type" in peft_config_class(self.peft_config).__dataclass_fields__:
            args.setdefault("task_type", "CAUSAL_LM")
        neutral = COUNT_NEUTRAL.get(self.peft_config, {}) if count_only else {}
        cfg = peft_config_class(self.peft_config)(**{**args, **{k: v for k, v in neutral.items() if not callable(v)}})
        for k, v in neutral.items():  # set after construction: peft's __post_init__ would replace them
            if callable(v):
                setattr(cfg, k, v)
        return cfg

    def count(self, shapes: ModelShapes, size: int) -> int:
        """Trainable parameters peft creates at this size, on a meta-device copy of the model."""
        key = (shapes, json.dumps([self.peft_config, self.knob, self.args, self.scaled_args,
                                   list(self.target_modules)], sort_keys=True, default=str), size)
        if key not in _COUNTS:
            from peft import get_peft_model

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = get_peft_model(shapes.meta_model(), self.peft_config_for(size, count_only=True))
            _COUNTS[key] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return _COUNTS[key]

    def _targets(self, shapes: ModelShapes) -> None:
        if not shapes.select(self.target_modules):
            have = sorted({l.name.rsplit(".", 1)[-1] for l in shapes.linears})
            raise UserError(f"method.target_modules={list(self.target_modules)} matches no linear layer; "
                            f"choose from {have}")

    def plan(self, shapes: ModelShapes, target_params: int) -> Plan:
        self._targets(shapes)
        top = MAX_SIZE.get(self.peft_config)
        top = top and min(top(t) for t in shapes.select(self.target_modules))
        c1, c2 = self.count(shapes, 1), self.count(shapes, 2)
        ideal = 1 + (target_params - c1) / max(c2 - c1, 1)  # exact where peft's count is affine in the size
        unreachable = (f"budget of {target_params:,} params is unreachable for {self.name} on "
                       f"{list(self.target_modules)}: {self.knob} would be {ideal:.2f}")
        if ideal < 0.5 or (top and ideal > top + 0.5):
            span = (f"valid {self.knob} 1..{top} give {c1:,}..{self.count(shapes, top):,} params" if top
                    else f"{self.knob}=1 gives {c1:,} params")
            raise BudgetUnreachable(f"{unreachable}, {span}; choose another budget or method.target_modules")
        counts: dict[int, int] = {}
        refused: tuple[int, str] | None = None
        centre = max(1, math.floor(ideal))
        for size in sorted(range(max(1, centre - 3), min(centre + 5, (top or centre + 4) + 1)),
                           key=lambda s: abs(s - ideal)):
            try:
                counts[size] = self.count(shapes, size)
            except ValueError as e:  # peft refuses the size for some target (r > in_features, ...)
                refused = refused or (size, str(e).splitlines()[0])
            if len(counts) >= 2:
                break
        if not counts or (refused and min(abs(c - target_params) for c in counts.values()) > c2 - c1):
            assert refused is not None  # no count: peft refused every size tried
            raise BudgetUnreachable(f"{unreachable}, which peft refuses ({refused[1]}); choose a smaller budget")
        size = min(counts, key=lambda s: (abs(counts[s] - target_params), s))
        detail = {self.knob: size, **{k: ratio * size for k, ratio in self.scaled_args.items()},
                  "peft_config": self.peft_config}
        return Plan(target_params, counts[size], detail)

    def prepare(self, model: nn.Module, plan: Plan, context: Context | None) -> "PeftTuned":
        from peft import get_peft_model

        cfg = self.peft_config_for(plan.detail[self.knob])
        with warnings.catch_warnings():
            # peft's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing` alias,
            # which warns on every run (transformers >= 5); the warning is peft's to fix, not ours
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            tuned = PeftTuned(self, get_peft_model(model, cfg))
        tuned.keep_initial_adapter()
        return tuned


class PeftTuned(Tuned):
    """A peft model: the adapter weights are its parameters with requires_grad; peft saves and merges."""

    method: PeftTuner
    initial: str | None = None  # the adapter at init, where the init rewrote the base weights (PiSSA)

    def rewrites_base(self) -> bool:
        key, test = REWRITES_BASE.get(self.method.peft_config, (None, None))
        return key is not None and test is not None and test(self.method.args.get(key))

    def keep_initial_adapter(self) -> None:
        """PiSSA-style inits train on W_res = W - BA: an export must be converted against the initial
        adapter to apply to the original base model, so that adapter is kept (on host disk, small)."""
        if not self.rewrites_base():
            return
        self._tmp = tempfile.TemporaryDirectory(prefix="smt-bench-initial-adapter-")
        self.initial = os.path.join(self._tmp.name, "initial")
        cfg = self.model.peft_config["default"]
        init = cfg.init_lora_weights
        cfg.init_lora_weights = True  # peft's recipe: saved as a plain LoRA init
        self.model.save_pretrained(self.initial)
        cfg.init_lora_weights = init

    def export(self, directory: str | Path, base_model: str) -> list[str]:
        """The adapter, applicable to the original base model: a PiSSA adapter is converted by peft into a
        LoRA adapter of rank 2r (ΔW relative to the original W)."""
        if self.initial is not None:
            self.model.save_pretrained(directory, path_initial_model_for_weight_conversion=self.initial)
        else:
            self.model.save_pretrained(directory)
        return [f"{directory}/adapter_config.json", f"{directory}/adapter_model.safetensors"]

    def report(self) -> dict[str, Any]:
        return {"base_rewritten_at_init": True} if self.initial is not None else {}

    def merged(self) -> nn.Module:
        return self.model.merge_and_unload()  # W_res + ΔW for PiSSA: the tuned model's function

