"""mechgen reproduces every number Trott (2025) printed, from the study's own tables.

The data are a subset of the study's 576 per-head tables (tests/data/trott2025, made by
scripts/make_trott_test_subset.py): the 36 final-step tables whole, and the max-``mean_1back``
row of each of the other 540 (the trajectory is the max over heads, so it is unchanged). The
printed numbers are in tests/data/trott2025/published.json (from the study's rendered analysis,
as listed in the reference README); each must match to half a unit of its last printed digit,
except the three entries whose ``tolerance``/``note`` there explain why lme4's printed digit is
one unit off the exact optimum.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import optimize
from test_stats import brute_force_fit, profile_likelihood

from mechgen.axes.developmental import trajectories
from mechgen.stats import analysis as stats
from mechgen.tables.heads import compare_trott2025, read_trott2025, trott2025_value

DATA = Path(__file__).parent / "data" / "trott2025"
PUBLISHED = json.loads((DATA / "published.json").read_text())["numbers"]


@pytest.fixture(scope="module")
def heads() -> pd.DataFrame:
    return read_trott2025(DATA)


@pytest.fixture(scope="module")
def results(heads: pd.DataFrame) -> dict[str, pd.DataFrame]:
    traj = trajectories(heads, "one_back")
    return {**stats.analyze(heads, traj), "trajectories": traj}


def test_subset_is_small_and_complete(
    heads: pd.DataFrame, results: dict[str, pd.DataFrame]
) -> None:
    size = sum(p.stat().st_size for p in DATA.iterdir())
    assert size < 2_000_000
    assert heads["run"].nunique() == 36
    traj = results["trajectories"]
    assert len(traj) == 36 * 16 and (traj.groupby("run")["step"].nunique() == 16).all()
    final = heads[heads["step"] == 143_000]
    # Every head of every run at the final step: 9 seeds x (6x4 + 6x8 + 12x12 + 24x16) heads.
    assert len(final) == 9 * (24 + 48 + 144 + 384) == 5400
    assert len(results["convergence"]) == 1260


@pytest.mark.parametrize("entry", PUBLISHED, ids=[e["quantity"] for e in PUBLISHED])
def test_published_number(results: dict[str, pd.DataFrame], entry: dict) -> None:
    comparison = compare_trott2025(results, [entry]).iloc[0]
    value = trott2025_value(results, entry["quantity"])
    assert comparison["mechgen"] == value
    assert abs(value - float(entry["printed"])) <= comparison["tolerance"] * (1 + 1e-9), (
        f"{entry['quantity']}: mechgen {value!r} vs printed {entry['printed']}"
    )


def test_singular_flags_as_lme4(results: dict[str, pd.DataFrame]) -> None:
    flags = results["regressions"].groupby("analysis")["singular"].first()
    assert flags[["onset_size", "peak_size", "slope_size", "time"]].all()
    assert not flags["prop_layer"]
    variances = (
        results["regressions"]
        .query("effect == 'variance'")
        .set_index(["analysis", "term"])["estimate"]
    )
    for analysis in ("onset_size", "peak_size", "slope_size", "time"):
        assert variances[(analysis, "Var(seed)")] == 0.0
    assert (
        variances[("prop_layer", "Var(head)")] > 0 and variances[("prop_layer", "Var(model)")] > 0
    )


def test_seed_level_models_equal_ols(results: dict[str, pd.DataFrame]) -> None:
    """The three size models are singular, so their REML fit is OLS (estimates and SEs)."""
    per_seed = results["per_seed"].assign(
        log10_n_params=lambda d: np.log10(d["n_params"].astype(float)),
        log10_onset=lambda d: np.log10(d["onset_step"]),
    )
    table = results["regressions"].query("effect == 'fixed'").set_index(["analysis", "term"])
    for analysis, response in (
        ("onset_size", "log10_onset"),
        ("peak_size", "peak"),
        ("slope_size", "slope"),
    ):
        ols = smf.ols(f"{response} ~ log10_n_params", per_seed).fit()
        for term, ols_term in (("(Intercept)", "Intercept"), ("log10(n_params)", "log10_n_params")):
            assert table.loc[(analysis, term), "estimate"] == pytest.approx(
                ols.params[ols_term], rel=1e-10
            )
            assert table.loc[(analysis, term), "se"] == pytest.approx(ols.bse[ols_term], rel=1e-10)


def test_time_model_is_the_true_ml_optimum(results: dict[str, pd.DataFrame]) -> None:
    """statsmodels' default fit stops at a worse optimum; mechgen's equals the brute-force one."""
    traj = results["trajectories"].assign(log10_step_modded=lambda d: np.log10(d["step"] + 1.0))
    model = smf.mixedlm(
        "value ~ log10_step_modded",
        traj,
        groups=np.zeros(len(traj)),
        re_formula="0",
        vc_formula={"seed": "0 + C(seed)", "model": "0 + C(model)"},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = model.fit(reml=False)  # statsmodels' default optimisers (bfgs, lbfgs, cg)
    x = np.column_stack([np.ones(len(traj)), traj["log10_step_modded"]])
    zs = [pd.get_dummies(traj[f]).to_numpy(dtype=float) for f in ("seed", "model")]
    truth = brute_force_fit(traj["value"].to_numpy(), x, zs, reml=False)
    assert truth["ratios"][0] == 0.0  # the seed variance is on the boundary

    time = results["regressions"].query("analysis == 'time'").set_index("term")
    llf = time["llf"].iloc[0]
    assert llf == pytest.approx(truth["llf"], abs=1e-6)
    assert (
        llf > default.llf + 1.0
    )  # the default fit is a worse optimum (here logLik ~345.6 or ~361)
    assert time.loc[["(Intercept)", "log10(step_modded)"], "estimate"].to_numpy() == pytest.approx(
        truth["beta"], abs=1e-8
    )
    assert time.loc[["(Intercept)", "log10(step_modded)"], "se"].to_numpy() == pytest.approx(
        truth["se"], rel=1e-4
    )
    assert time.loc["Var(model)", "estimate"] == pytest.approx(truth["variances"][1], rel=1e-3)
    assert time.loc["Var(residual)", "estimate"] == pytest.approx(truth["sigma2"], rel=1e-5)


def _brute_force_reml_from_cross_products(
    y: np.ndarray, x: np.ndarray, zs: list[np.ndarray]
) -> dict:
    """test_stats.brute_force_fit (REML, L-BFGS-B over the variance ratios from the same grid of
    starts) with test_stats.profile_likelihood's formula evaluated from the cross-products of
    [X Z y] alone: with W = [X y], every W'H^-1 W = W'W - W'Z S (I + S Z'Z S)^-1 S Z'W (Woodbury,
    as there) and |H| = |I + S Z'Z S|. So each evaluation costs (p + q + 1)^2, not n x q (here
    n = 5400 rows): the same optimum, in milliseconds instead of seconds."""
    n, p = x.shape
    z = np.hstack(zs)
    w = np.column_stack([x, y])
    zz, zw, ww = z.T @ z, z.T @ w, w.T @ w

    def reml(ratios: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, float]:
        scale = np.sqrt(np.concatenate([np.full(zk.shape[1], r) for zk, r in zip(zs, ratios)]))
        inner = np.eye(len(zz)) + scale[:, None] * zz * scale[None, :]
        szw = scale[:, None] * zw
        wvw = ww - szw.T @ np.linalg.solve(inner, szw)  # W'H^-1 W
        xtvx, xtvy, ytvy = wvw[:p, :p], wvw[:p, p], wvw[p, p]
        beta = np.linalg.solve(xtvx, xtvy)
        q = float(ytvy - xtvy @ beta)  # (y - X b)' H^-1 (y - X b) at the GLS b
        m = n - p
        loglik = (
            -m / 2 * (1 + math.log(2 * math.pi * q / m))
            - np.linalg.slogdet(inner)[1] / 2
            - np.linalg.slogdet(xtvx)[1] / 2
        )
        se = np.sqrt(np.diag(q / m * np.linalg.inv(xtvx)))
        return loglik, beta, se, q / m

    best = None
    for start in itertools.product((0.0, 0.3, 3.0), repeat=len(zs)):
        result = optimize.minimize(
            lambda r: -reml(r)[0],
            np.array(start),
            method="L-BFGS-B",
            bounds=[(0.0, None)] * len(zs),
            options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 5000},
        )
        if best is None or result.fun < best.fun:
            best = result
    loglik, beta, se, sigma2 = reml(best.x)
    # The cross-product form is test_stats' profile likelihood, evaluated the long way here.
    reference = profile_likelihood(y, x, zs, best.x, reml=True)
    assert loglik == pytest.approx(reference[0], abs=1e-8)
    assert np.concatenate([beta, se, [sigma2]]) == pytest.approx(
        np.concatenate([reference[1], reference[2], [reference[3]]]), rel=1e-9
    )
    return {"ratios": best.x, "variances": best.x * sigma2, "llf": loglik, "beta": beta, "se": se}


def test_prop_layer_model_is_the_true_reml_optimum(
    results: dict[str, pd.DataFrame], heads: pd.DataFrame
) -> None:
    final = stats.final_step_heads(heads)
    x = np.column_stack([np.ones(len(final)), final["prop_layer"]])
    zs = [pd.get_dummies(final[f]).to_numpy(dtype=float) for f in ("head", "model")]
    truth = _brute_force_reml_from_cross_products(final["one_back"].to_numpy(), x, zs)
    prop = results["regressions"].query("analysis == 'prop_layer'").set_index("term")
    assert prop["llf"].iloc[0] == pytest.approx(truth["llf"], abs=1e-6)
    assert prop.loc[["(Intercept)", "prop_layer"], "estimate"].to_numpy() == pytest.approx(
        truth["beta"], abs=1e-6
    )
    # statsmodels' Hessian-based SE vs lme4's sigma^2 (X'V^-1 X)^-1: within 0.05% here.
    assert prop.loc[["(Intercept)", "prop_layer"], "se"].to_numpy() == pytest.approx(
        truth["se"], rel=5e-4
    )
    assert prop.loc["Var(model)", "estimate"] == pytest.approx(truth["variances"][1], rel=1e-3)
    assert prop.loc["Var(head)", "estimate"] == pytest.approx(truth["variances"][0], rel=1e-2)


def test_onset_and_depth_are_defined_for_every_run(results: dict[str, pd.DataFrame]) -> None:
    per_seed = results["per_seed"]
    assert (per_seed["onset_n_thresholds"] == 30).all()
    assert per_seed["onset_logistic_step"].notna().all()
    # final_relative_depth is the study's prop_layer of the max head: Layer / n_layers, 1-indexed.
    assert ((per_seed["final_relative_depth"] * per_seed["n_layers"]).round(9) % 1 == 0).all()
    assert per_seed["onset_tokens"].to_numpy() == pytest.approx(
        per_seed["onset_step"].to_numpy() * 2_097_152
    )
    assert not math.isnan(results["per_model"]["mds_separation"].sum())
