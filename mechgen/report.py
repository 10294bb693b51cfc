"""The HTML report's browser title.

Snakemake's report template hard-codes ``<title>Snakemake Report</title>`` (no option sets it),
so a tab or a saved file of any suite's report reads the same. :func:`retitle` gives the built
report a title naming mechgen and its suite; ``mechgen.sh`` calls it after ``--report``.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from mechgen import atomic

_TITLE = re.compile(r"<title>.*?</title>", re.DOTALL | re.IGNORECASE)


def report_title(suite: str) -> str:
    """The title of a suite's report: ``mechgen report, suite <suite>``."""
    return f"mechgen report, suite {suite}"


def retitle(path: str | Path, suite: str) -> str:
    """Replace the first ``<title>`` of the HTML report at ``path`` by :func:`report_title`.

    Returns the new title. Raises ``ValueError`` if the file has no ``<title>`` element.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    title = report_title(suite)
    new, n = _TITLE.subn(f"<title>{html.escape(title)}</title>", text, count=1)
    if n == 0:
        raise ValueError(f"{path}: no <title> element to replace")
    atomic.write_text(path, new)
    return title
