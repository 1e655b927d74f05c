"""Every option file of conf/ and the schema it is checked against, registered in Hydra's ConfigStore.

conf/config.yaml starts from `smt_bench_schema` (the top level, train, eval, budget, results); each
option of model, model source, data, logger and method names its schema in its own defaults list as
`/schema/<group>/<name>@_here_`. OmegaConf then rejects a wrong type when Hydra composes the config.
"""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from ..methods.full_ft import FullFT
from ..methods.peft_methods import LoRA
from ..methods.smt import SMT
from . import groups as g
from .derive import schema_for

# methods declare their fields (types, defaults, valid values) in their own dataclasses
FullFTConfig = schema_for(FullFT, __name__)
LoRAConfig = schema_for(LoRA, __name__)
SMTConfig = schema_for(SMT, __name__)

SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"model": g.Model},
    "model/source": {"smollm2": g.SmolLM2Source, "pretrained": g.PretrainedSource, "tiny_llama": g.TinyLlamaSource},
    "data": {"bundled": g.BundledData, "local": g.LocalData, "llm_adapters": g.LLMAdaptersData},
    "logger": {"none": g.NoLogger, "wandb": g.WandbLogger},
    "method": {"full_ft": FullFTConfig, "lora": LoRAConfig, "smt": SMTConfig},
}
TOP = "smt_bench_schema"


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name=TOP, node=g.Config)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
