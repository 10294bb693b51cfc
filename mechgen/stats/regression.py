"""Ordinary least squares as rows of the tidy regressions table (statsmodels' formula API).

Kept apart from :mod:`mechgen.stats.analysis` (the mixed models) so that :mod:`mechgen.axes.convergence`,
which :mod:`mechgen.stats.analysis` uses, can fit its size regressions without an import cycle.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf

REGRESSION_COLUMNS = [
    "analysis",  # short id of the model, e.g. "peak_size", "time", "cor_all_pairs"
    "formula",  # the model in the study's (lme4) notation
    "method",  # REML, ML or OLS
    "effect",  # fixed (a coefficient) or variance (a variance component / residual variance)
    "term",
    "estimate",
    "se",
    "statistic",  # Wald z (mixed models) or t (OLS); NaN for variances
    "p_value",
    "singular",  # a variance component estimated at 0 (lme4's isSingular); False for OLS
    "n_obs",
    "n_groups",  # e.g. "seed=9; model=4"
    "llf",  # maximised (RE)ML log-likelihood of the chosen fit
    "converged",
    "note",
]
"""Columns of the tidy regressions table."""


def ols_table(
    data: pd.DataFrame,
    formula: str,
    analysis: str = "",
    display_formula: str | None = None,
    term_names: dict[str, str] | None = None,
    note: str = "",
) -> pd.DataFrame:
    """OLS ``formula`` on ``data`` (statsmodels formula API) as rows of the regressions table.

    t statistics and two-sided t p-values on n - p df; ``Var(residual)`` = RSS / (n - p). A rank
    deficient design (or n <= p) gives one row with the reason in ``note``.
    """
    term_names = term_names or {"Intercept": "(Intercept)"}
    common = {
        "analysis": analysis,
        "formula": display_formula or formula,
        "method": "OLS",
        "singular": False,
        "n_obs": len(data),
        "n_groups": "",
        "converged": True,
    }
    if len(data) == 0:
        return pd.DataFrame(
            [{**common, "note": "skipped: no observations"}], columns=REGRESSION_COLUMNS
        )
    with warnings.catch_warnings():
        # A rank-deficient design warns here; it is detected and reported just below.
        warnings.simplefilter("ignore")
        result = smf.ols(formula, data).fit()
    x = result.model.exog
    if np.linalg.matrix_rank(x) < x.shape[1] or x.shape[0] <= x.shape[1]:
        return pd.DataFrame(
            [
                {
                    **common,
                    "note": "skipped: the design is rank deficient or has no residual degrees of freedom",
                }
            ],
            columns=REGRESSION_COLUMNS,
        )
    rows = [
        {
            **common,
            "effect": "fixed",
            "term": term_names.get(term, term),
            "estimate": float(result.params[term]),
            "se": float(result.bse[term]),
            "statistic": float(result.tvalues[term]),
            "p_value": float(result.pvalues[term]),
            "llf": float(result.llf),
            "note": note,
        }
        for term in result.params.index
    ]
    rows.append(
        {
            **common,
            "effect": "variance",
            "term": "Var(residual)",
            "estimate": float(result.scale),
            "llf": float(result.llf),
            "note": note,
        }
    )
    return pd.DataFrame(rows, columns=REGRESSION_COLUMNS)
