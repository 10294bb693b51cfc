"""The positional axis: where in the network is the strongest head, and do seeds agree?

Strongest head
--------------
Per run and checkpoint, the *strongest head* is the head with the largest ``metric`` over all
heads of all layers (ties: the lowest layer, then the lowest head). Its relative depth is
``rel_depth = (layer + 1) / n_layers`` with the 0-indexed layer, i.e. the reference study's
``prop_layer = Layer / n_layers`` with its 1-indexed Layer: 1/n_layers for the first layer,
1.0 for the last.

Cross-seed agreement of the layer (per size and checkpoint)
-----------------------------------------------------------
Over the seeds of one size, with ``n_s`` seeds whose strongest heads sit in layers l_1..l_n:

- ``modal_share``: the count of the most common layer / n_s (1.0 = all seeds agree);
- ``entropy_nats``: Shannon entropy (natural log) of the layer distribution
  (``scipy.stats.entropy`` of the counts); 0 when all agree, at most ln(min(n_s, n_layers));
- ``mean_abs_layer_diff``: the mean over unordered seed pairs of |l_i - l_j|, in layers;
- its null: under "the strongest layer carries no cross-seed information", each seed's layer is
  an independent uniform draw from 0..n_layers-1. (Permuting the observed layers across seeds
  would leave the pairwise differences unchanged, so the null relabels layers instead; a random
  relabelling of a seed's layers puts its strongest head in a uniform layer, which is this
  null.) ``null_mean_abs_layer_diff`` is the mean of the Monte Carlo null distribution (exactly
  (n_layers^2 - 1) / (3 n_layers) in expectation) and ``p_value`` the one-sided Monte Carlo
  p-value P(null <= observed) of ``scipy.stats.monte_carlo_test`` (which adds one to numerator
  and denominator), seeded per size and checkpoint.

Head-level agreement
--------------------
Heads are unordered within a layer: head 3 of layer 2 in one seed has no reason to be head 3 in
another. Before comparing heads across runs, :func:`align_heads` matches the heads of a layer of
run A to those of run B by the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) on
their score profiles over the checkpoints both runs have (cost: Euclidean distance of the
per-head metric trajectories, or 1 - Pearson r). ``head_match_fraction`` is then the fraction of
seed pairs whose strongest heads are in the same layer *and* matched to each other;
``same_layer_fraction`` the fraction in the same layer; ``head_match_chance`` =
same_layer_fraction / n_heads, the match rate expected if, within an agreeing layer, the
alignment paired the strongest head with a random head.

The two costs answer different questions. The Euclidean cost compares level and shape, so a
strongest head whose trajectory stands far above its layer-mates is always matched to the other
run's strongest head once the layers agree: on the reference tables (Trott 2025) the final-step
head_match_fraction equals same_layer_fraction at every size. The correlation cost compares
shape only and is stricter (at the final step 0.44 / 0.31 / 0.28 / 0.03 against same-layer
fractions 0.44 / 0.78 / 0.44 / 0.31 for 14m / 70m / 160m / 410m).

Output: :func:`positional_tables`, written as ``results/<suite>/stats/positional_run_step.csv``
and ``positional_size_step.csv``; columns in :data:`POSITIONAL_COLUMNS`, defined in
``docs/outputs.md``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Literal

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.stats import entropy, monte_carlo_test

from mechgen.axes.functional import with_nullable_ints
from mechgen.tables.heads import drop_nonfinite_heads, validate_heads

AlignmentCost = Literal["euclidean", "correlation"]

SIZE_COLUMNS = ["suite", "model", "size", "n_params", "n_layers", "n_heads"]

DEFAULT_N_PERMUTATIONS = 9999
"""Monte Carlo draws of the layer-agreement null."""

POSITIONAL_COLUMNS = {
    "positional_run_step": ["suite", "model", "size", "seed", "run"]
    + ["n_params", "n_layers", "n_heads", "step", "tokens_seen", "is_final_step", "metric"]
    + ["strongest_layer", "strongest_head", "strongest_value", "rel_depth"],
    "positional_size_step": SIZE_COLUMNS
    + ["step", "tokens_seen", "is_final_step", "metric", "n_seeds", "modal_layer"]
    + ["modal_share", "entropy_nats", "mean_rel_depth", "sd_rel_depth", "mean_abs_layer_diff"]
    + ["null_mean_abs_layer_diff", "p_value", "n_permutations", "same_layer_fraction"]
    + ["head_match_fraction", "head_match_chance", "alignment_cost"],
}
"""The positional tables (``results/<suite>/stats/<name>.csv``) and their columns, in order:
the strongest head per run x checkpoint, and the cross-seed agreement per model size x
checkpoint. Every column is defined in ``docs/outputs.md``."""


def relative_depth(
    layer: np.ndarray | pd.Series | int, n_layers: np.ndarray | pd.Series | int
) -> np.ndarray:
    """``(layer + 1) / n_layers`` for a 0-indexed layer: 1/n_layers (first) .. 1 (last)."""
    return (np.asarray(layer) + 1) / np.asarray(n_layers)


def strongest_heads(trajectory: pd.DataFrame) -> pd.DataFrame:
    """Per run and step: the head with the largest metric and its relative depth.

    ``trajectory`` is the max-over-heads table of one metric
    (:func:`mechgen.axes.developmental.trajectories`, ``trajectories.parquet``: non-finite or flagged
    heads left out; ties to the lowest layer, then head), with columns renamed for this table:
    ``strongest_layer``, ``strongest_head``, ``strongest_value``, plus ``rel_depth`` and
    ``is_final_step`` (the run's last step).
    """
    table = trajectory.rename(
        columns={
            "argmax_layer": "strongest_layer",
            "argmax_head": "strongest_head",
            "value": "strongest_value",
        }
    )
    table["rel_depth"] = relative_depth(table["strongest_layer"], table["n_layers"])
    table["is_final_step"] = table["step"] == table.groupby("run")["step"].transform("max")
    return table.sort_values(["n_params", "model", "seed", "step"], kind="stable").reset_index(
        drop=True
    )


def mean_abs_pairwise_difference(layers: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over unordered pairs (i < j) of ``|layers_i - layers_j|`` along ``axis``.

    Vectorised for ``scipy.stats.monte_carlo_test``. NaN with fewer than 2 values.
    """
    values = np.moveaxis(np.asarray(layers, dtype=float), axis, -1)
    n = values.shape[-1]
    if n < 2:
        return np.full(values.shape[:-1], np.nan)
    i, j = np.triu_indices(n, k=1)
    return np.abs(values[..., i] - values[..., j]).mean(axis=-1)


def layer_agreement(
    layers: Iterable[int],
    n_layers: int,
    rng: np.random.Generator,
    n_permutations: int = DEFAULT_N_PERMUTATIONS,
) -> dict[str, float | int]:
    """Cross-seed agreement of the strongest head's layer (see the module docstring).

    Returns ``n_seeds``, ``modal_layer``, ``modal_share``, ``entropy_nats``,
    ``mean_abs_layer_diff``, ``null_mean_abs_layer_diff``, ``p_value``. The last three are NaN
    with fewer than 2 seeds (no pair to compare).
    """
    observed = np.asarray(list(layers), dtype=int)
    if observed.size == 0:
        raise ValueError("layer_agreement needs at least one seed")
    if n_layers < 1 or observed.min() < 0 or observed.max() >= n_layers:
        raise ValueError(
            f"layers must lie in 0..{n_layers - 1}, got {sorted(set(observed.tolist()))}"
        )
    counts = np.bincount(observed, minlength=n_layers)
    result: dict[str, float | int] = {
        "n_seeds": int(observed.size),
        "modal_layer": int(np.argmax(counts)),  # argmax returns the lowest of tied layers
        "modal_share": float(counts.max() / observed.size),
        "entropy_nats": float(entropy(counts)),
        "mean_abs_layer_diff": np.nan,
        "null_mean_abs_layer_diff": np.nan,
        "p_value": np.nan,
    }
    if observed.size < 2:
        return result
    test = monte_carlo_test(
        observed,
        lambda size: rng.integers(0, n_layers, size=size),
        mean_abs_pairwise_difference,
        vectorized=True,
        n_resamples=n_permutations,
        alternative="less",
        axis=-1,
    )
    result["mean_abs_layer_diff"] = float(test.statistic)
    result["null_mean_abs_layer_diff"] = float(np.mean(test.null_distribution))
    result["p_value"] = float(test.pvalue)
    return result


def run_profiles(heads_run: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The metric trajectory of every head of one run.

    Returns ``(steps, values)``: the run's sorted steps and an array [n_layers, n_heads, n_steps]
    with ``values[l, h, k]`` = head h of layer l at ``steps[k]``; NaN where the score is missing,
    non-finite or flagged ``nonfinite``.
    """
    validate_heads(heads_run, metric)
    if heads_run["run"].nunique() != 1:
        raise ValueError(
            f"run_profiles: pass the rows of exactly one run, got {heads_run['run'].nunique()}"
        )
    n_layers = int(heads_run["n_layers"].iloc[0])
    n_heads = int(heads_run["n_heads"].iloc[0])
    steps = np.sort(heads_run["step"].unique())
    values = np.full((n_layers, n_heads, len(steps)), np.nan)
    finite = drop_nonfinite_heads(heads_run, metric)
    layer = finite["layer"].to_numpy(dtype=int)
    head = finite["head"].to_numpy(dtype=int)
    if layer.size and (
        layer.max() >= n_layers or head.max() >= n_heads or min(layer.min(), head.min()) < 0
    ):
        raise ValueError(
            f"run {heads_run['run'].iloc[0]}: layer/head outside 0..n_layers-1 / 0..n_heads-1"
        )
    values[layer, head, np.searchsorted(steps, finite["step"].to_numpy())] = finite[
        metric
    ].to_numpy(dtype=float)
    return steps, values


def alignment_cost_matrix(
    profiles_a: np.ndarray, profiles_b: np.ndarray, cost: AlignmentCost = "euclidean"
) -> np.ndarray:
    """Cost of pairing head i of run A with head j of run B: array [n_heads_a, n_heads_b].

    ``euclidean``: ``||p_a[i] - p_b[j]||_2`` over the checkpoints (units of the metric);
    it compares both the shape and the level of the trajectories.
    ``correlation``: ``1 - Pearson r(p_a[i], p_b[j])`` (0..2); a constant trajectory has no
    defined r and is given r = 0 (cost 1), i.e. no evidence either way.
    """
    a = np.asarray(profiles_a, dtype=float)
    b = np.asarray(profiles_b, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"profiles must be [heads, steps] arrays over the same steps, got {a.shape} and {b.shape}"
        )
    if cost == "euclidean":
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))
    if cost == "correlation":
        a_centred = a - a.mean(axis=1, keepdims=True)
        b_centred = b - b.mean(axis=1, keepdims=True)
        norms = (
            np.linalg.norm(a_centred, axis=1)[:, None] * np.linalg.norm(b_centred, axis=1)[None, :]
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (a_centred @ b_centred.T) / norms
        return 1.0 - np.where(np.isfinite(r), r, 0.0)
    raise ValueError(f"unknown alignment cost {cost!r}; allowed: euclidean, correlation")


def align_profiles(
    profiles_a: np.ndarray, profiles_b: np.ndarray, cost: AlignmentCost = "euclidean"
) -> np.ndarray:
    """Hungarian matching of heads: ``match[i]`` is the head of B paired with head i of A.

    Minimises the summed :func:`alignment_cost_matrix` over one-to-one pairings
    (``scipy.optimize.linear_sum_assignment``). Needs equal head counts.
    """
    if len(profiles_a) != len(profiles_b):
        raise ValueError(f"cannot align {len(profiles_a)} heads with {len(profiles_b)} heads")
    rows, cols = linear_sum_assignment(alignment_cost_matrix(profiles_a, profiles_b, cost))
    match = np.empty(len(rows), dtype=int)
    match[rows] = cols
    return match


def align_heads(
    heads_a: pd.DataFrame,
    heads_b: pd.DataFrame,
    layer: int,
    metric: str,
    cost: AlignmentCost = "euclidean",
) -> dict[int, int]:
    """Map each head of ``layer`` in run A to its counterpart in run B.

    ``heads_a`` / ``heads_b`` are the per-head rows of one run each. Heads are matched on their
    ``metric`` trajectories over the checkpoints both runs have, left out any checkpoint where a
    head of the layer is non-finite or flagged in either run (:func:`align_profiles`).
    Returns ``{head_in_a: head_in_b}``.
    """
    match = _align_layer(run_profiles(heads_a, metric), run_profiles(heads_b, metric), layer, cost)
    return {int(h_a): int(h_b) for h_a, h_b in enumerate(match)}


def positional_tables(
    heads: pd.DataFrame,
    trajectory: pd.DataFrame,
    n_permutations: int = DEFAULT_N_PERMUTATIONS,
    seed: int = 0,
    cost: AlignmentCost = "euclidean",
) -> dict[str, pd.DataFrame]:
    """The strongest head per run x step and the cross-seed agreement per size x step.

    ``trajectory``: the max-over-heads table of the analysed metric
    (:func:`mechgen.axes.developmental.trajectories` of ``heads``); its ``metric`` is the per-head
    column of ``heads`` the head alignment compares. Returns the tables keyed by the names of
    :data:`POSITIONAL_COLUMNS`. The Monte Carlo null of the i-th size x step row (sizes by
    n_params, then steps) is drawn from ``numpy.random.default_rng([seed, i])``, so a rerun
    with the same ``seed`` reproduces every p-value.
    """
    metrics = trajectory["metric"].unique()
    if len(metrics) != 1:
        raise ValueError(f"the trajectory table must hold one metric, got {list(metrics)}")
    metric = str(metrics[0])
    validate_heads(heads, metric)
    strongest = strongest_heads(trajectory)
    alignments = _size_alignments(heads, metric, cost)
    size_rows = []
    for group_index, ((_, step), group) in enumerate(
        strongest.groupby(["model", "step"], sort=False)
    ):
        rng = np.random.default_rng([seed, group_index])
        first = group.iloc[0]
        agreement = layer_agreement(
            group["strongest_layer"], int(first["n_layers"]), rng, n_permutations
        )
        same_layer, head_match = _pair_matches(group, alignments)
        size_rows.append(
            {
                **{col: first[col] for col in SIZE_COLUMNS},
                "step": int(step),
                "tokens_seen": first["tokens_seen"],
                "is_final_step": bool(group["is_final_step"].all()),
                "metric": metric,
                **agreement,
                "mean_rel_depth": float(group["rel_depth"].mean()),
                "sd_rel_depth": float(group["rel_depth"].std(ddof=1)) if len(group) > 1 else np.nan,
                "n_permutations": n_permutations,
                "same_layer_fraction": same_layer,
                "head_match_fraction": head_match,
                "head_match_chance": same_layer / int(first["n_heads"]),
                "alignment_cost": cost,
            }
        )
    size_step = pd.DataFrame(size_rows, columns=POSITIONAL_COLUMNS["positional_size_step"])
    return {
        "positional_run_step": strongest[POSITIONAL_COLUMNS["positional_run_step"]],
        "positional_size_step": with_nullable_ints(
            size_step, ["step", "tokens_seen", "n_seeds", "modal_layer", "n_permutations"]
        ),
    }


def _size_alignments(
    heads: pd.DataFrame, metric: str, cost: AlignmentCost
) -> dict[tuple[str, str], dict[int, np.ndarray]]:
    """For every unordered pair of runs of the same size: ``{(run_a, run_b): {layer: match}}``.

    The profiles of each run are built once; the alignment uses every checkpoint the two runs
    share with all heads of the layer finite in both.
    """
    alignments: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for _, size_heads in heads.groupby("model", sort=False):
        profiles = {
            run: run_profiles(rows, metric) for run, rows in size_heads.groupby("run", sort=True)
        }
        n_layers = int(size_heads["n_layers"].iloc[0])
        for run_a, run_b in itertools.combinations(sorted(profiles), 2):
            alignments[(run_a, run_b)] = {
                layer: _align_layer(profiles[run_a], profiles[run_b], layer, cost)
                for layer in range(n_layers)
            }
    return alignments


def _align_layer(
    profiles_a: tuple[np.ndarray, np.ndarray],
    profiles_b: tuple[np.ndarray, np.ndarray],
    layer: int,
    cost: AlignmentCost,
) -> np.ndarray:
    """:func:`align_profiles` of one layer of two runs' :func:`run_profiles`, over the steps both
    runs have at which every head of the layer is finite in both."""
    (steps_a, values_a), (steps_b, values_b) = profiles_a, profiles_b
    if layer >= min(len(values_a), len(values_b)):
        raise ValueError(f"layer {layer} does not exist in both runs")
    _, index_a, index_b = np.intersect1d(steps_a, steps_b, return_indices=True)
    a = values_a[layer][:, index_a]
    b = values_b[layer][:, index_b]
    usable = np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0)
    if not usable.any():
        raise ValueError(
            f"layer {layer}: no checkpoint with finite scores for all heads in both runs"
        )
    return align_profiles(a[:, usable], b[:, usable], cost)


def _pair_matches(
    group: pd.DataFrame, alignments: dict[tuple[str, str], dict[int, np.ndarray]]
) -> tuple[float, float]:
    """Fractions of seed pairs (in ``group``, one size at one step) whose strongest heads share
    a layer, and whose strongest heads are aligned to each other. NaN with fewer than 2 seeds."""
    by_run = group.set_index("run")
    pairs = list(itertools.combinations(sorted(by_run.index), 2))
    if not pairs:
        return np.nan, np.nan
    same_layer = head_match = 0
    for run_a, run_b in pairs:
        layer_a, head_a = by_run.loc[run_a, ["strongest_layer", "strongest_head"]]
        layer_b, head_b = by_run.loc[run_b, ["strongest_layer", "strongest_head"]]
        if layer_a != layer_b:
            continue
        same_layer += 1
        head_match += int(alignments[(run_a, run_b)][int(layer_a)][int(head_a)] == head_b)
    return same_layer / len(pairs), head_match / len(pairs)
