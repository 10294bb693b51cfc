"""Per-mechanism figures (mechgen.figures.mechanism_figures): what each panel draws equals a computation
from heads.parquet alone (the planted suite of crossmech_data), the figure is readable at one
paper column, its caption renders for every catalog mechanism, and the rule's script draws a
placeholder for a mechanism the suite did not score."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import jinja2
import numpy as np
import pandas as pd
import pytest
from crossmech_data import EVAL_LENGTHS, HALF_LENGTH, planted_heads
from docutils.core import publish_parts
from snakemake.iocontainers import Namedlist
from test_figures import check_png, lines_by_gid, readability_problems

from mechgen import mechanisms
from mechgen.axes.developmental import threshold_onset
from mechgen.figures import suite as figures
from mechgen.figures.mechanism_figures import plot_mechanism
from mechgen.mechanisms import NullContext
from mechgen.stats import crossmech

REPO = Path(__file__).resolve().parent.parent
NEVER = "syn-big-seed3"
ONE_BACK_NULL = float(np.mean(1 / np.arange(2, EVAL_LENGTHS[0] + 1)))


@pytest.fixture(scope="module")
def planted():
    heads = planted_heads(never=(NEVER,))
    context = NullContext(
        eval_lengths={run: EVAL_LENGTHS for run in heads["run"].unique()},
        settings={"half_length": HALF_LENGTH},
    )
    results, cross = crossmech.analyze_mechanisms(
        heads,
        [mechanisms.get("previous_token"), mechanisms.get("induction")],
        context,
        tokens_per_step=8,
        n_permutations=19,
    )
    return heads, results, cross


def draw(results, name: str, path: Path, width: float | None = None):
    tables = results[name].tables
    return plot_mechanism(
        name,
        tables["functional_run_step"],
        tables["functional_size"],
        tables["per_seed"],
        path,
        width=width,
    )


def test_previous_token_panels_equal_the_planted_heads(planted, tmp_path: Path) -> None:
    heads, results, _ = planted
    fig = draw(results, "previous_token", tmp_path / "previous_token.png")
    check_png(tmp_path / "previous_token.png")
    functional_ax, positional_ax, developmental_ax = fig.axes[:3]
    top = heads.groupby(["model", "run", "step"])["one_back"].max().reset_index()
    # Functional: per size x step, the fraction of runs whose best head is >= 2 x the null.
    expected = (
        top.assign(q=top["one_back"] >= 2 * ONE_BACK_NULL).groupby(["model", "step"])["q"].mean()
    )
    lines = lines_by_gid(functional_ax)
    for model in ("syn-small", "syn-big"):
        line = lines[f"fraction:{model}"]
        assert np.asarray(line.get_xdata()) == pytest.approx(
            expected.loc[model].index.to_numpy() + 1.0
        )
        assert np.asarray(line.get_ydata()) == pytest.approx(expected.loc[model].to_numpy())
    # Positional: the relative depth of each run's argmax head at the final step.
    final = heads[heads["step"] == heads["step"].max()]
    best = final.loc[final.groupby("run")["one_back"].idxmax()]
    depth = ((best["layer"] + 1) / best["n_layers"]).groupby(best["model"]).apply(sorted)
    for model in ("syn-small", "syn-big"):
        dots = next(
            c for c in positional_ax.collections if c.get_gid() == f"depth:{model}"
        ).get_offsets()
        assert sorted(np.asarray(dots)[:, 1]) == pytest.approx(depth.loc[model])
    # Developmental: the normalised max-over-heads line and its threshold onset, per run.
    lines = lines_by_gid(developmental_ax)
    for run, rows in top.groupby("run"):
        z = (rows["one_back"].to_numpy() - ONE_BACK_NULL) / (1 - ONE_BACK_NULL)
        assert np.asarray(lines[f"run:{run}"].get_ydata()) == pytest.approx(z, rel=1e-5)
        onset, _ = threshold_onset(rows["step"].to_numpy(), z)
        marker = lines[f"onset:{run}"]
        assert marker.get_xdata()[0] == pytest.approx(onset + 1, rel=1e-5)
        assert marker.get_ydata()[0] == pytest.approx(
            np.interp(np.log10(onset + 1), np.log10(rows["step"].to_numpy() + 1.0), z), rel=1e-5
        )
    assert lines["null"].get_ydata()[0] == 0 and lines["ceiling"].get_ydata()[0] == 1


def test_induction_not_formed_run_is_an_open_marker_and_the_ci_is_wilson(
    planted, tmp_path: Path
) -> None:
    from statsmodels.stats.proportion import proportion_confint

    _, results, _ = planted
    fig = draw(results, "induction", tmp_path / "induction.png")
    functional_ax, positional_ax, developmental_ax = fig.axes[:3]
    open_dots = next(
        c for c in positional_ax.collections if c.get_gid() == "depth_not_formed:syn-big"
    )
    assert len(open_dots.get_offsets()) == 1  # the run whose induction head never rises
    assert f"onset:{NEVER}" not in lines_by_gid(developmental_ax)
    # Big: 2 of 3 runs qualify at the end; the error bar spans the Wilson interval.
    segment = next(c for c in functional_ax.collections if c.get_gid() == "ci:syn-big")
    low, high = proportion_confint(2, 3, alpha=0.05, method="wilson")
    ys = np.asarray(segment.get_segments()[0])[:, 1]
    assert sorted(ys) == pytest.approx([low, high])


def test_readable_at_column_width(planted, tmp_path: Path) -> None:
    _, results, _ = planted
    for name in ("previous_token", "induction"):
        fig = draw(results, name, tmp_path / f"{name}.png", width=figures.COLUMN_WIDTH)
        assert readability_problems(fig, figures.COLUMN_WIDTH) == [], name


@pytest.mark.parametrize("name", mechanisms.names())
def test_caption_renders_for_every_mechanism(name: str) -> None:
    mechanism = mechanisms.get(name)
    params = {
        "mechanism": {
            "description": mechanism.description,
            "unit": mechanism.unit,
            "table": f"{mechanism.unit}s.parquet",
            "score_column": mechanism.score_column,
            "units": mechanism.units,
            "criterion": mechanism.criterion_text(),
            "ceiling": mechanism.ceiling,
        }
    }
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    text = env.from_string((REPO / "workflow" / "report" / "mechanism.rst").read_text()).render(
        snakemake=SimpleNamespace(
            config={"suite": "toy"},
            params=SimpleNamespace(**params),
            wildcards=SimpleNamespace(mechanism=name),
        )
    )
    html = publish_parts(
        text, writer="html", settings_overrides={"halt_level": 2, "report_level": 5}
    )["body"]
    assert f'<tt class="docutils literal">{name}</tt>' in html
    assert mechanism.units in html and len(html) > 1000
    assert f"{mechanism.unit}s.parquet" in html  # where the score is: heads or layers


def test_criterion_text_states_the_criterion() -> None:
    duplicate = mechanisms.get("duplicate_token")
    assert duplicate.criterion_text() == (
        "duplicate_token >= 2 x the null, and duplicate_token_control < 0.5 x the score, "
        "and not the step's strongest induction head"
    )
    assert mechanisms.get("previous_token").criterion_text() == "one_back >= 2 x the null"


def test_script_draws_a_placeholder_for_a_mechanism_not_scored(
    planted, tmp_path: Path, monkeypatch
) -> None:
    _, results, cross = planted
    spec = importlib.util.spec_from_file_location(
        "script_mechanism_figure", REPO / "scripts" / "mechanism_figure.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    drawn = []
    monkeypatch.setattr(
        module, "plot_mechanism", lambda *a, **k: drawn.append(plot_mechanism(*a, **k))
    )
    stats = tmp_path / "stats"
    stats.mkdir()
    profile = pd.concat(
        [
            cross["profile"],
            pd.DataFrame(
                [{"mechanism": "successor", "size": "all", "scored": False, "note": "no column"}]
            ),
        ]
    )
    profile.to_csv(stats / "profile.csv", index=False)
    empty = results["induction"].tables
    for table in ("functional_run_step", "functional_size", "per_seed"):
        empty[table].iloc[:0].to_csv(stats / f"{table}.csv", index=False)
    out = tmp_path / "figures" / "successor.png"
    module.main(
        SimpleNamespace(
            input=Namedlist(
                fromdict={
                    "run_step": str(stats / "functional_run_step.csv"),
                    "sizes": str(stats / "functional_size.csv"),
                    "per_seed": str(stats / "per_seed.csv"),
                    "profile": str(stats / "profile.csv"),
                }
            ),
            output=Namedlist(fromdict={"figure": str(out)}),
            wildcards=Namedlist(fromdict={"mechanism": "successor"}),
            log=[str(tmp_path / "log.txt")],
            rule="mechanism_figure",
        )
    )
    check_png(out)
    (message,) = [t.get_text() for t in drawn[0].axes[0].texts]
    assert message == "successor: not scored in this suite (no column)"
