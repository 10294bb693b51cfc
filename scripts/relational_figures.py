"""Snakemake script of rule `relational_figures`: the relational and configurational figures.

Inputs: ``trajectories`` (relational_trajectories.parquet) and the CSVs of rule `relational`. Params: ``half_length``
(L of the repeated sequences, for the uniform-attention induction level). Outputs:
``relational_trajectories``, ``onset_lag``, ``ablation``, ``configurational`` (see
:mod:`mechgen.figures.suite`); a figure that cannot exist (e.g. no pair of runs) is a placeholder
that says why.
"""

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd
from _common import setup_logging

from mechgen.figures import suite as figures
from mechgen.tables.baselines import uniform_induction_baseline
from mechgen.tables.outputs import read_csv


def main(sm: Any) -> None:
    """Draw every figure of the rule (``sm`` is Snakemake's object)."""
    log = setup_logging(sm)
    traj = pd.read_parquet(sm.input.trajectories)
    by_metric = {metric: rows for metric, rows in traj.groupby("metric", sort=False)}
    relational = read_csv(sm.input.relational)
    configurational = read_csv(sm.input.configurational)
    figures.plot_relational_trajectories(
        by_metric["one_back"],
        by_metric["induction"],
        sm.output.relational_trajectories,
        uniform_induction_baseline(int(sm.params.half_length)),
        by_metric.get("induction_control"),
    )
    if relational.empty:
        for name in ("onset_lag", "ablation"):
            figures.placeholder_figure(sm.output[name], "No relational table rows.")
    else:
        figures.plot_onset_lags(relational, sm.output.onset_lag)
        figures.plot_ablation(relational, sm.output.ablation)
    if configurational.empty:
        reason = "No configurational comparison: the suite has a single run."
        figures.placeholder_figure(sm.output.configurational, reason)
        log.warning(reason)
    else:
        figures.plot_configurational(configurational, sm.output.configurational, runs=traj)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
