"""The functional axis: does a run have a head that does 1-back attention at all?

A head *meets the 1-back criterion* at a checkpoint when its ``one_back`` score exceeds
``multiple`` x the uniform baseline, the ``one_back`` a head would score if it attended
uniformly over the causal prefix. The default multiple is 2.0 (``analysis.functional_multiple``).

The uniform baseline and its step-0 fallback are defined in :mod:`mechgen.tables.baselines`.

Output: :func:`functional_tables`, written as ``results/<suite>/stats/functional_run_step.csv``,
``functional_run.csv`` and ``functional_size.csv``; their columns are listed in
:data:`FUNCTIONAL_COLUMNS` and defined in ``docs/outputs.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from mechgen.schema import RUN_SHAPE_COLUMNS
from mechgen.stats.analysis import wilson_interval
from mechgen.tables.baselines import FUNCTIONAL_METRIC
from mechgen.tables.heads import validate_heads

DEFAULT_FUNCTIONAL_MULTIPLE = 2.0
"""A head meets the 1-back criterion when one_back > this x the uniform baseline."""

RUN_COLUMNS = RUN_SHAPE_COLUMNS
"""Columns constant within a run, carried into every run-level row."""

_CRITERION_COLUMNS = ["baseline", "baseline_source", "multiple", "threshold"]

FUNCTIONAL_COLUMNS = {
    "functional_run_step": RUN_COLUMNS
    + ["step", "tokens_seen", *_CRITERION_COLUMNS]
    + ["n_heads_scored", "n_functional", "has_functional", "max_one_back"],
    "functional_run": RUN_COLUMNS
    + _CRITERION_COLUMNS
    + ["first_step", "first_tokens_seen", "final_step", "has_functional_final"],
    "functional_size": ["suite", "model", "size", "n_params", "n_layers", "n_heads", "step"]
    + _CRITERION_COLUMNS
    + ["n_runs", "n_runs_functional", "fraction_functional", "ci_low", "ci_high", "confidence"],
}
"""The functional tables (``results/<suite>/stats/<name>.csv``) and their columns, in order:
one row per run x checkpoint, per run, and per model size. Every column is defined in
``docs/outputs.md``."""


def functional_counts(
    heads: pd.DataFrame,
    baseline: float | Mapping[str, float],
    multiple: float = DEFAULT_FUNCTIONAL_MULTIPLE,
    metric: str = FUNCTIONAL_METRIC,
) -> pd.DataFrame:
    """Heads meeting the 1-back criterion per run and checkpoint.

    A head meets it when ``metric > multiple * baseline`` (strictly), its score is finite and
    its ``nonfinite`` flag (if present) is False. ``baseline`` is one value for the suite or a
    mapping run id -> value. One row per run x step with ``n_heads_scored``, ``n_functional``
    (a count of heads), ``has_functional``, ``max_one_back`` and the threshold used.
    """
    validate_heads(heads, metric)
    if multiple <= 0:
        raise ValueError(f"functional multiple must be > 0, got {multiple}")
    table = heads.copy()
    if isinstance(baseline, Mapping):
        missing = sorted(set(table["run"]) - set(baseline))
        if missing:
            raise ValueError(f"no uniform baseline for runs: {', '.join(map(str, missing))}")
        table["baseline"] = table["run"].map(baseline).astype(float)
    else:
        table["baseline"] = float(baseline)
    if not np.isfinite(table["baseline"]).all() or (table["baseline"] <= 0).any():
        raise ValueError("the uniform baseline must be a finite number > 0")
    table["threshold"] = multiple * table["baseline"]
    value = table[metric].to_numpy(dtype=float)
    scored = np.isfinite(value)
    if "nonfinite" in table.columns:
        scored &= ~table["nonfinite"].astype(bool).to_numpy()
    table["_scored"] = scored
    table["_functional"] = scored & (value > table["threshold"].to_numpy())
    table["_value"] = np.where(scored, value, np.nan)
    keys = RUN_COLUMNS + ["step", "tokens_seen", "baseline", "threshold"]
    counts = (
        table.groupby(keys, sort=True, dropna=False)
        .agg(
            n_heads_scored=("_scored", "sum"),
            n_functional=("_functional", "sum"),
            max_one_back=("_value", "max"),
        )
        .reset_index()
    )
    counts["multiple"] = float(multiple)
    counts["n_heads_scored"] = counts["n_heads_scored"].astype(int)
    counts["n_functional"] = counts["n_functional"].astype(int)
    counts["has_functional"] = counts["n_functional"] > 0
    return _order_runs(counts).reset_index(drop=True)


def first_functional(counts: pd.DataFrame) -> pd.DataFrame:
    """Per run: the first step (and tokens) with a head meeting the criterion.

    ``first_step`` / ``first_tokens_seen`` are NaN for a run that never has one;
    ``final_step`` is the run's last scored step and ``has_functional_final`` whether it has
    such a head there.
    """
    rows = []
    for _, run_counts in counts.groupby("run", sort=False):
        run_counts = run_counts.sort_values("step")
        hits = run_counts[run_counts["has_functional"]]
        final = run_counts.iloc[-1]
        row = {col: final[col] for col in RUN_COLUMNS + ["baseline", "threshold", "multiple"]}
        row["first_step"] = float(hits["step"].iloc[0]) if len(hits) else np.nan
        row["first_tokens_seen"] = float(hits["tokens_seen"].iloc[0]) if len(hits) else np.nan
        row["final_step"] = int(final["step"])
        row["has_functional_final"] = bool(final["has_functional"])
        rows.append(row)
    return _order_runs(pd.DataFrame(rows)).reset_index(drop=True)


def functional_fraction_by_size(per_run: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per model size: the fraction of runs with a head meeting the criterion at the final step.

    ``fraction_functional = n_runs_functional / n_runs`` with the Wilson score interval at
    ``confidence`` (:func:`mechgen.stats.analysis.wilson_interval`). ``per_run`` is the
    output of :func:`first_functional`; each run counts at its own final step, and ``step`` is
    that step when all runs of the size share it (else the smallest, so the row is honest about
    the earliest checkpoint that went in).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rows = []
    for _, size_runs in per_run.groupby(["model", "size"], sort=False):
        n_runs = len(size_runs)
        n_with = int(size_runs["has_functional_final"].sum())
        ci_low, ci_high = wilson_interval(n_with, n_runs, confidence)
        first = size_runs.iloc[0]
        rows.append(
            {
                **{
                    col: first[col]
                    for col in ["suite", "model", "size", "n_params", "n_layers", "n_heads"]
                },
                **{col: first[col] for col in ["baseline", "threshold", "multiple"]},
                "step": int(size_runs["final_step"].min()),
                "n_runs": n_runs,
                "n_runs_functional": n_with,
                "fraction_functional": n_with / n_runs,
                "ci_low": float(ci_low),
                "ci_high": float(ci_high),
                "confidence": confidence,
            }
        )
    return pd.DataFrame(rows)


def functional_tables(
    heads: pd.DataFrame,
    baseline: float | Mapping[str, float],
    baseline_source: str,
    multiple: float = DEFAULT_FUNCTIONAL_MULTIPLE,
    confidence: float = 0.95,
    metric: str = FUNCTIONAL_METRIC,
) -> dict[str, pd.DataFrame]:
    """The three functional tables, keyed by the names of :data:`FUNCTIONAL_COLUMNS`.

    ``functional_run_step``: :func:`functional_counts`; ``functional_run``:
    :func:`first_functional`; ``functional_size``: :func:`functional_fraction_by_size`.
    ``baseline_source`` records where the baseline came from ('token_lengths' or
    'step0_median'). Integer-valued columns that can be missing (``first_step``: a run that
    never meets the criterion) are nullable Int64, so a CSV shows ``3``, not ``3.0``.
    """
    counts = functional_counts(heads, baseline, multiple, metric)
    per_run = first_functional(counts)
    per_size = functional_fraction_by_size(per_run, confidence)
    tables = {}
    for name, table in zip(FUNCTIONAL_COLUMNS, (counts, per_run, per_size)):
        table = with_nullable_ints(
            table.assign(baseline_source=baseline_source),
            ["seed", "step", "tokens_seen", "n_heads_scored", "n_functional", "first_step"]
            + ["first_tokens_seen", "final_step", "n_runs", "n_runs_functional"],
        )
        tables[name] = table[FUNCTIONAL_COLUMNS[name]].reset_index(drop=True)
    return tables


def with_nullable_ints(table: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Integer-valued ``columns`` (those present) as pandas' nullable Int64, so that a column
    with missing values writes ``3`` rather than ``3.0`` to a CSV."""
    table = table.copy()
    for col in columns:
        if col in table.columns:
            table[col] = table[col].astype("Int64")
    return table


def _order_runs(table: pd.DataFrame) -> pd.DataFrame:
    """Sizes by parameter count, then seed (then step if present)."""
    keys = [k for k in ["n_params", "model", "seed", "step"] if k in table.columns]
    return table.sort_values(keys, kind="stable")
