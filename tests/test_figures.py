"""Figures: what each figure function draws equals the data given (checked on the artists),
the PNG is a real 300-dpi image, the report captions render, and the analyze/figures scripts
run end to end on a synthetic suite (also with a single seed)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import jinja2
import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from docutils.core import publish_parts
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image
from snakemake.iocontainers import Namedlist

from mechgen.axes import convergence, functional, positional
from mechgen.axes.developmental import trajectories
from mechgen.figures import suite as figures
from mechgen.stats import analysis as stats
from mechgen.tables import summary

REPO = Path(__file__).resolve().parent.parent
STEPS = (0, 1, 2, 4, 8, 16, 32)


TWO_SIZES = (("small", 2, 2, 2_000_000), ("big", 3, 2, 20_000_000))
PYTHIA_LIKE = (
    ("14m", 6, 4, 14_067_712),
    ("31m", 6, 8, 30_494_720),
    ("70m", 6, 8, 70_426_624),
    ("160m-weight", 12, 12, 162_322_944),
    ("410m", 24, 16, 405_334_016),
)
"""Sizes of :func:`synthetic_heads` (name, layers, heads per layer, parameters): two toy sizes,
and five of the PolyPythias' shapes (long names, 6 to 24 layers) for the print-size checks."""


def synthetic_heads(
    seeds: tuple[int, ...] = (1, 2, 3), seed: int = 0, sizes=TWO_SIZES
) -> pd.DataFrame:
    """Per size in ``sizes``; in every run one head (layer and head index vary by seed) rises
    with training, the rest stay near the uniform level."""
    rng = np.random.default_rng(seed)
    rows = []
    for size, n_layers, n_heads, n_params in sizes:
        for run_seed in seeds:
            strong_layer = int(rng.integers(n_layers))
            strong_head = int(rng.integers(n_heads))
            midpoint = rng.uniform(0.6, 1.2)
            for step in STEPS:
                rise = 1 / (1 + np.exp(-4 * (np.log10(step + 1) - midpoint)))
                for layer in range(n_layers):
                    for head in range(n_heads):
                        value = 0.12 + 0.01 * rng.standard_normal() + 0.05 * rise * head
                        if (layer, head) == (strong_layer, strong_head):
                            value += 0.6 * rise
                        rows.append(
                            {
                                "suite": "syn",
                                "model": f"syn-{size}",
                                "size": size,
                                "seed": run_seed,
                                "run": f"syn-{size}-seed{run_seed}",
                                "step": step,
                                "tokens_seen": step * 64,
                                "layer": layer,
                                "head": head,
                                "n_layers": n_layers,
                                "n_heads": n_heads,
                                "n_params": n_params,
                                "one_back": value,
                                "nonfinite": False,
                            }
                        )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def heads() -> pd.DataFrame:
    return synthetic_heads()


@pytest.fixture(scope="module")
def results(heads: pd.DataFrame) -> dict[str, pd.DataFrame]:
    traj = trajectories(heads, "one_back")
    results = stats.analyze(heads, traj, tokens_per_step=64, bootstrap_cfg={"n_resamples": 200})
    return {**results, "trajectories": traj}


def lines_by_gid(ax) -> dict[str, object]:
    return {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}


def check_png(path: Path) -> None:
    """A real 300-dpi PNG with something drawn on it (not a blank canvas)."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.info["dpi"] == pytest.approx((300, 300), abs=0.5)
    pixels = matplotlib.image.imread(path)
    assert pixels[..., :3].std() > 0.05


def test_trajectories_figure(tmp_path: Path, results) -> None:
    traj = results["trajectories"]
    path = tmp_path / "trajectories.png"
    fig = figures.plot_trajectories(traj, path, "one_back", baseline=0.125)
    check_png(path)
    assert [ax.get_title().split()[0] for ax in fig.axes] == ["syn-small", "syn-big"]
    for ax in fig.axes:
        model = ax.get_title().split()[0]
        group = traj[traj["model"] == model]
        lines = lines_by_gid(ax)
        run_lines = {gid[4:]: line for gid, line in lines.items() if gid.startswith("run:")}
        assert sorted(run_lines) == sorted(group["run"].unique())
        for run, line in run_lines.items():
            rows = group[group["run"] == run].sort_values("step")
            np.testing.assert_allclose(line.get_xdata(), rows["step"] + 1)
            np.testing.assert_allclose(line.get_ydata(), rows["value"])
        expected_mean = [group.loc[group["step"] == s, "value"].mean() for s in STEPS]
        np.testing.assert_allclose(lines["mean"].get_ydata(), expected_mean)
        np.testing.assert_allclose(lines["baseline"].get_ydata(), [0.125, 0.125])
        assert ax.get_xscale() == "log"
    # Without a baseline there is no dashed line.
    fig = figures.plot_trajectories(traj, tmp_path / "no_baseline.png", "one_back")
    assert all("baseline" not in lines_by_gid(ax) for ax in fig.axes)


def test_layer_heatmap_figure(tmp_path: Path, heads: pd.DataFrame) -> None:
    path = tmp_path / "layer_heatmap.png"
    table = positional.positional_tables(heads, trajectories(heads, "one_back"), n_permutations=99)[
        "positional_size_step"
    ]
    fig = figures.plot_layer_heatmap(heads, path, "one_back", positional=table)
    check_png(path)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2
    for ax in panels:
        model = ax.get_title().split("\n")[0]
        n_layers = int(heads.loc[heads["model"] == model, "n_layers"].iloc[0])
        seeds = sorted(heads.loc[heads["model"] == model, "seed"].unique())
        expected = np.full((len(seeds), n_layers), -np.inf)
        for row in heads[(heads["model"] == model) & (heads["step"] == STEPS[-1])].itertuples():
            i = seeds.index(row.seed)
            expected[i, row.layer] = max(expected[i, row.layer], row.one_back)
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), expected)
        stars = next(c for c in ax.collections if c.get_gid() == "argmax").get_offsets()
        np.testing.assert_array_equal(
            np.asarray(stars), np.c_[expected.argmax(axis=1), np.arange(len(seeds))]
        )
        assert "modal share" in ax.get_title()


def test_size_effects_figure(tmp_path: Path, results) -> None:
    per_seed, per_model = results["per_seed"], results["per_model"]
    path = tmp_path / "size_effects.png"
    fig = figures.plot_size_effects(per_seed, per_model, path, "one_back")
    check_png(path)
    assert len(fig.axes) == 3
    for ax, quantity in zip(fig.axes, ["peak", "slope", "onset_step"]):
        points = next(c for c in ax.collections if c.get_gid() == "seeds").get_offsets()
        finite = per_seed[np.isfinite(per_seed[quantity])]
        np.testing.assert_allclose(np.sort(np.asarray(points)[:, 1]), np.sort(finite[quantity]))
        # Each point sits in its size's strip, 0.09 to 0.22 decades left of the parameter count.
        decades = np.log10(
            np.sort(np.asarray(points)[:, 0]) / np.sort(finite["n_params"].to_numpy(dtype=float))
        )
        assert np.all((decades >= -0.22 - 1e-9) & (decades <= -0.09 + 1e-9))
        for row in per_model.itertuples():
            marker = lines_by_gid(ax)[f"mean:{row.model}"]
            assert marker.get_xdata()[0] == row.n_params
            assert marker.get_ydata()[0] == pytest.approx(getattr(row, f"{quantity}_mean"))
    # On the page, at a paper column's width, no seed dot touches a mean's whisker or cap:
    # each dot's centre is further left of the whisker than the cap's half-width plus its radius.
    fig = figures.plot_size_effects(per_seed, per_model, tmp_path / "narrow.png", "one_back", 3.3)
    FigureCanvasAgg(fig).draw()
    for ax in fig.axes[:3]:
        dots = next(c for c in ax.collections if c.get_gid() == "seeds")
        dots_px = ax.transData.transform(np.asarray(dots.get_offsets()))
        radius_px = np.sqrt(dots.get_sizes()[0]) / 2 * fig.dpi / 72
        for model in per_model["model"]:
            centre_px = ax.transData.transform(
                (lines_by_gid(ax)[f"mean:{model}"].get_xdata()[0], 1.0)
            )[0]
            n_params = per_seed.loc[per_seed["model"] == model, "n_params"].iloc[0]
            own = np.isclose(
                np.log10(np.asarray(dots.get_offsets())[:, 0] / n_params), -0.155, atol=0.07
            )
            assert own.any()
            cap_half_px = 2 * fig.dpi / 72  # capsize 2 pt
            assert np.all(centre_px - dots_px[own, 0] > cap_half_px + radius_px)
        assert ax.get_xscale() == "log"


def test_correlation_matrix_figure(tmp_path: Path, results) -> None:
    traj = results["trajectories"]
    corr = figures.correlation_from_pairs(results["convergence"])
    # The pair table pivots back to the matrix convergence computes directly.
    direct = convergence.correlation_matrix(traj)
    pd.testing.assert_frame_equal(corr, direct.loc[corr.index, corr.columns], check_names=False)
    path = tmp_path / "correlation_matrix.png"
    fig = figures.plot_correlation_matrix(corr, results["per_seed"], path)
    check_png(path)
    ax = fig.axes[0]
    order = [f"syn-small-seed{s}" for s in (1, 2, 3)] + [f"syn-big-seed{s}" for s in (1, 2, 3)]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        f"{r.rsplit('-seed', 1)[0]} s{r[-1]}" for r in order
    ]
    # Brute force: Pearson r of the trajectories, in size-then-seed order.
    wide = traj.pivot(index="step", columns="run", values="value")[order]
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), np.corrcoef(wide.to_numpy().T))


def test_mds_figure(tmp_path: Path, results) -> None:
    coords = results["mds"]
    path = tmp_path / "mds.png"
    fig = figures.plot_mds(coords, path, results["per_model"])
    check_png(path)
    ax = fig.axes[0]
    groups = {c.get_gid(): np.asarray(c.get_offsets()) for c in ax.collections if c.get_gid()}
    assert sorted(groups) == ["size:syn-big", "size:syn-small"]
    for gid, offsets in groups.items():
        rows = coords[coords["model"] == gid[5:]]
        np.testing.assert_allclose(offsets, rows[["mds1", "mds2"]].to_numpy())
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert all("separation" in label for label in labels)


def test_functional_heads_figure(tmp_path: Path, heads: pd.DataFrame) -> None:
    tables = functional.functional_tables(heads, 0.125, "token_lengths", multiple=2.0)
    path = tmp_path / "functional_heads.png"
    counts, sizes = tables["functional_run_step"], tables["functional_size"]
    fig = figures.plot_functional_heads(counts, sizes, path)
    check_png(path)
    for ax in fig.axes:
        model = ax.get_title().split()[0]
        run_lines = {g[4:]: line for g, line in lines_by_gid(ax).items() if g.startswith("run:")}
        assert sorted(run_lines) == sorted(counts.loc[counts["model"] == model, "run"].unique())
        for run, line in run_lines.items():
            # Brute force: count the heads above 2 x 0.125 at each step.
            rows = heads[heads["run"] == run]
            expected = [int((rows.loc[rows["step"] == s, "one_back"] > 0.25).sum()) for s in STEPS]
            np.testing.assert_array_equal(line.get_ydata(), expected)
        size_row = sizes[sizes["model"] == model].iloc[0]
        assert (
            f"{int(size_row['n_runs_functional'])}/{int(size_row['n_runs'])} seeds"
            in ax.get_title()
        )


def test_placeholder_figure(tmp_path: Path) -> None:
    fig = figures.placeholder_figure(tmp_path / "p.png", "No MDS: 2 runs")
    check_png(tmp_path / "p.png")
    assert [t.get_text() for t in fig.axes[0].texts] == ["No MDS: 2 runs"]


def declared_figures() -> list[str]:
    """The figure names the Snakemake rules declare (workflow/rules/common.smk, FIGURES)."""
    text = (REPO / "workflow" / "rules" / "common.smk").read_text()
    block = re.search(r"FIGURES = \[(.*?)\]", text, re.DOTALL)
    assert block, "common.smk has no FIGURES list"
    return re.findall(r'"(\w+)"', block.group(1))


def render_caption(path: Path, config: dict, params: dict, part: str = "body") -> str:
    """Render a caption as Snakemake's report does: jinja2, then docutils; docutils warnings
    (bad reStructuredText) raise. The workflow description is the ``html_body`` part, which
    keeps its title."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    snakemake = SimpleNamespace(config=config, params=SimpleNamespace(**params))
    text = env.from_string(path.read_text()).render(snakemake=snakemake)
    return publish_parts(
        text, writer="html", settings_overrides={"halt_level": 2, "report_level": 5}
    )[part]


def test_captions_render(tmp_path: Path, monkeypatch, results, heads) -> None:
    config = {"suite": "toy", "analysis": {"metric": "one_back", "bootstrap": {"confidence": 0.9}}}
    params = {"metric": "one_back", "functional_multiple": 2.0}
    names = declared_figures()
    assert len(names) == 6
    for name in names:
        html = render_caption(REPO / "workflow" / "report" / f"{name}.rst", config, params)
        assert len(html) > 300
    assert "90%" in render_caption(
        REPO / "workflow" / "report" / "functional_heads.rst", config, params
    )
    # The landing page includes the summary rule's output, relative to the working directory.
    table = summary.summary_table(
        results["per_model"],
        functional.functional_tables(heads, 0.125, "token_lengths", multiple=2.0)[
            "functional_size"
        ],
    )
    (tmp_path / "out" / "toy").mkdir(parents=True)
    (tmp_path / "out" / "toy" / "summary.rst").write_text(
        summary.summary_rst(table, "toy", "one_back", 0.95, "out/toy/stats/")
    )
    monkeypatch.chdir(tmp_path)
    workflow = render_caption(
        REPO / "workflow" / "report" / "workflow.rst",
        {"suite": "toy", "results_dir": "out"},
        {},
        part="html_body",
    )
    assert '<h1 class="title">mechgen report, suite toy: ' in workflow
    assert "Summary of the findings" in workflow and "out/toy/stats/" in workflow
    assert "&lt;suite&gt;" not in workflow and "one_back" in workflow
    for name in ("table", "summary"):
        assert "toy" in render_caption(REPO / "workflow" / "report" / f"{name}.rst", config, {})


@pytest.mark.parametrize(
    "name",
    [
        "analyze",
        "figures",
        "trajectories",
        "relational_figures",
        "summary",
        "mechanisms",
        "mechanism_figures",
        "mechanism_figure",
    ],
)
def test_script_runs_after_snakemake_preamble(name: str) -> None:
    # Snakemake runs a `script:` with its own preamble (defining `snakemake`) prepended, so a
    # script must stay valid Python after other statements, e.g. no `from __future__` import.
    source = (REPO / "scripts" / f"{name}.py").read_text()
    compile("import sys\nsnakemake = None\n" + source, f"{name}.py", "exec")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines main(); runs nothing without a `snakemake` global
    return module


def declared_stats() -> list[str]:
    """The stats tables rule `analyze` declares (workflow/rules/common.smk, STATS)."""
    text = (REPO / "workflow" / "rules" / "common.smk").read_text()
    block = re.search(r"^STATS = \[(.*?)\]", text, re.DOTALL | re.MULTILINE)
    assert block, "common.smk has no STATS list"
    return re.findall(r'"(\w+)"', block.group(1))


def run_scripts(
    tmp_path: Path,
    heads: pd.DataFrame,
    token_files: dict[str, str],
    before_analyze=lambda: None,
    before_figures=lambda: None,
) -> dict[str, Path]:
    """Run the scripts of rules trajectories, analyze and figures as Snakemake would, each
    reading the files the previous one wrote; ``before_*`` run just before those scripts."""
    heads_path = tmp_path / "heads.parquet"
    heads.to_parquet(heads_path)
    traj_paths = {
        "parquet": str(tmp_path / "trajectories.parquet"),
        "csv": str(tmp_path / "trajectories.csv"),
    }
    load_script("trajectories").main(
        SimpleNamespace(
            input=Namedlist(fromdict={"heads": str(heads_path)}),
            output=Namedlist(fromdict=traj_paths),
            params=Namedlist(fromdict={"metric": "one_back"}),
            log=[str(tmp_path / "trajectories.log")],
            rule="trajectories",
        )
    )
    stats_paths = {name: str(tmp_path / "stats" / f"{name}.csv") for name in declared_stats()}
    (tmp_path / "stats").mkdir()
    tables = {"heads": str(heads_path), "trajectories": traj_paths["parquet"]}
    analyze = SimpleNamespace(
        input=Namedlist(fromdict={**tables, "tokens": sorted(set(token_files.values()))}),
        output=Namedlist(fromdict=stats_paths),
        params=Namedlist(
            fromdict={
                "token_files": token_files,
                "thresholds": {"start": 0.01, "stop": 0.3, "step": 0.01},
                "functional_multiple": 2.0,
                "bootstrap": {"n_resamples": 100, "seed": 0, "confidence": 0.95},
                "tokens_per_step": 64,
                "positional": {"n_permutations": 199, "alignment_cost": "euclidean"},
            }
        ),
        log=[str(tmp_path / "analyze.log")],
        rule="analyze",
    )
    before_analyze()
    load_script("analyze").main(analyze)
    figure_paths = {name: str(tmp_path / "figures" / f"{name}.png") for name in declared_figures()}
    draw = SimpleNamespace(
        input=Namedlist(
            fromdict={**tables, "tokens": sorted(set(token_files.values())), **stats_paths}
        ),
        output=Namedlist(fromdict=figure_paths),
        params=Namedlist(fromdict={"metric": "one_back", "functional_multiple": 2.0}),
        log=[str(tmp_path / "figures.log")],
        rule="figures",
    )
    before_figures()
    load_script("figures").main(draw)
    return {
        **{f"stats/{k}": Path(v) for k, v in stats_paths.items()},
        **{k: Path(v) for k, v in figure_paths.items()},
        "trajectories_table": Path(traj_paths["parquet"]),
    }


def test_analyze_and_figures_read_trajectories_and_mds(
    tmp_path: Path, heads: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The max-over-heads table is computed by rule `trajectories` only, the MDS coordinates by
    # rule `analyze` only: computing either again in a later script raises.
    import sys

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"{name} recomputed instead of read from its table")

        return fail

    def patch_everywhere(function, name):
        for module in list(sys.modules.values()):
            if (getattr(module, "__name__", "") or "").startswith(("mechgen", "script_")):
                for attr, value in list(vars(module).items()):
                    if value is function:
                        monkeypatch.setattr(module, attr, forbidden(name))

    from mechgen.axes import developmental

    real_trajectories, real_mds = developmental.trajectories, convergence.mds_coordinates
    paths = run_scripts(
        tmp_path,
        heads,
        {},
        before_analyze=lambda: patch_everywhere(real_trajectories, "trajectories"),
        before_figures=lambda: patch_everywhere(real_mds, "mds_coordinates"),
    )
    monkeypatch.undo()
    # What analyze wrote is MDS of the trajectories the first script wrote, to 6 digits.
    traj = pd.read_parquet(paths["trajectories_table"])
    expected = convergence.mds_coordinates(convergence.correlation_matrix(traj), traj)
    written = pd.read_csv(paths["stats/mds"])
    assert list(written.columns) == convergence.MDS_COLUMNS
    np.testing.assert_allclose(
        written[["mds1", "mds2"]].to_numpy(), expected[["mds1", "mds2"]].to_numpy(), rtol=1e-5
    )
    check_png(paths["mds"])


def test_scripts_end_to_end(tmp_path: Path, heads: pd.DataFrame) -> None:
    # One token file for every run, as a toy suite's runs share their tokenizer's.
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"token_ids": [[1, 2, 3]] * 4}))  # baseline (1/2 + 1/3) / 2
    token_files = {run: str(path) for run in heads["run"].unique()}
    paths = run_scripts(tmp_path, heads, token_files)
    for name in ("functional_run_step", "functional_run", "functional_size"):
        functional_csv = pd.read_csv(paths[f"stats/{name}"])
        # The CSV carries 6 significant digits.
        assert functional_csv["baseline"].unique() == pytest.approx([(1 / 2 + 1 / 3) / 2], rel=1e-5)
        assert set(functional_csv["baseline_source"]) == {"token_lengths"}
    # Every row of a table is of its own level: no column is empty throughout.
    run_step = pd.read_csv(paths["stats/positional_run_step"])
    assert len(run_step) == heads.groupby(["run", "step"]).ngroups
    size_step = pd.read_csv(paths["stats/positional_size_step"])
    assert len(size_step) == heads.groupby(["model", "step"]).ngroups
    assert set(size_step["n_permutations"]) == {199}
    regressions = pd.read_csv(paths["stats/regressions"])
    assert "prop_layer" in set(regressions["analysis"])
    for name in declared_figures():
        check_png(paths[name])
    # Rule `summary` on the same tables (no relational axis): its CSV is summary_table's.
    outputs = {"csv": str(tmp_path / "summary.csv"), "rst": str(tmp_path / "summary.rst")}
    load_script("summary").main(
        SimpleNamespace(
            input=Namedlist(
                fromdict={
                    "per_model": str(paths["stats/per_model"]),
                    "functional": str(paths["stats/functional_size"]),
                    "positional": str(paths["stats/positional_size_step"]),
                }
            ),
            output=Namedlist(fromdict=outputs),
            params=Namedlist(
                fromdict={
                    "suite": "syn",
                    "metric": "one_back",
                    "confidence": 0.95,
                    "stats_dir": "results/syn/stats/",
                }
            ),
            log=[str(tmp_path / "summary.log")],
            rule="summary",
        )
    )
    expected = summary.summary_table(
        pd.read_csv(paths["stats/per_model"]),
        pd.read_csv(paths["stats/functional_size"]),
        pd.read_csv(paths["stats/positional_size_step"]),
    )
    pd.testing.assert_frame_equal(pd.read_csv(outputs["csv"]), expected, check_dtype=False)
    assert "Summary of the findings" in Path(outputs["rst"]).read_text()


def test_scripts_single_seed(tmp_path: Path) -> None:
    heads = synthetic_heads(seeds=(1,))
    paths = run_scripts(tmp_path, heads, token_files={})
    regressions = pd.read_csv(paths["stats/regressions"])
    seed_models = regressions[
        regressions["analysis"].isin(["peak_size", "slope_size", "onset_size"])
    ]
    assert seed_models["note"].str.startswith("skipped").all()
    # No token files: the step-0 median head is the baseline.
    functional_csv = pd.read_csv(paths["stats/functional_run"])
    assert set(functional_csv["baseline_source"]) == {"step0_median"}
    expected = np.median(heads.loc[heads["step"] == 0, "one_back"])
    # The CSV carries 6 significant digits.
    assert functional_csv["baseline"].unique() == pytest.approx([expected], rel=1e-5)
    # Two runs: correlations exist but MDS (>= 3 runs) does not; its figure says so.
    check_png(paths["correlation_matrix"])
    check_png(paths["mds"])
    assert "No MDS: it needs at least 3 runs" in (tmp_path / "figures.log").read_text()


def test_single_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    heads = synthetic_heads()
    heads = heads[heads["step"] == STEPS[-1]]
    with pytest.raises(ValueError, match="single checkpoint"):
        run_scripts(tmp_path, heads, token_files={})


# --- print size: every figure at a single paper column ----------------------------------------


def synthetic_relational(heads: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A relational table (onset lag, ablation drops per run) and a configurational table (z and
    p of each signature per ordered pair of runs) shaped like rule `relational`'s."""
    rng = np.random.default_rng(seed)
    runs = figures.run_order(heads)
    relational = runs.assign(
        lag_steps=rng.normal(200, 150, len(runs)).round(),
        induction_drop=rng.uniform(0.0, 0.4, len(runs)),
        control_induction_drop=rng.uniform(-0.02, 0.05, len(runs)),
    )
    pairs = []
    for a in runs.itertuples():
        for b in runs.itertuples():
            if a.run == b.run:
                continue
            row = {"run_a": a.run, "model_a": a.model, "seed_a": a.seed}
            row.update({"run_b": b.run, "model_b": b.model, "seed_b": b.seed})
            for name in ("qk_spectrum", "profile", "cka"):
                z = rng.normal(2.0 if a.model == b.model else 0.5, 2.0)
                row[f"{name}_z"] = z
                row[f"{name}_p"] = float(np.clip(0.5 - 0.15 * z, 0.001, 1.0))
            pairs.append(row)
    return relational, pd.DataFrame(pairs)


def render_all(
    directory: Path, heads: pd.DataFrame, results: dict, width: float | None
) -> dict[str, object]:
    """Every figure of the pipeline drawn from ``heads`` (and its ``stats.analyze`` results)
    into ``directory``, at ``width`` inches: ``{name: Figure}``."""
    from mechgen.axes.developmental import trajectories

    relational, configurational = synthetic_relational(heads)
    tables = functional.functional_tables(heads, 0.125, "token_lengths", multiple=2.0)
    induction = trajectories(heads, "one_back").assign(
        value=lambda t: t["value"] * 0.8 + 0.02 * np.log1p(t["step"])
    )
    corr = figures.correlation_from_pairs(results["convergence"])
    draw = {
        "trajectories": lambda p: figures.plot_trajectories(
            results["trajectories"], p, "one_back", 0.125, width=width
        ),
        "layer_heatmap": lambda p: figures.plot_layer_heatmap(
            heads,
            p,
            "one_back",
            positional=positional.positional_tables(
                heads, results["trajectories"], n_permutations=99
            )["positional_size_step"],
            width=width,
        ),
        "size_effects": lambda p: figures.plot_size_effects(
            results["per_seed"], results["per_model"], p, "one_back", width=width
        ),
        "correlation_matrix": lambda p: figures.plot_correlation_matrix(
            corr, results["per_seed"], p, width=width
        ),
        "mds": lambda p: figures.plot_mds(results["mds"], p, results["per_model"], width=width),
        "functional_heads": lambda p: figures.plot_functional_heads(
            tables["functional_run_step"], tables["functional_size"], p, width=width
        ),
        "relational_trajectories": lambda p: figures.plot_relational_trajectories(
            trajectories(heads, "one_back"), induction, p, 0.05, width=width
        ),
        "onset_lag": lambda p: figures.plot_onset_lags(relational, p, width=width),
        "ablation": lambda p: figures.plot_ablation(relational, p, width=width),
        "configurational": lambda p: figures.plot_configurational(
            configurational, p, runs=heads, width=width
        ),
        "placeholder": lambda p: figures.placeholder_figure(
            p, "No MDS: it needs at least 3 runs.", width=width
        ),
    }
    return {name: fn(directory / f"{name}.png") for name, fn in draw.items()}


def drawn_texts(fig) -> list:
    """The non-empty text artists a render of ``fig`` draws: tick labels of the ticks inside the
    view (``Axis._update_ticks``, what ``Axis.draw`` uses), titles, axis labels, legends,
    free texts, and the figure's own labels and legends."""
    import matplotlib.text

    texts = []
    for ax in fig.axes:
        if not ax.get_visible() or not ax.axison and not ax.get_legend():
            continue
        for axis in (ax.xaxis, ax.yaxis):
            if not axis.get_visible():
                continue
            for tick in axis._update_ticks():
                for label in (tick.label1, tick.label2):
                    if label.get_visible():
                        label.axes = ax  # tick labels are not attached to their axes
                        texts.append(label)
            texts.append(axis.label)
        texts += [ax.title, ax._left_title, ax._right_title, *ax.texts]
        if ax.get_legend():
            texts += ax.get_legend().get_texts()
    for legend in fig.legends:
        texts += legend.get_texts()
    texts += [t for t in (fig._supxlabel, fig._supylabel, fig._suptitle) if t is not None]
    texts += fig.texts
    unique = {id(t): t for t in texts}  # fig.texts holds the sup-labels too
    return [
        t
        for t in unique.values()
        if isinstance(t, matplotlib.text.Text) and t.get_visible() and t.get_text().strip()
    ]


def readability_problems(fig, width: float) -> list[str]:
    """What makes ``fig`` unreadable at ``width`` inches: text under MIN_FONT_PT points, two
    texts whose rendered boxes overlap (slanted tick labels: neighbours closer along the axis
    than one line of text across the slant), a drawing wider than ``width``."""
    canvas = FigureCanvasAgg(fig)  # a saved figure is closed: draw it on a fresh Agg canvas
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = drawn_texts(fig)
    problems = [
        f"{t.get_text()!r} is {t.get_fontsize():.1f} pt"
        for t in texts
        if t.get_fontsize() < figures.MIN_FONT_PT - 1e-9
    ]
    boxes = [t.get_window_extent(renderer) for t in texts]
    slanted = {
        i
        for i, t in enumerate(texts)
        if 0 < t.get_rotation() % 90 < 90 and t.get_rotation() % 180 not in (0, 90)
    }
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            a, b = boxes[i], boxes[j]
            if i in slanted and j in slanted and texts[i].axes is texts[j].axes:
                # Slanted neighbours: their gap across the slant is dx * sin(angle).
                angle = np.deg2rad(texts[i].get_rotation())
                gap = abs(a.x1 - b.x1) * abs(np.sin(angle))
                height = texts[i].get_fontsize() * fig.dpi / 72
                if gap < 0.9 * height:
                    problems.append(f"slanted {texts[i].get_text()!r} and {texts[j].get_text()!r}")
                continue
            overlap_x = min(a.x1, b.x1) - max(a.x0, b.x0)
            overlap_y = min(a.y1, b.y1) - max(a.y0, b.y0)
            if overlap_x > 1 and overlap_y > 1:
                problems.append(f"{texts[i].get_text()!r} overlaps {texts[j].get_text()!r}")
    tight = fig.get_tightbbox(renderer)
    if tight.width > width * 1.03:
        problems.append(f"drawing is {tight.width:.2f} in wide")
    return problems


@pytest.mark.parametrize("scale", ["toy", "pythia"])
def test_every_figure_is_readable_at_column_width(tmp_path: Path, scale: str) -> None:
    if scale == "toy":
        heads = synthetic_heads()
    else:
        heads = synthetic_heads(seeds=tuple(range(10)), sizes=PYTHIA_LIKE)
    traj = trajectories(heads, "one_back")
    results = stats.analyze(heads, traj, tokens_per_step=64, bootstrap_cfg={"n_resamples": 50})
    results["trajectories"] = traj
    drawn = render_all(tmp_path, heads, results, figures.COLUMN_WIDTH)
    for name, fig in drawn.items():
        assert readability_problems(fig, figures.COLUMN_WIDTH) == [], name
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.width <= figures.COLUMN_WIDTH * 1.03 * figures.DPI


def test_correlation_scale_is_anchored(tmp_path: Path, results) -> None:
    corr = figures.correlation_from_pairs(results["convergence"])
    fig = figures.plot_correlation_matrix(corr, results["per_seed"], tmp_path / "c.png")
    # The same colour means the same r in every suite: the whole range of r, not the data's.
    assert fig.axes[0].images[0].get_clim() == (-1.0, 1.0)
    off = corr.to_numpy()[~np.eye(len(corr), dtype=bool)]
    assert f"from {off.min():.2f} to {off.max():.2f}" in fig.axes[0].get_title()


def test_configurational_shows_z_against_the_null(tmp_path: Path) -> None:
    heads = synthetic_heads(seeds=(2, 1, 3))
    _, table = synthetic_relational(heads)
    table = table.sample(frac=1.0, random_state=0)  # the figure must not rely on row order
    fig = figures.plot_configurational(table, tmp_path / "conf.png", runs=heads)
    # Runs by size (n_params), then seed: small before big whatever their names sort as.
    order = [f"syn-small-seed{s}" for s in (1, 2, 3)] + [f"syn-big-seed{s}" for s in (1, 2, 3)]
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3
    for ax, name in zip(panels, ("qk_spectrum", "profile", "cka")):
        image = ax.images[0]
        # One shared, symmetric, fixed scale.
        assert image.get_clim() == (-figures.Z_LIMIT, figures.Z_LIMIT)
        drawn = np.ma.filled(image.get_array().astype(float), np.nan)
        for i, a in enumerate(order):
            for j, b in enumerate(order):
                row = table[(table["run_a"] == a) & (table["run_b"] == b)]
                if i == j:
                    assert row.empty and np.isnan(drawn[i, j])
                else:
                    assert drawn[i, j] == pytest.approx(row[f"{name}_z"].iloc[0])
        dots = next(c for c in ax.collections if c.get_gid() == "significant").get_offsets()
        expected = sorted(
            (order.index(r.run_b), order.index(r.run_a))
            for r in table.itertuples()
            if getattr(r, f"{name}_p") < 0.05
        )
        assert sorted(map(tuple, np.asarray(dots).astype(int).tolist())) == expected


def test_ablation_draws_what_the_caption_says(tmp_path: Path) -> None:
    heads = synthetic_heads()
    relational, _ = synthetic_relational(heads)
    fig = figures.plot_ablation(relational, tmp_path / "ablation.png")
    ax = fig.axes[0]
    collections = {c.get_gid(): c for c in ax.collections if c.get_gid()}
    for model in ("syn-small", "syn-big"):
        rows = relational[relational["model"] == model]
        source, control = collections[f"source:{model}"], collections[f"control:{model}"]
        assert source.get_facecolors()[0][3] == 1.0  # filled circles
        assert len(control.get_facecolors()) == 0 or control.get_facecolors()[0][3] == 0.0
        for kind, column in (("source", "induction_drop"), ("control", "control_induction_drop")):
            bar = collections[f"mean:{kind}:{model}"]
            np.testing.assert_allclose(bar.get_segments()[0][:, 1], rows[column].mean())
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "bar: mean over seeds" in labels
    caption = (REPO / "workflow" / "report" / "ablation.rst").read_text()
    assert "open blue squares" in caption and "filled orange circles" in caption.lower()


def test_functional_heads_titles_give_the_head_count(tmp_path: Path, heads) -> None:
    tables = functional.functional_tables(heads, 0.125, "token_lengths", multiple=2.0)
    fig = figures.plot_functional_heads(
        tables["functional_run_step"], tables["functional_size"], tmp_path / "f.png"
    )
    for ax in fig.axes:
        model = ax.get_title().split()[0]
        n_layers = int(heads.loc[heads["model"] == model, "n_layers"].iloc[0])
        n_heads = int(heads.loc[heads["model"] == model, "n_heads"].iloc[0])
        assert f"{n_layers} x {n_heads} = {n_layers * n_heads} heads" in ax.get_title()


def test_summary_table_restates_the_stats_tables(results, heads) -> None:
    table_f = functional.functional_tables(heads, 0.125, "token_lengths", multiple=2.0)[
        "functional_size"
    ]
    table_p = positional.positional_tables(heads, results["trajectories"], n_permutations=99)[
        "positional_size_step"
    ]
    relational_sizes = pd.DataFrame(
        {
            "model": ["syn-big", "syn-small"],
            "relation": ["expected_order"] * 2,
            "n_runs": [3, 3],
            "n_holds": [1, 3],
            "fraction": [1 / 3, 1.0],
            "ci_low": [0.06, 0.44],
            "ci_high": [0.79, 1.0],
        }
    )
    table = summary.summary_table(results["per_model"], table_f, table_p, relational_sizes)
    assert list(table.columns) == list(summary.SUMMARY_COLUMNS)
    assert table["model"].tolist() == ["syn-small", "syn-big"]  # by parameters
    per_seed = results["per_seed"]
    final = heads[heads["step"] == heads["step"].max()]
    for row in table.itertuples():
        seeds = per_seed[per_seed["model"] == row.model]
        # Brute force from the per-seed and per-head tables, not from the per-size ones.
        assert row.n_seeds == len(seeds)
        assert row.peak_mean == pytest.approx(seeds["peak"].mean())
        strongest = final[final["model"] == row.model].loc[
            lambda f: f.groupby("run")["one_back"].transform("max") == f["one_back"]
        ]
        has = final[final["model"] == row.model].groupby("run")["one_back"].max() > 0.25
        assert row.n_functional == has.sum() and row.functional_fraction == pytest.approx(
            has.mean()
        )
        layers = strongest["layer"].value_counts()
        assert row.modal_share == pytest.approx(layers.max() / len(seeds))
    assert table.set_index("model").at["syn-big", "n_expected_order"] == 1
    # Without the relational axis, its columns are NaN and the text says n/a.
    bare = summary.summary_table(results["per_model"], table_f, table_p)
    assert bare["expected_order_fraction"].isna().all()
    text = summary.summary_rst(bare, "syn", "one_back", 0.95, "results/syn/stats/")
    html = publish_parts(text, writer="html", settings_overrides={"halt_level": 2})["body"]
    assert html.count("<tr") == 1 + len(bare) and "results/syn/stats/" in html
    first = bare.iloc[0]
    assert f"{first.peak_mean:.3f} [{first.peak_ci_low:.3f}, {first.peak_ci_high:.3f}]" in html


def test_relational_figures_script_orders_runs_from_its_inputs(
    tmp_path: Path, heads: pd.DataFrame, monkeypatch
) -> None:
    """Rule `relational_figures` draws from its declared inputs only: the trajectories Parquet
    (which also gives the run order, size then seed) and the two CSVs."""
    one_back = trajectories(heads, "one_back")
    traj = pd.concat(
        [
            one_back,
            one_back.assign(metric="induction", value=one_back["value"] * 0.8),
            one_back.assign(metric="induction_control", value=0.01),
        ],
        ignore_index=True,
    )
    relational, configurational = synthetic_relational(heads)
    inputs = {
        "trajectories": str(tmp_path / "relational_trajectories.parquet"),
        "relational": str(tmp_path / "relational.csv"),
        "configurational": str(tmp_path / "configurational.csv"),
    }
    traj.to_parquet(inputs["trajectories"])
    relational.to_csv(inputs["relational"], index=False)
    configurational.to_csv(inputs["configurational"], index=False)
    names = ("relational_trajectories", "onset_lag", "ablation", "configurational")
    outputs = {name: str(tmp_path / f"{name}.png") for name in names}
    seen = {}
    draw = figures.plot_configurational

    def spy(table, path, runs=None, **kwargs):
        seen["runs"] = runs
        return draw(table, path, runs=runs, **kwargs)

    monkeypatch.setattr(figures, "plot_configurational", spy)
    load_script("relational_figures").main(
        SimpleNamespace(
            input=Namedlist(fromdict=inputs),
            output=Namedlist(fromdict=outputs),
            params=Namedlist(fromdict={"half_length": 8}),
            log=[str(tmp_path / "relational_figures.log")],
            rule="relational_figures",
        )
    )
    for path in outputs.values():
        check_png(Path(path))
    order = figures.run_order(seen["runs"])["run"].tolist()
    expected = heads.drop_duplicates("run").sort_values(["n_params", "model", "seed"])["run"]
    assert order == expected.tolist()
