"""The evaluation suites on the real SmolLM2-135M-Instruct (CPU): the default suite (bundled test
split, 6 x 20) and a slice of GSM8K from the offline copy. Eval wall times are printed (pytest -s) and
kept in the report's properties, never asserted: they depend on the machine (scripts/bench_eval.py
measures them)."""
import pytest
from hydra.utils import instantiate

from smt_bench.evaluation.harness import evaluate_suite
from smt_bench.evaluation.suites import plan_suite
from smt_bench.models import SmolLM2GGUF

pytestmark = pytest.mark.slow
GSM8K_SLICE = 24


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return SmolLM2GGUF().load()


def _suite(compose, *overrides):
    cfg = compose(*overrides)
    test = instantiate(cfg.data).load().test
    return cfg, plan_suite(cfg.eval, test, True, cfg.data.name)


def test_default_suite_on_smollm2(smollm2, compose, record_property):
    model, tok = smollm2
    cfg, plan = _suite(compose)
    assert cfg.eval.suite == "bundled" and cfg.model.name == "smollm2-135m"
    ev = cfg.eval
    r = evaluate_suite(model, tok, plan, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                       num_beams=ev.num_beams)
    print(f"\n[eval] default suite (bundled, 120 items) on SmolLM2: {r['wall_s']:.1f} s eval wall time; "
          f"mean accuracy {r['mean_accuracy']:.1f}")
    record_property("bundled_eval_wall_s", r["wall_s"])
    assert r["n"] == {t: 20 for t in r["accuracy"]} and len(r["accuracy"]) == 6
    assert r["protocol"].startswith("generative-first-match (LLM-Adapters)") and "max_new_tokens=32" in r["protocol"]
    assert 0 < r["mean_accuracy"] < 100  # a real model: some right, not all


def test_gsm8k_slice_on_smollm2(smollm2, compose, record_property):
    model, tok = smollm2
    cfg, plan = _suite(compose, "eval=math", f"eval.max_examples={GSM8K_SLICE}")
    assert [(t.name, t.n) for t in plan.tasks] == [("gsm8k", GSM8K_SLICE)]  # offline: the wheel's GSM8K test set
    r = evaluate_suite(model, tok, plan, batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens)
    print(f"\n[eval] GSM8K {GSM8K_SLICE}-question slice on SmolLM2: {r['wall_s']:.1f} s eval wall time; "
          f"accuracy {r['accuracy']['gsm8k']:.1f}")
    record_property("gsm8k_slice_eval_wall_s", r["wall_s"])
    assert r["n"] == {"gsm8k": GSM8K_SLICE} and 0 <= r["accuracy"]["gsm8k"] <= 100
    assert r["skipped"] == {"gsm8k": "lm-eval built-in task needs the hub, which is offline (HF_HUB_OFFLINE=1)"}
