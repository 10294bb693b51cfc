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
from PIL import Image
from snakemake.iocontainers import Namedlist

from mechgen import convergence, figures, functional, positional, stats
from mechgen.developmental import trajectories

REPO = Path(__file__).resolve().parent.parent
STEPS = (0, 1, 2, 4, 8, 16, 32)


def synthetic_heads(seeds: tuple[int, ...] = (1, 2, 3), seed: int = 0) -> pd.DataFrame:
    """Two sizes; in every run one head (layer and head index vary by seed) rises with training,
    the rest stay near the uniform level."""
    rng = np.random.default_rng(seed)
    rows = []
    for size, n_layers, n_heads, n_params in [
        ("small", 2, 2, 2_000_000),
        ("big", 3, 2, 20_000_000),
    ]:
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
    assert [ax.get_title().split(" ")[0] for ax in fig.axes] == ["syn-small", "syn-big"]
    for ax in fig.axes:
        model = ax.get_title().split(" ")[0]
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
        # Each point sits within 6% of its run's parameter count.
        ratio = np.sort(np.asarray(points)[:, 0]) / np.sort(
            finite["n_params"].to_numpy(dtype=float)
        )
        assert np.all(np.abs(ratio - 1) <= 0.06 + 1e-9)
        for row in per_model.itertuples():
            marker = lines_by_gid(ax)[f"mean:{row.model}"]
            assert marker.get_xdata()[0] == row.n_params
            assert marker.get_ydata()[0] == pytest.approx(getattr(row, f"{quantity}_mean"))
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
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert all("separation" in label for label in labels)


def test_functional_heads_figure(tmp_path: Path, heads: pd.DataFrame) -> None:
    tables = functional.functional_tables(heads, 0.125, "token_lengths", multiple=2.0)
    path = tmp_path / "functional_heads.png"
    counts, sizes = tables["functional_run_step"], tables["functional_size"]
    fig = figures.plot_functional_heads(counts, sizes, path)
    check_png(path)
    for ax in fig.axes:
        model = ax.get_title().split(" ")[0]
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


def render_caption(path: Path, config: dict, params: dict) -> str:
    """Render a caption as Snakemake's report does: jinja2, then docutils; docutils warnings
    (bad reStructuredText) raise."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    snakemake = SimpleNamespace(config=config, params=SimpleNamespace(**params))
    text = env.from_string(path.read_text()).render(snakemake=snakemake)
    return publish_parts(
        text, writer="html", settings_overrides={"halt_level": 2, "report_level": 5}
    )["body"]


def test_captions_render() -> None:
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
    workflow = render_caption(REPO / "workflow" / "report" / "workflow.rst", {"suite": "toy"}, {})
    assert "toy" in workflow and "one_back" in workflow


@pytest.mark.parametrize("name", ["analyze", "figures", "trajectories"])
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
    token_files: list[str],
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
        input=Namedlist(fromdict={**tables, "tokens": token_files}),
        output=Namedlist(fromdict=stats_paths),
        params=Namedlist(
            fromdict={
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
        input=Namedlist(fromdict={**tables, "tokens": token_files, **stats_paths}),
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

    from mechgen import developmental

    real_trajectories, real_mds = developmental.trajectories, convergence.mds_coordinates
    paths = run_scripts(
        tmp_path,
        heads,
        [],
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
    token_files = []
    for run in heads["run"].unique():
        path = tmp_path / f"{run}.json"
        path.write_text(json.dumps({"token_ids": [[1, 2, 3]] * 4}))  # baseline (1/2 + 1/3) / 2
        token_files.append(str(path))
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


def test_scripts_single_seed(tmp_path: Path) -> None:
    heads = synthetic_heads(seeds=(1,))
    paths = run_scripts(tmp_path, heads, token_files=[])
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
        run_scripts(tmp_path, heads, token_files=[])
