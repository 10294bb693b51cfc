"""Tests of mechgen.tables.heads (reading/validating per-head tables) and mechgen.axes.developmental.

Every expected value comes from an independent computation: a brute-force loop over the rows,
a hand-worked example, numpy's polyfit, or a curve with a known midpoint.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mechgen.axes import developmental as dev
from mechgen.schema import ID_COLUMNS, TRAJECTORY_COLUMNS
from mechgen.tables.heads import TROTT2025_COLUMNS, read_trott2025, validate_heads

TOKENS_PER_STEP = 2048
STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]


def make_heads(
    models: dict[str, tuple[int, int, int]] | None = None,
    seeds: tuple[int, ...] = (1, 2, 3),
    steps: list[int] = STEPS,
    seed: int = 0,
) -> pd.DataFrame:
    """A random per-head table: model -> (n_layers, n_heads, n_params); uniform one_back."""
    models = models or {"toy-tiny": (2, 3, 1_000_000), "toy-small": (3, 4, 4_000_000)}
    rng = np.random.default_rng(seed)
    rows = []
    for model, (n_layers, n_heads, n_params) in models.items():
        for s in seeds:
            for step in steps:
                for layer in range(n_layers):
                    for head in range(n_heads):
                        rows.append(
                            {
                                "suite": "toy",
                                "model": model,
                                "size": model.removeprefix("toy-"),
                                "seed": s,
                                "run": f"{model}-seed{s}",
                                "step": step,
                                "tokens_seen": step * TOKENS_PER_STEP,
                                "layer": layer,
                                "head": head,
                                "n_layers": n_layers,
                                "n_heads": n_heads,
                                "n_params": n_params,
                                "one_back": float(rng.uniform()),
                                "nonfinite": False,
                            }
                        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- tables.read_trott2025


def _trott_row(
    step_modded: int, layer: int, head: int, seed: int, one_back: float, model: str = "pythia-14m"
) -> dict:
    return {
        "mpath": f"EleutherAI/{model}",
        "step_modded": step_modded,
        "revision": f"step{step_modded - 1}",
        "Layer": layer,
        "Head": head,
        "seed": seed,
        "seed_name": f"seed{seed}",
        "n_params": 14067712,
        "n_layers": 2,
        "mean_prev_self_ratio": 0.5,
        "mean_prev_all_ratio": 3.0,
        "prev_fraction": 0.01,
        "mean_1back": one_back,
        "mean_first": 0.2,
    }


def test_read_trott2025_converts_indices_steps_and_names(tmp_path: Path) -> None:
    rows = [
        _trott_row(1001, layer, head, 3, 0.1 * layer + 0.01 * head)
        for layer in (1, 2)
        for head in (1, 2, 3)
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    heads = read_trott2025(tmp_path, suite="ref", tokens_per_step=10)
    assert len(heads) == 6
    assert set(ID_COLUMNS) <= set(heads.columns)
    first = heads.iloc[0]
    assert (first["model"], first["size"], first["run"], first["suite"]) == (
        "pythia-14m",
        "14m",
        "pythia-14m-seed3",
        "ref",
    )
    assert first["step"] == 1000 and first["tokens_seen"] == 10_000
    assert sorted(heads["layer"].unique()) == [0, 1] and sorted(heads["head"].unique()) == [0, 1, 2]
    assert (heads["n_heads"] == 3).all()
    # Layer 2, Head 3 (1-indexed) -> layer 1, head 2 with one_back 0.1*2 + 0.01*3.
    row = heads[(heads["layer"] == 1) & (heads["head"] == 2)].iloc[0]
    assert row["one_back"] == pytest.approx(0.23)
    assert row["prev_self_ratio"] == 0.5 and row["prev_uniform_ratio"] == 3.0
    assert row["first_token_ref"] == 0.2 and row["prev_fraction"] == 0.01
    assert not heads["nonfinite"].any()


def test_read_trott2025_names_file_and_missing_columns(tmp_path: Path) -> None:
    table = pd.DataFrame([_trott_row(1, 1, 1, 1, 0.1)]).drop(columns=["mean_1back", "n_layers"])
    table.to_csv(tmp_path / "broken_table.csv", index=False)
    with pytest.raises(
        ValueError, match=r"broken_table\.csv.*missing column\(s\): n_layers, mean_1back"
    ):
        read_trott2025(tmp_path)


def test_read_trott2025_rejects_duplicates_and_bad_revision(tmp_path: Path) -> None:
    pd.DataFrame([_trott_row(1, 1, 1, 1, 0.1)]).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame([_trott_row(1, 1, 1, 1, 0.2)]).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(ValueError, match="duplicate head rows"):
        read_trott2025(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    row = _trott_row(5, 1, 1, 1, 0.1)
    row["revision"] = "step5"
    pd.DataFrame([row]).to_csv(bad / "c.csv", index=False)
    with pytest.raises(ValueError, match=r"c\.csv: revision 'step5' does not match step_modded 5"):
        read_trott2025(bad)


def test_trott2025_columns_are_those_of_the_published_tables() -> None:
    subset = Path(__file__).parent / "data" / "trott2025"
    header = (subset / "trajectory_max_heads.csv").read_text().splitlines()[0].split(",")
    assert header == TROTT2025_COLUMNS


# ---------------------------------------------------------------- tables.validate_heads


def test_validate_heads_names_missing_columns() -> None:
    heads = make_heads().drop(columns=["n_params", "layer"])
    with pytest.raises(ValueError, match="missing column.*layer.*n_params"):
        validate_heads(heads, "one_back")
    with pytest.raises(
        ValueError, match="missing column.*entropy.*metric columns present: one_back"
    ):
        validate_heads(make_heads(), "entropy")


def test_validate_heads_single_checkpoint_run() -> None:
    heads = make_heads(steps=[0, 10])
    heads = heads[~((heads["run"] == "toy-tiny-seed2") & (heads["step"] == 10))]
    validate_heads(heads, "one_back")  # one checkpoint is fine for a trajectory
    with pytest.raises(ValueError, match=r"'toy-tiny-seed2' \(a single checkpoint: step 0\)"):
        validate_heads(heads, "one_back", min_checkpoints=2)
    with pytest.raises(ValueError, match="single checkpoint"):
        dev.per_seed_summary(heads, tokens_per_step=TOKENS_PER_STEP)


def test_validate_heads_duplicates_and_inconsistent_runs() -> None:
    heads = make_heads()
    with pytest.raises(ValueError, match="duplicate"):
        validate_heads(pd.concat([heads, heads.iloc[:1]]), "one_back")
    changed = heads.copy()
    changed.loc[changed.index[0], "n_params"] = 5
    with pytest.raises(ValueError, match="more than one value of n_params"):
        validate_heads(changed, "one_back")


# ---------------------------------------------------------------- trajectories


def test_trajectory_is_max_over_heads_brute_force() -> None:
    heads = make_heads()
    traj = dev.trajectories(heads)
    assert list(traj.columns) == TRAJECTORY_COLUMNS
    assert len(traj) == heads.groupby(["run", "step"]).ngroups
    for row in traj.itertuples():
        best_value, best_layer, best_head = -math.inf, None, None
        for h in heads[(heads["run"] == row.run) & (heads["step"] == row.step)].itertuples():
            if h.one_back > best_value:
                best_value, best_layer, best_head = h.one_back, h.layer, h.head
        assert (row.value, row.argmax_layer, row.argmax_head) == (best_value, best_layer, best_head)
        assert row.metric == "one_back" and row.tokens_seen == row.step * TOKENS_PER_STEP


def test_trajectory_ties_go_to_the_lowest_layer_then_head() -> None:
    heads = make_heads()
    at = (heads["run"] == "toy-small-seed2") & (heads["step"] == 32)
    heads.loc[at & (heads["layer"] == 2) & (heads["head"] == 1), "one_back"] = 2.0
    heads.loc[at & (heads["layer"] == 1) & (heads["head"] == 3), "one_back"] = 2.0
    heads.loc[at & (heads["layer"] == 1) & (heads["head"] == 2), "one_back"] = 2.0
    traj = dev.trajectories(heads.sample(frac=1.0, random_state=0))  # row order must not matter
    row = traj[(traj["run"] == "toy-small-seed2") & (traj["step"] == 32)].iloc[0]
    assert (row["value"], row["argmax_layer"], row["argmax_head"]) == (2.0, 1, 2)


def test_trajectory_excludes_nonfinite_heads_with_warning() -> None:
    heads = make_heads()
    target = heads.index[(heads["run"] == "toy-small-seed1") & (heads["step"] == 64)][0]
    heads.loc[target, "one_back"] = 5.0  # would be the max if it were averaged in
    heads.loc[target, "nonfinite"] = True
    nan_row = heads.index[(heads["run"] == "toy-tiny-seed3") & (heads["step"] == 8)][0]
    heads.loc[nan_row, "one_back"] = np.nan
    with pytest.warns(UserWarning, match="2 head row.*non-finite.*toy-small-seed1, toy-tiny-seed3"):
        traj = dev.trajectories(heads)
    assert traj["value"].max() < 1.0
    clean = heads.drop(index=[target, nan_row])
    pd.testing.assert_frame_equal(traj, dev.trajectories(clean))


# ---------------------------------------------------------------- slope and onsets


def test_slope_equals_polyfit_on_log_steps() -> None:
    rng = np.random.default_rng(1)
    steps = np.array(STEPS)
    values = rng.uniform(size=len(steps))
    expected = np.polyfit(np.log10(steps + 1.0), values, 1)[0]
    assert dev.trajectory_slope(steps, values) == pytest.approx(expected, rel=1e-12)


def test_threshold_onset_hand_worked() -> None:
    # x = log10(step + 1): steps 0, 9, 99, 999 give x = 0, 1, 2, 3 (one decade apart).
    steps = np.array([0, 9, 99, 999])
    values = np.array([0.10, 0.15, 0.40, 0.45])
    # d = 0.05 (at step 9), 0.25 (at 99), 0.05 (at 999).
    # thresholds 0.01..0.04 -> step 9; 0.05..0.24 -> step 99 (0.05 > 0.05 is false); 0.25..0.30 -> none.
    onset, crossed = dev.threshold_onset(steps, values, dev.onset_thresholds(0.01, 0.30, 0.01))
    assert crossed == 24
    assert onset == pytest.approx((4 * 9 + 20 * 99) / 24)
    # Unsorted input gives the same answer; no threshold crossed gives NaN.
    order = [2, 0, 3, 1]
    assert dev.threshold_onset(steps[order], values[order])[0] == pytest.approx(onset)
    flat_onset, flat_crossed = dev.threshold_onset(steps, np.full(4, 0.3))
    assert math.isnan(flat_onset) and flat_crossed == 0


def test_onset_thresholds_match_study_grid() -> None:
    grid = dev.onset_thresholds(0.01, 0.30, 0.01)
    assert len(grid) == 30 and grid[0] == 0.01 and grid[-1] == 0.30
    assert np.allclose(np.diff(grid), 0.01)
    with pytest.raises(ValueError):
        dev.onset_thresholds(0.01, 0.30, 0.0)


def test_logistic_onset_recovers_off_grid_midpoint() -> None:
    steps = np.array(STEPS + [2000, 5000, 10_000])
    true_midpoint = 2.3  # log10(step + 1) = 2.3 -> step 198.5, between checkpoints 128 and 256
    x = np.log10(steps + 1.0)
    values = 0.1 + 0.6 / (1 + np.exp(-4.0 * (x - true_midpoint)))
    fit = dev.logistic_onset(steps, values)
    assert fit.note == ""
    assert fit.midpoint_log10 == pytest.approx(true_midpoint, abs=1e-6)
    assert fit.step == pytest.approx(10**true_midpoint - 1, rel=1e-5)
    assert fit.steepness == pytest.approx(4.0, rel=1e-5)
    # The threshold onset can only return averages of checkpoint steps; the logistic is not tied to them.
    assert fit.step not in set(steps)


def test_logistic_onset_failures_are_nan_with_reason() -> None:
    steps = np.array(STEPS)
    flat = dev.logistic_onset(steps, np.full(len(steps), 0.2))
    assert math.isnan(flat.step) and "flat" in flat.note
    few = dev.logistic_onset(steps[:4], np.array([0.1, 0.2, 0.3, 0.4]))
    assert math.isnan(few.step) and "needs >= 5" in few.note
    # A logistic whose midpoint lies beyond the last checkpoint: the fitted midpoint is pinned to
    # the edge of the window, which is reported as NaN, not as an onset at the last checkpoint.
    x = np.log10(steps + 1.0)
    rising = dev.logistic_onset(steps, 0.1 + 0.6 / (1 + np.exp(-3.0 * (x - 4.5))))
    assert math.isnan(rising.step) and "edge" in rising.note


# ---------------------------------------------------------------- per-seed summary


def test_per_seed_summary_against_direct_computation() -> None:
    heads = make_heads()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no spurious warnings on clean input
        summary = dev.per_seed_summary(
            heads, thresholds=dev.DEFAULT_THRESHOLDS, tokens_per_step=TOKENS_PER_STEP
        )
    assert list(summary.columns) == dev.PER_SEED_COLUMNS
    assert len(summary) == heads["run"].nunique()
    for row in summary.itertuples():
        run_heads = heads[heads["run"] == row.run]
        maxima = run_heads.groupby("step")["one_back"].max()
        assert row.peak == maxima.max() and row.peak_step == maxima.idxmax()
        assert row.peak_tokens == row.peak_step * TOKENS_PER_STEP
        assert row.slope == pytest.approx(
            np.polyfit(np.log10(maxima.index + 1.0), maxima.to_numpy(), 1)[0]
        )
        if not math.isnan(row.onset_step):
            assert row.onset_tokens == pytest.approx(row.onset_step * TOKENS_PER_STEP)
        final = run_heads[run_heads["step"] == run_heads["step"].max()]
        best = final.loc[final["one_back"].idxmax()]
        assert (row.final_layer, row.final_head) == (best["layer"], best["head"])
        assert row.final_relative_depth == pytest.approx((best["layer"] + 1) / best["n_layers"])
    # tokens_per_step inferred from tokens_seen / step when not given.
    inferred = dev.per_seed_summary(heads)
    pd.testing.assert_frame_equal(summary, inferred)
