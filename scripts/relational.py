"""Snakemake script of rule `relational`: the relational and configurational statistics.

Inputs: ``heads`` (heads.parquet, with the ``induction`` column) and ``circuits`` (every
``scores/<run>/step<N>.circuit.npz``). Params: ``thresholds`` {start, stop, step} (the onset
thresholds of the analysis), ``analysis`` {n_null, seed, confidence} (``relational.analysis``).
Outputs (``results/<suite>/stats/<name>.csv``; columns in docs/outputs.md):
``relational`` (per run: :func:`mechgen.axes.circuit_tables.relational_table`), ``relational_sizes``
(per size and relation, Wilson CI), ``relational_regressions`` (mixed models on
log10(n_params)), ``configurational`` (per ordered pair of runs) and
``configurational_stability`` (per run and consecutive checkpoints); and ``trajectories``
(``results/<suite>/relational_trajectories.parquet``: the max-over-heads trajectories of
:data:`TRAJECTORY_METRICS` present in ``heads``, stacked, for rule `relational_figures`).
"""

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd
from _common import setup_logging

from mechgen.axes import circuit_tables
from mechgen.axes.developmental import onset_thresholds, trajectories
from mechgen.tables.circuit_files import read_circuits
from mechgen.tables.outputs import write_csv, write_parquet

TRAJECTORY_METRICS = ("one_back", "induction", "induction_control")
"""The per-head scores whose max-over-heads trajectories the relational figure draws."""


def main(sm: Any) -> None:
    """Compute and write every output of the rule (``sm`` is Snakemake's object)."""
    log = setup_logging(sm)
    heads = pd.read_parquet(sm.input.heads)
    circuits = read_circuits(list(sm.input.circuits))
    settings = dict(sm.params.analysis)  # relational.analysis, defaults filled by validation
    log.info("%d head rows, %d checkpoints with circuit scores", len(heads), len(circuits))
    relational = circuit_tables.relational_table(
        heads, circuits, onset_thresholds(**sm.params.thresholds)
    )
    outputs = {
        "relational": relational,
        "relational_sizes": circuit_tables.relational_sizes(
            relational, float(settings["confidence"])
        ),
        "relational_regressions": circuit_tables.relational_regressions(relational),
        "configurational": circuit_tables.configurational_table(
            heads,
            circuits,
            n_null=int(settings["n_null"]),
            seed=int(settings["seed"]),
        ),
        "configurational_stability": circuit_tables.stability_table(heads, circuits),
    }
    for name, table in outputs.items():
        write_csv(table, sm.output[name])
        log.info("%s: %d rows -> %s", name, len(table), sm.output[name])
    traj = pd.concat(
        [trajectories(heads, metric) for metric in TRAJECTORY_METRICS if metric in heads],
        ignore_index=True,
    )
    write_parquet(traj, sm.output.trajectories)
    log.info("trajectories of %s -> %s", ", ".join(traj["metric"].unique()), sm.output.trajectories)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
