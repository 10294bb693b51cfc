"""Convergence: do runs of one size (different seeds) follow the same trajectory, and do sizes?

As in the reference study (Trott 2025):

- The trajectories (one per run, :func:`mechgen.axes.developmental.trajectories`) are pivoted to one
  column per run over the checkpoints all runs share; Pearson r between every two runs.
- The long table has every *ordered* pair i != j (each unordered pair twice: 36 runs give
  1,260 rows), with ``same_model`` = both runs of the same size, ``n_params1``, ``n_params2``.
- Within-size r of a size = mean r over its same-size pairs; between-size r of a size = mean r
  over pairs whose *first* run is of that size and second run of another size.
- OLS ``cor ~ same_model + log10(n_params1) + log10(n_params2)`` on all pairs, and
  ``cor ~ log10(n_params1) + log10(n_params2)`` on between-size pairs. The pair table is
  symmetric, so the two log10(n_params) coefficients are equal; the study printed the
  ``log10(n_params1)`` one. The ordered pairs are not independent (each unordered pair appears
  twice and every run in many pairs), so these OLS SEs are too small; they are reported because
  the study reported them.
- Classical (Torgerson) MDS in k = 2 dimensions on the dissimilarity ``1 - r``; per size the
  separation ratio = (mean distance from the size's centroid to the other sizes' centroids) /
  (mean distance of the size's runs to its own centroid).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from mechgen.stats.regression import ols_table

PAIR_COLUMNS = [
    "run1",
    "run2",
    "model1",
    "model2",
    "size1",
    "size2",
    "seed1",
    "seed2",
    "n_params1",
    "n_params2",
    "same_model",
    "cor",
]
"""Columns of :func:`pairwise_correlations`."""

MDS_COLUMNS = ["run", "model", "size", "seed", "n_params", "mds1", "mds2"]
"""Columns of :func:`mds_coordinates` with its default k = 2 (``stats/mds.csv``)."""


def trajectory_matrix(traj: pd.DataFrame, min_shared_steps: int = 3) -> pd.DataFrame:
    """Trajectories as a (step x run) matrix over the checkpoints every run has.

    Steps missing from some run are dropped with a warning. Raises ``ValueError`` with fewer than
    ``min_shared_steps`` shared steps (a Pearson r on 2 points is always +-1) or fewer than 2 runs.
    """
    matrix = traj.pivot(index="step", columns="run", values="value").sort_index()
    shared = matrix.dropna(axis=0, how="any")
    if len(shared) < len(matrix):
        lost = [int(s) for s in matrix.index.difference(shared.index)]
        warnings.warn(
            f"{len(lost)} checkpoint(s) missing from some run are left out of the correlations: "
            f"steps {lost[:10]}",
            stacklevel=2,
        )
    if shared.shape[1] < 2:
        raise ValueError(f"convergence needs at least 2 runs; got {shared.shape[1]}")
    if len(shared) < min_shared_steps:
        raise ValueError(
            f"convergence needs at least {min_shared_steps} checkpoints shared by all runs; got {len(shared)}"
        )
    return shared


def correlation_matrix(traj: pd.DataFrame) -> pd.DataFrame:
    """Pearson r between the trajectories of every two runs over their shared checkpoints.

    A (run x run) DataFrame (``pandas.DataFrame.corr``, Pearson). A constant trajectory has an
    undefined r (NaN), reported with a warning.
    """
    matrix = trajectory_matrix(traj)
    flat = matrix.columns[matrix.std(axis=0) == 0]
    if len(flat):
        warnings.warn(
            f"constant trajectories have undefined correlations (NaN): {', '.join(flat)}",
            stacklevel=2,
        )
    return matrix.corr(method="pearson")


def _run_info(traj: pd.DataFrame) -> pd.DataFrame:
    return traj.drop_duplicates("run").set_index("run")[["model", "size", "seed", "n_params"]]


def pairwise_correlations(traj: pd.DataFrame) -> pd.DataFrame:
    """Long table of every ordered pair of distinct runs with their Pearson r.

    Columns :data:`PAIR_COLUMNS`; ``same_model`` is True when both runs have the same model
    (size). n runs give n (n - 1) rows.
    """
    corr = correlation_matrix(traj)
    info = _run_info(traj).loc[corr.columns]
    runs = list(corr.columns)
    first, second = np.meshgrid(np.arange(len(runs)), np.arange(len(runs)), indexing="ij")
    keep = first != second
    i, j = first[keep], second[keep]
    pairs = pd.DataFrame(
        {
            "run1": [runs[k] for k in i],
            "run2": [runs[k] for k in j],
            "model1": info["model"].to_numpy()[i],
            "model2": info["model"].to_numpy()[j],
            "size1": info["size"].to_numpy()[i],
            "size2": info["size"].to_numpy()[j],
            "seed1": info["seed"].to_numpy()[i],
            "seed2": info["seed"].to_numpy()[j],
            "n_params1": info["n_params"].to_numpy()[i],
            "n_params2": info["n_params"].to_numpy()[j],
            "cor": corr.to_numpy()[i, j],
        }
    )
    pairs["same_model"] = pairs["model1"] == pairs["model2"]
    return pairs[PAIR_COLUMNS]


def size_correlations(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per model (size): mean and sd of r over within-size pairs and over between-size pairs.

    Between-size pairs are attributed to the size of their *first* run (the study's grouping).
    Means and sds are over ordered pairs (each unordered pair counted twice, which leaves the
    mean and sd of a symmetric table as over unordered pairs, up to the n-1 of the sd). Columns:
    ``model, within_r_mean, within_r_sd, within_n_pairs, between_r_mean, between_r_sd,
    between_n_pairs``.
    """
    within = pairs[pairs["same_model"]].groupby("model1")["cor"].agg(["mean", "std", "size"])
    between = pairs[~pairs["same_model"]].groupby("model1")["cor"].agg(["mean", "std", "size"])
    models = pd.Index(pairs["model1"].unique(), name="model")
    table = pd.DataFrame(index=models)
    table["within_r_mean"] = within["mean"]
    table["within_r_sd"] = within["std"]
    table["within_n_pairs"] = within["size"]
    table["between_r_mean"] = between["mean"]
    table["between_r_sd"] = between["std"]
    table["between_n_pairs"] = between["size"]
    table[["within_n_pairs", "between_n_pairs"]] = (
        table[["within_n_pairs", "between_n_pairs"]].fillna(0).astype(int)
    )
    return table.reset_index()


def overall_correlations(pairs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd (n-1) of r over all within-size pairs and over all between-size pairs.

    Columns ``kind`` (within/between), ``r_mean``, ``r_sd``, ``n_pairs`` (ordered pairs).
    """
    rows = []
    for kind, subset in (
        ("within", pairs[pairs["same_model"]]),
        ("between", pairs[~pairs["same_model"]]),
    ):
        rows.append(
            {
                "kind": kind,
                "r_mean": subset["cor"].mean(),
                "r_sd": subset["cor"].std(),
                "n_pairs": len(subset),
            }
        )
    return pd.DataFrame(rows)


def correlation_regressions(pairs: pd.DataFrame) -> pd.DataFrame:
    """The study's two OLS regressions of pairwise r, as a tidy regressions table.

    ``cor ~ same_model + log10(n_params1) + log10(n_params2)`` on all ordered pairs, and
    ``cor ~ log10(n_params1) + log10(n_params2)`` on between-size pairs (statsmodels formula OLS;
    t statistics). A regression whose design is rank deficient (e.g. one size only) is skipped
    with a reason. See :func:`mechgen.stats.regression.ols_table` for the columns.
    """
    data = pairs.assign(
        log10_n_params1=np.log10(pairs["n_params1"].astype(float)),
        log10_n_params2=np.log10(pairs["n_params2"].astype(float)),
        same_model=pairs["same_model"].astype(float),
    )
    terms = {
        "Intercept": "(Intercept)",
        "same_model": "same_modelTRUE",
        "log10_n_params1": "log10(n_params1)",
        "log10_n_params2": "log10(n_params2)",
    }
    note = "ordered pairs are not independent (each unordered pair twice); OLS SEs as printed by the study"
    tables = [
        ols_table(
            data,
            "cor ~ same_model + log10_n_params1 + log10_n_params2",
            analysis="cor_all_pairs",
            display_formula="cor ~ same_model + log10(n_params1) + log10(n_params2)",
            term_names=terms,
            note=note,
        ),
        ols_table(
            data[data["same_model"] == 0.0],
            "cor ~ log10_n_params1 + log10_n_params2",
            analysis="cor_between_size",
            display_formula="cor ~ log10(n_params1) + log10(n_params2)",
            term_names=terms,
            note=note,
        ),
    ]
    return pd.concat(tables, ignore_index=True)


def classical_mds(distances: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Classical (Torgerson) MDS: coordinates whose Euclidean distances best match ``distances``.

    ``B = -1/2 J D^2 J`` with ``J = I - 11'/n`` (double centring of the squared distances); the
    coordinates are the top-k eigenvectors of B scaled by the square roots of their eigenvalues
    (``numpy.linalg.eigh``). This is the definition (R's ``cmdscale``); scipy and scikit-learn
    only offer iterative (SMACOF) MDS. If ``distances`` are exactly Euclidean in <= k dimensions
    the coordinates reproduce them exactly (up to rotation/reflection). Non-positive eigenvalues
    among the top k (a non-Euclidean dissimilarity) give zero coordinates on those axes, with a
    warning. Returns ``(coordinates (n x k), all eigenvalues in decreasing order)``.
    """
    d = np.asarray(distances, dtype=float)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distances must be a square matrix, got shape {d.shape}")
    if not np.allclose(d, d.T, rtol=0, atol=1e-12 * max(1.0, float(np.abs(d).max()))):
        raise ValueError("distances must be symmetric")
    if not np.isfinite(d).all():
        raise ValueError("distances contain NaN/inf")
    n = d.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"classical MDS needs 1 <= k < n points; got k={k}, n={n}")
    centring = np.eye(n) - np.full((n, n), 1.0 / n)
    b = -0.5 * centring @ (d**2) @ centring
    eigenvalues, eigenvectors = np.linalg.eigh((b + b.T) / 2)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    # Eigenvalues within rounding of 0 count as 0 (the centring always leaves one exact 0).
    top = np.where(eigenvalues[:k] > 1e-10 * np.abs(eigenvalues).max(), eigenvalues[:k], 0.0)
    if (top <= 0).any():
        warnings.warn(
            f"only {int((top > 0).sum())} of the first {k} MDS eigenvalues are positive; "
            "the remaining axes are set to 0",
            stacklevel=2,
        )
    coordinates = eigenvectors[:, :k] * np.sqrt(top)
    return coordinates, eigenvalues


def mds_coordinates(corr: pd.DataFrame, traj: pd.DataFrame, k: int = 2) -> pd.DataFrame:
    """Classical MDS (:func:`classical_mds`) of the runs on the dissimilarity ``1 - r``.

    Returns one row per run: ``run, model, size, seed, n_params, mds1 .. mdsk``.
    """
    if corr.isna().to_numpy().any():
        raise ValueError(
            "the correlation matrix has NaN (a constant trajectory); MDS needs every r"
        )
    coordinates, _ = classical_mds(1.0 - corr.to_numpy(), k=k)
    info = _run_info(traj).loc[corr.columns].reset_index()
    for axis in range(k):
        info[f"mds{axis + 1}"] = coordinates[:, axis]
    return info


def separation_ratios(coords: pd.DataFrame, group: str = "model") -> pd.DataFrame:
    """Per group (size): how far its MDS cloud is from the other groups relative to its spread.

    ``inter`` = mean Euclidean distance from the group's centroid to the other groups'
    centroids; ``within`` = mean distance of the group's points to its own centroid;
    ``separation_ratio = inter / within`` (NaN with a single group). Columns ``model,
    mds_inter, mds_within, mds_separation``.
    """
    axes = [c for c in coords.columns if c.startswith("mds")]
    centroids = coords.groupby(group)[axes].mean()
    rows = []
    for name, centroid in centroids.iterrows():
        points = coords.loc[coords[group] == name, axes].to_numpy()
        within = float(np.mean(np.linalg.norm(points - centroid.to_numpy(), axis=1)))
        others = centroids.drop(index=name).to_numpy()
        inter = (
            float(np.mean(np.linalg.norm(others - centroid.to_numpy(), axis=1)))
            if len(others)
            else float("nan")
        )
        ratio = inter / within if within > 0 else float("nan")
        rows.append(
            {group: name, "mds_inter": inter, "mds_within": within, "mds_separation": ratio}
        )
    return pd.DataFrame(rows)
