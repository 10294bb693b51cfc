"""Aggregation of per-(run, step) results into the suite's tidy tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mechgen.schema import HEAD_COLUMNS, LAYER_COLUMNS, RUN_SHAPE_COLUMNS


def concat_head_tables(paths: list[str | Path]) -> pd.DataFrame:
    """Concatenate per-(run, step) per-head Parquet files, sorted by run, step, layer, head.

    Missing checkpoints contribute zero rows; their record is in the sidecars.
    """
    frames = [pd.read_parquet(p) for p in paths]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=HEAD_COLUMNS)
    heads = pd.concat(frames, ignore_index=True)
    return heads.sort_values(["model", "seed", "step", "layer", "head"], kind="stable").reset_index(drop=True)


def layer_table(sidecar_paths: list[str | Path], heads: pd.DataFrame) -> pd.DataFrame:
    """The per-layer table (``layers.parquet``): one row per (run, step, layer) of every sidecar
    with ``layer_scores`` ({score column: [value of layer 0, ..., layer n_layers - 1]}), with
    :data:`mechgen.schema.LAYER_COLUMNS` and one column per score (NaN where a sidecar lacks
    it), sorted like heads.parquet. The run's identity and shape come from ``heads`` (its rows
    of that run); step and tokens_seen from the sidecar. No sidecar with layer scores (a
    missing checkpoint, relational scores off): the header alone."""
    runs = heads.drop_duplicates("run").set_index("run")[
        [c for c in RUN_SHAPE_COLUMNS if c != "run"]
    ]
    rows = []
    for p in sidecar_paths:
        with open(p) as fh:
            s = json.load(fh)
        scores = s.get("layer_scores") or {}
        if not scores:
            continue
        run = runs.loc[s["run"]]
        n_layers = len(next(iter(scores.values())))
        for layer in range(n_layers):
            row = {c: run[c] for c in runs.columns}
            row.update(run=s["run"], step=int(s["step"]), tokens_seen=int(s["tokens_seen"]))
            row["layer"] = layer
            row.update({name: float(values[layer]) for name, values in scores.items()})
            rows.append(row)
    if not rows:
        return pd.DataFrame(columns=LAYER_COLUMNS)
    table = pd.DataFrame(rows)
    scores = sorted(c for c in table.columns if c not in LAYER_COLUMNS)
    table = table[LAYER_COLUMNS + scores]
    return table.sort_values(["model", "seed", "step", "layer"], kind="stable").reset_index(
        drop=True
    )


def read_sidecars(paths: list[str | Path]) -> pd.DataFrame:
    """One row per scoring job from its JSON sidecar: status, commit, sha256, wall time."""
    rows = []
    for p in paths:
        with open(p) as fh:
            s = json.load(fh)
        rows.append(
            {
                "run": s.get("run"),
                "step": s.get("step"),
                "repo_id": s.get("repo_id"),
                "revision": s.get("revision"),
                "status": s.get("status"),
                "reason": s.get("reason", ""),
                "commit": s.get("commit"),
                "sha256": s.get("sha256"),
                "duplicate_of": s.get("duplicate_of", ""),
                "n_sentences": s.get("n_sentences"),
                "n_tokens": s.get("n_tokens"),
                "nonfinite_heads": s.get("nonfinite_heads", 0),
                "wall_seconds": s.get("wall_seconds"),
            }
        )
    return pd.DataFrame(rows)
