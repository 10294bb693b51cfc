"""Aggregation of per-(run, step) results into the suite's tidy tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mechgen.schema import HEAD_COLUMNS


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
