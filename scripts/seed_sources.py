"""Snakemake script of rule `seed_sources`: split each mechanism quantity's seed variance into
data order and initialisation (:mod:`mechgen.stats.seed_sources`).

Inputs: ``heads`` and ``layers`` (heads.parquet, layers.parquet: the head- and layer-unit
mechanisms' scores, for the normalised trajectories), ``tokens`` (eval token files,
for the nulls), ``per_seed`` (stats/<mechanism>/per_seed.csv, in the order of
params.mechanisms), ``lineage`` (stats/lineage.csv: flagged runs are left out), and
``relational`` (stats/relational.csv) when the relational axis runs. Params: ``runs`` (run, kind,
base_size), ``token_files`` ({run: its eval token file}), ``mechanisms``, ``settings`` (relational scoring settings, for the nulls),
``confidence``, ``n_resamples``, ``seed`` (``analysis.bootstrap``). Outputs: ``table``
(stats/seed_sources.csv) and ``figure`` (figures/seed_sources.png).
"""

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd
from _common import setup_logging

from mechgen import mechanisms
from mechgen.figures import seed_figures
from mechgen.mechanisms import NullContext
from mechgen.stats import crossmech, seed_sources
from mechgen.tables.baselines import run_token_lengths
from mechgen.tables.outputs import read_csv, write_csv


def main(sm: Any) -> None:
    log = setup_logging(sm)
    runs = pd.DataFrame(list(sm.params.runs))
    heads = pd.read_parquet(sm.input.heads)
    layers = pd.read_parquet(sm.input.layers) if "layers" in sm.input.keys() else None  # noqa: SIM118
    context = NullContext(
        eval_lengths=run_token_lengths(sm.params.token_files),
        settings=dict(sm.params.settings),
    )
    per_seed, trajectories = {}, {}
    for name, path in zip(sm.params.mechanisms, sm.input.per_seed, strict=True):
        table = read_csv(path)
        if table.empty:
            continue
        per_seed[name] = table
        scored = crossmech.scored_heads(heads, mechanisms.get(name), context, layers)
        if not scored.note:
            trajectories[name] = crossmech.normalised_trajectories(scored.heads)[0]
    relational = read_csv(sm.input.relational) if "relational" in sm.input.keys() else None  # noqa: SIM118
    lineage = read_csv(sm.input.lineage)
    table = seed_sources.seed_sources(
        runs,
        per_seed,
        trajectories=trajectories,
        relational=relational,
        lineage=lineage,
        confidence=float(sm.params.confidence),
        n_resamples=int(sm.params.n_resamples),
        seed=int(sm.params.seed),
    )
    excluded = sorted(
        {r for cell in table["excluded_runs"].dropna() for r in str(cell).split(";") if r}
    )
    log.info(
        "seed_sources: %d rows, %d mechanisms; excluded runs: %s",
        len(table),
        table["mechanism"].nunique(),
        ", ".join(excluded) or "none",
    )
    write_csv(table, sm.output.table)
    kind_of = {r: k for r, k in zip(runs["run"], runs["kind"], strict=True) if r not in excluded}
    seed_figures.plot_seed_sources(table, trajectories, kind_of, sm.output.figure)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
