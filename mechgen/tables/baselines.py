"""The nulls of the attention mechanisms: what a head scores if it attends uniformly.

Light on purpose (numpy and pandas only): the mechanism catalog imports these, and the workflow
imports the catalog when it parses its rules, so nothing here may pull in the statistics stack.

The uniform baseline
--------------------
A head that attends uniformly over the causal prefix puts 1 / (i + 1) on the previous token at
query position i (0-indexed; positions 0..i are visible). ``one_back`` averages over query
positions 1..L-1 of a sentence of L tokens and then over sentences, so the baseline is

    b = mean over sentences s with L_s >= 2 of  (1 / (L_s - 1)) * sum_{i=1}^{L_s - 1} 1 / (i + 1)

(:func:`uniform_one_back_baseline`). It depends only on the token lengths of the evaluation
sentences, i.e. on the eval text and the tokenizer; the pipeline writes those token ids to
``results/<suite>/eval/tokens/<key>.json``, one file per tokenizer: a toy suite's runs share
``suite.json``, any other run has its own ``<run>.json`` (:func:`run_token_lengths`).

When no lengths are available (a suite imported from published tables), the baseline is taken
from the step-0 checkpoints instead (:func:`step0_median_baseline`): the median ``one_back`` over
every head of every run at step 0. Why this and not ``prev_uniform_ratio``: that column is the
per-sentence mean of one_back x L, and a uniform head scores L x b(L) on it, which still depends
on the unknown lengths; dividing the two published columns does not recover b either (a ratio of
means is not a mean of ratios). At step 0, GPT-NeoX's small initialisation (weights with std 0.02)
makes every query-key logit nearly 0, so attention is nearly uniform and the typical head scores
close to b; the median is robust to the few heads that are not. On the reference tables the
step-0 median is 0.1257 (0.1253-0.1257 for each of the four sizes); uniform attention on
22-token sentences would score 0.1243, and the step-0 heads' prev_uniform_ratio / one_back is
about 23, so the step-0 heads do behave like uniform attention on sentences of that length.

Unit of every baseline: attention weight (a probability).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from mechgen.tables.heads import drop_nonfinite_heads, validate_heads

FUNCTIONAL_METRIC = "one_back"
"""The criterion and its uniform baseline are defined for the one_back score only."""


def uniform_one_back_baseline(lengths: Iterable[int]) -> float:
    """The one_back score of uniform causal attention, averaged over sentences.

    For a sentence of ``L`` tokens: ``b(L) = (1 / (L - 1)) * sum_{i=1}^{L-1} 1 / (i + 1)``
    (mean over query positions 1..L-1 of the weight 1 / (i + 1) that uniform attention over
    positions 0..i puts on position i - 1). Returns the unweighted mean of b(L) over sentences,
    as the scorer averages one_back. Sentences with fewer than 2 tokens have no query position
    with a previous token and are skipped, as the scorer skips them. Unit: attention weight.
    """
    per_sentence: list[float] = []
    for length in lengths:
        length = int(length)
        if length < 0:
            raise ValueError(f"sentence length must be >= 0, got {length}")
        if length < 2:
            continue
        query_positions = np.arange(1, length)
        per_sentence.append(float(np.mean(1.0 / (query_positions + 1))))
    if not per_sentence:
        raise ValueError("no sentence has 2 or more tokens: the one_back baseline is undefined")
    return float(np.mean(per_sentence))


def uniform_induction_baseline(half_length: int) -> float:
    """Induction score of a head attending uniformly over the causal prefix on [x]x2 sequences
    of half length L: (1/L) sum_{p=L}^{2L-1} 1/(p + 1) (attention probability)."""
    return float(np.mean(1.0 / (np.arange(half_length, 2 * half_length) + 1.0)))


def read_token_lengths(path: str | Path) -> list[int]:
    """Token lengths of the eval sentences in ``path`` (JSON ``{"token_ids": [[...], ...]}``)."""
    with open(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or "token_ids" not in data:
        raise ValueError(f"{path}: expected a JSON object with key 'token_ids' (a list of lists)")
    token_ids = data["token_ids"]
    if not isinstance(token_ids, list) or not all(isinstance(s, list) for s in token_ids):
        raise ValueError(f"{path}: 'token_ids' must be a list of lists of token ids")
    return [len(s) for s in token_ids]


def run_token_lengths(token_files: Mapping[str, str | Path]) -> dict[str, list[int]]:
    """Per run, the token lengths of its evaluation sentences, from ``{run: eval token file}``
    (runs that share a tokenizer share a file, read once)."""
    lengths: dict[str, list[int]] = {}
    by_path: dict[str, list[int]] = {}
    for run, path in token_files.items():
        key = str(path)
        if key not in by_path:
            by_path[key] = read_token_lengths(path)
        lengths[run] = by_path[key]
    return lengths


def token_file_baseline(path: str | Path) -> float:
    """:func:`uniform_one_back_baseline` of the sentences in an eval token file."""
    return uniform_one_back_baseline(read_token_lengths(path))


def step0_median_baseline(heads: pd.DataFrame, metric: str = FUNCTIONAL_METRIC) -> float:
    """Fallback baseline: the median ``metric`` over every head of every run at step 0.

    Used when the eval token lengths are unknown (see the module docstring for why this
    approximates the uniform baseline). Non-finite and flagged heads are left out.
    """
    validate_heads(heads, metric)
    at_step0 = drop_nonfinite_heads(heads[heads["step"] == 0], metric)
    if at_step0.empty:
        raise ValueError(
            "no finite step-0 head scores: cannot estimate the uniform baseline from step 0; "
            "provide the eval token files instead"
        )
    return float(np.median(at_step0[metric].to_numpy(dtype=float)))
