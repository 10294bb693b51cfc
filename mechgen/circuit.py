"""Per-checkpoint relational and configurational scores, computed inside the scoring job.

The scoring job (:func:`mechgen.scoring.score_checkpoint`) loads a checkpoint once; this module
adds, to the same job and the same loaded model:

Every checkpoint (cheap)
------------------------
- ``induction_control`` per head: the induction score's positions on sequences whose second
  half does *not* repeat the first (:func:`positional_control`), which exposes heads that
  attend to the fixed offset L - 1 instead of matching content;
- ``duplicate_token`` per head, from the induction passes: mean over sequences and p of
  A[p, p - L], attention to the same token's earlier occurrence
  (:mod:`mechgen.mechanisms.duplicate_token`), and ``duplicate_token_control``, its positions
  on the positional control's sequences (same passes as ``induction_control``);
- ``induction`` per head and the model's in-context ``copying_accuracy``
  (:func:`mechgen.relational.score_induction`) on N sequences of L random token ids repeated
  twice (:func:`mechgen.relational.make_repeated_sequences`; ids from
  ``[token_lo, min(token_hi, vocab_size))`` with ``seed``; their seed, range and sha256 go into
  the sidecar, so a rerun scores the same ids). Induction score of a head = mean over sequences
  and second-half positions p of A[p, p - L + 1] (probability; uniform attention gives
  about 1/(p + 1), i.e. ~0.013 for L = 50).
- the relative-offset profile of every head on the evaluation text (mean attention to offsets
  0..``max_offset``; :func:`mechgen.configurational.offset_profile_hooks`), and the mean output
  z of every head (:func:`mechgen.relational.mean_head_output_hooks`, for mean ablation), both
  riding along the 1-back scorer's forward passes (:func:`ride_along`);
- the normalised (L2) singular-value spectra of every head's W_QK and W_OV
  (:func:`mechgen.configurational.head_spectra`);
- the W_Q, W_K factors of the ``qk_top_k`` heads with the largest ``one_back`` (for the
  stability of the strongest head's W_QK over training).

Detail checkpoints only (``detail_steps``; default the schedule's final step)
-----------------------------------------------------------------------------
- K-composition of every (earlier head -> later head) pair with its random-rotation baseline
  (:func:`mechgen.relational.composition_scores`, ``n_baseline`` draws);
- the mean-ablation causal test (:func:`mechgen.relational.causal_dependence`): the strongest
  1-back head (source) and a random head of its layer (control) are mean-ablated in turn and
  induction of the strongest later-layer induction head (target) and copying are re-measured;
- per-token outputs z (``[n_tokens, head_dim]``) on the first ``cka_max_tokens`` tokens of the
  evaluation text of the strongest 1-back head and of ``n_random_heads`` seeded random heads
  (same layer first; :func:`random_cka_heads`), for linear CKA across seeds.

The strongest 1-back head is the argmax of the just-computed ``one_back`` column (finite,
unflagged heads; ties to the lowest layer, then head, as in
:func:`mechgen.developmental.trajectories`).

Per suite (the ``relational`` rule; columns documented where they are defined)
-----------------------------------------------------------------------------
- :func:`relational_table` (``stats/relational.csv``, one row per seed: the run table of
  :func:`mechgen.relational.relational_run_table` + :data:`RELATIONAL_EXTRA_COLUMNS`),
  :func:`relational_sizes` (``relational_sizes.csv``: per size, the fraction of seeds where
  each of :data:`RELATIONS` holds, Wilson CI), :func:`relational_regressions`
  (``relational_regressions.csv``: lag and drops ~ log10(n_params) + (1|seed));
- :func:`configurational_table` (``configurational.csv``, :data:`CONFIGURATIONAL_COLUMNS`) and
  :func:`stability_table` (``configurational_stability.csv``, :data:`STABILITY_COLUMNS`).

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
                                            (:func:`positional_controls`; probability)
``duplicate_token``    [L, H]               mean A[p, p - L] on the [random]x2 sequences
``copying_accuracy``   []                   fraction of second-half positions copied (top-1)
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
record, and ``cka_heads`` [m, 2] with ``cka_outputs`` [m, n_tokens, hd] (row 0 = the strongest
1-back head) and ``cka_tokens_sha256`` in the record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mechgen.atomic import atomic_path
from mechgen.baselines import uniform_induction_baseline
from mechgen.mechanisms import composition_kinds
from mechgen.model import adapter as architectures
from mechgen.settings import CircuitSettings

__all__ = [
    "CIRCUIT_VERSION",
    "CircuitResult",
    "CircuitSettings",
    "RideAlong",
    "add_circuit_columns",
    "control_half",
    "eval_token_prefix",
    "load_circuit",
    "positional_control",
    "positional_controls",
    "random_cka_heads",
    "ride_along",
    "score_circuit",
    "strongest_head",
]

CIRCUIT_VERSION = 1
"""Bump when what a stored circuit array means changes (invalidates cached circuit results)."""


# ---------------------------------------------------------------------------------------------
# Riding along the 1-back scorer


@dataclass
class RideAlong:
    """Accumulators filled during the 1-back scorer's forward passes (see :func:`ride_along`)."""

    offsets: Any  # configurational.OffsetProfileAccumulator
    means: Any  # relational.MeanHeadOutputs


@contextlib.contextmanager
def ride_along(model: torch.nn.Module, settings: CircuitSettings) -> Iterator[RideAlong]:
    """Offset profiles and mean head outputs accumulated during any forward pass in the block.

    Wrap :func:`mechgen.metrics.score_heads` in it: the hooks are registered before the
    scorer's own hooks, so they run before the scorer stops the pass after the last layer's
    attention module (whose output projection, where z is read, has run by then).
    """
    from mechgen.configurational import offset_profile_hooks
    from mechgen.relational import mean_head_output_hooks

    with (
        offset_profile_hooks(model, settings.max_offset) as offsets,
        mean_head_output_hooks(model) as means,
    ):
        yield RideAlong(offsets=offsets, means=means)


# ---------------------------------------------------------------------------------------------
# Helpers


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


def random_cka_heads(
    n_layers: int, n_heads: int, reference: tuple[int, int], n: int, seed: int
) -> list[tuple[int, int]]:
    """``n`` heads other than ``reference`` for the CKA null, same layer first.

    Heads of the reference's layer are drawn uniformly without replacement
    (``numpy.random.default_rng(seed)``); when the layer has fewer than ``n`` other heads, the
    rest are drawn from the other layers with the same generator. Fewer than ``n`` if the
    model has fewer heads.
    """
    rng = np.random.default_rng(seed)
    layer = reference[0]
    same = [(layer, h) for h in range(n_heads) if h != reference[1]]
    other = [(l, h) for l in range(n_layers) if l != layer for h in range(n_heads)]
    picked = [same[i] for i in rng.permutation(len(same))[:n]]
    if len(picked) < n and other:
        picked += [other[i] for i in rng.permutation(len(other))[: n - len(picked)]]
    return picked


def eval_token_prefix(
    token_ids: Sequence[Sequence[int]], max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Right-padded ``[n, T]`` ids and mask of the first sentences holding <= ``max_tokens`` tokens.

    Sentences are taken in order while the running total stays within ``max_tokens`` (at least
    one). Returns (input_ids, attention_mask, sha256 of the kept ids as compact JSON), so two
    runs' per-token outputs can be checked to be row-aligned.
    """
    kept: list[list[int]] = []
    total = 0
    for sentence in token_ids:
        if kept and total + len(sentence) > max_tokens:
            break
        kept.append([int(t) for t in sentence])
        total += len(sentence)
    if not kept:
        raise ValueError("no evaluation sentence to compute head outputs on")
    length = max(len(s) for s in kept)
    ids = torch.zeros(len(kept), length, dtype=torch.long)
    mask = torch.zeros(len(kept), length, dtype=torch.long)
    for row, sentence in enumerate(kept):
        ids[row, : len(sentence)] = torch.tensor(sentence)
        mask[row, : len(sentence)] = 1
    digest = hashlib.sha256(json.dumps(kept, separators=(",", ":")).encode()).hexdigest()
    return ids, mask, digest


# ---------------------------------------------------------------------------------------------
# Result


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


# ---------------------------------------------------------------------------------------------
# The per-checkpoint scores


def positional_controls(
    model: torch.nn.Module, sequences: Any, seed: int, batch_size: int
) -> dict[str, np.ndarray]:
    """Per head: the induction and duplicate-token attention patterns on sequences that do
    *not* repeat, from one set of forward passes.

    Each sequence is ``sequences``' first half followed by L other random ids
    (:func:`control_half`). ``induction_control``[l, h] = mean over sequences and
    p = L..2L-1 of A[p, p - L + 1], exactly the induction score's positions: a content-based
    induction head scores near uniform (~1/(p + 1)) here; a head that merely attends to the
    fixed offset L - 1 (a shortcut fixed-period training data allows) scores as high as on the
    repeated sequences. ``duplicate_token_control``[l, h] = the same mean of A[p, p - L], the
    duplicate-token score's positions: a head that attends to the fixed offset L (not to the
    same token) scores as high here. Both [n_layers, n_heads], probability. The passes are
    :func:`mechgen.relational.score_continuations`' (the first halves, then the other halves
    against their cache); :func:`score_circuit` runs the other halves against the cache of the
    induction passes' first halves instead (the same values up to float rounding).
    """
    from mechgen.relational import score_continuations

    first_half = torch.from_numpy(sequences.first_half)
    other = torch.from_numpy(control_half(sequences))
    (control,) = score_continuations(model, first_half, [other], [False], batch_size)
    return _control_arrays(control)


def control_half(sequences: Any) -> np.ndarray:
    """The second halves of the positional controls' sequences, ``[N, L]``: a second
    :func:`mechgen.relational.make_repeated_sequences` draw with ``sequences``' seed + 1, same
    range, N and L."""
    from mechgen.relational import make_repeated_sequences

    other = make_repeated_sequences(
        sequences.lo, sequences.hi, sequences.n_sequences, sequences.half_length, sequences.seed + 1
    )
    return other.first_half


def _control_arrays(control: Any) -> dict[str, np.ndarray]:
    """The controls of :func:`positional_controls` from the control sequences' scores."""
    return {
        "induction_control": control.induction,
        "duplicate_token_control": control.duplicate_token,
    }


def positional_control(
    model: torch.nn.Module, sequences: Any, seed: int, batch_size: int
) -> np.ndarray:
    """``induction_control`` of :func:`positional_controls` ([n_layers, n_heads], probability)."""
    return positional_controls(model, sequences, seed, batch_size)["induction_control"]


def _timed(timings: dict[str, float], name: str, started: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - started, 4)
    return now


def score_circuit(
    model: torch.nn.Module,
    one_back: pd.DataFrame,
    ride: RideAlong,
    settings: CircuitSettings,
    token_ids: Sequence[Sequence[int]],
) -> CircuitResult:
    """Every relational/configurational score of one loaded checkpoint (see the module docstring).

    ``one_back``: the 1-back scorer's per-head table of this model (``layer``, ``head``,
    ``one_back``, ``nonfinite``); ``ride``: the accumulators filled during that scoring
    (:func:`ride_along`); ``token_ids``: the evaluation sentences (for the CKA outputs).
    """
    from mechgen.configurational import head_outputs, head_spectra, qk_factors
    from mechgen.relational import (
        causal_dependence,
        composition_scores,
        make_repeated_sequences,
        score_induction_with_control,
    )

    timings: dict[str, float] = {}
    started = time.perf_counter()
    adapter = architectures.for_model(model)
    n_layers, n_heads, _, _ = adapter.shape(model)
    hi = min(int(settings.token_hi), adapter.vocab_size(model))
    sequences = make_repeated_sequences(
        settings.token_lo, hi, settings.n_sequences, settings.half_length, settings.seed
    )
    sequence_record = sequences.sidecar()
    sequence_record.pop("token_ids")  # the seed, range and sha256 identify them
    # The induction and control sequences share their first halves: one pass of those per batch.
    induction, control = score_induction_with_control(
        model, sequences, control_half(sequences), settings.batch_size, settings.copying
    )
    controls = _control_arrays(control)
    started = _timed(timings, "induction_and_controls", started)

    spectra = head_spectra(model)
    strongest = strongest_head(one_back)
    top = (
        one_back[np.isfinite(one_back["one_back"].to_numpy(dtype=float))]
        .sort_values(["one_back", "layer", "head"], ascending=[False, True, True], kind="stable")
        .head(settings.qk_top_k)
    )
    qk_heads = [(int(r.layer), int(r.head)) for r in top.itertuples()]
    if strongest not in qk_heads:
        qk_heads = [strongest, *qk_heads[: settings.qk_top_k - 1]]
    factors = qk_factors(model, qk_heads)
    started = _timed(timings, "spectra_qk", started)

    arrays: dict[str, np.ndarray] = {
        "induction": induction.induction.astype(np.float64),
        "induction_control": controls["induction_control"].astype(np.float64),
        "duplicate_token": induction.duplicate_token.astype(np.float64),
        "duplicate_token_control": controls["duplicate_token_control"].astype(np.float64),
        "copying_accuracy": np.array(induction.copying_accuracy, dtype=np.float64),
        "offset_profile": np.asarray(ride.offsets.profile, dtype=np.float64),
        "qk_spectrum": spectra.qk.astype(np.float64),
        "ov_spectrum": spectra.ov.astype(np.float64),
        "strongest_one_back": np.array(strongest, dtype=np.int64),
        "qk_heads": np.array(qk_heads, dtype=np.int64).reshape(-1, 2),
        "qk_q": np.stack([factors[h][0] for h in qk_heads]).astype(np.float32),
        "qk_k": np.stack([factors[h][1] for h in qk_heads]).astype(np.float32),
    }
    record: dict[str, Any] = {
        "version": CIRCUIT_VERSION,
        "settings": settings.record(),
        "sequences": sequence_record,
        "copying_accuracy": induction.copying_accuracy,
        "strongest_one_back": list(strongest),
        "induction_max": float(np.nanmax(induction.induction)),
        "detail": settings.detail,
    }
    if settings.detail:
        # Every kind a catalog link declares (mechgen.links reads them per link); K alone today.
        compositions = composition_scores(
            model, kinds=composition_kinds(), n_baseline=settings.n_baseline
        )
        for kind, composition in compositions.items():
            arrays[f"{kind.lower()}_composition"] = composition.score
            arrays[f"{kind.lower()}_baseline_mean"] = composition.baseline_mean
            arrays[f"{kind.lower()}_baseline_sd"] = composition.baseline_sd
        started = _timed(timings, "composition", started)

        dependence = causal_dependence(
            model,
            sequences,
            strongest,
            ride.means.mean_z,
            control_seed=settings.control_seed,
            batch_size=settings.batch_size,
            baseline=induction,
            copying=settings.copying,
        )
        arrays["ablation_induction_before"] = dependence.induction_before_all
        arrays["ablation_induction_after_source"] = dependence.induction_after_source_all
        if dependence.induction_after_control_all is not None:
            arrays["ablation_induction_after_control"] = dependence.induction_after_control_all
        record["ablation"] = {
            k: (None if v is pd.NA else v) for k, v in dependence.as_row().items()
        }
        started = _timed(timings, "ablation", started)

        cka_heads = [
            strongest,
            *random_cka_heads(n_layers, n_heads, strongest, settings.n_random_heads, settings.seed),
        ]
        ids, mask, digest = eval_token_prefix(token_ids, settings.cka_max_tokens)
        outputs = head_outputs(model, ids, cka_heads, mask, settings.batch_size, space="z")
        arrays["cka_heads"] = np.array(cka_heads, dtype=np.int64)
        arrays["cka_outputs"] = np.stack([outputs[h].numpy() for h in cka_heads]).astype(np.float32)
        record["cka_tokens_sha256"] = digest
        record["cka_n_tokens"] = int(mask.sum())
        started = _timed(timings, "cka_outputs", started)
    record["seconds"] = timings
    record["seconds_total"] = round(sum(timings.values()), 4)
    return CircuitResult(arrays=arrays, record=record)


def settings_sha256(settings: CircuitSettings) -> str:
    """sha256 of the settings' canonical JSON and :data:`CIRCUIT_VERSION` (part of a cache key)."""
    payload = {"version": CIRCUIT_VERSION, **settings.record()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def finite_or_nan(value: Any) -> float:
    """``float(value)``, NaN for None/NA."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


# ---------------------------------------------------------------------------------------------
# Per-suite analysis (the `relational` rule)

RUN_ID_COLUMNS = ["suite", "model", "size", "seed", "run", "n_params"]

RELATIONAL_EXTRA_COLUMNS = [
    "detail_step",
    "ablation_source_layer",
    "ablation_source_head",
    "ablation_control_head",
    "ablation_target_layer",
    "ablation_target_head",
    "induction_before",
    "induction_after_source",
    "induction_after_control",
    "induction_drop",
    "control_induction_drop",
    "drop_minus_control",
    "drop_exceeds_control",
    "copying_before",
    "copying_drop",
    "control_copying_drop",
    "k_composition",
    "k_composition_baseline",
    "k_composition_corrected",
    "k_composition_z",
    "induction_control_at_head",
    "induction_content",
    "induction_positional",
    "induction_uniform",
    "induction_formed",
    "one_back_first",
    "expected_order",
]
"""Columns :func:`relational_table` adds to :data:`mechgen.relational.RUN_TABLE_COLUMNS`.

At the run's last detail step (``detail_step``): the mean-ablation test (source = the
strongest 1-back head, control = a random head of its layer, target = the strongest induction
head of a later layer; ``induction_*`` in attention probability, ``copying_*`` in accuracy;
``drop_minus_control`` = induction_drop - control_induction_drop; ``drop_exceeds_control`` =
drop_minus_control > 0), the K-composition of source -> target with its random-rotation
baseline mean, ``corrected`` = score - baseline and z = corrected / baseline SD.
``induction_control_at_head``: the strongest induction head's score at the final step on
non-repeating sequences (:func:`positional_control`); ``induction_content`` = induction_max -
that (attention probability: the part of the score that needs the repeat);
``induction_positional`` = control >= half the induction score (the "induction head" attends to
the fixed offset L - 1, not by content; NA without the control column, and NA when the score
is below twice the uniform level: then there is no head to call positional);
``induction_uniform`` = the uniform-attention level at the scored positions,
(1/L) sum_{p=L}^{2L-1} 1/(p + 1) with L = the run's ``relational.half_length`` (NaN when the
circuit records do not say); ``induction_formed`` = induction_max >= 2 x induction_uniform and
not positional (a content-based induction head exists; NA when the uniform level is unknown).
``one_back_first`` = lag_steps > 0 (the induction trajectory's onset after the 1-back one; NA
when either onset is undefined); ``expected_order`` = one_back_first and
one_back_earlier_layer and induction_formed (False when no induction head formed, else NA when
either of the first two is NA; an unknown induction_formed does not count against it).
"""


def _run_meta(heads: pd.DataFrame) -> pd.DataFrame:
    return heads.drop_duplicates("run")[RUN_ID_COLUMNS].reset_index(drop=True)


def detail_extra(circuits: Mapping[tuple[str, int], CircuitResult]) -> pd.DataFrame:
    """Per run: ablation and K-composition at the run's last detail step (see
    :data:`RELATIONAL_EXTRA_COLUMNS`); runs without a detail step are absent."""
    latest: dict[str, tuple[int, CircuitResult]] = {}
    for (run, step), result in circuits.items():
        if "k_composition" in result.arrays and (run not in latest or step > latest[run][0]):
            latest[run] = (step, result)
    rows = []
    for run, (step, result) in sorted(latest.items()):
        ablation = result.record.get("ablation", {})
        row: dict[str, Any] = {"run": run, "detail_step": step}
        for key in ("source_layer", "source_head", "control_head", "target_layer", "target_head"):
            row[f"ablation_{key}"] = ablation.get(key)
        for key in (
            "induction_before",
            "induction_after_source",
            "induction_after_control",
            "induction_drop",
            "control_induction_drop",
            "copying_before",
            "copying_drop",
            "control_copying_drop",
        ):
            row[key] = finite_or_nan(ablation.get(key))
        row["drop_minus_control"] = row["induction_drop"] - row["control_induction_drop"]
        row["drop_exceeds_control"] = (
            bool(row["drop_minus_control"] > 0)
            if math.isfinite(row["drop_minus_control"])
            else pd.NA
        )
        target_layer, target_head = ablation.get("target_layer"), ablation.get("target_head")
        source = (ablation.get("source_layer"), ablation.get("source_head"))
        if target_layer is not None and target_head is not None and None not in source:
            index = (int(target_layer), int(target_head), int(source[0]), int(source[1]))
            score = float(result.arrays["k_composition"][index])
            mean = float(result.arrays["k_baseline_mean"][index])
            sd = float(result.arrays["k_baseline_sd"][index])
            row.update(
                k_composition=score,
                k_composition_baseline=mean,
                k_composition_corrected=score - mean,
                k_composition_z=(score - mean) / sd if sd > 0 else math.nan,
            )
        else:
            row.update(
                k_composition=math.nan,
                k_composition_baseline=math.nan,
                k_composition_corrected=math.nan,
                k_composition_z=math.nan,
            )
        rows.append(row)
    columns = ["run", *RELATIONAL_EXTRA_COLUMNS[: RELATIONAL_EXTRA_COLUMNS.index("one_back_first")]]
    return pd.DataFrame(rows, columns=columns)


def relational_table(
    heads: pd.DataFrame,
    circuits: Mapping[tuple[str, int], CircuitResult],
    thresholds: np.ndarray,
) -> pd.DataFrame:
    """Per run: :func:`mechgen.relational.relational_run_table` + :data:`RELATIONAL_EXTRA_COLUMNS`.

    Onsets are :func:`mechgen.developmental.threshold_onset` (the reference study's onset, mean
    over ``thresholds`` of the first step whose rise per log10(step + 1) exceeds it) of the
    one_back and of the induction max-over-heads trajectories; lag = induction onset - 1-back
    onset (steps, and tokens).
    """
    from mechgen.developmental import threshold_onset
    from mechgen.relational import relational_run_table

    if "induction" not in heads.columns:
        raise ValueError(
            "the per-head table has no 'induction' column: score with relational.enabled: true"
        )

    def onset(steps: np.ndarray, values: np.ndarray) -> float:
        return threshold_onset(steps, values, thresholds)[0] if len(steps) >= 2 else math.nan

    table = relational_run_table(heads, onset, extra=detail_extra(circuits))
    control = []
    for row in table.itertuples():
        at_head = heads[
            (heads["run"] == row.run)
            & (heads["step"] == row.final_step)
            & (heads["layer"] == row.induction_layer)
            & (heads["head"] == row.induction_head)
        ]
        has_control = "induction_control" in heads.columns and len(at_head) == 1
        control.append(float(at_head["induction_control"].iloc[0]) if has_control else math.nan)
    table["induction_control_at_head"] = control
    table["induction_content"] = table["induction_max"] - table["induction_control_at_head"]
    table["induction_uniform"] = [
        uniform_induction_level(circuits, row.run, row.final_step) for row in table.itertuples()
    ]
    positional, formed = [], []
    for c, i, u in zip(
        table["induction_control_at_head"], table["induction_max"], table["induction_uniform"]
    ):
        above = bool(i >= 2 * u) if math.isfinite(u) else None
        positional.append(bool(c >= 0.5 * i) if math.isfinite(c) and above is not False else pd.NA)
        formed.append(
            pd.NA
            if above is None or (above and positional[-1] is pd.NA)
            else bool(above and not positional[-1])
        )
    table["induction_positional"] = pd.array(positional, dtype="boolean")
    table["induction_formed"] = pd.array(formed, dtype="boolean")
    lag = table["lag_steps"].astype(float)
    table["one_back_first"] = pd.array(
        [bool(v > 0) if math.isfinite(v) else pd.NA for v in lag], dtype="boolean"
    )
    # Without an induction head there is no order to find: onsets of a trajectory that never
    # leaves the uniform level are noise, so a run with induction_formed False is not counted.
    order = table["one_back_first"] & table["one_back_earlier_layer"].astype("boolean")
    table["expected_order"] = order & table["induction_formed"].fillna(True)
    for column in RELATIONAL_EXTRA_COLUMNS:
        if column not in table.columns:
            table[column] = pd.NA
    return table


def uniform_induction_level(
    circuits: Mapping[tuple[str, int], CircuitResult], run: str, step: Any
) -> float:
    """:func:`mechgen.baselines.uniform_induction_baseline` with L the ``half_length`` recorded
    in the run's circuit result at ``step`` (probability; NaN when that result or its settings
    record is missing)."""
    try:
        result = circuits.get((run, int(step)))
    except (TypeError, ValueError):
        return math.nan
    half = (result.record.get("settings") or {}).get("half_length") if result else None
    return uniform_induction_baseline(int(half)) if half else math.nan


RELATIONS = (
    "one_back_earlier_layer",
    "one_back_first",
    "drop_exceeds_control",
    "expected_order",
    "induction_positional",
    "induction_formed",
)
"""The boolean per-run relations whose per-size fractions :func:`relational_sizes` reports."""


def relational_sizes(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per size and relation: fraction of seeds where it holds, Wilson CI
    (:func:`mechgen.relational.relation_fraction_by_size`), stacked over :data:`RELATIONS`."""
    from mechgen.relational import relation_fraction_by_size

    frames = [
        relation_fraction_by_size(table, relation, confidence)
        for relation in RELATIONS
        if relation in table.columns and table[relation].notna().any()
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def relational_regressions(table: pd.DataFrame) -> pd.DataFrame:
    """Mixed models ``y ~ log10(n_params) + (1|seed)`` (REML, :func:`mechgen.stats.fit_mixed`)
    for y = lag_steps (onset lag, steps), induction_drop and drop_minus_control (attention
    probability). Runs with a NaN y are left out; a model that cannot be fitted (one size, one
    seed) is one row whose note says why (``mechgen.stats.REGRESSION_COLUMNS``)."""
    from mechgen.stats import fit_mixed

    data = table.assign(log10_n_params=np.log10(table["n_params"].astype(float)))
    frames = []
    for response in ("lag_steps", "induction_drop", "drop_minus_control"):
        values = pd.to_numeric(data[response], errors="coerce")
        frame = data.assign(**{response: values})[np.isfinite(values.to_numpy(dtype=float))]
        fit = fit_mixed(
            frame,
            f"{response} ~ log10_n_params",
            ["seed"],
            reml=True,
            analysis=f"relational_{response}",
            display_formula=f"{response} ~ log10(n_params) + (1|seed)",
            term_names={"Intercept": "(Intercept)", "log10_n_params": "log10(n_params)"},
        )
        left_out = int(len(data) - len(frame))
        if left_out:
            fit.note = "; ".join(filter(None, [fit.note, f"{left_out} run(s) with NaN left out"]))
        frames.append(fit.table())
    return pd.concat(frames, ignore_index=True)


CONFIGURATIONAL_COLUMNS = [
    "run_a",
    "model_a",
    "size_a",
    "seed_a",
    "step_a",
    "layer_a",
    "head_a",
    "run_b",
    "model_b",
    "size_b",
    "seed_b",
    "step_b",
    "layer_b",
    "head_b",
    "same_size",
    "qk_spectrum_similarity",
    "qk_spectrum_null_mean",
    "qk_spectrum_z",
    "qk_spectrum_p",
    "ov_spectrum_similarity",
    "ov_spectrum_null_mean",
    "ov_spectrum_z",
    "ov_spectrum_p",
    "profile_similarity",
    "profile_null_mean",
    "profile_z",
    "profile_p",
    "n_null",
    "aligned_head_b",
    "aligned_is_strongest",
    "cka",
    "cka_null_mean",
    "cka_z",
    "cka_p",
    "cka_n_null",
    "cka_aligned_head_b",
    "cka_aligned",
    "cka_note",
]
"""Columns of :func:`configurational_table`, one row per ordered pair of runs (A, B), A != B.

``layer/head_a``, ``layer/head_b``: the strongest 1-back head of each run at its last detail
step (``step_a``/``step_b``). Signatures are compared between A's and B's strongest heads
(the functional match, fixed before looking at any similarity), each against the null of
``n_null`` random head pairs (any head of A x any head of B, the tested pair excluded;
:func:`mechgen.configurational.similarity_vs_random_pairs`): ``*_similarity`` observed,
``*_null_mean``, ``*_z`` = (observed - null mean) / null SD, ``*_p`` = one-sided permutation p.
``qk_spectrum``/``ov_spectrum``: cosine of the L2-normalised singular-value spectra of W_QK /
W_OV (in [0, 1]); ``profile``: Pearson r of the offset profiles (attention to offsets 0..K on
the evaluation text). ``aligned_head_b``: the head of B's strongest layer that Hungarian
alignment (maximising summed profile similarity between the heads of A's and B's strongest
layers) pairs with A's strongest head; ``aligned_is_strongest``: it is B's strongest head.
``cka``: linear CKA of the per-token outputs z of A's and B's strongest heads on the same
evaluation tokens, against CKA of A's strongest with B's seeded random heads (``cka_n_null``
of them; with n null values the smallest possible p is 1/(n + 1)); ``cka_aligned_head_b`` /
``cka_aligned``: the stored head of B's strongest layer that Hungarian alignment on CKA pairs
with A's strongest, and that CKA (selected, so not tested). ``cka_note`` says why CKA is NaN
(different evaluation tokens, no detail step).
"""


def _flat_index(layer: int, head: int, n_heads: int) -> int:
    return layer * n_heads + head


def _last_detail(
    circuits: Mapping[tuple[str, int], CircuitResult],
) -> dict[str, tuple[int, CircuitResult]]:
    """Per run: (step, result) of its last detail step, else of its last step."""
    out: dict[str, tuple[int, CircuitResult, bool]] = {}
    for (run, step), result in circuits.items():
        detail = "cka_outputs" in result.arrays
        key = (detail, step)
        if run not in out or key > (out[run][2], out[run][0]):
            out[run] = (step, result, detail)
    return {run: (step, result) for run, (step, result, _) in out.items()}


def configurational_steps(
    circuits: Mapping[tuple[str, int], CircuitResult],
) -> dict[str, int]:
    """Per run, the step :func:`configurational_table` compares: its last detail step, else its
    last step."""
    return {run: step for run, (step, _) in _last_detail(circuits).items()}


def configurational_table(
    heads: pd.DataFrame,
    circuits: Mapping[tuple[str, int], CircuitResult],
    n_null: int = 1000,
    seed: int = 0,
    strongest: Mapping[tuple[str, int], tuple[int, int]] | None = None,
) -> pd.DataFrame:
    """Strongest 1-back head of every run vs that of every other run (see
    :data:`CONFIGURATIONAL_COLUMNS`).

    ``strongest``: ``{(run, step): (layer, head)}``, another mechanism's strongest head at the
    step compared (:func:`configurational_steps`), in place of the stored strongest 1-back
    head; a run without an entry is left out. CKA needs the head's saved outputs: it is NaN
    (``cka_note``) unless the head is the one whose outputs the scoring job saved first.
    """
    from mechgen.configurational import (
        align_by_similarity,
        cka_vs_random_heads,
        linear_cka,
        profile_similarity_matrix,
        similarity_vs_random_pairs,
        spectrum_similarity_matrix,
    )

    meta = _run_meta(heads).set_index("run")
    chosen = {run: v for run, v in _last_detail(circuits).items() if run in meta.index}
    rows = []
    for run_a, (step_a, a) in chosen.items():
        for run_b, (step_b, b) in chosen.items():
            if run_a == run_b:
                continue
            if strongest is not None and (
                (run_a, step_a) not in strongest or (run_b, step_b) not in strongest
            ):
                continue
            la, ha = (
                strongest[(run_a, step_a)]
                if strongest is not None
                else (int(x) for x in a.arrays["strongest_one_back"])
            )
            lb, hb = (
                strongest[(run_b, step_b)]
                if strongest is not None
                else (int(x) for x in b.arrays["strongest_one_back"])
            )
            n_heads_a = a.arrays["induction"].shape[1]
            n_heads_b = b.arrays["induction"].shape[1]
            pair = (_flat_index(la, ha, n_heads_a), _flat_index(lb, hb, n_heads_b))
            row: dict[str, Any] = {
                "run_a": run_a,
                "model_a": meta.at[run_a, "model"],
                "size_a": meta.at[run_a, "size"],
                "seed_a": meta.at[run_a, "seed"],
                "step_a": step_a,
                "layer_a": la,
                "head_a": ha,
                "run_b": run_b,
                "model_b": meta.at[run_b, "model"],
                "size_b": meta.at[run_b, "size"],
                "seed_b": meta.at[run_b, "seed"],
                "step_b": step_b,
                "layer_b": lb,
                "head_b": hb,
                "same_size": meta.at[run_a, "model"] == meta.at[run_b, "model"],
                "n_null": n_null,
            }
            for name in ("qk_spectrum", "ov_spectrum"):
                sa = a.arrays[name].reshape(-1, a.arrays[name].shape[-1])
                sb = b.arrays[name].reshape(-1, b.arrays[name].shape[-1])
                test = similarity_vs_random_pairs(
                    spectrum_similarity_matrix(sa, sb), pair, n_null, seed
                )
                row.update(
                    {
                        f"{name}_similarity": test.observed,
                        f"{name}_null_mean": test.null_mean,
                        f"{name}_z": test.z,
                        f"{name}_p": test.p_value,
                    }
                )
            pa = a.arrays["offset_profile"]
            pb = b.arrays["offset_profile"]
            profile_sim = profile_similarity_matrix(
                pa.reshape(-1, pa.shape[-1]), pb.reshape(-1, pb.shape[-1])
            )
            test = similarity_vs_random_pairs(profile_sim, pair, n_null, seed)
            row.update(
                profile_similarity=test.observed,
                profile_null_mean=test.null_mean,
                profile_z=test.z,
                profile_p=test.p_value,
            )
            within = profile_similarity_matrix(pa[la], pb[lb])
            match = align_by_similarity(within) if np.isfinite(within).any() else None
            aligned = int(match[ha]) if match is not None and match[ha] >= 0 else None
            row["aligned_head_b"] = aligned if aligned is not None else pd.NA
            row["aligned_is_strongest"] = (aligned == hb) if aligned is not None else pd.NA

            row.update(
                cka=math.nan,
                cka_null_mean=math.nan,
                cka_z=math.nan,
                cka_p=math.nan,
                cka_n_null=0,
                cka_aligned_head_b=pd.NA,
                cka_aligned=math.nan,
                cka_note="",
            )
            if "cka_outputs" not in a.arrays or "cka_outputs" not in b.arrays:
                row["cka_note"] = "no detail step with head outputs in one of the runs"
            elif (la, ha) != tuple(map(int, a.arrays["cka_heads"][0])) or (lb, hb) != tuple(
                map(int, b.arrays["cka_heads"][0])
            ):
                row["cka_note"] = "outputs saved for the strongest 1-back head, not this head"
            elif a.record.get("cka_tokens_sha256") != b.record.get("cka_tokens_sha256"):
                row["cka_note"] = (
                    "different evaluation tokens (tokenizers); outputs not row-aligned"
                )
            else:
                heads_a = [tuple(map(int, h)) for h in a.arrays["cka_heads"]]
                heads_b = [tuple(map(int, h)) for h in b.arrays["cka_heads"]]
                outputs_a, outputs_b = a.arrays["cka_outputs"], b.arrays["cka_outputs"]
                reference = outputs_a[0]  # row 0 is the strongest head
                test = cka_vs_random_heads(reference, outputs_b[0], list(outputs_b[1:])).test
                row.update(
                    cka=test.observed,
                    cka_null_mean=test.null_mean,
                    cka_z=test.z,
                    cka_p=test.p_value,
                    cka_n_null=test.n_null,
                )
                rows_a = [i for i, h in enumerate(heads_a) if h[0] == la]
                cols_b = [j for j, h in enumerate(heads_b) if h[0] == lb]
                cka_matrix = np.array(
                    [[linear_cka(outputs_a[i], outputs_b[j]) for j in cols_b] for i in rows_a]
                )
                cka_match = align_by_similarity(cka_matrix)
                matched = cka_match[rows_a.index(0)]
                if matched >= 0:
                    row["cka_aligned_head_b"] = heads_b[cols_b[matched]][1]
                    row["cka_aligned"] = float(cka_matrix[rows_a.index(0), matched])
            rows.append(row)
    return pd.DataFrame(rows, columns=CONFIGURATIONAL_COLUMNS)


STABILITY_COLUMNS = [
    "suite",
    "model",
    "size",
    "seed",
    "run",
    "step",
    "previous_step",
    "layer",
    "head",
    "qk_cosine",
    "qk_cosine_null_mean",
    "qk_cosine_n_null",
    "identity_fixed_from_step",
]
"""Columns of :func:`stability_table`: one row per run and consecutive checkpoint pair.

(layer, head) = the strongest 1-back head at ``step``; ``qk_cosine`` = cosine of its W_QK at
``previous_step`` and at ``step`` (:func:`mechgen.configurational.qk_cosine`; NaN if the head
was not among the ``qk_top_k`` heads saved at ``previous_step``); null: the mean cosine of its
W_QK at ``step`` with the other saved heads at ``previous_step`` (``qk_cosine_n_null`` of
them). ``identity_fixed_from_step``: the first step from which the strongest head stays the
same head to the end (:func:`mechgen.configurational.identity_fixed_from`), per run.
"""


def stability_table(
    heads: pd.DataFrame, circuits: Mapping[tuple[str, int], CircuitResult]
) -> pd.DataFrame:
    """W_QK stability of the strongest 1-back head over training (see :data:`STABILITY_COLUMNS`)."""
    from mechgen.configurational import identity_fixed_from, qk_cosine
    from mechgen.developmental import trajectories

    traj = trajectories(heads, "one_back")
    rows = []
    for run, run_traj in traj.groupby("run", sort=False):
        run_traj = run_traj.sort_values("step")
        fixed_from = identity_fixed_from(run_traj)
        factors: dict[int, dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]] = {}
        for step in run_traj["step"]:
            result = circuits.get((run, int(step)))
            if result is None:
                continue
            saved = [tuple(map(int, h)) for h in result.arrays["qk_heads"]]
            factors[int(step)] = {
                h: (result.arrays["qk_q"][i], result.arrays["qk_k"][i]) for i, h in enumerate(saved)
            }
        steps = run_traj["step"].to_numpy()
        for previous, (_, now) in zip(steps[:-1], run_traj.iloc[1:].iterrows()):
            head = (int(now["argmax_layer"]), int(now["argmax_head"]))
            current = factors.get(int(now["step"]), {}).get(head)
            before = factors.get(int(previous), {})
            cosine = (
                qk_cosine(before[head], current)
                if current is not None and head in before
                else math.nan
            )
            null = (
                [qk_cosine(f, current) for h, f in before.items() if h != head]
                if current is not None
                else []
            )
            rows.append(
                {
                    **{c: now[c] for c in ("suite", "model", "size", "seed", "run")},
                    "step": int(now["step"]),
                    "previous_step": int(previous),
                    "layer": head[0],
                    "head": head[1],
                    "qk_cosine": cosine,
                    "qk_cosine_null_mean": float(np.mean(null)) if null else math.nan,
                    "qk_cosine_n_null": len(null),
                    "identity_fixed_from_step": fixed_from,
                }
            )
    return pd.DataFrame(rows, columns=STABILITY_COLUMNS)


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
