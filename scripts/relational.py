"""Snakemake script of rule `relational`: the relational and configurational statistics.

Inputs: ``heads`` (heads.parquet, with the ``induction`` column) and ``circuits`` (every
``scores/<run>/step<N>.circuit.npz``). Params: ``thresholds`` {start, stop, step} (the onset
thresholds of the analysis), ``analysis`` {n_null, seed, confidence} (``relational.analysis``).
Outputs (``results/<suite>/stats/``; columns documented in :mod:`mechgen.circuit`):
``relational`` (per run: :func:`mechgen.circuit.relational_table`), ``relational_sizes``
(per size and relation, Wilson CI), ``relational_regressions`` (mixed models on
log10(n_params)), ``configurational`` (per ordered pair of runs) and
``configurational_stability`` (per run and consecutive checkpoints).
"""

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd
from _common import setup_logging

from mechgen import circuit
from mechgen.developmental import onset_thresholds


def main(sm: Any) -> None:
    """Compute and write every output of the rule (``sm`` is Snakemake's object)."""
    log = setup_logging(sm)
    heads = pd.read_parquet(sm.input.heads)
    circuits = circuit.read_circuits(list(sm.input.circuits))
    settings = dict(sm.params.analysis)  # relational.analysis, defaults filled by validation
    log.info("%d head rows, %d checkpoints with circuit scores", len(heads), len(circuits))
    relational = circuit.relational_table(heads, circuits, onset_thresholds(**sm.params.thresholds))
    outputs = {
        "relational": relational,
        "relational_sizes": circuit.relational_sizes(
            relational, float(settings["confidence"])
        ),
        "relational_regressions": circuit.relational_regressions(relational),
        "configurational": circuit.configurational_table(
            heads,
            circuits,
            n_null=int(settings["n_null"]),
            seed=int(settings["seed"]),
        ),
        "configurational_stability": circuit.stability_table(heads, circuits),
    }
    for name, table in outputs.items():
        table.to_csv(sm.output[name], index=False)
        log.info("%s: %d rows -> %s", name, len(table), sm.output[name])


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
