"""Figures of a combined study (:mod:`mechgen.stats.families`): trajectories of every family on one
tokens-seen axis, and the generalizability profile heatmap split by family."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from mechgen.figures.suite import (
    LABEL_PT,
    OKABE_ITO,
    TICK_PT,
    TITLE_PT,
    draw_profile_cells,
    figure_legend,
    panel_grid,
    placeholder_figure,
    save_figure,
    style_axes,
)
from mechgen.stats import crossmech

TOKENS_AXIS_LABEL = "tokens seen + one step's tokens, (step + 1) x tokens_per_step (log scale)"


def family_colours(families: Sequence[str]) -> dict[str, str]:
    """``{family: colour}`` in the study's family order (Okabe-Ito)."""
    return {f: OKABE_ITO[i % len(OKABE_ITO)] for i, f in enumerate(families)}


def plot_family_trajectories(
    trajectories: dict[str, pd.DataFrame],
    families: Sequence[str],
    path: str | Path,
    width: float | None = None,
) -> Figure:
    """One panel per mechanism: the normalised trajectory (max over heads of
    ``(score - null) / (ceiling - null)``, ``functional_run_step.max_normalised``) of every run,
    coloured by family, against ``(step + 1) x tokens_per_step`` of its suite (log x, so that
    step 0 is drawn). Thin lines: one run; bold: the family's median over its runs at each
    checkpoint (runs of a family's members share checkpoints only where their schedules do)."""
    names = [n for n, t in trajectories.items() if len(t)]
    if not names:
        return placeholder_figure(path, "no mechanism has a trajectory in the study's members")
    colours = family_colours(families)
    fig, axes, spare = panel_grid(len(names), width, 2.3, default_panel_width=2.6)
    for ax, name in zip(axes, names):
        table = trajectories[name]
        x = (table["step"] + 1) * table["tokens_per_step"]
        table = table.assign(x=x)
        for family in families:
            rows = table[table["family"] == family]
            for run, run_rows in rows.sort_values("step").groupby("run", sort=False):
                ax.plot(
                    run_rows["x"],
                    run_rows["max_normalised"],
                    color=colours[family],
                    lw=0.6,
                    alpha=0.45,
                    gid=f"run:{family}:{run}",
                )
            if len(rows):
                median = rows.groupby("x")["max_normalised"].median()
                ax.plot(
                    median.index,
                    median.to_numpy(),
                    color=colours[family],
                    lw=2.0,
                    gid=f"median:{family}",
                )
        ax.set_xscale("log")
        ax.set_title(name, fontsize=TITLE_PT)
        style_axes(ax)
    fig.supxlabel(TOKENS_AXIS_LABEL, fontsize=LABEL_PT)
    fig.supylabel("max over heads, normalised score", fontsize=LABEL_PT)
    handles = [Line2D([], [], color=colours[f], lw=2.0, label=f) for f in families]
    handles.append(Line2D([], [], color="0.3", lw=0.6, alpha=0.6, label="one run"))
    figure_legend(fig, handles, spare)
    return save_figure(fig, path)


def plot_family_profiles(
    profiles: pd.DataFrame, families: Sequence[str], path: str | Path
) -> Figure:
    """The profile heatmap (:func:`mechgen.figures.suite.plot_profile`'s cells and colours) with one
    panel per family: rows mechanisms, columns the axes, over all sizes of the family's runs."""
    rows_all = profiles[profiles["size"] == crossmech.ALL_SIZES]
    n_mech = rows_all["mechanism"].nunique()
    fig, axes, _ = panel_grid(len(families), None, 1.4 + 0.22 * max(n_mech, 1), 4.0, sharey=True)
    image = None
    for ax, family in zip(axes, families):
        rows = rows_all[rows_all["family"] == family].reset_index(drop=True)
        image = draw_profile_cells(ax, rows, panel=family)
        ax.set_xlabel(family, fontsize=TITLE_PT)
    if image is not None:
        bar = fig.colorbar(image, ax=axes, location="bottom", shrink=0.6, aspect=40)
        bar.ax.tick_params(labelsize=TICK_PT)
        bar.set_label("generalises: 0 (no) .. 1 (yes)", fontsize=LABEL_PT)
    return save_figure(fig, path)
