"""The positional axis: strongest heads, layer agreement with its null, Hungarian head alignment."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from mechgen.axes import positional
from mechgen.axes.developmental import trajectories

STEPS = (0, 1, 2, 4, 8, 16, 32)


def synthetic_heads(
    n_layers: int = 4,
    n_heads: int = 4,
    seeds: tuple[int, ...] = (1, 2, 3, 4),
    strong_layer: dict[int, int] | None = None,
    permute_heads: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """One size, several seeds. Every head has its own trajectory shape (a ramp to a head-specific
    level, plus noise); each seed gets its heads in a random order within each layer, so the
    head index carries no identity. ``strong_layer[seed]`` (default: layer 2) holds the head
    that rises highest."""
    rng = np.random.default_rng(seed)
    strong_layer = strong_layer or {}
    ramp = np.log1p(np.array(STEPS)) / np.log1p(STEPS[-1])
    # Latent head identities shared by all seeds: level of each (layer, latent head).
    levels = rng.uniform(0.0, 0.3, size=(n_layers, n_heads))
    rows = []
    for run_seed in seeds:
        top = strong_layer.get(run_seed, 2)
        order = [
            rng.permutation(n_heads) if permute_heads else np.arange(n_heads)
            for _ in range(n_layers)
        ]
        for k, step in enumerate(STEPS):
            for layer in range(n_layers):
                for latent in range(n_heads):
                    level = 0.8 if (layer == top and latent == 0) else levels[layer, latent]
                    rows.append(
                        {
                            "suite": "syn",
                            "model": "syn-m",
                            "size": "m",
                            "seed": run_seed,
                            "run": f"syn-m-seed{run_seed}",
                            "step": step,
                            "tokens_seen": step * 8,
                            "layer": layer,
                            "head": int(order[layer][latent]),
                            "n_layers": n_layers,
                            "n_heads": n_heads,
                            "n_params": 1234,
                            "one_back": 0.1 + level * ramp[k] + 0.002 * rng.standard_normal(),
                            "nonfinite": False,
                        }
                    )
    return pd.DataFrame(rows)


def test_relative_depth() -> None:
    # 0-indexed layer 0 of 6 is the reference's Layer 1: 1/6; the last layer is 1.0.
    assert positional.relative_depth(0, 6) == pytest.approx(1 / 6)
    assert positional.relative_depth(5, 6) == pytest.approx(1.0)


def test_strongest_heads_brute_force() -> None:
    heads = synthetic_heads()
    heads.loc[heads.index[5], "one_back"] = 9.0  # a flagged outlier must be ignored
    heads.loc[heads.index[5], "nonfinite"] = True
    with pytest.warns(UserWarning, match="non-finite"):
        table = positional.strongest_heads(trajectories(heads, "one_back"))
    for row in table.itertuples():
        rows = heads[(heads["run"] == row.run) & (heads["step"] == row.step) & ~heads["nonfinite"]]
        best = max(rows.itertuples(), key=lambda r: r.one_back)
        assert (row.strongest_layer, row.strongest_head) == (best.layer, best.head)
        assert row.strongest_value == pytest.approx(best.one_back)
        assert row.rel_depth == pytest.approx((best.layer + 1) / 4)
    assert table.groupby("run")["is_final_step"].sum().eq(1).all()


def test_layer_agreement_hand_worked() -> None:
    rng = np.random.default_rng(0)
    # Layers [1, 1, 1, 3] of 4: modal share 3/4; entropy -(3/4 ln 3/4 + 1/4 ln 1/4);
    # pairwise |diff|: three pairs with 0, three with 2 -> mean 1.
    result = positional.layer_agreement([1, 1, 1, 3], 4, rng, n_permutations=999)
    assert result["modal_layer"] == 1
    assert result["modal_share"] == pytest.approx(0.75)
    assert result["entropy_nats"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert result["mean_abs_layer_diff"] == pytest.approx(1.0)
    # Two seeds in different layers: share 1/2, entropy ln 2, a tie goes to the lower layer.
    result = positional.layer_agreement([2, 0], 3, rng, n_permutations=99)
    assert (result["modal_layer"], result["modal_share"]) == (0, 0.5)
    assert result["entropy_nats"] == pytest.approx(math.log(2))
    assert result["mean_abs_layer_diff"] == pytest.approx(2.0)
    # One seed: no pair, no test.
    single = positional.layer_agreement([2], 3, rng, n_permutations=99)
    assert single["modal_share"] == 1.0 and np.isnan(single["p_value"])
    with pytest.raises(ValueError, match="0..2"):
        positional.layer_agreement([3], 3, rng)


def test_permutation_null() -> None:
    rng = np.random.default_rng(1)
    n_layers, n_seeds = 12, 9
    agree = positional.layer_agreement([5] * n_seeds, n_layers, rng, n_permutations=1999)
    # All seeds in one layer: the null gives that with probability 12 * 12^-9, so the Monte Carlo
    # p-value is its floor 1 / (1999 + 1).
    assert agree["p_value"] == pytest.approx(1 / 2000)
    # The null mean is E|U - V| for independent uniforms on 0..n-1 = (n^2 - 1) / (3n).
    assert agree["null_mean_abs_layer_diff"] == pytest.approx(
        (n_layers**2 - 1) / (3 * n_layers), rel=0.03
    )
    # Layers spread as far apart as possible are not evidence of agreement.
    spread = positional.layer_agreement([0, 11] * 4 + [0], n_layers, rng, n_permutations=1999)
    assert spread["p_value"] > 0.9


def test_mean_abs_pairwise_difference_vectorised() -> None:
    samples = np.array([[0, 1, 3], [2, 2, 2]])
    # pairs (0,1),(0,2),(1,2): |0-1|+|0-3|+|1-3| = 6 -> 2; all equal -> 0.
    assert positional.mean_abs_pairwise_difference(samples, axis=-1).tolist() == [2.0, 0.0]


def _brute_force_assignment(cost: np.ndarray) -> tuple[float, tuple[int, ...]]:
    best = min(
        itertools.permutations(range(len(cost))),
        key=lambda p: sum(cost[i, p[i]] for i in range(len(p))),
    )
    return float(sum(cost[i, best[i]] for i in range(len(best)))), best


@pytest.mark.parametrize("cost", ["euclidean", "correlation"])
def test_hungarian_matches_brute_force(cost: str) -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        profiles_a = rng.normal(size=(5, 6))
        profiles_b = rng.normal(size=(5, 6))
        matrix = positional.alignment_cost_matrix(profiles_a, profiles_b, cost)
        match = positional.align_profiles(profiles_a, profiles_b, cost)
        brute_cost, _ = _brute_force_assignment(matrix)
        assert sorted(match) == list(range(5))
        assert matrix[np.arange(5), match].sum() == pytest.approx(brute_cost)


def test_cost_matrix_against_direct_formulas() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
    euclid = positional.alignment_cost_matrix(a, b, "euclidean")
    corr = positional.alignment_cost_matrix(a, b, "correlation")
    for i in range(3):
        for j in range(4):
            assert euclid[i, j] == pytest.approx(np.linalg.norm(a[i] - b[j]))
            assert corr[i, j] == pytest.approx(1 - np.corrcoef(a[i], b[j])[0, 1])


def test_align_heads_recovers_a_permutation() -> None:
    heads = synthetic_heads(seeds=(1,), permute_heads=False)
    run_a = heads.copy()
    permutation = np.array([2, 0, 3, 1])  # head h of A is head permutation[h] of B
    run_b = heads.assign(run="syn-m-seed9", seed=9)
    run_b = run_b.assign(head=permutation[run_b["head"].to_numpy()])
    run_b = run_b.sample(frac=1.0, random_state=0)  # row order must not matter
    for layer in range(4):
        for cost in ("euclidean", "correlation"):
            mapping = positional.align_heads(run_a, run_b, layer, "one_back", cost=cost)
            assert mapping == {h: int(permutation[h]) for h in range(4)}


def test_align_heads_skips_nonfinite_steps() -> None:
    heads = synthetic_heads(seeds=(1, 2))
    run_a = heads[heads["run"] == "syn-m-seed1"].copy()
    run_b = heads[heads["run"] == "syn-m-seed2"].copy()
    clean = positional.align_heads(run_a, run_b, 1, "one_back")
    # A NaN at one step of one head drops that step for the whole layer, not the alignment.
    run_b.loc[(run_b["layer"] == 1) & (run_b["head"] == 0) & (run_b["step"] == 32), "one_back"] = (
        np.nan
    )
    assert positional.align_heads(run_a, run_b, 1, "one_back") == clean


def test_positional_table_agreement() -> None:
    # Seeds 1-3 put the strong head in layer 2, seed 4 in layer 0.
    heads = synthetic_heads(strong_layer={4: 0})
    traj = trajectories(heads, "one_back")
    tables = positional.positional_tables(heads, traj, n_permutations=499, seed=0)
    table = tables["positional_size_step"]
    final = table[table["is_final_step"]].iloc[0]
    assert final["n_seeds"] == 4
    assert final["modal_layer"] == 2 and final["modal_share"] == pytest.approx(0.75)
    # 6 pairs: 3 within layer 2 (same layer, matched heads), 3 with seed 4 (different layers).
    assert final["same_layer_fraction"] == pytest.approx(0.5)
    assert final["head_match_fraction"] == pytest.approx(0.5)
    assert final["head_match_chance"] == pytest.approx(0.5 / 4)
    # Reproducible with the same seed.
    again = positional.positional_tables(heads, traj, n_permutations=499, seed=0)
    for name, columns in positional.POSITIONAL_COLUMNS.items():
        pd.testing.assert_frame_equal(tables[name], again[name])
        assert list(tables[name].columns) == columns
    assert len(tables["positional_run_step"]) == len(traj)
