"""Snakemake script of rule `mechanism_figures`: the generalizability profile heatmap.

Input: ``profile`` (stats/profile.csv, rule `mechanisms`). Output: ``profile``
(figures/profile.png, :func:`mechgen.figures.suite.plot_profile`).
"""

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import setup_logging

from mechgen.figures import suite as figures
from mechgen.tables.outputs import read_csv


def main(sm: Any) -> None:
    """Draw the profile heatmap (``sm`` is Snakemake's object)."""
    log = setup_logging(sm)
    profile = read_csv(sm.input.profile)
    figures.plot_profile(profile, sm.output.profile)
    log.info(
        "profile heatmap: %d mechanisms -> %s",
        int((profile["size"] == "all").sum()),
        sm.output.profile,
    )


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
