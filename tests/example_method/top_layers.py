"""The "adding a method" example of docs/methods.md, whole: partial fine-tuning of whole weight matrices, taken from
the last layer down until the budget is met (a classic baseline). tests/test_adding_a_method.py runs it
from this module plus `top_layers.yaml` alone."""
from __future__ import annotations

from dataclasses import dataclass

from smt_bench.errors import UserError
from smt_bench.methods.base import Context, Method, Plan, Tuned
from smt_bench.schema.spec import nonempty_list, param


@dataclass(frozen=True)
class TopLayers(Method):
    target_modules: list[str] = param(valid=nonempty_list(), factory=lambda: ["q_proj", "v_proj"])

    def plan(self, shapes, target_params: int) -> Plan:
        chosen, n = [], 0
        for m in reversed(shapes.select(self.target_modules)):  # the last layers first
            if n + m.d_out * m.d_in > target_params:
                break
            chosen.append(m.name)
            n += m.d_out * m.d_in
        if not chosen:
            raise UserError(f"budget of {target_params:,} params is below one of {list(self.target_modules)}; "
                            f"raise the budget")
        return Plan(target_params, n, {"matrices": chosen})

    def prepare(self, model, plan: Plan, context: Context) -> Tuned:
        for p in model.parameters():
            p.requires_grad_(False)
        for name in plan.detail["matrices"]:
            model.get_submodule(name).weight.requires_grad_(True)
        return Tuned(self, model)  # the default Tuned: trainable = requires_grad, checkpoints, export, merge
