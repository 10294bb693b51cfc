"""Attention locality: heads that focus on a few keys (seed 001's locally and globally
focused heads), against heads that spread their attention.

Score: ``received_concentration`` (dimensionless, 0..1), from the evaluation-sentence pass
(:func:`mechgen.scoring.metrics.sentence_attention_metrics`). Per sentence of L >= 4 tokens and head,
the *future-attention index* of key position j is the mean attention it receives from the
later queries, r_j = (1/(L-1-j)) sum_{i=j+1}^{L-1} A[i, j], for j = 1..L-2 (position 0, the
attention sink most heads park on, and the last position, which no later query sees, are left
out). With p_j = r_j / sum_k r_k the received-attention distribution, the score is one minus
its normalised entropy, 1 - (-sum_j p_j ln p_j) / ln(L-2), then the unweighted mean over the
sentences of >= 4 tokens. 1: one key receives everything (a globally focused head, e.g. one
that every query points at the same token); a previous-token head (r_j = 1/(L-1-j)) scores
~0.16 at 25 tokens; 0: every key receives the same mean attention.

Null: uniform causal attention (A[i, j] = 1/(i+1)) on the run's evaluation sentences,
:func:`uniform_received_concentration` (about 0.01 at Natural Stories' ~25 tokens); without the
sentence lengths (an imported table), the median step-0 head. Criterion: score >= 2 x null.

The other locality quantity, windowed attention distance (``clipped_distance``: the mean over
query positions of sum_j A[i, j] min(i - j, W), tokens), stays a documented column of
heads.parquet and is not this mechanism's score: a local head has a *small* distance, so it
does not fit the "score >= multiple x null, ceiling above the null" form every mechanism
shares.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from mechgen.mechanisms.base import Mechanism, NullContext
from mechgen.tables.baselines import step0_median_baseline

SCORE_COLUMN = "received_concentration"
MIN_TOKENS = 4
"""Sentences need two keys 1..L-2 for a normalised entropy: L >= 4 tokens."""


def received_concentration_of_uniform(length: int) -> float:
    """``received_concentration`` of uniform causal attention on one sentence of ``length``
    tokens: r_j = (1/(L-1-j)) sum_{i=j+1}^{L-1} 1/(i+1) for j = 1..L-2, then
    1 - H(r / sum r) / ln(L-2). Dimensionless; ``length`` >= 4."""
    length = int(length)
    if length < MIN_TOKENS:
        raise ValueError(f"received concentration needs >= {MIN_TOKENS} tokens, got {length}")
    weights = 1.0 / (np.arange(length) + 1.0)  # row i puts 1/(i+1) on every key j <= i
    received = np.array([weights[j + 1 :].mean() for j in range(1, length - 1)], dtype=np.float64)
    share = received / received.sum()
    entropy = -float(np.sum(share * np.log(share)))
    return 1.0 - entropy / float(np.log(length - 2))


def uniform_received_concentration(lengths: Iterable[int]) -> float:
    """The mean of :func:`received_concentration_of_uniform` over the sentences of >= 4 tokens
    (the sentences the scorer averages this metric over). Dimensionless."""
    values = [received_concentration_of_uniform(n) for n in lengths if int(n) >= MIN_TOKENS]
    if not values:
        raise ValueError(f"no sentence has >= {MIN_TOKENS} tokens: the locality null is undefined")
    return float(np.mean(values))


def uniform_received_null(table: pd.DataFrame, context: NullContext) -> pd.Series:
    """Per run: :func:`uniform_received_concentration` of that run's evaluation sentences, or,
    without sentence lengths, the median received_concentration of every head at step 0."""
    runs = sorted(table["run"].unique())
    if all(run in context.eval_lengths for run in runs):
        return pd.Series(
            {run: uniform_received_concentration(context.eval_lengths[run]) for run in runs},
            name="null",
        )
    return pd.Series(step0_median_baseline(table, SCORE_COLUMN), index=runs, name="null")


MECHANISM = Mechanism(
    name="locality",
    version=1,
    unit="head",
    score_column=SCORE_COLUMN,
    description=(
        "concentration of the attention that keys 1..L-2 receive from later queries "
        "(focused heads, local or global), on the evaluation text"
    ),
    units="1 - normalised entropy (dimensionless)",
    null=uniform_received_null,
    ceiling=1.0,
    criterion_multiple=2.0,
)
