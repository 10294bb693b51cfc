"""The figure of ``stats/seed_sources.csv``: variance shares per mechanism and quantity, and the
normalised trajectories coloured by variation kind (data / weight / full)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: the pipeline renders files only

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from mechgen.atomic import atomic_path

KIND_COLOURS = {"data": "tab:blue", "weight": "tab:orange", "full": "tab:grey"}
"""One colour per variation kind, in both panels."""
SHARES = ("share_data", "share_weight", "share_interaction")


def plot_seed_sources(
    table: pd.DataFrame,
    trajectories: Mapping[str, pd.DataFrame],
    kind_of: Mapping[str, str],
    path: str | Path,
) -> None:
    """Left: a heatmap, one row per (mechanism, quantity) with a variance statistic, columns
    share_data / share_weight / share_interaction (values printed; an en dash where there are no
    full seeds, colour clipped to -1..1). Right: one panel per mechanism, each run's normalised
    trajectory (max over heads per step) against log10(step + 1), coloured by its kind."""
    variance = table[table["statistic"] == "variance"]
    mechanisms = [m for m in trajectories if not trajectories[m].empty]
    n_right = max(1, len(mechanisms))
    n_rows_right = math.ceil(n_right / 2)
    fig = plt.figure(figsize=(13, max(4.5, 0.28 * len(variance) + 1.5, 2.6 * n_rows_right)))
    grid = fig.add_gridspec(n_rows_right, 3, width_ratios=[1.2, 1, 1])
    ax = fig.add_subplot(grid[:, 0])
    labels = [f"{r.mechanism}: {r.quantity}" for r in variance.itertuples()]
    values = variance[list(SHARES)].to_numpy(dtype=float) if len(variance) else np.zeros((0, 3))
    ax.imshow(np.clip(values, -1, 1), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(3):
            v = values[i, j]
            ax.text(
                j,
                i,
                f"{v:.2f}" if np.isfinite(v) else "\u2013",
                ha="center",
                va="center",
                fontsize=7,
            )
    ax.set_xticks(range(3), ["data", "weight", "interaction"])
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title("share of the full-seed variance", fontsize=9)
    for k, mechanism in enumerate(mechanisms):
        sub = fig.add_subplot(grid[k // 2, 1 + k % 2])
        traj = trajectories[mechanism]
        for run, g in traj.groupby("run"):
            kind = kind_of.get(str(run))
            if kind is None:
                continue
            g = g.sort_values("step")
            sub.plot(np.log10(g["step"] + 1), g["value"], color=KIND_COLOURS[kind], lw=1, alpha=0.8)
        sub.set_title(mechanism, fontsize=8)
        sub.tick_params(labelsize=7)
        sub.set_xlabel("log10(step + 1)", fontsize=7)
    handles = [plt.Line2D([], [], color=c, label=k) for k, c in KIND_COLOURS.items()]
    fig.legend(handles=handles, loc="upper right", fontsize=8, title="varies", title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
