"""One scoring job: get the weights of (run, step), score every head, release the weights.

The result is one tidy row per head (mechgen.schema.HEAD_COLUMNS) and a provenance record (the
JSON sidecar): which commit and weight blob were scored, how many sentences and tokens, the wall
time and the library versions. A checkpoint that does not exist on the hub is not an error of
the sweep: it yields zero rows and a sidecar with ``status: "missing"``.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from mechgen.config import Run
from mechgen.schema import ATTENTION_METRICS, FLAG_COLUMNS, HEAD_COLUMNS, ID_COLUMNS


def library_versions() -> dict[str, str]:
    """Versions of the libraries that determine a score, for the sidecar."""
    import huggingface_hub
    import torch
    import transformers

    import mechgen

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "mechgen": getattr(mechgen, "__version__", "0"),
    }


def empty_head_table() -> pd.DataFrame:
    """A zero-row per-head table with the right columns and dtypes (for a missing checkpoint)."""
    dtypes: dict[str, str] = {c: "float64" for c in ATTENTION_METRICS}
    dtypes.update({c: "bool" for c in FLAG_COLUMNS})
    dtypes.update({c: "int64" for c in ID_COLUMNS})
    for c in ("suite", "model", "size", "run"):
        dtypes[c] = "string"
    return pd.DataFrame({c: pd.Series(dtype=dtypes[c]) for c in HEAD_COLUMNS})


def identify(
    scores: pd.DataFrame,
    run: Run,
    step: int,
    tokens_per_step: int,
    n_layers: int,
    n_heads: int,
    n_params: int,
) -> pd.DataFrame:
    """Add the id columns of mechgen.schema to a per-head score table (layer, head, metrics)."""
    out = scores.copy()
    out["suite"] = run.suite
    out["model"] = run.model
    out["size"] = run.size
    out["seed"] = run.seed
    out["run"] = run.run
    out["step"] = step
    out["tokens_seen"] = step * tokens_per_step
    out["n_layers"] = n_layers
    out["n_heads"] = n_heads
    out["n_params"] = n_params
    extra = [c for c in out.columns if c not in HEAD_COLUMNS]
    return out[[c for c in HEAD_COLUMNS if c in out.columns] + extra]


def score_checkpoint(
    run: Run,
    step: int,
    token_ids: list[list[int]],
    *,
    tokens_per_step: int,
    batch_size: int = 16,
    clipped_window: int = 8,
    delete_weights: bool = True,
    threads: int | None = None,
    progress: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score every head of ``run`` at ``step`` on ``token_ids`` (one list of ids per sentence).

    Returns the per-head table and the sidecar record. Raises
    :class:`mechgen.sources.CorruptCheckpoint` for a corrupt weight file; a missing revision
    returns an empty table with ``status == "missing"``.
    """
    import torch

    from mechgen import metrics, sources

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    sidecar: dict[str, Any] = {
        "suite": run.suite,
        "run": run.run,
        "repo_id": run.repo_id,
        "revision": f"step{step}",
        "step": step,
        "tokens_seen": step * tokens_per_step,
        "scoring": {"batch_size": batch_size, "clipped_window": clipped_window},
        "versions": library_versions(),
    }
    try:
        files = sources.fetch_checkpoint(run, step)
    except sources.MissingCheckpoint as exc:
        sidecar.update(status="missing", reason=str(exc), wall_seconds=time.perf_counter() - started)
        return empty_head_table(), sidecar

    try:
        model = sources.load_model(files)
        n_params = sources.count_parameters(model)
        cfg = model.config
        result = metrics.score_heads(
            model, token_ids, batch_size=batch_size, clipped_window=clipped_window, progress=progress
        )
    finally:
        freed = sources.release(files) if delete_weights else 0
    table = identify(
        result, run, step, tokens_per_step, cfg.num_hidden_layers, cfg.num_attention_heads, n_params
    )
    checkpoint = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(files).items()}
    sidecar.update(
        status="ok",
        commit=files.commit,
        sha256=files.sha256,
        weight_format=files.weight_format,
        weight_bytes=files.size_bytes,
        weights_deleted_bytes=freed,
        checkpoint=checkpoint,
        n_sentences=int(result.attrs.get("n_sentences", len(token_ids))),
        n_tokens=int(result.attrs.get("n_tokens", sum(len(t) for t in token_ids))),
        n_params=n_params,
        nonfinite_heads=int(table["nonfinite"].sum()) if "nonfinite" in table else 0,
        wall_seconds=time.perf_counter() - started,
    )
    return table, sidecar


def write_result(table: pd.DataFrame, sidecar: dict[str, Any], table_path: str | Path, sidecar_path: str | Path) -> None:
    """Write the per-head Parquet file and the JSON sidecar of one scoring job."""
    Path(table_path).parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(table_path, index=False)
    with open(sidecar_path, "w") as fh:
        json.dump(sidecar, fh, indent=2, sort_keys=True, default=str)
