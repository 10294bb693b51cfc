"""The per-suite relational and configurational tables, read from the scoring job's circuit
files (table-side: numpy and pandas, no torch; the scores themselves are computed by
:mod:`mechgen.scoring.circuit` inside the scoring job).

Per suite (the ``relational`` rule; columns documented where they are defined)
-----------------------------------------------------------------------------
- :func:`relational_run_table` (per run: the strongest induction and 1-back heads at the
  final step, their layer order, the onset lag and the trajectory correlation) and
  :func:`relation_fraction_by_size`, which the tables below build on;
- :func:`relational_table` (``stats/relational.csv``, one row per seed: the run table of
  :func:`relational_run_table` + :data:`RELATIONAL_EXTRA_COLUMNS`),
  :func:`relational_sizes` (``relational_sizes.csv``: per size, the fraction of seeds where
  each of :data:`RELATIONS` holds, Wilson CI), :func:`relational_regressions`
  (``relational_regressions.csv``: lag and drops ~ log10(n_params) + (1|seed));
- :func:`configurational_table` (``configurational.csv``, :data:`CONFIGURATIONAL_COLUMNS`) and
  :func:`stability_table` (``configurational_stability.csv``, :data:`STABILITY_COLUMNS`).

The circuit files themselves (their keys, :class:`mechgen.tables.circuit_files.CircuitResult`) are
described in :mod:`mechgen.tables.circuit_files`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mechgen.axes.developmental import (
    infer_tokens_per_step,
    threshold_onset,
    trajectories,
)
from mechgen.axes.similarity import (
    align_by_similarity,
    cka_vs_random_heads,
    identity_fixed_from,
    linear_cka,
    profile_similarity_matrix,
    qk_cosine,
    similarity_vs_random_pairs,
    spectrum_similarity_matrix,
)
from mechgen.schema import RUN_ID_COLUMNS, RUN_SHAPE_COLUMNS
from mechgen.stats.analysis import fit_mixed, wilson_interval
from mechgen.tables.baselines import uniform_induction_baseline
from mechgen.tables.circuit_files import CircuitResult

__all__ = [
    "CONFIGURATIONAL_COLUMNS",
    "RELATIONAL_EXTRA_COLUMNS",
    "RELATIONS",
    "RUN_TABLE_COLUMNS",
    "STABILITY_COLUMNS",
    "OnsetFn",
    "cka_random_rows",
    "configurational_steps",
    "configurational_table",
    "detail_extra",
    "relation_fraction_by_size",
    "relational_regressions",
    "relational_run_table",
    "relational_sizes",
    "relational_table",
    "stability_table",
    "uniform_induction_level",
]

HeadId = tuple[int, int]
"""(layer, head), both 0-indexed."""


def finite_or_nan(value: Any) -> float:
    """``float(value)``, NaN for None/NA."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


# ---------------------------------------------------------------------------------------------
# Per run: the previous-token and induction heads (mechgen.scoring.relational scores them)


OnsetFn = Callable[[np.ndarray, np.ndarray], float]
"""``onset(steps, values) -> onset step`` (NaN if none) of one run's max-over-heads trajectory,
``steps`` ascending. E.g. ``lambda s, v: mechgen.axes.developmental.threshold_onset(s, v)[0]`` or
``lambda s, v: mechgen.axes.developmental.logistic_onset(s, v).step``."""


RUN_TABLE_COLUMNS = [
    *RUN_SHAPE_COLUMNS,
    "n_checkpoints", "final_step",
    "induction_layer", "induction_head", "induction_max",
    "one_back_layer", "one_back_head", "one_back_max",
    "one_back_earlier_layer",
    "onset_one_back_step", "onset_induction_step", "lag_steps",
    "onset_one_back_tokens", "onset_induction_tokens", "lag_tokens",
    "trajectory_r", "trajectory_n",
]  # fmt: skip
"""Columns of :func:`relational_run_table` (before any ``extra`` columns)."""


def relational_run_table(
    heads: pd.DataFrame,
    onset: OnsetFn,
    induction_metric: str = "induction",
    one_back_metric: str = "one_back",
    extra: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per run: how the 1-back head and the induction head relate.

    ``heads``: the per-head table (``mechgen.schema.ID_COLUMNS`` plus both metric columns),
    all checkpoints of every run. From the max-over-heads trajectories
    (:func:`mechgen.axes.developmental.trajectories`: non-finite/flagged heads left out, ties to
    the lowest layer, then head):

    - ``induction_layer/head/max`` and ``one_back_layer/head/max``: the strongest head of each
      metric at the run's final step;
    - ``one_back_earlier_layer``: one_back_layer < induction_layer (bool), the layer order an
      induction circuit needs;
    - ``onset_*_step`` = ``onset(steps, values)`` of each trajectory; ``lag_steps`` =
      onset_induction - onset_one_back (steps; positive = induction later);
      ``*_tokens`` = the same x tokens per step (inferred from tokens_seen / step);
    - ``trajectory_r``: Pearson r (``scipy.stats.pearsonr``) of the two trajectories over the
      ``trajectory_n`` steps both have (NaN with fewer than 3 or a constant trajectory).

    ``extra``: an optional per-run table (a ``run`` column, e.g. causal drops or composition
    scores) merged on ``run``. Sorted by n_params, model, seed.
    """

    if not callable(onset):
        raise TypeError("onset must be a callable onset(steps, values) -> step")
    induction = trajectories(heads, induction_metric)
    one_back = trajectories(heads, one_back_metric)
    rows = []
    for run, run_induction in induction.groupby("run", sort=False):
        run_induction = run_induction.sort_values("step")
        run_one_back = one_back[one_back["run"] == run].sort_values("step")
        if run_one_back.empty:
            continue
        final_induction = run_induction.iloc[-1]
        final_one_back = run_one_back.iloc[-1]
        try:
            tokens_per_step: float = infer_tokens_per_step(heads[heads["run"] == run])
        except ValueError:
            tokens_per_step = math.nan
        onset_one_back = float(
            onset(run_one_back["step"].to_numpy(float), run_one_back["value"].to_numpy(float))
        )
        onset_induction = float(
            onset(run_induction["step"].to_numpy(float), run_induction["value"].to_numpy(float))
        )
        shared = run_induction.merge(run_one_back, on="step", suffixes=("_induction", "_one_back"))
        r = math.nan
        x = shared["value_induction"].to_numpy(float)
        y = shared["value_one_back"].to_numpy(float)
        if len(shared) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
            r = float(stats.pearsonr(x, y).statistic)
        lag = onset_induction - onset_one_back
        rows.append(
            {
                **{col: final_induction[col] for col in RUN_SHAPE_COLUMNS},
                "n_checkpoints": len(run_induction),
                "final_step": int(final_induction["step"]),
                "induction_layer": int(final_induction["argmax_layer"]),
                "induction_head": int(final_induction["argmax_head"]),
                "induction_max": float(final_induction["value"]),
                "one_back_layer": int(final_one_back["argmax_layer"]),
                "one_back_head": int(final_one_back["argmax_head"]),
                "one_back_max": float(final_one_back["value"]),
                "one_back_earlier_layer": bool(
                    final_one_back["argmax_layer"] < final_induction["argmax_layer"]
                ),
                "onset_one_back_step": onset_one_back,
                "onset_induction_step": onset_induction,
                "lag_steps": lag,
                "onset_one_back_tokens": onset_one_back * tokens_per_step,
                "onset_induction_tokens": onset_induction * tokens_per_step,
                "lag_tokens": lag * tokens_per_step,
                "trajectory_r": r,
                "trajectory_n": len(shared),
            }
        )
    table = pd.DataFrame(rows, columns=RUN_TABLE_COLUMNS)
    if extra is not None:
        if "run" not in extra.columns:
            raise ValueError("extra must have a 'run' column to merge on")
        clash = [c for c in extra.columns if c in table.columns and c != "run"]
        if clash:
            raise ValueError(f"extra repeats column(s) of the run table: {', '.join(clash)}")
        table = table.merge(extra, on="run", how="left", validate="one_to_one")
    return table.sort_values(["n_params", "model", "seed"], kind="stable").reset_index(drop=True)


def relation_fraction_by_size(
    run_table: pd.DataFrame,
    relation: str = "one_back_earlier_layer",
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Per model size: the fraction of runs where the boolean column ``relation`` holds.

    ``fraction = n_holds / n_runs`` over runs with a non-missing value, with the Wilson score
    interval at ``confidence`` (:func:`mechgen.stats.analysis.wilson_interval`).
    Columns: model, size, n_params, n_runs, n_holds, fraction, ci_low, ci_high, confidence,
    relation.
    """

    if relation not in run_table.columns:
        raise ValueError(
            f"run table has no column {relation!r}; columns: {', '.join(run_table.columns)}"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    rows = []
    for (model, size), size_runs in run_table.groupby(["model", "size"], sort=False):
        values = size_runs[relation].dropna()
        if values.empty:
            continue
        n_runs = len(values)
        n_holds = int(values.astype(bool).sum())
        ci_low, ci_high = wilson_interval(n_holds, n_runs, confidence)
        rows.append(
            {
                "model": model,
                "size": size,
                "n_params": size_runs["n_params"].iloc[0] if "n_params" in size_runs else pd.NA,
                "n_runs": n_runs,
                "n_holds": n_holds,
                "fraction": n_holds / n_runs,
                "ci_low": float(ci_low),
                "ci_high": float(ci_high),
                "confidence": confidence,
                "relation": relation,
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Per suite: the relational tables



RELATIONAL_EXTRA_COLUMNS = [
    "detail_step",
    "ablation_source_layer",
    "ablation_source_head",
    "ablation_control_head",
    "ablation_target_layer",
    "ablation_target_head",
    "induction_before",
    "induction_after_source",
    "induction_after_control",
    "induction_drop",
    "control_induction_drop",
    "drop_minus_control",
    "drop_exceeds_control",
    "copying_before",
    "copying_drop",
    "control_copying_drop",
    "k_composition",
    "k_composition_baseline",
    "k_composition_corrected",
    "k_composition_z",
    "induction_control_at_head",
    "induction_content",
    "induction_positional",
    "induction_uniform",
    "induction_formed",
    "one_back_first",
    "expected_order",
]
"""Columns :func:`relational_table` adds to :data:`RUN_TABLE_COLUMNS`.

At the run's last detail step (``detail_step``): the mean-ablation test (source = the
strongest 1-back head, control = a random head of its layer, target = the strongest induction
head of a later layer; ``induction_*`` in attention probability, ``copying_*`` in accuracy;
``drop_minus_control`` = induction_drop - control_induction_drop; ``drop_exceeds_control`` =
drop_minus_control > 0), the K-composition of source -> target with its random-rotation
baseline mean, ``corrected`` = score - baseline and z = corrected / baseline SD.
``induction_control_at_head``: the strongest induction head's score at the final step on
non-repeating sequences (:func:`mechgen.scoring.circuit.positional_control`); ``induction_content`` = induction_max -
that (attention probability: the part of the score that needs the repeat);
``induction_positional`` = control >= half the induction score (the "induction head" attends to
the fixed offset L - 1, not by content; NA without the control column, and NA when the score
is below twice the uniform level: then there is no head to call positional);
``induction_uniform`` = the uniform-attention level at the scored positions,
(1/L) sum_{p=L}^{2L-1} 1/(p + 1) with L = the run's ``relational.half_length`` (NaN when the
circuit records do not say); ``induction_formed`` = induction_max >= 2 x induction_uniform and
not positional (a content-based induction head exists; NA when the uniform level is unknown).
``one_back_first`` = lag_steps > 0 (the induction trajectory's onset after the 1-back one; NA
when either onset is undefined); ``expected_order`` = one_back_first and
one_back_earlier_layer and induction_formed (False when no induction head formed, else NA when
either of the first two is NA; an unknown induction_formed does not count against it).
"""


def _run_meta(heads: pd.DataFrame) -> pd.DataFrame:
    return heads.drop_duplicates("run")[RUN_ID_COLUMNS].reset_index(drop=True)


def detail_extra(circuits: Mapping[tuple[str, int], CircuitResult]) -> pd.DataFrame:
    """Per run: ablation and K-composition at the run's last detail step (see
    :data:`RELATIONAL_EXTRA_COLUMNS`); runs without a detail step are absent."""
    latest: dict[str, tuple[int, CircuitResult]] = {}
    for (run, step), result in circuits.items():
        if "k_composition" in result.arrays and (run not in latest or step > latest[run][0]):
            latest[run] = (step, result)
    rows = []
    for run, (step, result) in sorted(latest.items()):
        ablation = result.record.get("ablation", {})
        row: dict[str, Any] = {"run": run, "detail_step": step}
        for key in ("source_layer", "source_head", "control_head", "target_layer", "target_head"):
            row[f"ablation_{key}"] = ablation.get(key)
        for key in (
            "induction_before",
            "induction_after_source",
            "induction_after_control",
            "induction_drop",
            "control_induction_drop",
            "copying_before",
            "copying_drop",
            "control_copying_drop",
        ):
            row[key] = finite_or_nan(ablation.get(key))
        row["drop_minus_control"] = row["induction_drop"] - row["control_induction_drop"]
        row["drop_exceeds_control"] = (
            bool(row["drop_minus_control"] > 0)
            if math.isfinite(row["drop_minus_control"])
            else pd.NA
        )
        target_layer, target_head = ablation.get("target_layer"), ablation.get("target_head")
        source = (ablation.get("source_layer"), ablation.get("source_head"))
        if target_layer is not None and target_head is not None and None not in source:
            index = (int(target_layer), int(target_head), int(source[0]), int(source[1]))
            score = float(result.arrays["k_composition"][index])
            mean = float(result.arrays["k_baseline_mean"][index])
            sd = float(result.arrays["k_baseline_sd"][index])
            row.update(
                k_composition=score,
                k_composition_baseline=mean,
                k_composition_corrected=score - mean,
                k_composition_z=(score - mean) / sd if sd > 0 else math.nan,
            )
        else:
            row.update(
                k_composition=math.nan,
                k_composition_baseline=math.nan,
                k_composition_corrected=math.nan,
                k_composition_z=math.nan,
            )
        rows.append(row)
    columns = ["run", *RELATIONAL_EXTRA_COLUMNS[: RELATIONAL_EXTRA_COLUMNS.index("one_back_first")]]
    return pd.DataFrame(rows, columns=columns)


def relational_table(
    heads: pd.DataFrame,
    circuits: Mapping[tuple[str, int], CircuitResult],
    thresholds: np.ndarray,
) -> pd.DataFrame:
    """Per run: :func:`relational_run_table` + :data:`RELATIONAL_EXTRA_COLUMNS`.

    Onsets are :func:`mechgen.axes.developmental.threshold_onset` (the reference study's onset, mean
    over ``thresholds`` of the first step whose rise per log10(step + 1) exceeds it) of the
    one_back and of the induction max-over-heads trajectories; lag = induction onset - 1-back
    onset (steps, and tokens).
    """

    if "induction" not in heads.columns:
        raise ValueError(
            "the per-head table has no 'induction' column: score with relational.enabled: true"
        )

    def onset(steps: np.ndarray, values: np.ndarray) -> float:
        return threshold_onset(steps, values, thresholds)[0] if len(steps) >= 2 else math.nan

    table = relational_run_table(heads, onset, extra=detail_extra(circuits))
    control = []
    for row in table.itertuples():
        at_head = heads[
            (heads["run"] == row.run)
            & (heads["step"] == row.final_step)
            & (heads["layer"] == row.induction_layer)
            & (heads["head"] == row.induction_head)
        ]
        has_control = "induction_control" in heads.columns and len(at_head) == 1
        control.append(float(at_head["induction_control"].iloc[0]) if has_control else math.nan)
    table["induction_control_at_head"] = control
    table["induction_content"] = table["induction_max"] - table["induction_control_at_head"]
    table["induction_uniform"] = [
        uniform_induction_level(circuits, row.run, row.final_step) for row in table.itertuples()
    ]
    positional, formed = [], []
    for c, i, u in zip(
        table["induction_control_at_head"], table["induction_max"], table["induction_uniform"]
    ):
        above = bool(i >= 2 * u) if math.isfinite(u) else None
        positional.append(bool(c >= 0.5 * i) if math.isfinite(c) and above is not False else pd.NA)
        formed.append(
            pd.NA
            if above is None or (above and positional[-1] is pd.NA)
            else bool(above and not positional[-1])
        )
    table["induction_positional"] = pd.array(positional, dtype="boolean")
    table["induction_formed"] = pd.array(formed, dtype="boolean")
    lag = table["lag_steps"].astype(float)
    table["one_back_first"] = pd.array(
        [bool(v > 0) if math.isfinite(v) else pd.NA for v in lag], dtype="boolean"
    )
    # Without an induction head there is no order to find: onsets of a trajectory that never
    # leaves the uniform level are noise, so a run with induction_formed False is not counted.
    order = table["one_back_first"] & table["one_back_earlier_layer"].astype("boolean")
    table["expected_order"] = order & table["induction_formed"].fillna(True)
    for column in RELATIONAL_EXTRA_COLUMNS:
        if column not in table.columns:
            table[column] = pd.NA
    return table


def uniform_induction_level(
    circuits: Mapping[tuple[str, int], CircuitResult], run: str, step: Any
) -> float:
    """:func:`mechgen.tables.baselines.uniform_induction_baseline` with L the ``half_length`` recorded
    in the run's circuit result at ``step`` (probability; NaN when that result or its settings
    record is missing)."""
    try:
        result = circuits.get((run, int(step)))
    except (TypeError, ValueError):
        return math.nan
    half = (result.record.get("settings") or {}).get("half_length") if result else None
    return uniform_induction_baseline(int(half)) if half else math.nan


RELATIONS = (
    "one_back_earlier_layer",
    "one_back_first",
    "drop_exceeds_control",
    "expected_order",
    "induction_positional",
    "induction_formed",
)
"""The boolean per-run relations whose per-size fractions :func:`relational_sizes` reports."""


def relational_sizes(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per size and relation: fraction of seeds where it holds, Wilson CI
    (:func:`relation_fraction_by_size`), stacked over :data:`RELATIONS`."""

    frames = [
        relation_fraction_by_size(table, relation, confidence)
        for relation in RELATIONS
        if relation in table.columns and table[relation].notna().any()
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def relational_regressions(table: pd.DataFrame) -> pd.DataFrame:
    """Mixed models ``y ~ log10(n_params) + (1|seed)`` (REML, :func:`mechgen.stats.analysis.fit_mixed`)
    for y = lag_steps (onset lag, steps), induction_drop and drop_minus_control (attention
    probability). Runs with a NaN y are left out; a model that cannot be fitted (one size, one
    seed) is one row whose note says why (``mechgen.stats.analysis.REGRESSION_COLUMNS``)."""

    data = table.assign(log10_n_params=np.log10(table["n_params"].astype(float)))
    frames = []
    for response in ("lag_steps", "induction_drop", "drop_minus_control"):
        values = pd.to_numeric(data[response], errors="coerce")
        frame = data.assign(**{response: values})[np.isfinite(values.to_numpy(dtype=float))]
        fit = fit_mixed(
            frame,
            f"{response} ~ log10_n_params",
            ["seed"],
            reml=True,
            analysis=f"relational_{response}",
            display_formula=f"{response} ~ log10(n_params) + (1|seed)",
            term_names={"Intercept": "(Intercept)", "log10_n_params": "log10(n_params)"},
        )
        left_out = int(len(data) - len(frame))
        if left_out:
            fit.note = "; ".join(filter(None, [fit.note, f"{left_out} run(s) with NaN left out"]))
        frames.append(fit.table())
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------
# Per suite: the configurational tables


CONFIGURATIONAL_COLUMNS = [
    "run_a",
    "model_a",
    "size_a",
    "seed_a",
    "step_a",
    "layer_a",
    "head_a",
    "run_b",
    "model_b",
    "size_b",
    "seed_b",
    "step_b",
    "layer_b",
    "head_b",
    "same_size",
    "qk_spectrum_similarity",
    "qk_spectrum_null_mean",
    "qk_spectrum_z",
    "qk_spectrum_p",
    "ov_spectrum_similarity",
    "ov_spectrum_null_mean",
    "ov_spectrum_z",
    "ov_spectrum_p",
    "profile_similarity",
    "profile_null_mean",
    "profile_z",
    "profile_p",
    "n_null",
    "aligned_head_b",
    "aligned_is_strongest",
    "cka",
    "cka_null_mean",
    "cka_z",
    "cka_p",
    "cka_n_null",
    "cka_aligned_head_b",
    "cka_aligned",
    "cka_note",
]
"""Columns of :func:`configurational_table`, one row per ordered pair of runs (A, B), A != B.

``layer/head_a``, ``layer/head_b``: the strongest 1-back head of each run at its last detail
step (``step_a``/``step_b``). Signatures are compared between A's and B's strongest heads
(the functional match, fixed before looking at any similarity), each against the null of
``n_null`` random head pairs (any head of A x any head of B, the tested pair excluded;
:func:`mechgen.axes.similarity.similarity_vs_random_pairs`): ``*_similarity`` observed,
``*_null_mean``, ``*_z`` = (observed - null mean) / null SD, ``*_p`` = one-sided permutation p.
``qk_spectrum``/``ov_spectrum``: cosine of the L2-normalised singular-value spectra of W_QK /
W_OV (in [0, 1]); ``profile``: Pearson r of the offset profiles (attention to offsets 0..K on
the evaluation text). ``aligned_head_b``: the head of B's strongest layer that Hungarian
alignment (maximising summed profile similarity between the heads of A's and B's strongest
layers) pairs with A's strongest head; ``aligned_is_strongest``: it is B's strongest head.
``cka``: linear CKA of the per-token outputs z of A's and B's strongest heads on the same
evaluation tokens, against CKA of A's strongest with B's seeded random heads (``cka_n_null``
of them, B's tested head excluded should it be one; with n null values the smallest possible
p is 1/(n + 1)); ``cka_aligned_head_b`` / ``cka_aligned``: among B's tested head and its
random heads in B's strongest layer, the one that Hungarian alignment on CKA (against A's
tested head and A's random heads of its layer) pairs with A's strongest, and that CKA
(selected, so not tested). ``cka_note`` says why CKA is NaN (different evaluation tokens, no
detail step, no outputs saved for the head). The same columns compare another mechanism's
strongest heads in ``stats/<mechanism>/configurational.csv`` (``strongest`` of
:func:`configurational_table`).
"""


def _flat_index(layer: int, head: int, n_heads: int) -> int:
    return layer * n_heads + head


def _last_detail(
    circuits: Mapping[tuple[str, int], CircuitResult],
) -> dict[str, tuple[int, CircuitResult]]:
    """Per run: (step, result) of its last detail step, else of its last step."""
    out: dict[str, tuple[int, CircuitResult, bool]] = {}
    for (run, step), result in circuits.items():
        detail = "cka_outputs" in result.arrays
        key = (detail, step)
        if run not in out or key > (out[run][2], out[run][0]):
            out[run] = (step, result, detail)
    return {run: (step, result) for run, (step, result, _) in out.items()}


def cka_random_rows(result: CircuitResult) -> list[int]:
    """The rows of ``cka_outputs`` that hold the seeded random heads (the CKA null):
    ``cka_random``, or rows 1.. in a file written before other mechanisms' heads were stored."""
    if "cka_random" in result.arrays:
        return [int(i) for i in np.flatnonzero(result.arrays["cka_random"])]
    return list(range(1, len(result.arrays["cka_heads"])))


def _cka_columns(
    a: CircuitResult, b: CircuitResult, head_a: tuple[int, int], head_b: tuple[int, int]
) -> dict[str, Any]:
    """The ``cka*`` columns of :data:`CONFIGURATIONAL_COLUMNS` for A's ``head_a`` and B's
    ``head_b`` (the same mechanism's strongest heads)."""
    out: dict[str, Any] = {
        "cka": math.nan,
        "cka_null_mean": math.nan,
        "cka_z": math.nan,
        "cka_p": math.nan,
        "cka_n_null": 0,
        "cka_aligned_head_b": pd.NA,
        "cka_aligned": math.nan,
        "cka_note": "",
    }
    if "cka_outputs" not in a.arrays or "cka_outputs" not in b.arrays:
        out["cka_note"] = "no detail step with head outputs in one of the runs"
        return out
    heads_a = [tuple(map(int, h)) for h in a.arrays["cka_heads"]]
    heads_b = [tuple(map(int, h)) for h in b.arrays["cka_heads"]]
    if head_a not in heads_a or head_b not in heads_b:
        out["cka_note"] = "no outputs saved for this head"
        return out
    if a.record.get("cka_tokens_sha256") != b.record.get("cka_tokens_sha256"):
        out["cka_note"] = "different evaluation tokens (tokenizers); outputs not row-aligned"
        return out
    row_a, row_b = heads_a.index(head_a), heads_b.index(head_b)
    # The tested head, then the random heads (the null; the tested head itself excluded).
    candidates_a = [row_a, *(i for i in cka_random_rows(a) if i != row_a)]
    candidates_b = [row_b, *(j for j in cka_random_rows(b) if j != row_b)]
    outputs_a, outputs_b = a.arrays["cka_outputs"], b.arrays["cka_outputs"]
    test = cka_vs_random_heads(
        outputs_a[row_a], outputs_b[row_b], [outputs_b[j] for j in candidates_b[1:]]
    ).test
    out.update(
        cka=test.observed,
        cka_null_mean=test.null_mean,
        cka_z=test.z,
        cka_p=test.p_value,
        cka_n_null=test.n_null,
    )
    rows_a = sorted(i for i in candidates_a if heads_a[i][0] == head_a[0])
    cols_b = sorted(j for j in candidates_b if heads_b[j][0] == head_b[0])
    cka_matrix = np.array(
        [[linear_cka(outputs_a[i], outputs_b[j]) for j in cols_b] for i in rows_a]
    )
    matched = align_by_similarity(cka_matrix)[rows_a.index(row_a)]
    if matched >= 0:
        out["cka_aligned_head_b"] = heads_b[cols_b[matched]][1]
        out["cka_aligned"] = float(cka_matrix[rows_a.index(row_a), matched])
    return out


def configurational_steps(
    circuits: Mapping[tuple[str, int], CircuitResult],
) -> dict[str, int]:
    """Per run, the step :func:`configurational_table` compares: its last detail step, else its
    last step."""
    return {run: step for run, (step, _) in _last_detail(circuits).items()}


def configurational_table(
    heads: pd.DataFrame,
    circuits: Mapping[tuple[str, int], CircuitResult],
    n_null: int = 1000,
    seed: int = 0,
    strongest: Mapping[tuple[str, int], tuple[int, int]] | None = None,
) -> pd.DataFrame:
    """Strongest 1-back head of every run vs that of every other run (see
    :data:`CONFIGURATIONAL_COLUMNS`).

    ``strongest``: ``{(run, step): (layer, head)}``, another mechanism's strongest head at the
    step compared (:func:`configurational_steps`), in place of the stored strongest 1-back
    head; a run without an entry is left out. CKA needs the head's saved outputs (the
    scoring job saves those of every head-level mechanism's strongest head at a detail step,
    :func:`mechgen.scoring.circuit.mechanism_strongest_heads`): it is NaN (``cka_note``) for a head without them.
    """
    meta = _run_meta(heads).set_index("run")
    chosen = {run: v for run, v in _last_detail(circuits).items() if run in meta.index}
    rows = []
    for run_a, (step_a, a) in chosen.items():
        for run_b, (step_b, b) in chosen.items():
            if run_a == run_b:
                continue
            if strongest is not None and (
                (run_a, step_a) not in strongest or (run_b, step_b) not in strongest
            ):
                continue
            la, ha = (
                strongest[(run_a, step_a)]
                if strongest is not None
                else (int(x) for x in a.arrays["strongest_one_back"])
            )
            lb, hb = (
                strongest[(run_b, step_b)]
                if strongest is not None
                else (int(x) for x in b.arrays["strongest_one_back"])
            )
            n_heads_a = a.arrays["induction"].shape[1]
            n_heads_b = b.arrays["induction"].shape[1]
            pair = (_flat_index(la, ha, n_heads_a), _flat_index(lb, hb, n_heads_b))
            row: dict[str, Any] = {
                "run_a": run_a,
                "model_a": meta.at[run_a, "model"],
                "size_a": meta.at[run_a, "size"],
                "seed_a": meta.at[run_a, "seed"],
                "step_a": step_a,
                "layer_a": la,
                "head_a": ha,
                "run_b": run_b,
                "model_b": meta.at[run_b, "model"],
                "size_b": meta.at[run_b, "size"],
                "seed_b": meta.at[run_b, "seed"],
                "step_b": step_b,
                "layer_b": lb,
                "head_b": hb,
                "same_size": meta.at[run_a, "model"] == meta.at[run_b, "model"],
                "n_null": n_null,
            }
            for name in ("qk_spectrum", "ov_spectrum"):
                sa = a.arrays[name].reshape(-1, a.arrays[name].shape[-1])
                sb = b.arrays[name].reshape(-1, b.arrays[name].shape[-1])
                test = similarity_vs_random_pairs(
                    spectrum_similarity_matrix(sa, sb), pair, n_null, seed
                )
                row.update(
                    {
                        f"{name}_similarity": test.observed,
                        f"{name}_null_mean": test.null_mean,
                        f"{name}_z": test.z,
                        f"{name}_p": test.p_value,
                    }
                )
            pa = a.arrays["offset_profile"]
            pb = b.arrays["offset_profile"]
            profile_sim = profile_similarity_matrix(
                pa.reshape(-1, pa.shape[-1]), pb.reshape(-1, pb.shape[-1])
            )
            test = similarity_vs_random_pairs(profile_sim, pair, n_null, seed)
            row.update(
                profile_similarity=test.observed,
                profile_null_mean=test.null_mean,
                profile_z=test.z,
                profile_p=test.p_value,
            )
            within = profile_similarity_matrix(pa[la], pb[lb])
            match = align_by_similarity(within) if np.isfinite(within).any() else None
            aligned = int(match[ha]) if match is not None and match[ha] >= 0 else None
            row["aligned_head_b"] = aligned if aligned is not None else pd.NA
            row["aligned_is_strongest"] = (aligned == hb) if aligned is not None else pd.NA

            row.update(
                cka=math.nan,
                cka_null_mean=math.nan,
                cka_z=math.nan,
                cka_p=math.nan,
                cka_n_null=0,
                cka_aligned_head_b=pd.NA,
                cka_aligned=math.nan,
                cka_note="",
            )
            row.update(_cka_columns(a, b, (la, ha), (lb, hb)))
            rows.append(row)
    return pd.DataFrame(rows, columns=CONFIGURATIONAL_COLUMNS)


STABILITY_COLUMNS = [
    "suite",
    "model",
    "size",
    "seed",
    "run",
    "step",
    "previous_step",
    "layer",
    "head",
    "qk_cosine",
    "qk_cosine_null_mean",
    "qk_cosine_n_null",
    "identity_fixed_from_step",
]
"""Columns of :func:`stability_table`: one row per run and consecutive checkpoint pair.

(layer, head) = the strongest 1-back head at ``step``; ``qk_cosine`` = cosine of its W_QK at
``previous_step`` and at ``step`` (:func:`mechgen.axes.similarity.qk_cosine`; NaN if the head
was not among the ``qk_top_k`` heads saved at ``previous_step``); null: the mean cosine of its
W_QK at ``step`` with the other saved heads at ``previous_step`` (``qk_cosine_n_null`` of
them). ``identity_fixed_from_step``: the first step from which the strongest head stays the
same head to the end (:func:`mechgen.axes.similarity.identity_fixed_from`), per run.
"""


def stability_table(
    heads: pd.DataFrame, circuits: Mapping[tuple[str, int], CircuitResult]
) -> pd.DataFrame:
    """W_QK stability of the strongest 1-back head over training (see :data:`STABILITY_COLUMNS`)."""

    traj = trajectories(heads, "one_back")
    rows = []
    for run, run_traj in traj.groupby("run", sort=False):
        run_traj = run_traj.sort_values("step")
        fixed_from = identity_fixed_from(run_traj)
        factors: dict[int, dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]] = {}
        for step in run_traj["step"]:
            result = circuits.get((run, int(step)))
            if result is None:
                continue
            saved = [tuple(map(int, h)) for h in result.arrays["qk_heads"]]
            factors[int(step)] = {
                h: (result.arrays["qk_q"][i], result.arrays["qk_k"][i]) for i, h in enumerate(saved)
            }
        steps = run_traj["step"].to_numpy()
        for previous, (_, now) in zip(steps[:-1], run_traj.iloc[1:].iterrows()):
            head = (int(now["argmax_layer"]), int(now["argmax_head"]))
            current = factors.get(int(now["step"]), {}).get(head)
            before = factors.get(int(previous), {})
            cosine = (
                qk_cosine(before[head], current)
                if current is not None and head in before
                else math.nan
            )
            null = (
                [qk_cosine(f, current) for h, f in before.items() if h != head]
                if current is not None
                else []
            )
            rows.append(
                {
                    **{c: now[c] for c in ("suite", "model", "size", "seed", "run")},
                    "step": int(now["step"]),
                    "previous_step": int(previous),
                    "layer": head[0],
                    "head": head[1],
                    "qk_cosine": cosine,
                    "qk_cosine_null_mean": float(np.mean(null)) if null else math.nan,
                    "qk_cosine_n_null": len(null),
                    "identity_fixed_from_step": fixed_from,
                }
            )
    return pd.DataFrame(rows, columns=STABILITY_COLUMNS)
