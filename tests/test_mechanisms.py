"""Tests of the mechanism catalog's definitions (mechgen.mechanisms)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mechgen import mechanisms
from mechgen.mechanisms import Link, Mechanism, NullContext


def _zero_null(table: pd.DataFrame, context: NullContext) -> pd.Series:
    return pd.Series(0.0, index=sorted(table["run"].unique()))


def test_catalog_finds_the_modules_in_order() -> None:
    catalog = mechanisms.catalog()
    assert list(catalog)[:2] == ["previous_token", "induction"]
    assert all(isinstance(m, Mechanism) and m.name == name for name, m in catalog.items())
    with pytest.raises(KeyError, match="allowed: previous_token, induction"):
        mechanisms.get("two_bak")
    # Every declared link joins two mechanisms of the catalog.
    for mechanism in catalog.values():
        for link in mechanism.links:
            assert link.source in catalog and link.target in catalog


def test_normalised_scale_and_criterion_hand_worked() -> None:
    m = Mechanism(
        name="m", version=1, unit="head", score_column="s", description="", units="p",
        null=_zero_null, ceiling=1.0, criterion_multiple=2.0,
        control_column="c", control_max_fraction=0.5,
    )
    # null 0.2: a score of 0.6 is half-way from the null to the ceiling.
    np.testing.assert_allclose(m.normalised([0.2, 0.6, 1.0, 0.1], 0.2), [0.0, 0.5, 1.0, -0.125])
    assert np.isnan(m.normalised(0.5, 1.0))
    meets = m.meets_criterion([0.5, 0.5, 0.39, np.nan], 0.2, control=[0.2, 0.25, 0.0, 0.0])
    assert meets.tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="needs c"):
        m.meets_criterion([0.5], 0.2)
    with pytest.raises(ValueError, match="go together"):
        Mechanism(name="x", version=1, unit="head", score_column="s", description="",
                  units="p", null=_zero_null, control_column="c")
    with pytest.raises(ValueError, match="ablation_pass must be one of repeated_sequences"):
        Mechanism(name="x", version=1, unit="head", score_column="s", description="",
                  units="p", null=_zero_null, ablation_pass="weights")
    # Which targets a link's mean-ablation test can re-measure: declared by the mechanism.
    passes = {name: m.ablation_pass for name, m in mechanisms.catalog().items()}
    assert passes["induction"] == passes["duplicate_token"] == "repeated_sequences"
    assert passes["successor"] is passes["copy_suppression"] is None


def test_previous_token_null_is_uniform_attention_per_run() -> None:
    table = pd.DataFrame({"run": ["a", "a", "b"], "step": [0, 0, 0], "one_back": [0.3, 0.2, 0.1],
                          "layer": [0, 0, 0], "head": [0, 1, 0]})
    null = mechanisms.get("previous_token").null(
        table, NullContext(eval_lengths={"a": [2, 3], "b": [4]})
    )
    # By hand: L=2 -> 1/2; L=3 -> (1/2 + 1/3)/2 = 5/12; a = (1/2 + 5/12)/2; b = (1/2+1/3+1/4)/3.
    assert null["a"] == pytest.approx((1 / 2 + 5 / 12) / 2)
    assert null["b"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)


def test_induction_null_at_the_scored_positions() -> None:
    table = pd.DataFrame({"run": ["a"], "induction": [0.5]})
    null = mechanisms.get("induction").null(table, NullContext(settings={"half_length": 3}))
    assert null["a"] == pytest.approx((1 / 4 + 1 / 5 + 1 / 6) / 3)  # positions 3, 4, 5
    with pytest.raises(KeyError, match="half_length"):
        mechanisms.get("induction").null(table, NullContext())
    assert Link("previous_token", "induction") in mechanisms.get("previous_token").links


def test_the_catalog_has_one_layer_unit_mechanism_with_a_chance_null() -> None:
    # in_context_retrieval is scored per layer (layers.parquet); every other mechanism per head.
    units = {name: m.unit for name, m in mechanisms.catalog().items()}
    assert [name for name, unit in units.items() if unit == "layer"] == ["in_context_retrieval"]
    retrieval = mechanisms.get("in_context_retrieval")
    table = pd.DataFrame({"run": ["b", "a", "b"], "in_context_retrieval": [0.1, 0.2, 0.3]})
    null = retrieval.null(table, NullContext(settings={"half_length": 8}))
    assert null.to_dict() == {"a": 1 / 8, "b": 1 / 8}  # chance among the L = 8 candidates
    with pytest.raises(KeyError, match="half_length"):
        retrieval.null(table, NullContext())
    assert list(retrieval.meets_criterion([0.25, 0.24], [1 / 8, 1 / 8])) == [True, False]
    assert retrieval.normalised(1.0, 1 / 8) == pytest.approx(1.0)
