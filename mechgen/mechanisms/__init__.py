"""The mechanism catalog: every module of this package that defines ``MECHANISM`` is one entry.

:func:`catalog` finds them by importing the package's modules (no list to edit), in the order
of :data:`ORDER` first and then by name. See :mod:`mechgen.mechanisms.base` for what a
mechanism defines.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

import numpy as np
import pandas as pd

from mechgen.mechanisms.base import Link, Mechanism, NullContext, strongest_rows

__all__ = [
    "Link",
    "Mechanism",
    "NullContext",
    "catalog",
    "composition_kinds",
    "get",
    "links",
    "meets_criterion_in_table",
    "names",
]

ORDER = ("previous_token", "induction")
"""Mechanisms listed first, in this order (the reference study's and its partner); the rest of
the catalog follows by name."""

_NOT_MECHANISMS = frozenset({"base"})


@cache
def catalog() -> dict[str, Mechanism]:
    """Every registered mechanism by name. Raises if two modules claim one name."""
    found: dict[str, Mechanism] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_MECHANISMS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        mechanism = getattr(module, "MECHANISM", None)
        if not isinstance(mechanism, Mechanism):
            continue
        if mechanism.name in found:
            raise ValueError(f"two modules define mechanism {mechanism.name!r}")
        found[mechanism.name] = mechanism
    ordered = [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)
    return {name: found[name] for name in ordered}


def names() -> list[str]:
    """The catalog's mechanism names, in catalog order (the config schema's allowed values)."""
    return list(catalog())


def links(chosen: list[str] | None = None) -> list[Link]:
    """Every link declared by a mechanism of the catalog (or of ``chosen``, by name) whose two
    ends are both in it, once each, in declaration order."""
    selected = names() if chosen is None else list(chosen)
    found: dict[tuple[str, str], Link] = {}
    for name in selected:
        for link in get(name).links:
            if link.source in selected and link.target in selected:
                found.setdefault((link.source, link.target), link)
    return list(found.values())


def composition_kinds() -> tuple[str, ...]:
    """The composition kinds ("K", "Q", "V") the scoring job computes at detail steps: "K"
    (the previous-token -> induction link and ``k_composition`` of stats/relational.csv)
    and the kind of every link the catalog declares."""
    kinds = {"K"} | {link.composition for link in links()}
    return tuple(k for k in ("K", "Q", "V") if k in kinds)


def get(name: str) -> Mechanism:
    """The mechanism ``name``; a ``KeyError`` lists the allowed names."""
    mechanisms = catalog()
    if name not in mechanisms:
        raise KeyError(f"unknown mechanism {name!r}; allowed: {', '.join(mechanisms)}")
    return mechanisms[name]


def meets_criterion_in_table(
    mechanism: Mechanism | str, table: pd.DataFrame, null: pd.Series
) -> pd.Series:
    """Per row of a per-head table: does the head meet ``mechanism``'s criterion?

    ``null``: the null level per run (what ``mechanism.null`` returns, indexed by run).
    :meth:`Mechanism.meets_criterion` on the score, the run's null and the control column,
    and, with ``exclude_strongest_of``, not the (run, step)'s strongest head of that other
    mechanism (:func:`mechgen.mechanisms.base.strongest_rows` on its score column). A boolean
    Series on ``table``'s index.
    """
    if isinstance(mechanism, str):
        mechanism = get(mechanism)
    runs_without_null = sorted(set(table["run"]) - set(null.index))
    if runs_without_null:
        raise ValueError(f"{mechanism.name}: no null for run(s) {', '.join(runs_without_null)}")
    meets = mechanism.meets_criterion(
        table[mechanism.score_column].to_numpy(dtype=float),
        table["run"].map(null).to_numpy(dtype=float),
        table[mechanism.control_column].to_numpy(dtype=float)
        if mechanism.control_column is not None
        else None,
    )
    if mechanism.exclude_strongest_of is not None:
        excluded = get(mechanism.exclude_strongest_of).score_column
        meets &= ~strongest_rows(table, excluded).to_numpy()
    return pd.Series(np.asarray(meets, dtype=bool), index=table.index, name=mechanism.name)
