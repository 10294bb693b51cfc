"""Comparing head signatures across runs, torch-free (the table side of the configurational
axis; :mod:`mechgen.scoring.configurational` computes the signatures inside the scoring job).

- Similarities of signatures that need no shared basis (:func:`spectrum_similarity_matrix`,
  :func:`profile_similarity_matrix`) and a null from random head pairs
  (:func:`similarity_vs_random_pairs`).
- Linear CKA (Kornblith et al. 2019) between two heads' per-token outputs (:func:`linear_cka`)
  with a null of random heads (:func:`cka_vs_random_heads`, :func:`random_heads`).
- Hungarian alignment of heads within a layer from any cost matrix (:func:`align_heads`).
- Stability over training from saved W_Q, W_K factors (:func:`qk_cosine`,
  :func:`strongest_head_qk_stability`, :func:`identity_fixed_from`; :func:`save_qk_factors`).

On CKA: maintained PyPI packages exist (``ckatorch``, ``torch-cka``, ``pytorch-cka``), but
they compare whole layers of two models through a dataloader and module names, not the
per-head slices needed here, and none is widely used; linear CKA is a one-line definition,
implemented in :func:`linear_cka` and tested against its invariances.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from mechgen.atomic import atomic_path

__all__ = [
    "CKATest",
    "QKFactors",
    "SimilarityTest",
    "align_by_similarity",
    "align_heads",
    "cka_vs_random_heads",
    "identity_fixed_from",
    "linear_cka",
    "load_qk_factors",
    "profile_similarity_matrix",
    "qk_cosine",
    "random_heads",
    "save_qk_factors",
    "similarity_vs_random_pairs",
    "spectrum_similarity_matrix",
    "strongest_head_qk_stability",
]

HeadId = tuple[int, int]
"""(layer, head), both 0-indexed."""

DEFAULT_N_NULL = 1000


def spectrum_similarity_matrix(
    spectra_a: np.ndarray,
    spectra_b: np.ndarray,
    method: Literal["cosine", "wasserstein"] = "cosine",
) -> np.ndarray:
    """Similarity of every pair of spectra: ``[n_a, n_b]`` from ``[n_a, m_a]`` and ``[n_b, m_b]``.

    Spectra are descending singular values (any positive scale; rows with NaN give NaN).

    - ``cosine``: sum_i a_i b_i / (||a|| ||b||) after zero-padding the shorter spectrum
      (exact: the missing singular values of a d x d circuit of rank head_dim are zero).
      In [0, 1]; 1 = same shape of spectrum.
    - ``wasserstein``: 1 - W1 between the spectra read as distributions of energy over
      relative rank: mass sigma_i / sum(sigma) at position (i - 1/2) / m, i = 1..m
      (``scipy.stats.wasserstein_distance``; for equal m computed as the vectorised
      (1/m) sum_k |F_a(k) - F_b(k)| of the cumulative masses, which equals it). In [0, 1];
      1 = same distribution.
    """
    a = np.atleast_2d(np.asarray(spectra_a, dtype=float))
    b = np.atleast_2d(np.asarray(spectra_b, dtype=float))
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"spectra must be [n, m] arrays; got shapes {a.shape} and {b.shape}")
    if (a[np.isfinite(a)] < 0).any() or (b[np.isfinite(b)] < 0).any():
        raise ValueError("singular values must be >= 0")
    if method == "cosine":
        width = max(a.shape[1], b.shape[1])
        a_padded = np.pad(a, ((0, 0), (0, width - a.shape[1])))
        b_padded = np.pad(b, ((0, 0), (0, width - b.shape[1])))
        with np.errstate(invalid="ignore", divide="ignore"):
            a_unit = a_padded / np.linalg.norm(a_padded, axis=1, keepdims=True)
            b_unit = b_padded / np.linalg.norm(b_padded, axis=1, keepdims=True)
        return a_unit @ b_unit.T
    if method == "wasserstein":
        with np.errstate(invalid="ignore", divide="ignore"):
            a_mass = a / a.sum(axis=1, keepdims=True)
            b_mass = b / b.sum(axis=1, keepdims=True)
        if a.shape[1] == b.shape[1]:
            a_cdf = np.cumsum(a_mass, axis=1)
            b_cdf = np.cumsum(b_mass, axis=1)
            distance = np.abs(a_cdf[:, None, :] - b_cdf[None, :, :]).sum(axis=-1) / a.shape[1]
            return 1.0 - distance
        a_positions = (np.arange(a.shape[1]) + 0.5) / a.shape[1]
        b_positions = (np.arange(b.shape[1]) + 0.5) / b.shape[1]
        # Imported here, not at module level: the scoring job imports this module (QKFactors)
        # and would pay scipy.stats' import (~0.7 CPU-s per job) for a table-side function.
        from scipy import stats

        similarity = np.full((a.shape[0], b.shape[0]), np.nan)
        for i, a_row in enumerate(a_mass):
            for j, b_row in enumerate(b_mass):
                if np.isfinite(a_row).all() and np.isfinite(b_row).all():
                    similarity[i, j] = 1.0 - stats.wasserstein_distance(
                        a_positions, b_positions, a_row, b_row
                    )
        return similarity
    raise ValueError(f"method must be 'cosine' or 'wasserstein'; got {method!r}")


def profile_similarity_matrix(profiles_a: np.ndarray, profiles_b: np.ndarray) -> np.ndarray:
    """Pearson r of every pair of offset profiles: ``[n_a, n_b]`` from ``[n_a, K+1]``, ``[n_b, K+1]``.

    r in [-1, 1] over the offsets 0..K; NaN for a constant profile or one with NaN entries.
    """
    a = np.atleast_2d(np.asarray(profiles_a, dtype=float))
    b = np.atleast_2d(np.asarray(profiles_b, dtype=float))
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"profiles must cover the same offsets; got {a.shape[1]} and {b.shape[1]} columns"
        )
    a_centred = a - a.mean(axis=1, keepdims=True)
    b_centred = b - b.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norms = (
            np.linalg.norm(a_centred, axis=1)[:, None] * np.linalg.norm(b_centred, axis=1)[None, :]
        )
        return (a_centred @ b_centred.T) / np.where(norms > 0, norms, np.nan)


@dataclass(frozen=True)
class SimilarityTest:
    """An observed similarity against a null sample.

    ``z`` = (observed - null_mean) / null_sd; ``p_value`` = (1 + #{null >= observed}) /
    (1 + n_null), the one-sided permutation p-value (large similarity = evidence).
    """

    observed: float
    null_mean: float
    null_sd: float
    z: float
    p_value: float
    n_null: int


def _test_against(observed: float, null: np.ndarray) -> SimilarityTest:
    null = np.asarray(null, dtype=float)
    null = null[np.isfinite(null)]
    if null.size < 2 or not np.isfinite(observed):
        return SimilarityTest(
            float(observed), math.nan, math.nan, math.nan, math.nan, int(null.size)
        )
    sd = float(null.std(ddof=1))
    z = (observed - float(null.mean())) / sd if sd > 0 else math.nan
    p_value = (1 + int((null >= observed).sum())) / (1 + null.size)
    return SimilarityTest(float(observed), float(null.mean()), sd, z, p_value, int(null.size))


def similarity_vs_random_pairs(
    similarity: np.ndarray, pair: tuple[int, int], n_null: int = DEFAULT_N_NULL, seed: int = 0
) -> SimilarityTest:
    """Test the similarity of one head pair against random head pairs of the same layers.

    ``similarity``: ``[n_a, n_b]`` similarities between heads of run A (rows) and run B
    (columns), restricted by the caller to the layers being compared (e.g. all heads of layer
    l in both runs). ``pair``: (row, column) of the pair under test. Null: ``n_null`` pairs
    drawn uniformly with replacement from all other (row, column) pairs of the matrix with a
    finite similarity (``numpy.random.default_rng(seed)``).
    """
    sim = np.asarray(similarity, dtype=float)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be a 2-D [n_a, n_b] array; got shape {sim.shape}")
    row, column = pair
    if not (0 <= row < sim.shape[0] and 0 <= column < sim.shape[1]):
        raise ValueError(f"pair {pair!r} is outside the {sim.shape} similarity matrix")
    pool = sim.ravel()
    keep = np.isfinite(pool)
    keep[row * sim.shape[1] + column] = False
    pool = pool[keep]
    if pool.size == 0:
        raise ValueError("no other finite pair to build a null from")
    null = np.random.default_rng(seed).choice(pool, size=n_null, replace=True)
    return _test_against(float(sim[row, column]), null)


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same n tokens.

    ``x`` [n, p], ``y`` [n, q] (arrays, or CPU tensors); columns are centred
    (X <- X - 1 mean(X)), then CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), in [0, 1];
    invariant to orthogonal transforms and isotropic scaling of either side. Computed in
    float64 with numpy. NaN if either centred matrix is zero.
    """
    x64 = np.asarray(x, dtype=np.float64)
    y64 = np.asarray(y, dtype=np.float64)
    if x64.ndim != 2 or y64.ndim != 2 or x64.shape[0] != y64.shape[0]:
        raise ValueError(
            f"x and y must be [n, p] and [n, q] with the same n; got {x64.shape} and {y64.shape}"
        )
    if x64.shape[0] < 2:
        raise ValueError("CKA needs at least 2 tokens")
    x64 = x64 - x64.mean(axis=0, keepdims=True)
    y64 = y64 - y64.mean(axis=0, keepdims=True)
    cross = np.linalg.norm(y64.T @ x64) ** 2
    denominator = np.linalg.norm(x64.T @ x64) * np.linalg.norm(y64.T @ y64)
    return float(cross / denominator) if float(denominator) > 0 else math.nan


def random_heads(
    n_layers: int, n_heads: int, n: int, seed: int = 0, exclude: Sequence[HeadId] = ()
) -> list[HeadId]:
    """``n`` distinct (layer, head) pairs drawn uniformly without replacement, minus ``exclude``.

    ``numpy.random.default_rng(seed)``; raises if fewer than ``n`` heads are available.
    """
    excluded = {(int(layer), int(head)) for layer, head in exclude}
    pool = [
        (layer, head)
        for layer in range(n_layers)
        for head in range(n_heads)
        if (layer, head) not in excluded
    ]
    if n > len(pool):
        raise ValueError(f"asked for {n} random heads but only {len(pool)} are available")
    picks = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
    return [pool[int(i)] for i in picks]


@dataclass(frozen=True)
class CKATest:
    """CKA of a matched head pair against CKA of the reference head with random heads."""

    observed: float
    null: np.ndarray
    test: SimilarityTest


def cka_vs_random_heads(
    reference: Any,
    matched: Any,
    random_outputs: Sequence[Any],
) -> CKATest:
    """CKA(reference, matched) tested against CKA(reference, r) for random heads r.

    ``reference``: outputs [n_tokens, p] of the strongest head of run A; ``matched``: its
    aligned counterpart in run B; ``random_outputs``: outputs of random heads of run B
    (:func:`random_heads`, :func:`mechgen.scoring.configurational.head_outputs`), all on the same
    tokens. z and the one-sided permutation p-value as in :class:`SimilarityTest`.
    """
    observed = linear_cka(reference, matched)
    null = np.array([linear_cka(reference, other) for other in random_outputs], dtype=float)
    return CKATest(observed=observed, null=null, test=_test_against(observed, null))


def align_heads(cost: np.ndarray) -> np.ndarray:
    """Hungarian matching from a cost matrix: ``match[i]`` = head of B paired with head i of A.

    ``cost``: ``[n_a, n_b]`` (e.g. 1 - similarity of signatures within one layer); minimises
    the summed cost over one-to-one pairings (``scipy.optimize.linear_sum_assignment``).
    Rectangular matrices are allowed: unmatched rows get -1. NaN costs are treated as worse
    than any finite cost.
    """
    matrix = np.asarray(cost, dtype=float)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"cost must be a non-empty 2-D array; got shape {matrix.shape}")
    finite = np.isfinite(matrix)
    if not finite.any():
        raise ValueError("cost has no finite entry")
    worst = matrix[finite].max()
    spread = worst - matrix[finite].min()
    matrix = np.where(finite, matrix, worst + spread + 1.0)
    # Here, not at module level: see spectrum_similarity_matrix (the scoring job imports this
    # module).
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(matrix)
    match = np.full(matrix.shape[0], -1, dtype=int)
    match[rows] = cols
    return match


def align_by_similarity(similarity: np.ndarray) -> np.ndarray:
    """:func:`align_heads` maximising the summed similarity (cost = -similarity)."""
    return align_heads(-np.asarray(similarity, dtype=float))


QKFactors = tuple[np.ndarray, np.ndarray]
"""(W_Q, W_K) of one head, each [head_dim, d_model], read side with LayerNorm folded."""


def save_qk_factors(path: str | Path, factors: Mapping[HeadId, QKFactors]) -> None:
    """Write factors to a ``.npz`` (keys ``L{layer}H{head}_q`` / ``_k``; no pickles)."""
    arrays = {}
    for (layer, head), (w_q, w_k) in factors.items():
        arrays[f"L{layer}H{head}_q"] = w_q
        arrays[f"L{layer}H{head}_k"] = w_k
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file: savez would add .npz
        np.savez(fh, **arrays)


def load_qk_factors(path: str | Path) -> dict[HeadId, QKFactors]:
    """Read a file written by :func:`save_qk_factors` (``allow_pickle=False``)."""
    out: dict[HeadId, QKFactors] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            if not key.endswith("_q"):
                continue
            layer_text, head_text = key[1:-2].split("H")
            out[(int(layer_text), int(head_text))] = (data[key], data[key[:-2] + "_k"])
    return out


def qk_cosine(a: QKFactors, b: QKFactors) -> float:
    """Cosine of two W_QK = W_Q^T W_K: <W_QK^a, W_QK^b>_F / (||W_QK^a||_F ||W_QK^b||_F).

    Computed through head_dim x head_dim products: <W_QK^a, W_QK^b>_F =
    tr((W_Q^a W_Q^b^T)(W_K^b W_K^a^T)) and ||W_QK||_F^2 = tr((W_Q W_Q^T)(W_K W_K^T)).
    In [-1, 1]; NaN if either circuit is zero. Meaningful within one run (the same residual
    basis, drifting slowly), not across runs.
    """
    qa, ka = (np.asarray(m, dtype=np.float64) for m in a)
    qb, kb = (np.asarray(m, dtype=np.float64) for m in b)
    if qa.shape[1] != qb.shape[1]:
        raise ValueError(f"W_QK of different d_model: {qa.shape[1]} vs {qb.shape[1]}")
    inner = np.trace((qa @ qb.T) @ (kb @ ka.T))
    norm_a = np.trace((qa @ qa.T) @ (ka @ ka.T))
    norm_b = np.trace((qb @ qb.T) @ (kb @ kb.T))
    if norm_a <= 0 or norm_b <= 0:
        return math.nan
    return float(inner / math.sqrt(norm_a * norm_b))


def strongest_head_qk_stability(
    trajectory: pd.DataFrame, factors_by_step: Mapping[int, Mapping[HeadId, QKFactors]]
) -> pd.DataFrame:
    """Per consecutive checkpoint pair of one run: cosine of the strongest head's W_QK.

    ``trajectory``: one run's rows with ``step``, ``argmax_layer``, ``argmax_head`` (as from
    :func:`mechgen.axes.developmental.trajectories`). ``factors_by_step``: step -> {(layer, head):
    (W_Q, W_K)} saved per checkpoint (:func:`mechgen.scoring.configurational.qk_factors`). For each
    step s after the first, with previous step s', the head h = argmax at s is compared with
    itself at s':
    ``qk_cosine`` = :func:`qk_cosine` of h's factors at s' and s (NaN if either was not
    saved). Columns: step, previous_step, layer, head, qk_cosine.
    """
    if "run" in trajectory.columns and trajectory["run"].nunique() > 1:
        raise ValueError("trajectory must hold a single run")
    ordered = trajectory.sort_values("step")
    rows = []
    steps = ordered["step"].to_numpy()
    for previous_step, (_, row) in zip(steps[:-1], ordered.iloc[1:].iterrows()):
        head = (int(row["argmax_layer"]), int(row["argmax_head"]))
        now = factors_by_step.get(int(row["step"]), {}).get(head)
        before = factors_by_step.get(int(previous_step), {}).get(head)
        cosine = qk_cosine(before, now) if now is not None and before is not None else math.nan
        rows.append(
            {
                "step": int(row["step"]),
                "previous_step": int(previous_step),
                "layer": head[0],
                "head": head[1],
                "qk_cosine": cosine,
            }
        )
    return pd.DataFrame(rows, columns=["step", "previous_step", "layer", "head", "qk_cosine"])


def identity_fixed_from(trajectory: pd.DataFrame, head_column: str = "argmax_head") -> float:
    """The first step from which the strongest head's identity never changes again.

    ``trajectory``: one run's rows with ``step``, ``argmax_layer`` and ``head_column`` (use a
    column of aligned head ids when heads were matched across checkpoints; within one run
    head indices are already consistent). Returns the earliest step s such that (layer, head)
    at every step >= s equals the final one (the final step if it changed at the last
    checkpoint); NaN for an empty trajectory.
    """
    if trajectory.empty:
        return math.nan
    ordered = trajectory.sort_values("step")
    identity = list(zip(ordered["argmax_layer"].astype(int), ordered[head_column].astype(int)))
    steps = ordered["step"].to_numpy()
    first = len(identity) - 1
    while first > 0 and identity[first - 1] == identity[-1]:
        first -= 1
    return float(steps[first])
