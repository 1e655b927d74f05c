"""SMT's per-run columns, read from method_info: selected and eligible blocks per projection group.

Groups follow the paper's share analysis (q, k, v, o, and the MLP's gate+up+down). Counts come from the
block map where a run has one, else from block_share (then they are shares summing to 1).
"""
from __future__ import annotations

import math

from smt_bench.result import SchemaError, is_kind, require, short

# SMT projection names -> the groups of the paper's share analysis, in display order
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
PROJ_GROUP = {"q": "q", "k": "k", "v": "v", "o": "o", "gate": "mlp", "up": "mlp", "down": "mlp"}
GROUPS = ("q", "k", "v", "o", "mlp")


def resolved_block_size(method_info: dict) -> int | None:
    """The block size a run trained with (method.block_size is an upper bound the model's shapes reduce)."""
    b = method_info.get("block_size")
    return int(b) if isinstance(b, int) and not isinstance(b, bool) else None


def short_projection(name: str) -> str:
    """'q_proj' -> 'q', 'model.layers.3.mlp.down_proj' -> 'down'; unknown names are kept as they are."""
    base = name.rsplit(".", 1)[-1]
    base = base[:-5] if base.endswith("_proj") else base
    return base


def _group(projection: str) -> str:
    p = short_projection(projection)
    return PROJ_GROUP.get(p, p)


def selected_counts(method_info: dict) -> dict[str, float]:
    """Selected blocks per projection group (q, k, v, o, mlp): from block_map, else block_share."""
    counts: dict[str, float] = {}
    bmap = method_info.get("block_map")
    if bmap:
        for b in bmap:
            counts[_group(b[1])] = counts.get(_group(b[1]), 0) + 1
        return counts
    for p, v in (method_info.get("block_share") or {}).items():  # fractions only: scaled to a total of 1
        counts[_group(p)] = counts.get(_group(p), 0) + float(v)
    return counts


def eligible_counts(method_info: dict) -> dict[str, int]:
    """Blocks SMT could choose from, per projection group: the denominator that undoes the size bias of raw
    counts (with grouped-query attention k and v offer fewer blocks than q)."""
    counts: dict[str, int] = {}
    for p, n in (method_info.get("eligible_blocks") or {}).items():
        counts[_group(p)] = counts.get(_group(p), 0) + int(n)
    return counts


def run_columns(method_info: dict) -> dict:
    """The run table's SMT columns (NaN / "" for a run without a selection)."""
    counts = selected_counts(method_info)
    total = sum(counts.values())
    row: dict[str, float | str] = {}
    for g in GROUPS:
        row[f"smt_share_{g}"] = counts.get(g, 0) / total if total else math.nan
        row[f"smt_blocks_{g}"] = counts.get(g, 0) if total else math.nan
    row["smt_blocks"] = total if total else math.nan
    eligible = eligible_counts(method_info) if total else {}
    for g in GROUPS:  # NaN: the run does not say what was eligible (older runs)
        row[f"smt_eligible_{g}"] = eligible.get(g, 0) if eligible else math.nan
    row["smt_eligible_projections"] = ";".join(sorted({short_projection(p)
                                                       for p in method_info.get("eligible_blocks") or {}}))
    backend = method_info.get("kernels_backend")
    row["kernels_backend"] = backend if isinstance(backend, str) else ""
    return row


CELL_COLUMNS = (*[f"smt_blocks_{g}" for g in GROUPS], "smt_blocks", *[f"smt_eligible_{g}" for g in GROUPS])


def check(result: dict) -> None:
    """A finished SMT result's method_info: block map rows, shares and eligible counts of the right kinds."""
    bmap = require(result, "method_info.block_map", ("list",), optional=True)
    for i, b in enumerate(bmap or []):
        if not (isinstance(b, list) and len(b) == 4 and is_kind(b[0], ("int", "null")) and isinstance(b[1], str)):
            raise SchemaError(f"method_info.block_map[{i}]={short(b)} is not [layer, projection, row, col]")
    share = require(result, "method_info.block_share", ("dict",), optional=True)
    for p, v in (share or {}).items():
        if not is_kind(v, ("number",)):
            raise SchemaError(f"method_info.block_share.{p}={short(v)} is not a finite number")
    eligible = require(result, "method_info.eligible_blocks", ("dict",), optional=True)
    for p, v in (eligible or {}).items():
        if not is_kind(v, ("int",)):
            raise SchemaError(f"method_info.eligible_blocks.{p}={short(v)} is not an integer")
