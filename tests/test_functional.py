"""The functional axis: uniform baseline, per-run counts of 1-back heads, Wilson fractions."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from mechgen.axes import functional
from mechgen.tables import baselines


def synthetic_heads(seed: int = 0) -> pd.DataFrame:
    """Two sizes x three seeds x five steps of per-head one_back scores drawn around the
    threshold 0.25 (baseline 0.125 x 2), with one non-finite head and one flagged head."""
    rng = np.random.default_rng(seed)
    rows = []
    for size, n_layers, n_heads, n_params in [("small", 2, 3, 1_000), ("big", 3, 4, 9_000)]:
        for run_seed in (1, 2, 3):
            for step in (0, 1, 4, 16, 64):
                for layer in range(n_layers):
                    for head in range(n_heads):
                        rows.append(
                            {
                                "suite": "syn",
                                "model": f"syn-{size}",
                                "size": size,
                                "seed": run_seed,
                                "run": f"syn-{size}-seed{run_seed}",
                                "step": step,
                                "tokens_seen": step * 10,
                                "layer": layer,
                                "head": head,
                                "n_layers": n_layers,
                                "n_heads": n_heads,
                                "n_params": n_params,
                                # Rising with training so the first-hit step varies by run.
                                "one_back": rng.uniform(0.05, 0.2 + 0.05 * np.log2(step + 1)),
                                "nonfinite": False,
                            }
                        )
    heads = pd.DataFrame(rows)
    # A NaN score and a flagged head above the threshold: neither may count.
    heads.loc[0, "one_back"] = np.nan
    heads.loc[1, ["one_back", "nonfinite"]] = [0.99, True]
    return heads


def test_baseline_hand_worked() -> None:
    # L = 3: query positions 1 and 2 put 1/2 and 1/3 on the previous token.
    assert baselines.uniform_one_back_baseline([3]) == pytest.approx((1 / 2 + 1 / 3) / 2)
    # L = 2: one query position with weight 1/2; L = 1 and 0 have no query position.
    assert baselines.uniform_one_back_baseline([2, 1, 0]) == pytest.approx(0.5)
    # The mean over sentences is unweighted: (b(2) + b(4)) / 2 with b(4) = (1/2 + 1/3 + 1/4) / 3.
    b4 = Fraction(1, 2) + Fraction(1, 3) + Fraction(1, 4)
    expected = (Fraction(1, 2) + b4 / 3) / 2
    assert baselines.uniform_one_back_baseline([2, 4]) == pytest.approx(float(expected))


def test_baseline_matches_uniform_attention_matrix() -> None:
    # An independent route: build the uniform causal attention matrix and read its offset -1
    # diagonal, as the scorer does for one_back.
    lengths = [2, 5, 9, 17]
    per_sentence = []
    for length in lengths:
        attention = np.tril(np.ones((length, length)))
        attention /= attention.sum(axis=1, keepdims=True)
        per_sentence.append(np.diagonal(attention, offset=-1).mean())
    assert baselines.uniform_one_back_baseline(lengths) == pytest.approx(np.mean(per_sentence))


def test_baseline_rejects_no_usable_sentence() -> None:
    with pytest.raises(ValueError, match="2 or more tokens"):
        baselines.uniform_one_back_baseline([1, 1, 0])
    with pytest.raises(ValueError, match=">= 0"):
        baselines.uniform_one_back_baseline([-1, 4])


def test_token_file_baseline(tmp_path) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"run": "x", "token_ids": [[5, 6, 7], [1, 2]]}))
    assert baselines.token_file_baseline(path) == pytest.approx(((1 / 2 + 1 / 3) / 2 + 1 / 2) / 2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ids": []}))
    with pytest.raises(ValueError, match="token_ids"):
        baselines.token_file_baseline(bad)


def test_run_token_lengths_maps_each_run_to_its_file(tmp_path) -> None:
    # Two runs share a toy suite's file; a third has its own (an hf run's own tokenizer).
    shared, own = tmp_path / "suite.json", tmp_path / "c.json"
    shared.write_text(json.dumps({"token_ids": [[5, 6, 7], [1, 2]]}))
    own.write_text(json.dumps({"token_ids": [[1, 2, 3, 4]]}))
    lengths = baselines.run_token_lengths({"a": shared, "b": str(shared), "c": own})
    assert lengths == {"a": [3, 2], "b": [3, 2], "c": [4]}


def test_step0_median_baseline() -> None:
    heads = synthetic_heads()
    at_step0 = heads[(heads["step"] == 0) & ~heads["nonfinite"] & heads["one_back"].notna()]
    expected = float(np.median(at_step0["one_back"]))
    assert baselines.step0_median_baseline(heads) == pytest.approx(expected)
    with pytest.raises(ValueError, match="step-0"):
        baselines.step0_median_baseline(heads[heads["step"] > 0])


def test_counts_match_brute_force_loop() -> None:
    heads = synthetic_heads()
    baseline, multiple = 0.125, 2.0
    counts = functional.functional_counts(heads, baseline, multiple)
    expected: dict[tuple[str, int], int] = {}
    for row in heads.itertuples():
        key = (row.run, row.step)
        expected.setdefault(key, 0)
        if not row.nonfinite and np.isfinite(row.one_back) and row.one_back > multiple * baseline:
            expected[key] += 1
    got = {(r.run, r.step): r.n_functional for r in counts.itertuples()}
    assert got == expected
    assert counts["has_functional"].tolist() == [n > 0 for n in counts["n_functional"]]
    # The NaN head and the flagged head are not scored.
    first_run = counts[(counts["run"] == heads.loc[0, "run"]) & (counts["step"] == 0)].iloc[0]
    assert first_run["n_heads_scored"] == 2 * 3 - 2


def test_first_step_and_per_run_baseline_mapping() -> None:
    heads = synthetic_heads()
    runs = sorted(heads["run"].unique())
    # A per-run baseline: one run with a threshold nobody reaches.
    baselines = {run: 0.125 for run in runs}
    baselines[runs[0]] = 10.0
    counts = functional.functional_counts(heads, baselines, 2.0)
    per_run = functional.first_functional(counts).set_index("run")
    for run in runs:
        threshold = 2.0 * baselines[run]
        rows = heads[(heads["run"] == run) & ~heads["nonfinite"]]
        hit_steps = sorted(rows.loc[rows["one_back"] > threshold, "step"].unique())
        if hit_steps:
            assert per_run.loc[run, "first_step"] == hit_steps[0]
            assert per_run.loc[run, "first_tokens_seen"] == hit_steps[0] * 10
        else:
            assert np.isnan(per_run.loc[run, "first_step"])
        assert per_run.loc[run, "final_step"] == 64
    assert not per_run.loc[runs[0], "has_functional_final"]
    with pytest.raises(ValueError, match="no uniform baseline for runs"):
        functional.functional_counts(heads, {runs[0]: 0.1}, 2.0)


def test_fraction_by_size_wilson() -> None:
    per_run = pd.DataFrame(
        {
            "suite": "syn",
            "model": ["m"] * 4,
            "size": ["a"] * 4,
            "seed": [1, 2, 3, 4],
            "run": [f"m-seed{i}" for i in range(1, 5)],
            "n_params": 10,
            "n_layers": 2,
            "n_heads": 2,
            "baseline": 0.1,
            "threshold": 0.2,
            "multiple": 2.0,
            "final_step": 100,
            "has_functional_final": [True, True, True, False],
        }
    )
    table = functional.functional_fraction_by_size(per_run, confidence=0.95).iloc[0]
    assert table["n_runs"] == 4 and table["n_runs_functional"] == 3
    assert table["fraction_functional"] == pytest.approx(0.75)
    # Wilson score interval by its closed form, z = 1.959964 for 95%.
    z, n, p = 1.959963984540054, 4, 0.75
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert table["ci_low"] == pytest.approx(centre - half)
    assert table["ci_high"] == pytest.approx(centre + half)


def test_functional_tables_one_level_each() -> None:
    heads = synthetic_heads()
    tables = functional.functional_tables(heads, 0.125, "token_lengths", multiple=2.0)
    assert list(tables) == ["functional_run_step", "functional_run", "functional_size"]
    for name, table in tables.items():
        assert list(table.columns) == functional.FUNCTIONAL_COLUMNS[name]
        assert (table["baseline_source"] == "token_lengths").all()
    counts, runs, sizes = tables.values()
    assert len(counts) == heads.groupby(["run", "step"]).ngroups
    assert len(runs) == heads["run"].nunique()
    finals = runs.groupby("size")["has_functional_final"].mean()
    assert sizes.set_index("size")["fraction_functional"].to_dict() == pytest.approx(
        finals.to_dict()
    )
    # A table of one level has no column left empty for another level's rows.
    for name in ("functional_run_step", "functional_size"):
        assert tables[name].notna().all().all(), name


def test_missing_columns_named() -> None:
    heads = synthetic_heads().drop(columns=["tokens_seen"])
    with pytest.raises(ValueError, match="tokens_seen"):
        functional.functional_counts(heads, 0.125)
