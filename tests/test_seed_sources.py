"""mechgen.stats.seed_sources against independent computations: numpy variances, hand-worked shares and
chi-square bounds, a brute-force enumeration of the permutation test, and a planted data set
with known variance components."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from mechgen.stats import seed_sources as ss


def _runs(values: dict[str, list[float]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A runs table and a per_seed table with quantity `peak` from {kind: values}."""
    runs, rows = [], []
    for kind, xs in values.items():
        for i, x in enumerate(xs):
            run = f"m-{kind}-seed{i}"
            runs.append({"run": run, "kind": kind, "base_size": "m"})
            rows.append({"run": run, "peak": x})
    return pd.DataFrame(runs), pd.DataFrame(rows)


def test_hand_worked_case():
    runs, table = _runs({"data": [0, 1, 2], "weight": [0, 2, 4], "full": [0, 2.5, 5]})
    out = ss.seed_sources(runs, {"mech": table}, n_resamples=200)
    row = out[(out["mechanism"] == "mech") & (out["quantity"] == "peak")].iloc[0]
    assert (row["data_value"], row["weight_value"], row["full_value"]) == (1.0, 4.0, 6.25)
    # (full - weight) / full, (full - data) / full, (data + weight - full) / full.
    assert row["share_data"] == pytest.approx(2.25 / 6.25)
    assert row["share_weight"] == pytest.approx(5.25 / 6.25)
    assert row["share_interaction"] == pytest.approx(-1.25 / 6.25)
    assert row["ratio_data"] == pytest.approx(1 / 6.25)
    assert "outside [0, 1]" in row["note"]
    # chi-square bounds of s^2 = 1 at n = 3: 2 / chi2_{0.975, 2} and 2 / chi2_{0.025, 2}
    # (tabulated 7.3778 and 0.050636).
    assert row["data_chi2_low"] == pytest.approx(2 / 7.3778, rel=1e-4)
    assert row["data_chi2_high"] == pytest.approx(2 / 0.050636, rel=1e-4)
    assert row["perm_n_splits"] == 20 and row["perm_min_p"] == pytest.approx(0.1)
    # Bootstrap of the variance stays inside [0, max possible resample variance].
    assert 0 <= row["data_ci_low"] <= row["data_ci_high"] <= np.var([0, 2, 2], ddof=1) + 1e-9


def test_variances_match_numpy_brute_force():
    rng = np.random.default_rng(3)
    values = {k: list(rng.normal(size=5)) for k in ss.KINDS}
    runs, table = _runs(values)
    out = ss.seed_sources(runs, {"mech": table}, n_resamples=100).iloc[0]
    for kind, xs in values.items():
        mean = sum(xs) / len(xs)
        brute = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
        assert out[f"{kind}_value"] == pytest.approx(brute)
        assert out[f"{kind}_n"] == 5


def test_permutation_p_matches_enumeration():
    a = np.array([0.1, 2.0, -1.5])
    b = np.array([0.3, 0.2, 0.35])
    p, n_splits, _ = ss.variance_permutation_test(a, b)
    pooled = np.concatenate([a - a.mean(), b - b.mean()])
    observed = np.var(a, ddof=1) - np.var(b, ddof=1)
    stats = []
    for idx in itertools.combinations(range(6), 3):
        rest = [i for i in range(6) if i not in idx]
        stats.append(np.var(pooled[list(idx)], ddof=1) - np.var(pooled[rest], ddof=1))
    stats = np.array(stats)
    greater = np.mean(stats >= observed - 1e-12)
    less = np.mean(stats <= observed + 1e-12)
    assert n_splits == len(stats) == 20
    assert p == pytest.approx(min(1.0, 2 * min(greater, less)))
    assert p == pytest.approx(0.1)  # the most extreme split: the floor of a 3 + 3 design


def test_planted_components_are_recovered():
    """q = D + W with Var(D) = 4, Var(W) = 1, no interaction: shares 0.8 / 0.2 / 0."""
    rng = np.random.default_rng(0)
    n = 1500
    d_fixed, w_fixed = rng.normal(0, 2), rng.normal(0, 1)
    values = {
        "data": list(rng.normal(0, 2, n) + w_fixed),
        "weight": list(d_fixed + rng.normal(0, 1, n)),
        "full": list(rng.normal(0, 2, n) + rng.normal(0, 1, n)),
    }
    runs, table = _runs(values)
    row = ss.seed_sources(runs, {"mech": table}, n_resamples=50).iloc[0]
    assert row["data_value"] == pytest.approx(4, rel=0.12)
    assert row["weight_value"] == pytest.approx(1, rel=0.12)
    assert row["share_data"] == pytest.approx(0.8, abs=0.08)
    assert row["share_weight"] == pytest.approx(0.2, abs=0.08)
    assert row["share_interaction"] == pytest.approx(0.0, abs=0.08)
    # At this n the bootstrap and chi-square intervals agree and cover the truth.
    assert row["data_ci_low"] < 4 < row["data_ci_high"]
    assert row["data_chi2_low"] < 4 < row["data_chi2_high"]
    assert row["data_ci_low"] == pytest.approx(row["data_chi2_low"], rel=0.1)


def test_flagged_run_is_excluded_and_named():
    runs, table = _runs({"data": [0, 1, 2, 100], "weight": [0, 2, 4]})
    lineage = pd.DataFrame(
        [
            {"run": "m-data-seed3", "step": 1, "flagged": True, "flags": "not_own_init"},
            {"run": "m-data-seed0", "step": 1, "flagged": False, "flags": ""},
        ]
    )
    row = ss.seed_sources(runs, {"mech": table}, lineage=lineage, n_resamples=50).iloc[0]
    assert row["data_n"] == 3 and row["data_value"] == 1.0
    assert row["excluded_runs"] == "m-data-seed3"
    assert "not_own_init" in row["exclusion_reason"]
    assert math.isnan(row["share_data"])  # no full seeds: no shares


def test_convergence_rows_match_numpy():
    rng = np.random.default_rng(1)
    steps = [0, 10, 100, 1000]
    base = np.array([0.0, 0.2, 0.7, 1.0])
    kinds = {"r-d1": "data", "r-d2": "data", "r-w1": "weight", "r-w2": "weight"}
    traj = pd.DataFrame(
        [
            {"run": run, "step": s, "value": v + rng.normal(0, 0.1)}
            for run in kinds
            for s, v in zip(steps, base, strict=True)
        ]
    )
    runs = pd.DataFrame([{"run": r, "kind": k, "base_size": "m"} for r, k in kinds.items()])
    per_seed = pd.DataFrame({"run": list(kinds), "peak": [1.0, 2.0, 3.0, 5.0]})
    out = ss.seed_sources(runs, {"mech": per_seed}, trajectories={"mech": traj}, n_resamples=50)
    conv = out[out["quantity"] == "convergence_r"].iloc[0]
    wide = traj.pivot(index="step", columns="run", values="value")
    r = wide.corr()
    assert conv["data_value"] == pytest.approx(r.loc["r-d1", "r-d2"])
    assert conv["weight_value"] == pytest.approx(r.loc["r-w1", "r-w2"])
    across = [r.loc[a, b] for a in ("r-d1", "r-d2") for b in ("r-w1", "r-w2")]
    assert conv["across_value"] == pytest.approx(np.mean(across))
    assert conv["across_n"] == 4 and conv["data_n"] == 1


def test_columns_are_documented():
    from test_outputs import documented_columns

    from mechgen.stats import lineage

    sections = documented_columns()
    assert set(ss.COLUMNS) == sections["stats/seed_sources.csv"]
    assert set(lineage.COLUMNS) == sections["stats/lineage.csv"]
