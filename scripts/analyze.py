"""Snakemake script of rule `analyze`: every statistics table of a suite.

Inputs: ``heads`` (heads.parquet), ``trajectories`` (trajectories.parquet, rule
`trajectories`: the max over heads of ``analysis.metric``, which every analysis here uses) and
``tokens`` (the eval token files ``results/<suite>/eval/tokens/<key>.json``, one per tokenizer;
none for a suite imported from published tables).
Params: ``token_files`` ({run: its eval token file}), ``thresholds`` {start, stop, step}, ``functional_multiple``,
``bootstrap`` {n_resamples, seed, confidence, method}, ``tokens_per_step``, ``positional``
{n_permutations, alignment_cost ('euclidean' or 'correlation')}: the config's ``analysis``
keys, every one present after validation (defaults: workflow/schemas/config.schema.yaml).
Outputs (``results/<suite>/stats/<name>.csv``, columns in docs/outputs.md): ``per_seed``,
``per_model``, ``regressions``, ``convergence``, ``mds`` (:func:`mechgen.stats.analysis.analyze`),
``functional_run_step``, ``functional_run``, ``functional_size``
(:func:`mechgen.axes.functional.functional_tables`), ``positional_run_step`` and
``positional_size_step`` (:func:`mechgen.axes.positional.positional_tables`). Every output the rule
declares must be one of these tables.
"""

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd
from _common import setup_logging

from mechgen.axes import functional, positional
from mechgen.axes.developmental import onset_thresholds
from mechgen.stats import analysis as stats
from mechgen.tables import baselines
from mechgen.tables.outputs import write_declared_csvs


def uniform_baseline(
    heads: pd.DataFrame, token_files: dict[str, str]
) -> tuple[float | dict[str, float], str]:
    """The uniform one_back baseline per run from its eval token file (``{run: path}``), or,
    without token files, the step-0 median head of the table; and which of the two it is."""
    if token_files:
        lengths = baselines.run_token_lengths(token_files)
        return {
            run: baselines.uniform_one_back_baseline(run_lengths)
            for run, run_lengths in lengths.items()
        }, "token_lengths"
    return baselines.step0_median_baseline(heads), "step0_median"


def main(sm: Any) -> None:
    """Run the analyses and write every output of the rule (``sm`` is Snakemake's object)."""
    log = setup_logging(sm)
    heads = pd.read_parquet(sm.input.heads)
    traj = pd.read_parquet(sm.input.trajectories)
    bootstrap_cfg = dict(sm.params.bootstrap)
    log.info(
        "%d head rows, %d runs, %d checkpoints; metric %s",
        len(heads),
        heads["run"].nunique() if "run" in heads else 0,
        heads["step"].nunique() if "step" in heads else 0,
        ", ".join(map(str, traj["metric"].unique())) if "metric" in traj else "?",
    )
    try:
        results = stats.analyze(
            heads,
            traj,
            thresholds=onset_thresholds(**sm.params.thresholds),
            tokens_per_step=int(sm.params.tokens_per_step),
            bootstrap_cfg=bootstrap_cfg,
        )
        baseline, baseline_source = uniform_baseline(heads, dict(sm.params.token_files))
        # The 1-back criterion is defined on one_back whatever metric the other axes analyse.
        results.update(
            functional.functional_tables(
                heads,
                baseline,
                baseline_source,
                multiple=float(sm.params.functional_multiple),
                confidence=float(bootstrap_cfg["confidence"]),
            )
        )
        positional_cfg = dict(sm.params.positional)
        results.update(
            positional.positional_tables(
                heads,
                traj,
                n_permutations=int(positional_cfg["n_permutations"]),
                seed=int(bootstrap_cfg["seed"]),
                cost=positional_cfg["alignment_cost"],
            )
        )
    except ValueError as exc:
        # Bad input (missing columns, a single checkpoint, ...): the message names the problem.
        log.error("cannot analyse %s: %s", sm.input.heads, exc)
        raise
    if heads["seed"].nunique() < 2:
        log.warning(
            "a single seed: the mixed models with a seed intercept are skipped (see regressions.csv)"
        )
    write_declared_csvs(dict(sm.output.items()), results, log)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
