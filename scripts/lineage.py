"""Snakemake script of rule `lineage`: does every run descend from its own init, and share it
with exactly the runs it should? (:mod:`mechgen.stats.lineage`)

Input: ``sidecars`` (every scoring sidecar scores/<run>/step<N>.json: sha256 and weight
fingerprint). Params: ``runs`` (per run: run, kind, init_group; :mod:`mechgen.variation`).
Output: ``lineage`` (stats/lineage.csv).
"""

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd
from _common import setup_logging

from mechgen.stats import lineage
from mechgen.tables.outputs import write_csv


def main(sm: Any) -> None:
    log = setup_logging(sm)
    checkpoints = lineage.read_sidecars(sm.input.sidecars)
    table = lineage.lineage_table(checkpoints, pd.DataFrame(list(sm.params.runs)))
    flagged = lineage.flagged_runs(table)
    for run, flags in flagged.items():
        log.warning("lineage: run %s flagged (%s); seed_sources leaves it out", run, flags)
    log.info("lineage: %d checkpoints, %d runs flagged", len(table), len(flagged))
    write_csv(table, sm.output.lineage)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
