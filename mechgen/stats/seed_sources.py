"""Data order or initialisation? Split the cross-seed variance of every mechanism quantity.

A suite whose runs are marked full / data / weight (:mod:`mechgen.variation`) gives, for one
base size and one quantity q (one value per run), three sample variances (ddof = 1):

* ``data_value`` = Var(q) over the data variants (init fixed, data order varies);
* ``weight_value`` = Var(q) over the weight variants (data order fixed, init varies);
* ``full_value`` = Var(q) over the full seeds (both vary).

Each with two intervals at ``confidence``: a percentile bootstrap (``scipy.stats.bootstrap``,
resampling runs) and the normal-theory chi-square interval
[(n - 1) s^2 / chi2_{1-a/2, n-1}, (n - 1) s^2 / chi2_{a/2, n-1}]. At n = 3 the bootstrap can only
draw 10 distinct resamples, a third of which have variance 0: its interval is far too narrow and
is kept because the issue asks for it; the chi-square interval (width ~ 40 x s^2 at n = 3, 95%)
is the honest one when q is roughly normal.

``perm_p``: two-sided permutation test of Var(data) = Var(weight), statistic
Var(data) - Var(weight) on the values centred within each kind (so that a shift in mean is not
read as a difference in spread), exact over every split of the pooled values
(``scipy.stats.permutation_test``, ``n_resamples=inf``). Centring makes the test approximate
(the centred values are not exchangeable), and with 3 + 3 runs there are only 20 splits: the
smallest p it can give is ``perm_min_p`` = 2/20 = 0.1, so it can never reject at 5%.

Shares, where full seeds are present, under the two-factor random-effects model
q = mu + D + W + DW (D: data order, W: init, DW: their interaction plus noise), for which
E Var(data) = V_D + V_DW, E Var(weight) = V_W + V_DW, E Var(full) = V_D + V_W + V_DW:

* ``share_data`` = (full - weight) / full  (estimates V_D / V_full);
* ``share_weight`` = (full - data) / full  (V_W / V_full);
* ``share_interaction`` = (data + weight - full) / full  (V_DW / V_full).

They sum to 1 by construction; any of them can fall outside [0, 1] from sampling noise (at
n = 3 that is common) or if the sources are not additive, and ``note`` says so. The plain ratios
``ratio_data`` = data / full and ``ratio_weight`` = weight / full do not add up: each counts the
interaction once.

The convergence rows (``quantity`` = ``convergence_r``, ``statistic`` = ``mean_r``): the
Pearson r of two runs' normalised trajectories over their shared steps (at least 3), averaged
over pairs within each kind (``data_value``, ``weight_value``, ``full_value``) and over pairs of
runs of different kinds (``across_value``); bootstrap intervals resample pairs, which share runs
and so are not independent (the intervals are too narrow).

A run flagged by the lineage check (``stats/lineage.csv``, :mod:`mechgen.stats.lineage`) is left out
of every statistic; ``excluded_runs`` and ``exclusion_reason`` say which and why.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

KINDS = ("data", "weight", "full")
"""The variation kinds, in the column order of the table (mechgen.variation.VARIATION_KINDS)."""

QUANTITIES: tuple[tuple[str, str], ...] = (
    ("onset_step", "step"),
    ("slope", "normalised per decade"),
    ("peak", "normalised"),
    ("final_layer", "layer"),
    ("final_relative_depth", "fraction"),
)
"""Per-mechanism quantities of ``stats/<mechanism>/per_seed.csv`` and their units."""

RELATIONAL_QUANTITIES: tuple[tuple[str, str], ...] = (
    ("lag_steps", "step"),
    ("induction_drop", "prob"),
)
"""Quantities of ``stats/relational.csv`` (mechanism ``relational``: 1-back -> induction)."""

COLUMNS = [
    "base_size",
    "mechanism",
    "quantity",
    "unit",
    "statistic",
    *[
        f"{k}_{c}"
        for k in KINDS
        for c in ("n", "value", "ci_low", "ci_high", "chi2_low", "chi2_high")
    ],
    "across_n",
    "across_value",
    "perm_p",
    "perm_n_splits",
    "perm_min_p",
    "ratio_data",
    "ratio_weight",
    "share_data",
    "share_weight",
    "share_interaction",
    "excluded_runs",
    "exclusion_reason",
    "note",
]
"""Columns of ``stats/seed_sources.csv`` (docs/outputs.md)."""


def sample_variance(values: Sequence[float]) -> float:
    """Var with ddof = 1 of the finite ``values`` (NaN with fewer than 2)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    return float(np.var(x, ddof=1)) if len(x) >= 2 else math.nan


def chi2_interval(values: Sequence[float], confidence: float) -> tuple[float, float]:
    """Normal-theory interval of the variance: (n-1)s^2 / chi2 quantiles (NaN for n < 2)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n < 2:
        return math.nan, math.nan
    ss = (n - 1) * float(np.var(x, ddof=1))
    alpha = 1 - confidence
    return (
        ss / float(scipy_stats.chi2.ppf(1 - alpha / 2, n - 1)),
        ss / float(scipy_stats.chi2.ppf(alpha / 2, n - 1)),
    )


def _var_stat(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.var(x, ddof=1, axis=axis)


def _mean_stat(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def bootstrap_interval(
    values: Sequence[float],
    statistic: str,
    confidence: float,
    n_resamples: int,
    seed: int,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the variance (``statistic="variance"``) or the mean of the
    finite ``values`` (``scipy.stats.bootstrap``); (v, v) when every value is equal, NaN with
    fewer than 2 values."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return math.nan, math.nan
    func = _var_stat if statistic == "variance" else _mean_stat
    if np.ptp(x) == 0:
        v = float(func(x))
        return v, v
    with warnings.catch_warnings():
        # A degenerate resample distribution (common at n = 3) warns; the interval stands.
        warnings.simplefilter("ignore")
        res = scipy_stats.bootstrap(
            (x,),
            func,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="percentile",
            random_state=np.random.default_rng(seed),
            vectorized=True,
        )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


MAX_EXACT_SPLITS = 9999
"""Above this many splits the permutation test draws 9,999 random ones instead."""


def variance_permutation_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, int, float]:
    """(p, n_splits, min_p): two-sided exact permutation test of Var(a) = Var(b) on the values
    centred within each group, statistic Var(a) - Var(b) (ddof = 1), exact over the
    ``n_splits`` = C(n_a + n_b, n_a) splits (above :data:`MAX_EXACT_SPLITS`, that many random
    splits, and ``n_splits`` is their number); ``min_p`` the smallest p the test can return, 2 / n_splits (the statistic is symmetric
    under swapping the groups when n_a = n_b, so the observed split and its mirror both count).
    NaN with fewer than 2 finite values in a group."""
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if len(x) < 2 or len(y) < 2:
        return math.nan, 0, math.nan
    exact = math.comb(len(x) + len(y), len(x)) <= MAX_EXACT_SPLITS
    n_splits = math.comb(len(x) + len(y), len(x)) if exact else MAX_EXACT_SPLITS
    res = scipy_stats.permutation_test(
        (x - x.mean(), y - y.mean()),
        lambda u, v, axis: _var_stat(u, axis) - _var_stat(v, axis),
        permutation_type="independent",
        alternative="two-sided",
        # Exact up to MAX_EXACT_SPLITS splits (every decoupled design here), else Monte Carlo.
        n_resamples=np.inf if exact else MAX_EXACT_SPLITS,
        vectorized=True,
        random_state=np.random.default_rng(0),
    )
    # scipy counts the observed split among the random ones: p >= 1 / (n + 1) one-sided.
    return float(res.pvalue), n_splits, min(1.0, 2.0 / (n_splits if exact else n_splits + 1))


def shares(data: float, weight: float, full: float) -> dict[str, float]:
    """The ratios and additive shares of the module docstring (NaN unless full > 0)."""
    out = dict.fromkeys(
        ("ratio_data", "ratio_weight", "share_data", "share_weight", "share_interaction"),
        math.nan,
    )
    if not (np.isfinite(full) and full > 0):
        return out
    out["ratio_data"] = data / full
    out["ratio_weight"] = weight / full
    out["share_data"] = (full - weight) / full
    out["share_weight"] = (full - data) / full
    out["share_interaction"] = (data + weight - full) / full
    return out


def _row(
    base: str,
    mechanism: str,
    quantity: str,
    unit: str,
    by_kind: Mapping[str, np.ndarray],
    confidence: float,
    n_resamples: int,
    seed: int,
) -> dict[str, object]:
    row: dict[str, object] = {
        "base_size": base,
        "mechanism": mechanism,
        "quantity": quantity,
        "unit": unit,
        "statistic": "variance",
        "across_n": 0,
        "across_value": math.nan,
    }
    notes = []
    for kind in KINDS:
        x = by_kind.get(kind, np.array([]))
        finite = x[np.isfinite(x)]
        row[f"{kind}_n"] = len(finite)
        row[f"{kind}_value"] = sample_variance(finite)
        row[f"{kind}_ci_low"], row[f"{kind}_ci_high"] = bootstrap_interval(
            finite, "variance", confidence, n_resamples, seed
        )
        row[f"{kind}_chi2_low"], row[f"{kind}_chi2_high"] = chi2_interval(finite, confidence)
        if len(finite) < len(x):
            notes.append(f"{kind}: {len(x) - len(finite)} run(s) without a value")
    p, n_splits, min_p = variance_permutation_test(
        by_kind.get("data", []), by_kind.get("weight", [])
    )
    row.update(perm_p=p, perm_n_splits=n_splits, perm_min_p=min_p)
    s = shares(row["data_value"], row["weight_value"], row["full_value"])  # type: ignore[arg-type]
    row.update(s)
    additive = [s["share_data"], s["share_weight"], s["share_interaction"]]
    if any(np.isfinite(v) and not 0 <= v <= 1 for v in additive):
        notes.append("a share outside [0, 1]: sampling noise at this n, or non-additive sources")
    row["note"] = "; ".join(notes)
    return row


def pairwise_r(norm: pd.DataFrame) -> pd.DataFrame:
    """Pearson r of every unordered pair of runs' trajectories (``norm``: run, step, value) over
    their shared steps with finite values; pairs with fewer than 3 shared steps or a constant
    trajectory are left out. Columns run_a, run_b, r, n_steps."""
    wide = norm.pivot_table(index="step", columns="run", values="value", aggfunc="first")
    rows = []
    for a, b in itertools.combinations(sorted(wide.columns), 2):
        pair = wide[[a, b]].dropna()
        pair = pair[np.isfinite(pair).all(axis=1)]
        if len(pair) < 3 or pair[a].std() == 0 or pair[b].std() == 0:
            continue
        r = float(np.corrcoef(pair[a], pair[b])[0, 1])
        rows.append({"run_a": a, "run_b": b, "r": r, "n_steps": len(pair)})
    return pd.DataFrame(rows, columns=["run_a", "run_b", "r", "n_steps"])


def _convergence_row(
    base: str,
    mechanism: str,
    norm: pd.DataFrame,
    kind_of: Mapping[str, str],
    confidence: float,
    n_resamples: int,
    seed: int,
) -> dict[str, object]:
    pairs = pairwise_r(norm[norm["run"].isin(list(kind_of))])
    row: dict[str, object] = dict.fromkeys(COLUMNS, math.nan)
    row.update(
        base_size=base,
        mechanism=mechanism,
        quantity="convergence_r",
        unit="Pearson r",
        statistic="mean_r",
        perm_n_splits=0,
    )
    ka = pairs["run_a"].map(kind_of)
    kb = pairs["run_b"].map(kind_of)
    for kind in KINDS:
        r = pairs.loc[(ka == kind) & (kb == kind), "r"].to_numpy()
        row[f"{kind}_n"] = len(r)
        row[f"{kind}_value"] = float(r.mean()) if len(r) else math.nan
        row[f"{kind}_ci_low"], row[f"{kind}_ci_high"] = bootstrap_interval(
            r, "mean", confidence, n_resamples, seed
        )
    across = pairs.loc[ka != kb, "r"].to_numpy()
    row["across_n"] = len(across)
    row["across_value"] = float(across.mean()) if len(across) else math.nan
    row["note"] = "pairs share runs: the pair bootstrap intervals are too narrow"
    return row


def seed_sources(
    runs: pd.DataFrame,
    per_seed: Mapping[str, pd.DataFrame],
    trajectories: Mapping[str, pd.DataFrame] | None = None,
    relational: pd.DataFrame | None = None,
    lineage: pd.DataFrame | None = None,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """The table ``stats/seed_sources.csv`` (:data:`COLUMNS`; see the module docstring).

    ``runs``: one row per run with ``run``, ``kind`` (full/data/weight) and ``base_size``.
    ``per_seed``: mechanism -> its ``stats/<mechanism>/per_seed.csv`` (:data:`QUANTITIES`).
    ``trajectories``: mechanism -> normalised trajectories (run, step, value) for the
    convergence rows. ``relational``: ``stats/relational.csv`` (:data:`RELATIONAL_QUANTITIES`,
    mechanism ``relational``). ``lineage``: ``stats/lineage.csv``; its runs with ``flagged``
    True are excluded. One row per base size x mechanism x quantity, for base sizes with at
    least two kinds of runs.
    """
    excluded: dict[str, str] = {}
    if lineage is not None and len(lineage):
        flagged = lineage[lineage["flagged"].astype(bool)]
        for run, group in flagged.groupby("run"):
            excluded[str(run)] = "; ".join(sorted(set(group["flags"].astype(str))))
    rows = []
    for base, group in runs.groupby("base_size", sort=True):
        if group["kind"].nunique() < 2:
            continue
        out_runs = sorted(r for r in group["run"] if r in excluded)
        reason = " | ".join(f"{r}: lineage {excluded[r]}" for r in out_runs)
        kept = group[~group["run"].isin(out_runs)]
        kind_of = dict(zip(kept["run"], kept["kind"], strict=True))
        sources: list[tuple[str, pd.DataFrame, tuple[tuple[str, str], ...]]] = [
            (name, table, QUANTITIES) for name, table in sorted(per_seed.items())
        ]
        if relational is not None and len(relational):
            sources.append(("relational", relational, RELATIONAL_QUANTITIES))
        for mechanism, table, quantities in sources:
            table = table[table["run"].isin(list(kind_of))]
            for quantity, unit in quantities:
                if quantity not in table:
                    continue
                values = pd.to_numeric(table[quantity], errors="coerce")
                by_kind = {
                    k: values[table["run"].map(kind_of) == k].to_numpy(dtype=float) for k in KINDS
                }
                rows.append(
                    {
                        **_row(
                            base, mechanism, quantity, unit, by_kind, confidence, n_resamples, seed
                        ),
                        "excluded_runs": ";".join(out_runs),
                        "exclusion_reason": reason,
                    }
                )
            if trajectories is not None and mechanism in trajectories:
                row = _convergence_row(
                    base, mechanism, trajectories[mechanism], kind_of, confidence, n_resamples, seed
                )
                row.update(excluded_runs=";".join(out_runs), exclusion_reason=reason)
                rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)
