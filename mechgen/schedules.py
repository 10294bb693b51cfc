"""Checkpoint schedules: which training steps of a run get scored.

Pythia and PolyPythias publish 154 checkpoints per run as Hugging Face branches ``stepN``:
step 0, ten log-spaced early steps 1, 2, 4, ..., 512, and every 1,000 steps from 1,000 to
143,000. One step is one optimiser update on 1,024 sequences of 2,048 tokens, so
``tokens_seen = step * 2_097_152``.

Stanford CRFM's GPT-2 runs (the Mistral project) publish 609 checkpoints per run as branches
``checkpoint-N``: every 10 steps from 0 to 90, every 50 from 100 to 1,950, every 100 from 2,000
to 19,900 and every 1,000 from 20,000 to 400,000 (``checkpoint_frequency`` [[10, 100], [50, 2000],
[100, 20000], [1000, 400000]] in stanford-crfm/mistral ``conf/gpt2-mistral-small-config.yaml`` and
``-medium-config.yaml``; TransformerLens' ``STANFORD_CRFM_CHECKPOINTS`` lists the same steps). One
step is one update on 512 sequences of 1,024 tokens (``effective_bsz: 512`` in those files,
``seq_len: 1024`` in ``conf/models/gpt2-small.yaml``), so ``tokens_seen = step * 524_288``.
"""

from __future__ import annotations

import math

PYTHIA_TOKENS_PER_STEP = 2_097_152
"""Tokens per optimiser step of every Pythia/PolyPythias run (1,024 x 2,048)."""

CRFM_TOKENS_PER_STEP = 524_288
"""Tokens per optimiser step of the Stanford CRFM GPT-2 runs (512 sequences x 1,024 tokens)."""

_LOG_SPACED = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]

PYTHIA_SCHEDULES: dict[str, list[int]] = {
    # All 154 branches of a Pythia run.
    "all": _LOG_SPACED + list(range(1000, 143_001, 1000)),
    # The 16 checkpoints of the reference study (Trott 2025).
    "trott16": _LOG_SPACED + [1000, 10_000, 50_000, 100_000, 143_000],
    # A 27-checkpoint subset in the spirit of the PolyPythias paper's evaluations: the
    # log-spaced start, every 1,000 steps to 10,000, then five coarse late points and the end.
    "polypythias27": _LOG_SPACED
    + list(range(1000, 10_001, 1000))
    + [20_000, 40_000, 60_000, 80_000, 100_000, 143_000],
}

CRFM_ALL: list[int] = (
    list(range(0, 100, 10))
    + list(range(100, 2000, 50))
    + list(range(2000, 20_000, 100))
    + list(range(20_000, 400_001, 1000))
)
"""The 609 checkpoint steps of every Stanford CRFM GPT-2 run (10 + 38 + 180 + 381)."""


def log_spaced_subset(steps: list[int], n: int) -> list[int]:
    """Step 0 (if in ``steps``) and, for k = 0..n-1, the step of ``steps`` nearest on a log scale
    to ``lo * (hi / lo) ** (k / (n - 1))``, where lo and hi are the smallest positive and the
    largest step; duplicates removed, sorted. At most n + 1 steps, all members of ``steps``."""
    positive = sorted(s for s in set(steps) if s > 0)
    if n < 2 or not positive:
        raise ValueError("log_spaced_subset needs n >= 2 and at least one positive step")
    lo, hi = positive[0], positive[-1]
    picked = {0} if 0 in steps else set()
    for k in range(n):
        target = math.log(lo) + (math.log(hi) - math.log(lo)) * k / (n - 1)
        picked.add(min(positive, key=lambda s: abs(math.log(s) - target)))
    return sorted(picked)


CRFM_SCHEDULES: dict[str, list[int]] = {
    # All 609 branches of a CRFM run.
    "all": CRFM_ALL,
    # Step 0 and 20 log-spaced checkpoints from 10 to 400,000 (21 in all): the sparse default.
    "log20": log_spaced_subset(CRFM_ALL, 20),
}


def resolve_schedule(schedule: str | list[int], named: dict[str, list[int]] | None = None) -> list[int]:
    """Return the sorted list of steps of ``schedule``.

    ``schedule`` is either a list of steps or a name in ``named`` (default: the Pythia
    schedules). Raises ``KeyError`` naming the allowed values for an unknown name.
    """
    named = PYTHIA_SCHEDULES if named is None else named
    if isinstance(schedule, str):
        if schedule not in named:
            raise KeyError(
                f"unknown schedule {schedule!r}; allowed: {', '.join(sorted(named))} or a list of steps"
            )
        steps = named[schedule]
    else:
        steps = list(schedule)
    return sorted({int(s) for s in steps})
