"""The key numbers of a suite, one row per model size, and the report's opening summary.

:func:`summary_table` gathers from the statistics tables, per size: seeds, the mean peak and
onset of the max-over-heads trajectory with their bootstrap CIs (``per_model.csv``), the
fraction of seeds with a head meeting the 1-back criterion at the final step with its Wilson
CI (``functional_size.csv``), the modal layer's share of seeds and its permutation p
(``positional_size_step.csv`` at the final step), the mean within-size trajectory
correlation (``per_model.csv``), and, when the relational axis ran, the fraction of seeds in
which the induction circuit forms in the expected order (``relational_sizes.csv``, relation
``expected_order``). :func:`summary_rst` writes it as reStructuredText that the report's
landing page includes (workflow/report/workflow.rst).
"""

from __future__ import annotations

import math

import pandas as pd

SUMMARY_COLUMNS = {
    "model": "model size",
    "n_params": "parameters",
    "n_seeds": "seeds (runs) of the size",
    "peak_mean": "mean over seeds of the trajectory's peak (metric units)",
    "peak_ci_low": "bootstrap CI of peak_mean, low",
    "peak_ci_high": "bootstrap CI of peak_mean, high",
    "onset_mean": "mean over seeds of the threshold onset (optimiser steps; NaN: no onset)",
    "onset_ci_low": "bootstrap CI of onset_mean, low",
    "onset_ci_high": "bootstrap CI of onset_mean, high",
    "n_onset": "seeds with an onset",
    "n_functional_runs": "seeds scored at the final step",
    "n_functional": "seeds with a head meeting the 1-back criterion at the final step",
    "functional_fraction": "n_functional / seeds scored at the final step",
    "functional_ci_low": "Wilson CI of functional_fraction, low",
    "functional_ci_high": "Wilson CI of functional_fraction, high",
    "modal_layer": "the most common layer of the strongest head at the final step (0-indexed)",
    "modal_share": "share of seeds whose strongest head is in modal_layer",
    "modal_p": "one-sided Monte Carlo p of the seeds' layer agreement",
    "within_r": "mean Pearson r between the trajectories of two seeds of the size",
    "n_order_runs": "seeds with an expected-order verdict",
    "n_expected_order": "seeds where the induction circuit forms in the expected order",
    "expected_order_fraction": "n_expected_order / seeds with a verdict (NaN: not run)",
    "expected_order_ci_low": "Wilson CI of expected_order_fraction, low",
    "expected_order_ci_high": "Wilson CI of expected_order_fraction, high",
}
"""Columns of :func:`summary_table` and what each holds."""


def format_params(n_params: float) -> str:
    """A parameter count for humans: 14.1M, 405M, 1.2B, 850k."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n_params >= scale:
            value = n_params / scale
            return f"{value:.3g}{suffix}"
    return f"{int(n_params)}"


def _by_model(table: pd.DataFrame | None, mask_column: str | None = None, value=None):
    if table is None or table.empty or "model" not in table.columns:
        return pd.DataFrame()
    if mask_column is not None:
        if mask_column not in table.columns:
            return pd.DataFrame()
        table = table[table[mask_column] == value]
    return table.drop_duplicates("model").set_index("model")


def _get(frame: pd.DataFrame, model: str, column: str) -> float:
    if model not in frame.index or column not in frame.columns:
        return math.nan
    value = frame.at[model, column]
    return float(value) if pd.notna(value) else math.nan


def summary_table(
    per_model: pd.DataFrame,
    functional: pd.DataFrame | None = None,
    positional: pd.DataFrame | None = None,
    relational_sizes: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per size of ``per_model``, ordered by parameters (see :data:`SUMMARY_COLUMNS`).

    ``functional``: ``functional_size.csv``;
    ``positional``: ``positional_size_step.csv`` (its ``is_final_step`` rows are used);
    ``relational_sizes``: its ``relation == "expected_order"`` rows. A missing table leaves
    its columns NaN.
    """
    if positional is not None and "is_final_step" in positional.columns:
        positional = positional[positional["is_final_step"].astype(bool)]
    func = _by_model(functional)
    pos = _by_model(positional)
    rel = _by_model(relational_sizes, "relation", "expected_order")
    rows = []
    for row in per_model.sort_values(["n_params", "model"], kind="stable").itertuples():
        model = row.model
        entry = {
            "model": model,
            "n_params": row.n_params,
            "n_seeds": int(row.n_seeds),
            **{
                f"{name}_{suffix}": _get(per_model.set_index("model"), model, f"{column}_{suffix}")
                for name, column in (("peak", "peak"), ("onset", "onset_step"))
                for suffix in ("mean", "ci_low", "ci_high")
            },
            "n_onset": _get(per_model.set_index("model"), model, "onset_step_n"),
            "n_functional": _get(func, model, "n_runs_functional"),
            "functional_fraction": _get(func, model, "fraction_functional"),
            "functional_ci_low": _get(func, model, "ci_low"),
            "functional_ci_high": _get(func, model, "ci_high"),
            "modal_layer": _get(pos, model, "modal_layer"),
            "modal_share": _get(pos, model, "modal_share"),
            "modal_p": _get(pos, model, "p_value"),
            "within_r": _get(per_model.set_index("model"), model, "within_r_mean"),
            "n_expected_order": _get(rel, model, "n_holds"),
            "expected_order_fraction": _get(rel, model, "fraction"),
            "expected_order_ci_low": _get(rel, model, "ci_low"),
            "expected_order_ci_high": _get(rel, model, "ci_high"),
        }
        entry["n_functional_runs"] = _get(func, model, "n_runs")
        entry["n_order_runs"] = _get(rel, model, "n_runs")
        rows.append(entry)
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def _ci(mean: float, low: float, high: float, fmt: str) -> str:
    if not math.isfinite(mean):
        return "n/a"
    text = format(mean, fmt)
    if math.isfinite(low) and math.isfinite(high):
        text += f" [{format(low, fmt)}, {format(high, fmt)}]"
    return text


def _count(k: float, n: float, low: float, high: float) -> str:
    if not (math.isfinite(k) and math.isfinite(n)):
        return "n/a"
    return f"{int(k)}/{int(n)} [{low:.2f}, {high:.2f}]"


def _cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def summary_rst(
    table: pd.DataFrame, suite: str, metric: str, confidence: float, stats_dir: str
) -> str:
    """The report's opening summary: one table row per size (:func:`summary_table`) with the
    headline numbers, CIs at ``confidence``, and where the full tables are (``stats_dir``).

    Every number is read from ``table``; nothing is judged here beyond restating the counts."""
    level = f"{confidence * 100:.0f}%"
    header = [
        "size",
        "params",
        "seeds",
        f"peak {metric} [{level} CI]",
        f"onset, steps [{level} CI]",
        f"seeds with a 1-back head at the end [{level} CI]",
        "strongest head's modal layer: share (p)",
        "within-size trajectory r",
        f"seeds where induction follows 1-back [{level} CI]",
    ]
    lines = [
        "Summary of the findings",
        "-----------------------",
        "",
        f"Suite ``{suite}``, metric ``{metric}``; one row per model size, CIs over seeds. "
        + f"The full tables are in ``{stats_dir}`` (and under *Tables* below).",
        "",
        ".. csv-table::",
        "   :header: " + ", ".join(_cell(h) for h in header),
        "",
    ]
    for row in table.itertuples():
        layer = (
            f"layer {int(row.modal_layer)}: {row.modal_share:.2f} (p = {row.modal_p:.2g})"
            if math.isfinite(row.modal_layer) and math.isfinite(row.modal_share)
            else "n/a"
        )
        cells = [
            row.model,
            format_params(float(row.n_params)),
            str(row.n_seeds),
            _ci(row.peak_mean, row.peak_ci_low, row.peak_ci_high, ".3f"),
            _ci(row.onset_mean, row.onset_ci_low, row.onset_ci_high, ".0f"),
            _count(
                row.n_functional,
                row.n_functional_runs,
                row.functional_ci_low,
                row.functional_ci_high,
            ),
            layer,
            f"{row.within_r:.2f}" if math.isfinite(row.within_r) else "n/a",
            _count(
                row.n_expected_order,
                row.n_order_runs,
                row.expected_order_ci_low,
                row.expected_order_ci_high,
            ),
        ]
        lines.append("   " + ", ".join(_cell(c) for c in cells))
    lines.append("")
    return "\n".join(lines)
