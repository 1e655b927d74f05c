"""smt_bench.migrations keeps old run ids and old run files valid: every committed result's id is what its own
config hashes to through the rules, and the ids README command 1 makes are those of the committed runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from smt_bench import migrations, provenance

REPO = Path(__file__).resolve().parents[1]
COMMITTED = sorted((REPO / "results").glob("*/runs/**/*.json"))


def _id(config: dict) -> str:
    return provenance.config_hash({**config, "method": migrations.id_form(config["method"])})


def test_every_committed_run_id_is_its_config_through_the_rules():
    assert len(COMMITTED) >= 100
    wrong = [p.name for p in COMMITTED if _id((r := json.loads(p.read_text()))["config"]) != r["run_info"]["id"]]
    assert wrong == []


def test_without_the_rules_old_ids_would_break():
    """Each id rule is needed: hashing today's config of a LoRA run or a gradient-selected SMT run as it is
    gives another id."""
    sweep = [p for p in COMMITTED if p.parts[-4] == "embedded-sweep"]  # its first runs predate the peft tuner
    lora = next(json.loads(p.read_text()) for p in sweep if p.name.startswith("lora-"))
    assert lora["config"]["method"]["_target_"] == migrations.LEGACY_LORA  # written by the old class
    smt = next(r for p in COMMITTED if p.name.startswith("smt-")
               and (r := json.loads(p.read_text()))["config"]["method"].get("signal") == "gradient")
    assert provenance.config_hash(smt["config"]) != smt["run_info"]["id"] == _id(smt["config"])


@pytest.mark.parametrize("fraction,run_id", [(0.005, "8f9f96b01e96"), (0.01, "40256e27beb3"),
                                             (0.02, "a93217919928"), (0.05, "876bb93ba97a")])
def test_readme_command_1_keeps_its_run_ids(fraction, run_id):
    from smt_bench.__main__ import compose_config
    from smt_bench.run import Prepared

    assert Prepared(compose_config(["method=smt", f"budget.fraction={fraction}"])).run_id == run_id


def test_the_new_peft_form_of_lora_hashes_as_the_old_class():
    from omegaconf import OmegaConf

    from smt_bench.__main__ import compose_config

    for method, dora in (("lora", False), ("dora", True)):
        node = OmegaConf.to_container(compose_config([f"method={method}"]).method, resolve=True)
        old = migrations.id_form(node)
        assert old["_target_"] == migrations.LEGACY_LORA and old["use_dora"] is dora
        assert old["alpha_ratio"] == node["scaled_args"]["lora_alpha"]
    rank_sized_other = {**node, "peft_config": "VeraConfig"}  # not the old class's computation: as it is
    assert migrations.id_form(rank_sized_other) == rank_sized_other


def test_added_keys_at_their_old_value_leave_the_id_and_elsewhere_change_it():
    cfg = {"train": {"max_steps": 20}, "model": {"name": "m"}, "eval": {"suite": "s"}, "method": {"_target_": "x", "name": "x"}}
    base = provenance.config_hash(cfg)
    for added in migrations.ADDED:
        group, key = added.key.split(".", 1)
        with_old = {**cfg, group: {**cfg[group], key: added.value}}
        assert provenance.config_hash(with_old) == base, added.key
        assert provenance.config_hash({**cfg, group: {**cfg[group], key: "other"}}) != base, added.key
        assert added.since and added.why


def test_old_files_read_with_the_behaviour_they_had():
    old = {"method": {"name": "smt", "score": "abs_mean"}}
    assert migrations.with_legacy_defaults(old)["method"] == {"name": "smt", "score": "abs_mean",
                                                               "score_accumulation": "score_sum",
                                                               "accumulator_device": "same", "signal": "gradient"}
    new = {"method": {"name": "smt", "score_accumulation": "grad_sum", "accumulator_device": "cpu",
                      "signal": "activation"}}
    assert migrations.with_legacy_defaults(new) == new
    assert all(d.since for d in migrations.LEGACY) and "model.smt_block_size" in migrations.RETIRED_KEYS


def test_result_files_of_older_versions_read_as_their_runs_were():
    """FILE_RULES: a file from before updated_at and multi-rank support, and a full-FT file that kept the
    sweep's budget, read with the fields this version writes, each as that run had it."""
    from smt_bench.analysis.flatten import flatten
    from smt_bench.result import RunResult

    new = next(r for p in COMMITTED if "distributed" in (r := json.loads(p.read_text()))["train_info"])
    old = json.loads(json.dumps(new))
    del old["run_info"]["updated_at"], old["train_info"]["distributed"], old["train_info"]["global_batch"]
    up = migrations.upgrade(old)
    assert up["run_info"]["updated_at"] == old["run_info"]["created_at"] and "updated_at" not in old["run_info"]
    assert up["train_info"]["distributed"] == {"world_size": 1, "strategy": "single"}
    assert up["train_info"]["global_batch"] == new["train_info"]["global_batch"] == 8
    a, b = flatten(RunResult.from_json(old), "f"), flatten(RunResult.from_json(new), "f")
    same = ("world_size", "parallel", "global_batch", "mean_accuracy", "trainable_pct")
    assert {k: a[k] for k in same} == {k: b[k] for k in same}
    assert a["updated_at"] == new["run_info"]["created_at"] != b["updated_at"]

    full = json.loads(next(p for p in COMMITTED if p.name.startswith("full_ft-")).read_text())
    full["config"]["budget"]["fraction"] = 0.01
    assert flatten(RunResult.from_json(full), "f")["budget_fraction"] == 1.0
    assert [r.since for r in migrations.FILE_RULES] == ["10a5d81", "82b34cf", "4daeaae"]


@pytest.mark.parametrize("name", ["lisa", "s2ft"])
def test_committed_lisa_and_s2ft_runs_keep_their_ids(name):
    """LISA's optimizer_state and S2FT's allocation, ratios and calibration_steps came after these runs: today's
    command for each committed run, at the keys' defaults (the behaviour those runs had), gives the run's id; the
    same config hashed as it is (without the rule) would not."""
    from omegaconf import OmegaConf

    from smt_bench.__main__ import compose_config
    from smt_bench.run import Prepared

    runs = [json.loads(p.read_text()) for p in COMMITTED if p.name.startswith(f"{name}-")]
    assert len(runs) >= 3
    added = {"lisa": migrations.LISA_ADDED, "s2ft": migrations.S2FT_ADDED}[name]
    for r in runs:
        c = r["config"]
        prep = Prepared(compose_config([f"method={name}", f"budget.fraction={c['budget']['fraction']}",
                                        f"seed={c['seed']}"]))
        assert prep.run_id == r["run_info"]["id"]
        assert {k: prep.container["method"][k] for k in added} == added  # the defaults are the old behaviour
        assert provenance.config_hash(prep.container) != r["run_info"]["id"]
    # another value of a new key is another computation: another id
    node = OmegaConf.to_container(compose_config([f"method={name}"]).method, resolve=True)
    for key in added:
        other = {**node, key: {"optimizer_state": "keep", "allocation": "model_wide", "ratios": [0.0, 1.0],
                               "calibration_steps": 8}[key]}
        assert migrations.id_form(other)[key] == other[key] and migrations.id_form(other) != migrations.id_form(node)


def test_old_lisa_and_s2ft_files_read_as_the_defaults_that_reproduce_them():
    """A committed LISA or S2FT file (results/embedded-sweep's, written before the new keys) reads with the values
    its run had, so a run made today at the defaults joins its series; a file written with the keys
    (results/anatomy's) reads as written."""
    for name, added in (("lisa", migrations.LISA_ADDED), ("s2ft", migrations.S2FT_ADDED)):
        def first(study: str) -> dict:
            return json.loads(next(p for p in COMMITTED if p.name.startswith(f"{name}-")
                                   and p.is_relative_to(REPO / "results" / study)).read_text())["config"]
        old, new = first("embedded-sweep"), first("anatomy")
        assert not set(added) & set(old["method"])
        assert migrations.with_legacy_defaults(old)["method"] == {**old["method"], **added}
        assert set(added) <= set(new["method"]) and migrations.with_legacy_defaults(new)["method"] == new["method"]
