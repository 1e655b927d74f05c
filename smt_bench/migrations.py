"""Every rule that keeps old run files and old run ids valid, in one place, each with the commit that made it
necessary (`since`) and why.

Three kinds of rule:

- **Run ids.** A run's id is the sha256 of its resolved config (`provenance.config_hash`), so a finished run
  is found again and skipped. A key added after runs existed is left out of the id at the value that
  reproduces what those runs computed (`ADDED`); a method whose config changed form is hashed in its old
  form wherever it computes what the old form did (`ID_FORMS`).
- **Run files.** The analysis reads results written by older versions: a method key added after them reads
  as the only behaviour they had (`LEGACY_DEFAULTS`), and a key that was removed and changes nothing a run
  computes is left out when runs are grouped (`RETIRED_KEYS`).
- **Result files.** A field an older version did not write is filled in as that version's run had it
  (`FILE_RULES`, applied by `upgrade` before `RunResult.from_json` reads a file: smt_bench/result.py).

A new rule goes here, with a test that an old file or id still reads the same (tests/test_migrations.py).
Imports nothing heavy: the analysis CLI uses it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Added:
    """A config key added after results existed; at `value` the key is left out of the run id and out of the
    analysis' settings, so runs made before it keep their ids and group with the runs made after."""
    key: str
    value: Any
    since: str
    why: str


ADDED = (
    Added("train.epochs", None, "2331b01", "epochs as an alternative to max_steps; null = max_steps decides"),
    Added("model.hub_kernels", False, "592d7b0", "transformers' hub kernels, off unless asked for"),
    Added("eval.include_path", None, "1552274", "a folder of the user's own lm-eval tasks; null = "
          "smt-bench's task folder only"),
)
ADDED_KEYS = {a.key: a.value for a in ADDED}


def without_added_defaults(cfg: dict) -> dict:
    """The config in the form runs had before the ADDED keys: each one at its old value removed."""
    out = dict(cfg)
    for key, default in ADDED_KEYS.items():
        group, name = key.split(".", 1)
        if isinstance(out.get(group), dict) and name in out[group] and out[group][name] == default:
            out[group] = {k: v for k, v in out[group].items() if k != name}
    return out


# --- method configs whose form changed ----------------------------------------------------------
LEGACY_LORA = "smt_bench.methods.peft_methods.LoRA"  # the LoRA/DoRA class before the generic peft tuner


def _peft_lora_as_before(node: dict) -> dict:
    """LoRA and DoRA as the generic peft tuner (since de3f5a0) hash in the form of the LoRA class they had
    before, wherever they are that class's computation (LoraConfig sized by r, α = ratio·r, no bias)."""
    args = dict(node.get("args") or {})
    legacy = (node.get("peft_config") == "LoraConfig" and node.get("knob") == "r"
              and set(node.get("scaled_args") or {}) == {"lora_alpha"} and args.pop("bias", "none") == "none"
              and set(args) == {"lora_dropout", "use_dora"})
    if not legacy:
        return node
    return {"_target_": LEGACY_LORA, "name": node["name"], "lr": node["lr"], "weight_decay": node["weight_decay"],
            "target_modules": node["target_modules"], "alpha_ratio": node["scaled_args"]["lora_alpha"],
            "dropout": args["lora_dropout"], "use_dora": args["use_dora"]}


def _smt_gradient_as_before(node: dict) -> dict:
    """SMT's `signal` (since 2331b01): runs from before it were gradient-selected, so the default is hashed as
    if the key were absent."""
    return {k: v for k, v in node.items() if not (k == "signal" and v == "gradient")}


# method keys added after runs with the method existed, at the value that computes what those runs did:
# hashed as absent there (ID_FORMS), read as that value from the old files (LEGACY)
LISA_ADDED = {"optimizer_state": "reset"}  # reset: a leaving layer's Adam moments freed, as before the key
S2FT_ADDED = {"allocation": "even",        # heads and channels spread evenly over the layers, as before the key
              "ratios": None,              # the split by attn_share (null: by pool size), as before
              "calibration_steps": 4}      # read only by the data-driven strategies, which came with it


def _without(added: dict[str, Any]) -> Callable[[dict], dict]:
    def form(node: dict) -> dict:
        return {k: v for k, v in node.items() if not (k in added and v == added[k])}
    return form


def _lisa_as_before(node: dict) -> dict:
    """LISA's `optimizer_state` (since 5be51de): runs from before it reset a leaving layer's moments, so `reset`
    is hashed as if the key were absent."""
    return _without(LISA_ADDED)(node)


def _s2ft_as_before(node: dict) -> dict:
    """S2FT's `allocation`, `ratios` and `calibration_steps` (since 5be51de): runs from before them spread the
    units evenly, split the budget by attn_share and had no calibration pass, so those values are hashed as if
    the keys were absent."""
    return _without(S2FT_ADDED)(node)


@dataclass(frozen=True)
class IdForm:
    target: str                        # the method config's _target_
    form: Callable[[dict], dict]       # the method node -> the node the run id hashes
    since: str


ID_FORMS = {f.target: f for f in (
    IdForm("smt_bench.methods.peft_methods.PeftTuner", _peft_lora_as_before, "de3f5a0"),
    IdForm("smt_bench.methods.smt.SMT", _smt_gradient_as_before, "2331b01"),
    IdForm("smt_bench.methods.lisa.LISA", _lisa_as_before, "5be51de"),
    IdForm("smt_bench.methods.s2ft.S2FT", _s2ft_as_before, "5be51de"),
)}


def id_form(node: dict) -> dict:
    """The method config node in the form its run id hashes (unchanged for a method without a rule)."""
    rule = ID_FORMS.get(str(node.get("_target_")))
    return rule.form(node) if rule else node


# --- reading old run files ----------------------------------------------------------------------
@dataclass(frozen=True)
class LegacyDefault:
    """A method key added after runs were written with the method: in a file without it, it reads as `value`
    (then the only behaviour), so old and new runs group and label right."""
    method: str
    key: str
    value: Any
    since: str


LEGACY = (
    LegacyDefault("smt", "score_accumulation", "score_sum", "ac3b40e"),
    LegacyDefault("smt", "accumulator_device", "same", "ac3b40e"),
    LegacyDefault("smt", "signal", "gradient", "2331b01"),
    *(LegacyDefault("lisa", k, v, "5be51de") for k, v in LISA_ADDED.items()),
    *(LegacyDefault("s2ft", k, v, "5be51de") for k, v in S2FT_ADDED.items()),
)
LEGACY_DEFAULTS: dict[str, dict[str, Any]] = {}
for _d in LEGACY:
    LEGACY_DEFAULTS.setdefault(_d.method, {})[_d.key] = _d.value

# keys that were removed and change nothing a run computes -> why (since): runs with and without them are one
# setting; each file keeps its own value
RETIRED_KEYS = {
    "model.smt_block_size": "now method.block_size, an upper bound the model's shapes reduce; SmolLM2's runs "
                            "recorded 64, the size SMT takes there now (since 91e654d)",
}


def with_legacy_defaults(cfg: dict) -> dict:
    """A result's config with its method's LEGACY_DEFAULTS filled in where the file predates the key."""
    method = cfg.get("method") or {}
    missing = {k: v for k, v in LEGACY_DEFAULTS.get(str(method.get("name")), {}).items() if k not in method}
    return {**cfg, "method": {**method, **missing}} if missing else cfg


# --- result files written by older versions ------------------------------------------------------
@dataclass(frozen=True)
class FileRule:
    """A result-file field an older version did not write (or wrote otherwise): `apply` fills it in as that
    version's run had it, in place, on the parsed file, before RunResult (smt_bench/result.py) reads it."""
    field: str
    since: str
    why: str
    apply: Callable[[dict], None]


def _updated_at(obj: dict) -> None:
    info = obj.get("run_info")
    if isinstance(info, dict) and "updated_at" not in info and "created_at" in info:
        info["updated_at"] = info["created_at"]


def _one_process(obj: dict) -> None:
    ti, cfg = obj.get("train_info"), obj.get("config")
    if not isinstance(ti, dict) or not isinstance(cfg, dict) or "distributed" in ti:
        return
    tc: dict = cfg["train"] if isinstance(cfg.get("train"), dict) else {}
    ti["distributed"] = {"world_size": 1, "strategy": "single"}
    if "global_batch" not in ti and isinstance(tc.get("batch_size"), int):
        ti["global_batch"] = tc["batch_size"] * int(tc.get("grad_accum") or 1)


def _fixed_fraction(obj: dict) -> None:
    ti, cfg = obj.get("train_info"), obj.get("config")
    budget = cfg.get("budget") if isinstance(cfg, dict) else None
    if (isinstance(ti, dict) and isinstance(budget, dict) and ti.get("trainable_pct_target") == 100
            and (obj.get("run_info") or {}).get("status") == "finished" and budget.get("fraction") != 1.0):
        budget["fraction"] = 1.0


FILE_RULES = (
    FileRule("run_info.updated_at", "10a5d81", "a run's file is rewritten while it trains; before, it was written "
             "once, when the run ended: the last write is its creation", _updated_at),
    FileRule("train_info.distributed, train_info.global_batch", "82b34cf", "runs before multi-rank support ran "
             "in one process: world size 1, global batch = batch_size × grad_accum", _one_process),
    FileRule("config.budget.fraction", "4daeaae", "a method that trains a fixed fraction (full FT) records it as "
             "its budget; before, its file kept the sweep's value though it trained 100%", _fixed_fraction),
)


def upgrade(obj: dict) -> dict:
    """A parsed result file in the form this version writes: a copy, with every FILE_RULES rule applied."""
    import copy

    out = copy.deepcopy(obj)
    for rule in FILE_RULES:
        rule.apply(out)
    return out
