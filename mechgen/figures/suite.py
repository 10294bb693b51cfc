"""Publication figures of a suite (matplotlib, Agg backend, 300-dpi PNG).

One function per figure; each takes DataFrames and an output path, saves the PNG and returns
the (closed) :class:`matplotlib.figure.Figure` so tests can inspect what was drawn. Sizes are
ordered by parameter count and coloured from the Okabe-Ito palette (distinguishable with the
common colour-vision deficiencies); continuous maps use viridis (perceptually uniform, readable
in greyscale), signed ones the diverging RdBu_r centred on 0. Artists that carry data have a
``gid``: ``run:<run id>`` for one run's line, ``mean`` for a mean over seeds, ``baseline`` for
the uniform-attention line, ``seeds`` for per-seed points, ``size:<model>`` for one size's
points.

Every function takes ``width``, the figure width in inches. Without it a figure is laid out
for the report (one row of panels); with it the panels wrap into as many columns as fit
:data:`MIN_PANEL_WIDTH`, so that at a single paper column (:data:`COLUMN_WIDTH`, 3.3 in) no
text is smaller than :data:`MIN_FONT_PT` points and no two labels overlap (tests/test_figures.py
checks both on the rendered text extents).

Training time is plotted as ``step + 1`` on a log axis (the reference study's ``step_modded``),
so the step-0 checkpoint sits at 1.

=============================  ==========================================================
figure                         function
=============================  ==========================================================
``trajectories``               :func:`plot_trajectories`
``layer_heatmap``              :func:`plot_layer_heatmap`
``size_effects``               :func:`plot_size_effects`
``correlation_matrix``         :func:`plot_correlation_matrix`
``mds``                        :func:`plot_mds`
``functional_heads``           :func:`plot_functional_heads`
``relational_trajectories``    :func:`plot_relational_trajectories`
``onset_lag``                  :func:`plot_onset_lags`
``ablation``                   :func:`plot_ablation`
``configurational``            :func:`plot_configurational`
``profile``                    :func:`plot_profile`
=============================  ==========================================================
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: the pipeline renders files only

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from mechgen.atomic import atomic_path
from mechgen.tables.heads import drop_nonfinite_heads
from mechgen.tables.summary import format_params

DPI = 300

OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
"""Okabe & Ito (2008) colour-blind-safe colours, the low-contrast yellow last."""
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
"""One marker per size, so sizes stay apart without colour."""

COLUMN_WIDTH = 3.3
"""A single column of a two-column paper, inches."""
MIN_FONT_PT = 6.0
"""The smallest text any figure draws, points (legible in print at 1:1)."""
MIN_PANEL_WIDTH = 1.55
"""The narrowest panel of a small-multiples figure when ``width`` is given, inches."""
TITLE_PT = 7.5
LABEL_PT = 7.0
TICK_PT = 6.5
LEGEND_PT = 6.5
"""Font sizes (points) of panel titles, axis labels, tick labels and legends."""

METRIC_UNITS = {
    "one_back": "attention weight",
    "self_attention": "attention weight",
    "first_token": "attention weight",
    "first_token_ref": "attention weight",
    "prev_self_ratio": "ratio",
    "prev_uniform_ratio": "one_back × L",
    "entropy": "nats",
    "mean_distance": "tokens",
    "clipped_distance": "tokens",
}
"""Unit of each per-head metric, for axis labels."""

STEP_AXIS_LABEL = "training step + 1 (optimiser steps, log scale)"


def metric_label(metric: str) -> str:
    """``"<metric> (<unit>)"`` for axis labels; unknown metrics get no unit."""
    unit = METRIC_UNITS.get(metric)
    return f"{metric} ({unit})" if unit else metric


def size_order(table: pd.DataFrame) -> list[str]:
    """The models of ``table`` ordered by ``n_params``, then name."""
    sizes = table[["model", "n_params"]].drop_duplicates("model")
    return sizes.sort_values(["n_params", "model"], kind="stable")["model"].tolist()


def run_order(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run of ``runs`` (``run, model, seed, n_params``), ordered by size
    (``n_params``, then model name), then seed: the run order of every run x run figure."""
    info = runs.drop_duplicates("run")[["run", "model", "seed", "n_params"]]
    return info.sort_values(["n_params", "model", "seed"], kind="stable").reset_index(drop=True)


def size_styles(models: list[str]) -> dict[str, tuple[str, str]]:
    """``{model: (colour, marker)}`` in the given order, cycling after eight sizes."""
    return {
        m: (OKABE_ITO[i % len(OKABE_ITO)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(models)
    }


def save_figure(fig: Figure, path: str | Path) -> Figure:
    # The temporary name hides the extension, so the format is named.
    with atomic_path(path) as tmp:
        fig.savefig(
            tmp, dpi=DPI, bbox_inches="tight", pad_inches=0.02, format=Path(path).suffix.lstrip(".")
        )
    plt.close(fig)
    return fig


def panel_grid(
    n: int,
    width: float | None,
    panel_height: float,
    default_panel_width: float = 3.4,
    sharey: bool = True,
    spare: int = 0,
) -> tuple[Figure, list[Axes], list[Axes]]:
    """A constrained-layout figure of ``n`` panels (plus ``spare`` empty slots for a legend).

    Without ``width``: one row of ``default_panel_width``-inch panels. With it: as many columns
    as fit panels at least :data:`MIN_PANEL_WIDTH` wide, rows as needed. Returns the figure,
    the ``n`` data axes (row-major) and the unused slots, blanked (axis off); ``spare`` only
    applies with ``width`` (a single row has the legend below it)."""
    slots = n + (spare if width is not None else 0)
    if width is None:
        ncols, width = slots, default_panel_width * slots
    else:
        ncols = max(1, min(slots, int(width // MIN_PANEL_WIDTH)))
    nrows = math.ceil(slots / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(width, panel_height * nrows + 0.5),
        sharey=sharey,
        squeeze=False,
        layout="constrained",
    )
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n], flat[n:]


def style_axes(ax: Axes) -> None:
    ax.tick_params(labelsize=TICK_PT, which="both")
    ax.grid(alpha=0.25, lw=0.5)


def _size_title(group: pd.DataFrame, model: str) -> str:
    return (
        f"{model}\n{format_params(float(group['n_params'].iloc[0]))} params, "
        f"{group['run'].nunique()} seeds"
    )


def figure_legend(fig: Figure, handles: list, spare: list[Axes] | None = None) -> None:
    """The figure's legend in a spare panel slot if there is one, else above the panels."""
    if spare:
        spare[0].legend(handles=handles, fontsize=LEGEND_PT, frameon=False, loc="center")
        return
    ncol = max(1, min(len(handles), int(fig.get_figwidth() // 1.6)))
    fig.legend(
        handles=handles, loc="outside upper center", ncol=ncol, fontsize=LEGEND_PT, frameon=False
    )


def placeholder_figure(path: str | Path, message: str, width: float | None = None) -> Figure:
    """A figure that says why the real one could not be drawn (e.g. a single run has no
    cross-run correlations), so the pipeline still has its output and the report says why."""
    fig, ax = plt.subplots(figsize=(width or 6, 1.6))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=8, gid="message")
    return save_figure(fig, path)


def plot_trajectories(
    trajectories: pd.DataFrame,
    path: str | Path,
    metric: str,
    baseline: float | None = None,
    width: float | None = None,
) -> Figure:
    """Figure 1: the max-over-heads trajectory of every run, one panel per size.

    ``trajectories`` has one row per run x step with ``model, run, seed, step, n_params, value``
    (:func:`mechgen.axes.developmental.trajectories`). Thin lines: one per seed; bold: the mean over
    seeds at each step (over the seeds that have it); dashed: ``baseline`` (the metric under
    uniform attention) when given. x: step + 1, log scale; y: ``metric`` in its unit.
    """
    models = size_order(trajectories)
    styles = size_styles(models)
    fig, axes, spare = panel_grid(len(models), width, 2.3)
    for ax, model in zip(axes, models):
        colour = styles[model][0]
        group = trajectories[trajectories["model"] == model]
        for run, run_rows in group.sort_values(["seed", "step"]).groupby("run", sort=False):
            ax.plot(
                run_rows["step"] + 1,
                run_rows["value"],
                color=colour,
                lw=0.7,
                alpha=0.55,
                gid=f"run:{run}",
            )
        mean = group.groupby("step")["value"].mean()
        ax.plot(mean.index + 1, mean.to_numpy(), color=colour, lw=2.0, gid="mean")
        if baseline is not None:
            ax.axhline(baseline, color="0.35", ls="--", lw=1.0, gid="baseline")
        ax.set_xscale("log")
        ax.set_title(_size_title(group, model), fontsize=TITLE_PT)
        style_axes(ax)
    fig.supxlabel(STEP_AXIS_LABEL, fontsize=LABEL_PT)
    fig.supylabel(f"max over heads of {metric_label(metric)}", fontsize=LABEL_PT)
    handles = [
        Line2D([], [], color="0.3", lw=0.7, alpha=0.7, label="one seed"),
        Line2D([], [], color="0.3", lw=2.0, label="mean over seeds"),
    ]
    if baseline is not None:
        handles.append(
            Line2D(
                [], [], color="0.35", ls="--", lw=1.0, label=f"uniform attention ({baseline:.3f})"
            )
        )
    figure_legend(fig, handles, spare)
    return save_figure(fig, path)


def layer_max_matrices(
    heads: pd.DataFrame, metric: str, step: int | None = None
) -> dict[str, pd.DataFrame]:
    """Per model: a seed x layer matrix of the max ``metric`` over the heads of each layer.

    At ``step``, or (default) at each run's last step. Non-finite or flagged heads are left
    out (a layer with none left is NaN). Rows are seeds (sorted), columns layers 0..n_layers-1.
    """
    usable = drop_nonfinite_heads(heads, metric)
    if step is None:
        at_step = usable[usable["step"] == usable.groupby("run")["step"].transform("max")]
    else:
        at_step = usable[usable["step"] == step]
    matrices = {}
    for model in size_order(heads):
        group = at_step[at_step["model"] == model]
        if group.empty:
            continue
        n_layers = int(heads.loc[heads["model"] == model, "n_layers"].iloc[0])
        matrix = group.pivot_table(index="seed", columns="layer", values=metric, aggfunc="max")
        matrices[model] = matrix.reindex(columns=range(n_layers)).sort_index()
    return matrices


LAYER_CELL_WIDTH = 0.12
"""The narrowest layer column of the layer heatmap, inches: a row of panels narrower than
this per layer (or with a panel under 3/4 of :data:`MIN_PANEL_WIDTH`) is stacked into one
column of panels instead."""


def plot_layer_heatmap(
    heads: pd.DataFrame,
    path: str | Path,
    metric: str,
    step: int | None = None,
    positional: pd.DataFrame | None = None,
    width: float | None = None,
) -> Figure:
    """Figure 2: seed x layer heatmaps of the max ``metric`` per layer, one panel per size.

    Cells: :func:`layer_max_matrices` (each run's final step unless ``step`` is given), on one
    colour scale for all panels; a star marks each seed's strongest layer. With ``positional``
    (``positional_size_step.csv``), each panel's title gives the cross-seed modal share of that
    layer and its permutation p-value at the final step. With ``width`` too narrow for one row of
    panels (:data:`LAYER_CELL_WIDTH` per layer), the panels are stacked.
    """
    agreement = {}
    if positional is not None and step is None:
        final = positional[positional["is_final_step"].astype(bool)]
        agreement = final.set_index("model")[["modal_share", "p_value"]].to_dict("index")
    matrices = layer_max_matrices(heads, metric, step)
    if not matrices:
        raise ValueError(f"no finite {metric} scores at step {step}")
    values = np.concatenate([m.to_numpy().ravel() for m in matrices.values()])
    vmin, vmax = float(np.nanmin(values)), float(np.nanmax(values))
    widths = [max(m.shape[1], 2) for m in matrices.values()]
    max_seeds = max(len(m) for m in matrices.values())
    row_height = 0.75 + 0.13 * max_seeds
    if width is None:
        width = 1.2 + 0.35 * sum(widths) + 0.8 * len(matrices)
        stacked = False
    else:
        # Stack when a row would make a panel too narrow for its title or its layer columns.
        usable = width - 1.2
        stacked = usable * min(widths) / sum(
            widths
        ) < MIN_PANEL_WIDTH * 0.75 or usable < LAYER_CELL_WIDTH * sum(widths)
    nrows, ncols = (len(matrices), 1) if stacked else (1, len(matrices))
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(width, 0.4 + row_height * nrows),
        gridspec_kw=None if stacked else {"width_ratios": widths},
        squeeze=False,
        layout="constrained",
    )
    axes = list(axes.ravel())
    image = None
    for ax, (model, matrix) in zip(axes, matrices.items()):
        image = ax.imshow(
            matrix.to_numpy(),
            aspect="auto",
            cmap="viridis",
            vmin=vmin,
            vmax=vmax,
            interpolation="nearest",
        )
        data = matrix.to_numpy()
        rows = np.flatnonzero(np.isfinite(data).any(axis=1))
        strongest = np.array([np.nanargmax(data[r]) for r in rows], dtype=int)
        ax.scatter(
            strongest,
            rows,
            marker="*",
            s=30,
            facecolors="white",
            edgecolors="black",
            linewidths=0.5,
            gid="argmax",
        )
        # Integer layer ticks, thinned so the labels never collide.
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, nbins="auto"))
        ax.yaxis.set_major_locator(ticker.FixedLocator(range(len(matrix))))
        ax.set_yticklabels([str(seed) for seed in matrix.index])
        ax.tick_params(labelsize=TICK_PT)
        ax.set_ylabel("seed", fontsize=LABEL_PT)
        title = model
        if model in agreement and np.isfinite(agreement[model]["p_value"]):
            title += (
                f"\nmodal share {agreement[model]['modal_share']:.2f}, "
                f"p = {agreement[model]['p_value']:.2g}"
            )
        ax.set_title(title, fontsize=TITLE_PT)
    if stacked:  # the colour bar is below: the label goes with the last panel, above it
        axes[-1].set_xlabel("layer (0 = first)", fontsize=LABEL_PT)
    else:
        fig.supxlabel("layer (0 = first)", fontsize=LABEL_PT)
    colourbar = fig.colorbar(
        image, ax=axes, location="bottom" if stacked else "right", shrink=0.9, aspect=30
    )
    colourbar.ax.tick_params(labelsize=TICK_PT)
    where = "final step" if step is None else f"step {step}"
    colourbar.set_label(
        f"max over the layer's heads\n{metric_label(metric)}, {where}", fontsize=LABEL_PT
    )
    return save_figure(fig, path)


SIZE_EFFECT_QUANTITIES = {
    "peak": "peak of the trajectory",
    "slope": "slope",
    "onset_step": "onset",
}
"""Per-seed quantities of :func:`plot_size_effects` and their axis names."""

SEED_STRIP_DECADES = (-0.22, -0.09)
"""Where :func:`plot_size_effects` draws a size's seeds: spread evenly between these offsets
(decades of parameters) left of the size, so the mean and its whiskers at the size itself
never cover them."""


def seed_strip_x(n_params: float, n: int) -> np.ndarray:
    """x positions of ``n`` seeds of a size with ``n_params`` parameters:
    ``n_params * 10**o`` for ``o`` evenly spaced over :data:`SEED_STRIP_DECADES`."""
    low, high = SEED_STRIP_DECADES
    offsets = np.linspace(low, high, n) if n > 1 else np.array([(low + high) / 2])
    return n_params * 10.0**offsets


def plot_size_effects(
    per_seed: pd.DataFrame,
    per_model: pd.DataFrame,
    path: str | Path,
    metric: str,
    width: float | None = None,
) -> Figure:
    """Figure 3: peak, slope and onset of every run against model size.

    ``per_seed`` (:func:`mechgen.axes.developmental.per_seed_summary`): one point per run, in a
    strip just left of its size (:func:`seed_strip_x`, in seed order); ``per_model``
    (:func:`mechgen.stats.analysis.per_model_summary`): the per-size mean with its bootstrap CI
    (``<q>_mean``, ``<q>_ci_low``, ``<q>_ci_high``) at the size's ``n_params``. x: parameters,
    log scale. Onset is on a log scale (optimiser steps) when every onset is positive.
    """
    models = size_order(per_seed)
    styles = size_styles(models)
    fig, axes, spare = panel_grid(
        len(SIZE_EFFECT_QUANTITIES), width, 2.2, default_panel_width=3.5, sharey=False, spare=1
    )
    units = {
        "peak": metric_label(metric),
        "slope": f"{METRIC_UNITS.get(metric, metric)}\nper decade of step + 1",
        "onset_step": "optimiser steps",
    }
    summary = per_model.set_index("model")
    sizes_n_params = sorted(per_seed["n_params"].astype(float).unique())
    for ax, (quantity, name) in zip(axes, SIZE_EFFECT_QUANTITIES.items()):
        xs, ys = [], []
        for model in models:
            group = per_seed[per_seed["model"] == model].sort_values("seed")
            values = group[quantity].to_numpy(dtype=float)
            keep = np.isfinite(values)
            x = seed_strip_x(float(group["n_params"].iloc[0]), len(group))
            xs.append(x[keep])
            ys.append(values[keep])
        colours = [styles[m][0] for m, x in zip(models, xs) for _ in x]
        ax.scatter(
            np.concatenate(xs),
            np.concatenate(ys),
            s=9,
            c=colours,
            alpha=0.75,
            linewidths=0,
            zorder=3,
            gid="seeds",
        )
        for model in models:
            if model not in summary.index:
                continue
            row = summary.loc[model]
            mean, low, high = (float(row[f"{quantity}_{k}"]) for k in ("mean", "ci_low", "ci_high"))
            if not np.isfinite(mean):
                continue
            yerr = None
            if np.isfinite(low) and np.isfinite(high):
                yerr = [[mean - low], [high - mean]]
            container = ax.errorbar(
                [float(row["n_params"])],
                [mean],
                yerr=yerr,
                fmt=styles[model][1],
                color=styles[model][0],
                markeredgecolor="black",
                markeredgewidth=0.5,
                ms=4.5,
                capsize=2,
                lw=1.0,
            )
            container.lines[0].set_gid(f"mean:{model}")
        ax.set_xscale("log")
        # One labelled tick per size (14.1M, 70.4M, ...) instead of crowded minor labels.
        ax.set_xticks(sizes_n_params, [format_params(n) for n in sizes_n_params])
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlim(sizes_n_params[0] / 2.0, sizes_n_params[-1] * 1.5)
        if quantity == "onset_step" and np.concatenate(ys).size and (np.concatenate(ys) > 0).all():
            ax.set_yscale("log")
            # Plain numbers at 1, 2, 5 x 10^k (30, 200) rather than 3 x 10^1 on a log axis.
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            units[quantity] += ", log"
        ax.set_xlabel("parameters (log scale)", fontsize=LABEL_PT)
        ax.set_ylabel(f"{name}\n({units[quantity]})", fontsize=LABEL_PT)
        style_axes(ax)
        if len(sizes_n_params) > 3:
            ax.tick_params(axis="x", labelrotation=45)
    handles = [
        Line2D(
            [],
            [],
            ls="",
            marker=styles[m][1],
            color=styles[m][0],
            markeredgecolor="black",
            ms=4.5,
            label=m,
        )
        for m in models
    ]
    handles += [
        Line2D([], [], ls="", marker="o", color="0.4", alpha=0.75, ms=3, label="one seed"),
        Line2D([], [], color="0.4", marker="|", ms=8, ls="", label="mean, CI"),
    ]
    figure_legend(fig, handles, spare)
    return save_figure(fig, path)


def correlation_from_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """The (run x run) Pearson r matrix from the long table of ordered pairs (``run1, run2, cor``;
    :func:`mechgen.axes.convergence.pairwise_correlations`), with 1 on the diagonal."""
    matrix = pairs.pivot(index="run1", columns="run2", values="cor")
    runs = sorted(set(matrix.index) | set(matrix.columns))
    values = matrix.reindex(index=runs, columns=runs).to_numpy(dtype=float, copy=True)
    np.fill_diagonal(values, 1.0)
    return pd.DataFrame(values, index=runs, columns=runs)


def _label_runs(ax: Axes, info: pd.DataFrame, axis_inches: float, x: bool, y: bool) -> None:
    """Tick labels of a run x run matrix (runs in ``info`` order): one per run
    (``<model> s<seed>``) when they fit at :data:`TICK_PT` along ``axis_inches``, else one per
    size at the centre of its block; white lines separate sizes."""
    models = info["model"].to_numpy()
    n = len(info)
    per_run = n * TICK_PT * 1.2 <= axis_inches * 72
    if per_run:
        positions = list(range(n))
        labels = [f"{m} s{s}" for m, s in zip(info["model"], info["seed"])]
    else:
        starts = np.r_[0, np.flatnonzero(models[1:] != models[:-1]) + 1]
        ends = np.r_[starts[1:], n]
        positions = list((starts + ends - 1) / 2)
        labels = [str(models[s]) for s in starts]
    if x:
        ax.set_xticks(positions, labels, rotation=90)
    else:
        ax.set_xticks([])
    if y:
        ax.set_yticks(positions, labels)
    else:
        ax.set_yticks([])
    ax.tick_params(labelsize=TICK_PT, length=2 if per_run else 0)
    for edge in np.flatnonzero(models[1:] != models[:-1]) + 0.5:
        ax.axhline(edge, color="white", lw=1.0)
        ax.axvline(edge, color="white", lw=1.0)


CORRELATION_RANGE = (-1.0, 1.0)
"""The fixed colour range of the correlation matrix: all a Pearson r can be, so the colour of
a cell means the same r in every suite and small differences near 1 are not stretched."""


def plot_correlation_matrix(
    corr: pd.DataFrame, runs: pd.DataFrame, path: str | Path, width: float | None = None
) -> Figure:
    """Figure 4: the Pearson r between every two runs' trajectories, runs ordered by size, then seed.

    ``corr``: a square (run x run) DataFrame; ``runs``: one row per run with ``run, model,
    seed, n_params``. White lines separate sizes. Colour: RdBu_r on the fixed range
    :data:`CORRELATION_RANGE`; the title gives the range of the off-diagonal r.
    """
    info = run_order(runs[runs["run"].isin(corr.index)])
    order = info["run"].tolist()
    matrix = corr.loc[order, order].to_numpy(dtype=float)
    off_diagonal = matrix[~np.eye(len(order), dtype=bool)]
    side = width if width is not None else min(8.0, 3.0 + 0.16 * len(order))
    fig, ax = plt.subplots(figsize=(side, side * 0.95), layout="constrained")
    image = ax.imshow(
        matrix,
        cmap="RdBu_r",
        vmin=CORRELATION_RANGE[0],
        vmax=CORRELATION_RANGE[1],
        interpolation="nearest",
    )
    _label_runs(ax, info, side * 0.6, x=True, y=True)
    finite = off_diagonal[np.isfinite(off_diagonal)]
    if finite.size:
        ax.set_title(
            f"off-diagonal r from {finite.min():.2f} to {finite.max():.2f}", fontsize=TITLE_PT
        )
    colourbar = fig.colorbar(image, ax=ax, shrink=0.8, aspect=25)
    colourbar.ax.tick_params(labelsize=TICK_PT)
    colourbar.set_label("Pearson r of the\nmax-over-heads trajectories", fontsize=LABEL_PT)
    return save_figure(fig, path)


def plot_mds(
    coords: pd.DataFrame,
    path: str | Path,
    per_model: pd.DataFrame | None = None,
    width: float | None = None,
) -> Figure:
    """Figure 5: classical MDS of the runs on 1 - r, coloured (and marked) by size.

    ``coords``: one row per run with ``model, n_params, mds1, mds2``
    (:func:`mechgen.axes.convergence.mds_coordinates`). With ``per_model`` holding
    ``mds_separation``, the legend gives each size's separation ratio.
    """
    models = size_order(coords)
    styles = size_styles(models)
    separation = {}
    if per_model is not None and "mds_separation" in per_model.columns:
        separation = per_model.set_index("model")["mds_separation"].to_dict()
    width = width if width is not None else 4.6
    fig, ax = plt.subplots(figsize=(width, width * 0.95), layout="constrained")
    for model in models:
        group = coords[coords["model"] == model]
        label = model
        if np.isfinite(separation.get(model, np.nan)):
            label += f" (separation {separation[model]:.2f})"
        colour, marker = styles[model]
        ax.scatter(
            group["mds1"],
            group["mds2"],
            color=colour,
            marker=marker,
            s=22,
            alpha=0.85,
            edgecolors="black",
            linewidths=0.4,
            label=label,
            gid=f"size:{model}",
        )
    ax.axhline(0, color="0.8", lw=0.5, zorder=0)
    ax.axvline(0, color="0.8", lw=0.5, zorder=0)
    # Equal scales: distances on the page are the MDS distances the separation ratios use.
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("MDS dimension 1 (units of 1 - r)", fontsize=LABEL_PT)
    ax.set_ylabel("MDS dimension 2 (units of 1 - r)", fontsize=LABEL_PT)
    style_axes(ax)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=5))
    fig.legend(
        loc="outside lower center",
        ncol=1 if width < 4 else 2,
        fontsize=LEGEND_PT,
        frameon=False,
    )
    return save_figure(fig, path)


def plot_functional_heads(
    counts: pd.DataFrame, sizes: pd.DataFrame, path: str | Path, width: float | None = None
) -> Figure:
    """Figure 6: heads meeting the 1-back criterion over training, one panel per size.

    ``counts`` (``functional_run_step.csv``) gives one line per run (count of heads vs
    step + 1, log x), ``sizes`` (``functional_size.csv``) the fraction of seeds with such a head
    at the final step (panel title); see :func:`mechgen.axes.functional.functional_tables`. The
    panel title also gives the size's heads, ``n_layers`` x ``n_heads``, the count's ceiling.
    """
    sizes = sizes.set_index("model")
    models = size_order(counts)
    styles = size_styles(models)
    # Own y range per size: the sizes' head counts differ by an order of magnitude.
    fig, axes, spare = panel_grid(len(models), width, 2.4, sharey=False)
    for ax, model in zip(axes, models):
        colour = styles[model][0]
        group = counts[counts["model"] == model]
        for run, run_rows in group.sort_values(["seed", "step"]).groupby("run", sort=False):
            ax.plot(
                run_rows["step"].to_numpy(dtype=float) + 1,
                run_rows["n_functional"].to_numpy(dtype=float),
                color=colour,
                lw=0.8,
                alpha=0.6,
                marker="o",
                ms=2,
                gid=f"run:{run}",
            )
        mean = group.groupby("step")["n_functional"].mean()
        ax.plot(
            mean.index.to_numpy(dtype=float) + 1,
            mean.to_numpy(dtype=float),
            color=colour,
            lw=2.0,
            gid="mean",
        )
        n_layers, n_heads = int(group["n_layers"].iloc[0]), int(group["n_heads"].iloc[0])
        title = f"{model}\n{n_layers} x {n_heads} = {n_layers * n_heads} heads"
        if model in sizes.index:
            row = sizes.loc[model]
            title += (
                f"\nat end: {int(row['n_runs_functional'])}/{int(row['n_runs'])} seeds"
                f"\n(CI {row['ci_low']:.2f}-{row['ci_high']:.2f})"
            )
        ax.set_title(title, fontsize=TITLE_PT)
        ax.set_xscale("log")
        ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        style_axes(ax)
    first = counts.iloc[0]
    fig.supxlabel(STEP_AXIS_LABEL, fontsize=LABEL_PT)
    fig.supylabel(
        f"heads with one_back > {first['multiple']:g} x uniform ({first['threshold']:.3f})",
        fontsize=LABEL_PT,
    )
    figure_legend(
        fig,
        [
            Line2D([], [], color="0.3", lw=0.8, alpha=0.7, marker="o", ms=2, label="one seed"),
            Line2D([], [], color="0.3", lw=2.0, label="mean over seeds"),
        ],
        spare,
    )
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Relational and configurational axes (mechgen.scoring.circuit)


def plot_relational_trajectories(
    one_back: pd.DataFrame,
    induction: pd.DataFrame,
    path: str | Path,
    induction_baseline: float | None = None,
    control: pd.DataFrame | None = None,
    width: float | None = None,
) -> Figure:
    """The max-over-heads one_back and induction trajectories overlaid, one panel per size.

    ``one_back``/``induction``: trajectories tables (:func:`mechgen.axes.developmental.trajectories`
    of each metric). Thin lines: one per seed (solid: one_back, dashed: induction); bold: the
    mean over seeds; dotted grey: the induction score of uniform attention. ``control``: the
    trajectories of ``induction_control`` (the same positions on non-repeating sequences),
    drawn dash-dotted in grey as the mean over seeds (gid ``mean:induction_control``): an
    induction curve that this control follows is a fixed-offset head, not content matching.
    Artists: gid ``run:<run>:one_back`` / ``run:<run>:induction``, ``mean:one_back`` /
    ``mean:induction``, ``baseline``. y: attention weight.
    """
    models = size_order(one_back)
    fig, axes, spare = panel_grid(len(models), width, 2.3)
    styles = {"one_back": (OKABE_ITO[0], "-"), "induction": (OKABE_ITO[1], "--")}
    for ax, model in zip(axes, models):
        for metric, table in (("one_back", one_back), ("induction", induction)):
            colour, dash = styles[metric]
            group = table[table["model"] == model]
            for run, rows in group.sort_values(["seed", "step"]).groupby("run", sort=False):
                ax.plot(
                    rows["step"] + 1,
                    rows["value"],
                    color=colour,
                    ls=dash,
                    lw=0.7,
                    alpha=0.5,
                    gid=f"run:{run}:{metric}",
                )
            mean = group.groupby("step")["value"].mean()
            ax.plot(
                mean.index + 1, mean.to_numpy(), color=colour, ls=dash, lw=2.0, gid=f"mean:{metric}"
            )
        if control is not None and not control.empty:
            mean = control[control["model"] == model].groupby("step")["value"].mean()
            ax.plot(
                mean.index + 1,
                mean.to_numpy(),
                color="0.45",
                ls="-.",
                lw=1.2,
                gid="mean:induction_control",
            )
        if induction_baseline is not None:
            ax.axhline(induction_baseline, color="0.4", ls=":", lw=1.0, gid="baseline")
        ax.set_xscale("log")
        ax.set_title(_size_title(one_back[one_back["model"] == model], model), fontsize=TITLE_PT)
        style_axes(ax)
    fig.supxlabel(STEP_AXIS_LABEL, fontsize=LABEL_PT)
    fig.supylabel("max over heads (attention weight)", fontsize=LABEL_PT)
    handles = [
        Line2D([], [], color=OKABE_ITO[0], lw=2.0, label="one_back (eval text)"),
        Line2D([], [], color=OKABE_ITO[1], ls="--", lw=2.0, label="induction ([random] x 2)"),
        Line2D([], [], color="0.3", lw=0.7, alpha=0.6, label="thin: one seed; bold: mean"),
    ]
    if control is not None and not control.empty:
        handles.append(
            Line2D([], [], color="0.45", ls="-.", lw=1.2, label="induction, no repeat (control)")
        )
    if induction_baseline is not None:
        handles.append(
            Line2D(
                [], [], color="0.4", ls=":", label=f"uniform induction ({induction_baseline:.3f})"
            )
        )
    figure_legend(fig, handles, spare)
    return save_figure(fig, path)


def _per_size_strip(
    ax: Axes,
    table: pd.DataFrame,
    column: str,
    models: list[str],
    offset: float,
    colour: str,
    marker: str,
    gid: str,
    filled: bool = True,
) -> None:
    """Per size ``x``: the finite values of ``column`` as points (gid ``<gid>:<model>``; open
    markers unless ``filled``) at ``x + offset``, and their mean as a bar (gid
    ``mean:<gid>:<model>``)."""
    for x, model in enumerate(models):
        values = table.loc[table["model"] == model, column].astype(float).to_numpy()
        values = values[np.isfinite(values)]
        if not len(values):
            continue
        jitter = np.linspace(-0.08, 0.08, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(
            np.full(len(values), x + offset) + jitter,
            values,
            facecolors=colour if filled else "none",
            edgecolors=colour,
            marker=marker,
            s=16,
            linewidths=0.9,
            zorder=3,
            gid=f"{gid}:{model}",
        )
        bar = ax.hlines(
            values.mean(), x + offset - 0.15, x + offset + 0.15, color=colour, lw=1.8, zorder=4
        )
        bar.set_gid(f"mean:{gid}:{model}")


def _size_axis(ax: Axes, models: list[str], width: float) -> None:
    """Sizes as categorical x ticks, slanted when their names would collide."""
    slot_pt = width * 72 * 0.8 / max(len(models), 1)
    longest_pt = max(len(m) for m in models) * TICK_PT * 0.6
    ax.set_xticks(range(len(models)), models)
    if longest_pt > slot_pt:
        ax.tick_params(axis="x", labelrotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    ax.set_xlim(-0.6, len(models) - 0.4)


def plot_onset_lags(
    relational: pd.DataFrame, path: str | Path, width: float | None = None
) -> Figure:
    """Onset lag (induction onset - 1-back onset, steps) per run, one column per size.

    Points: one per seed (gid ``seeds:<model>``); bar: the mean; dashed line at 0 (positive =
    the induction head forms after the 1-back head). Runs without both onsets are left out
    and counted in the title.
    """
    models = size_order(relational)
    width = width if width is not None else 1.6 + 1.3 * len(models)
    fig, ax = plt.subplots(figsize=(width, 2.6), layout="constrained")
    _per_size_strip(ax, relational, "lag_steps", models, 0.0, OKABE_ITO[0], "o", "seeds")
    ax.axhline(0, color="0.35", ls="--", lw=1.0, gid="zero")
    _size_axis(ax, models, width)
    ax.set_ylabel("onset lag, induction - one_back\n(optimiser steps)", fontsize=LABEL_PT)
    n_missing = int((~np.isfinite(relational["lag_steps"].astype(float))).sum())
    ax.set_title(
        f"Onset lag per seed; bar: mean\n({n_missing} run(s) without both onsets)",
        fontsize=TITLE_PT,
    )
    style_axes(ax)
    ax.grid(False, axis="x")
    return save_figure(fig, path)


def plot_ablation(relational: pd.DataFrame, path: str | Path, width: float | None = None) -> Figure:
    """Induction drop of the target head when the 1-back head vs a same-layer control head is
    mean-ablated, per run (points) and size (columns).

    Filled circles: ablating the strongest 1-back head (gid ``source:<model>``); open squares:
    the control (gid ``control:<model>``); horizontal bars: the mean over seeds of each (gid
    ``mean:source:<model>``, ``mean:control:<model>``). y: drop in the target's induction score
    (attention weight; positive = induction falls).
    """
    models = size_order(relational)
    width = width if width is not None else 1.6 + 1.5 * len(models)
    fig, ax = plt.subplots(figsize=(width, 2.8), layout="constrained")
    source_colour, control_colour = OKABE_ITO[1], OKABE_ITO[0]
    _per_size_strip(ax, relational, "induction_drop", models, -0.18, source_colour, "o", "source")
    _per_size_strip(
        ax,
        relational,
        "control_induction_drop",
        models,
        0.18,
        control_colour,
        "s",
        "control",
        filled=False,
    )
    ax.axhline(0, color="0.35", ls="--", lw=1.0)
    _size_axis(ax, models, width)
    ax.set_ylabel("drop in the induction head's score\n(attention weight)", fontsize=LABEL_PT)
    fig.legend(
        handles=[
            Line2D(
                [], [], color=source_colour, marker="o", ms=4, ls="", label="ablate 1-back head"
            ),
            Line2D(
                [],
                [],
                color=control_colour,
                marker="s",
                ms=4,
                mfc="none",
                ls="",
                label="ablate same-layer control",
            ),
            Line2D([], [], color="0.3", lw=1.8, label="bar: mean over seeds"),
        ],
        loc="outside lower center",
        ncol=1 if width < 4 else 3,
        fontsize=LEGEND_PT,
        frameon=False,
    )
    style_axes(ax)
    ax.grid(False, axis="x")
    return save_figure(fig, path)


CONFIGURATIONAL_PANELS = (
    ("qk_spectrum", "W_QK spectrum\n(cosine)"),
    ("profile", "offset profile\n(Pearson r)"),
    ("cka", "output CKA\n(linear)"),
)
"""The signatures of :func:`plot_configurational`: column prefix and panel title."""

Z_LIMIT = 4.0
"""The colour scale of :func:`plot_configurational` runs over z in [-Z_LIMIT, Z_LIMIT] in
every panel and suite; larger |z| take the end colours (the colour bar's arrows)."""


def configurational_matrices(
    configurational: pd.DataFrame, order: list[str], name: str
) -> tuple[np.ndarray, np.ndarray]:
    """For signature ``name``: the run x run matrices (rows A, columns B, in ``order``) of z
    = (observed - null mean) / null SD (``<name>_z``) and of the one-sided permutation p
    (``<name>_p``); NaN where the table has no value (the diagonal, a missing CKA)."""
    index = {run: i for i, run in enumerate(order)}
    n = len(order)
    z = np.full((n, n), np.nan)
    p = np.full((n, n), np.nan)
    for row in configurational.itertuples():
        if row.run_a in index and row.run_b in index:
            i, j = index[row.run_a], index[row.run_b]
            z[i, j] = getattr(row, f"{name}_z")
            p[i, j] = getattr(row, f"{name}_p")
    return z, p


def plot_configurational(
    configurational: pd.DataFrame,
    path: str | Path,
    runs: pd.DataFrame | None = None,
    width: float | None = None,
) -> Figure:
    """Run x run contrast of the strongest 1-back heads with their nulls, one panel per
    signature (:data:`CONFIGURATIONAL_PANELS`).

    Cell (A, B): z of the similarity of A's strongest head with B's against its null
    (:func:`configurational_matrices`), on one colour scale for all panels, RdBu_r over
    [-:data:`Z_LIMIT`, :data:`Z_LIMIT`] (0 = no more alike than the null; grey: no value).
    A dot marks one-sided permutation p < 0.05 (gid ``significant``). Runs are ordered by size
    then seed (:func:`run_order` of ``runs``, one row per run with ``run, model, seed,
    n_params``; without it, of the table's ``model_a``/``seed_a`` by name).
    """
    table = configurational
    if runs is None:
        runs = (
            table[["run_a", "model_a", "seed_a"]]
            .drop_duplicates("run_a")
            .set_axis(["run", "model", "seed"], axis=1)
            .assign(n_params=0)
        )
    present = set(table["run_a"]) | set(table["run_b"])
    info = run_order(runs[runs["run"].isin(present)])
    order = info["run"].tolist()
    width = width if width is not None else 7.5
    n_panels = len(CONFIGURATIONAL_PANELS)
    # Each panel's share of the width left by the run labels and the colour bar's margins;
    # when the smallest size's block of runs is then too small for its label, the panels are
    # stacked at full width instead of side by side.
    panel_inches = (width - 1.7) / n_panels
    smallest_block = info.groupby("model").size().min()
    stacked = smallest_block * panel_inches * 72 / len(info) < TICK_PT * 1.3
    if stacked:
        panel_inches = min(width - 1.5, 2.6)
        shape, figsize = (n_panels, 1), (width, n_panels * (panel_inches + 0.45) + 1.3)
    else:
        shape, figsize = (1, n_panels), (width, panel_inches + 2.2)
    fig, axes = plt.subplots(*shape, figsize=figsize, layout="constrained", squeeze=False)
    axes = list(axes.ravel())
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.85")
    image = None
    for k, (ax, (name, label)) in enumerate(zip(axes, CONFIGURATIONAL_PANELS)):
        z, p = configurational_matrices(table, order, name)
        image = ax.imshow(
            np.ma.masked_invalid(z), cmap=cmap, vmin=-Z_LIMIT, vmax=Z_LIMIT, interpolation="nearest"
        )
        rows, cols = np.nonzero(np.isfinite(p) & (p < 0.05))
        ax.scatter(
            cols,
            rows,
            s=max(2.0, min(12.0, (panel_inches * 72 / max(len(order), 1)) ** 2 / 6)),
            c="black",
            marker="o",
            linewidths=0,
            gid="significant",
        )
        last = k == n_panels - 1
        _label_runs(ax, info, panel_inches, x=last or not stacked, y=stacked or k == 0)
        ax.set_title(label.replace("\n", " ") if stacked else label, fontsize=TITLE_PT)
        if stacked or k == 0:
            ax.set_ylabel("run A (its strongest\n1-back head)", fontsize=LABEL_PT)
    axes[-1 if stacked else n_panels // 2].set_xlabel("run B", fontsize=LABEL_PT)
    colourbar = fig.colorbar(
        image, ax=list(axes), location="bottom", extend="both", shrink=0.7, aspect=35
    )
    colourbar.ax.tick_params(labelsize=TICK_PT)
    colourbar.set_label(
        "z = (observed - null mean) / null SD\ndot: one-sided permutation p < 0.05",
        fontsize=LABEL_PT,
    )
    return save_figure(fig, path)


PROFILE_LABELS = {
    "fraction_qualifying": "qualifying",
    "layer_modal_share": "modal layer",
    "onset_cv": "onset CV",
    "within_r": "r within",
    "between_r": "r between",
    "link_layer_order": "layer order",
    "link_onset_order": "onset order",
    "configurational_z": "config. z",
}
"""Column labels of the profile heatmap, by column of ``stats/profile.csv``."""
PROFILE_Z_FULL = 3.0
"""A configurational z at which the profile's colour saturates (z / 3, clipped to 0..1)."""


def profile_colour_values(table: pd.DataFrame) -> np.ndarray:
    """The colour value (0..1, higher = the mechanism generalises more) of every profile cell:
    fractions, shares and r as they are (clipped to 0..1), onset CV as 1 - min(CV, 1), the
    configurational z as z / :data:`PROFILE_Z_FULL` (clipped); NaN stays NaN."""
    values = table[list(PROFILE_LABELS)].to_numpy(dtype=float).copy()
    columns = list(PROFILE_LABELS)
    cv = columns.index("onset_cv")
    values[:, cv] = 1.0 - np.minimum(values[:, cv], 1.0)
    z = columns.index("configurational_z")
    values[:, z] = values[:, z] / PROFILE_Z_FULL
    return np.clip(values, 0.0, 1.0)


def draw_profile_cells(ax: Any, rows: pd.DataFrame, panel: str | None = None) -> Any:
    """Draw profile ``rows`` (one per mechanism) on ``ax``: each cell the value (2 significant
    digits; "–" when missing) on the colour of :func:`profile_colour_values` (viridis, 0..1), a
    mechanism not scored a grey row reading "not scored"; axis labels on top and left. Text gids
    ``cell:[<panel>:]<mechanism>:<column>`` and ``row:[<panel>:]<mechanism>``. Returns the image
    (for a colour bar)."""
    colours = profile_colour_values(rows)
    raw = rows[list(PROFILE_LABELS)].to_numpy(dtype=float)
    scored = rows["scored"].astype(bool).to_numpy()
    prefix = f"{panel}:" if panel is not None else ""
    image = ax.imshow(
        np.ma.masked_invalid(colours),
        cmap=matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd"),
        vmin=0.0,
        vmax=1.0,
        aspect="auto",
        interpolation="nearest",
    )
    for i in range(raw.shape[0]):
        mechanism = rows["mechanism"].iloc[i]
        if not scored[i]:
            ax.text(
                (raw.shape[1] - 1) / 2,
                i,
                "not scored",
                ha="center",
                va="center",
                fontsize=MIN_FONT_PT,
                gid=f"row:{prefix}{mechanism}",
            )
            continue
        for j in range(raw.shape[1]):
            value = raw[i, j]
            dark = np.isfinite(colours[i, j]) and colours[i, j] < 0.6
            ax.text(
                j,
                i,
                f"{value:.2g}" if np.isfinite(value) else "–",
                ha="center",
                va="center",
                fontsize=MIN_FONT_PT,
                color="white" if dark else "black",
                gid=f"cell:{prefix}{mechanism}:{list(PROFILE_LABELS)[j]}",
            )
    ax.xaxis.tick_top()
    ax.set_xticks(
        range(len(PROFILE_LABELS)), list(PROFILE_LABELS.values()), rotation=90, fontsize=TICK_PT
    )
    ax.set_yticks(range(len(rows)), rows["mechanism"].tolist(), fontsize=TICK_PT)
    ax.tick_params(length=0)
    return image


def plot_profile(profile: pd.DataFrame, path: str | Path, width: float | None = None) -> Figure:
    """The generalizability profile: mechanism (rows) x axis (columns), over all sizes.

    ``profile``: ``stats/profile.csv``; its ``size == "all"`` rows are drawn. Each cell shows the
    value (2 significant digits; "–" when missing) on the colour of
    :func:`profile_colour_values` (viridis, 0..1); a mechanism not scored is a grey row
    reading "not scored".
    """
    rows = profile[profile["size"] == "all"].reset_index(drop=True)
    side = width if width is not None else 4.5
    fig, ax = plt.subplots(figsize=(side, 1.6 + 0.22 * max(len(rows), 1)), layout="constrained")
    image = draw_profile_cells(ax, rows)
    colourbar = fig.colorbar(image, ax=ax, location="bottom", shrink=0.8, aspect=30)
    colourbar.ax.tick_params(labelsize=TICK_PT)
    colourbar.set_label("generalises: 0 (no) .. 1 (yes)", fontsize=LABEL_PT)
    return save_figure(fig, path)
