"""Snakemake script of rule `mechanism_figure`: one mechanism's figure (wildcard ``mechanism``).

Inputs: ``run_step``, ``sizes``, ``per_seed`` (stats/<mechanism>/functional_run_step.csv,
functional_size.csv, per_seed.csv) and ``profile`` (stats/profile.csv: the note of a mechanism
that was not scored). Output: ``figure`` (figures/mechanisms/<mechanism>.png,
:func:`mechgen.figures.mechanism_figures.plot_mechanism`).
"""

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import setup_logging

from mechgen import mechanisms
from mechgen.figures.mechanism_figures import plot_mechanism
from mechgen.tables.outputs import read_csv


def main(sm: Any) -> None:
    """Draw the figure of ``sm.wildcards.mechanism`` (``sm`` is Snakemake's object)."""
    log = setup_logging(sm)
    name = sm.wildcards.mechanism
    profile = read_csv(sm.input.profile)
    notes = profile.loc[(profile["mechanism"] == name) & (profile["size"] == "all"), "note"]
    note = str(notes.iloc[0]) if len(notes) and notes.notna().iloc[0] else ""
    run_step = read_csv(sm.input.run_step)
    plot_mechanism(
        name,
        run_step,
        read_csv(sm.input.sizes),
        read_csv(sm.input.per_seed),
        sm.output.figure,
        note=note,
        unit=mechanisms.get(name).unit,
    )
    log.info("%s: %d run x step rows -> %s", name, len(run_step), sm.output.figure)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
