"""LoRA and DoRA through peft; this module only picks the rank that meets the budget."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from ..errors import UserError
from ..models import ModelShapes
from ..schema.spec import above, invalid, nonempty_list, param, within
from .base import Context, Method, Plan, Tuned


@dataclass(frozen=True)
class LoRA(Method):
    target_modules: list[str] = param(valid=nonempty_list(),
                                      factory=lambda: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    alpha_ratio: float = param(2.0, above(0))  # lora_alpha = alpha_ratio * r: the update scale stays fixed across ranks
    dropout: float = param(0.05, within(0, 1, hi_open=True))
    use_dora: bool = False

    @staticmethod
    def check_config(cfg, at: str) -> None:
        """A result named lora must be LoRA, one named dora DoRA (the analysis groups runs by name)."""
        if cfg.name == "lora" and cfg.use_dora:
            raise invalid(f"{at}.use_dora", True, "false for method=lora; DoRA is method=dora")
        if cfg.name == "dora" and not cfg.use_dora:
            raise invalid(f"{at}.use_dora", False, "true for method=dora; LoRA is method=lora")

    def _targets(self, shapes: ModelShapes):
        targets = shapes.select(self.target_modules)
        if not targets:
            have = sorted({l.name.rsplit(".", 1)[-1] for l in shapes.linears})
            raise UserError(f"method.target_modules={list(self.target_modules)} matches no linear layer; "
                            f"choose from {have}")
        return targets

    def count(self, shapes: ModelShapes, rank: int) -> int:
        """Trainable parameters peft creates at this rank (DoRA adds one magnitude per output row)."""
        targets = self._targets(shapes)
        n = sum(rank * (t.d_in + t.d_out) for t in targets)
        return n + (sum(t.d_out for t in targets) if self.use_dora else 0)

    def plan(self, shapes: ModelShapes, target_params: int) -> Plan:
        targets = self._targets(shapes)
        fixed = self.count(shapes, 0)
        per_rank = self.count(shapes, 1) - fixed
        max_rank = min(min(t.d_in, t.d_out) for t in targets)
        ideal = (target_params - fixed) / per_rank
        if ideal < 0.5 or ideal > max_rank + 0.5:
            lo, hi = self.count(shapes, 1), self.count(shapes, max_rank)
            raise UserError(
                f"budget of {target_params:,} params is unreachable for {self.name} on {list(self.target_modules)}: "
                f"rank would be {ideal:.2f}, valid ranks 1..{max_rank} give {lo:,}..{hi:,} params; "
                f"choose another budget or method.target_modules")
        rank = min(range(1, max_rank + 1), key=lambda r: abs(self.count(shapes, r) - target_params))
        return Plan(target_params, self.count(shapes, rank), {"rank": rank, "lora_alpha": self.alpha_ratio * rank})

    def prepare(self, model: nn.Module, plan: Plan, context: Context) -> "PeftTuned":
        from peft import LoraConfig, get_peft_model

        rank = plan.detail["rank"]
        cfg = LoraConfig(r=rank, lora_alpha=self.alpha_ratio * rank, lora_dropout=self.dropout,
                         target_modules=list(self.target_modules), use_dora=self.use_dora, bias="none",
                         task_type="CAUSAL_LM")
        with warnings.catch_warnings():
            # peft's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing` alias,
            # which warns on every run (transformers >= 5); the warning is peft's to fix, not ours
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            return PeftTuned(self, get_peft_model(model, cfg))


class PeftTuned(Tuned):
    """A peft model: the adapter weights are its parameters with requires_grad; peft saves and merges."""

    def export(self, directory, base_model: str) -> list[str]:
        self.model.save_pretrained(directory)  # the peft adapter (adapter_config.json + safetensors)
        return [f"{directory}/adapter_config.json", f"{directory}/adapter_model.safetensors"]

    def merged(self) -> nn.Module:
        return self.model.merge_and_unload()
