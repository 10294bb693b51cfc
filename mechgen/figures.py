"""Publication figures of a suite (matplotlib, Agg backend, 300-dpi PNG).

One function per figure; each takes DataFrames and an output path, saves the PNG and returns
the (closed) :class:`matplotlib.figure.Figure` so tests can inspect what was drawn. Sizes are
ordered by parameter count and coloured from the Okabe-Ito palette (distinguishable with the
common colour-vision deficiencies); continuous maps use viridis (perceptually uniform, readable
in greyscale). Artists that carry data have a ``gid``: ``run:<run id>`` for one run's line,
``mean`` for a mean over seeds, ``baseline`` for the uniform-attention line, ``seeds`` for
per-seed points, ``size:<model>`` for one size's points.

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
=============================  ==========================================================
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: the pipeline renders files only

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from mechgen.atomic import atomic_path
from mechgen.functional import finite_heads, uniform_induction_baseline

DPI = 300

OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
"""Okabe & Ito (2008) colour-blind-safe colours, the low-contrast yellow last."""
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
"""One marker per size, so sizes stay apart without colour."""

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


def format_params(n_params: float) -> str:
    """A parameter count for humans: 14.1M, 405M, 1.2B, 850k."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n_params >= scale:
            value = n_params / scale
            return f"{value:.3g}{suffix}"
    return f"{int(n_params)}"


def size_order(table: pd.DataFrame) -> list[str]:
    """The models of ``table`` ordered by ``n_params``, then name."""
    sizes = table[["model", "n_params"]].drop_duplicates("model")
    return sizes.sort_values(["n_params", "model"], kind="stable")["model"].tolist()


def size_styles(models: list[str]) -> dict[str, tuple[str, str]]:
    """``{model: (colour, marker)}`` in the given order, cycling after eight sizes."""
    return {
        m: (OKABE_ITO[i % len(OKABE_ITO)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(models)
    }


def _save(fig: Figure, path: str | Path) -> Figure:
    # The temporary name hides the extension, so the format is named.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format=Path(path).suffix.lstrip("."))
    plt.close(fig)
    return fig


def _size_title(group: pd.DataFrame, model: str) -> str:
    return f"{model} ({format_params(float(group['n_params'].iloc[0]))} params, {group['run'].nunique()} seeds)"


def placeholder_figure(path: str | Path, message: str) -> Figure:
    """A figure that says why the real one could not be drawn (e.g. a single run has no
    cross-run correlations), so the pipeline still has its output and the report says why."""
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=10, gid="message")
    return _save(fig, path)


def plot_trajectories(
    trajectories: pd.DataFrame, path: str | Path, metric: str, baseline: float | None = None
) -> Figure:
    """Figure 1: the max-over-heads trajectory of every run, one panel per size.

    ``trajectories`` has one row per run x step with ``model, run, seed, step, n_params, value``
    (:func:`mechgen.developmental.trajectories`). Thin lines: one per seed; bold: the mean over
    seeds at each step (over the seeds that have it); dashed: ``baseline`` (the metric under
    uniform attention) when given. x: step + 1, log scale; y: ``metric`` in its unit.
    """
    models = size_order(trajectories)
    styles = size_styles(models)
    fig, axes = plt.subplots(
        1, len(models), figsize=(3.4 * len(models), 3.2), sharey=True, squeeze=False
    )
    for ax, model in zip(axes[0], models):
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
        ax.plot(mean.index + 1, mean.to_numpy(), color=colour, lw=2.4, gid="mean")
        if baseline is not None:
            ax.axhline(baseline, color="0.35", ls="--", lw=1.0, gid="baseline")
        ax.set_xscale("log")
        ax.set_title(_size_title(group, model), fontsize=9)
        ax.set_xlabel(STEP_AXIS_LABEL, fontsize=8)
        ax.grid(alpha=0.25, lw=0.5)
    axes[0][0].set_ylabel(f"max over heads of {metric_label(metric)}", fontsize=8)
    handles = [
        Line2D([], [], color="0.3", lw=0.7, alpha=0.7, label="one seed"),
        Line2D([], [], color="0.3", lw=2.4, label="mean over seeds"),
    ]
    if baseline is not None:
        handles.append(
            Line2D(
                [], [], color="0.35", ls="--", lw=1.0, label=f"uniform attention ({baseline:.3f})"
            )
        )
    axes[0][0].legend(handles=handles, fontsize=7, loc="upper left", frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def layer_max_matrices(
    heads: pd.DataFrame, metric: str, step: int | None = None
) -> dict[str, pd.DataFrame]:
    """Per model: a seed x layer matrix of the max ``metric`` over the heads of each layer.

    At ``step``, or (default) at each run's last step. Non-finite or flagged heads are left
    out (a layer with none left is NaN). Rows are seeds (sorted), columns layers 0..n_layers-1.
    """
    usable = finite_heads(heads, metric)
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


def plot_layer_heatmap(
    heads: pd.DataFrame,
    path: str | Path,
    metric: str,
    step: int | None = None,
    positional: pd.DataFrame | None = None,
) -> Figure:
    """Figure 2: seed x layer heatmaps of the max ``metric`` per layer, one panel per size.

    Cells: :func:`layer_max_matrices` (each run's final step unless ``step`` is given), on one
    colour scale for all panels; a star marks each seed's strongest layer. With ``positional``
    (``positional_size_step.csv``), each panel's title gives the cross-seed modal share of that
    layer and its permutation p-value at the final step.
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
    fig, axes = plt.subplots(
        1,
        len(matrices),
        figsize=(
            1.2 + 0.35 * sum(widths) + 0.8 * len(matrices),
            0.9 + 0.3 * max(len(m) for m in matrices.values()),
        ),
        gridspec_kw={"width_ratios": widths},
        squeeze=False,
    )
    image = None
    for ax, (model, matrix) in zip(axes[0], matrices.items()):
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
            s=40,
            facecolors="white",
            edgecolors="black",
            linewidths=0.5,
            gid="argmax",
        )
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_xticklabels([str(layer) for layer in matrix.columns], fontsize=6)
        ax.set_yticks(range(len(matrix)))
        ax.set_yticklabels([str(seed) for seed in matrix.index], fontsize=6)
        ax.set_xlabel("layer (0 = first)", fontsize=8)
        title = model
        if model in agreement and np.isfinite(agreement[model]["p_value"]):
            title += f"\nmodal share {agreement[model]['modal_share']:.2f}, p = {agreement[model]['p_value']:.2g}"
        ax.set_title(title, fontsize=8)
    axes[0][0].set_ylabel("seed", fontsize=8)
    colourbar = fig.colorbar(image, ax=list(axes[0]), fraction=0.04, pad=0.02)
    where = "final step" if step is None else f"step {step}"
    colourbar.set_label(f"max over the layer's heads,\n{metric_label(metric)}, {where}", fontsize=7)
    return _save(fig, path)


SIZE_EFFECT_QUANTITIES = {
    "peak": "peak of the trajectory",
    "slope": "slope",
    "onset_step": "onset",
}
"""Per-seed quantities of :func:`plot_size_effects` and their axis names."""


def plot_size_effects(
    per_seed: pd.DataFrame, per_model: pd.DataFrame, path: str | Path, metric: str
) -> Figure:
    """Figure 3: peak, slope and onset of every run against model size.

    ``per_seed`` (:func:`mechgen.developmental.per_seed_summary`): one point per run at its
    ``n_params`` (spread horizontally by a few percent so seeds do not overlap);
    ``per_model`` (:func:`mechgen.stats.per_model_summary`): the per-size mean with its
    bootstrap CI (``<q>_mean``, ``<q>_ci_low``, ``<q>_ci_high``). x: parameters, log scale.
    Onset is on a log scale (optimiser steps) when every onset is positive.
    """
    models = size_order(per_seed)
    styles = size_styles(models)
    fig, axes = plt.subplots(1, len(SIZE_EFFECT_QUANTITIES), figsize=(10.5, 3.2), squeeze=False)
    units = {
        "peak": metric_label(metric),
        "slope": f"{METRIC_UNITS.get(metric, metric)} per decade of step + 1",
        "onset_step": "optimiser steps",
    }
    summary = per_model.set_index("model")
    for ax, (quantity, name) in zip(axes[0], SIZE_EFFECT_QUANTITIES.items()):
        xs, ys = [], []
        for model in models:
            group = per_seed[per_seed["model"] == model].sort_values("seed")
            values = group[quantity].to_numpy(dtype=float)
            keep = np.isfinite(values)
            n = len(group)
            # A deterministic multiplicative spread of +-6% keeps seeds apart on the log axis.
            spread = 1.0 + 0.12 * (np.arange(n) - (n - 1) / 2) / max(n, 1)
            xs.append((group["n_params"].to_numpy(dtype=float) * spread)[keep])
            ys.append(values[keep])
        colours = [styles[m][0] for m, x in zip(models, xs) for _ in x]
        ax.scatter(
            np.concatenate(xs),
            np.concatenate(ys),
            s=12,
            c=colours,
            alpha=0.6,
            linewidths=0,
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
                markeredgewidth=0.6,
                ms=6,
                capsize=3,
                lw=1.2,
            )
            container.lines[0].set_gid(f"mean:{model}")
        ax.set_xscale("log")
        # One labelled tick per size (14.1M, 70.4M, ...) instead of crowded minor labels.
        sizes_n_params = sorted(per_seed["n_params"].astype(float).unique())
        ax.set_xticks(sizes_n_params, [format_params(n) for n in sizes_n_params], fontsize=7)
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlim(sizes_n_params[0] / 1.5, sizes_n_params[-1] * 1.5)
        if quantity == "onset_step" and np.concatenate(ys).size and (np.concatenate(ys) > 0).all():
            ax.set_yscale("log")
            # Plain numbers (30, 200) rather than 3 x 10^1 on a log axis of steps.
            ax.yaxis.set_major_formatter(ticker.LogFormatter())
            ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
            units[quantity] += ", log scale"
        ax.set_xlabel("parameters (log scale)", fontsize=8)
        ax.set_ylabel(f"{name} ({units[quantity]})", fontsize=8)
        ax.grid(alpha=0.25, lw=0.5)
    handles = [
        Line2D(
            [], [], ls="", marker=styles[m][1], color=styles[m][0], markeredgecolor="black", label=m
        )
        for m in models
    ]
    handles.append(
        Line2D([], [], ls="", marker="o", color="0.4", alpha=0.6, ms=4, label="one seed")
    )
    fig.legend(
        handles=handles,
        loc="upper center",
        ncol=len(handles),
        fontsize=7,
        frameon=False,
        bbox_to_anchor=(0.5, 1.06),
    )
    fig.tight_layout()
    return _save(fig, path)


def correlation_from_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """The (run x run) Pearson r matrix from the long table of ordered pairs (``run1, run2, cor``;
    :func:`mechgen.convergence.pairwise_correlations`), with 1 on the diagonal."""
    matrix = pairs.pivot(index="run1", columns="run2", values="cor")
    runs = sorted(set(matrix.index) | set(matrix.columns))
    values = matrix.reindex(index=runs, columns=runs).to_numpy(dtype=float, copy=True)
    np.fill_diagonal(values, 1.0)
    return pd.DataFrame(values, index=runs, columns=runs)


def plot_correlation_matrix(corr: pd.DataFrame, runs: pd.DataFrame, path: str | Path) -> Figure:
    """Figure 4: the Pearson r between every two runs' trajectories, runs ordered by size, then seed.

    ``corr``: a square (run x run) DataFrame; ``runs``: one row per run with ``run, model,
    seed, n_params``. White lines separate sizes. Colour: viridis from the smallest r to 1.
    """
    info = runs.drop_duplicates("run").set_index("run").loc[list(corr.index)].reset_index()
    info = info.sort_values(["n_params", "model", "seed"], kind="stable")
    order = info["run"].tolist()
    matrix = corr.loc[order, order].to_numpy(dtype=float)
    off_diagonal = matrix[~np.eye(len(order), dtype=bool)]
    vmin = float(np.nanmin(off_diagonal)) if off_diagonal.size else 0.0
    side = min(10.0, 2.5 + 0.16 * len(order))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(
        matrix, cmap="viridis", vmin=min(vmin, 0.999), vmax=1.0, interpolation="nearest"
    )
    labels = [f"{m} s{s}" for m, s in zip(info["model"], info["seed"])]
    fontsize = 7 if len(order) <= 20 else 5
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels(labels, fontsize=fontsize)
    boundaries = np.flatnonzero(info["model"].to_numpy()[1:] != info["model"].to_numpy()[:-1]) + 0.5
    for edge in boundaries:
        ax.axhline(edge, color="white", lw=1.2)
        ax.axvline(edge, color="white", lw=1.2)
    ax.set_xlabel("run (size, seed)", fontsize=8)
    ax.set_ylabel("run (size, seed)", fontsize=8)
    colourbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    colourbar.set_label("Pearson r of the max-over-heads trajectories", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_mds(
    coords: pd.DataFrame, path: str | Path, per_model: pd.DataFrame | None = None
) -> Figure:
    """Figure 5: classical MDS of the runs on 1 - r, coloured (and marked) by size.

    ``coords``: one row per run with ``model, n_params, mds1, mds2``
    (:func:`mechgen.convergence.mds_coordinates`). With ``per_model`` holding
    ``mds_separation``, the legend gives each size's separation ratio.
    """
    models = size_order(coords)
    styles = size_styles(models)
    separation = {}
    if per_model is not None and "mds_separation" in per_model.columns:
        separation = per_model.set_index("model")["mds_separation"].to_dict()
    fig, ax = plt.subplots(figsize=(5.0, 4.4))
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
            s=30,
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
    ax.set_xlabel("MDS dimension 1 (units of 1 - r)", fontsize=8)
    ax.set_ylabel("MDS dimension 2 (units of 1 - r)", fontsize=8)
    ax.legend(fontsize=7, frameon=False, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_functional_heads(
    counts: pd.DataFrame, sizes: pd.DataFrame, path: str | Path
) -> Figure:
    """Figure 6: heads meeting the 1-back criterion over training, one panel per size.

    ``counts`` (``functional_run_step.csv``) gives one line per run (count of heads vs
    step + 1, log x), ``sizes`` (``functional_size.csv``) the fraction of seeds with such a head
    at the final step (panel title); see :func:`mechgen.functional.functional_tables`.
    """
    sizes = sizes.set_index("model")
    models = size_order(counts)
    styles = size_styles(models)
    fig, axes = plt.subplots(
        1, len(models), figsize=(3.4 * len(models), 3.2), sharey=True, squeeze=False
    )
    for ax, model in zip(axes[0], models):
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
            lw=2.2,
            gid="mean",
        )
        title = _size_title(group, model)
        if model in sizes.index:
            row = sizes.loc[model]
            title += (
                f"\n{int(row['n_runs_functional'])}/{int(row['n_runs'])} seeds have one at the end "
                f"(CI {row['ci_low']:.2f}-{row['ci_high']:.2f})"
            )
        ax.set_title(title, fontsize=8)
        ax.set_xscale("log")
        ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xlabel(STEP_AXIS_LABEL, fontsize=8)
        ax.grid(alpha=0.25, lw=0.5)
    first = counts.iloc[0]
    axes[0][0].set_ylabel(
        f"heads with one_back > {first['multiple']:g} x uniform ({first['threshold']:.3f}), count",
        fontsize=8,
    )
    axes[0][0].legend(
        handles=[
            Line2D([], [], color="0.3", lw=0.8, alpha=0.7, label="one seed"),
            Line2D([], [], color="0.3", lw=2.2, label="mean over seeds"),
        ],
        fontsize=7,
        loc="upper left",
        frameon=False,
    )
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Relational and configurational axes (mechgen.circuit)


def plot_relational_trajectories(
    one_back: pd.DataFrame,
    induction: pd.DataFrame,
    path: str | Path,
    induction_baseline: float | None = None,
    control: pd.DataFrame | None = None,
) -> Figure:
    """The max-over-heads one_back and induction trajectories overlaid, one panel per size.

    ``one_back``/``induction``: trajectories tables (:func:`mechgen.developmental.trajectories`
    of each metric). Thin lines: one per seed (solid: one_back, dashed: induction); bold: the
    mean over seeds; dotted grey: the induction score of uniform attention. ``control``: the
    trajectories of ``induction_control`` (the same positions on non-repeating sequences),
    drawn dash-dotted in grey as the mean over seeds (gid ``mean:induction_control``): an
    induction curve that this control follows is a fixed-offset head, not content matching.
    Artists: gid ``run:<run>:one_back`` / ``run:<run>:induction``, ``mean:one_back`` /
    ``mean:induction``, ``baseline``. y: attention weight.
    """
    models = size_order(one_back)
    fig, axes = plt.subplots(
        1, len(models), figsize=(3.4 * len(models), 3.2), sharey=True, squeeze=False
    )
    styles = {"one_back": (OKABE_ITO[0], "-"), "induction": (OKABE_ITO[1], "--")}
    for ax, model in zip(axes[0], models):
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
                mean.index + 1, mean.to_numpy(), color=colour, ls=dash, lw=2.2, gid=f"mean:{metric}"
            )
        if control is not None and not control.empty:
            mean = control[control["model"] == model].groupby("step")["value"].mean()
            ax.plot(
                mean.index + 1,
                mean.to_numpy(),
                color="0.45",
                ls="-.",
                lw=1.4,
                gid="mean:induction_control",
            )
        if induction_baseline is not None:
            ax.axhline(induction_baseline, color="0.4", ls=":", lw=1.0, gid="baseline")
        ax.set_xscale("log")
        ax.set_title(_size_title(one_back[one_back["model"] == model], model), fontsize=9)
        ax.set_xlabel(STEP_AXIS_LABEL, fontsize=8)
        ax.grid(alpha=0.25, lw=0.5)
    axes[0][0].set_ylabel("max over heads (attention weight)", fontsize=8)
    handles = [
        Line2D([], [], color=OKABE_ITO[0], lw=2.2, label="one_back (eval text)"),
        Line2D([], [], color=OKABE_ITO[1], ls="--", lw=2.2, label="induction ([random] x 2)"),
        Line2D([], [], color="0.3", lw=0.7, alpha=0.6, label="thin: one seed; bold: mean"),
    ]
    if control is not None and not control.empty:
        handles.append(
            Line2D([], [], color="0.45", ls="-.", lw=1.4, label="induction, no repeat (control)")
        )
    if induction_baseline is not None:
        handles.append(
            Line2D(
                [], [], color="0.4", ls=":", label=f"uniform induction ({induction_baseline:.3f})"
            )
        )
    axes[0][0].legend(handles=handles, fontsize=6.5, loc="upper left", frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def _per_size_strip(
    ax: plt.Axes,
    table: pd.DataFrame,
    column: str,
    models: list[str],
    offset: float,
    colour: str,
    marker: str,
    gid: str,
) -> None:
    for x, model in enumerate(models):
        values = table.loc[table["model"] == model, column].astype(float).to_numpy()
        values = values[np.isfinite(values)]
        if not len(values):
            continue
        jitter = np.linspace(-0.08, 0.08, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(
            np.full(len(values), x + offset) + jitter,
            values,
            color=colour,
            marker=marker,
            s=22,
            zorder=3,
            gid=f"{gid}:{model}",
        )
        ax.hlines(values.mean(), x + offset - 0.15, x + offset + 0.15, color=colour, lw=2)


def plot_onset_lags(relational: pd.DataFrame, path: str | Path) -> Figure:
    """Onset lag (induction onset - 1-back onset, steps) per run, one column per size.

    Points: one per seed (gid ``seeds:<model>``); bar: the mean; dashed line at 0 (positive =
    the induction head forms after the 1-back head). Runs without both onsets are left out
    and counted in the title.
    """
    models = size_order(relational)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(models), 3.2))
    _per_size_strip(ax, relational, "lag_steps", models, 0.0, OKABE_ITO[0], "o", "seeds")
    ax.axhline(0, color="0.35", ls="--", lw=1.0, gid="zero")
    ax.set_xticks(range(len(models)), models, fontsize=8)
    ax.set_xlim(-0.6, len(models) - 0.4)
    ax.set_ylabel("onset lag, induction - one_back (steps)", fontsize=8)
    n_missing = int((~np.isfinite(relational["lag_steps"].astype(float))).sum())
    ax.set_title(f"Onset lag per seed ({n_missing} run(s) without both onsets)", fontsize=9)
    ax.grid(alpha=0.25, lw=0.5, axis="y")
    fig.tight_layout()
    return _save(fig, path)


def plot_ablation(relational: pd.DataFrame, path: str | Path) -> Figure:
    """Induction drop of the target head when the 1-back head vs a same-layer control head is
    mean-ablated, per run (points) and size (columns).

    Filled circles: ablating the strongest 1-back head (gid ``source:<model>``); open squares:
    the control (gid ``control:<model>``); bars: means. y: drop in the target's induction score
    (attention weight; positive = induction falls).
    """
    models = size_order(relational)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(models), 3.2))
    _per_size_strip(ax, relational, "induction_drop", models, -0.18, OKABE_ITO[1], "o", "source")
    _per_size_strip(
        ax, relational, "control_induction_drop", models, 0.18, OKABE_ITO[5], "s", "control"
    )
    ax.axhline(0, color="0.35", ls="--", lw=1.0)
    ax.set_xticks(range(len(models)), models, fontsize=8)
    ax.set_xlim(-0.6, len(models) - 0.4)
    ax.set_ylabel("drop in the induction head's score\n(attention weight)", fontsize=8)
    ax.legend(
        handles=[
            Line2D([], [], color=OKABE_ITO[1], marker="o", ls="", label="ablate 1-back head"),
            Line2D([], [], color=OKABE_ITO[5], marker="s", ls="", label="ablate control head"),
        ],
        fontsize=7,
        frameon=False,
    )
    ax.grid(alpha=0.25, lw=0.5, axis="y")
    fig.tight_layout()
    return _save(fig, path)


CONFIGURATIONAL_PANELS = (
    ("qk_spectrum", "W_QK spectrum (cosine)"),
    ("profile", "offset profile (Pearson r)"),
    ("cka", "output CKA (linear)"),
)


def plot_configurational(configurational: pd.DataFrame, path: str | Path) -> Figure:
    """Run x run similarity of the strongest 1-back heads, one panel per signature, with nulls.

    Cell (A, B): the similarity of A's strongest head with B's (:data:`CONFIGURATIONAL_PANELS`,
    columns ``<name>_similarity``/``cka``), annotated with the null mean below it; cells whose
    one-sided permutation p < 0.05 are outlined (gid ``significant``). Runs are ordered by size
    then seed; the diagonal is empty. viridis colour scale per panel.
    """
    table = configurational
    order = (
        table[["run_a", "model_a", "seed_a"]]
        .drop_duplicates("run_a")
        .sort_values(["model_a", "seed_a"])["run_a"]
        .tolist()
    )
    index = {run: i for i, run in enumerate(order)}
    n = len(order)
    fig, axes = plt.subplots(1, 3, figsize=(3.2 * 3 + 1.0, 0.45 * n + 2.2), squeeze=False)
    for ax, (name, label) in zip(axes[0], CONFIGURATIONAL_PANELS):
        value_col = "cka" if name == "cka" else f"{name}_similarity"
        matrix = np.full((n, n), np.nan)
        null = np.full((n, n), np.nan)
        p_values = np.full((n, n), np.nan)
        for row in table.itertuples():
            i, j = index[row.run_a], index[row.run_b]
            matrix[i, j] = getattr(row, value_col)
            null[i, j] = getattr(row, f"{name}_null_mean")
            p_values[i, j] = getattr(row, f"{name}_p")
        image = ax.imshow(
            matrix,
            cmap="viridis",
            vmin=np.nanmin(matrix) if np.isfinite(matrix).any() else 0,
            vmax=1,
        )
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        for i in range(n):
            for j in range(n):
                if np.isfinite(matrix[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{matrix[i, j]:.2f}\n({null[i, j]:.2f})",
                        ha="center",
                        va="center",
                        fontsize=5.5,
                        color="white" if matrix[i, j] < np.nanmean(matrix) else "black",
                    )
                if np.isfinite(p_values[i, j]) and p_values[i, j] < 0.05:
                    ax.add_patch(
                        plt.Rectangle(
                            (j - 0.5, i - 0.5),
                            1,
                            1,
                            fill=False,
                            ec="#D55E00",
                            lw=1.5,
                            gid="significant",
                        )
                    )
        ax.set_xticks(range(n), order, rotation=90, fontsize=6)
        ax.set_yticks(range(n), order, fontsize=6)
        ax.set_title(f"{label}\nobserved (null mean)", fontsize=8)
        ax.set_xlabel("run B", fontsize=7)
    axes[0][0].set_ylabel("run A (its strongest 1-back head)", fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
