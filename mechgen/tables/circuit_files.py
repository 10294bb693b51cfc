"""The scoring job's circuit files: one ``.npz`` per checkpoint with its relational and
configurational arrays (written by :func:`mechgen.scoring.circuit.score_circuit` inside the scoring
job, read by the per-suite tables of :mod:`mechgen.axes.circuit_tables`). numpy and pandas only:
reading a circuit file needs no torch.

Files
-----
All arrays of one checkpoint go into one ``.npz`` (``scores/<run>/step<N>.circuit.npz``, no
pickles; :meth:`CircuitResult.save` / :func:`load_circuit`). Keys (``L`` layers, ``H`` heads,
``hd`` head dim, ``d`` d_model, ``K`` = max_offset):

=====================  ===================  =================================================
key                    shape                meaning
=====================  ===================  =================================================
``induction``          [L, H]               induction score (probability)
``induction_control``  [L, H]               the same positions on non-repeating sequences
                                            (:func:`mechgen.scoring.circuit.positional_controls`)
``duplicate_token``    [L, H]               mean A[p, p - L] on the [random]x2 sequences
``copying_accuracy``   []                   fraction of second-half positions copied (top-1)
``in_context_retrieval`` [L]                per layer: fraction of second-half positions whose
                                            next token tops a logit lens over the first-half
                                            ids (:mod:`mechgen.mechanisms.in_context_retrieval`;
                                            absent without an LM head)
``offset_profile``     [L, H, K+1]          mean attention to offsets 0..K on the eval text
``qk_spectrum``        [L, H, hd]           sigma(W_QK) / ||sigma||_2, descending
``ov_spectrum``        [L, H, hd]           sigma(W_OV) / ||sigma||_2, descending
``strongest_one_back`` [2]                  (layer, head) of the largest one_back
``qk_heads``           [k, 2]               (layer, head) of the saved W_Q/W_K factors
``qk_q``, ``qk_k``     [k, hd, d]           W_Q, W_K (LayerNorm folded) of those heads
``record``             [] str               JSON: settings, the ids' sha256, timings, ablation
=====================  ===================  =================================================

``duplicate_token_control`` ([L, H]) holds the duplicate-token positions on the non-repeating
sequences. Detail checkpoints add ``k_composition``, ``k_baseline_mean``, ``k_baseline_sd``
([L, H, L, H], indexed [target layer, target head, source layer, source head]; likewise
``q_*`` and ``v_*`` when a catalog link declares Q- or V-composition,
:func:`mechgen.mechanisms.composition_kinds`),
``ablation_induction_before/_after_source/_after_control`` ([L, H]) with the scalars in the
record, ``link_ablations`` in the record, and ``cka_heads`` [m, 2] with ``cka_outputs``
[m, n_tokens, hd] (row 0 = the strongest 1-back head, then the random heads, then the other
mechanisms' strongest heads), ``cka_random`` [m] (bool: the row is a random head of the null),
and ``cka_strongest`` ({mechanism: [layer, head]}) and ``cka_tokens_sha256`` in the record.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mechgen.atomic import atomic_path

__all__ = [
    "CircuitResult",
    "add_circuit_columns",
    "empty_circuit",
    "load_circuit",
    "read_circuits",
    "strongest_head",
]


# ---------------------------------------------------------------------------------------------
# Circuit files


@dataclass
class CircuitResult:
    """The relational/configurational results of one checkpoint: ``arrays`` + ``record``."""

    arrays: dict[str, np.ndarray]
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def induction(self) -> np.ndarray:
        """[n_layers, n_heads] induction scores."""
        return self.arrays["induction"]

    @property
    def copying_accuracy(self) -> float:
        """Copying accuracy of the model (NaN without an LM head or with copying off)."""
        return float(self.arrays["copying_accuracy"])

    def layer_scores(self) -> dict[str, list[float]]:
        """``{score column: [value of layer 0, ..., layer L - 1]}`` of every layer-unit
        mechanism of the catalog whose array the file holds (the sidecar's ``layer_scores``)."""
        from mechgen.mechanisms import catalog

        return {
            m.score_column: [float(v) for v in self.arrays[m.score_column]]
            for m in catalog().values()
            if m.unit == "layer" and m.score_column in self.arrays
        }

    def save(self, path: str | Path) -> Path:
        """Write one ``.npz`` (arrays + the record as a JSON string); no pickles."""
        path = Path(path)
        # Into an open file: np.savez would append .npz to the temporary name.
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, record=np.array(json.dumps(self.record, default=str)), **self.arrays)
        return path


def load_circuit(path: str | Path) -> CircuitResult:
    """Read a file written by :meth:`CircuitResult.save` (``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files if key != "record"}
        record = json.loads(str(data["record"])) if "record" in data.files else {}
    return CircuitResult(arrays=arrays, record=record)


def read_circuits(paths: Sequence[str | Path]) -> dict[tuple[str, int], CircuitResult]:
    """``{(run, step): result}`` from files named ``.../<run>/step<N>.circuit.npz``.

    A missing checkpoint's file holds no arrays (:func:`empty_circuit`) and is skipped.
    """
    out: dict[tuple[str, int], CircuitResult] = {}
    for path in map(Path, paths):
        name = path.name
        if not (name.startswith("step") and name.endswith(".circuit.npz")):
            raise ValueError(f"{path}: not a <run>/step<N>.circuit.npz file")
        step = int(name[len("step") : -len(".circuit.npz")])
        result = load_circuit(path)
        if "induction" in result.arrays:
            out[(path.parent.name, step)] = result
    return out


def empty_circuit(reason: str) -> CircuitResult:
    """The circuit file of a checkpoint that was not scored (e.g. missing on the hub)."""
    return CircuitResult(arrays={}, record={"status": "missing", "reason": reason})


def add_circuit_columns(table: pd.DataFrame, result: CircuitResult | None) -> pd.DataFrame:
    """The per-head table with ``induction``, ``induction_control``, ``duplicate_token`` and
    ``duplicate_token_control`` (per head; the controls and duplicate-token where the result
    has them) and ``copying_accuracy`` (per checkpoint).

    Rows are matched on (layer, head); with ``result`` None the table is returned unchanged.
    """
    if result is None or table.empty:
        return table
    induction = result.induction
    out = table.copy()
    layers = out["layer"].to_numpy(dtype=int)
    heads = out["head"].to_numpy(dtype=int)
    if layers.max() >= induction.shape[0] or heads.max() >= induction.shape[1]:
        raise ValueError(
            f"circuit result has {induction.shape} heads; the table has heads outside it"
        )
    out["induction"] = induction[layers, heads].astype(float)
    if "induction_control" in result.arrays:
        out["induction_control"] = result.arrays["induction_control"][layers, heads].astype(float)
    for column in ("duplicate_token", "duplicate_token_control"):
        if column in result.arrays:
            out[column] = result.arrays[column][layers, heads].astype(float)
    out["copying_accuracy"] = result.copying_accuracy
    return out


def strongest_head(one_back: pd.DataFrame, metric: str = "one_back") -> tuple[int, int]:
    """(layer, head) with the largest finite, unflagged ``metric``; ties: lowest layer, then head."""
    usable = one_back[np.isfinite(one_back[metric].to_numpy(dtype=float))]
    if "nonfinite" in usable.columns:
        usable = usable[~usable["nonfinite"].astype(bool)]
    if usable.empty:
        raise ValueError(f"no head has a finite {metric}; cannot pick the strongest head")
    ordered = usable.sort_values(["layer", "head"], kind="stable")
    best = ordered.loc[ordered[metric].idxmax()]
    return int(best["layer"]), int(best["head"])
