"""A structured-config schema made from a component's own dataclass (a method), so its keys, types,
defaults and valid values are stated once, in the component's module.

The schema is the component's init fields plus `_target_` (the class itself, as Hydra instantiates
it); the component's `check_config(node, at)` hook, if any, carries its cross-field rules.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any


@functools.lru_cache(maxsize=None)
def schema_for(cls: type, module: str) -> type:
    """`module` is where the caller binds the result under its name, so a pickled config (submitit sends
    the launcher's config to the cluster job) finds the class by reference."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__qualname__} is not a dataclass; declare its config fields as one")
    hints = typing.get_type_hints(cls)
    target = f"{cls.__module__}.{cls.__qualname__}"
    specs = [("_target_", str, dataclasses.field(default=target))]
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kw: dict[str, Any] = {"metadata": f.metadata}
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kw["default_factory"] = f.default_factory
        else:
            kw["default"] = "???"  # OmegaConf's MISSING: the YAML must set it
        specs.append((f.name, hints[f.name], dataclasses.field(**kw)))
    ns: dict[str, Any] = {"__doc__": f"Config schema of {target}"}
    if hasattr(cls, "check_config"):
        ns["check_config"] = staticmethod(cls.check_config)
    schema = dataclasses.make_dataclass(f"{cls.__name__}Config", specs, namespace=ns)
    schema.__module__ = module
    return schema
