"""Snakemake script of rule `trajectories`: the per-(run, step) max-over-heads table.

Input: ``heads`` (heads.parquet). Param: ``metric``. Outputs: ``parquet`` (trajectories.parquet,
full precision, read by rules `analyze` and `figures`) and ``csv`` (the same table for people).
"""

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd
from _common import setup_logging

from mechgen.axes.developmental import trajectories
from mechgen.tables.outputs import write_csv, write_parquet


def main(sm: Any) -> None:
    """Compute the trajectories once and write both outputs (``sm`` is Snakemake's object)."""
    log = setup_logging(sm)
    heads = pd.read_parquet(sm.input.heads)
    traj = trajectories(heads, str(sm.params.metric))
    write_parquet(traj, sm.output.parquet)
    write_csv(traj, sm.output.csv)
    log.info("%d (run, step) rows of max-over-heads %s", len(traj), sm.params.metric)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
