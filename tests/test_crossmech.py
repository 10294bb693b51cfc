"""Cross-mechanism analyses (mechgen.stats.crossmech): hand-worked Kendall's W, P(A before B) with its
Wilson interval, distinct orderings with a never-formed run, the stratified permutation null,
head sharing, the normalised onset, and the profile of a synthetic suite whose order is planted;
and the rule's scripts run on synthetic inputs."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from crossmech_data import EVAL_LENGTHS, HALF_LENGTH, planted_heads
from scipy import stats as scipy_stats
from snakemake.iocontainers import Namedlist

from mechgen import mechanisms
from mechgen.axes.developmental import DEFAULT_THRESHOLDS, threshold_onset
from mechgen.mechanisms import Mechanism, NullContext
from mechgen.stats import crossmech

REPO = Path(__file__).resolve().parent.parent
NEVER = "syn-big-seed3"


def context_for(heads: pd.DataFrame, lengths=EVAL_LENGTHS) -> NullContext:
    return NullContext(
        eval_lengths={run: lengths for run in heads["run"].unique()},
        settings={"half_length": HALF_LENGTH},
    )


@pytest.fixture(scope="module")
def planted():
    heads = planted_heads(never=(NEVER,))
    results, cross = crossmech.analyze_mechanisms(
        heads,
        # The two planted mechanisms (the catalog grows; these tests fix what they plant).
        [mechanisms.get("previous_token"), mechanisms.get("induction")],
        context_for(heads),
        tokens_per_step=8,
        n_permutations=199,
    )
    return heads, results, cross


def test_kendalls_w_hand_worked() -> None:
    # 3 raters x 3 objects. Rank sums 4, 6, 8 around m (n + 1) / 2 = 6: S = 4 + 0 + 4 = 8;
    # W = 12 S / (m^2 (n^3 - n)) = 96 / (9 x 24) = 4/9.
    ranks = np.array([[1, 2, 3], [1, 3, 2], [2, 1, 3]])
    assert crossmech.kendalls_w(ranks) == pytest.approx(4 / 9)
    # Ties: rater 1 ties objects 1 and 2. Rank sums 2.5, 3.5, 6 around 4: S = 6.5;
    # T_1 = 2^3 - 2 = 6; W = 12 x 6.5 / (4 x 24 - 2 x 6) = 78 / 84.
    tied = np.array([[1.5, 1.5, 3], [1, 2, 3]])
    assert crossmech.kendalls_w(tied) == pytest.approx(78 / 84)
    # Independently: W = Friedman chi2 / (m (n - 1)), scipy's tie-corrected Friedman statistic.
    rng = np.random.default_rng(1)
    onsets = rng.integers(0, 4, size=(6, 4)).astype(float)  # 6 seeds x 4 mechanisms, with ties
    ranks = scipy_stats.rankdata(onsets, axis=1)
    chi2 = scipy_stats.friedmanchisquare(*onsets.T).statistic
    assert crossmech.kendalls_w(ranks) == pytest.approx(chi2 / (6 * 3))
    assert crossmech.kendalls_w(np.array([[1, 2, 3], [1, 2, 3]])) == pytest.approx(1.0)
    assert math.isnan(crossmech.kendalls_w(np.array([[1, 2]])))  # a single rater


def _per_seed(rows: list[tuple[str, str, int, float, bool]]) -> pd.DataFrame:
    """A per_seed table: (run, model, seed, onset_step, formed); one size per model."""
    return pd.DataFrame(
        [
            {
                "run": r,
                "model": m,
                "size": m,
                "seed": s,
                "n_params": 1000 if m == "a" else 10_000,
                "onset_step": o,
                "formed": f,
                "final_layer": 0,
            }
            for r, m, s, o, f in rows
        ]
    )


def _qualifying(runs: dict[str, set[tuple[int, int]] | None]) -> pd.DataFrame:
    """A strongest_qualifying table: the head set, the best head its first (sorted) element."""
    return pd.DataFrame.from_dict(
        {r: {"heads": frozenset(h or ()), "best": min(h) if h else None} for r, h in runs.items()},
        orient="index",
    )


def test_before_probability_wilson_and_distinct_orderings() -> None:
    # Size "a", 5 seeds: x before y in runs 1, 2, 3; y before x in run 4; y never forms in run 5.
    runs = ["r1", "r2", "r3", "r4", "r5"]
    x = _per_seed(
        [(r, "a", i + 1, o, True) for i, (r, o) in enumerate(zip(runs, [10, 20, 30, 50, 10]))]
    )
    y = _per_seed(
        [
            (r, "a", i + 1, o, f)
            for i, (r, o, f) in enumerate(zip(runs, [40, 30, 90, 20, np.nan], [True] * 4 + [False]))
        ]
    )
    heads = {r: {(0, 0)} for r in runs}
    table = crossmech.order_table(
        {"x": x, "y": y},
        {"x": _qualifying(heads), "y": _qualifying(heads)},
        0.95,
        np.random.default_rng(0),
        9,
    )
    before = table[(table["analysis"] == "before") & (table["mechanism_a"] == "x")].iloc[0]
    assert (before["count"], before["n"]) == (3, 4)  # the never-formed run is not "late"
    assert before["estimate"] == pytest.approx(0.75)
    assert "only_a=1" in before["detail"]
    # Wilson by hand: centre (p + z^2/2n) / (1 + z^2/n), half-width z/(1 + z^2/n) sqrt(p(1-p)/n
    # + z^2/4n^2).
    z, p, n = scipy_stats.norm.ppf(0.975), 0.75, 4
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert before["ci_low"] == pytest.approx(centre - half)
    assert before["ci_high"] == pytest.approx(centre + half)
    orderings = table[table["analysis"] == "ordering"].set_index("run")["detail"]
    assert orderings["r1"] == "x < y" and orderings["r4"] == "y < x"
    assert orderings["r5"] == "x | never: y"
    distinct = table[table["analysis"] == "distinct_orderings"].iloc[0]
    assert (distinct["count"], distinct["n"]) == (3, 5)  # "x < y", "y < x", "x | never: y"
    w = table[table["analysis"] == "kendall_w"].iloc[0]
    # Over the 4 runs where both formed: rank rows (1,2) x3 and (2,1): R = (5, 7), S = 2,
    # W = 12 x 2 / (16 x 6) = 0.25; the never-formed run is left out and counted.
    assert w["estimate"] == pytest.approx(0.25) and (w["n"], w["count"]) == (4, 1)
    assert crossmech.ordering({"a": 1.0, "b": 1.0, "c": np.nan}) == "a = b | never: c"
    assert crossmech.ordering({"a": np.nan}) == "| never: a"


def test_seed_speed_permutation_null_is_stratified_by_size() -> None:
    # 2 sizes x 3 seeds; both mechanisms order the seeds identically within each size, on
    # different scales per size. rho = 1; the null permutes each mechanism's ranks within a size
    # independently: P(rho = 1) = (1/3!)^2 = 1/36 (both sizes must align).
    rows_x, rows_y = [], []
    for model, scale in (("a", 1), ("b", 100)):
        for seed, onset in zip((1, 2, 3), (3.0, 1.0, 2.0)):
            rows_x.append((f"{model}{seed}", model, seed, scale * onset, True))
            rows_y.append((f"{model}{seed}", model, seed, scale * (onset + 5), True))
    matrix = crossmech.onset_matrix({"x": _per_seed(rows_x), "y": _per_seed(rows_y)})
    rho, p, n = crossmech.seed_speed(matrix, np.random.default_rng(0), 20_000)
    assert rho == pytest.approx(1.0) and n == 6
    assert p == pytest.approx(1 / 36, abs=0.004)
    # A single size of 3: P = 1/6.
    _, p_one, _ = crossmech.seed_speed(
        matrix.xs("a", level="model", drop_level=False), np.random.default_rng(1), 20_000
    )
    assert p_one == pytest.approx(1 / 6, abs=0.01)


def test_head_sharing_hand_worked() -> None:
    a = _qualifying({"r1": {(1, 0), (1, 1)}, "r2": {(0, 1)}, "r3": None, "r4": {(2, 0)}})
    b = _qualifying({"r1": {(1, 0)}, "r2": {(0, 0), (0, 1)}, "r3": {(0, 0)}, "r4": {(2, 0)}})
    shared = crossmech.head_sharing(a, b).set_index("run")
    # r3 has no qualifying head of a; best heads: r1 (1,0)=(1,0), r2 (0,1)!=(0,0), r4 same.
    assert list(shared.index) == ["r1", "r2", "r4"]
    assert shared["same_best"].tolist() == [True, False, True]
    assert shared["jaccard"].tolist() == pytest.approx([1 / 2, 1 / 2, 1.0])


def test_strongest_qualifying_reads_the_final_step(planted) -> None:
    _, results, _ = planted
    table = crossmech.strongest_qualifying(results["induction"].heads)
    assert table.loc["syn-small-seed1", "best"] == (1, 1)
    assert table.loc["syn-big-seed1", "heads"] == frozenset({(2, 1)})
    assert table.loc[NEVER, "best"] is None


def test_normalised_onset_is_the_same_for_any_null() -> None:
    # One run scored against a shorter evaluation text (a higher uniform null) but with the same
    # normalised trajectory has the same normalised onset.
    mechanism = mechanisms.get("previous_token")
    steps = np.array([0, 1, 3, 7, 15, 31, 63, 127])
    z = 1 / (1 + np.exp(-6 * (np.log10(steps + 1) - 1.2)))
    tables = []
    for run, lengths in (("r-seed1", [11]), ("r-seed2", [3])):
        null = float(np.mean(1 / np.arange(2, lengths[0] + 1)))
        score = null + z * (1 - null)
        for step, value in zip(steps, score):
            tables.append(
                {
                    "suite": "s",
                    "model": "r",
                    "size": "r",
                    "seed": int(run[-1]),
                    "run": run,
                    "step": int(step),
                    "tokens_seen": int(step),
                    "layer": 0,
                    "head": 0,
                    "n_layers": 1,
                    "n_heads": 1,
                    "n_params": 10,
                    "one_back": value,
                }
            )
    heads = pd.DataFrame(tables)
    context = NullContext(eval_lengths={"r-seed1": [11], "r-seed2": [3]})
    scored = crossmech.scored_heads(heads, mechanism, context).heads
    per_seed, _ = crossmech.per_seed_table(
        scored, mechanism, DEFAULT_THRESHOLDS, 1, absolute_thresholds=DEFAULT_THRESHOLDS
    )
    expected, _ = threshold_onset(steps, z)
    assert per_seed["onset_step"].tolist() == pytest.approx([expected, expected])
    # The study's absolute onset is on the raw score, so it differs between the two nulls.
    absolute = [
        threshold_onset(steps, g["one_back"].to_numpy())[0] for _, g in heads.groupby("run")
    ]
    assert per_seed["onset_absolute_step"].tolist() == pytest.approx(absolute)
    assert absolute[0] != pytest.approx(absolute[1])


def test_profile_of_a_planted_order(planted) -> None:
    _, results, cross = planted
    profile = cross["profile"].set_index(["mechanism", "size"])
    # Every run forms previous_token; the big size's seed 3 never forms induction.
    assert profile.loc[("previous_token", "all"), "fraction_qualifying"] == 1.0
    assert profile.loc[("induction", "big"), "fraction_qualifying"] == pytest.approx(2 / 3)
    assert profile.loc[("induction", "all"), "n_formed"] == 5
    # Planted: the previous-token head in layer 0, the induction head in the last layer, one
    # decade earlier, in every run where both formed (5 runs x 1 link).
    for name in ("previous_token", "induction"):
        row = profile.loc[(name, "all")]
        assert (row["n_link_runs"], row["link_layer_order"], row["link_onset_order"]) == (5, 1, 1)
    assert profile.loc[("previous_token", "small"), "layer_modal_share"] == 1.0
    assert profile.loc[("induction", "big"), "layer_modal_share"] == pytest.approx(2 / 3)
    # onset_cv from the per-seed table, independently.
    onsets = results["induction"].tables["per_seed"].query("formed")["onset_step"]
    assert profile.loc[("induction", "all"), "onset_cv"] == pytest.approx(
        onsets.std() / onsets.mean()
    )
    order = cross["mechanism_order"]
    before = order[
        (order["analysis"] == "before")
        & (order["size"] == "all")
        & (order["mechanism_a"] == "previous_token")
    ].iloc[0]
    assert (before["estimate"], before["n"]) == (1.0, 5)
    lags = cross["mechanism_lags"]
    assert set(lags["analysis"]) == {"lag_previous_token_induction"}
    # Planted: induction forms one decade of log10(step + 1) later, so the lag is positive.
    assert lags.loc[lags["term"] == "(Intercept)", "estimate"].iloc[0] > 0


def test_a_mechanism_without_its_column_is_not_scored(planted) -> None:
    heads, _, _ = planted
    absent = Mechanism(
        name="successor",
        version=1,
        unit="head",
        score_column="successor",
        description="",
        units="fraction",
        null=mechanisms.get("induction").null,
    )
    results, cross = crossmech.analyze_mechanisms(
        heads,
        [mechanisms.get("previous_token"), absent],
        context_for(heads),
        tokens_per_step=8,
        n_permutations=9,
    )
    assert "not in heads.parquet" in results["successor"].note
    assert results["successor"].tables["per_seed"].empty
    row = cross["profile"].set_index("mechanism").loc["successor"]
    assert not row["scored"] and row["note"].startswith("not scored")
    assert cross["mechanism_lags"].empty


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rule_scripts_on_synthetic_inputs(tmp_path: Path) -> None:
    heads = planted_heads(never=(NEVER,))
    heads_path = tmp_path / "heads.parquet"
    heads.to_parquet(heads_path)
    tokens = {}  # one file per run, as an hf suite's runs each read their own tokenizer
    for run in heads["run"].unique():
        path = tmp_path / "eval" / f"{run}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"token_ids": [list(range(n)) for n in EVAL_LENGTHS]}))
        tokens[run] = str(path)
    names = mechanisms.names()
    outputs = {
        f"{m}__{t}": str(tmp_path / "stats" / m / f"{t}.csv")
        for m in names
        for t in crossmech.MECHANISM_TABLES
    }
    outputs.update(
        {
            n: str(tmp_path / "stats" / f"{n}.csv")
            for n in ("profile", "mechanism_order", "mechanism_lags", "links", "links_sizes")
        }
    )
    load_script("mechanisms").main(
        SimpleNamespace(
            input=Namedlist(fromdict={"heads": str(heads_path), "tokens": list(tokens.values())}),
            output=Namedlist(fromdict=outputs),
            params=Namedlist(
                fromdict={
                    "token_files": tokens,
                    "mechanisms": names,
                    "settings": {"half_length": HALF_LENGTH},
                    "thresholds": {"start": 0.01, "stop": 0.3, "step": 0.01},
                    "tokens_per_step": 8,
                    "confidence": 0.95,
                    "seed": 0,
                    "n_permutations": 99,
                    "alignment_cost": "euclidean",
                }
            ),
            log=[str(tmp_path / "mechanisms.log")],
            rule="mechanisms",
        )
    )
    # The onset written for a run equals the threshold onset of its normalised max-over-heads
    # trajectory, computed here from heads.parquet and the token lengths alone.
    per_seed = pd.read_csv(outputs["previous_token__per_seed"]).set_index("run")
    null = np.mean(1 / np.arange(2, EVAL_LENGTHS[0] + 1))
    run = heads[heads["run"] == "syn-small-seed2"]
    top = run.groupby("step")["one_back"].max()
    expected, _ = threshold_onset(top.index.to_numpy(), (top.to_numpy() - null) / (1 - null))
    assert per_seed.loc["syn-small-seed2", "onset_step"] == pytest.approx(expected, rel=1e-5)
    order = pd.read_csv(outputs["mechanism_order"])
    never = order[(order["analysis"] == "ordering") & (order["run"] == NEVER)]["detail"]
    assert never.tolist() == ["previous_token | never: induction"]
    profile = pd.read_csv(outputs["profile"])
    assert set(profile["mechanism"]) == set(names)
    # The declared link, per run: the layer and onset order of the mechanisms' own tables (no
    # circuit files here: composition and ablation not measured).
    link_rows = pd.read_csv(outputs["links"]).set_index("run")
    induction = pd.read_csv(outputs["induction__per_seed"]).set_index("run")
    assert set(link_rows["link"]) == {"previous_token->induction"}
    lag = induction["onset_step"] - per_seed["onset_step"]
    assert link_rows["lag_steps"].to_dict() == pytest.approx(lag.to_dict(), rel=1e-4)
    assert link_rows.loc["syn-small-seed1", "source_earlier_layer"]
    assert pd.isna(link_rows.loc[NEVER, "source_first"])
    assert link_rows["composition_z"].isna().all()
    figure = tmp_path / "figures" / "profile.png"
    load_script("mechanism_figures").main(
        SimpleNamespace(
            input=Namedlist(fromdict={"profile": outputs["profile"]}),
            output=Namedlist(fromdict={"profile": str(figure)}),
            log=[str(tmp_path / "mechanism_figures.log")],
            rule="mechanism_figures",
        )
    )
    from PIL import Image

    with Image.open(figure) as image:
        assert image.format == "PNG"


def test_profile_heatmap_draws_the_all_rows_readably(planted, tmp_path: Path) -> None:
    from test_figures import check_png, readability_problems

    from mechgen.figures import suite as figures

    _, _, cross = planted
    profile = cross["profile"]
    # Six mechanisms (the first catalog's size), the last one not scored.
    extra = []
    for i, name in enumerate(["duplicate_token", "successor", "copy_suppression"]):
        row = profile[(profile["mechanism"] == "induction") & (profile["size"] == "all")].copy()
        extra.append(row.assign(mechanism=name, onset_cv=0.5 * i, configurational_z=1.5 * i))
    extra.append(
        pd.DataFrame(
            [
                {
                    "mechanism": "attention_locality",
                    "model": "all",
                    "size": "all",
                    "scored": False,
                    "note": "not scored: column absent",
                }
            ]
        )
    )
    table = pd.concat([profile, *extra], ignore_index=True)
    fig = figures.plot_profile(table, tmp_path / "profile.png", figures.COLUMN_WIDTH)
    check_png(tmp_path / "profile.png")
    assert readability_problems(fig, figures.COLUMN_WIDTH) == []
    ax = fig.axes[0]
    cells = {t.get_gid(): t.get_text() for t in ax.texts}
    row = profile[(profile["mechanism"] == "induction") & (profile["size"] == "all")].iloc[0]
    assert cells["cell:induction:fraction_qualifying"] == f"{row['fraction_qualifying']:.2g}"
    assert cells["row:attention_locality"] == "not scored"
    assert cells["cell:induction:configurational_z"] == "–"
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "previous_token" and labels[-1] == "attention_locality"
    # Colours: onset CV 0.5 -> 0.5, z 3 -> 1 (saturated), a fraction as it is.
    colours = figures.profile_colour_values(table[table["size"] == "all"].reset_index(drop=True))
    columns = list(figures.PROFILE_LABELS)
    assert colours[2, columns.index("onset_cv")] == pytest.approx(1.0)  # duplicate_token, cv 0
    assert colours[3, columns.index("onset_cv")] == pytest.approx(0.5)  # successor, cv 0.5
    assert colours[4, columns.index("configurational_z")] == pytest.approx(1.0)  # z 3
    assert colours[3, columns.index("configurational_z")] == pytest.approx(0.5)  # z 1.5
    assert np.isnan(colours[5]).all()


def test_previous_token_keeps_the_studys_absolute_onset() -> None:
    # On the published tables' subset (no induction column, no sentence lengths: the step-0
    # median null), the absolute-threshold onset is stats/per_seed.csv's onset, unchanged.
    from mechgen.axes.developmental import per_seed_summary
    from mechgen.tables.heads import read_trott2025

    heads = read_trott2025(REPO / "tests" / "data" / "trott2025")
    heads = heads[heads["model"].isin(["pythia-14m", "pythia-70m"])]
    results, _ = crossmech.analyze_mechanisms(
        heads,
        list(mechanisms.catalog().values()),
        NullContext(),
        tokens_per_step=2_097_152,
        n_permutations=9,
    )
    study = per_seed_summary(heads, "one_back", tokens_per_step=2_097_152).set_index("run")
    ours = results["previous_token"].tables["per_seed"].set_index("run")
    assert ours["onset_absolute_step"].to_dict() == pytest.approx(study["onset_step"].to_dict())
    assert ours["final_layer"].to_dict() == study["final_layer"].to_dict()
    assert results["induction"].note == "column 'induction' not in heads.parquet"


def test_profile_caption_renders() -> None:
    from test_figures import render_caption

    html = render_caption(REPO / "workflow" / "report" / "profile.rst", {"suite": "toy"}, {})
    assert "toy" in html and "not scored" in html and len(html) > 300


def test_positional_head_alignment_of_every_mechanism_matches_the_positional_axis() -> None:
    # On the published tables' subset, the previous-token mechanism's final-step head alignment
    # is the positional axis's (stats/positional_size_step.csv at the final step), unchanged.
    from mechgen.axes import positional
    from mechgen.axes.developmental import trajectories
    from mechgen.tables.heads import read_trott2025

    heads = read_trott2025(REPO / "tests" / "data" / "trott2025")
    heads = heads[heads["model"].isin(["pythia-14m", "pythia-70m"])]
    results, _ = crossmech.analyze_mechanisms(
        heads, [mechanisms.get("previous_token")], NullContext(), n_permutations=9
    )
    ours = results["previous_token"].tables["positional_size"].set_index("model")
    axis = positional.positional_tables(heads, trajectories(heads, "one_back"), n_permutations=9)
    final = axis["positional_size_step"]
    final = final[final["is_final_step"]].set_index("model")
    for column in ("same_layer_fraction", "head_match_fraction", "head_match_chance"):
        assert ours[column].to_dict() == pytest.approx(final[column].to_dict()), column
    assert set(ours["alignment_cost"]) == {"euclidean"}


def test_head_alignment_pairs_heads_by_trajectory_not_by_index() -> None:
    # Two runs, one layer of 3 heads. The strongest head is head 0 in run a and head 2 in run b,
    # with the same trajectory; the other heads swap too. Hungarian pairs a0-b2: a match.
    steps = [0, 1, 2, 3]
    shapes = {0: [0.1, 0.5, 0.8, 0.9], 1: [0.1, 0.1, 0.2, 0.2], 2: [0.3, 0.2, 0.1, 0.1]}
    swap = {"a": {0: 0, 1: 1, 2: 2}, "b": {0: 2, 1: 1, 2: 0}}
    rows = [
        {"run": run, "model": "m", "step": s, "layer": 0, "head": swap[run][h], "score": v}
        for run in ("a", "b")
        for h, values in shapes.items()
        for s, v in zip(steps, values)
    ]
    scored = pd.DataFrame(rows).assign(
        suite="t",
        size="m",
        seed=lambda t: t["run"].map({"a": 1, "b": 2}),
        n_params=10,
        n_layers=1,
        n_heads=3,
        tokens_seen=lambda t: t["step"],
    )
    per_seed = pd.DataFrame(
        {"run": ["a", "b"], "model": "m", "final_layer": 0, "final_head": [0, 2]}
    )
    table = crossmech.head_alignment(scored, per_seed)
    assert table.loc["m", "same_layer_fraction"] == 1.0
    assert table.loc["m", "head_match_fraction"] == 1.0
    # Had b's strongest been head 1 (whose trajectory is a's head 1), no match.
    per_seed.loc[1, "final_head"] = 1
    assert crossmech.head_alignment(scored, per_seed).loc["m", "head_match_fraction"] == 0.0
