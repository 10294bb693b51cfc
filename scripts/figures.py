"""Snakemake script of rule `figures`: the six figures of a suite (300-dpi PNG).

Inputs: ``heads`` (heads.parquet), ``trajectories`` (trajectories.parquet, rule
`trajectories`) and the stats CSVs of rule `analyze` (``per_seed``, ``per_model``,
``convergence``, ``mds``, ``functional_run_step``, ``functional_run``, ``functional_size``,
``positional_size_step``, ...); every table is read, none recomputed.
Params: ``metric``. Outputs: ``trajectories``, ``layer_heatmap``, ``size_effects``,
``correlation_matrix``, ``mds``, ``functional_heads`` (see :mod:`mechgen.figures.suite`). A figure
that cannot exist for this suite (e.g. correlations with a single run) is a placeholder that
says why.
"""

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd
from _common import setup_logging

from mechgen.figures import suite as figures
from mechgen.tables.outputs import read_csv


def one_back_baseline(functional_table: pd.DataFrame) -> float | None:
    """The uniform one_back baseline used by the functional axis, if it is one number."""
    values = functional_table["baseline"].dropna().unique()
    return float(values[0]) if len(values) == 1 else None


def main(sm: Any) -> None:
    """Draw every figure the rule declares (``sm`` is Snakemake's object)."""
    log = setup_logging(sm)
    metric = str(sm.params.metric)
    heads = pd.read_parquet(sm.input.heads)
    per_seed = read_csv(sm.input.per_seed)
    per_model = read_csv(sm.input.per_model)
    pairs = read_csv(sm.input.convergence)
    functional_run_step = read_csv(sm.input.functional_run_step)
    functional_run = read_csv(sm.input.functional_run)
    functional_size = read_csv(sm.input.functional_size)
    positional_size_step = read_csv(sm.input.positional_size_step)
    traj = pd.read_parquet(sm.input.trajectories)
    coords = read_csv(sm.input.mds)

    # The dashed uniform line is the one_back baseline: only meaningful on the one_back axis.
    baseline = one_back_baseline(functional_run) if metric == "one_back" else None
    figures.plot_trajectories(traj, sm.output.trajectories, metric, baseline)
    figures.plot_layer_heatmap(
        heads, sm.output.layer_heatmap, metric, positional=positional_size_step
    )
    figures.plot_size_effects(per_seed, per_model, sm.output.size_effects, metric)
    figures.plot_functional_heads(functional_run_step, functional_size, sm.output.functional_heads)

    if pairs.empty:
        reason = "No trajectory correlations: the suite has a single run."
        figures.placeholder_figure(sm.output.correlation_matrix, reason)
        figures.placeholder_figure(sm.output.mds, reason)
        log.warning(reason)
        return
    corr = figures.correlation_from_pairs(pairs)
    figures.plot_correlation_matrix(corr, per_seed, sm.output.correlation_matrix)
    if coords.empty:
        reason = "No MDS: it needs at least 3 runs, each with a non-constant trajectory."
        figures.placeholder_figure(sm.output.mds, reason)
        log.warning(reason)
    else:
        figures.plot_mds(coords, sm.output.mds, per_model)
    log.info("figures written to %s", Path(sm.output.trajectories).parent)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
