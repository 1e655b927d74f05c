"""The selection-stability study script on tiny-llama: its snapshots of a longer warm-up are what SMT
itself selects after that many steps (the script's self-check), and it writes one file per selection and
a report."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_study_writes_selections_and_a_report_that_passes_its_self_check(tmp_path, smollm2_path):
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "smt_selection_study.py"), "--seeds", "0", "1",
                           "--steps", "1", "2", "--kinds", "abs_mean", "mean_abs", "--budget", "0.002",
                           "--out", str(out), "model=tiny-llama", "device=cpu", "data.n_train_per_task=8",
                           "method.block_size=16"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in (out / "selections").glob("*.json"))
    assert len(files) == 2 * 2 * 2 * 2 and "grad_sum-abs_mean-w2-s1.json" in files  # seeds x steps x acc x kinds
    p = json.loads((out / "selections" / "grad_sum-abs_mean-w1-s0.json").read_text())
    assert p["factors"] == {"seed": 0, "warmup_steps": 1, "accumulation": "grad_sum", "score": "abs_mean"}
    assert len(p["block_map"]) == p["blocks"] == round(0.002 * 3_219_776 / 256)
    assert p["meta_info"]["git"]["sha"]
    # one step: the sum of one gradient's statistic is the statistic of its sum
    q = json.loads((out / "selections" / "score_sum-abs_mean-w1-s0.json").read_text())
    assert sorted(map(tuple, q["block_map"])) == sorted(map(tuple, p["block_map"]))
    report = (out / "report.md").read_text()
    assert (out / "stability.png").stat().st_size > 0 and (out / "stability.pdf").is_file()
    assert "Self-check: SMT.prepare with grad_sum, 1 warm-up steps, seed 0: the same 25 blocks" in report
    assert "| seed | 0.2% | two seeds | 8 |" in report and "| accumulation | 0.2% | grad_sum vs score_sum |" in report
    # the report regenerates from the selection files alone, byte for byte
    (out / "report.md").unlink()
    again = subprocess.run([sys.executable, str(REPO / "scripts" / "smt_selection_study.py"), "--report-only",
                            "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "report.md").read_text() == report
