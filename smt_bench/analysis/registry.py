"""How a method adds its own columns, report sections and figures without the analysis core naming it.

A method package `smt_bench.methods.<name>` that wants more than the generic tables holds an `analysis`
module with `CONTRIBUTION = Contribution(method="<config.method.name>", ...)`; it is found by walking
`smt_bench.methods` (only packages with such a module are imported, so the CLI loads no model code).
Tests and notebooks can `register()` one directly. A method without a contribution gets the generic
treatment: the shared tables and figures and a colour of its own.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    import pandas as pd

METHODS_PACKAGE = "smt_bench.methods"
CONTRIBUTION_MODULE = "analysis"


@dataclass(frozen=True)
class Setting:
    """What a contribution's sections and figures see of one setting (all methods; filter to your own)."""
    label: str
    slug: str                           # the setting's figure folder: figures/<slug>/
    cells: "pd.DataFrame"               # one row per (series, budget), with the contributed cell columns
    runs: "pd.DataFrame"                # the finished runs used in the statistics, with the contributed columns
    method_info: Mapping[str, dict]     # run file -> its result's method_info
    palette: Any                        # figures.Palette: order, colour, marker and line per method and series
    plateaus: Mapping[str, Any]         # series -> stats.Plateau (None: too few budgets); the reference has none


@dataclass(frozen=True)
class Figure:
    """One figure per setting, saved as figures/<slug>/<stem>.{png,pdf}. `draw` returns None where it has
    nothing to show. Listed figures join the setting's numbered figure list; an unlisted one is linked by
    the contribution's own section."""
    stem: str
    title: str
    caption: str
    draw: Callable[[Setting], Any]
    listed: bool = True


@dataclass(frozen=True)
class Contribution:
    method: str                                                  # config.method.name of the runs it reads
    # method_info -> {column: value} for each run of this method; called with {} for every other run, which
    # fixes the column names and their empty values (so return the same keys whatever the input)
    run_columns: Callable[[dict], dict] | None = None
    cell_columns: Mapping[str, Callable] = field(default_factory=dict)  # cell column -> aggregate of its runs' values
    check: Callable[[dict], None] | None = None                  # a finished result -> raise schema.SchemaError
    # method key -> the value the run actually computed with, read from its method_info (None: not recorded,
    # keep the configured value). A key whose configured value is a bound or a request the model's shapes
    # resolve (e.g. a block size given as an upper bound) is compared, grouped and labelled by what ran, so two configs that compute
    # the same thing are one series
    resolved: Mapping[str, Callable[[dict], Any]] = field(default_factory=dict)
    sections: tuple[Callable[[Setting], list[str]], ...] = ()    # markdown lines per setting ([] = nothing)
    figures: tuple[Figure, ...] = ()
    color: str | None = None
    order: int = 0                                               # display position among methods (then by name)


_registered: dict[str, Contribution] = {}
_discovered: dict[str, Contribution] | None = None


def register(c: Contribution) -> Contribution:
    """Add (or replace) the contribution for c.method; it wins over a discovered one."""
    _registered[c.method] = c
    return c


def unregister(method: str) -> None:
    _registered.pop(method, None)


def discover() -> dict[str, Contribution]:
    """method name -> CONTRIBUTION of every `smt_bench.methods.<pkg>.analysis` module (imported once)."""
    global _discovered
    if _discovered is None:
        found = {}
        methods = importlib.import_module(METHODS_PACKAGE)
        for info in sorted(pkgutil.iter_modules(methods.__path__), key=lambda i: i.name):
            if not info.ispkg:
                continue
            spec = info.module_finder.find_spec(f"{METHODS_PACKAGE}.{info.name}", None)
            inner = {m.name for m in pkgutil.iter_modules((spec and spec.submodule_search_locations) or [])}
            if CONTRIBUTION_MODULE in inner:
                mod = importlib.import_module(f"{METHODS_PACKAGE}.{info.name}.{CONTRIBUTION_MODULE}")
                c = getattr(mod, "CONTRIBUTION")
                found[c.method] = c
        _discovered = found
    return _discovered


def contributions() -> tuple[Contribution, ...]:
    """Every contribution, in display order."""
    return tuple(sorted({**discover(), **_registered}.values(), key=lambda c: (c.order, c.method)))


def contribution(method: str) -> Contribution | None:
    return next((c for c in contributions() if c.method == method), None)
