"""The one layer that checks a composed config: types (OmegaConf, at compose time), then each field's
valid values and each schema's cross-field rules, in config order. Every problem is one line,
`<key>=<value>: <what is valid>`, raised as UserError.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, InterpolationResolutionError,
                              OmegaConfBaseException, ValidationError)

from ..errors import UserError
from .spec import invalid, shown


def validate(cfg: DictConfig) -> None:
    try:
        _walk(cfg, "")
    except OmegaConfBaseException as e:  # met while resolving an interpolation
        raise UserError(error_line(e)) from None


def no_such_key(key: str, at: str, names: list[str]) -> str:
    """`train.max_stepz: no such key; did you mean train.max_steps? (train has: ...)`."""
    near = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean {at + '.' if at else ''}{near[0]}? " if near else ""
    have = ", ".join(n for n in names if n != "_target_") or "no keys"
    return f"{at + '.' if at else ''}{key}: no such key; {hint}({at or 'the config'} has: {have})"


def _value(node: DictConfig, key: str):
    v = node[key]
    return OmegaConf.to_container(v, resolve=True) if isinstance(v, ListConfig) else v


def _walk(node: DictConfig, at: str) -> None:
    schema = OmegaConf.get_type(node)
    for key in node:
        full = f"{at}.{key}" if at else str(key)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _walk(node[key], full)
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        return
    names = [f.name for f in dataclasses.fields(schema)]
    for key in node:  # `+group.key=...` adds a key the schema does not have: it would be ignored
        if key not in names:
            raise UserError(no_such_key(str(key), at, names))
    for f in dataclasses.fields(schema):
        valid = f.metadata.get("valid")
        if valid is not None and f.name in node:
            v = _value(node, f.name)
            if not valid.ok(v):
                raise invalid(f"{at}.{f.name}" if at else f.name, v, valid.says)
    hook = getattr(schema, "check_config", None)
    if hook is not None:
        hook(node, at)


# --- OmegaConf's own errors, as one line -------------------------------------------------------------

def _type_words(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return f"{_type_words(rest[0])} or null"
    if origin in (list, typing.List):
        return f"a list of {_type_words(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, "a config group")


def _field_type(schema, key: str):
    if isinstance(schema, type) and dataclasses.is_dataclass(schema):
        return typing.get_type_hints(schema).get(key)
    return None


def error_line(e: Exception) -> str:
    """`key=value: what is valid` for OmegaConf's type and key errors (Hydra wraps them)."""
    cause: BaseException = e
    while not isinstance(cause, OmegaConfBaseException) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        return _unknown_key(cause)
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        key = cause.full_key
        parent = getattr(cause, "parent_node", None)
        tp = _field_type(OmegaConf.get_type(parent), key.rsplit(".", 1)[-1]) if parent is not None else None
        want = _type_words(tp) if tp is not None else cause.msg.splitlines()[0]
        return f"{key}={shown(cause.value) if hasattr(cause, 'value') else '?'}: must be {want}"
    if isinstance(cause, InterpolationResolutionError):
        return f"{getattr(cause, 'full_key', '?')}: {cause.msg.splitlines()[0]}"
    text = re.sub(r"\.?\s*\n\s*", "; ", str(e).strip())  # Hydra's own messages span lines
    return text or type(e).__name__


def _unknown_key(cause) -> str:
    group, _, name = cause.full_key.rpartition(".")
    parent = getattr(cause, "parent_node", None)
    return no_such_key(name, group, [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else [])
