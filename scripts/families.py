"""Snakemake script of rule `families`: a combined study's comparison across model families.

Params: ``study`` (its name), ``members`` (per member suite: ``suite``, ``family``,
``tokens_per_step``, ``stats_dir``, ``relational``), ``mechanisms`` (those every member
analyses), ``bootstrap`` (``analysis.bootstrap``), ``n_permutations``
(``analysis.positional.n_permutations``). Inputs: the members' tables
(:func:`mechgen.stats.families.member_files`). Outputs: ``families`` (stats/families.csv),
``models`` (stats/families_models.csv), ``profiles`` (stats/families_profile.csv),
``trajectories`` and ``heatmap`` (figures), ``summary`` (summary.rst, the report's opening).
"""

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import setup_logging

from mechgen.atomic import atomic_path
from mechgen.figures import family_figures
from mechgen.stats import families
from mechgen.tables.outputs import write_csv


def main(sm: Any) -> None:
    """Compute and write every output of the rule (``sm`` is Snakemake's object)."""
    log = setup_logging(sm)
    members = [
        families.Member(m["suite"], m["family"], int(m["tokens_per_step"]), Path(m["stats_dir"]))
        for m in sm.params.members
    ]
    relational = {m["suite"]: bool(m["relational"]) for m in sm.params.members}
    tables, out = families.analyze_study(
        members,
        list(sm.params.mechanisms),
        relational,
        dict(sm.params.bootstrap),
        int(sm.params.n_permutations),
    )
    write_csv(out["families"], sm.output.families)
    write_csv(out["models"], sm.output.models)
    write_csv(out["profiles"], sm.output.profiles)
    family_figures.plot_family_trajectories(
        tables.trajectories, tables.families, sm.output.trajectories
    )
    family_figures.plot_family_profiles(out["profiles"], tables.families, sm.output.heatmap)
    with atomic_path(sm.output.summary) as tmp:
        Path(tmp).write_text(
            families.summary_rst(sm.params.study, members, out["families"], out["models"])
        )
    log.info(
        "study %s: %d families.csv rows, %d model rows",
        sm.params.study,
        len(out["families"]),
        len(out["models"]),
    )


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
