"""Every catalog mechanism through the axes, and what no single-mechanism analysis reports.

Table-side (pandas, no torch). Input: the per-head table (``heads.parquet``) and the per-layer
table (``layers.parquet``), whose column ``Mechanism.score_column`` holds a mechanism's score
(a head-unit mechanism's in heads.parquet, a layer-unit mechanism's in layers.parquet); a
mechanism whose column is absent (or all NaN) is *not scored*: it gets a ``not scored`` row in
the profile, header-only tables and a logged reason, never an error.

Units. Every analysis below runs on *units*: the heads of a head-unit mechanism; for a
layer-unit mechanism, its layers, each a row with ``head = 0`` (the layer itself), so that "the
strongest head" reads "the strongest layer" and ``final_head`` is 0. The analyses that need a
layer's heads say "not applicable: layer unit": the Hungarian head alignment (NaN), head sharing
(:func:`order_table`) and the configurational comparison (no head weights; the rule's script
leaves its table header-only); the profile's ``note`` says so.

Normalised scale. Per run, ``z = (score - null) / (ceiling - null)``
(:meth:`mechgen.mechanisms.Mechanism.normalised`; ``null`` from ``Mechanism.null(table,
NullContext)``): 0 = the null (uniform attention, chance), 1 = a perfect head. A run's
*trajectory* is, per checkpoint, the max of z over all heads of all layers (the max of the raw
score, normalised, since z rises with the score).

Per mechanism (``stats/<mechanism>/``):

- *functional*: per run x step, the heads meeting the criterion
  (:meth:`Mechanism.meets_criterion`: score >= multiple x null and, with a control, control <
  fraction x score); per size, the fraction of runs with such a head at their final step, with
  the Wilson interval (:func:`mechgen.stats.analysis.wilson_interval`);
- *positional*: per run the strongest head at the final step, its relative depth
  ``(layer + 1) / n_layers``; per size the modal-layer share and the mean |layer difference|
  against uniform layers (:func:`mechgen.axes.positional.layer_agreement`), and the Hungarian head
  alignment of the seeds' strongest heads (:func:`head_alignment`);
- *developmental*: onset, slope and peak of the normalised trajectory
  (:func:`mechgen.axes.developmental.per_seed_from_trajectories`); the onset thresholds are the
  config's ``analysis.onset_thresholds`` read in normalised units per decade of steps (so the
  same rise means the same for every mechanism). A mechanism with ``absolute_thresholds``
  (previous-token) also gets the study's onset on its raw score (``onset_absolute_step``);
- *convergence*: Pearson r of the normalised trajectories within and between sizes
  (:mod:`mechgen.axes.convergence`).

A run's mechanism is *formed* when it has a head meeting the criterion at the run's final step
and its onset is defined; otherwise it *never formed* (kept apart from a late onset in every
count below).

Across mechanisms (``stats/mechanism_order.csv``, ``stats/mechanism_lags.csv``): see
:func:`order_table`, :func:`lag_table`, :func:`kendalls_w`, :func:`seed_speed`,
:func:`head_sharing`. The generalizability profile (``stats/profile.csv``): :func:`profile`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mechgen.axes import convergence, positional
from mechgen.axes.developmental import DEFAULT_THRESHOLDS, per_seed_from_trajectories, trajectories
from mechgen.mechanisms import Mechanism, NullContext
from mechgen.mechanisms.base import strongest_rows
from mechgen.schema import RUN_SHAPE_COLUMNS
from mechgen.stats.analysis import REGRESSION_COLUMNS, fit_mixed, wilson_interval

log = logging.getLogger(__name__)

RUN_COLUMNS = RUN_SHAPE_COLUMNS
ALL_SIZES = "all"
"""The ``size`` (and ``model``) of a profile row over every size."""

MECHANISM_TABLES = (
    "functional_run_step",
    "functional_size",
    "per_seed",
    "positional_size",
    "convergence",
    "configurational",
)
"""The tables of ``stats/<mechanism>/``, by file stem. ``configurational`` is written by the
rule's script from the circuit files (:func:`mechgen.axes.circuit_tables.configurational_table` on the
mechanism's strongest heads, :func:`strongest_at`); :func:`analyze_mechanisms` leaves it
header-only."""

TABLE_COLUMNS: dict[str, list[str]] = {
    "functional_run_step": RUN_COLUMNS
    + [
        "step",
        "tokens_seen",
        "null",
        "n_heads_scored",
        "n_qualifying",
        "has_qualifying",
        "max_score",
        "max_normalised",
    ],
    "functional_size": [
        "suite",
        "model",
        "size",
        "n_params",
        "n_runs",
        "n_runs_qualifying",
        "fraction_qualifying",
        "ci_low",
        "ci_high",
        "confidence",
    ],
    "per_seed": RUN_COLUMNS
    + [
        "null",
        "n_checkpoints",
        "peak",
        "peak_step",
        "slope",
        "onset_step",
        "onset_tokens",
        "onset_n_thresholds",
        "onset_absolute_step",
        "final_step",
        "final_score",
        "final_normalised",
        "final_layer",
        "final_head",
        "final_relative_depth",
        "qualifying_final",
        "formed",
    ],
    "positional_size": [
        "suite",
        "model",
        "size",
        "n_params",
        "n_layers",
        "n_seeds",
        "modal_layer",
        "modal_share",
        "mean_abs_layer_diff",
        "null_mean_abs_layer_diff",
        "p_value",
        "mean_relative_depth",
        "same_layer_fraction",
        "head_match_fraction",
        "head_match_chance",
        "alignment_cost",
    ],
    "convergence": [
        "model",
        "within_r_mean",
        "within_r_sd",
        "within_n_pairs",
        "between_r_mean",
        "between_r_sd",
        "between_n_pairs",
    ],
}
"""Columns of each ``stats/<mechanism>/<name>.csv``."""

ORDER_COLUMNS = [
    "analysis",
    "model",
    "size",
    "n_params",
    "run",
    "seed",
    "mechanism_a",
    "mechanism_b",
    "estimate",
    "ci_low",
    "ci_high",
    "p_value",
    "n",
    "count",
    "detail",
]
"""Columns of ``stats/mechanism_order.csv`` (one statistic per row; ``analysis`` says which)."""

LAG_COLUMNS = ["mechanism_a", "mechanism_b"] + REGRESSION_COLUMNS
"""Columns of ``stats/mechanism_lags.csv``: the regressions table with the pair."""

PROFILE_AXES = [
    "fraction_qualifying",
    "layer_modal_share",
    "onset_cv",
    "within_r",
    "between_r",
    "link_layer_order",
    "link_onset_order",
    "configurational_z",
]
"""The profile's one summary per axis (the heatmap's columns)."""

PROFILE_COLUMNS = [
    "mechanism",
    "model",
    "size",
    "n_params",
    "scored",
    "note",
    "n_runs",
    "n_runs_qualifying",
    "fraction_qualifying",
    "fraction_ci_low",
    "fraction_ci_high",
    "layer_modal_share",
    "depth_mean_abs_diff",
    "depth_null_mean_abs_diff",
    "depth_p_value",
    "n_formed",
    "onset_cv",
    "within_r",
    "between_r",
    "n_link_runs",
    "link_layer_order",
    "link_onset_order",
    "link_ablation",
    "configurational_z",
]
"""Columns of ``stats/profile.csv``."""


@dataclass
class Scored:
    """One mechanism's per-unit rows (``heads``: id columns, ``score``, ``control``, ``null``,
    ``normalised``, ``qualifies``; a layer-unit mechanism's layers with ``head`` 0) and its
    per-mechanism tables; or ``note`` why it is not scored."""

    mechanism: Mechanism
    heads: pd.DataFrame = field(default_factory=pd.DataFrame)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    note: str = ""


LAYER_UNIT_NOTE = "not applicable: layer unit"
"""What the analyses that need a layer's heads say of a layer-unit mechanism."""


def scored_heads(
    heads: pd.DataFrame,
    mechanism: Mechanism,
    context: NullContext,
    layers: pd.DataFrame | None = None,
) -> Scored:
    """The units of ``mechanism`` with a finite score (and no ``nonfinite`` flag), with the
    null, the normalised score and the criterion; or a :class:`Scored` whose ``note`` says why
    the mechanism cannot be scored (an absent or all-NaN column, a null that needs settings the
    suite lacks). The units are the rows of ``heads`` for a head-unit mechanism, those of
    ``layers`` (``layers.parquet``; None: the suite has none) with ``head = 0`` for a
    layer-unit one."""
    if mechanism.unit == "layer":
        if layers is None:
            return Scored(mechanism, note="no layers.parquet in this suite")
        heads = layers.assign(head=0)
    source = f"{mechanism.unit}s.parquet"
    column = mechanism.score_column
    if column not in heads.columns:
        return Scored(mechanism, note=f"column {column!r} not in {source}")
    usable = np.isfinite(heads[column].to_numpy(dtype=float))
    if "nonfinite" in heads.columns:
        usable &= ~heads["nonfinite"].fillna(False).to_numpy(dtype=bool)
    table = heads.loc[usable].copy()
    if table.empty:
        return Scored(mechanism, note=f"column {column!r} has no finite value")
    if mechanism.control_column is not None and mechanism.control_column not in table.columns:
        return Scored(mechanism, note=f"control column {mechanism.control_column!r} absent")
    try:
        null = mechanism.null(table, context)
    except (KeyError, ValueError) as exc:
        return Scored(mechanism, note=f"no null: {exc}")
    keep = [c for c in RUN_COLUMNS + ["step", "tokens_seen", "layer", "head"] if c in table]
    out = table[keep].copy()
    if "suite" not in out:
        out["suite"] = ""
    out["score"] = table[column].to_numpy(dtype=float)
    out["control"] = (
        table[mechanism.control_column].to_numpy(dtype=float)
        if mechanism.control_column
        else np.nan
    )
    out["null"] = out["run"].map(null).astype(float)
    out["normalised"] = mechanism.normalised(out["score"], out["null"])
    out["qualifies"] = mechanism.meets_criterion(
        out["score"], out["null"], out["control"] if mechanism.control_column else None
    )
    return Scored(mechanism, heads=out.reset_index(drop=True))


def functional_tables(scored: pd.DataFrame, confidence: float) -> dict[str, pd.DataFrame]:
    """Per run x step the heads meeting the criterion; per size the fraction of runs with one
    at the run's final step (Wilson CI at ``confidence``)."""
    per_step = (
        scored.groupby(RUN_COLUMNS + ["step", "tokens_seen", "null"], sort=False)
        .agg(
            n_heads_scored=("score", "size"),
            n_qualifying=("qualifies", "sum"),
            max_score=("score", "max"),
            max_normalised=("normalised", "max"),
        )
        .reset_index()
    )
    per_step["n_qualifying"] = per_step["n_qualifying"].astype(int)
    per_step["has_qualifying"] = per_step["n_qualifying"] > 0
    per_step = per_step.sort_values(["n_params", "model", "seed", "step"], kind="stable")
    final = per_step.loc[per_step.groupby("run")["step"].idxmax()]
    rows = []
    for (model, size), group in final.groupby(["model", "size"], sort=False):
        n, k = len(group), int(group["has_qualifying"].sum())
        low, high = wilson_interval(k, n, confidence)
        rows.append(
            {
                "suite": group["suite"].iloc[0],
                "model": model,
                "size": size,
                "n_params": int(group["n_params"].iloc[0]),
                "n_runs": n,
                "n_runs_qualifying": k,
                "fraction_qualifying": k / n,
                "ci_low": low,
                "ci_high": high,
                "confidence": confidence,
            }
        )
    per_size = pd.DataFrame(rows, columns=TABLE_COLUMNS["functional_size"])
    return {
        "functional_run_step": per_step[TABLE_COLUMNS["functional_run_step"]].reset_index(
            drop=True
        ),
        "functional_size": per_size.sort_values("n_params", kind="stable").reset_index(drop=True),
    }


def normalised_trajectories(scored: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per run and step the max over heads of the normalised score (``value``), and of the raw
    score (:func:`mechgen.axes.developmental.trajectories`, ties to the lowest layer, then head)."""
    return trajectories(scored, "normalised"), trajectories(scored, "score")


def per_seed_table(
    scored: pd.DataFrame,
    mechanism: Mechanism,
    thresholds: np.ndarray,
    tokens_per_step: int,
    absolute_thresholds: np.ndarray | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per run: onset, slope and peak of the normalised trajectory (``thresholds`` in
    normalised units per decade), the strongest head at the final step, whether a head meets the
    criterion there (``qualifying_final``) and ``formed`` (that, and a defined onset). With
    ``mechanism.absolute_thresholds`` and ``absolute_thresholds`` given, ``onset_absolute_step``
    is the study's onset on the raw score. Returns (table, normalised trajectories)."""
    norm, raw = normalised_trajectories(scored)
    summary = per_seed_from_trajectories(norm, thresholds, tokens_per_step).set_index("run")
    table = summary.rename(columns={"final_value": "final_normalised"})
    if mechanism.absolute_thresholds and absolute_thresholds is not None:
        absolute = per_seed_from_trajectories(raw, absolute_thresholds, tokens_per_step)
        table["onset_absolute_step"] = absolute.set_index("run")["onset_step"]
    else:
        table["onset_absolute_step"] = np.nan
    final_raw = raw.loc[raw.groupby("run")["step"].idxmax()].set_index("run")
    table["final_score"] = final_raw["value"]
    last = scored[scored["step"] == scored.groupby("run")["step"].transform("max")]
    table["qualifying_final"] = last.groupby("run")["qualifies"].any()
    table["null"] = scored.groupby("run")["null"].first()
    table["formed"] = table["qualifying_final"] & table["onset_step"].notna()
    table = table.reset_index()
    if "suite" not in table:
        table["suite"] = ""
    return table[TABLE_COLUMNS["per_seed"]], norm


def positional_table(
    per_seed: pd.DataFrame,
    rng: np.random.Generator,
    n_permutations: int,
    scored: pd.DataFrame | None = None,
    cost: positional.AlignmentCost = "euclidean",
) -> pd.DataFrame:
    """Per size: agreement of the final strongest head's layer across seeds
    (:func:`mechgen.axes.positional.layer_agreement`), the mean relative depth and, with the
    mechanism's per-head rows ``scored``, the head-level agreement of :func:`head_alignment`
    (NaN without them)."""
    alignment = (
        head_alignment(scored, per_seed, cost)
        if scored is not None
        else pd.DataFrame(columns=["same_layer_fraction", "head_match_fraction"])
    )
    rows = []
    for (model, size), group in per_seed.groupby(["model", "size"], sort=False):
        n_layers = int(group["n_layers"].iloc[0])
        agreement = positional.layer_agreement(
            group["final_layer"].astype(int), n_layers, rng, n_permutations
        )
        same_layer = alignment["same_layer_fraction"].get(model, np.nan)
        rows.append(
            {
                "suite": group["suite"].iloc[0],
                "model": model,
                "size": size,
                "n_params": int(group["n_params"].iloc[0]),
                "n_layers": n_layers,
                **agreement,
                "mean_relative_depth": float(group["final_relative_depth"].mean()),
                "same_layer_fraction": same_layer,
                "head_match_fraction": alignment["head_match_fraction"].get(model, np.nan),
                "head_match_chance": same_layer / int(group["n_heads"].iloc[0]),
                "alignment_cost": cost if scored is not None else "",
            }
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS["positional_size"])


def head_alignment(
    scored: pd.DataFrame, per_seed: pd.DataFrame, cost: positional.AlignmentCost = "euclidean"
) -> pd.DataFrame:
    """Per size (index ``model``), over the unordered pairs of its runs: the fraction whose
    final strongest heads (``per_seed``'s ``final_layer``, ``final_head``) share a layer
    (``same_layer_fraction``), and the fraction where, in addition, the Hungarian alignment of
    that layer's heads on their score trajectories (:func:`mechgen.axes.positional.align_heads` on
    the column ``score`` of ``scored``, the ``cost`` of ``analysis.positional.alignment_cost``)
    pairs the two strongest heads (``head_match_fraction``); see :mod:`mechgen.axes.positional`.
    NaN for a size with a single run."""
    rows = {}
    by_run = {run: group for run, group in scored.groupby("run", sort=False)}
    for model, group in per_seed.groupby("model", sort=False):
        best = group.set_index("run")[["final_layer", "final_head"]].astype(int)
        pairs = list(itertools.combinations(sorted(best.index), 2))
        same_layer = head_match = 0
        for run_a, run_b in pairs:
            layer_a, head_a = best.loc[run_a]
            layer_b, head_b = best.loc[run_b]
            if layer_a != layer_b:
                continue
            same_layer += 1
            match = positional.align_heads(
                by_run[run_a], by_run[run_b], int(layer_a), "score", cost
            )
            head_match += int(match[int(head_a)] == head_b)
        rows[model] = {
            "same_layer_fraction": same_layer / len(pairs) if pairs else np.nan,
            "head_match_fraction": head_match / len(pairs) if pairs else np.nan,
        }
    return pd.DataFrame.from_dict(
        rows, orient="index", columns=["same_layer_fraction", "head_match_fraction"]
    )


def convergence_table(norm_traj: pd.DataFrame) -> pd.DataFrame:
    """Within- and between-size mean r of the normalised trajectories
    (:func:`mechgen.axes.convergence.size_correlations`); empty with fewer than 2 runs or 3 shared
    checkpoints."""
    try:
        pairs = convergence.pairwise_correlations(norm_traj)
    except ValueError as exc:
        log.info("no convergence table: %s", exc)
        return pd.DataFrame(columns=TABLE_COLUMNS["convergence"])
    return convergence.size_correlations(pairs)[TABLE_COLUMNS["convergence"]]


def depth_agreement(
    layers: Sequence[int], n_layers: Sequence[int], rng: np.random.Generator, n_permutations: int
) -> tuple[float, float, float]:
    """Mean over run pairs of |relative depth difference| (depth = (layer + 1) / n_layers),
    its mean under the null that each run's layer is uniform on 0..n_layers-1 (runs may have
    different depths), and the one-sided Monte-Carlo p = (1 + #null <= observed) / (1 + n).
    NaN with fewer than 2 runs."""
    layers = np.asarray(layers, dtype=float)
    n_layers = np.asarray(n_layers, dtype=float)
    if layers.size < 2:
        return float("nan"), float("nan"), float("nan")
    observed = float(positional.mean_abs_pairwise_difference((layers + 1) / n_layers))
    draws = rng.integers(0, n_layers.astype(int), size=(n_permutations, layers.size))
    null = positional.mean_abs_pairwise_difference((draws + 1) / n_layers)
    p = (1 + np.sum(null <= observed + 1e-12)) / (1 + n_permutations)
    return observed, float(np.mean(null)), float(p)


# ---- across mechanisms -------------------------------------------------------------------


def onset_matrix(per_seed: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Runs x mechanisms: the normalised onset step where the mechanism formed, NaN where it
    never formed; with the run's model, size, seed and n_params as the index."""
    columns = {}
    info = None
    for name, table in per_seed.items():
        indexed = table.set_index("run")
        columns[name] = indexed["onset_step"].where(indexed["formed"].astype(bool))
        info = indexed[["model", "size", "seed", "n_params"]] if info is None else info
    if info is None:
        return pd.DataFrame()
    matrix = pd.DataFrame(columns)
    return matrix.join(info).reset_index().set_index(["run", "model", "size", "seed", "n_params"])


def ordering(onsets: Mapping[str, float]) -> str:
    """A run's onset order as text: formed mechanisms by onset, ``<`` between and ``=`` for a
    tie, then ``| never: a, b`` for those that never formed (alphabetical)."""
    formed = sorted((v, k) for k, v in onsets.items() if np.isfinite(v))
    text = ""
    for i, (value, name) in enumerate(formed):
        if i:
            text += " = " if value == formed[i - 1][0] else " < "
        text += name
    never = sorted(k for k, v in onsets.items() if not np.isfinite(v))
    if never:
        text += (" | " if text else "| ") + "never: " + ", ".join(never)
    return text


def kendalls_w(ranks: np.ndarray) -> float:
    """Kendall's coefficient of concordance W of ``ranks`` (m raters x n objects; each row the
    ranks 1..n an object gets from one rater, average ranks for ties), with the tie correction:
    ``W = 12 S / (m^2 (n^3 - n) - m sum_j T_j)``, ``S = sum_i (R_i - m (n + 1) / 2)^2`` over the
    objects' rank sums R_i, ``T_j = sum (t^3 - t)`` over the tie groups of rater j. 1 = every
    rater gives the same order, 0 = no agreement. NaN with fewer than 2 raters or objects, or
    when every rater ties everything."""
    ranks = np.asarray(ranks, dtype=float)
    if ranks.ndim != 2 or ranks.shape[0] < 2 or ranks.shape[1] < 2:
        return float("nan")
    m, n = ranks.shape
    s = float(np.sum((ranks.sum(axis=0) - m * (n + 1) / 2) ** 2))
    ties = 0.0
    for row in ranks:
        _, counts = np.unique(row, return_counts=True)
        ties += float(np.sum(counts**3 - counts))
    denominator = m**2 * (n**3 - n) - m * ties
    return 12 * s / denominator if denominator > 0 else float("nan")


def _within_size_ranks(matrix: pd.DataFrame) -> pd.DataFrame:
    """Each mechanism's onsets ranked within each size (average ranks), so that the sizes'
    different onset scales do not pass for a shared seed speed."""
    return matrix.groupby(level="size", sort=False).rank(method="average")


def _mean_pair_spearman(ranks: np.ndarray) -> np.ndarray:
    """Mean over mechanism pairs of the Pearson r of within-size ranks (a Spearman rho), for
    ``ranks`` of shape (..., runs, mechanisms); pairs with a constant column are left out."""
    ranks = np.asarray(ranks, dtype=float)
    centred = ranks - ranks.mean(axis=-2, keepdims=True)
    norms = np.sqrt((centred**2).sum(axis=-2))
    total = np.zeros(ranks.shape[:-2])
    count = np.zeros(ranks.shape[:-2])
    for a, b in itertools.combinations(range(ranks.shape[-1]), 2):
        denominator = norms[..., a] * norms[..., b]
        ok = denominator > 0
        r = np.where(
            ok,
            (centred[..., a] * centred[..., b]).sum(axis=-1) / np.where(ok, denominator, 1.0),
            0.0,
        )
        total += r
        count += ok
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def seed_speed(
    matrix: pd.DataFrame, rng: np.random.Generator, n_permutations: int
) -> tuple[float, float, int]:
    """Is a seed that is early for one mechanism early for the others?

    Over the runs where every mechanism formed: each mechanism's onsets ranked within size, then
    the mean over mechanism pairs of Spearman's rho across runs. Null: each mechanism's ranks
    permuted among the runs of a size independently (no shared seed speed); one-sided
    Monte-Carlo p = (1 + #null >= observed) / (1 + n_permutations). Returns (rho, p, runs);
    NaN with fewer than 2 mechanisms or 3 runs."""
    complete = matrix.dropna()
    if complete.shape[1] < 2 or len(complete) < 3:
        return float("nan"), float("nan"), len(complete)
    ranks = _within_size_ranks(complete)
    values = ranks.to_numpy(dtype=float)
    observed = float(_mean_pair_spearman(values))
    if not np.isfinite(observed):
        return observed, float("nan"), len(complete)
    sizes = ranks.index.get_level_values("size")
    shuffled = np.broadcast_to(values, (n_permutations, *values.shape)).copy()
    for size in sizes.unique():
        rows = np.flatnonzero(sizes == size)
        for col in range(values.shape[1]):
            # One independent permutation of the size's rows per draw (argsort of uniforms).
            order = np.argsort(rng.random((n_permutations, rows.size)), axis=1)
            shuffled[:, rows, col] = values[rows[order], col]
    null = _mean_pair_spearman(shuffled)
    exceed = int(np.sum(np.isfinite(null) & (null >= observed - 1e-12)))
    return observed, (1 + exceed) / (1 + n_permutations), len(complete)


def strongest_qualifying(scored: pd.DataFrame) -> pd.DataFrame:
    """Per run, at its final step: the set of heads meeting the criterion (``heads``, a
    frozenset of (layer, head)) and the strongest of them (``best``, or None)."""
    last = scored[scored["step"] == scored.groupby("run")["step"].transform("max")]
    rows = {}
    for run, group in last.groupby("run"):
        q = group[group["qualifies"]].sort_values(
            ["score", "layer", "head"], ascending=[False, True, True]
        )
        rows[run] = {
            "heads": frozenset(zip(q["layer"].astype(int), q["head"].astype(int))),
            "best": (int(q["layer"].iloc[0]), int(q["head"].iloc[0])) if len(q) else None,
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def head_sharing(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Per run where both mechanisms have a head meeting their criterion at the final step:
    ``same_best`` (their strongest qualifying heads are one head) and ``jaccard`` = |A and B|
    / |A or B| of their qualifying head sets."""
    runs = [
        r
        for r in a.index.intersection(b.index)
        if a.loc[r, "best"] is not None and b.loc[r, "best"] is not None
    ]
    rows = [
        {
            "run": r,
            "same_best": a.loc[r, "best"] == b.loc[r, "best"],
            "jaccard": len(a.loc[r, "heads"] & b.loc[r, "heads"])
            / len(a.loc[r, "heads"] | b.loc[r, "heads"]),
        }
        for r in runs
    ]
    return pd.DataFrame(rows, columns=["run", "same_best", "jaccard"])


def _row(analysis: str, **values: object) -> dict[str, object]:
    return {"analysis": analysis, **values}


def order_table(
    per_seed: Mapping[str, pd.DataFrame],
    qualifying: Mapping[str, pd.DataFrame],
    confidence: float,
    rng: np.random.Generator,
    n_permutations: int,
) -> pd.DataFrame:
    """``stats/mechanism_order.csv``: one statistic per row (:data:`ORDER_COLUMNS`).

    ``analysis``:

    - ``onset`` (per run x mechanism): ``estimate`` = normalised onset step; ``detail`` =
      formed / never formed;
    - ``ordering`` (per run): ``detail`` = :func:`ordering`; ``count`` = mechanisms never formed;
    - ``distinct_orderings`` (per size and all): ``count`` distinct orderings over ``n`` runs
      (a never-formed mechanism is part of the ordering);
    - ``kendall_w`` (per size): :func:`kendalls_w` across the seeds where every mechanism
      formed (``n`` of them; ``count`` = runs left out because a mechanism never formed);
    - ``before`` (per size and all, per ordered pair a, b): ``estimate`` = P(a before b) = runs
      with onset a < onset b / ``n`` runs where both formed, Wilson CI; ``count`` = those runs;
      ``detail`` gives ties and the runs where only a, only b or neither formed;
    - ``seed_speed`` (all): :func:`seed_speed` rho and permutation p;
    - ``head_sharing`` (per size and all, per pair): ``estimate`` = fraction of runs, of ``n``
      with a qualifying head of both, whose strongest qualifying heads are one head (Wilson CI);
      ``detail`` = mean Jaccard of the qualifying head sets; for a pair with a layer-unit
      mechanism (absent from ``qualifying``), ``estimate`` NaN and ``detail``
      :data:`LAYER_UNIT_NOTE`.
    """
    names = list(per_seed)
    matrix = onset_matrix(per_seed)
    rows: list[dict[str, object]] = []
    if matrix.empty:
        return pd.DataFrame(columns=ORDER_COLUMNS)
    orderings = {}
    for (run, model, size, seed, n_params), onsets in matrix.iterrows():
        ids = {"model": model, "size": size, "n_params": n_params, "run": run, "seed": seed}
        for name in names:
            formed = np.isfinite(onsets[name])
            rows.append(
                _row(
                    "onset",
                    **ids,
                    mechanism_a=name,
                    estimate=onsets[name],
                    detail="formed" if formed else "never formed",
                )
            )
        orderings[run] = ordering(onsets.to_dict())
        rows.append(_row("ordering", **ids, detail=orderings[run], count=int(onsets.isna().sum())))
    by_size = list(matrix.groupby(level=["model", "size"], sort=False))
    scopes = by_size + ([((ALL_SIZES, ALL_SIZES), matrix)] if len(by_size) > 1 else [])
    for (model, size), sub in scopes:
        runs = sub.index.get_level_values("run")
        n_params = sub.index.get_level_values("n_params")[0] if size != ALL_SIZES else np.nan
        ids = {"model": model, "size": size, "n_params": n_params}
        rows.append(
            _row("distinct_orderings", **ids, n=len(runs), count=len({orderings[r] for r in runs}))
        )
        if size != ALL_SIZES:
            complete = sub.dropna()
            ranks = complete.rank(axis=1, method="average").to_numpy()
            rows.append(
                _row(
                    "kendall_w",
                    **ids,
                    estimate=kendalls_w(ranks),
                    n=len(complete),
                    count=len(sub) - len(complete),
                )
            )
        for a, b in itertools.permutations(names, 2):
            x, y = sub[a].to_numpy(), sub[b].to_numpy()
            both = np.isfinite(x) & np.isfinite(y)
            before = int(np.sum(x[both] < y[both]))
            ties = int(np.sum(x[both] == y[both]))
            low, high = wilson_interval(before, int(both.sum()), confidence)
            detail = (
                f"ties={ties}; only_a={int(np.sum(np.isfinite(x) & ~np.isfinite(y)))}; "
                f"only_b={int(np.sum(~np.isfinite(x) & np.isfinite(y)))}; "
                f"neither={int(np.sum(~np.isfinite(x) & ~np.isfinite(y)))}"
            )
            rows.append(
                _row(
                    "before",
                    **ids,
                    mechanism_a=a,
                    mechanism_b=b,
                    estimate=before / both.sum() if both.any() else np.nan,
                    ci_low=low,
                    ci_high=high,
                    n=int(both.sum()),
                    count=before,
                    detail=detail,
                )
            )
        for a, b in itertools.combinations(names, 2):
            if a not in qualifying or b not in qualifying:
                rows.append(
                    _row(
                        "head_sharing",
                        **ids,
                        mechanism_a=a,
                        mechanism_b=b,
                        estimate=np.nan,
                        detail=LAYER_UNIT_NOTE,
                    )
                )
                continue
            shared = head_sharing(
                qualifying[a].reindex(runs).dropna(how="all"),
                qualifying[b].reindex(runs).dropna(how="all"),
            )
            k = int(shared["same_best"].sum())
            low, high = wilson_interval(k, len(shared), confidence)
            rows.append(
                _row(
                    "head_sharing",
                    **ids,
                    mechanism_a=a,
                    mechanism_b=b,
                    estimate=k / len(shared) if len(shared) else np.nan,
                    ci_low=low,
                    ci_high=high,
                    n=len(shared),
                    count=k,
                    detail=f"mean_jaccard={shared['jaccard'].mean():.3g}",
                )
            )
    rho, p, n = seed_speed(matrix, rng, n_permutations)
    rows.append(
        _row(
            "seed_speed",
            model=ALL_SIZES,
            size=ALL_SIZES,
            estimate=rho,
            p_value=p,
            n=n,
            detail="mean Spearman rho of within-size onset ranks over mechanism pairs",
        )
    )
    table = pd.DataFrame(rows, columns=ORDER_COLUMNS)
    for col in ("seed", "n", "count", "n_params"):
        table[col] = pd.to_numeric(table[col]).astype("Int64")
    return table


def lag_table(per_seed: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """``stats/mechanism_lags.csv``: per pair (a, b) of mechanisms (catalog order), over the runs
    where both formed, ``lag = onset_b - onset_a`` (steps, normalised onsets) regressed as
    ``lag ~ log10(n_params) + (1|seed)`` (REML, :func:`mechgen.stats.analysis.fit_mixed`; a skipped fit
    says why, e.g. a single seed)."""
    matrix = onset_matrix(per_seed)
    tables = []
    for a, b in itertools.combinations(list(per_seed), 2):
        data = matrix[[a, b]].dropna().reset_index()
        data["lag"] = data[b] - data[a]
        data["log10_n_params"] = np.log10(data["n_params"].astype(float))
        fit = fit_mixed(
            data,
            "lag ~ log10_n_params",
            ["seed"],
            reml=True,
            analysis=f"lag_{a}_{b}",
            display_formula=f"lag({b} - {a}) ~ log10(n_params) + (1|seed)",
            term_names={"Intercept": "(Intercept)", "log10_n_params": "log10(n_params)"},
        )
        tables.append(fit.table().assign(mechanism_a=a, mechanism_b=b))
    if not tables:
        return pd.DataFrame(columns=LAG_COLUMNS)
    return pd.concat(tables, ignore_index=True)[LAG_COLUMNS]


# ---- the generalizability profile ----------------------------------------------------------


def _link_holds(
    per_seed: Mapping[str, pd.DataFrame],
    name: str,
    links: Sequence[tuple[str, str]],
    runs: pd.Index,
) -> tuple[int, float, float]:
    """Over the runs ``runs`` and the declared links joining ``name`` to another scored
    mechanism: (number of run x link pairs with both formed, fraction where the source's
    strongest final head sits in an earlier layer than the target's, fraction where the
    source's onset is earlier)."""
    layer, onset = [], []
    for source, target in links:
        if name not in (source, target) or source not in per_seed or target not in per_seed:
            continue
        s = per_seed[source].set_index("run").reindex(runs)
        t = per_seed[target].set_index("run").reindex(runs)
        both = (s["formed"].fillna(False) & t["formed"].fillna(False)).astype(bool)
        layer += list((s.loc[both, "final_layer"] < t.loc[both, "final_layer"]).to_numpy())
        onset += list((s.loc[both, "onset_step"] < t.loc[both, "onset_step"]).to_numpy())
    if not layer:
        return 0, float("nan"), float("nan")
    return len(layer), float(np.mean(layer)), float(np.mean(onset))


def profile(
    results: Mapping[str, Scored],
    confidence: float,
    rng: np.random.Generator,
    n_permutations: int,
    relational: pd.DataFrame | None = None,
    configurational: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """``stats/profile.csv``: one row per mechanism x size, and per mechanism over all sizes
    (``size`` = ``all``); a mechanism not scored has one row, ``scored`` False, with the reason
    in ``note``; a scored layer-unit mechanism's ``note`` says that configurational and head
    sharing are not applicable (:data:`LAYER_UNIT_NOTE`). Columns :data:`PROFILE_COLUMNS`, one
    summary per axis:

    - functional: ``fraction_qualifying`` of runs with a head meeting the criterion at their
      final step (Wilson CI);
    - positional: ``layer_modal_share`` (share of seeds whose final strongest head sits in the
      size's modal layer; for ``all``, its mean over sizes weighted by runs), and the relative-depth
      agreement against uniform layers (:func:`depth_agreement`);
    - developmental: ``onset_cv`` = SD / mean of the normalised onsets of the formed runs;
      ``within_r`` / ``between_r``: mean trajectory r within and between sizes;
    - relational: over the declared links joining the mechanism to another scored one, the
      fraction of (run, link) pairs, both formed, where the layer order and the onset order hold;
      ``link_ablation``: fraction of runs with ``drop_exceeds_control`` in ``relational``
      (``stats/relational.csv``, the previous_token -> induction link only);
    - configurational: ``configurational_z``, the mean ``profile_z`` of ``configurational``
      (``stats/configurational.csv``, which compares the strongest previous-token heads; same-size
      pairs for a size row, all pairs for ``all``); NaN for the other mechanisms here, which the
      rule's script then fills from each mechanism's own table (:func:`with_configurational_z`).
    """
    links = sorted(
        {(link.source, link.target) for r in results.values() for link in r.mechanism.links}
    )
    per_seed = {n: r.tables["per_seed"] for n, r in results.items() if not r.note}
    rows = []
    for name, result in results.items():
        if result.note:
            rows.append(
                {
                    "mechanism": name,
                    "model": ALL_SIZES,
                    "size": ALL_SIZES,
                    "scored": False,
                    "note": f"not scored: {result.note}",
                }
            )
            continue
        seeds = result.tables["per_seed"]
        conv = result.tables["convergence"].set_index("model")
        groups = list(seeds.groupby(["model", "size"], sort=False))
        size_modal: list[float] = []
        size_runs: list[int] = []
        for (model, size), group in groups + [((ALL_SIZES, ALL_SIZES), seeds)]:
            n, k = len(group), int(group["qualifying_final"].sum())
            low, high = wilson_interval(k, n, confidence)
            depth = depth_agreement(group["final_layer"], group["n_layers"], rng, n_permutations)
            formed = group.loc[group["formed"].astype(bool), "onset_step"]
            if size == ALL_SIZES:
                # Sizes differ in depth, so the layer is compared within sizes only.
                modal = float(np.average(size_modal, weights=size_runs)) if size_runs else np.nan
                within = _weighted(conv, "within")
                between = _weighted(conv, "between")
            else:
                counts = group["final_layer"].value_counts()
                modal = float(counts.max() / n)
                size_modal.append(modal)
                size_runs.append(n)
                within = conv["within_r_mean"].get(model, np.nan)
                between = conv["between_r_mean"].get(model, np.nan)
            n_link, layer_order, onset_order = _link_holds(
                per_seed, name, links, pd.Index(group["run"])
            )
            rows.append(
                {
                    "mechanism": name,
                    "model": model,
                    "size": size,
                    "n_params": int(group["n_params"].iloc[0]) if size != ALL_SIZES else np.nan,
                    "scored": True,
                    "note": (
                        f"configurational, head sharing: {LAYER_UNIT_NOTE}"
                        if result.mechanism.unit == "layer"
                        else ""
                    ),
                    "n_runs": n,
                    "n_runs_qualifying": k,
                    "fraction_qualifying": k / n,
                    "fraction_ci_low": low,
                    "fraction_ci_high": high,
                    "layer_modal_share": modal,
                    "depth_mean_abs_diff": depth[0],
                    "depth_null_mean_abs_diff": depth[1],
                    "depth_p_value": depth[2],
                    "n_formed": len(formed),
                    "onset_cv": float(formed.std() / formed.mean())
                    if len(formed) >= 2 and formed.mean() > 0
                    else np.nan,
                    "within_r": within,
                    "between_r": between,
                    "n_link_runs": n_link,
                    "link_layer_order": layer_order,
                    "link_onset_order": onset_order,
                    "link_ablation": _relational_fraction(relational, name, model, size),
                    "configurational_z": _configurational_z(configurational, name, model, size),
                }
            )
    table = pd.DataFrame(rows, columns=PROFILE_COLUMNS)
    for col in ("n_params", "n_runs", "n_runs_qualifying", "n_formed", "n_link_runs"):
        table[col] = pd.to_numeric(table[col]).astype("Int64")
    return table


def _weighted(conv: pd.DataFrame, kind: str) -> float:
    """The mean r over all ``kind`` (within/between) pairs, from the per-size means and counts."""
    if conv.empty:
        return float("nan")
    weights = conv[f"{kind}_n_pairs"].astype(float)
    means = conv[f"{kind}_r_mean"].astype(float)
    ok = np.isfinite(means) & (weights > 0)
    return float(np.average(means[ok], weights=weights[ok])) if ok.any() else float("nan")


def _relational_fraction(
    relational: pd.DataFrame | None, name: str, model: str, size: str
) -> float:
    if (
        relational is None
        or name not in ("previous_token", "induction")
        or "drop_exceeds_control" not in relational
    ):
        return float("nan")
    rows = relational if size == ALL_SIZES else relational[relational["model"] == model]
    values = rows["drop_exceeds_control"].dropna().astype(bool)
    return float(values.mean()) if len(values) else float("nan")


def _configurational_z(
    configurational: pd.DataFrame | None, name: str, model: str, size: str
) -> float:
    if configurational is None or name != "previous_token":
        return float("nan")
    return mean_profile_z(configurational, model, size)


def mean_profile_z(configurational: pd.DataFrame, model: str, size: str) -> float:
    """The mean finite ``profile_z`` of a configurational table (same-size pairs of ``model``;
    all pairs for ``size`` = ``all``); NaN without one."""
    if "profile_z" not in configurational:
        return float("nan")
    rows = configurational
    if size != ALL_SIZES:
        rows = rows[(rows["model_a"] == model) & (rows["model_b"] == model)]
    values = rows["profile_z"].astype(float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


# ---- the whole analysis -------------------------------------------------------------------


def with_configurational_z(
    profile_table: pd.DataFrame, configurational: Mapping[str, pd.DataFrame]
) -> pd.DataFrame:
    """The profile with ``configurational_z`` of each scored mechanism that has its own
    configurational table (``stats/<mechanism>/configurational.csv``: its strongest heads
    compared across runs) set to :func:`mean_profile_z` of that table."""
    out = profile_table.copy()
    for index, row in out.iterrows():
        table = configurational.get(row["mechanism"])
        if table is not None and bool(row["scored"]) and not table.empty:
            out.at[index, "configurational_z"] = mean_profile_z(
                table, str(row["model"]), str(row["size"])
            )
    return out


def strongest_at(
    scored: pd.DataFrame, steps: Mapping[str, int]
) -> dict[tuple[str, int], tuple[int, int]]:
    """``{(run, step): (layer, head)}``: the head with the largest score of the scored rows
    (:attr:`Scored.heads`) at each run's ``steps[run]`` (ties to the lowest layer, then head,
    :func:`mechgen.mechanisms.base.strongest_rows`); a run without rows at that step is left out."""
    at_step = scored[scored["step"] == scored["run"].map(steps)]
    best = at_step[strongest_rows(at_step, "score").to_numpy()]
    return {
        (str(r.run), int(r.step)): (int(r.layer), int(r.head)) for r in best.itertuples(index=False)
    }


def analyze_mechanisms(
    heads: pd.DataFrame,
    mechanisms: Sequence[Mechanism],
    context: NullContext,
    thresholds: np.ndarray = DEFAULT_THRESHOLDS,
    tokens_per_step: int = 1,
    confidence: float = 0.95,
    n_permutations: int = 999,
    seed: int = 0,
    relational: pd.DataFrame | None = None,
    configurational: pd.DataFrame | None = None,
    alignment_cost: positional.AlignmentCost = "euclidean",
    layers: pd.DataFrame | None = None,
) -> tuple[dict[str, Scored], dict[str, pd.DataFrame]]:
    """Every mechanism of ``mechanisms`` through the axes (its tables in ``Scored.tables``,
    header-only for a mechanism not scored), then the cross-mechanism tables ``profile``,
    ``mechanism_order`` and ``mechanism_lags``. ``layers``: the per-layer table
    (``layers.parquet``) of the layer-unit mechanisms (:func:`scored_heads`). ``thresholds``
    are read in normalised units per decade for every mechanism, and on the raw score for a
    mechanism with ``absolute_thresholds``; ``alignment_cost`` is the head alignment's cost
    (:func:`head_alignment`; not applicable to a layer unit). One random generator (``seed``)
    drives every permutation null."""
    rng = np.random.default_rng(seed)
    results: dict[str, Scored] = {}
    for mechanism in mechanisms:
        result = scored_heads(heads, mechanism, context, layers)
        if result.note:
            log.warning("mechanism %s not scored: %s", mechanism.name, result.note)
            result.tables = {n: pd.DataFrame(columns=c) for n, c in TABLE_COLUMNS.items()}
        else:
            scored = result.heads
            result.tables.update(functional_tables(scored, confidence))
            per_seed, norm = per_seed_table(
                scored, mechanism, thresholds, tokens_per_step, absolute_thresholds=thresholds
            )
            result.tables["per_seed"] = per_seed
            result.tables["positional_size"] = positional_table(
                per_seed,
                rng,
                n_permutations,
                scored if mechanism.unit == "head" else None,  # no heads to align in a layer
                alignment_cost,
            )
            result.tables["convergence"] = convergence_table(norm)
            log.info(
                "mechanism %s: %d runs, formed in %d",
                mechanism.name,
                len(per_seed),
                int(per_seed["formed"].sum()),
            )
        results[mechanism.name] = result
    scored_names = [n for n, r in results.items() if not r.note]
    per_seed_tables = {n: results[n].tables["per_seed"] for n in scored_names}
    qualifying = {
        n: strongest_qualifying(results[n].heads)
        for n in scored_names
        if results[n].mechanism.unit == "head"
    }
    cross = {
        "profile": profile(results, confidence, rng, n_permutations, relational, configurational),
        "mechanism_order": order_table(
            per_seed_tables, qualifying, confidence, rng, n_permutations
        ),
        "mechanism_lags": lag_table(per_seed_tables),
    }
    return results, cross
