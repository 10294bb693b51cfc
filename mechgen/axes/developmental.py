"""The developmental axis: when and how strongly each run develops the mechanism.

Everything here is per run (one model size x one seed), computed from the run's *trajectory*:
at every checkpoint, the largest value of the metric (default ``one_back``) over all heads of
all layers. The definitions follow the reference study (Trott 2025) exactly:

- ``peak`` = max of the trajectory over checkpoints; ``peak_step`` = the (first) step where it
  is reached.
- ``slope`` = OLS slope of the trajectory on ``log10(step + 1)`` (metric units per decade of
  steps). ``step + 1`` is the study's ``step_modded``; the +1 keeps step 0 on the axis.
- ``onset`` (threshold estimator): ``d = diff(trajectory) / diff(log10(step + 1))`` attached to
  the later checkpoint of each pair; for each threshold t (default 0.01, 0.02, ..., 0.30) the
  first step whose d > t; onset = mean of those steps over the thresholds that were crossed
  (NaN if none was). The estimator can only return averages of checkpoint steps.
- ``onset_logistic`` (a second estimator, not quantised to the checkpoint grid): a monotone
  increasing logistic ``lower + amplitude / (1 + exp(-k (x - x0)))`` in ``x = log10(step + 1)``
  fitted by least squares (``scipy.optimize.curve_fit``); its midpoint x0, which is also its
  steepest point, converted back to steps as ``10**x0 - 1``. NaN with a reason if the fit fails.

Every step-valued quantity is also given in tokens (``x tokens_per_step``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, stats

from mechgen.schema import TRAJECTORY_COLUMNS
from mechgen.tables.heads import drop_nonfinite_heads, validate_heads


def onset_thresholds(start: float = 0.01, stop: float = 0.30, step: float = 0.01) -> np.ndarray:
    """Thresholds ``start, start + step, ..., stop`` (``stop`` included), in metric units per decade.

    Rounded to 10 decimals so that 0.01 + 0.01 * k compares as the study's ``seq(0.01, 0.3, 0.01)``.
    """
    if step <= 0:
        raise ValueError(f"onset threshold step must be > 0, got {step}")
    if stop < start:
        raise ValueError(f"onset threshold stop ({stop}) is below start ({start})")
    n = int(np.floor((stop - start) / step + 1e-9)) + 1
    return np.round(start + step * np.arange(n), 10)


DEFAULT_THRESHOLDS = onset_thresholds()
"""The study's thresholds 0.01, 0.02, ..., 0.30."""


def log_step(step: np.ndarray | pd.Series | float) -> np.ndarray:
    """``log10(step + 1)``: the study's time axis (``log10(step_modded)``), defined at step 0."""
    return np.log10(np.asarray(step, dtype=float) + 1.0)


def trajectories(heads: pd.DataFrame, metric: str = "one_back") -> pd.DataFrame:
    """Per run and step: the max of ``metric`` over all heads of all layers, with its argmax.

    Returns :data:`mechgen.schema.TRAJECTORY_COLUMNS` (``value`` = the max; ``argmax_layer``,
    ``argmax_head`` 0-indexed; ties go to the lowest layer, then head). Head rows flagged
    ``nonfinite`` (or with a NaN/inf metric) are excluded with a warning; a (run, step) left
    with no head is dropped with a warning. Sorted by model, seed, step.
    """
    validate_heads(heads, metric)
    usable = drop_nonfinite_heads(heads, metric, "the trajectory")
    dropped = set(map(tuple, heads[["run", "step"]].drop_duplicates().to_numpy())) - set(
        map(tuple, usable[["run", "step"]].drop_duplicates().to_numpy())
    )
    if dropped:
        warnings.warn(
            f"{len(dropped)} checkpoint(s) have no finite head and are missing from the trajectory: "
            + ", ".join(f"{r} step {s}" for r, s in sorted(dropped)[:10]),
            stacklevel=2,
        )
    if usable.empty:
        raise ValueError(f"no finite values of {metric!r} in the per-head table")
    ordered = usable.sort_values(["run", "step", "layer", "head"], kind="stable")
    # idxmax returns the first maximum, i.e. the lowest (layer, head) on ties, given the sort.
    best = ordered.loc[ordered.groupby(["run", "step"], sort=False)[metric].idxmax()]
    traj = best.assign(
        metric=metric, value=best[metric], argmax_layer=best["layer"], argmax_head=best["head"]
    )
    if "suite" not in traj.columns:
        traj["suite"] = ""
    traj = traj[TRAJECTORY_COLUMNS]
    return traj.sort_values(["model", "seed", "step"], kind="stable").reset_index(drop=True)


def trajectory_slope(steps: np.ndarray, values: np.ndarray) -> float:
    """OLS slope of ``values`` on ``log10(steps + 1)`` (``scipy.stats.linregress``), per decade."""
    x = log_step(steps)
    if len(np.unique(x)) < 2:
        raise ValueError("a slope needs at least 2 distinct checkpoints")
    return float(stats.linregress(x, np.asarray(values, dtype=float)).slope)


def threshold_onset(
    steps: np.ndarray, values: np.ndarray, thresholds: np.ndarray = DEFAULT_THRESHOLDS
) -> tuple[float, int]:
    """The study's onset, in steps, and how many thresholds were crossed.

    ``d_i = (v_i - v_{i-1}) / (log10(s_i + 1) - log10(s_{i-1} + 1))`` for consecutive checkpoints
    (sorted by step), attached to the later step ``s_i``. For each threshold t: the first ``s_i``
    with ``d_i > t``. Onset = mean of those steps over the thresholds that were crossed; NaN (and
    0 crossed) if none was.
    """
    order = np.argsort(np.asarray(steps))
    s = np.asarray(steps, dtype=float)[order]
    v = np.asarray(values, dtype=float)[order]
    if len(s) < 2:
        raise ValueError("an onset needs at least 2 checkpoints")
    rate = np.diff(v) / np.diff(log_step(s))
    later = s[1:]
    onsets = []
    for threshold in np.asarray(thresholds, dtype=float):
        above = np.flatnonzero(rate > threshold)
        if above.size:
            onsets.append(later[above[0]])
    if not onsets:
        return float("nan"), 0
    return float(np.mean(onsets)), len(onsets)


@dataclass(frozen=True)
class LogisticOnset:
    """A monotone logistic fit ``lower + amplitude / (1 + exp(-steepness (x - midpoint_log10)))``
    of a trajectory in ``x = log10(step + 1)``.

    ``step`` = ``10**midpoint_log10 - 1`` (NaN when the fit failed or is not usable; ``note``
    says why). ``steepness`` is per decade of steps; ``lower``/``amplitude`` in metric units.
    """

    step: float
    midpoint_log10: float
    steepness: float
    lower: float
    amplitude: float
    note: str


def _logistic(
    x: np.ndarray, lower: float, amplitude: float, steepness: float, midpoint: float
) -> np.ndarray:
    return lower + amplitude * 0.5 * (
        1.0 + np.tanh(0.5 * steepness * (x - midpoint))
    )  # = 1/(1+e^-z), overflow-free


def _logistic_jacobian(
    x: np.ndarray, lower: float, amplitude: float, steepness: float, midpoint: float
) -> np.ndarray:
    sigma = 0.5 * (1.0 + np.tanh(0.5 * steepness * (x - midpoint)))
    slope = amplitude * sigma * (1.0 - sigma)  # d f / d z with z = steepness (x - midpoint)
    return np.column_stack([np.ones_like(x), sigma, slope * (x - midpoint), -slope * steepness])


def logistic_onset(
    steps: np.ndarray, values: np.ndarray, max_steepness: float = 100.0
) -> LogisticOnset:
    """Fit a monotone increasing logistic to the trajectory in ``log10(step + 1)``; its midpoint.

    Least squares (``scipy.optimize.curve_fit``, trust-region reflective with bounds):
    ``amplitude >= 0`` and ``0 < steepness <= max_steepness`` (per decade) make the curve monotone
    non-decreasing; the midpoint is bounded to the checkpoint range. The midpoint is also the
    steepest point of the curve. Returns NaN ``step`` with a ``note`` when there are fewer than 5
    checkpoints (4 parameters), the fit fails, the fitted rise is negligible (< 1% of the
    trajectory's range, or the trajectory is flat), or the midpoint sits on the edge of the
    checkpoint range (no rise inside the observed window). A very steep fit (a step-like
    rise) is reported with a note when the rise (10% to 90%, ``2 ln 9 / steepness`` decades) is
    narrower than the gap between the two checkpoints around the midpoint: the midpoint is then
    only located between those checkpoints.
    """
    nan = float("nan")
    order = np.argsort(np.asarray(steps))
    x = log_step(np.asarray(steps, dtype=float)[order])
    y = np.asarray(values, dtype=float)[order]
    if len(x) < 5:
        return LogisticOnset(
            nan, nan, nan, nan, nan, f"only {len(x)} checkpoints; a 4-parameter logistic needs >= 5"
        )
    span = float(y.max() - y.min())
    if span <= 0:
        return LogisticOnset(nan, nan, nan, nan, nan, "flat trajectory: no rise to locate")
    half = y.min() + span / 2
    start_mid = float(x[np.argmax(y >= half)])
    x_lo, x_hi = float(x.min()), float(x.max())
    p0 = [
        float(y.min()),
        span,
        min(5.0, max_steepness / 2),
        min(max(start_mid, x_lo + 1e-3), x_hi - 1e-3),
    ]
    bounds = (
        [float(y.min()) - span, 0.0, 1e-6, x_lo],
        [float(y.max()), 2.0 * span, max_steepness, x_hi],
    )
    try:
        params, _ = optimize.curve_fit(
            _logistic,
            x,
            y,
            p0=p0,
            bounds=bounds,
            method="trf",
            jac=_logistic_jacobian,
            max_nfev=1000,
        )
    except (RuntimeError, ValueError) as exc:
        return LogisticOnset(nan, nan, nan, nan, nan, f"logistic fit failed: {exc}")
    lower, amplitude, steepness, midpoint = (float(p) for p in params)
    if amplitude < 0.01 * span:
        return LogisticOnset(
            nan, midpoint, steepness, lower, amplitude, "fitted rise is negligible"
        )
    edge = 1e-6 * max(1.0, x_hi - x_lo)
    if midpoint <= x_lo + edge or midpoint >= x_hi - edge:
        return LogisticOnset(
            nan,
            midpoint,
            steepness,
            lower,
            amplitude,
            "fitted midpoint on the edge of the checkpoint range",
        )
    note = ""
    # The curve rises from 10% to 90% over 2 ln(9) / steepness decades. If that is narrower than
    # the gap between the checkpoints around the midpoint, the data only place the midpoint
    # somewhere in that gap (any midpoint there fits about equally well).
    rise_width = 2 * math.log(9) / steepness
    after = int(np.searchsorted(x, midpoint))
    gap = float(x[after] - x[after - 1])
    if rise_width < gap:
        note = (
            f"step-like rise between steps {10 ** x[after - 1] - 1:.0f} and {10 ** x[after] - 1:.0f}: "
            "the midpoint is only located between those checkpoints"
        )
    return LogisticOnset(float(10.0**midpoint - 1.0), midpoint, steepness, lower, amplitude, note)


PER_SEED_COLUMNS = [
    "suite",
    "model",
    "size",
    "seed",
    "run",
    "n_params",
    "n_layers",
    "n_heads",
    "n_checkpoints",
    "peak",
    "peak_step",
    "peak_tokens",
    "slope",
    "onset_step",
    "onset_tokens",
    "onset_n_thresholds",
    "onset_logistic_step",
    "onset_logistic_tokens",
    "onset_logistic_note",
    "final_step",
    "final_value",
    "final_layer",
    "final_head",
    "final_relative_depth",
]
"""Columns of :func:`per_seed_summary`."""


def infer_tokens_per_step(table: pd.DataFrame) -> int:
    """Tokens per step from a table's ``tokens_seen / step`` (rows with step > 0); must be unique."""
    positive = table[table["step"] > 0]
    if positive.empty or "tokens_seen" not in table.columns:
        raise ValueError(
            "cannot infer tokens_per_step (no step > 0 with tokens_seen); pass it explicitly"
        )
    ratios = np.unique(
        positive["tokens_seen"].to_numpy(dtype=float) / positive["step"].to_numpy(dtype=float)
    )
    if len(ratios) != 1 or not float(ratios[0]).is_integer():
        raise ValueError(
            f"tokens_seen / step is not one integer constant ({ratios[:5]}); pass tokens_per_step"
        )
    return int(ratios[0])


def per_seed_from_trajectories(
    traj: pd.DataFrame,
    thresholds: np.ndarray = DEFAULT_THRESHOLDS,
    tokens_per_step: int | None = None,
) -> pd.DataFrame:
    """:func:`per_seed_summary` from a trajectories table (:func:`trajectories`' output).

    A run with a single checkpoint raises ``ValueError`` (no slope or onset exists).
    """
    if tokens_per_step is None:
        tokens_per_step = infer_tokens_per_step(traj)
    rows = []
    for run, run_traj in traj.groupby("run", sort=False):
        run_traj = run_traj.sort_values("step")
        steps = run_traj["step"].to_numpy(dtype=float)
        values = run_traj["value"].to_numpy(dtype=float)
        if len(steps) < 2:
            raise ValueError(
                f"run {run!r} has a single checkpoint (step {int(steps[0])}); the developmental axis "
                "(slope, onset) needs at least 2 checkpoints per run"
            )
        first = run_traj.iloc[0]
        final = run_traj.iloc[-1]
        peak_index = int(np.argmax(values))
        onset, n_crossed = threshold_onset(steps, values, thresholds)
        logistic = logistic_onset(steps, values)
        rows.append(
            {
                "suite": first["suite"],
                "model": first["model"],
                "size": first["size"],
                "seed": int(first["seed"]),
                "run": run,
                "n_params": int(first["n_params"]),
                "n_layers": int(first["n_layers"]),
                "n_heads": int(first["n_heads"]),
                "n_checkpoints": len(steps),
                "peak": float(values[peak_index]),
                "peak_step": int(steps[peak_index]),
                "peak_tokens": int(steps[peak_index]) * tokens_per_step,
                "slope": trajectory_slope(steps, values),
                "onset_step": onset,
                "onset_tokens": onset * tokens_per_step,
                "onset_n_thresholds": n_crossed,
                "onset_logistic_step": logistic.step,
                "onset_logistic_tokens": logistic.step * tokens_per_step,
                "onset_logistic_note": logistic.note,
                "final_step": int(final["step"]),
                "final_value": float(final["value"]),
                "final_layer": int(final["argmax_layer"]),
                "final_head": int(final["argmax_head"]),
                # (layer + 1) / n_layers: equals the study's prop_layer (1-indexed Layer / n_layers).
                "final_relative_depth": (int(final["argmax_layer"]) + 1) / int(final["n_layers"]),
            }
        )
    summary = pd.DataFrame(rows, columns=PER_SEED_COLUMNS)
    return summary.sort_values(["n_params", "model", "seed"], kind="stable").reset_index(drop=True)


def per_seed_summary(
    heads: pd.DataFrame,
    metric: str = "one_back",
    thresholds: np.ndarray = DEFAULT_THRESHOLDS,
    tokens_per_step: int | None = None,
) -> pd.DataFrame:
    """One row per run: peak, slope, onsets and the final-step argmax head of the trajectory.

    Columns :data:`PER_SEED_COLUMNS`. Units: ``peak``/``final_value`` in metric units;
    ``slope`` in metric units per decade of ``step + 1``; ``*_step`` in optimiser steps;
    ``*_tokens`` = steps x ``tokens_per_step`` (default: inferred from ``tokens_seen / step``).
    ``onset_step`` is the study's threshold onset (NaN if no threshold was crossed;
    ``onset_n_thresholds`` says how many were); ``onset_logistic_step`` the logistic midpoint
    (NaN with ``onset_logistic_note`` when the fit is unusable). ``final_layer``/``final_head`` are
    the 0-indexed argmax head at the run's last checkpoint and ``final_relative_depth`` =
    ``(final_layer + 1) / n_layers`` — the same number as the study's 1-indexed
    ``prop_layer = Layer / n_layers``.

    Raises ``ValueError`` for a bad table, and for a run with a single checkpoint (decision: an
    error, not NaN, because a one-point trajectory silently turns into missing slopes/onsets
    downstream; drop that run or add checkpoints).
    """
    validate_heads(heads, metric, min_checkpoints=2)
    if tokens_per_step is None:
        tokens_per_step = infer_tokens_per_step(heads)
    traj = trajectories(heads, metric)
    return per_seed_from_trajectories(traj, thresholds, tokens_per_step)
