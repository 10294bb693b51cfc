"""Snakemake script of rule `mechanisms`: every catalog mechanism of the suite through the axes,
and the cross-mechanism tables.

Inputs: ``heads`` (heads.parquet: a head-unit mechanism's score is its ``score_column``),
``layers`` (layers.parquet, a layer-unit mechanism's; absent for a table suite), ``tokens`` (the
eval token files ``eval/tokens/<key>.json``, one per tokenizer, for the nulls that depend on the
sentence lengths; none for a table suite), and, when the relational axis runs, ``relational`` and
``configurational`` (stats/relational.csv, stats/configurational.csv) for the profile and
``circuits`` (scores/<run>/step<N>.circuit.npz) for the composition and ablation of every
declared link and each mechanism's configurational table.
Params: ``token_files`` ({run: its eval token file}), ``mechanisms`` (the suite's ``mechanisms:``), ``settings`` (its resolved relational
scoring settings, for the nulls; empty for a table suite), ``thresholds`` {start, stop, step}
(``analysis.onset_thresholds``, read in normalised units per decade), ``tokens_per_step``,
``confidence`` and ``seed`` (``analysis.bootstrap``), ``n_permutations`` and
``alignment_cost`` (``analysis.positional``), ``configurational`` {n_null, seed}
(``relational.analysis``; used only with circuit files).
Outputs: ``<mechanism>__<table>`` -> stats/<mechanism>/<table>.csv
(:data:`mechgen.stats.crossmech.MECHANISM_TABLES`), and ``profile``, ``mechanism_order``,
``mechanism_lags`` (:func:`mechgen.stats.crossmech.analyze_mechanisms`), ``links`` and
``links_sizes`` (:func:`mechgen.axes.links.link_table`, :func:`mechgen.axes.links.link_sizes`, over the
links declared between the suite's mechanisms). A mechanism whose column is
absent gets header-only tables, a ``not scored`` profile row and a warning in the log.
"""

import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd
from _common import setup_logging

from mechgen import mechanisms
from mechgen.axes import circuit_tables, links
from mechgen.axes.developmental import onset_thresholds
from mechgen.mechanisms import NullContext
from mechgen.stats import crossmech
from mechgen.tables.baselines import run_token_lengths
from mechgen.tables.circuit_files import read_circuits
from mechgen.tables.outputs import read_csv, write_declared_csvs


def optional_table(sm: Any, name: str) -> pd.DataFrame | None:
    """The input table ``name`` if the rule has it, else None."""
    # A Namedlist is a list of paths: `in` would test the paths, not the names.
    return read_csv(sm.input[name]) if name in sm.input.keys() else None  # noqa: SIM118


def mechanism_configurational(
    sm: Any,
    heads: pd.DataFrame,
    results: dict[str, crossmech.Scored],
    circuits: dict,
    log: logging.Logger,
) -> dict[str, pd.DataFrame]:
    """Per scored mechanism: its strongest head at each run's compared step against the other
    runs' (:func:`mechgen.axes.circuit_tables.configurational_table` with ``strongest`` from
    :func:`mechgen.stats.crossmech.strongest_at`); none without circuit files."""
    if not circuits:
        return {}
    steps = circuit_tables.configurational_steps(circuits)
    out = {}
    for name, result in results.items():
        if result.note:
            continue
        if result.mechanism.unit != "head":
            log.info("%s: configurational %s (no head weights)", name, crossmech.LAYER_UNIT_NOTE)
            continue
        out[name] = circuit_tables.configurational_table(
            heads,
            circuits,
            n_null=int(sm.params.configurational["n_null"]),
            seed=int(sm.params.configurational["seed"]),
            strongest=crossmech.strongest_at(result.heads, steps),
        )
        log.info("%s: %d configurational pairs", name, len(out[name]))
    return out


def main(sm: Any) -> None:
    """Run the analyses and write every output of the rule (``sm`` is Snakemake's object)."""
    log = setup_logging(sm)
    heads = pd.read_parquet(sm.input.heads)
    layers = pd.read_parquet(sm.input.layers) if "layers" in sm.input.keys() else None  # noqa: SIM118
    context = NullContext(
        eval_lengths=run_token_lengths(sm.params.token_files),
        settings=dict(sm.params.settings),
    )
    chosen = [mechanisms.get(name) for name in sm.params.mechanisms]
    log.info("%d head rows; mechanisms %s", len(heads), ", ".join(m.name for m in chosen))
    results, cross = crossmech.analyze_mechanisms(
        heads,
        chosen,
        context,
        thresholds=onset_thresholds(**sm.params.thresholds),
        tokens_per_step=int(sm.params.tokens_per_step),
        confidence=float(sm.params.confidence),
        n_permutations=int(sm.params.n_permutations),
        seed=int(sm.params.seed),
        relational=optional_table(sm, "relational"),
        configurational=optional_table(sm, "configurational"),
        alignment_cost=sm.params.alignment_cost,
        layers=layers,
    )
    circuits = read_circuits(sm.input.circuits) if "circuits" in sm.input.keys() else {}  # noqa: SIM118
    configurational = mechanism_configurational(sm, heads, results, circuits, log)
    cross["profile"] = crossmech.with_configurational_z(cross["profile"], configurational)
    scored = {n: r.tables["per_seed"] for n, r in results.items() if not r.note}
    link_rows = links.link_table(
        mechanisms.links(list(sm.params.mechanisms)), scored, circuits, float(sm.params.confidence)
    )
    log.info("%d link x run rows from %d circuit files", len(link_rows), len(circuits))
    tables = dict(cross)
    tables["links"] = link_rows
    tables["links_sizes"] = links.link_sizes(link_rows, float(sm.params.confidence))
    for name, result in results.items():
        for table, frame in result.tables.items():
            tables[f"{name}__{table}"] = frame
        tables[f"{name}__configurational"] = configurational.get(
            name, pd.DataFrame(columns=circuit_tables.CONFIGURATIONAL_COLUMNS)
        )
    write_declared_csvs(dict(sm.output.items()), tables, log)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
