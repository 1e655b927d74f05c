"""scripts/check_latest.py (run by a person before refreshing the lock, not by CI) cannot rot unseen: its
smoke runs cover every method and pass the preflight, and its report names the upgrade that breaks an item."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import smt_bench.__main__ as app_main

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_latest", REPO / "scripts" / "check_latest.py")
check_latest = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_latest)


def test_the_smoke_subset_covers_every_method_the_kernels_an_eval_and_the_analysis(tmp_path):
    items = check_latest.smoke_items(tmp_path)
    methods = {p.stem for p in (REPO / "conf" / "method").glob("*.yaml")}
    assert {n.removeprefix("run:") for n in items if n.startswith("run:")} == methods
    assert {"kernels", "eval", "analysis"} <= set(items)
    assert (REPO / items["kernels"][2]).is_file() and (REPO / items["analysis"][2]).is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("item", sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml")) + ["eval"])
def test_each_smoke_run_passes_the_preflight(item, tmp_path, monkeypatch, capsys, smollm2_path):
    args = check_latest.smoke_items(tmp_path)[item if item == "eval" else f"run:{item}"]
    assert args[:2] == ["-m", "smt_bench"]
    monkeypatch.setattr(sys, "argv", ["smt_bench", *args[2:]])
    monkeypatch.setattr(app_main, "app", lambda plan: print("trained"))
    app_main.main()
    out = capsys.readouterr()
    assert out.out.strip() == "trained" and out.err == "", out.err


def test_the_report_names_the_upgrade_that_breaks_an_item():
    report = {"lock": "requirements/lock-cpu.txt", "date": "2026-12-07", "python": "3.11.7",
              "upgrades": {"peft": ("0.21.2", "0.22.0"), "newdep": (None, "1.0")},
              "locked": {"run:lora": True, "run:smt": True, "kernels": False},
              "latest": {"run:lora": False, "run:smt": False, "kernels": False},
              "breaks": {"run:lora": ["peft 0.21.2 -> 0.22.0 (with newdep 1.0)"], "run:smt": []}}
    md = check_latest.markdown(report)
    assert "| peft | 0.21.2 | 0.22.0 |" in md and "| newdep | — | 1.0 |" in md
    assert "| run:lora | ok | FAILED |" in md and "| kernels | FAILED | FAILED |" in md
    assert "**run:lora** fails after upgrading `peft 0.21.2 -> 0.22.0 (with newdep 1.0)` alone" in md
    assert "**run:smt** fails on the newest versions, but no single upgrade breaks it" in md
