"""Checkpoint schedules: which training steps of a run get scored.

Pythia and PolyPythias publish 154 checkpoints per run as Hugging Face branches ``stepN``:
step 0, ten log-spaced early steps 1, 2, 4, ..., 512, and every 1,000 steps from 1,000 to
143,000. One step is one optimiser update on 1,024 sequences of 2,048 tokens, so
``tokens_seen = step * 2_097_152``.
"""

from __future__ import annotations

PYTHIA_TOKENS_PER_STEP = 2_097_152
"""Tokens per optimiser step of every Pythia/PolyPythias run (1,024 x 2,048)."""

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
