"""Reading the reference study's per-head tables, and validating per-head tables.

The reference study (Trott 2025, arXiv 2509.22831) published one CSV per (model, checkpoint,
seed) with one row per attention head (``attention_summaries/*.csv``). :func:`read_trott2025`
converts them to mechgen's tidy per-head schema (:mod:`mechgen.schema`) so the same analysis
code (:mod:`mechgen.axes.developmental`, :mod:`mechgen.axes.convergence`, :mod:`mechgen.stats.analysis`) runs on
the published tables and on mechgen's own scores.

Conversions (trott2025 column -> mechgen column):

========================  =====================================================
``Layer``, ``Head``       1-indexed -> ``layer``, ``head`` 0-indexed
``step_modded``           ``step = step_modded - 1`` (the study stored step + 1 so that
                          ``log10(step_modded)`` is defined at step 0)
``mean_1back``            ``one_back``
``mean_prev_self_ratio``  ``prev_self_ratio``
``mean_prev_all_ratio``   ``prev_uniform_ratio``
``mean_first``            ``first_token_ref``
``prev_fraction``         kept as ``prev_fraction`` (not part of the mechgen schema)
``mpath``                 ``model`` = mpath without ``EleutherAI/``; ``size`` = model
                          without ``pythia-``; ``run = f"{model}-seed{seed}"``
========================  =====================================================

``tokens_seen = step * tokens_per_step`` (Pythia: 2,097,152 tokens per step). ``n_heads`` is
the largest ``Head`` of the model over everything read (an architecture constant; on complete
tables it equals the largest ``Head`` of each file, and it stays right when some files were
reduced to a few rows, as in the test subset). ``nonfinite`` is True where any metric is NaN/inf.
The metrics the study did not compute (``self_attention``, ``entropy``, ...) are absent, not NaN.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from mechgen.schedules import PYTHIA_TOKENS_PER_STEP
from mechgen.schema import ID_COLUMNS

TROTT2025_COLUMNS = [
    "mpath",
    "step_modded",
    "revision",
    "Layer",
    "Head",
    "seed",
    "seed_name",
    "n_params",
    "n_layers",
    "mean_prev_self_ratio",
    "mean_prev_all_ratio",
    "prev_fraction",
    "mean_1back",
    "mean_first",
]
"""Columns every table of the reference study has (``attention_summaries/*.csv``)."""

TROTT2025_METRICS = {
    "mean_1back": "one_back",
    "mean_prev_self_ratio": "prev_self_ratio",
    "mean_prev_all_ratio": "prev_uniform_ratio",
    "mean_first": "first_token_ref",
    "prev_fraction": "prev_fraction",
}
"""trott2025 metric column -> mechgen column."""

HEAD_KEY = ["run", "step", "layer", "head"]
"""Columns that identify one row of a per-head table."""


def read_trott2025_table(path: str | Path) -> pd.DataFrame:
    """Read one trott2025 CSV as it is (original column names), checking its columns.

    Raises ``ValueError`` naming the file and the missing columns.
    """
    path = Path(path)
    table = pd.read_csv(path)
    missing = [c for c in TROTT2025_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"{path}: not a trott2025 attention-summary table; missing column(s): "
            f"{', '.join(missing)} (expected: {', '.join(TROTT2025_COLUMNS)})"
        )
    return table


def read_trott2025(
    directory: str | Path,
    suite: str = "trott2025",
    tokens_per_step: int = PYTHIA_TOKENS_PER_STEP,
    pattern: str = "*.csv",
) -> pd.DataFrame:
    """Read every trott2025 table in ``directory`` into mechgen's tidy per-head schema.

    One output row per (run, step, layer, head); layer/head 0-indexed; ``step = step_modded - 1``;
    ``tokens_seen = step * tokens_per_step`` (tokens). See the module docstring for the column
    mapping. A file may hold any subset of rows of the original tables (e.g. a combined file);
    the same (run, step, layer, head) in two files is an error. Rows are sorted by model, seed,
    step, layer, head.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"trott2025 table directory {str(directory)!r} does not exist")
    paths = sorted(directory.glob(pattern))
    if not paths:
        raise ValueError(f"no trott2025 tables matching {pattern!r} in {str(directory)!r}")
    frames = []
    for path in paths:
        table = read_trott2025_table(path)
        table["_source_file"] = path.name
        frames.append(table)
    raw = pd.concat(frames, ignore_index=True)

    # The study's revision is the branch name of the checkpoint; it must agree with step_modded.
    expected_revision = "step" + (raw["step_modded"].astype(int) - 1).astype(str)
    bad = raw["revision"].astype(str) != expected_revision
    if bad.any():
        row = raw[bad].iloc[0]
        raise ValueError(
            f"{row['_source_file']}: revision {row['revision']!r} does not match "
            f"step_modded {row['step_modded']} (expected 'step{int(row['step_modded']) - 1}')"
        )

    heads = pd.DataFrame(
        {
            "suite": suite,
            "model": raw["mpath"].astype(str).str.replace("EleutherAI/", "", regex=False),
            "seed": raw["seed"].astype(int),
            "step": raw["step_modded"].astype(int) - 1,
            "layer": raw["Layer"].astype(int) - 1,
            "head": raw["Head"].astype(int) - 1,
            "n_layers": raw["n_layers"].astype(int),
            "n_params": raw["n_params"].astype(np.int64),
        }
    )
    heads["size"] = heads["model"].str.replace("pythia-", "", regex=False)
    heads["run"] = heads["model"] + "-seed" + heads["seed"].astype(str)
    heads["tokens_seen"] = heads["step"].astype(np.int64) * int(tokens_per_step)
    heads["n_heads"] = heads.groupby("model")["head"].transform("max") + 1
    for source, target in TROTT2025_METRICS.items():
        heads[target] = raw[source].astype(float)
    heads["nonfinite"] = ~np.isfinite(heads[list(TROTT2025_METRICS.values())].to_numpy()).all(
        axis=1
    )

    duplicated = heads.duplicated(HEAD_KEY, keep=False)
    if duplicated.any():
        dup = heads[duplicated].iloc[0]
        files = sorted(set(raw.loc[duplicated[duplicated].index, "_source_file"]))
        raise ValueError(
            f"duplicate head rows in {str(directory)!r}: e.g. run {dup['run']} step {dup['step']} "
            f"layer {dup['layer']} head {dup['head']} (files: {', '.join(files[:4])})"
        )
    columns = ID_COLUMNS + list(TROTT2025_METRICS.values()) + ["nonfinite"]
    heads = heads[columns]
    return heads.sort_values(["model", "seed", "step", "layer", "head"], kind="stable").reset_index(
        drop=True
    )


def drop_nonfinite_heads(
    heads: pd.DataFrame, metric: str, purpose: str | None = None
) -> pd.DataFrame:
    """``heads`` without the rows flagged ``nonfinite`` or whose ``metric`` is NaN/inf.

    With ``purpose`` (what the rows are left out of, e.g. "the trajectory") a dropped row raises
    a warning naming up to 10 runs: such heads must be excluded, never silently averaged.
    """
    bad = ~np.isfinite(heads[metric].to_numpy(dtype=float))
    if "nonfinite" in heads.columns:
        bad |= heads["nonfinite"].fillna(False).to_numpy(dtype=bool)
    if bad.any() and purpose is not None:
        runs = sorted(heads.loc[bad, "run"].astype(str).unique())
        warnings.warn(
            f"{int(bad.sum())} head row(s) with non-finite attention (flag 'nonfinite' or NaN/inf "
            f"{metric}) excluded from {purpose}; runs: {', '.join(runs[:10])}"
            + (" ..." if len(runs) > 10 else ""),
            stacklevel=3,
        )
    return heads.loc[~bad]


def validate_heads(heads: pd.DataFrame, metric: str, min_checkpoints: int = 1) -> None:
    """Check that ``heads`` is a usable per-head table for ``metric``; raise ``ValueError`` if not.

    Checks: the id columns of :data:`mechgen.schema.ID_COLUMNS` and the ``metric`` column exist;
    the table is not empty; no (run, step, layer, head) appears twice; each run has one model,
    seed, n_params and n_layers; and every run has at least ``min_checkpoints`` distinct steps
    (the developmental axis needs 2: a slope or onset is undefined on a single checkpoint).
    """
    missing = [c for c in ID_COLUMNS if c not in heads.columns]
    if metric not in heads.columns:
        missing.append(metric)
    if missing:
        present_metrics = [c for c in heads.columns if c not in ID_COLUMNS]
        raise ValueError(
            f"per-head table is missing column(s): {', '.join(missing)}"
            + (
                f" (metric columns present: {', '.join(map(str, present_metrics))})"
                if metric in missing
                else ""
            )
        )
    if heads.empty:
        raise ValueError("per-head table is empty")
    duplicated = heads.duplicated(HEAD_KEY)
    if duplicated.any():
        dup = heads[duplicated].iloc[0]
        raise ValueError(
            f"per-head table has {int(duplicated.sum())} duplicate (run, step, layer, head) row(s), "
            f"e.g. run {dup['run']} step {dup['step']} layer {dup['layer']} head {dup['head']}"
        )
    per_run = heads.groupby("run")[["model", "seed", "n_params", "n_layers"]].nunique()
    inconsistent = per_run[(per_run > 1).any(axis=1)]
    if not inconsistent.empty:
        run = inconsistent.index[0]
        cols = [c for c in per_run.columns if inconsistent.loc[run, c] > 1]
        raise ValueError(f"run {run!r} has more than one value of {', '.join(cols)}")
    steps_per_run = heads.groupby("run")["step"].agg(["nunique", "min"])
    too_few = steps_per_run[steps_per_run["nunique"] < min_checkpoints]
    if not too_few.empty:
        described = ", ".join(
            f"{run!r} (a single checkpoint: step {int(row['min'])})"
            if row["nunique"] == 1
            else f"{run!r} ({int(row['nunique'])} checkpoints)"
            for run, row in too_few.iterrows()
        )
        raise ValueError(
            f"run(s) with fewer than {min_checkpoints} checkpoints: {described}; a developmental "
            f"trajectory (slope, onset) needs at least {min_checkpoints} checkpoints per run"
        )


def _printed_tolerance(printed: str) -> float:
    """Half a unit of the last digit of a printed number: "0.770" -> 0.0005, "1.493e-02" -> 5e-6."""
    from decimal import Decimal

    exponent = Decimal(printed).as_tuple().exponent
    return 0.5 * 10.0 ** int(exponent)


def trott2025_value(results: dict[str, pd.DataFrame], quantity: str) -> float:
    """The number ``quantity`` names in the output of :func:`mechgen.stats.analysis.analyze`.

    ``quantity`` is one of ``per_model:<model>:<column>`` (a cell of ``per_model``),
    ``regression:<analysis>:<term>:estimate|se`` and ``regression:<analysis>:logLik`` (of
    ``regressions``), ``overall:<within|between>:<r_mean|r_sd>`` (of ``convergence_overall``).
    Raises ``KeyError`` naming the quantity when it is not there.
    """
    kind, *parts = quantity.split(":")
    if kind == "per_model":
        model, column = parts
        rows = results["per_model"].loc[results["per_model"]["model"] == model, column]
    elif kind == "overall":
        which, column = parts
        rows = results["convergence_overall"].loc[
            results["convergence_overall"]["kind"] == which, column
        ]
    elif kind == "regression" and len(parts) == 2 and parts[1] == "logLik":
        table = results["regressions"]
        rows = table.loc[table["analysis"] == parts[0], "llf"].drop_duplicates()
    elif kind == "regression" and len(parts) == 3:
        analysis, term, column = parts
        table = results["regressions"]
        rows = table.loc[
            (table["analysis"] == analysis) & (table["term"] == term),
            {"estimate": "estimate", "se": "se"}[column],
        ]
    else:
        raise KeyError(f"unknown quantity format {quantity!r}")
    if len(rows) != 1:
        raise KeyError(f"quantity {quantity!r}: found {len(rows)} values in the results")
    return float(rows.iloc[0])


def compare_trott2025(
    results: dict[str, pd.DataFrame], published: list[dict[str, object]]
) -> pd.DataFrame:
    """Published vs mechgen numbers, one row per published number.

    ``published`` entries have ``quantity`` (see :func:`trott2025_value`), ``printed`` (the
    number as the study printed it) and optionally ``tolerance`` and ``note``. The default
    tolerance is half a unit of the last printed digit (the value rounds to the printed one).
    Columns: ``quantity, printed, mechgen, difference, tolerance, match, note``.
    """
    rows = []
    for entry in published:
        printed = str(entry["printed"])
        tolerance = float(entry.get("tolerance", _printed_tolerance(printed)))  # type: ignore[arg-type]
        value = trott2025_value(results, str(entry["quantity"]))
        difference = value - float(printed)
        rows.append(
            {
                "quantity": entry["quantity"],
                "printed": printed,
                "mechgen": value,
                "difference": difference,
                "tolerance": tolerance,
                # A relative epsilon keeps a value that rounds exactly to the half-unit a match.
                "match": bool(abs(difference) <= tolerance * (1 + 1e-9)),
                "note": entry.get("note", ""),
            }
        )
    return pd.DataFrame(rows)
