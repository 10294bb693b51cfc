"""Statistics of the developmental, convergence and positional analyses, as in Trott (2025).

Mixed-effects models (statsmodels ``MixedLM``, formula API) with random intercepts:

==================  ===========================================================  ======
analysis            model                                                        method
==================  ===========================================================  ======
``onset_size``      log10(onset) ~ log10(n_params) + (1|seed)       (per run)    REML
``peak_size``       peak ~ log10(n_params) + (1|seed)               (per run)    REML
``slope_size``      slope ~ log10(n_params) + (1|seed)              (per run)    REML
``time``            trajectory ~ log10(step+1) + (1|seed) + (1|model)  (run x step)  ML
``prop_layer``      metric ~ prop_layer + (1|head) + (1|model)  (all heads, final step)  REML
==================  ===========================================================  ======

``seed`` is the seed number (seed 3 of every size is one level, as the study's ``seed_name``),
``head`` the head index (shared across layers and models, as the study's 1-indexed ``Head``),
``prop_layer = (layer + 1) / n_layers`` (the study's 1-indexed ``Layer / n_layers``).
Crossed random intercepts are fitted as one all-encompassing group with one variance component
per factor (``vc_formula``), the statsmodels idiom for crossed effects.

**Finding the true (RE)ML optimum** (:func:`fit_mixed`). statsmodels' optimisers can stop at a
worse optimum when a variance belongs on the boundary (0): on the study's time model L-BFGS
stops at logLik 361.0 and BFGS/CG at 345.6, while the optimum is 363.58 with the seed variance
at 0. The likelihood is maximised over the closed set of variances >= 0 by fitting every *face*
of that set, i.e. the model with every subset of the random factors (the empty subset is OLS),
each from several optimisers and starting values, and keeping the largest log-likelihood. A face
with fewer factors whose log-likelihood is within ``llf_tol`` of the best is preferred: its
dropped variances are then estimated at exactly 0 and the fit is **singular** (lme4's
``isSingular``; also flagged when a kept variance has sd / residual sd < ``singular_tol``, lme4's
default tolerance 1e-4). Estimates and SEs are those of the chosen face, i.e. of the optimum:

- at a face with >= 1 factor: statsmodels' ``fe_params`` and ``bse_fe``. statsmodels takes the
  fixed-effect block of the inverse observed information of all parameters; lme4 prints
  ``sigma^2 (X' V^-1 X)^-1``. They agree to the printed digits on the study's models (e.g.
  prop_layer intercept SE 0.018908 vs 0.018906, printed 0.01891).
- at the OLS face (every variance 0): the OLS estimates; SE = OLS SE under REML (``sigma^2 =
  RSS/(n - p)``), and OLS SE x sqrt((n - p)/n) under ML, since ML estimates ``sigma^2 = RSS/n``
  and lme4 reports ``vcov = sigma_ML^2 (X'X)^-1``. Its log-likelihood is computed in closed
  form (statsmodels cannot evaluate MixedLM's likelihood at a variance of exactly 0: it takes
  1/variance) with statsmodels' own conventions, which are lme4's:
  ML: ``-n/2 (1 + log(2 pi RSS/n))``;
  REML: ``-(n-p)/2 (1 + log(2 pi RSS/(n-p))) - 1/2 log det(X'X)``.

Statistics are Wald z = estimate / SE with two-sided normal p-values (statsmodels' MixedLM
convention; lmerTest prints Satterthwaite t tests, whose p-values differ slightly). OLS
regressions (the correlation regressions) report t tests.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import stats as scipy_stats
from statsmodels.regression.mixed_linear_model import MixedLMParams
from statsmodels.stats.proportion import proportion_confint

from mechgen.axes import convergence
from mechgen.axes.developmental import (
    DEFAULT_THRESHOLDS,
    infer_tokens_per_step,
    log_step,
    per_seed_from_trajectories,
)
from mechgen.stats.regression import REGRESSION_COLUMNS
from mechgen.tables.heads import drop_nonfinite_heads, validate_heads

DEFAULT_METHODS = ("powell", "nm")
"""Optimisers tried for every mixed-model fit (statsmodels ``MixedLM.fit(method=...)``)."""
DEFAULT_START_RATIOS = (1.0, 0.1, 0.01)
"""Starting values of every variance, relative to the residual variance, tried with every
optimiser. (L-BFGS, statsmodels' default, is not in :data:`DEFAULT_METHODS`: on these models it
was slower and, from some starts, returned an infinite log-likelihood or stopped early.)"""


@dataclass
class MixedFit:
    """A fitted (or skipped) mixed model at its (RE)ML optimum; see :func:`fit_mixed`.

    ``variances`` maps every requested random factor to its variance estimate (0.0 for a factor
    dropped at the boundary); ``kept`` are the factors of the chosen face. ``candidates`` lists
    every fit tried (face, optimiser, start, logLik, converged). ``skipped`` is a non-empty
    reason when no model could be fitted (then the numbers are empty/NaN).
    """

    analysis: str
    formula: str
    method: str
    fe_params: pd.Series = field(default_factory=lambda: pd.Series(dtype=float))
    bse: pd.Series = field(default_factory=lambda: pd.Series(dtype=float))
    variances: dict[str, float] = field(default_factory=dict)
    residual_variance: float = float("nan")
    llf: float = float("nan")
    singular: bool = False
    converged: bool = False
    n_obs: int = 0
    n_groups: dict[str, int] = field(default_factory=dict)
    kept: tuple[str, ...] = ()
    note: str = ""
    skipped: str = ""
    candidates: pd.DataFrame = field(default_factory=pd.DataFrame)

    def table(self) -> pd.DataFrame:
        """This fit as rows of the tidy regressions table (:data:`REGRESSION_COLUMNS`).

        One row per fixed effect (estimate, SE, Wald z, two-sided normal p) and one per variance
        (``Var(<factor>)`` and ``Var(residual)``; no SE). A skipped model is one row with the
        reason in ``note``.
        """
        common = {
            "analysis": self.analysis,
            "formula": self.formula,
            "method": self.method,
            "singular": self.singular,
            "n_obs": self.n_obs,
            "n_groups": "; ".join(f"{k}={v}" for k, v in self.n_groups.items()),
            "llf": self.llf,
            "converged": self.converged,
        }
        if self.skipped:
            return pd.DataFrame(
                [{**common, "effect": "", "term": "", "note": f"skipped: {self.skipped}"}],
                columns=REGRESSION_COLUMNS,
            )
        rows = []
        for term, estimate in self.fe_params.items():
            se = float(self.bse[term])
            z = estimate / se if se > 0 else float("nan")
            rows.append(
                {
                    **common,
                    "effect": "fixed",
                    "term": term,
                    "estimate": float(estimate),
                    "se": se,
                    "statistic": z,
                    "p_value": float(2 * scipy_stats.norm.sf(abs(z))),
                    "note": self.note,
                }
            )
        for name, variance in list(self.variances.items()) + [("residual", self.residual_variance)]:
            rows.append(
                {
                    **common,
                    "effect": "variance",
                    "term": f"Var({name})",
                    "estimate": variance,
                    "note": self.note,
                }
            )
        return pd.DataFrame(rows, columns=REGRESSION_COLUMNS)


def _ols_llf(rss: float, n: int, p: int, xtx_logdet: float, reml: bool) -> float:
    """Maximised Gaussian (RE)ML log-likelihood of a linear model (see the module docstring)."""
    if reml:
        m = n - p
        return -m / 2 * (1 + math.log(2 * math.pi * rss / m)) - xtx_logdet / 2
    return -n / 2 * (1 + math.log(2 * math.pi * rss / n))


def _fit_face(
    data: pd.DataFrame,
    formula: str,
    factors: tuple[str, ...],
    reml: bool,
    methods: Sequence[str],
    start_ratios: Sequence[float],
) -> tuple[Any, list[dict[str, Any]]]:
    """Fit the mixed model with random intercepts for ``factors`` (>= 1) from every optimiser and
    start; return the fit with the largest finite log-likelihood (or None) and the attempts."""
    if len(factors) == 1:
        model = smf.mixedlm(formula, data, groups=data[factors[0]])
    else:
        # Crossed random intercepts: one group holding every row, a variance component per factor.
        model = smf.mixedlm(
            formula,
            data,
            groups=np.zeros(len(data)),
            re_formula="0",
            vc_formula={f: f"0 + C({f})" for f in factors},
        )
    best, attempts = None, []
    for method, ratio in itertools.product(methods, start_ratios):
        if len(factors) == 1:
            start = MixedLMParams.from_components(
                fe_params=np.zeros(model.k_fe), cov_re=np.eye(1) * ratio
            )
        else:
            start = MixedLMParams.from_components(
                fe_params=np.zeros(model.k_fe), vcomp=np.full(len(factors), ratio)
            )
        with warnings.catch_warnings():
            # Convergence/boundary warnings are expected here: this search is what handles them.
            warnings.simplefilter("ignore")
            try:
                result = model.fit(reml=reml, method=method, start_params=start)
            except (np.linalg.LinAlgError, ValueError, FloatingPointError) as exc:
                attempts.append(
                    {
                        "factors": "+".join(factors),
                        "method": method,
                        "start": ratio,
                        "llf": float("nan"),
                        "converged": False,
                        "error": str(exc),
                    }
                )
                continue
        llf = float(result.llf)
        attempts.append(
            {
                "factors": "+".join(factors),
                "method": method,
                "start": ratio,
                "llf": llf,
                "converged": bool(result.converged),
                "error": "",
            }
        )
        # A non-finite logLik (statsmodels returns +inf on some degenerate L-BFGS fits) is not a fit.
        if np.isfinite(llf) and (best is None or llf > best.llf):
            best = result
    return best, attempts


def fit_mixed(
    data: pd.DataFrame,
    formula: str,
    random_intercepts: Sequence[str],
    reml: bool = True,
    analysis: str = "",
    display_formula: str | None = None,
    term_names: dict[str, str] | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    start_ratios: Sequence[float] = DEFAULT_START_RATIOS,
    llf_tol: float = 1e-5,
    singular_tol: float = 1e-4,
) -> MixedFit:
    """Fit ``formula`` with (crossed) random intercepts for ``random_intercepts`` at its true optimum.

    ``formula`` is a statsmodels fixed-effects formula on columns of ``data`` (e.g.
    ``"peak ~ log10_n_params"``); ``term_names`` renames its terms for display (e.g.
    ``{"Intercept": "(Intercept)"}``). Maximises the REML (``reml=True``) or ML log-likelihood
    over variances >= 0 by fitting every subset of the random factors (see the module docstring);
    returns the fit with the largest log-likelihood, preferring fewer factors within ``llf_tol``.
    ``singular`` is True when a variance is at 0 or has sd / residual sd < ``singular_tol``.

    Returns a skipped :class:`MixedFit` (reason in ``skipped``), not an exception, when a random
    factor has fewer than 2 levels (e.g. a suite with a single seed), when the fixed-effects
    design is rank deficient (e.g. one model size for a size regression), or when there are no
    residual degrees of freedom. Raises ``ValueError`` for missing columns or non-finite data.
    """
    method_name = "REML" if reml else "ML"
    display_formula = display_formula or formula + "".join(f" + (1|{f})" for f in random_intercepts)
    term_names = term_names or {}
    fit = MixedFit(analysis=analysis, formula=display_formula, method=method_name, n_obs=len(data))
    factors = tuple(random_intercepts)
    if not factors:
        raise ValueError(
            "fit_mixed needs at least one random intercept; use ols_table for a plain OLS"
        )
    missing = [f for f in factors if f not in data.columns]
    if missing:
        raise ValueError(
            f"{analysis or formula}: random-intercept column(s) not in the data: {', '.join(missing)}"
        )
    fit.n_groups = {f: int(data[f].nunique()) for f in factors}
    if len(data) == 0:
        fit.skipped = "no observations"
        return fit
    single = [f"{f!r} ({data[f].iloc[0]})" for f in factors if fit.n_groups[f] < 2]
    if single:
        fit.skipped = f"only one level of {', '.join(single)}: a random intercept needs >= 2 levels, so no mixed model is possible"
        return fit

    with warnings.catch_warnings():
        # A rank-deficient design warns here; it is detected and reported just below.
        warnings.simplefilter("ignore")
        ols = smf.ols(formula, data).fit()
    x = ols.model.exog
    n, p = x.shape
    if not np.isfinite(ols.model.endog).all() or not np.isfinite(x).all():
        raise ValueError(f"{analysis or formula}: the data have NaN/inf values")
    if np.linalg.matrix_rank(x) < p:
        constant = [
            name
            for name, column in zip(ols.model.exog_names, x.T)
            if name != "Intercept" and np.ptp(column) == 0
        ]
        fit.skipped = "the fixed-effects design is rank deficient" + (
            f" ({', '.join(constant)} has a single value)" if constant else ""
        )
        return fit
    if n <= p:
        fit.skipped = f"{n} observations for {p} fixed effects: no residual degrees of freedom"
        return fit

    # The OLS face (every variance 0).
    rss = float(ols.ssr)
    _, xtx_logdet = np.linalg.slogdet(x.T @ x)
    faces: list[dict[str, Any]] = [
        {
            "factors": (),
            "llf": _ols_llf(rss, n, p, xtx_logdet, reml),
            "fe": ols.params,
            # ML estimates sigma^2 = RSS/n, so its SEs are the OLS SEs (RSS/(n-p)) x sqrt((n-p)/n).
            "bse": ols.bse if reml else ols.bse * math.sqrt((n - p) / n),
            "variances": {},
            "scale": rss / (n - p) if reml else rss / n,
            "converged": True,
        }
    ]
    attempts = [
        {
            "factors": "",
            "method": "ols",
            "start": float("nan"),
            "llf": faces[0]["llf"],
            "converged": True,
            "error": "",
        }
    ]
    for size in range(1, len(factors) + 1):
        for subset in itertools.combinations(factors, size):
            result, tried = _fit_face(data, formula, subset, reml, methods, start_ratios)
            attempts.extend(tried)
            if result is None:
                continue
            if len(subset) == 1:
                variances = {subset[0]: float(np.asarray(result.cov_re)[0, 0])}
            else:
                variances = dict(zip(result.model.exog_vc.names, map(float, result.vcomp)))
            faces.append(
                {
                    "factors": subset,
                    "llf": float(result.llf),
                    "fe": result.fe_params,
                    "bse": result.bse_fe,
                    "variances": variances,
                    "scale": float(result.scale),
                    "converged": bool(result.converged),
                }
            )
    best_llf = max(face["llf"] for face in faces)
    # The simplest face that reaches the optimum: dropped variances are then exactly 0.
    chosen = min(
        (f for f in faces if f["llf"] >= best_llf - llf_tol),
        key=lambda f: (len(f["factors"]), -f["llf"]),
    )

    fit.fe_params = chosen["fe"].rename(index=lambda t: term_names.get(t, t)).astype(float)
    fit.bse = chosen["bse"].rename(index=lambda t: term_names.get(t, t)).astype(float)
    fit.variances = {f: float(chosen["variances"].get(f, 0.0)) for f in factors}
    fit.residual_variance = chosen["scale"]
    fit.llf = chosen["llf"]
    fit.converged = chosen["converged"]
    fit.kept = tuple(chosen["factors"])
    tiny = [
        f
        for f in fit.kept
        if math.sqrt(max(fit.variances[f], 0.0) / fit.residual_variance) < singular_tol
    ]
    dropped = [f for f in factors if f not in fit.kept]
    fit.singular = bool(dropped or tiny)
    notes = []
    if dropped:
        notes.append(
            f"singular: Var({'), Var('.join(dropped)}) = 0 at the optimum (refitted without)"
        )
    if tiny:
        notes.append(f"singular: sd/sigma < {singular_tol} for {', '.join(tiny)}")
    if not fit.converged:
        notes.append("the optimiser did not report convergence for the best fit")
    if not np.isfinite(fit.bse.to_numpy()).all():
        notes.append("some SEs are not available (singular information matrix)")
    fit.note = "; ".join(notes)
    fit.candidates = pd.DataFrame(attempts)
    return fit


_SIZE_TERMS = {"Intercept": "(Intercept)", "log10_n_params": "log10(n_params)"}


def seed_level_models(per_seed: pd.DataFrame, **fit_kwargs: Any) -> list[MixedFit]:
    """The study's three per-run regressions on model size, REML, random intercept for seed.

    ``log10(onset_step) ~ log10(n_params)``, ``peak ~ log10(n_params)``,
    ``slope ~ log10(n_params)`` (:func:`fit_mixed`). Runs with an undefined onset (NaN, or 0,
    whose log is -inf) are left out of the onset model, with a note.
    """
    data = per_seed.assign(log10_n_params=np.log10(per_seed["n_params"].astype(float)))
    onset_ok = np.isfinite(data["onset_step"]) & (data["onset_step"] > 0)
    onset_data = data[onset_ok].assign(
        log10_onset=np.log10(data.loc[onset_ok, "onset_step"].astype(float))
    )
    specs = [
        (
            "onset_size",
            onset_data,
            "log10_onset ~ log10_n_params",
            "log10(onset) ~ log10(n_params) + (1|seed)",
        ),
        ("peak_size", data, "peak ~ log10_n_params", "peak ~ log10(n_params) + (1|seed)"),
        ("slope_size", data, "slope ~ log10_n_params", "slope ~ log10(n_params) + (1|seed)"),
    ]
    fits = []
    for analysis, frame, formula, display in specs:
        fit = fit_mixed(
            frame,
            formula,
            ["seed"],
            reml=True,
            analysis=analysis,
            display_formula=display,
            term_names=_SIZE_TERMS,
            **fit_kwargs,
        )
        if analysis == "onset_size" and not onset_ok.all():
            left_out = ", ".join(per_seed.loc[~onset_ok, "run"].astype(str))
            fit.note = "; ".join(
                filter(None, [fit.note, f"runs without an onset left out: {left_out}"])
            )
        fits.append(fit)
    return fits


def time_model(traj: pd.DataFrame, **fit_kwargs: Any) -> MixedFit:
    """The study's time model, ML: ``value ~ log10(step + 1) + (1|seed) + (1|model)``.

    ``traj`` is a trajectories table (:func:`mechgen.axes.developmental.trajectories`); ``step + 1``
    is the study's ``step_modded``. Crossed random intercepts for seed and model.
    """
    data = traj.assign(log10_step_modded=log_step(traj["step"]))
    return fit_mixed(
        data,
        "value ~ log10_step_modded",
        ["seed", "model"],
        reml=False,
        analysis="time",
        display_formula="trajectory ~ log10(step_modded) + (1|seed_name) + (1|model)",
        term_names={"Intercept": "(Intercept)", "log10_step_modded": "log10(step_modded)"},
        **fit_kwargs,
    )


def final_step_heads(heads: pd.DataFrame, metric: str = "one_back") -> pd.DataFrame:
    """All heads of every run at the run's last checkpoint, with ``prop_layer = (layer+1)/n_layers``.

    Rows flagged ``nonfinite`` (or with a NaN/inf metric) are excluded with a warning.
    """
    validate_heads(heads, metric)
    last = heads.groupby("run")["step"].transform("max")
    final = drop_nonfinite_heads(heads[heads["step"] == last], metric, "the prop_layer model")
    return final.assign(prop_layer=(final["layer"] + 1) / final["n_layers"])


def prop_layer_model(heads: pd.DataFrame, metric: str = "one_back", **fit_kwargs: Any) -> MixedFit:
    """The study's positional model, REML: ``metric ~ prop_layer + (1|head) + (1|model)``.

    Over every head of every run at the run's final checkpoint (:func:`final_step_heads`);
    ``prop_layer = (layer + 1) / n_layers`` runs from 1/n_layers to 1; ``head`` is the head index
    (crossed with model, as the study's ``Head``).
    """
    data = final_step_heads(heads, metric)
    return fit_mixed(
        data,
        f"{metric} ~ prop_layer",
        ["head", "model"],
        reml=True,
        analysis="prop_layer",
        display_formula=f"{metric} ~ prop_layer + (1|Head) + (1|model)",
        term_names={"Intercept": "(Intercept)"},
        **fit_kwargs,
    )


DEFAULT_BOOTSTRAP = {"n_resamples": 2000, "seed": 0, "confidence": 0.95, "method": "percentile"}
"""Bootstrap settings (config ``analysis.bootstrap``; ``method`` is scipy's: percentile, basic, BCa)."""


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray, bootstrap_cfg: dict[str, Any] | None = None
) -> tuple[float, float]:
    """Bootstrap confidence interval of the mean of ``values`` (``scipy.stats.bootstrap``).

    Resamples the values (seeds) with replacement ``n_resamples`` times with a generator seeded
    by ``seed``; ``confidence`` level; ``method`` percentile (default), basic or BCa. NaNs are
    dropped; fewer than 2 values give (NaN, NaN); identical values give (value, value).
    """
    cfg = {**DEFAULT_BOOTSTRAP, **(bootstrap_cfg or {})}
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return float("nan"), float("nan")
    if np.ptp(x) == 0:
        return float(x[0]), float(x[0])
    result = scipy_stats.bootstrap(
        (x,),
        np.mean,
        n_resamples=int(cfg["n_resamples"]),
        confidence_level=float(cfg["confidence"]),
        method=str(cfg["method"]),
        rng=np.random.default_rng(int(cfg["seed"])),
        vectorized=True,
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


PER_MODEL_QUANTITIES = [
    "peak",
    "slope",
    "onset_step",
    "onset_logistic_step",
    "final_relative_depth",
]
"""Per-run quantities averaged per model (size) in :func:`per_model_summary`."""


def per_model_summary(
    per_seed: pd.DataFrame,
    pairs: pd.DataFrame | None = None,
    separation: pd.DataFrame | None = None,
    bootstrap_cfg: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Per model (size): means over seeds with bootstrap CIs, and the convergence numbers.

    For each q in :data:`PER_MODEL_QUANTITIES`: ``q_mean`` (over the seeds where q is finite),
    ``q_ci_low``, ``q_ci_high`` (:func:`bootstrap_mean_ci` over seeds), ``q_n`` (seeds used).
    With ``pairs`` (:func:`mechgen.axes.convergence.pairwise_correlations`): ``within_r_mean/sd``,
    ``between_r_mean/sd`` (over ordered pairs, the study's numbers) and their CIs, bootstrapped
    over seeds from each run's mean r to the other runs of its size (within) or of other sizes
    (between) — with every run having the same partners these per-run means average to the pair
    means. With ``separation`` (:func:`mechgen.axes.convergence.separation_ratios`): ``mds_inter``,
    ``mds_within``, ``mds_separation`` (no CI: one number per size).
    """
    rows = []
    for model, group in per_seed.groupby("model", sort=False):
        row: dict[str, Any] = {
            "model": model,
            "size": group["size"].iloc[0],
            "n_params": int(group["n_params"].iloc[0]),
            "n_seeds": int(group["seed"].nunique()),
        }
        for quantity in PER_MODEL_QUANTITIES:
            values = group[quantity].to_numpy(dtype=float)
            finite = values[np.isfinite(values)]
            row[f"{quantity}_mean"] = float(finite.mean()) if len(finite) else float("nan")
            row[f"{quantity}_ci_low"], row[f"{quantity}_ci_high"] = bootstrap_mean_ci(
                finite, bootstrap_cfg
            )
            row[f"{quantity}_n"] = len(finite)
        rows.append(row)
    table = pd.DataFrame(rows)
    has_pairs = pairs is not None and len(pairs) > 0
    for kind, same in (("within", True), ("between", False)):
        # The columns exist (NaN) without pairs too, so the table's schema does not depend on the suite.
        for suffix in ("r_mean", "r_sd", "r_ci_low", "r_ci_high"):
            table[f"{kind}_{suffix}"] = np.nan
    if has_pairs:
        sizes = convergence.size_correlations(pairs).set_index("model")
        for kind, same in (("within", True), ("between", False)):
            subset = pairs[pairs["same_model"] == same]
            per_run = subset.groupby(["model1", "run1"])["cor"].mean()
            table[f"{kind}_r_mean"] = table["model"].map(sizes[f"{kind}_r_mean"])
            table[f"{kind}_r_sd"] = table["model"].map(sizes[f"{kind}_r_sd"])
            models_with_pairs = set(per_run.index.get_level_values(0))
            cis = [
                bootstrap_mean_ci(per_run.loc[m].to_numpy(), bootstrap_cfg)
                if m in models_with_pairs
                else (np.nan, np.nan)
                for m in table["model"]
            ]
            table[f"{kind}_r_ci_low"] = [low for low, _ in cis]
            table[f"{kind}_r_ci_high"] = [high for _, high in cis]
    if separation is not None and len(separation):
        table = table.merge(separation, on="model", how="left")
    else:
        table[["mds_inter", "mds_within", "mds_separation"]] = np.nan
    return table.sort_values("n_params", kind="stable").reset_index(drop=True)


def analyze(
    heads: pd.DataFrame,
    traj: pd.DataFrame,
    thresholds: np.ndarray = DEFAULT_THRESHOLDS,
    tokens_per_step: int | None = None,
    bootstrap_cfg: dict[str, Any] | None = None,
) -> dict[str, pd.DataFrame]:
    """The developmental, convergence and statistics results of one suite.

    ``traj`` is the suite's trajectories table (:func:`mechgen.axes.developmental.trajectories` of
    ``heads``, ``trajectories.parquet``): per run and step the max over heads of one metric,
    the metric every analysis here uses. Returns DataFrames keyed by the file stem the rule
    writes to ``results/<suite>/stats/``:

    - ``per_seed``: one row per run (:func:`mechgen.axes.developmental.per_seed_from_trajectories`).
    - ``per_model``: per size, means with bootstrap CIs, within/between r, MDS separation
      (:func:`per_model_summary`).
    - ``regressions``: the tidy table (:data:`REGRESSION_COLUMNS`) of the onset/peak/slope size
      models, the time model, the prop_layer model and the two correlation regressions.
    - ``convergence``: the long table of ordered run pairs with Pearson r
      (:func:`mechgen.axes.convergence.pairwise_correlations`; the matrix is ``correlation_matrix``).
    - ``mds``: classical MDS coordinates of the runs on 1 - r (k = 2;
      :func:`mechgen.axes.convergence.mds_coordinates`).
    - ``correlation_matrix``: the (run x run) Pearson r, runs as a ``run`` column + one column
      per run (not written by the pipeline: the figures pivot ``convergence``).
    - ``convergence_overall``: mean/sd of r over all within-size and all between-size pairs
      (not written by the pipeline either).

    Fewer than 2 runs or 3 shared checkpoints (or 3 runs for MDS) leave the convergence tables
    empty (and their per_model columns NaN), with a warning; models
    that cannot be fitted (e.g. one seed) are rows with ``skipped: <reason>`` in ``note``.
    """
    metrics = traj["metric"].unique() if "metric" in traj.columns else []
    if len(metrics) != 1:
        raise ValueError(f"the trajectory table must hold exactly one metric, got {list(metrics)}")
    metric = str(metrics[0])
    validate_heads(heads, metric, min_checkpoints=2)
    if tokens_per_step is None:
        tokens_per_step = infer_tokens_per_step(heads)
    per_seed = per_seed_from_trajectories(traj, thresholds, tokens_per_step)

    pairs = pd.DataFrame(columns=convergence.PAIR_COLUMNS)
    corr = pd.DataFrame()
    mds = pd.DataFrame(columns=convergence.MDS_COLUMNS)
    separation = pd.DataFrame()
    overall = pd.DataFrame()
    correlation_fits = pd.DataFrame(columns=REGRESSION_COLUMNS)
    try:
        corr = convergence.correlation_matrix(traj)
    except ValueError as exc:
        # Too few runs or shared checkpoints: the other analyses still run.
        warnings.warn(f"no convergence analysis: {exc}", stacklevel=2)
    if len(corr):
        pairs = convergence.pairwise_correlations(traj)
        overall = convergence.overall_correlations(pairs)
        correlation_fits = convergence.correlation_regressions(pairs)
        if len(corr) >= 3 and not corr.isna().to_numpy().any():
            mds = convergence.mds_coordinates(corr, traj)
            separation = convergence.separation_ratios(mds)

    fits = seed_level_models(per_seed) + [time_model(traj), prop_layer_model(heads, metric)]
    regressions = pd.concat([fit.table() for fit in fits] + [correlation_fits], ignore_index=True)
    per_model = per_model_summary(per_seed, pairs, separation, bootstrap_cfg)
    return {
        "per_seed": per_seed,
        "per_model": per_model,
        "regressions": regressions,
        "convergence": pairs,
        "mds": mds,
        "correlation_matrix": corr.rename_axis(index="run", columns=None).reset_index()
        if len(corr)
        else corr,
        "convergence_overall": overall,
    }


def wilson_interval(count: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``count / n`` at ``confidence``; (NaN, NaN) if
    n = 0.

    statsmodels' ``proportion_confint(method="wilson")``, except that the bound at count = 0
    (count = n) is exactly 0 (1), as the formula gives: statsmodels' float rounding leaves
    5.6e-17 for 0 of 3, which prints as a spurious non-zero bound.
    """
    if n == 0:
        return math.nan, math.nan
    low, high = proportion_confint(count, n, alpha=1 - confidence, method="wilson")
    return (0.0 if count == 0 else float(low)), (1.0 if count == n else float(high))
