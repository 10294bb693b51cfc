"""One figure per catalog mechanism: its functional, positional and developmental axes.

Table-side (matplotlib on the tables of ``stats/<mechanism>/``, written by
:func:`mechgen.stats.crossmech.analyze_mechanisms`). The figure has three panels, sizes coloured as
in every figure of :mod:`mechgen.figures.suite` (Okabe-Ito, ordered by parameter count):

- **functional**: per size and checkpoint, the fraction of runs with at least one head meeting
  the mechanism's criterion against its null (``has_qualifying`` of
  ``functional_run_step.csv``), and at the final checkpoint that fraction's Wilson interval
  (``functional_size.csv``) as an error bar;
- **positional**: per size, the relative depth ``(layer + 1) / n_layers`` of each run's
  strongest head at the final checkpoint (``per_seed.csv``, ``final_relative_depth``); filled
  markers: runs where the mechanism formed, open: where it did not;
- **developmental**: per run, the max-over-heads score on the normalised scale
  ``(score - null) / (ceiling - null)`` (``max_normalised``: 0 = the null, 1 = a perfect
  head) against step + 1 (log), with the onset (``per_seed.csv``, ``onset_step``) of each
  run where the mechanism formed marked on its line (the onset is a mean of checkpoint steps over the thresholds, so it may
  fall between checkpoints: the marker takes the line's value there, linear in
  log10(step + 1), the x of the log axis).

Artists carrying data have a ``gid``: ``fraction:<model>``, ``ci:<model>``, ``depth:<model>``
(formed) / ``depth_not_formed:<model>``, ``run:<run>``, ``onset:<run>``, ``null`` and
``ceiling``. A mechanism with no scored rows gets a placeholder that says why. A layer-unit
mechanism's units are layers (``unit="layer"``): the labels then say "layer" where they say
"head".
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: the pipeline renders files only

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from mechgen.atomic import atomic_path
from mechgen.figures.suite import (
    DPI,
    LABEL_PT,
    LEGEND_PT,
    MIN_PANEL_WIDTH,
    STEP_AXIS_LABEL,
    TICK_PT,
    TITLE_PT,
    placeholder_figure,
    size_order,
    size_styles,
)

PANELS = ("functional", "positional", "developmental")
"""The panels of a mechanism's figure, in drawing order."""


def qualifying_fraction(run_step: pd.DataFrame) -> pd.DataFrame:
    """Per model x step: the fraction of runs with a qualifying head (``fraction``) and the
    number of runs scored at that step (``n_runs``), from ``functional_run_step.csv``."""
    grouped = run_step.assign(q=run_step["has_qualifying"].astype(bool).astype(float)).groupby(
        ["model", "step"]
    )
    return grouped.agg(fraction=("q", "mean"), n_runs=("run", "nunique")).reset_index()


def onset_points(run_step: pd.DataFrame, per_seed: pd.DataFrame) -> pd.DataFrame:
    """Per run where the mechanism formed (``formed``: a qualifying head at the end and a
    finite onset; a run that never formed has no onset to mark, whatever noise crossed the
    thresholds): ``run, model, x = onset_step + 1, y`` = the run's
    normalised max-over-heads value at the onset, linear in log10(step + 1) between its
    checkpoints."""
    rows = []
    for record in per_seed.itertuples(index=False):
        onset = float(record.onset_step)
        if not (bool(record.formed) and np.isfinite(onset)):
            continue
        line = run_step[run_step["run"] == record.run].sort_values("step")
        x = np.log10(line["step"].to_numpy(dtype=float) + 1)
        y = line["max_normalised"].to_numpy(dtype=float)
        rows.append(
            {
                "run": record.run,
                "model": record.model,
                "x": onset + 1,
                "y": float(np.interp(np.log10(onset + 1), x, y)),
            }
        )
    return pd.DataFrame(rows, columns=["run", "model", "x", "y"])


def _style(ax: Axes) -> None:
    ax.tick_params(labelsize=TICK_PT, which="both")
    ax.grid(alpha=0.25, lw=0.5)


def _functional_panel(
    ax: Axes,
    run_step: pd.DataFrame,
    sizes: pd.DataFrame,
    models: list[str],
    styles: dict,
    unit: str = "head",
) -> None:
    fractions = qualifying_fraction(run_step)
    final = sizes.set_index("model")
    for model in models:
        colour, marker = styles[model]
        rows = fractions[fractions["model"] == model].sort_values("step")
        x = rows["step"].to_numpy(dtype=float) + 1
        ax.plot(
            x,
            rows["fraction"].to_numpy(dtype=float),
            color=colour,
            marker=marker,
            ms=2.5,
            lw=1.0,
            gid=f"fraction:{model}",
        )
        if model in final.index and len(x):
            row = final.loc[model]
            centre = float(row["fraction_qualifying"])
            bar = ax.errorbar(
                [x[-1]],
                [centre],
                yerr=[[centre - float(row["ci_low"])], [float(row["ci_high"]) - centre]],
                color=colour,
                capsize=2,
                lw=1.0,
                fmt="none",
            )
            bar.lines[2][0].set_gid(f"ci:{model}")
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(STEP_AXIS_LABEL, fontsize=LABEL_PT)
    ax.set_ylabel(f"fraction of seeds\nwith a qualifying {unit}", fontsize=LABEL_PT)
    ax.set_title("functional: criterion vs null", fontsize=TITLE_PT)


def _positional_panel(
    ax: Axes,
    per_seed: pd.DataFrame,
    models: list[str],
    styles: dict,
    width: float,
    unit: str = "head",
) -> None:
    for i, model in enumerate(models):
        colour, marker = styles[model]
        rows = per_seed[per_seed["model"] == model]
        depth = rows["final_relative_depth"].to_numpy(dtype=float)
        formed = rows["formed"].astype(bool).to_numpy()
        jitter = np.linspace(-0.12, 0.12, len(rows)) if len(rows) > 1 else np.zeros(len(rows))
        for mask, filled, gid in ((formed, True, "depth"), (~formed, False, "depth_not_formed")):
            keep = mask & np.isfinite(depth)
            if not keep.any():
                continue
            ax.scatter(
                i + jitter[keep],
                depth[keep],
                facecolors=colour if filled else "none",
                edgecolors=colour,
                marker=marker,
                s=14,
                linewidths=0.9,
                gid=f"{gid}:{model}",
            )
    ax.set_xticks(range(len(models)), models)
    slot_pt = width * 72 * 0.8 / max(len(models), 1)
    if max((len(m) for m in models), default=0) * TICK_PT * 0.6 > slot_pt:
        ax.tick_params(axis="x", labelrotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    ax.set_xlim(-0.6, len(models) - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"relative depth of the\nstrongest {unit}, final step", fontsize=LABEL_PT)
    ax.set_title("positional: layer / depth", fontsize=TITLE_PT)
    ax.grid(False, axis="x")


def _developmental_panel(
    ax: Axes,
    run_step: pd.DataFrame,
    per_seed: pd.DataFrame,
    models: list[str],
    styles: dict,
    unit: str = "head",
) -> None:
    onsets = onset_points(run_step, per_seed).set_index("run")
    for model in models:
        colour = styles[model][0]
        group = run_step[run_step["model"] == model].sort_values(["seed", "step"])
        for run, rows in group.groupby("run", sort=False):
            ax.plot(
                rows["step"].to_numpy(dtype=float) + 1,
                rows["max_normalised"].to_numpy(dtype=float),
                color=colour,
                lw=0.7,
                alpha=0.6,
                gid=f"run:{run}",
            )
            if run in onsets.index:
                ax.plot(
                    [onsets.loc[run, "x"]],
                    [onsets.loc[run, "y"]],
                    ls="none",
                    marker="|",
                    ms=7,
                    mew=1.4,
                    color=colour,
                    gid=f"onset:{run}",
                )
    ax.axhline(0.0, color="0.35", ls="--", lw=0.9, gid="null")
    ax.axhline(1.0, color="0.35", ls=":", lw=0.9, gid="ceiling")
    ax.set_xscale("log")
    ax.set_xlabel(STEP_AXIS_LABEL, fontsize=LABEL_PT)
    ax.set_ylabel(f"max over {unit}s,\n(score - null) / (ceiling - null)", fontsize=LABEL_PT)
    ax.set_title("developmental: normalised trajectories", fontsize=TITLE_PT)


def plot_mechanism(
    name: str,
    run_step: pd.DataFrame,
    sizes: pd.DataFrame,
    per_seed: pd.DataFrame,
    path: str | Path,
    width: float | None = None,
    note: str = "",
    unit: str = "head",
) -> Figure:
    """The figure of mechanism ``name`` from its ``functional_run_step``, ``functional_size``
    and ``per_seed`` tables (see the module docstring for the panels).

    Without ``width``: one row of three panels; with it: as many columns as fit
    :data:`mechgen.figures.suite.MIN_PANEL_WIDTH`-inch panels, the legend in a spare slot. A
    mechanism without scored rows (``run_step`` empty) gets a placeholder naming ``note``.
    ``unit``: the mechanism's unit ("head" or "layer"), as the axis labels name it.
    """
    if run_step.empty:
        return placeholder_figure(
            path, f"{name}: not scored in this suite" + (f" ({note})" if note else ""), width
        )
    models = size_order(run_step)
    styles = size_styles(models)
    if width is None:
        ncols, nrows, fig_width = 3, 1, 9.6
    else:
        ncols = max(1, min(3, int(width // (MIN_PANEL_WIDTH + 0.1))))
        nrows = -(-(len(PANELS) + (1 if ncols > 1 else 0)) // ncols)
        fig_width = width
    fig, grid = plt.subplots(
        nrows, ncols, figsize=(fig_width, 2.5 * nrows + 0.4), squeeze=False, layout="constrained"
    )
    flat = list(grid.ravel())
    axes = dict(zip(PANELS, flat))
    _functional_panel(axes["functional"], run_step, sizes, models, styles, unit)
    _positional_panel(axes["positional"], per_seed, models, styles, fig_width / ncols, unit)
    _developmental_panel(axes["developmental"], run_step, per_seed, models, styles, unit)
    for ax in axes.values():
        _style(ax)
    axes["positional"].grid(False, axis="x")
    spare = flat[len(PANELS) :]
    for ax in spare:
        ax.axis("off")
    handles = [
        Line2D([], [], color=styles[m][0], marker=styles[m][1], ms=3, lw=1.0, label=m)
        for m in models
    ] + [
        Line2D([], [], color="0.3", ls="none", marker="|", ms=6, mew=1.4, label="onset"),
        Line2D([], [], color="0.35", ls="--", lw=0.9, label="null (0)"),
    ]
    if spare:
        spare[0].legend(handles=handles, fontsize=LEGEND_PT, frameon=False, loc="center")
    else:
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncol=min(len(handles), 6),
            fontsize=LEGEND_PT,
            frameon=False,
        )
    fig.suptitle(name, fontsize=TITLE_PT + 0.5)
    with atomic_path(path) as tmp:
        fig.savefig(
            tmp, dpi=DPI, bbox_inches="tight", pad_inches=0.02, format=Path(path).suffix.lstrip(".")
        )
    plt.close(fig)
    return fig
