"""Successor heads (Gould et al. 2023; over training, Tigges et al. 2024): a head whose OV
circuit maps a token of an ordinal sequence to the next one (" Monday" -> " Tuesday").

Scored from the weights only (no text): model-side by :mod:`mechgen.model.weight_scores`,
which computes per head the logits ``L[s, c]`` of every candidate c for every source token s
through the path effective embedding -> the head's OV circuit -> unembedding; this module holds
the task data and the score on those logits (torch-free).

Task data (:data:`TASKS`): ordinal sequences (numbers 1-100, number words one-twenty, days,
months, capital letters, Roman numerals I-XX). Convention for spaces, as Gould et al.: every
item is the word as it appears mid-sentence, with **one leading space** (" one", " Monday",
" 7"). Only items the run's tokenizer encodes as exactly one token are kept
(:func:`task_token_ids`); the others are dropped and listed. Pairs are consecutive items of a
sequence with both kept (dropping " thirteen" removes the pairs twelve->thirteen and
thirteen->fourteen; it never links twelve to fourteen). A task needs at least
:data:`MIN_KEPT_ITEMS` kept items and two pairs, else it is dropped whole. Sequences are not
cyclic (no Sunday -> Monday).

Score ``successor``: per task k with kept items C_k (the candidate set) and pairs P_k, the
fraction of pairs (s, t) in P_k with L[s, t] > L[s, c] for every other c in C_k (a tie for the
top is a miss), then the unweighted mean over tasks (not over pairs, so numbers do not
dominate); a fraction, ceiling 1. Null: the chance level ``successor_chance`` =
mean_k 1/|C_k| (a head whose top candidate is uniform at random), per run (it depends on the
run's tokenizer); criterion successor >= 2 x chance. Control ``successor_permuted``: the same
score with each task's targets permuted by a fixed seeded derangement (no pair keeps its true
successor), so a head that merely prefers one candidate scores about as high there; the
criterion asks it below half the successor score.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mechgen.mechanisms.base import Mechanism, NullContext

LEADING_SPACE = " "
"""Every task item is encoded as LEADING_SPACE + item (the mid-sentence form)."""

MIN_KEPT_ITEMS = 3
"""A task with fewer single-token items (or fewer than 2 pairs) is dropped whole."""

PERMUTATION_SEED = 0
"""Seed of the derangement of :func:`permuted_targets` (numpy.random.default_rng)."""

_ROMAN = ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X",
          "XI", "XII", "XIII", "XIV", "XV", "XVI", "XVII", "XVIII", "XIX", "XX"]  # fmt: skip
_NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                 "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
                 "eighteen", "nineteen", "twenty"]  # fmt: skip

TASKS: dict[str, tuple[str, ...]] = {
    "numbers": tuple(str(n) for n in range(1, 101)),
    "number_words": tuple(_NUMBER_WORDS),
    "days": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "months": (
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ),
    "letters": tuple(chr(c) for c in range(ord("A"), ord("Z") + 1)),
    "roman_numerals": tuple(_ROMAN),
}
"""The ordinal sequences, each in order (item i's successor is item i + 1)."""


def task_token_ids(
    encode: Callable[[str], Sequence[int]], tasks: Mapping[str, Sequence[str]] = TASKS
) -> dict[str, Any]:
    """The successor task for one tokenizer: kept items, their ids, dropped items, sha256.

    ``encode(text)`` returns the token ids of ``text`` without special tokens. Returns a JSON
    record ``{"leading_space", "min_kept_items", "tasks": {name: {"items", "token_ids",
    "pairs", "dropped"}}, "dropped_tasks": {name: reason}, "sha256"}``: ``items`` the kept items
    (in order), ``token_ids`` their single ids, ``pairs`` index pairs [i, j] into ``items`` of
    consecutive originals, ``dropped`` the items that are not one token (with their ids).
    ``sha256`` is over the canonical JSON (sorted keys, no spaces) of everything else, so it
    identifies the task data exactly.
    """
    kept_tasks: dict[str, Any] = {}
    dropped_tasks: dict[str, str] = {}
    for name, items in tasks.items():
        kept, ids, dropped, index_of = [], [], [], {}
        for position, item in enumerate(items):
            encoded = [int(i) for i in encode(LEADING_SPACE + item)]
            if len(encoded) == 1:
                index_of[position] = len(kept)
                kept.append(item)
                ids.append(encoded[0])
            else:
                dropped.append({"item": item, "token_ids": encoded})
        pairs = [
            [index_of[p], index_of[p + 1]]
            for p in range(len(items) - 1)
            if p in index_of and p + 1 in index_of
        ]
        if len(set(ids)) != len(ids):
            dropped_tasks[name] = "two items encode to the same token"
        elif len(kept) < MIN_KEPT_ITEMS or len(pairs) < 2:
            dropped_tasks[name] = (
                f"{len(kept)} single-token items and {len(pairs)} pairs "
                f"(needs >= {MIN_KEPT_ITEMS} items and >= 2 pairs)"
            )
        entry = {"items": kept, "token_ids": ids, "pairs": pairs, "dropped": dropped}
        if name not in dropped_tasks:
            kept_tasks[name] = entry
        else:
            dropped_tasks[name] += f"; dropped items: {[d['item'] for d in dropped]}"
    record: dict[str, Any] = {
        "leading_space": LEADING_SPACE,
        "min_kept_items": MIN_KEPT_ITEMS,
        "tasks": kept_tasks,
        "dropped_tasks": dropped_tasks,
    }
    record["sha256"] = _sha256(record)
    return record


def _sha256(record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def check_task_record(record: Mapping[str, Any]) -> None:
    """Raise ValueError if ``record`` (from :func:`task_token_ids`) does not match its sha256."""
    if record.get("sha256") != _sha256(record):
        raise ValueError("successor task record does not match its sha256 (edited or damaged)")


def permuted_targets(n_pairs: int, seed: int = PERMUTATION_SEED) -> np.ndarray:
    """A derangement of range(n_pairs) (no fixed point; n_pairs >= 2), drawn by rejection with
    ``numpy.random.default_rng(seed)``: pair i is scored against pair perm[i]'s target."""
    if n_pairs < 2:
        raise ValueError(f"a derangement needs >= 2 pairs, got {n_pairs}")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n_pairs)
        if not np.any(perm == np.arange(n_pairs)):
            return perm


def top1_hits(logits: np.ndarray, sources: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``logits [..., n_items, n_items]`` (source item x candidate item) -> bool ``[..., n_pairs]``:
    True where ``logits[..., s, t] > logits[..., s, c]`` for every candidate c != t."""
    rows = logits[..., sources, :]  # [..., n_pairs, n_items]
    index = np.broadcast_to(targets[:, None], (*rows.shape[:-1], 1))
    own = np.take_along_axis(rows, index, axis=-1)[..., 0]
    others = rows.copy()
    np.put_along_axis(others, index, -np.inf, axis=-1)
    return own > others.max(axis=-1)


def successor_scores(
    task_logits: Mapping[str, np.ndarray], record: Mapping[str, Any]
) -> dict[str, np.ndarray | float]:
    """Per head: ``successor``, ``successor_permuted`` and the run's ``successor_chance``.

    ``task_logits[name]``: ``[..., n_items, n_items]`` logits of task ``name``'s kept items
    (rows: source item; columns: candidate item, in ``record["tasks"][name]["items"]`` order),
    ``...`` = any head dimensions. Returns arrays of shape ``...`` (NaN without a kept task)
    and the chance level mean_k 1 / n_items_k (NaN without a kept task).
    """
    tasks = record["tasks"]
    if not tasks:
        shape = next(iter(task_logits.values())).shape[:-2] if task_logits else ()
        nan = np.full(shape, np.nan)
        return {"successor": nan, "successor_permuted": nan.copy(), "successor_chance": np.nan}
    hits, permuted, chance = [], [], []
    for name, task in tasks.items():
        logits = np.asarray(task_logits[name], dtype=float)
        pairs = np.asarray(task["pairs"], dtype=int)
        sources, targets = pairs[:, 0], pairs[:, 1]
        hits.append(top1_hits(logits, sources, targets).mean(axis=-1))
        permuted_t = targets[permuted_targets(len(pairs))]
        permuted.append(top1_hits(logits, sources, permuted_t).mean(axis=-1))
        chance.append(1.0 / len(task["items"]))
    return {
        "successor": np.mean(hits, axis=0),
        "successor_permuted": np.mean(permuted, axis=0),
        "successor_chance": float(np.mean(chance)),
    }


def chance_null(table: pd.DataFrame, context: NullContext) -> pd.Series:
    """Per run: its ``successor_chance`` (mean over its kept tasks of 1 / task size; the same on
    every row of a run). NaN for a run without a kept task, or a table without the column (an
    imported suite), so nothing meets the criterion there."""
    del context  # the chance level is a column: it depends on each run's tokenizer
    if "successor_chance" not in table.columns:
        return pd.Series(np.nan, index=sorted(table["run"].unique()), name="null")
    return table.groupby("run")["successor_chance"].first().rename("null")


MECHANISM = Mechanism(
    name="successor",
    version=1,
    unit="head",
    score_column="successor",
    description="the OV circuit maps an ordinal token to its successor (Monday -> Tuesday)",
    units="fraction of (token, successor) pairs, mean over tasks",
    null=chance_null,
    ceiling=1.0,
    criterion_multiple=2.0,
    control_column="successor_permuted",
    control_max_fraction=0.5,
)
