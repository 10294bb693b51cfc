"""The relational axis for every declared link (mechgen.axes.links): the four relations of each link
read from the mechanisms' per-seed tables and a circuit file built by hand, NA where a relation
is not measured or a mechanism never formed; the declared links of the catalog; and the
mechanisms rule writes links.csv for the planted suite."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint

from mechgen import mechanisms
from mechgen.axes import links
from mechgen.mechanisms import Link
from mechgen.tables.circuit_files import CircuitResult


def per_seed(rows: list[tuple[str, int, int, float, bool]]) -> pd.DataFrame:
    """(run, final_layer, final_head, onset_step, formed); model m, one size."""
    return pd.DataFrame(
        [
            {
                "suite": "t",
                "model": "m",
                "size": "s",
                "seed": i,
                "run": run,
                "n_params": 100,
                "final_layer": layer,
                "final_head": head,
                "onset_step": onset,
                "formed": formed,
            }
            for i, (run, layer, head, onset, formed) in enumerate(rows)
        ]
    )


def circuit(
    kind: str, index: tuple, score: float, mean: float, sd: float, **record
) -> CircuitResult:
    shape = (3, 2, 3, 2)
    arrays = {"induction": np.zeros((3, 2))}
    for name, value in (("composition", score), ("baseline_mean", mean), ("baseline_sd", sd)):
        array = np.full(shape, np.nan)
        array[index] = value
        arrays[f"{kind.lower()}_{name}"] = array
    return CircuitResult(arrays=arrays, record=record)


def test_link_relations_by_hand() -> None:
    source = per_seed(
        [("r1", 0, 1, 10.0, True), ("r2", 2, 0, 10.0, True), ("r3", 0, 0, 50.0, True)]
    )
    target = per_seed(
        [("r1", 2, 1, 40.0, True), ("r2", 1, 1, 5.0, True), ("r3", 1, 0, 20.0, False)]
    )
    ablation = {"induction_drop": 0.3, "control_induction_drop": 0.1}
    circuits = {
        # r1: composition 0.5 against 0.2 +- 0.05 -> z = 6; two detail steps, the last counts.
        ("r1", 5): circuit("K", (2, 1, 0, 1), 0.9, 0.2, 0.05, ablation=ablation),
        ("r1", 9): circuit("K", (2, 1, 0, 1), 0.5, 0.2, 0.05, ablation=ablation),
        ("r2", 9): circuit("K", (1, 1, 2, 0), 0.5, 0.2, 0.05),
    }
    link = Link("previous_token", "induction", "K")
    table = links.link_table(
        [link], {"previous_token": source, "induction": target}, circuits, 0.95
    ).set_index("run")
    r1, r2, r3 = table.loc["r1"], table.loc["r2"], table.loc["r3"]
    assert r1["link"] == "previous_token->induction" and r1["detail_step"] == 9
    assert bool(r1["source_earlier_layer"]) is True
    assert r1["composition_z"] == pytest.approx((0.5 - 0.2) / 0.05)
    assert bool(r1["composition_above_null"]) is True  # 6 > norm.ppf(0.95)
    assert r1["drop_minus_control"] == pytest.approx(0.2) and bool(r1["drop_exceeds_control"])
    assert r1["ablation_status"] == "measured"  # from the `ablation` record of an older file
    assert r1["lag_steps"] == 30.0 and bool(r1["source_first"]) is True
    # r2: the source sits after the target: no composition to ask, the onset order fails.
    assert bool(r2["source_earlier_layer"]) is False
    assert pd.isna(r2["composition_above_null"])
    assert bool(r2["source_first"]) is False and pd.isna(r2["drop_exceeds_control"])
    # r3: the target never formed: every relation NA, the numbers still written.
    assert all(pd.isna(r3[c]) for c in links.RELATIONS)
    assert math.isnan(r3["composition_z"]) and r3["lag_steps"] == -30.0
    # A z just under the one-sided quantile does not hold.
    critical = norm.ppf(0.95)
    circuits[("r1", 9)] = circuit("K", (2, 1, 0, 1), 0.2 + 0.05 * (critical - 0.01), 0.2, 0.05)
    again = links.link_table([link], {"previous_token": source, "induction": target}, circuits)
    assert bool(again.set_index("run").loc["r1", "composition_above_null"]) is False


def test_a_link_without_ablation_or_its_composition_kind_records_na() -> None:
    source = per_seed([("r1", 0, 0, 10.0, True)])
    target = per_seed([("r1", 1, 0, 20.0, True)])
    circuits = {("r1", 3): circuit("K", (1, 0, 0, 0), 0.5, 0.2, 0.05)}
    row = links.link_table(
        [Link("duplicate_token", "locality", "V")],
        {"duplicate_token": source, "locality": target},
        circuits,
    ).iloc[0]
    assert row["composition"] == "V" and math.isnan(row["composition_z"])  # no v_composition
    assert pd.isna(row["composition_above_null"]) and pd.isna(row["drop_exceeds_control"])
    assert bool(row["source_earlier_layer"]) and bool(row["source_first"])
    # A link whose end is not in the suite is skipped.
    assert links.link_table([Link("successor", "induction")], {"induction": target}).empty


def test_every_link_reads_its_own_ablation_or_says_why_not() -> None:
    source = per_seed([("r1", 0, 0, 10.0, True), ("r2", 0, 0, 10.0, True)])
    target = per_seed([("r1", 1, 0, 20.0, True), ("r2", 1, 0, 20.0, True)])
    measured = {
        "status": "measured", "note": "", "source_layer": 0, "source_head": 0,
        "control_head": 1, "target_layer": 1, "target_head": 1,
        "before": 0.4, "after_source": 0.1, "after_control": 0.35, "drop": 0.3,
        "control_drop": 0.05,
    }  # fmt: skip
    circuits = {
        ("r1", 9): circuit(
            "K", (1, 0, 0, 0), 0.5, 0.2, 0.05,
            link_ablations={"previous_token->duplicate_token": measured},
            # the previous-token -> induction test of this file: not this link's
            ablation={"induction_drop": 0.0, "control_induction_drop": 0.2},
        ),
    }  # fmt: skip
    per = {"previous_token": source, "duplicate_token": target, "successor": target}
    table = links.link_table(
        [Link("previous_token", "duplicate_token"), Link("previous_token", "successor")],
        per,
        circuits,
    ).set_index(["link", "run"])
    row = table.loc[("previous_token->duplicate_token", "r1")]
    assert row["ablation_status"] == "measured" and row["ablation_note"] == ""
    assert (row["ablation_drop"], row["ablation_control_drop"]) == (0.3, 0.05)
    assert row["drop_minus_control"] == pytest.approx(0.25) and bool(row["drop_exceeds_control"])
    # r2 has no circuit file: not measured, and the reason.
    row = table.loc[("previous_token->duplicate_token", "r2")]
    assert row["ablation_status"] == "not measured" and "no detail step" in row["ablation_note"]
    assert pd.isna(row["drop_exceeds_control"])
    # Successor heads are scored from the weights alone: not applicable in every run.
    rows = table.loc["previous_token->successor"]
    assert (rows["ablation_status"] == "not applicable").all()
    assert rows["ablation_note"].str.contains("no ablation pass").all()
    assert rows["drop_exceeds_control"].isna().all()


def test_link_sizes_wilson() -> None:
    source = per_seed([(f"r{i}", 0, 0, 10.0, True) for i in range(5)])
    target = per_seed([(f"r{i}", 1 if i < 3 else 0, 0, 20.0, i < 4) for i in range(5)])
    table = links.link_table([Link("a", "b")], {"a": source, "b": target})
    sizes = links.link_sizes(table, 0.9).set_index(["size", "relation"])
    row = sizes.loc[("s", "source_earlier_layer")]
    assert (row["n_runs"], row["n_defined"], row["n_holds"]) == (5, 4, 3)
    low, high = proportion_confint(3, 4, alpha=0.1, method="wilson")
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
    assert sizes.loc[("all", "source_first"), "fraction"] == 1.0
    assert sizes.loc[("s", "drop_exceeds_control"), "n_defined"] == 0


def test_catalog_links_and_composition_kinds() -> None:
    declared = mechanisms.links()
    assert Link("previous_token", "induction", "K") in declared
    assert mechanisms.links(["previous_token", "successor"]) == []  # one end missing
    assert mechanisms.composition_kinds()[0] == "K"
    assert set(mechanisms.composition_kinds()) == {"K"} | {l.composition for l in declared}


def test_link_tables_are_documented() -> None:
    from test_outputs import assert_documented

    source = per_seed([("r1", 0, 0, 10.0, True)])
    table = links.link_table([Link("a", "b")], {"a": source, "b": source})
    assert list(table.columns) == links.LINK_COLUMNS
    assert_documented("stats/links.csv", table.columns)
    assert_documented("stats/links_sizes.csv", links.link_sizes(table).columns)
