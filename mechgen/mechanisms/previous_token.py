"""The previous-token (1-back) head: the reference study's mechanism (Trott 2025).

Score: ``one_back``, the mean over query positions 1..L-1 of A[i, i-1] on the evaluation
sentences, then the unweighted mean over sentences (:mod:`mechgen.scoring.metrics`; attention
probability). Null: uniform causal attention on the same sentences,
b = mean_s (1/(L_s-1)) sum_{i=1}^{L_s-1} 1/(i+1) (:func:`mechgen.tables.baselines.
uniform_one_back_baseline`); for a suite imported from published tables, whose sentence lengths
are unknown, the median step-0 head (:func:`mechgen.tables.baselines.step0_median_baseline`).
Criterion: one_back >= 2 x b. Onsets may also use the study's absolute thresholds (0.01..0.30
per decade of steps on the raw score), so the reproduction prints every published number.
"""

from __future__ import annotations

import pandas as pd

from mechgen.mechanisms.base import Link, Mechanism, NullContext
from mechgen.tables.baselines import step0_median_baseline, uniform_one_back_baseline


def uniform_attention_null(table: pd.DataFrame, context: NullContext) -> pd.Series:
    """Per run: the one_back of uniform causal attention on that run's evaluation sentences,
    or, without sentence lengths, the median one_back of every head at step 0 (one value)."""
    runs = sorted(table["run"].unique())
    if all(run in context.eval_lengths for run in runs):
        return pd.Series(
            {run: uniform_one_back_baseline(context.eval_lengths[run]) for run in runs},
            name="null",
        )
    return pd.Series(step0_median_baseline(table), index=runs, name="null")


MECHANISM = Mechanism(
    name="previous_token",
    version=1,
    unit="head",
    score_column="one_back",
    description="attention from each token to the token before it, on the evaluation text",
    units="attention probability",
    null=uniform_attention_null,
    ceiling=1.0,
    criterion_multiple=2.0,
    links=(Link(source="previous_token", target="induction", composition="K"),),
    absolute_thresholds=True,
)
