"""Adding a method is one module plus one config file: tests/example_method/ holds both (docs/methods.md's
example). Dropped into a copy of conf/, the method runs end to end and the analysis reports it."""
from __future__ import annotations

import shutil
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from smt_bench.analysis.report import analyze
from smt_bench.run import execute
from smt_bench.schema import store

EXAMPLE = Path(__file__).parent / "example_method"


def test_a_new_method_is_one_module_and_one_yaml(tmp_path, monkeypatch, smollm2_path):
    conf = tmp_path / "conf"
    shutil.copytree(store.CONF, conf)
    shutil.copy(EXAMPLE / "top_layers.yaml", conf / "method")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    store.register(conf)
    results = tmp_path / "results"
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("config", overrides=["model=tiny-llama", "device=cpu", "method=top_layers",
                                               "budget.fraction=0.004", "train.max_steps=3", "eval.enabled=false",
                                               f"results.dir={results}"])
    finally:
        GlobalHydra.instance().clear()
        store.register()
    result = execute(cfg)
    assert result.run_info.status == "finished"
    plan = result.train_info.plan
    # 0.4% of tiny-llama is 12,879 params: v_proj (2,048) and q_proj (4,096) of both layers, last layer first
    assert plan["matrices"] == ["model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
                                "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.q_proj"]
    assert result.train_info.trainable_params == 12_288
    report = analyze([results], tmp_path / "analysis")
    assert "top_layers" in Path(report).read_text()
