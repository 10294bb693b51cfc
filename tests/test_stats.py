"""Tests of mechgen.stats.analysis (mixed models, OLS tables, bootstrap, analyze) and mechgen.axes.convergence.

The mixed-model answers are checked against an independent computation written here: the
closed-form profile (RE)ML likelihood of a linear model with random intercepts, maximised by
brute force over the variance ratios with scipy.optimize (see :func:`profile_likelihood`).
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import optimize
from statsmodels.regression.mixed_linear_model import MixedLMParams

from mechgen.axes import convergence
from mechgen.axes.developmental import trajectories
from mechgen.stats import analysis as stats


def make_heads(
    models: dict[str, tuple[int, int, int]] | None = None,
    seeds: tuple[int, ...] = (1, 2, 3),
    steps: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
    seed: int = 0,
) -> pd.DataFrame:
    """A random per-head table (uniform one_back): model -> (n_layers, n_heads, n_params)."""
    models = models or {"toy-tiny": (2, 3, 1_000_000), "toy-small": (3, 4, 4_000_000)}
    rng = np.random.default_rng(seed)
    rows = [
        {
            "suite": "toy",
            "model": model,
            "size": model.removeprefix("toy-"),
            "seed": s,
            "run": f"{model}-seed{s}",
            "step": step,
            "tokens_seen": step * 2048,
            "layer": layer,
            "head": head,
            "n_layers": n_layers,
            "n_heads": n_heads,
            "n_params": n_params,
            "one_back": float(rng.uniform()),
            "nonfinite": False,
        }
        for model, (n_layers, n_heads, n_params) in models.items()
        for s in seeds
        for step in steps
        for layer in range(n_layers)
        for head in range(n_heads)
    ]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ independent likelihood


def profile_likelihood(
    y: np.ndarray, x: np.ndarray, zs: list[np.ndarray], ratios: np.ndarray, reml: bool
) -> tuple[float, np.ndarray, np.ndarray, float]:
    """Profile (RE)ML log-likelihood of y = X b + sum_k Z_k u_k + e at variance ratios r_k.

    Model: u_k ~ N(0, tau_k^2 I), e ~ N(0, sigma^2 I), so Var(y) = sigma^2 H with
    H = I + sum_k r_k Z_k Z_k', r_k = tau_k^2 / sigma^2 >= 0. With Z = [Z_1 .. Z_K] and
    S = diag(sqrt(r_k) per column), H = I + (Z S)(Z S)'; Woodbury and the determinant lemma give
    H^-1 = I - Z S (I + S Z'Z S)^-1 S Z' and |H| = |I + S Z'Z S|, both valid at r_k = 0.
    The GLS estimate b = (X'H^-1 X)^-1 X'H^-1 y and Q = (y - X b)' H^-1 (y - X b). Maximising
    over sigma^2:
      ML:   sigma^2 = Q / n,       l = -n/2 (1 + log(2 pi Q / n)) - 1/2 log|H|
      REML: sigma^2 = Q / (n - p), l = -(n-p)/2 (1 + log(2 pi Q / (n-p))) - 1/2 log|H|
                                      - 1/2 log|X'H^-1 X|
    (REML = likelihood of n - p error contrasts, Harville 1974, without the constant
    +1/2 log|X'X|, as lme4 and statsmodels do). Var(b) = sigma^2 (X'H^-1 X)^-1 (lme4's vcov).
    Returns (l, b, SE(b), sigma^2).
    """
    n, p = x.shape
    z = np.hstack(zs)
    scale = np.sqrt(np.concatenate([np.full(zk.shape[1], r) for zk, r in zip(zs, ratios)]))
    zscaled = z * scale
    inner = np.eye(z.shape[1]) + zscaled.T @ zscaled
    logdet_h = np.linalg.slogdet(inner)[1]

    def h_inverse(a: np.ndarray) -> np.ndarray:
        return a - zscaled @ np.linalg.solve(inner, zscaled.T @ a)

    xtvx = x.T @ h_inverse(x)
    beta = np.linalg.solve(xtvx, x.T @ h_inverse(y))
    resid = y - x @ beta
    q = float(resid @ h_inverse(resid))
    if reml:
        m = n - p
        loglik = (
            -m / 2 * (1 + math.log(2 * math.pi * q / m))
            - logdet_h / 2
            - np.linalg.slogdet(xtvx)[1] / 2
        )
        sigma2 = q / m
    else:
        loglik = -n / 2 * (1 + math.log(2 * math.pi * q / n)) - logdet_h / 2
        sigma2 = q / n
    se = np.sqrt(np.diag(sigma2 * np.linalg.inv(xtvx)))
    return loglik, beta, se, sigma2


def brute_force_fit(y: np.ndarray, x: np.ndarray, zs: list[np.ndarray], reml: bool) -> dict:
    """Maximise :func:`profile_likelihood` over ratios >= 0: L-BFGS-B from a grid of starts."""
    best = None
    for start in itertools.product((0.0, 0.3, 3.0), repeat=len(zs)):
        result = optimize.minimize(
            lambda r: -profile_likelihood(y, x, zs, r, reml)[0],
            np.array(start),
            method="L-BFGS-B",
            bounds=[(0.0, None)] * len(zs),
            options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 5000},
        )
        if best is None or result.fun < best.fun:
            best = result
    loglik, beta, se, sigma2 = profile_likelihood(y, x, zs, best.x, reml)
    return {
        "ratios": best.x,
        "variances": best.x * sigma2,
        "llf": loglik,
        "beta": beta,
        "se": se,
        "sigma2": sigma2,
    }


def crossed_data(
    seed: int = 42, tau2: tuple[float, float] = (0.5, 0.2), zero_b: bool = False
) -> pd.DataFrame:
    """y = 1 + 0.5 x + a[fa] + b[fb] + e; 8 x 6 crossed levels, 4 replicates, sigma^2 = 1.

    ``zero_b`` removes every between-fb difference of the noise and sets b = 0, so fb explains
    nothing and its variance estimate is on the boundary.
    """
    rng = np.random.default_rng(seed)
    a = rng.normal(0, math.sqrt(tau2[0]), 8)
    b = np.zeros(6) if zero_b else rng.normal(0, math.sqrt(tau2[1]), 6)
    rows = [
        (i, j, rng.normal(), rng.normal()) for i in range(8) for j in range(6) for _ in range(4)
    ]
    data = pd.DataFrame(rows, columns=["fa", "fb", "x", "e"])
    if zero_b:
        data["e"] -= data.groupby("fb")["e"].transform("mean") - data["e"].mean()
        data["x"] -= data.groupby("fb")["x"].transform("mean") - data["x"].mean()
    data["y"] = 1 + 0.5 * data["x"] + a[data["fa"]] + b[data["fb"]] + data["e"]
    return data


def _design(
    data: pd.DataFrame, factors: list[str]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    x = np.column_stack([np.ones(len(data)), data["x"].to_numpy()])
    zs = [pd.get_dummies(data[f]).to_numpy(dtype=float) for f in factors]
    return data["y"].to_numpy(), x, zs


# ------------------------------------------------------------------ fit_mixed vs brute force


@pytest.mark.parametrize("reml", [True, False])
def test_fit_mixed_crossed_nonzero_variances_match_brute_force(reml: bool) -> None:
    data = crossed_data()
    fit = stats.fit_mixed(data, "y ~ x", ["fa", "fb"], reml=reml)
    truth = brute_force_fit(*_design(data, ["fa", "fb"]), reml=reml)
    assert truth["ratios"].min() > 0.05  # clearly non-zero: an interior optimum
    assert not fit.singular and fit.kept == ("fa", "fb")
    assert fit.method == ("REML" if reml else "ML")
    assert fit.llf == pytest.approx(truth["llf"], abs=1e-6)
    assert fit.fe_params.to_numpy() == pytest.approx(truth["beta"], abs=1e-5)
    assert [fit.variances["fa"], fit.variances["fb"]] == pytest.approx(truth["variances"], rel=1e-3)
    assert fit.residual_variance == pytest.approx(truth["sigma2"], rel=1e-4)
    # statsmodels' SE (inverse observed information) vs lme4's sigma^2 (X'V^-1 X)^-1: < 0.1%.
    assert fit.bse.to_numpy() == pytest.approx(truth["se"], rel=1e-3)


def test_fit_mixed_boundary_variance_is_zero_and_flagged_singular() -> None:
    data = crossed_data(zero_b=True)
    truth = brute_force_fit(*_design(data, ["fa", "fb"]), reml=True)
    assert truth["ratios"][1] == 0.0 and truth["ratios"][0] > 0.05
    fit = stats.fit_mixed(data, "y ~ x", ["fa", "fb"], reml=True)
    assert fit.singular and fit.kept == ("fa",)
    assert fit.variances["fb"] == 0.0
    assert fit.variances["fa"] == pytest.approx(truth["variances"][0], rel=1e-3)
    assert fit.llf == pytest.approx(truth["llf"], abs=1e-6)
    assert fit.fe_params.to_numpy() == pytest.approx(truth["beta"], abs=1e-6)
    assert fit.bse.to_numpy() == pytest.approx(truth["se"], rel=1e-3)
    assert "Var(fb) = 0" in fit.note
    table = fit.table()
    assert table.loc[table["term"] == "Var(fb)", "estimate"].item() == 0.0
    assert table["singular"].all()


@pytest.mark.parametrize("reml", [True, False])
def test_all_variances_zero_gives_ols_with_the_right_sigma(reml: bool) -> None:
    """A single random intercept with no between-group signal: the optimum is OLS.

    REML SEs are OLS SEs (sigma^2 = RSS/(n-p)); ML SEs use sigma^2 = RSS/n. Both are checked
    against the brute-force profile likelihood, which finds the ratio 0 itself.
    """
    data = crossed_data(zero_b=True)
    truth = brute_force_fit(*_design(data, ["fb"]), reml=reml)
    assert truth["ratios"][0] == 0.0
    fit = stats.fit_mixed(data, "y ~ x", ["fb"], reml=reml)
    assert fit.singular and fit.kept == () and fit.variances == {"fb": 0.0}
    assert fit.llf == pytest.approx(truth["llf"], abs=1e-8)
    assert fit.bse.to_numpy() == pytest.approx(truth["se"], rel=1e-10)
    ols = smf.ols("y ~ x", data).fit()
    n, p = len(data), 2
    expected_se = ols.bse.to_numpy() * (1.0 if reml else math.sqrt((n - p) / n))
    assert fit.bse.to_numpy() == pytest.approx(expected_se, rel=1e-12)
    assert fit.fe_params.to_numpy() == pytest.approx(ols.params.to_numpy(), rel=1e-12)
    assert fit.residual_variance == pytest.approx(ols.ssr / (n - p if reml else n), rel=1e-12)


@pytest.mark.parametrize("reml", [True, False])
def test_ols_face_loglik_matches_statsmodels_limit(reml: bool) -> None:
    """The closed-form OLS-face log-likelihood is statsmodels' MixedLM loglike as variance -> 0."""
    data = crossed_data(zero_b=True)
    model = smf.mixedlm("y ~ x", data, groups=data["fb"])
    # A relative variance of 1e-9: small enough that the likelihood is within ~1e-7 of its limit
    # at 0, large enough for statsmodels' Woodbury solver (at 1e-12 it loses all precision).
    near_zero = MixedLMParams.from_components(fe_params=np.zeros(2), cov_re=np.eye(1) * 1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # fit() sets the model's REML/ML mode (and penalties) that loglike() reads; statsmodels'
        # own do_cg=False shortcut is broken in 0.15 (UnboundLocalError).
        model.fit(reml=reml, method="powell")
    limit = model.loglike(near_zero, profile_fe=True)
    fit = stats.fit_mixed(data, "y ~ x", ["fb"], reml=reml)
    assert fit.kept == ()
    assert fit.llf == pytest.approx(limit, abs=1e-6)


def test_fit_mixed_skips_single_level_and_rank_deficient() -> None:
    data = crossed_data()
    one_level = stats.fit_mixed(data.assign(fb=3), "y ~ x", ["fa", "fb"], analysis="demo")
    assert "only one level of 'fb' (3)" in one_level.skipped
    row = one_level.table()
    assert len(row) == 1 and row["note"].item().startswith("skipped: only one level")
    constant_x = stats.fit_mixed(data.assign(x=2.0), "y ~ x", ["fa"])
    assert "rank deficient" in constant_x.skipped and "x has a single value" in constant_x.skipped
    with pytest.raises(ValueError, match="not in the data: nope"):
        stats.fit_mixed(data, "y ~ x", ["nope"])


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_contains_mean_is_reproducible_and_sane() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(10.0, 2.0, size=40)
    cfg = {"n_resamples": 2000, "seed": 7, "confidence": 0.95}
    low, high = stats.bootstrap_mean_ci(values, cfg)
    assert low < values.mean() < high
    assert (low, high) == stats.bootstrap_mean_ci(values, cfg)
    # Normal theory width 2 * 1.96 * s / sqrt(n); the percentile bootstrap is close to it.
    expected_width = 2 * 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert high - low == pytest.approx(expected_width, rel=0.15)
    narrow = stats.bootstrap_mean_ci(values, {**cfg, "confidence": 0.5})
    assert narrow[1] - narrow[0] < (high - low) / 2
    bca = stats.bootstrap_mean_ci(values, {**cfg, "method": "BCa"})
    assert bca[0] < values.mean() < bca[1]
    assert all(math.isnan(v) for v in stats.bootstrap_mean_ci([1.0], cfg))
    assert stats.bootstrap_mean_ci([2.0, 2.0, np.nan], cfg) == (2.0, 2.0)


# ------------------------------------------------------------------ convergence


def _toy_trajectories() -> pd.DataFrame:
    return trajectories(make_heads(seeds=(1, 2, 3, 4)))


def test_pairwise_correlations_brute_force() -> None:
    traj = _toy_trajectories()
    pairs = convergence.pairwise_correlations(traj)
    runs = sorted(traj["run"].unique())
    assert len(pairs) == len(runs) * (len(runs) - 1)
    assert list(pairs.columns) == convergence.PAIR_COLUMNS
    for row in pairs.itertuples():
        a = traj[traj["run"] == row.run1].sort_values("step")["value"].to_numpy()
        b = traj[traj["run"] == row.run2].sort_values("step")["value"].to_numpy()
        assert row.cor == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
        assert row.same_model == (row.run1.rsplit("-seed", 1)[0] == row.run2.rsplit("-seed", 1)[0])
    sizes = convergence.size_correlations(pairs).set_index("model")
    for model in sizes.index:
        within = [r.cor for r in pairs.itertuples() if r.model1 == model and r.model2 == model]
        between = [r.cor for r in pairs.itertuples() if r.model1 == model and r.model2 != model]
        assert sizes.loc[model, "within_r_mean"] == pytest.approx(np.mean(within))
        assert sizes.loc[model, "between_r_mean"] == pytest.approx(np.mean(between))
        assert sizes.loc[model, "within_r_sd"] == pytest.approx(np.std(within, ddof=1))


def test_trajectory_matrix_keeps_shared_steps_only() -> None:
    traj = _toy_trajectories()
    reduced = traj[~((traj["run"] == "toy-tiny-seed1") & (traj["step"] == 8))]
    with pytest.warns(UserWarning, match="steps \\[8\\]"):
        matrix = convergence.trajectory_matrix(reduced)
    assert 8 not in matrix.index and len(matrix) == traj["step"].nunique() - 1
    with pytest.raises(ValueError, match="at least 3 checkpoints"):
        convergence.trajectory_matrix(traj[traj["step"] <= 1])


def test_correlation_regressions_single_size_are_skipped() -> None:
    traj = trajectories(make_heads(models={"toy-a": (2, 2, 1_000_000)}, seeds=(1, 2, 3)))
    table = convergence.correlation_regressions(convergence.pairwise_correlations(traj))
    assert len(table) == 2  # one row per regression, each saying why it was skipped
    assert table["note"].str.startswith("skipped").all()


def test_correlation_regressions_on_three_sizes_match_lstsq() -> None:
    heads = make_heads(
        models={"toy-a": (2, 2, 1_000_000), "toy-b": (2, 3, 3_000_000), "toy-c": (3, 2, 9_000_000)},
        seeds=(1, 2, 3),
    )
    pairs = convergence.pairwise_correlations(trajectories(heads))
    table = convergence.correlation_regressions(pairs).set_index(["analysis", "term"])
    x = np.column_stack(
        [
            np.ones(len(pairs)),
            pairs["same_model"].astype(float),
            np.log10(pairs["n_params1"]),
            np.log10(pairs["n_params2"]),
        ]
    )
    y = pairs["cor"].to_numpy()
    coef, rss = np.linalg.lstsq(x, y, rcond=None)[:2]
    se = np.sqrt(np.diag(rss[0] / (len(y) - 4) * np.linalg.inv(x.T @ x)))
    for k, term in enumerate(
        ["(Intercept)", "same_modelTRUE", "log10(n_params1)", "log10(n_params2)"]
    ):
        assert table.loc[("cor_all_pairs", term), "estimate"] == pytest.approx(coef[k], rel=1e-9)
        assert table.loc[("cor_all_pairs", term), "se"] == pytest.approx(se[k], rel=1e-9)
    between = ~pairs["same_model"].to_numpy()
    coef_b = np.linalg.lstsq(x[between][:, [0, 2, 3]], y[between], rcond=None)[0]
    assert table.loc[("cor_between_size", "log10(n_params1)"), "estimate"] == pytest.approx(
        coef_b[1], rel=1e-9
    )


def test_classical_mds_recovers_euclidean_configuration() -> None:
    rng = np.random.default_rng(5)
    points = rng.normal(size=(12, 2)) * [3.0, 1.0]
    distances = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)
    coords, eigenvalues = convergence.classical_mds(distances, k=2)
    recovered = np.linalg.norm(coords[:, None, :] - coords[None, :, :], axis=-1)
    assert recovered == pytest.approx(distances, abs=1e-10)
    assert np.abs(eigenvalues[2:]).max() < 1e-9  # exactly 2-dimensional
    # A 3-D configuration needs 3 axes; 2 axes keep the two largest directions only.
    points3 = rng.normal(size=(10, 3)) * [5.0, 2.0, 1.0]
    d3 = np.linalg.norm(points3[:, None, :] - points3[None, :, :], axis=-1)
    coords3, _ = convergence.classical_mds(d3, k=3)
    assert np.linalg.norm(coords3[:, None, :] - coords3[None, :, :], axis=-1) == pytest.approx(
        d3, abs=1e-10
    )
    with pytest.raises(ValueError, match="symmetric"):
        convergence.classical_mds(distances + np.triu(np.ones_like(distances)), k=2)


def test_classical_mds_non_euclidean_warns() -> None:
    # Three points with a violated triangle inequality (1 + 1 < 3) are not Euclidean.
    d = np.array([[0.0, 1.0, 3.0], [1.0, 0.0, 1.0], [3.0, 1.0, 0.0]])
    with pytest.warns(UserWarning, match="eigenvalues are positive"):
        convergence.classical_mds(d, k=2)


def test_separation_ratio_hand_worked() -> None:
    # Group A: (0, +-1) -> centroid (0, 0), within = 1. Group B: (10, 0) +- (0, 2) -> within = 2.
    coords = pd.DataFrame(
        {
            "model": ["A", "A", "B", "B"],
            "mds1": [0.0, 0.0, 10.0, 10.0],
            "mds2": [1.0, -1.0, 2.0, -2.0],
        }
    )
    table = convergence.separation_ratios(coords).set_index("model")
    assert table.loc["A", "mds_within"] == pytest.approx(1.0)
    assert table.loc["B", "mds_within"] == pytest.approx(2.0)
    assert table.loc["A", "mds_inter"] == pytest.approx(10.0)
    assert table.loc["A", "mds_separation"] == pytest.approx(10.0)
    assert table.loc["B", "mds_separation"] == pytest.approx(5.0)


# ------------------------------------------------------------------ analyze and bad input


def test_analyze_single_seed_skips_mixed_models_with_reason() -> None:
    heads = make_heads(seeds=(1,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MDS/correlations on 2 runs may warn; not under test
        results = stats.analyze(
            heads, trajectories(heads, "one_back"), bootstrap_cfg={"n_resamples": 100}
        )
    regressions = results["regressions"]
    for analysis in ("onset_size", "peak_size", "slope_size", "time"):
        rows = regressions[regressions["analysis"] == analysis]
        assert len(rows) == 1, analysis
        assert rows["note"].item().startswith("skipped: only one level of 'seed' (1)"), analysis
    assert len(results["per_seed"]) == 2
    assert results["per_model"]["n_seeds"].tolist() == [1, 1]
    # No within-size pairs with one seed per size: NaN, not a crash.
    assert results["per_model"]["within_r_mean"].isna().all()


def test_analyze_outputs_and_consistency() -> None:
    heads = make_heads(seeds=(1, 2, 3))
    results = stats.analyze(
        heads,
        trajectories(heads, "one_back"),
        bootstrap_cfg={"n_resamples": 200, "seed": 1, "confidence": 0.9},
    )
    assert {
        "per_seed",
        "per_model",
        "regressions",
        "convergence",
        "correlation_matrix",
        "mds",
    } <= set(results)
    assert list(results["regressions"].columns) == stats.REGRESSION_COLUMNS
    per_model = results["per_model"].set_index("model")
    per_seed = results["per_seed"]
    for model, group in per_seed.groupby("model"):
        assert per_model.loc[model, "peak_mean"] == pytest.approx(group["peak"].mean())
        assert (
            per_model.loc[model, "peak_ci_low"]
            <= group["peak"].mean()
            <= per_model.loc[model, "peak_ci_high"]
        )
    assert len(results["convergence"]) == 6 * 5
    assert set(results["regressions"]["analysis"]) >= {
        "peak_size",
        "slope_size",
        "time",
        "prop_layer",
    }
    prop = results["regressions"].query("analysis == 'prop_layer' and effect == 'fixed'")
    assert prop["n_obs"].iloc[0] == len(heads[heads["step"] == heads["step"].max()])


def test_analyze_two_checkpoints_skips_convergence_with_warning() -> None:
    heads = make_heads(seeds=(1, 2), steps=(0, 100))
    with pytest.warns(UserWarning, match="no convergence analysis: .*at least 3 checkpoints"):
        results = stats.analyze(
            heads, trajectories(heads, "one_back"), bootstrap_cfg={"n_resamples": 100}
        )
    assert results["convergence"].empty and results["mds"].empty
    per_model = results["per_model"]
    assert per_model[["within_r_mean", "between_r_mean", "mds_separation"]].isna().all().all()
    assert per_model["peak_mean"].notna().all()


def test_wilson_interval_known_answers_and_exact_bounds() -> None:
    """Wilson score interval by its formula, (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) /
    (1 + z^2/n), and exact 0 and 1 at 0 of n and n of n (statsmodels gives 5.6e-17 for 0/3)."""
    from scipy.stats import norm

    from mechgen.stats.analysis import wilson_interval

    z = norm.ppf(0.975)
    for count, n in ((1, 3), (2, 5), (7, 10)):
        p = count / n
        centre = p + z * z / (2 * n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        low, high = wilson_interval(count, n, 0.95)
        assert low == pytest.approx((centre - half) / (1 + z * z / n), rel=1e-12)
        assert high == pytest.approx((centre + half) / (1 + z * z / n), rel=1e-12)
    assert wilson_interval(0, 3, 0.95)[0] == 0.0
    assert wilson_interval(3, 3, 0.95) == (pytest.approx(0.438503, abs=1e-6), 1.0)
    assert all(math.isnan(v) for v in wilson_interval(0, 0, 0.95))
