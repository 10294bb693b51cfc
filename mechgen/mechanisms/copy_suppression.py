"""Copy suppression (McDougall et al. 2023), from the weights: a head whose OV circuit lowers
the logit of the very token it reads; its positive twin, copying, raises it.

Scored from the weights only, model-side by :mod:`mechgen.model.weight_scores`: for the K
(:data:`DEFAULT_TOP_K`) most frequent tokens of the run's evaluation text (ties: the lower id
first), the logits ``L[s, c]`` of every candidate c among those K for every source s of those K,
through effective embedding -> the head's OV circuit -> unembedding. This module holds the
score on those logits (torch-free).

Scores (per head, fractions 0..1):

- ``copy_suppression`` = mean over the K sources s of the normalised rank of the own logit
  counted from the bottom: (#{c != s: L[s, c] > L[s, s]} + 0.5 #{c != s: L[s, c] = L[s, s]})
  / (K - 1). 1: every token's own logit is the lowest among the K; 0: the highest.
- ``copying`` = 1 - copy_suppression: the same rank counted from the top (1: every token's own
  logit is the highest, the copying head of an induction circuit).

Null: a head whose logits do not depend on the source's identity (a random head, or the
candidates permuted) puts the own token at a uniformly random rank, so both scores have
expectation 0.5; ceiling 1. Criterion: score >= 1.8 x 0.5 = 0.9, i.e. the own token among the
lowest (highest) tenth of the frequent tokens on average (the catalog's usual 2 x null would be
the ceiling itself).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mechgen.mechanisms.base import Mechanism, NullContext

DEFAULT_TOP_K = 100
"""K: the number of most frequent evaluation tokens a head's copy scores are taken over."""

RANDOM_RANK_NULL = 0.5
"""Expected normalised rank of the own logit for a head that ignores the source's identity."""


def frequent_tokens(token_ids: list[list[int]], k: int = DEFAULT_TOP_K) -> list[int]:
    """The ``k`` most frequent ids of the evaluation text (all of them if fewer), by count
    descending, ties by id ascending."""
    ids, counts = np.unique(
        np.fromiter((t for sentence in token_ids for t in sentence), dtype=np.int64),
        return_counts=True,
    )
    order = np.lexsort((ids, -counts))  # last key is primary: count descending, then id
    return [int(i) for i in ids[order][:k]]


def copy_scores(logits: np.ndarray) -> dict[str, np.ndarray]:
    """``logits [..., K, K]`` (source x candidate, same token order on both axes; K >= 2) ->
    ``copy_suppression`` and ``copying`` of shape ``...`` (definitions in the module docstring)."""
    logits = np.asarray(logits, dtype=float)
    k = logits.shape[-1]
    if logits.shape[-2] != k or k < 2:
        raise ValueError(f"logits must be [..., K, K] with K >= 2; got {logits.shape}")
    own = np.diagonal(logits, axis1=-2, axis2=-1)[..., None]  # [..., K, 1]
    off = ~np.eye(k, dtype=bool)
    above = ((logits > own) & off).sum(axis=-1)
    ties = ((logits == own) & off).sum(axis=-1)
    rank_from_bottom = (above + 0.5 * ties) / (k - 1)
    suppression = rank_from_bottom.mean(axis=-1)
    return {"copy_suppression": suppression, "copying": 1.0 - suppression}


def random_rank_null(table: pd.DataFrame, context: NullContext) -> pd.Series:
    """Per run: 0.5, the expected normalised own-logit rank of a head that ignores its source."""
    del context
    runs = sorted(table["run"].unique())
    return pd.Series(RANDOM_RANK_NULL, index=runs, name="null")


MECHANISM = Mechanism(
    name="copy_suppression",
    version=1,
    unit="head",
    score_column="copy_suppression",
    description="the OV circuit lowers the logit of the token the head reads",
    units="normalised rank of the own logit among the K frequent tokens (1 = lowest)",
    null=random_rank_null,
    ceiling=1.0,
    criterion_multiple=1.8,
)
