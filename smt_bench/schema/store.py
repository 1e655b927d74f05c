"""Every option file of conf/ and the schema it is checked against, registered in Hydra's ConfigStore.

conf/config.yaml starts from `smt_bench_schema` (the top level, train, eval, budget, results); each
option of model, model source, data, logger and method names its schema in its own defaults list as
`/schema/<group>/<name>@_here_`. OmegaConf then rejects a wrong type when Hydra composes the config.
"""
from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import OmegaConf

from . import groups as g
from .derive import schema_for

CONF = Path(__file__).resolve().parents[2] / "conf"


def method_schemas(conf: Path = CONF) -> dict[str, type]:
    """Each conf/method/<name>.yaml is checked against the dataclass its `_target_` names, registered as
    schema/method/<name>: adding a method is its module plus that one file. Each schema is bound in this
    module under its class name, so a pickled config (submitit sends it to the cluster job) finds it."""
    out = {}
    for path in sorted((conf / "method").glob("*.yaml")):
        node = OmegaConf.load(path)
        target = OmegaConf.select(node, "_target_") or OmegaConf.select(node, "method._target_")
        schema = schema_for(get_class(target), __name__)
        globals()[schema.__name__] = schema
        out[path.stem] = schema
    return out


SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"model": g.Model},
    "model/source": {"smollm2": g.SmolLM2Source, "pretrained": g.PretrainedSource, "tiny_llama": g.TinyLlamaSource},
    "data": {"bundled": g.BundledData, "local": g.LocalData, "llm_adapters": g.LLMAdaptersData},
    "logger": {"none": g.NoLogger, "wandb": g.WandbLogger},
    "method": method_schemas(),
}
TOP = "smt_bench_schema"


def register(conf: Path = CONF) -> None:
    """`conf`: a config folder other than the project's (a copy with a method added) brings its methods."""
    cs = ConfigStore.instance()
    cs.store(name=TOP, node=g.Config)
    schemas = SCHEMAS if conf == CONF else {**SCHEMAS, "method": method_schemas(conf)}
    for group, options in schemas.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
