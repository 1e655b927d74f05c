"""The config schema covers the whole config: every key of every option of every group is typed by a
registered dataclass and has valid values declared; schemas match the classes they build; composed
configs survive pickling (submitit ships them to cluster jobs)."""
import dataclasses
import inspect
import pickle
import typing

import pytest
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from smt_bench.__main__ import CONF
from smt_bench.schema import groups, store
from smt_bench.schema.spec import check_fields

OPTIONS = [(d.name, y.relative_to(d).with_suffix("").as_posix()) for d in sorted(CONF.iterdir())
           if d.is_dir() and d.name not in ("hydra", "bench")
           for y in sorted(d.rglob("*.yaml"))]  # bench: the bench app's group, checked by smt_bench.bench.check
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


def _selecting(group: str, option: str) -> list[str]:
    """The overrides that select an option: a recipe's per-method values come with that recipe and method."""
    if group == "recipe_method":
        method = next(m for m in METHODS if option.endswith(f"_{m}"))
        return [f"recipe={option[:-len(method) - 1]}", f"method={method}"]
    return [f"{group}={option}"]
ALL_SCHEMAS = [groups.Config, groups.Train, groups.Eval, groups.Forgetting, groups.Budget, groups.Results,
               *(s for opts in store.SCHEMAS.values() for s in opts.values())]
# keys whose type is another schema (each group option brings its own) or free text
CONTAINERS = {("Config", k) for k in ("model", "data", "logger", "method")} | {("Model", "source")}


# mappings of a library's own arguments (peft's config class builds and checks them: check_config)
FREE_MAPPINGS = {(f"{cls}Config", key) for cls in ("PeftTuner", "CordaTuner") for key in ("args", "scaled_args")}


def _leaves(node: DictConfig, at=""):
    for key in node:
        child = node._get_node(key)
        full = f"{at}.{key}" if at else str(key)
        if isinstance(child, DictConfig) and (OmegaConf.get_type(node).__name__, key) in FREE_MAPPINGS:
            continue
        if isinstance(child, DictConfig):
            yield from _leaves(child, full)
        else:
            yield full, node


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_key_of_every_option_is_typed_by_a_schema(group, option, compose):
    cfg = compose(*_selecting(group, option), *(["model=tiny-llama"] if group == "method" else []))
    for key, parent in _leaves(cfg):
        schema = OmegaConf.get_type(parent)
        assert dataclasses.is_dataclass(schema), f"{key} has no schema"
        name = key.rsplit(".", 1)[-1]
        assert name in {f.name for f in dataclasses.fields(schema)}, key


@pytest.mark.parametrize("schema", ALL_SCHEMAS, ids=lambda s: s.__name__)
def test_every_field_declares_its_type_and_valid_values(schema):
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if (schema.__name__, f.name) in CONTAINERS:
            assert tp is typing.Any
            continue
        assert tp is not typing.Any, f"{schema.__name__}.{f.name}"
        if f.name == "_target_" or tp is bool or dataclasses.is_dataclass(tp):
            continue  # a class path / true-false / a nested schema: the type is the whole rule
        assert "valid" in f.metadata, f"{schema.__name__}.{f.name} ({tp}) declares no valid values"


@pytest.mark.parametrize("schema", [s for opts in store.SCHEMAS.values() for s in opts.values()
                                    if "_target_" in {f.name for f in dataclasses.fields(s)}],
                         ids=lambda s: s.__name__)
def test_schema_fields_are_the_built_class_arguments(schema):
    target = get_class(dataclasses.fields(schema)[0].default)
    params = set(inspect.signature(target).parameters)
    fields = {f.name for f in dataclasses.fields(schema)} - {"_target_"}
    assert fields <= params, fields - params  # instantiate passes every field as an argument


@pytest.mark.parametrize("group,option", [o for o in OPTIONS if o[0] in ("model", "data", "logger", "method")],
                         ids=lambda o: o if isinstance(o, str) else None)
def test_yaml_sets_every_key_its_schema_leaves_missing(group, option, compose):
    cfg = compose(f"{group}={option}")
    node = cfg[group]
    missing = [k for k in node if OmegaConf.is_missing(node, k)]
    allowed = {("data", "local"): ["path"], ("data", "commonsense170k"): ["path"], ("data", "math10k"): ["path"]}
    assert missing == allowed.get((group, option), []), missing  # `???` only where the user must choose
    if group == "model" and option == "local":
        assert OmegaConf.is_missing(node.source, "path_or_id")


def test_config_pickles_with_its_schema_types(compose):
    cfg = compose("method=smt", "model=tiny-llama", "logger=wandb", "data=local", "data.path=/x.json")
    back = pickle.loads(pickle.dumps(cfg))
    assert OmegaConf.get_type(back.method) is store.SMTConfig and back == cfg
    with pytest.raises(Exception):
        back.train.max_steps = "many"  # still typed after the round trip


def test_a_method_built_in_python_is_checked_the_same_way():
    from smt_bench.errors import UserError
    from smt_bench.methods.peft_methods import PeftTuner
    from smt_bench.methods.smt import SMT

    with pytest.raises(UserError, match=r"^method\.lr=-0\.1: must be a number > 0$"):
        PeftTuner(name="lora", lr=-0.1)
    with pytest.raises(UserError, match=r"^method\.attn_share=0\.3: must be null unless method\.selection=attn_mlp"):
        SMT(name="smt", lr=1e-4, attn_share=0.3)
    m = SMT(name="smt", lr=1e-4, selection="attn_mlp", attn_share=0.3)
    check_fields(m, "method")  # valid: no error
