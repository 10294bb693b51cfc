"""Per-checkpoint relational and configurational scores, computed inside the scoring job.

The scoring job (:func:`mechgen.scoring.job.score_checkpoint`) loads a checkpoint once; this module
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
  (:func:`mechgen.scoring.relational.score_induction_with_control`, which also runs the
  controls above: the repeated and the control sequences share their first halves, which run
  once per batch with a key/value cache) on N sequences of L random token ids repeated
  twice (:func:`mechgen.scoring.relational.make_repeated_sequences`; ids from
  ``[token_lo, min(token_hi, vocab_size))`` with ``seed``; their seed, range and sha256 go into
  the sidecar, so a rerun scores the same ids). Induction score of a head = mean over sequences
  and second-half positions p of A[p, p - L + 1] (probability; uniform attention gives
  about 1/(p + 1), i.e. ~0.013 for L = 50).
- ``in_context_retrieval`` per layer, read by hooks on every block during the repeated
  sequences' second-half pass (no extra pass): the fraction of positions p = L..2L-2 where
  the residual stream after the layer, through the final layernorm and the unembedding rows of
  the first-half ids, gives the next token the top logit
  (:mod:`mechgen.mechanisms.in_context_retrieval`; the sidecar's ``layer_scores``);
- the relative-offset profile of every head on the evaluation text (mean attention to offsets
  0..``max_offset``; :func:`mechgen.scoring.configurational.offset_profile_hooks`), and the mean output
  z of every head (:func:`mechgen.scoring.relational.mean_head_output_hooks`, for mean ablation), both
  riding along the 1-back scorer's forward passes (:func:`ride_along`);
- the normalised (L2) singular-value spectra of every head's W_QK and W_OV
  (:func:`mechgen.scoring.configurational.head_spectra`);
- the W_Q, W_K factors of the ``qk_top_k`` heads with the largest ``one_back`` (for the
  stability of the strongest head's W_QK over training).

Detail checkpoints only (``detail_steps``; default the schedule's final step)
-----------------------------------------------------------------------------
- K-composition of every (earlier head -> later head) pair with its random-rotation baseline
  (:func:`mechgen.scoring.relational.composition_scores`, ``n_baseline`` draws);
- the mean-ablation causal test (:func:`mechgen.scoring.relational.causal_dependence`): the strongest
  1-back head (source) and a random head of its layer (control) are mean-ablated in turn and
  induction of the strongest later-layer induction head (target) and copying are re-measured;
  the same test for every link of the catalog (:func:`link_ablations`, the record's
  ``link_ablations``): the source mechanism's strongest head is ablated (once per distinct
  source head: the 1-back head's passes are shared) and the target's score re-measured at the
  target's strongest later-layer head, where the target declares an ablation pass
  (``Mechanism.ablation_pass``; else "not applicable");
- per-token outputs z (``[n_tokens, head_dim]``) on the first ``cka_max_tokens`` tokens of the
  evaluation text of the strongest 1-back head, of ``n_random_heads`` seeded random heads
  (same layer as the 1-back head first; :func:`random_cka_heads`) and of the strongest head
  of every other head-level mechanism whose score the job has (:func:`mechanism_strongest_heads`;
  each head stored once, :func:`cka_head_rows`), for linear CKA across seeds.

The strongest 1-back head is the argmax of the just-computed ``one_back`` column (finite,
unflagged heads; ties to the lowest layer, then head, as in
:func:`mechgen.axes.developmental.trajectories`).

The files' keys are listed in :mod:`mechgen.tables.circuit_files`, the per-suite tables read from them
are in :mod:`mechgen.axes.circuit_tables` (both table-side, no torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from mechgen.mechanisms import Link, catalog, composition_kinds
from mechgen.mechanisms import get as get_mechanism
from mechgen.mechanisms import links as catalog_links
from mechgen.model import adapter as architectures
from mechgen.scoring.configurational import (
    head_outputs,
    head_spectra,
    offset_profile_hooks,
    qk_factors,
)
from mechgen.scoring.relational import (
    REPEATED_SEQUENCE_SCORES,
    ablation_passes,
    causal_dependence,
    composition_scores,
    link_effect,
    make_repeated_sequences,
    mean_head_output_hooks,
    score_continuations,
    score_induction_with_control,
)
from mechgen.settings import CircuitSettings
from mechgen.tables.circuit_files import CircuitResult, strongest_head

__all__ = [
    "CIRCUIT_VERSION",
    "CircuitSettings",
    "RideAlong",
    "cache_record",
    "cka_head_rows",
    "control_half",
    "eval_token_prefix",
    "link_ablations",
    "mechanism_strongest_heads",
    "per_head_scores",
    "positional_control",
    "positional_controls",
    "random_cka_heads",
    "ride_along",
    "score_circuit",
]

CIRCUIT_VERSION = 4
"""Bump when what a circuit file holds changes: it is part of the score cache key
(:func:`cache_record`), so every cached circuit result is then recomputed. 2: the
``link_ablations`` record (every declared link's mean-ablation test); 3: the per-token
outputs of every head-level mechanism's strongest head (``cka_random``, ``cka_strongest``);
4: the per-layer ``in_context_retrieval`` (a layer-unit mechanism)."""


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

    Wrap :func:`mechgen.scoring.metrics.score_heads` in it: the hooks are registered before the
    scorer's own hooks, so they run before the scorer stops the pass after the last layer's
    attention module (whose output projection, where z is read, has run by then).
    """
    with (
        offset_profile_hooks(model, settings.max_offset) as offsets,
        mean_head_output_hooks(model) as means,
    ):
        yield RideAlong(offsets=offsets, means=means)


# ---------------------------------------------------------------------------------------------
# Helpers


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


# ---------------------------------------------------------------------------------------------
# The per-checkpoint scores


def positional_controls(
    model: torch.nn.Module, sequences: Any, batch_size: int
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
    :func:`mechgen.scoring.relational.score_continuations`' (the first halves, then the other halves
    against their cache); :func:`score_circuit` runs the other halves against the cache of the
    induction passes' first halves instead (the same values up to float rounding).
    """
    first_half = torch.from_numpy(sequences.first_half)
    other = torch.from_numpy(control_half(sequences))
    (control,) = score_continuations(model, first_half, [other], [False], batch_size)
    return _control_arrays(control)


def control_half(sequences: Any) -> np.ndarray:
    """The second halves of the positional controls' sequences, ``[N, L]``: a second
    :func:`mechgen.scoring.relational.make_repeated_sequences` draw with ``sequences``' seed + 1, same
    range, N and L."""
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


def positional_control(model: torch.nn.Module, sequences: Any, batch_size: int) -> np.ndarray:
    """``induction_control`` of :func:`positional_controls` ([n_layers, n_heads], probability)."""
    return positional_controls(model, sequences, batch_size)["induction_control"]


def per_head_scores(one_back: pd.DataFrame, induction: Any) -> pd.DataFrame:
    """The scoring job's per-head table (``one_back``) with the repeated-sequence scores of
    ``induction`` (an :class:`mechgen.scoring.relational.InductionResult`; the fields of
    :data:`mechgen.scoring.relational.REPEATED_SEQUENCE_SCORES`) added as columns: every score whose
    strongest head the detail step can pick."""
    out = one_back.copy()
    layers = out["layer"].to_numpy(dtype=int)
    heads = out["head"].to_numpy(dtype=int)
    for name in REPEATED_SEQUENCE_SCORES:
        values = getattr(induction, name)
        if values is not None and name not in out.columns:
            out[name] = np.asarray(values, dtype=float)[layers, heads]
    return out


def mechanism_strongest_heads(scores: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """{mechanism: (layer, head)}: the strongest head (:func:`mechgen.tables.circuit_files.strongest_head` on its
    ``score_column``) of every head-level mechanism of the catalog whose score ``scores`` has
    for a finite, unflagged head, in catalog order."""
    out = {}
    for name, mechanism in catalog().items():
        column = mechanism.score_column
        if mechanism.unit != "head" or column not in scores.columns:
            continue
        with contextlib.suppress(ValueError):  # no finite, unflagged score: no strongest head
            out[name] = strongest_head(scores, column)
    return out


def cka_head_rows(
    strongest: tuple[int, int],
    random: Sequence[tuple[int, int]],
    mechanism_heads: Iterable[tuple[int, int]],
) -> list[tuple[int, int]]:
    """The heads whose per-token outputs a detail step stores, each once: the strongest 1-back
    head (row 0), the seeded random heads (the CKA null, rows 1..n as before other mechanisms
    had outputs), then each other mechanism's strongest head not already stored."""
    rows = [strongest, *random]
    for head in mechanism_heads:
        if head not in rows:
            rows.append(head)
    return rows


def link_ablations(
    model: torch.nn.Module,
    sequences: Any,
    scores: pd.DataFrame,
    links: Sequence[Link],
    dependence: Any,
    mean_z: torch.Tensor,
    settings: CircuitSettings,
) -> dict[str, dict[str, Any]]:
    """The mean-ablation test of every link, ``{"<source>-><target>": entry}`` (the circuit
    record's ``link_ablations``).

    A link whose target declares an ablation pass (``Mechanism.ablation_pass``) is
    ``measured``: the source mechanism's strongest head in ``scores`` (:func:`mechgen.tables.circuit_files.strongest_head`
    on its ``score_column``) and a same-layer control head (``settings.control_seed``) are
    mean-ablated in turn (:func:`mechgen.scoring.relational.ablation_passes`) and the target's score
    is re-measured at the target's strongest head in a later layer
    (:func:`mechgen.scoring.relational.link_effect`). The passes are shared: a source head already
    ablated (the strongest 1-back head, by ``dependence``, the
    :func:`mechgen.scoring.relational.causal_dependence` of the ``ablation`` record) is not ablated
    again. Otherwise the entry is ``not applicable`` (the target's score cannot be re-measured
    under ablation) or ``not measured`` (no source score at this checkpoint), with a ``note``.
    """
    passes = {dependence.source: dependence.passes}
    out: dict[str, dict[str, Any]] = {}
    for link in links:
        name = f"{link.source}->{link.target}"
        source, target = get_mechanism(link.source), get_mechanism(link.target)
        if target.ablation_pass is None:
            out[name] = {
                "status": "not applicable",
                "note": f"{target.name} declares no ablation pass: its score is not "
                "re-measured with a head mean-ablated",
            }
            continue
        if source.score_column not in scores.columns:
            out[name] = {
                "status": "not measured",
                "note": f"no {source.score_column} score at this checkpoint",
            }
            continue
        head = strongest_head(scores, source.score_column)
        if head not in passes:
            passes[head] = ablation_passes(
                model,
                sequences,
                head,
                mean_z,
                control_seed=settings.control_seed,
                batch_size=settings.batch_size,
                baseline=dependence.passes.before,
                copying=False,  # the links re-measure head scores, not copying
            )
        effect = link_effect(passes[head], target.score_column)
        later = effect["target_layer"] is not None
        out[name] = {
            "status": "measured" if later else "not measured",
            "note": "" if later else f"no {target.name} head in a layer after the source's",
            **effect,
        }
    return out


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
    links: Sequence[Link] | None = None,
) -> CircuitResult:
    """Every relational/configurational score of one loaded checkpoint (see the module docstring).

    ``one_back``: the 1-back scorer's per-head table of this model (``layer``, ``head``,
    ``one_back``, ``nonfinite``, and whatever other per-head scores the job has, e.g. the
    weight-based ones); ``ride``: the accumulators filled during that scoring
    (:func:`ride_along`); ``token_ids``: the evaluation sentences (for the CKA outputs);
    ``links``: the links whose mean-ablation test runs at a detail step (default: every link
    of the catalog, :func:`mechgen.mechanisms.links`, so the file does not depend on a suite's
    selection).
    """
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
        **(
            {"in_context_retrieval": induction.retrieval.astype(np.float64)}
            if induction.retrieval is not None
            else {}
        ),
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
        scores = per_head_scores(one_back, induction)
        # Every kind a catalog link declares (mechgen.axes.links reads them per link); K alone today.
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
        record["link_ablations"] = link_ablations(
            model,
            sequences,
            scores,
            catalog_links() if links is None else links,
            dependence,
            ride.means.mean_z,
            settings,
        )
        started = _timed(timings, "ablation", started)

        random = random_cka_heads(
            n_layers, n_heads, strongest, settings.n_random_heads, settings.seed
        )
        by_mechanism = mechanism_strongest_heads(scores)
        cka_heads = cka_head_rows(strongest, random, by_mechanism.values())
        ids, mask, digest = eval_token_prefix(token_ids, settings.cka_max_tokens)
        outputs = head_outputs(model, ids, cka_heads, mask, settings.batch_size, space="z")
        arrays["cka_heads"] = np.array(cka_heads, dtype=np.int64)
        arrays["cka_outputs"] = np.stack([outputs[h].numpy() for h in cka_heads]).astype(np.float32)
        arrays["cka_random"] = np.array([h in random for h in cka_heads], dtype=bool)
        record["cka_strongest"] = {name: list(head) for name, head in by_mechanism.items()}
        record["cka_tokens_sha256"] = digest
        record["cka_n_tokens"] = int(mask.sum())
        started = _timed(timings, "cka_outputs", started)
    record["seconds"] = timings
    record["seconds_total"] = round(sum(timings.values()), 4)
    return CircuitResult(arrays=arrays, record=record)


def cache_record(settings: CircuitSettings) -> dict[str, Any]:
    """What of the circuit scores goes into the score cache key
    (:func:`mechgen.scoring.job.score_cache_key`'s ``circuit``): the settings and
    :data:`CIRCUIT_VERSION`."""
    return {"circuit_version": CIRCUIT_VERSION, **settings.record()}


# ---------------------------------------------------------------------------------------------
# Per-suite analysis (the `relational` rule)
