"""Is a file a run result this analysis can read? The first problem is named, in one line.

The result's schema is `RunResult` (smt_bench/result.py), the same model a run writes through; older files
read through smt_bench/migrations.py first. What the schema leaves to each method, its own `method_info`
keys, is checked by its contribution (registry.Contribution.check).
"""
from __future__ import annotations

from ..result import MEMORY_PARTS, STATUSES, RunResult, SchemaError
from . import registry

__all__ = ["MEMORY_PARTS", "STATUSES", "SchemaError", "validate"]


def validate(obj) -> RunResult:
    """The parsed file as a RunResult, or SchemaError naming its first problem."""
    result = RunResult.from_json(obj)
    if result.method_info:
        c = registry.contribution(result.config["method"]["name"])
        if c is not None and c.check is not None:
            c.check(result.to_json())
    return result
