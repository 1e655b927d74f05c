"""The vocabulary of config checks: a field declares its type (the annotation) and what is valid.

`param(default, valid=...)` is a dataclass field whose metadata carries a `Valid`: a predicate and
the words that tell a user what to type instead. The validator reads them; nothing else does.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from omegaconf import MISSING

from ..errors import UserError


@dataclass(frozen=True)
class Valid:
    ok: Callable[[Any], bool]
    says: str  # what is valid, as the error shows it: "a number > 0"

    def __and__(self, other: "Valid") -> "Valid":
        return Valid(lambda v: self.ok(v) and other.ok(v), f"{self.says} and {other.says}")


REQUIRED = object()  # a constructor argument without default (a component's dataclass)


def param(default: Any = MISSING, valid: Valid | None = None, *, factory: Callable | None = None):
    """A config field with its valid values (MISSING default: the YAML must set it)."""
    meta = {"valid": valid} if valid else {}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if default is REQUIRED:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_fields(obj: Any, at: str) -> None:
    """The same checks on a component built in Python (not from a config): each field's valid values,
    then the class's cross-field `check_config`."""
    for f in dataclasses.fields(obj):
        valid = f.metadata.get("valid")
        if valid is not None and f.init and not valid.ok(getattr(obj, f.name)):
            raise invalid(f"{at}.{f.name}", getattr(obj, f.name), valid.says)
    hook = getattr(type(obj), "check_config", None)
    if hook is not None:
        hook(obj, at)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def above(lo: float) -> Valid:
    return Valid(lambda v: _number(v) and v > lo, f"a number > {lo:g}")


def at_least(lo: float, what: str = "a number") -> Valid:
    return Valid(lambda v: _number(v) and v >= lo, f"{what} >= {lo:g}")


def count(lo: int = 1) -> Valid:
    return Valid(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"an integer >= {lo}")


def within(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Valid:
    def ok(v):
        return _number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return Valid(ok, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")


def one_of(choices: Iterable[str]) -> Valid:
    choices = tuple(choices)
    return Valid(lambda v: v in choices, f"one of {', '.join(map(str, choices))}")


def nonempty() -> Valid:
    return Valid(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string")


def subset_of(choices: Iterable[str], *, allow_empty: bool = False) -> Valid:
    choices = tuple(choices)

    def ok(v):
        return (allow_empty or len(v) > 0) and len(set(v)) == len(v) and all(x in choices for x in v)

    return Valid(ok, f"a {'' if allow_empty else 'non-empty '}list without repeats of {', '.join(choices)}")


def nonempty_list() -> Valid:
    return Valid(lambda v: len(v) > 0 and all(isinstance(x, str) and x for x in v), "a non-empty list of names")


def optional(valid: Valid, null_means: str = "") -> Valid:
    tail = f", or null {null_means}".rstrip() if null_means else ", or null"
    return Valid(lambda v: v is None or valid.ok(v), valid.says + tail)


def each(valid: Valid, n: int | None = None) -> Valid:
    size = f"{n} values, each " if n else "a list, each "
    return Valid(lambda v: (n is None or len(v) == n) and all(valid.ok(x) for x in v), size + valid.says)


def shown(value: Any) -> str:
    """A value as a user would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(shown(v) for v in value) + "]"
    return str(value)


def invalid(key: str, value: Any, says: str) -> UserError:
    """The one error line of a bad value: `<key>=<value>: <what is valid>`."""
    return UserError(f"{key}={shown(value)}: must be {says}")
