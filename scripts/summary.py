"""Snakemake script of rule `summary`: the suite's key numbers per size (summary.csv) and the
report's opening summary (summary.rst), see :mod:`mechgen.tables.summary`.

Inputs: ``per_model``, ``functional`` (functional_size.csv), ``positional``
(positional_size_step.csv) (rule `analyze`), optionally
``relational_sizes`` (rule `relational`). Params: ``suite``, ``metric``, ``confidence``,
``stats_dir``. Outputs: ``csv``, ``rst``.
"""

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import setup_logging

from mechgen import atomic
from mechgen.tables import summary
from mechgen.tables.outputs import read_csv, write_csv


def main(sm: Any) -> None:
    """Write the summary table and its reStructuredText (``sm`` is Snakemake's object)."""
    log = setup_logging(sm)
    relational = sm.input.get("relational_sizes")
    table = summary.summary_table(
        read_csv(sm.input.per_model),
        read_csv(sm.input.functional),
        read_csv(sm.input.positional),
        read_csv(relational) if relational else None,
    )
    write_csv(table, sm.output.csv)
    atomic.write_text(
        sm.output.rst,
        summary.summary_rst(
            table,
            str(sm.params.suite),
            str(sm.params.metric),
            float(sm.params.confidence),
            str(sm.params.stats_dir),
        )
    )
    log.info("summary of %d sizes written to %s", len(table), sm.output.rst)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
