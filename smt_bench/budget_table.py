"""`python -m smt_bench.budget_table`: every method's achieved trainable count against the target, at each
budget of the sweep, on meta-device copies of the models (no weights, seconds on a laptop).

Methods meet a budget at their own granularity (a LoRA rank, an SMT block, an S2FT head or channel, a
LISA layer); this table says how close each comes, and which points it cannot meet at all.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hydra.utils import instantiate

from . import provenance
from .errors import BudgetUnreachable, UserError
from .models import meta_shapes
from .schema.store import CONF

MODELS = ("smollm2-135m", "llama-7b-random")
BUDGETS = (0.005, 0.01, 0.02, 0.05)


def _knobs(detail: dict) -> str:
    """The plan's size knobs, in a few words (the full plan is in the JSON)."""
    keep = ("r", "sparsity", "blocks", "block_size", "heads", "channels", "layers", "lora_alpha", "entries")
    return ", ".join(f"{k}={detail[k]}" for k in keep if k in detail)


def _fixed(method: str) -> float | None:
    """A method's own budget (full FT 1.0, HFT 0.5): one row, whatever --budgets says."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    path = CONF / "method" / f"{method}.yaml"
    if not path.exists():  # an unknown name: plan_row says so
        return None
    node = OmegaConf.load(path)
    return getattr(get_class(node.get("method", node)["_target_"]), "fixed_fraction", None)


def plan_row(model: str, method: str, fraction: float) -> dict:
    from .__main__ import compose_config

    cfg = compose_config([f"model={model}", f"method={method}", f"budget.fraction={fraction}"])
    m = instantiate(cfg.method, _convert_="all")
    shapes = meta_shapes(instantiate(cfg.model.source).hf_config())
    fraction = m.fixed_fraction or fraction
    target = round(fraction * shapes.total_params)
    row = {"model": model, "method": method, "budget_fraction": fraction, "base_params": shapes.total_params,
           "target_params": target, "method_config_hash": provenance.config_hash(dict(cfg.method))}
    try:
        plan = m.plan(shapes, target)
    except BudgetUnreachable as e:
        return {**row, "achieved_params": None, "unreachable": str(e)}
    return {**row, "achieved_params": plan.achieved_params, "plan": plan.detail}


def markdown(result: dict) -> str:
    lines = ["# Achieved vs target trainable parameters (meta device)", "",
             f"Command: `{result['command']}` · git {result['meta_info']['git']['sha']} · "
             f"peft {result['meta_info']['versions']['peft']} · transformers "
             f"{result['meta_info']['versions']['transformers']} · {result['started']}", ""]
    for model in result["models"]:
        rows = [r for r in result["rows"] if r["model"] == model]
        lines += [f"## {model} (N = {rows[0]['base_params']:,})", "",
                  "| method | target % | achieved % | achieved / target | achieved params | plan |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            if r["achieved_params"] is None:
                reason = r["unreachable"].split(": ", 1)[-1]
                lines.append(f"| {r['method']} | {100 * r['budget_fraction']:g} | — | — | — | unreachable: {reason} |")
                continue
            a = r["achieved_params"]
            lines.append(f"| {r['method']} | {100 * r['budget_fraction']:g} | {100 * a / r['base_params']:.4g} | "
                         f"{a / r['target_params']:.4f} | {a:,} | {_knobs(r['plan'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m smt_bench.budget_table", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--methods", nargs="+", default=sorted(f.stem for f in (CONF / "method").glob("*.yaml")))
    p.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    p.add_argument("--out", type=Path, default=Path("outputs/budget"))
    a = p.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        budgets: dict[str, list[float]] = {}
        for method in a.methods:
            own = _fixed(method)
            budgets[method] = [own] if own is not None else list(a.budgets)
        rows = [plan_row(model, method, f) for model in a.models for method in a.methods for f in budgets[method]]
    except UserError as e:
        print(f"smt-bench: error: {e}", file=sys.stderr)
        sys.exit(2)
    import torch

    result = {"command": " ".join(["python -m smt_bench.budget_table", *(argv if argv is not None else sys.argv[1:])]),
              "started": started, "models": a.models, "rows": rows,
              "meta_info": provenance.meta_info(torch.device("cpu"))}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "budget_table.json").write_text(json.dumps(result, indent=1) + "\n")
    (a.out / "budget_table.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
