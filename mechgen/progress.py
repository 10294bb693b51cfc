"""Plain progress lines with an estimate of the time left, for long jobs in the main log.

Snakemake shows a local job's stderr in its own output, so a job that logs to stderr (see
scripts/_common.py) reports its progress there and in the rule's log file. Bars (tqdm) are not
used: jobs run in parallel and their bars overwrite each other, and in a log file a bar is
either silent for minutes or a flood. :class:`Progress` logs one line

    ``<label>: 120/1000 steps (12%), 35 s elapsed, about 4 min 16 s left``

at the first step, then at most every :data:`MIN_INTERVAL_S` seconds: whenever another
:data:`EVERY_FRACTION` of the work is done, and at least every :data:`MAX_INTERVAL_S` seconds,
and once at the end. The estimate is linear: time left = elapsed x (total - done) / done, with
elapsed counted from the construction of :class:`Progress` (not from process start, so set-up
does not inflate it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

EVERY_FRACTION = 0.1
"""A line whenever another 10% of the work is done ..."""
MAX_INTERVAL_S = 30.0
"""... and at least one line every 30 s while work remains ..."""
MIN_INTERVAL_S = 10.0
"""... but never two lines within 10 s (except the last), so a fast job logs two lines."""


def format_duration(seconds: float) -> str:
    """``"42 s"``, ``"4 min 16 s"`` or ``"1 h 05 min"`` (rounded down to the shown unit)."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Count ``total`` units of work (``unit``, plural) and log throttled progress lines.

    ``clock`` is injectable for tests (default ``time.monotonic``, seconds).
    """

    def __init__(
        self,
        label: str,
        total: int,
        logger: logging.Logger,
        unit: str = "steps",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total < 1:
            raise ValueError(f"Progress: total must be >= 1, got {total}")
        self.label, self.total, self.unit, self.log, self.clock = label, total, unit, logger, clock
        self.started = clock()
        self.done = 0
        self._last_time: float | None = None
        self._last_done = 0
        self.lines = 0

    def line(self, done: int, extra: str = "") -> str:
        """The progress line for ``done`` units (without logging it)."""
        elapsed = self.clock() - self.started
        text = (
            f"{self.label}: {done}/{self.total} {self.unit} ({100 * done / self.total:.0f}%), "
            f"{format_duration(elapsed)} elapsed"
        )
        if 0 < done < self.total:
            left = elapsed * (self.total - done) / done
            text += f", about {format_duration(left)} left"
        if extra:
            text += f", {extra}"
        return text

    def update(self, done: int, extra: str = "") -> bool:
        """Record that ``done`` units are finished; log a line if one is due. True if logged."""
        self.done = done
        now = self.clock()
        last = self._last_time
        due = (
            last is None
            or done >= self.total
            or (
                now - last >= MIN_INTERVAL_S
                and (
                    done - self._last_done >= EVERY_FRACTION * self.total
                    or now - last >= MAX_INTERVAL_S
                )
            )
        )
        if due and not (done >= self.total and self._last_done >= self.total and last is not None):
            self.log.info(self.line(done, extra))
            self._last_time, self._last_done = now, done
            self.lines += 1
            return True
        return False
