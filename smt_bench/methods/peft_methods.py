"""Any peft tuner at a matched budget: the config names peft's config class and its fixed arguments;
this module only solves for the size argument (`r` for LoRA, PiSSA, rsLoRA, SHiRA, MiSS, KaSA, CorDA, ...;
Super-Tuning's `sparsity`, a fraction).

The solver asks peft itself: it counts the trainable parameters of the tuner injected into a
meta-device copy of the model, so a tuner's own accounting (DoRA's magnitudes, MiSS's block shape,
SHiRA's r·(m+n) entries, KaSA's singular values, Super-Tuning's ⌊(1 − sparsity)·m·n⌋ entries) is never
re-derived here.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List

import torch
from torch import nn

from ..errors import BudgetUnreachable, UserError
from ..models import ModelShapes
from ..schema.spec import Valid, above, invalid, nonempty, nonempty_list, param, within
from ..schema.spec import count as integer_from
from .base import Context, Method, Plan, Tuned

if TYPE_CHECKING:
    from peft import PeftConfig

# Arguments that only decide initial values, set so peft can inject the tuner into a meta-device model
# (PiSSA's and CorDA's SVD and SHiRA's random mask read weight values); the trainable count does not depend
# on them. KaSA (its truncation waits for real weights on the meta device) and Super-Tuning (its top-k runs on
# meta tensors: k = ⌊(1 − sparsity)·m·n⌋ per target, whatever the values) need no entry.
COUNT_NEUTRAL: dict[str, dict[str, Any]] = {
    "LoraConfig": {"init_lora_weights": True},
    "ShiraConfig": {"mask_fn": lambda base_layer, r, **kw: None},
}
# LoRA inits that rewrite the base weights at prepare, by how an export applies to the ORIGINAL base model:
# "initial" (PiSSA, OLoRA, CorDA: W_res = W - s·B₀A₀): peft converts the export against the initial adapter
# into a LoRA of rank 2r; "reapplied" (KaSA: W truncated to its top min(m, n) - r singular components): peft
# truncates the base weight again when it loads the adapter, so the adapter is exported as it is.
REWRITES_BASE: dict[str, Callable[[Mapping[str, Any]], str | None]] = {
    "LoraConfig": lambda args: (
        "initial" if isinstance(args.get("init_lora_weights"), str) and
        str(args["init_lora_weights"]).lower().startswith(("pissa", "olora", "corda"))
        else "reapplied" if args.get("kasa_config") is not None else None)}
# The largest size that adds capacity, where peft itself allows more: a LoRA rank above min(d_in, d_out)
# adds parameters but no rank; KaSA keeps at least one singular component of the base weight (r < min).
MAX_SIZE: dict[str, Callable[[Any, Mapping[str, Any]], int]] = {
    "LoraConfig": lambda t, args: min(t.d_in, t.d_out) - (args.get("kasa_config") is not None)}
# A tuner's own loss term, by the argument that enables it: the peft model's method that returns it (KaSA's
# penalties on its singular values and on the orthogonality of its factors). The trainer adds it to the loss
# through Tuned.regularizer(); the logged loss is the task loss alone.
REGULARIZERS: dict[str, dict[str, str]] = {"LoraConfig": {"kasa_config": "_get_kasa_loss"}}
# peft arguments that seed a tuner's own random choice (SHiRA's random mask): unless method.args pins one, it
# takes the run's seed (Context.seed), so the seeds of a sweep draw different masks.
RUN_SEEDED: dict[str, tuple[str, ...]] = {"ShiraConfig": ("random_seed",)}
# run ids of LoRA / DoRA from before this class: their configs hashed in that class's form
# (shapes, tuner config, size) -> trainable count: plans re-ask for the same sizes
_COUNTS: dict[tuple[ModelShapes, str, float], int] = {}


# args / scaled_args: names and values are peft's to check (check_config builds the peft config with them)
ARGUMENTS = Valid(lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v),
                  "a mapping of argument names of method.peft_config to values")


def peft_config_class(name: str) -> type[PeftConfig]:
    import peft

    cls = getattr(peft, name, None)
    if not (isinstance(cls, type) and issubclass(cls, peft.PeftConfig)):
        raise ValueError(name)
    return cls


def fraction_knob(cls: type, knob: str) -> bool:
    """A size argument peft types as a float (Super-Tuning's sparsity) is a fraction in [0, 1], searched as
    one; every other one is an integer size (a rank)."""
    f = cls.__dataclass_fields__.get(knob)  # type: ignore[attr-defined]
    return f is not None and (f.type in (float, "float") or isinstance(f.default, float))


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


@dataclass(frozen=True)
class PeftTuner(Method):
    """Defaults: LoRA's peft config on the DoRA commonsense protocol's targets. conf/method/<name>.yaml
    sets only what makes it that method (peft_config, knob, args, scaled_args; docs/methods.md)."""

    peft_config: str = param("LoraConfig", nonempty())  # a class of peft: LoraConfig, ShiraConfig, MissConfig, ...
    # the config argument the budget sets: an integer size (LoRA's r; SHiRA: r·(m+n) entries per m×n target) or
    # a fraction peft types as float (Super-Tuning's sparsity), searched on a decimal grid
    knob: str = param("r", nonempty())
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
            raise invalid(f"{at}.knob", cfg.knob, f"a size argument of {cfg.peft_config}: an integer (e.g. r) or "
                          "a fraction (e.g. SupertuningConfig's sparsity)")
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
        size = 0.5 if fraction_knob(cls, cfg.knob) else 1
        try:  # peft's own checks of the values (a misspelt init, a bad combination), at a valid size
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls(**{**args, **{k: v * size for k, v in scaled.items()}, cfg.knob: size,
                       "target_modules": list(_plain(cfg.target_modules))})
        except (ValueError, TypeError) as e:
            raise UserError(f"{at}.args: {cfg.peft_config} refuses them: {e}") from None
        dora = bool(args.get("use_dora", False))  # the analysis groups runs by name
        if cfg.name == "lora" and (cfg.peft_config != "LoraConfig" or dora):
            raise invalid(f"{at}.args.use_dora", dora, "false (with LoraConfig) for method=lora; DoRA is method=dora")
        if cfg.name == "dora" and not dora:
            raise invalid(f"{at}.args.use_dora", dora, "true for method=dora; LoRA is method=lora")

    # --- the budget ---
    def peft_config_for(self, size: float, count_only: bool = False, seed: int = 0) -> PeftConfig:
        """peft's config at this size; `seed` (the run's) for the RUN_SEEDED arguments `args` leaves unset."""
        cls = peft_config_class(self.peft_config)
        seeded = {k: seed for k in RUN_SEEDED.get(self.peft_config, ()) if self.args.get(k) is None}
        args = {**seeded, **self.args, **{k: ratio * size for k, ratio in self.scaled_args.items()},
                self.knob: size, "target_modules": list(self.target_modules)}
        if "task_type" in cls.__dataclass_fields__:
            args.setdefault("task_type", "CAUSAL_LM")
        neutral = COUNT_NEUTRAL.get(self.peft_config, {}) if count_only else {}
        with warnings.catch_warnings():  # e.g. CorDA's config beside the count's neutral init
            warnings.simplefilter("ignore")
            cfg = cls(**{**args, **{k: v for k, v in neutral.items() if not callable(v)}})
        for k, v in neutral.items():  # set after construction: peft's __post_init__ would replace them
            if callable(v):
                setattr(cfg, k, v)
        return cfg

    def count(self, shapes: ModelShapes, size: float) -> int:
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
        if fraction_knob(peft_config_class(self.peft_config), self.knob):
            return self._plan_fraction(shapes, target_params)
        largest = MAX_SIZE.get(self.peft_config)
        top = largest and min(largest(t, self.args) for t in shapes.select(self.target_modules))
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

    def _plan_fraction(self, shapes: ModelShapes, target_params: int) -> Plan:
        """A fraction knob on the grid k / 10^d, finer than one entry of the largest target: peft's count is
        monotone in it, so the size whose count is nearest the target is found by bisection, started from the
        affine estimate (peft rounds per matrix: Super-Tuning takes ⌊(1 − sparsity)·m·n⌋ entries of each)."""
        largest = max(t.d_in * t.d_out for t in shapes.select(self.target_modules))
        grid = 10 ** (len(str(largest)) + 1)
        refused: list[str] = []

        def at(k: int) -> int | None:  # peft's count at knob k / grid; None where peft refuses it
            try:
                return self.count(shapes, k / grid)
            except ValueError as e:
                refused.append(str(e).splitlines()[0])
                return None

        k1, k2 = grid // 4, 3 * grid // 4
        c1, c2 = at(k1), at(k2)
        if c1 is None or c2 is None or c1 == c2:
            raise UserError(f"method.knob={self.knob}: peft's count does not change with it between "
                            f"{k1 / grid:g} and {k2 / grid:g} ({refused[0] if refused else 'the same count'}); "
                            "choose a size argument of method.peft_config")
        rising = c2 > c1

        def knob_at(j: int) -> int:  # j: the grid position counted in the direction in which the count rises
            return j if rising else grid - j

        def g(j: int) -> int | None:
            return at(knob_at(j))

        ideal_k = k1 + (target_params - c1) * (k2 - k1) / (c2 - c1)  # exact where the count is affine
        ideal_j = ideal_k if rising else grid - ideal_k
        unreachable = (f"budget of {target_params:,} params is unreachable for {self.name} on "
                       f"{list(self.target_modules)}: {self.knob} would be {ideal_k / grid:.6g}")
        for end, beyond, what, fix in ((grid, ideal_j > grid + 0.5, "most", "a smaller budget or more "
                                        "method.target_modules"), (0, ideal_j < -0.5, "fewest", "a larger budget")):
            c_end = g(end) if beyond else None
            if c_end is not None:
                raise BudgetUnreachable(f"{unreachable}, {self.knob}={knob_at(end) / grid:g} gives the {what}, "
                                        f"{c_end:,} params; choose {fix}")
        # bracket the target from the affine estimate outward, doubling the step: g(lo) < target <= g(hi)
        j = min(max(round(ideal_j), 0), grid)
        cj = g(j)
        lo: tuple[int, int | None]
        hi: tuple[int, int | None]
        step = 1
        if cj is not None and cj >= target_params:
            hi = (j, cj)
            while True:
                a = max(j - step, 0)
                ca = g(a)
                if ca is None or ca < target_params or a == 0:
                    lo = (a, ca)
                    break
                hi, step = (a, ca), step * 2
        else:
            lo = (j, cj)
            while True:
                b = min(j + step, grid)
                cb = g(b)
                if (cb is not None and cb >= target_params) or b == grid:
                    hi = (b, cb)
                    break
                lo, step = (b, cb), step * 2
        if lo[1] is not None and lo[1] >= target_params:  # the bracket reached the knob's end: lo is the best
            hi = lo
        while hi[0] - lo[0] > 1:  # bisection to adjacent grid points
            m = (lo[0] + hi[0]) // 2
            cm = g(m)
            if cm is not None and cm >= target_params:
                hi = (m, cm)
            else:
                lo = (m, cm)
        options = [(abs(c - target_params), c, jj) for jj, c in (lo, hi) if c is not None]
        if not options or (lo[1] is None and hi[1] is not None and hi[1] > 2 * target_params):
            why = f", which peft refuses ({refused[-1]})" if refused else ""
            raise BudgetUnreachable(f"{unreachable}{why}; choose a larger budget")
        _, achieved, best = min(options)
        size = knob_at(best) / grid
        return Plan(target_params, achieved, {self.knob: size, "peft_config": self.peft_config})

    def prepare(self, model: nn.Module, plan: Plan, context: Context | None) -> "PeftTuned":
        cfg = self.peft_config_for(plan.detail[self.knob], seed=context.seed if context else 0)
        return self._inject(model, cfg)

    def _inject(self, model: nn.Module, cfg: PeftConfig, tuned_class: type[PeftTuned] | None = None,
                **kw: Any) -> "PeftTuned":
        from peft import get_peft_model

        with warnings.catch_warnings():
            # peft's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing` alias,
            # which warns on every run (transformers >= 5); the warning is peft's to fix, not ours
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            tuned = (tuned_class or PeftTuned)(self, get_peft_model(model, cfg), **kw)
        tuned.seeded = {k: getattr(cfg, k) for k in RUN_SEEDED.get(self.peft_config, ())
                        if self.args.get(k) is None}
        tuned.keep_initial_adapter()
        return tuned


class PeftTuned(Tuned):
    """A peft model: the adapter weights are its parameters with requires_grad; peft saves and merges."""

    method: PeftTuner
    initial: str | None = None  # the adapter at init, where the init rewrote the base weights (PiSSA)
    seeded: dict[str, Any] = {}  # the RUN_SEEDED arguments that took the run's seed

    def rewrites_base(self) -> str | None:
        """How the init rewrote the base weights ("initial", "reapplied": REWRITES_BASE), or None."""
        test = REWRITES_BASE.get(self.method.peft_config)
        return test(self.method.args) if test is not None else None

    def keep_initial_adapter(self) -> None:
        """PiSSA-style inits train on W_res = W - BA: an export must be converted against the initial
        adapter to apply to the original base model, so that adapter is kept (on host disk, small)."""
        if self.rewrites_base() != "initial":
            return
        self._tmp = tempfile.TemporaryDirectory(prefix="smt-bench-initial-adapter-")
        self.initial = os.path.join(self._tmp.name, "initial")
        cfg = self.model.peft_config["default"]
        init = cfg.init_lora_weights
        cfg.init_lora_weights = True  # peft's recipe: saved as a plain LoRA init
        self.model.save_pretrained(self.initial)
        cfg.init_lora_weights = init

    def regularizer(self) -> torch.Tensor | None:
        """The tuner's own loss term where peft offers one (REGULARIZERS: KaSA's), else None."""
        for arg, name in REGULARIZERS.get(self.method.peft_config, {}).items():
            if self.method.args.get(arg) is not None:
                term = getattr(self.model.base_model, name)()
                return term if isinstance(term, torch.Tensor) else None
        return None

    def export(self, directory: str | Path, base_model: str) -> list[str]:
        """The adapter, applicable to the original base model: a PiSSA adapter is converted by peft into a
        LoRA adapter of rank 2r (ΔW relative to the original W); a KaSA adapter is saved as it is (peft
        truncates the original base weight again when it loads it)."""
        if self.initial is not None:
            with warnings.catch_warnings():  # peft's conversion loads the initial adapter beside the trained one,
                # and warns as if a user combined them (and that the plain-LoRA copy ignores corda_config)
                warnings.filterwarnings("ignore", message=r".*changes the base weights of the model")
                warnings.filterwarnings("ignore", message=r"`corda_config` specified but will be ignored")
                self.model.save_pretrained(directory, path_initial_model_for_weight_conversion=self.initial)
        else:
            self.model.save_pretrained(directory)
        return [f"{directory}/adapter_config.json", f"{directory}/adapter_model.safetensors"]

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"base_rewritten_at_init": True} if self.rewrites_base() else {}
        if self.seeded:
            out["seeded_args"] = dict(self.seeded)
        return out

    def merged(self) -> nn.Module:
        return self.model.merge_and_unload()  # W_res + ΔW for PiSSA: the tuned model's function


# --- CorDA: a LoRA init calibrated on the method's own batches ------------------------------------------
EIGENS = "corda_eigens."  # checkpoint tensors: the decomposition the init used, per target (r columns each)
_EIGEN_FIELDS = ("S_WC", "U_WC", "V_WC")


@dataclass(frozen=True)
class CordaTuner(PeftTuner):
    """CorDA (Yang et al., NeurIPS 2024): LoRA initialised from the SVD of each target weight multiplied by the
    covariance C of its inputs, SVD(WC) = UΣVᵀ, the adapter B·A = U_r Σ_r (VᵀC⁻¹)_r and the base W − BA.
    corda_config.corda_method: "ipm" (instruction-previewed, the default: the r LARGEST components train, the
    covariance of the fine-tuning task's data) or "kpm" (knowledge-preserved: the r SMALLEST components train;
    the paper's covariance is of questions from the knowledge to keep, here the method's own batch stream).
    The covariance: `calibration_steps` steps of the method's batch stream (Context.batches), each sample
    forwarded alone (peft's hook takes one sequence), summed over ranks."""

    args: Dict[str, Any] = param(valid=ARGUMENTS, factory=lambda: {
        "init_lora_weights": "corda", "corda_config": {"corda_method": "ipm"}, "lora_dropout": 0.0, "bias": "none"})
    scaled_args: Dict[str, float] = param(valid=ARGUMENTS, factory=lambda: {"lora_alpha": 1.0})  # α = r, as PiSSA
    # steps of the method's batch stream (each one global batch) whose inputs make the covariance; sized for the
    # embedded CPU run (16 sequences at batch 4); the paper: 256 samples (256 / global batch steps)
    calibration_steps: int = param(4, integer_from(1))

    @staticmethod
    def check_config(cfg: Any, at: str) -> None:
        PeftTuner.check_config(cfg, at)
        args = _plain(cfg.args)
        if cfg.peft_config != "LoraConfig" or str(args.get("init_lora_weights")).lower() != "corda":
            raise invalid(f"{at}.args.init_lora_weights", args.get("init_lora_weights"),
                          "corda with peft_config=LoraConfig (CordaTuner calibrates CorDA's init)")
        corda = args.get("corda_config") or {}
        if corda.get("corda_method", "ipm") not in ("ipm", "kpm"):
            raise invalid(f"{at}.args.corda_config.corda_method", corda.get("corda_method"),
                          "one of ipm (instruction-previewed), kpm (knowledge-preserved)")
        for key in ("cache_file", "covariance_file"):
            if corda.get(key) is not None:
                raise UserError(f"{at}.args.corda_config.{key}: the covariance is calibrated on the method's "
                                "batch stream in every run (resume keeps its decomposition); remove it")

    def _target_modules(self, model: nn.Module, cfg: PeftConfig) -> Iterator[tuple[str, nn.Module]]:
        from peft.tuners.lora.corda import target_modules

        return target_modules(model, cfg)

    def _calibrate(self, model: nn.Module, cfg: PeftConfig, context: Context) -> None:
        """peft's hooks sum each target's input covariance: every sequence of this rank's share alone, its
        padding left out; then summed over ranks, so every rank decomposes with the same covariance."""
        # only the targets' inputs are needed: the head's logits of the last position alone, where the model can
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        for batch in context.batches(self.calibration_steps * context.accumulation):
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                model(input_ids=ids[mask.bool()][None], use_cache=False, **keep)
        world = context.world
        if world.distributed:
            for _, m in self._target_modules(model, cfg):
                world.all_reduce(m.covariance_matrix)
                m.sample_count = int(world.reduce_floats([float(m.sample_count)])[0])

    def prepare(self, model: nn.Module, plan: Plan, context: Context | None) -> "CordaTuned":
        from peft.tuners.lora.corda import preprocess_corda

        if context is None:
            raise ValueError("CorDA calibrates on the method's batch stream: prepare needs a Context")
        cfg = self.peft_config_for(plan.detail[self.knob], seed=context.seed)
        preprocess_corda(model, cfg, run_model=lambda: self._calibrate(model, cfg, context))
        eigens: dict[str, torch.Tensor] = {}
        for name, m in self._target_modules(model, cfg):
            for f in _EIGEN_FIELDS:
                t = getattr(m.eigens, f)
                if context.world.distributed:  # rank 0's decomposition on every rank, bit for bit
                    if not context.world.is_main:
                        t.zero_()
                    context.world.all_reduce(t)
                eigens[f"{EIGENS}{name}.{f}"] = t.detach().to("cpu", copy=True)
        return self._corda(model, cfg, eigens)

    def _corda(self, model: nn.Module, cfg: PeftConfig, eigens: dict[str, torch.Tensor]) -> "CordaTuned":
        tuned = self._inject(model, cfg, CordaTuned, eigens=eigens)
        assert isinstance(tuned, CordaTuned)
        return tuned

    def resume(self, model: nn.Module, plan: Plan, context: Context, state: dict[str, torch.Tensor],
               meta: dict[str, Any]) -> "CordaTuned":
        """The checkpoint's decomposition, not a new calibration: the same base rewrite and initial adapter,
        bit for bit, as the run it resumes."""
        from peft.tuners.lora.corda import CordaEigens

        cfg = self.peft_config_for(plan.detail[self.knob], seed=context.seed if context else 0)
        eigens = {k: v for k, v in state.items() if k.startswith(EIGENS)}
        for name, m in self._target_modules(model, cfg):
            dev = m.weight.device
            try:
                m.eigens = CordaEigens(**{f: eigens[f"{EIGENS}{name}.{f}"].to(dev, copy=True) for f in _EIGEN_FIELDS})
            except KeyError:
                raise ValueError(f"checkpoint does not match the {self.name} model: no CorDA decomposition "
                                 f"for {name}") from None
        tuned = self._corda(model, cfg, eigens)
        tuned.load_state_dict(state, meta)
        return tuned


class CordaTuned(PeftTuned):
    """A CorDA peft model; its checkpoints carry the decomposition the init used (EIGENS), so a resumed run
    rewrites the base weights exactly as the run it resumes did."""

    def __init__(self, method: PeftTuner, model: nn.Module, eigens: dict[str, torch.Tensor]) -> None:
        super().__init__(method, model)
        self.eigens = eigens

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state_dict()
        return {**tensors, **self.eigens}, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in tensors.items() if not k.startswith(EIGENS)}, meta)
