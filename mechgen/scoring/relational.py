"""The relational axis inside the scoring job: does the previous-token (1-back) head feed an
induction head?

An induction circuit (Elhage et al. 2021; Olsson et al. 2022) is a previous-token head in an
earlier layer whose output a later head's *keys* read ("K-composition"): at a repeated token,
the later head attends to the token right after the earlier occurrence and copies it. This
module measures that circuit per checkpoint on a GPT-NeoX or GPT-2 model (transformers
``GPTNeoXForCausalLM`` or ``GPT2LMHeadModel`` loaded with ``attn_implementation="eager"``),
read only through its architecture adapter (:mod:`mechgen.model.adapter`), and summarises it
per run.

Per checkpoint (model-level, torch)
-----------------------------------
- :func:`make_repeated_sequences`: N sequences of L distinct token ids drawn from ``[lo, hi)``
  with a seeded ``numpy.random.Generator``, each repeated twice (length 2L).
- :func:`score_induction`: per head, the prefix-matching (induction) score = mean over
  sequences and second-half query positions p = L..2L-1 of the attention A[p, p - L + 1]
  (the token after the first occurrence of token p); per model, the in-context copying
  accuracy = fraction of positions p = L..2L-2 whose top-1 next-token prediction equals token
  p + 1 (= token p - L + 1); from the same hooks, the duplicate-token score = mean of
  A[p, p - L] (the same token's earlier occurrence; :func:`repeat_offset_attention`). Batched
  forward passes (equal lengths, no padding): the first halves once, with a key/value cache,
  then the second halves against it (:func:`score_continuations`, which
  :func:`score_induction_with_control` uses to score the non-repeating control sequences,
  which share the first halves, against the same cache); attention is reduced inside a hook
  on each layer so only one layer's attention is alive at a time, and the LM head runs only
  on the second half (or not at all with ``copying=False``). In the repeated second halves'
  pass, hooks on every block read the per-layer in-context retrieval accuracy
  (:attr:`InductionResult.retrieval`; :mod:`mechgen.mechanisms.in_context_retrieval`).
- :func:`composition_scores`: weight-space K-, Q- and V-composition between every head of an
  earlier layer and every head of a later layer, with a random-rotation baseline.
- :func:`mean_head_outputs` (or :func:`mean_head_output_hooks`, riding along the 1-back
  scorer's passes), :func:`mean_ablated`, :func:`causal_dependence`: mean-ablate a head's
  output and re-measure induction and copying (with a same-layer control head);
  :func:`ablation_passes` and :func:`link_effect`: the same passes, read for any score of
  :data:`REPEATED_SEQUENCE_SCORES` (the mean-ablation test of every declared link).

Per run (pandas, table-side): :func:`mechgen.axes.circuit_tables.relational_run_table` and
:func:`mechgen.axes.circuit_tables.relation_fraction_by_size`, which need no torch.

Weight layout
-------------
Per-head W_Q, W_K, W_V ``[n_heads, head_dim, d]`` and W_O ``[n_heads, d, head_dim]`` come from
the adapter, whatever the family stores (GPT-NeoX's fused ``query_key_value`` Linear, GPT-2's
transposed ``c_attn`` Conv1D: :mod:`mechgen.model.gpt_neox`, :mod:`mechgen.model.gpt2`). The
input of the output projection (the adapter's ``output_projection``) is the concatenation of
the per-head outputs z, feature ``h * head_dim + i``, which is where :func:`mean_ablated`
intervenes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from mechgen.model import adapter as architectures
from mechgen.model.base import (
    LayerNormWeights,
    attention_hooks,
    block_output_hooks,
    fork_cache,
    forward_body,
    new_cache,
)

__all__ = [
    "REPEATED_SEQUENCE_SCORES",
    "AblationPasses",
    "CausalDependence",
    "CompositionScores",
    "HeadWeights",
    "InductionResult",
    "MeanHeadOutputs",
    "RepeatedSequences",
    "ablation_passes",
    "causal_dependence",
    "composition_frame",
    "composition_scores",
    "head_weights",
    "induction_frame",
    "link_effect",
    "make_repeated_sequences",
    "mean_ablated",
    "mean_head_output_hooks",
    "mean_head_outputs",
    "real_queries_from_attention_mask",
    "repeat_offset_attention",
    "score_continuations",
    "score_induction",
    "score_induction_with_control",
    "strongest_later_head",
]

DEFAULT_N_SEQUENCES = 100
DEFAULT_HALF_LENGTH = 50
DEFAULT_N_BASELINE = 200
DEFAULT_INDUCTION_BATCH = 16
"""Sequences per forward pass of :func:`score_induction`. Measured on one CPU thread: the
Pythia-70m body over 100 x 100 tokens took 9.8 s in one batch and 5.7 s in batches of 16
(smaller activations stay in cache)."""
LOGITS_CHUNK_ELEMENTS = 2**24
"""The LM head runs on chunks of second-half positions holding at most this many logits
(64 MiB in float32), so copying accuracy of a 50k-vocabulary model does not need gigabytes."""

HeadId = tuple[int, int]
"""(layer, head), both 0-indexed."""


# ---------------------------------------------------------------------------------------------
# Model access


def model_body(model: torch.nn.Module, need_attention: bool = True) -> torch.nn.Module:
    """The transformer body of ``model`` (any family :mod:`mechgen.model.adapter` knows),
    validated by its adapter."""
    return architectures.for_model(model).body(model, need_attention)


def model_shape(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """(n_layers, n_heads, head_dim, d_model) of the model, from its adapter."""
    return architectures.for_model(model).shape(model)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def check_head(model: torch.nn.Module, head: HeadId, name: str) -> HeadId:
    n_layers, n_heads, _, _ = model_shape(model)
    try:
        layer, index = (int(head[0]), int(head[1]))
    except (TypeError, ValueError, IndexError):
        raise TypeError(f"{name} must be a (layer, head) pair of ints; got {head!r}") from None
    if not (0 <= layer < n_layers and 0 <= index < n_heads):
        raise ValueError(
            f"{name} = {head!r} is outside the model: layers 0..{n_layers - 1}, "
            f"heads 0..{n_heads - 1}"
        )
    return layer, index


# ---------------------------------------------------------------------------------------------
# Repeated random sequences


@dataclass(frozen=True)
class RepeatedSequences:
    """N sequences of L distinct token ids, each repeated twice: ``input_ids`` is ``[N, 2L]``.

    ``first_half`` ([N, L], int64) holds the ids, drawn uniformly without replacement from
    ``[lo, hi)`` by ``numpy.random.default_rng(seed)`` (one ``Generator.choice`` per row, in
    row order), so the same (seed, N, L, lo, hi) and numpy version give the same ids.
    """

    first_half: np.ndarray
    seed: int
    lo: int
    hi: int

    @property
    def n_sequences(self) -> int:
        """N, the number of sequences."""
        return int(self.first_half.shape[0])

    @property
    def half_length(self) -> int:
        """L, the length of each half (tokens)."""
        return int(self.first_half.shape[1])

    @property
    def input_ids(self) -> torch.Tensor:
        """``[N, 2L]`` int64: each row is its first half followed by the same ids again."""
        return torch.from_numpy(np.concatenate([self.first_half, self.first_half], axis=1))

    def sidecar(self) -> dict[str, Any]:
        """JSON-serialisable record: seed, range, N, L, numpy version, the ids and their sha256.

        ``sha256`` is over the C-ordered int64 little-endian bytes of ``first_half``.
        """
        ids = np.ascontiguousarray(self.first_half, dtype="<i8")
        return {
            "seed": self.seed,
            "lo": self.lo,
            "hi": self.hi,
            "n_sequences": self.n_sequences,
            "half_length": self.half_length,
            "numpy_version": np.__version__,
            "sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
            "token_ids": ids.tolist(),
        }


def make_repeated_sequences(
    lo: int,
    hi: int,
    n_sequences: int = DEFAULT_N_SEQUENCES,
    half_length: int = DEFAULT_HALF_LENGTH,
    seed: int = 0,
) -> RepeatedSequences:
    """N sequences of L distinct token ids from ``[lo, hi)``, each to be repeated twice.

    Each row is ``Generator.choice(hi - lo, size=L, replace=False) + lo`` with
    ``numpy.random.default_rng(seed)``, rows drawn in order. Distinct ids within a row make
    the previous occurrence of every second-half token unique. Choose ``[lo, hi)`` inside the
    ids the tokenizer actually produces (Pythia's embedding matrix is padded past the
    tokenizer's 50,277 ids; those rows are untrained).
    """
    for name, value in (
        ("lo", lo),
        ("hi", hi),
        ("n_sequences", n_sequences),
        ("half_length", half_length),
        ("seed", seed),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int; got {value!r}")
    if lo < 0 or hi <= lo:
        raise ValueError(f"token range [lo, hi) = [{lo}, {hi}) must satisfy 0 <= lo < hi")
    if n_sequences < 1:
        raise ValueError(f"n_sequences must be >= 1; got {n_sequences}")
    if half_length < 2:
        raise ValueError(f"half_length must be >= 2 tokens; got {half_length}")
    if half_length > hi - lo:
        raise ValueError(
            f"half_length ({half_length}) distinct ids cannot be drawn from [{lo}, {hi}) "
            f"({hi - lo} ids)"
        )
    rng = np.random.default_rng(seed)
    first_half = np.stack(
        [rng.choice(hi - lo, size=half_length, replace=False) + lo for _ in range(n_sequences)]
    ).astype(np.int64)
    return RepeatedSequences(first_half=first_half, seed=int(seed), lo=int(lo), hi=int(hi))


def _repeated_input_ids(
    sequences: RepeatedSequences | torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, int]:
    """Validated ``[N, 2L]`` ids and L."""
    input_ids = sequences.input_ids if isinstance(sequences, RepeatedSequences) else sequences
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.ndim != 2
        or input_ids.dtype not in (torch.int64, torch.int32)
    ):
        raise TypeError("sequences must be a RepeatedSequences or an integer tensor [N, 2L]")
    n_sequences, length = input_ids.shape
    if n_sequences < 1 or length < 4 or length % 2:
        raise ValueError(
            f"sequences must be [N >= 1, 2L] with L >= 2; got shape {tuple(input_ids.shape)}"
        )
    half = length // 2
    if not torch.equal(input_ids[:, :half], input_ids[:, half:]):
        raise ValueError("each sequence's second half must repeat its first half exactly")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size:
        raise ValueError(
            f"token ids must be in [0, {vocab_size}) (the model's vocabulary); got "
            f"[{int(input_ids.min())}, {int(input_ids.max())}]"
        )
    return input_ids.long(), half


# ---------------------------------------------------------------------------------------------
# Induction score and copying accuracy


@dataclass(frozen=True)
class InductionResult:
    """Induction scores of every head and the model's copying accuracy on repeated sequences.

    ``induction[layer, head]`` = (1/(N L)) sum_n sum_{p=L}^{2L-1} A_n[p, p - L + 1]
    (probability; uniform attention would give about 1/(p + 1)).
    ``copying_accuracy`` = fraction of the N (L - 1) positions p = L..2L-2 whose argmax logit
    is token p + 1; NaN when the model has no LM head.
    ``duplicate_token[layer, head]`` = (1/(N L)) sum_n sum_{p=L}^{2L-1} A_n[p, p - L], the
    attention to the same token's earlier occurrence, from the same forward passes
    (probability; None only for results built without it).
    ``retrieval[layer]`` = fraction of the N (L - 1) positions p = L..2L-2 at which the residual
    stream after ``layer``, through the final layernorm and the unembedding rows of the
    sequence's L first-half ids, gives token p + 1 the top logit (:func:`_retrieval_hits`;
    None where not computed).
    """

    induction: np.ndarray
    copying_accuracy: float
    n_sequences: int
    half_length: int
    duplicate_token: np.ndarray | None = None
    retrieval: np.ndarray | None = None


def repeat_offset_attention(attention: torch.Tensor, half: int, offset: int) -> torch.Tensor:
    """sum_b sum_{p=L}^{2L-1} A_b[h, p, p - offset] per head: ``[H]`` float64.

    ``attention``: probabilities of sequences of length 2L (L = ``half``), ``[B, H, 2L, 2L]``
    from a pass over the whole sequences, or ``[B, H, L, 2L]`` from a pass over the second
    halves against a cache of the first (row i is query L + i; :func:`score_continuations`).
    ``offset`` L - 1 reads the induction key (the token after the earlier occurrence of token
    p), ``offset`` L the duplicate-token key (the earlier occurrence itself). Divide by B x L
    for the mean over sequences and positions.
    """
    if (
        attention.ndim != 4
        or attention.shape[-1] != 2 * half
        or attention.shape[-2] not in (half, 2 * half)
    ):
        raise ValueError(
            f"attention must be [B, H, 2L, 2L] or [B, H, L, 2L] with L = {half}; got "
            f"{tuple(attention.shape)}"
        )
    if not 1 <= offset <= half:
        raise ValueError(f"offset must be in 1..L = 1..{half}; got {offset}")
    queries = torch.arange(half, 2 * half, device=attention.device)
    rows = queries - (2 * half - attention.shape[-2])  # query p's row: p, or p - L
    return attention[:, :, rows, queries - offset].sum(dim=(0, 2), dtype=torch.float64)


def forward_with_attention(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    on_attention: Callable[[int, torch.Tensor], None],
    need_hidden: bool = True,
    cache: Any = None,
) -> torch.Tensor | None:
    """Run the body once, calling ``on_attention(layer, probs [B, H, T, T_keys])`` per layer.

    Returns the final hidden states (after the final LayerNorm) ``[B, T, d]``; with
    ``need_hidden=False`` the pass stops after the last layer's attention and returns None.
    ``cache`` (:func:`mechgen.model.base.new_cache`): ``input_ids`` continue the sequences it
    holds (T_keys = the cached length + T) and the pass appends its keys and values to it.
    """
    adapter = architectures.for_model(model)
    last = None if need_hidden else adapter.shape(model)[0] - 1
    with attention_hooks(
        adapter, model, lambda layer, probs, _: on_attention(layer, probs), stop_after=last
    ):
        return forward_body(adapter, model, input_ids, cache=cache)


def _copying_hits(model: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor) -> int:
    """Count of positions whose argmax logit is their target: ``states`` ``[..., d]`` final
    hidden states (after the final LayerNorm), ``targets`` ``[...]`` token ids.

    The LM head runs on chunks of at most :data:`LOGITS_CHUNK_ELEMENTS` logits; a chunk whose
    every position :func:`_refuted_positions` proves a miss is skipped, every other chunk is
    computed and counted as a whole, so the count is the full-vocabulary argmax count.
    """
    adapter = architectures.for_model(model)
    lm_head = adapter.lm_head(model)
    flat_states = states.reshape(-1, states.shape[-1])
    flat_targets = targets.reshape(-1)
    refuted = _refuted_positions(lm_head, flat_states, flat_targets)
    rows_per_chunk = max(1, LOGITS_CHUNK_ELEMENTS // adapter.vocab_size(model))
    hits = 0
    for start in range(0, flat_states.shape[0], rows_per_chunk):
        if bool(refuted[start : start + rows_per_chunk].all()):
            continue  # no position of this chunk can be a hit
        predicted = lm_head(flat_states[start : start + rows_per_chunk]).argmax(dim=-1)
        hits += int((predicted == flat_targets[start : start + rows_per_chunk]).sum())
    return hits


def _retrieval_hits(
    residual: torch.Tensor,
    candidates: torch.Tensor,
    targets: torch.Tensor,
    final_norm: Any,
    unembedding: torch.Tensor,
) -> int:
    """Count of positions whose top candidate logit is their target.

    ``residual`` ``[B, P, d]``: the residual stream after one layer (before the final
    layernorm); ``candidates`` ``[B, C]``: each sequence's candidate ids; ``targets``
    ``[B, P]``: the next token ids; ``final_norm`` (the adapter's ``final_layernorm``) and
    ``unembedding`` ``[vocab, d]`` on the residual's device. The logit of candidate c at
    position p is ``W_U[candidates[b, c]] . LN_f(residual[b, p])`` (neither family has an
    unembedding bias); the argmax over c (ties to the first candidate) is a hit when its id is
    the target."""
    normed = final_norm(residual)  # float32 weights: promoted to the residual's dtype if wider
    rows = unembedding[candidates].to(normed.dtype)  # [B, C, d]
    logits = torch.einsum("bpd,bcd->bpc", normed, rows)
    predicted = torch.gather(candidates, 1, logits.argmax(dim=-1))
    return int((predicted == targets).sum())


REFUTING_ROWS = 2048
"""Unembedding rows (those of largest norm) :func:`_refuted_positions` scores first."""


def _refuted_positions(
    lm_head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Per position: True if some vocabulary row provably out-scores the target, so the full
    argmax cannot be the target (a miss, without the other logits).

    The :data:`REFUTING_ROWS` rows v of largest ||W_v|| are scored, with the target's own
    logit t; a position is refuted when ``max_v logit_v - t > margin``. Why this is exact:
    each logit computed in floating point, in any summation order, is within
    ``gamma (||h|| ||W_v|| + |b_v|)`` of its exact value, ``gamma = n u / (1 - n u)``, n = the
    width + 1 (bias), u the unit roundoff (Higham, Accuracy and Stability of Numerical
    Algorithms, 3.1). With ``margin = 4 gamma (||h|| max_v ||W_v|| + max_v |b_v|)`` the row
    that beats the target here beats it in the full-vocabulary product too, whose argmax is
    then not the target. Non-finite logits are never refuted (they go through the full
    product, as before). Until copying works most positions are refuted by a few rows; once
    it does, positions survive and the full product runs as before (plus this stage,
    REFUTING_ROWS / vocabulary of its cost).
    """
    weight = lm_head.weight
    bias = getattr(lm_head, "bias", None)
    vocab, width = weight.shape
    refuted = torch.zeros(states.shape[0], dtype=torch.bool, device=states.device)
    if vocab <= REFUTING_ROWS or states.shape[0] == 0:
        return refuted
    norms = torch.linalg.vector_norm(weight, dim=1)
    rows = torch.topk(norms, REFUTING_ROWS).indices
    candidates = weight[rows]
    unit = torch.finfo(states.dtype).eps / 2
    n = width + 1
    gamma = n * unit / (1 - n * unit)
    bias_max = float(bias.abs().max()) if bias is not None else 0.0
    weight_max = float(norms.max())
    step = max(1, LOGITS_CHUNK_ELEMENTS // REFUTING_ROWS)
    for start in range(0, states.shape[0], step):
        h = states[start : start + step]
        logits = h @ candidates.T
        target = (h * weight[targets[start : start + step]]).sum(dim=-1)
        if bias is not None:
            logits = logits + bias[rows]
            target = target + bias[targets[start : start + step]]
        margin = 4 * gamma * (torch.linalg.vector_norm(h, dim=-1) * weight_max + bias_max)
        refuted[start : start + step] = logits.max(dim=-1).values - target > margin
    return refuted


def score_induction(
    model: torch.nn.Module,
    sequences: RepeatedSequences | torch.Tensor,
    batch_size: int | None = DEFAULT_INDUCTION_BATCH,
    copying: bool = True,
) -> InductionResult:
    """Induction (prefix-matching) score of every head and in-context copying accuracy.

    ``sequences``: a :class:`RepeatedSequences` or an int tensor ``[N, 2L]`` whose halves are
    equal. Per head, score = (1/(N L)) sum_n sum_{p=L}^{2L-1} A_n[p, p - L + 1] where A_n is
    the head's attention on sequence n (for p = L the key is position 1, the token after the
    first occurrence of token L = token 0). The same passes give the duplicate-token score
    (1/(N L)) sum_n sum_{p=L}^{2L-1} A_n[p, p - L] (the earlier occurrence of token p itself;
    :func:`repeat_offset_attention`). Copying accuracy = (1/(N (L-1))) * #{(n, p):
    p in L..2L-2, argmax_v logits_n[p, v] = token_n[p + 1]}; the LM head runs only on those
    positions (in chunks). ``batch_size`` = sequences per forward pass (None: all at once;
    sequences have equal length so no padding is involved and batching does not change the
    result beyond float rounding). ``copying=False`` skips the LM head (copying accuracy NaN):
    for Pythia's 50k vocabulary the LM head on the N (L-1) positions costs more than the
    forward pass itself. The passes are :func:`score_continuations`' (the first half, then the
    second against its cache), which equal one pass over each whole sequence up to float
    rounding.
    """
    adapter = architectures.for_model(model)
    adapter.body(model, need_attention=True)
    input_ids, half = _repeated_input_ids(sequences, adapter.vocab_size(model))
    first_half = input_ids[:, :half]
    return score_continuations(model, first_half, [first_half], [copying], batch_size)[0]


def score_induction_with_control(
    model: torch.nn.Module,
    sequences: RepeatedSequences,
    control_half: np.ndarray | torch.Tensor,
    batch_size: int | None = DEFAULT_INDUCTION_BATCH,
    copying: bool = True,
    retrieval: bool = True,
) -> tuple[InductionResult, InductionResult]:
    """:func:`score_induction` on ``sequences`` and the same scores on the non-repeating
    sequences [first half, ``control_half``] (``[N, L]`` ids; copying accuracy NaN), sharing
    the first halves' passes (:func:`score_continuations`): each batch's first halves run once,
    then both second halves against their cache. The results equal those of the two separate
    calls up to float rounding. With ``retrieval``, the repeated sequences' result also holds
    the per-layer in-context retrieval accuracy (``retrieval``, read during their pass)."""
    adapter = architectures.for_model(model)
    adapter.body(model, need_attention=True)
    input_ids, half = _repeated_input_ids(sequences, adapter.vocab_size(model))
    first_half = input_ids[:, :half]
    control = torch.as_tensor(control_half)
    induction, controls = score_continuations(
        model, first_half, [first_half, control], [copying, False], batch_size, [retrieval, False]
    )
    return induction, controls


def score_continuations(
    model: torch.nn.Module,
    prefixes: torch.Tensor,
    continuations: Sequence[torch.Tensor],
    copying: Sequence[bool],
    batch_size: int | None = DEFAULT_INDUCTION_BATCH,
    retrieval: Sequence[bool] | None = None,
) -> list[InductionResult]:
    """:func:`score_induction`'s scores on the sequences [prefix, continuation] of each
    continuation, with the prefixes run once for all of them.

    ``prefixes`` and each of ``continuations``: int ``[N, L]`` (L >= 2). For continuation c,
    sequence n is S_n = [prefixes_n, c_n] (length 2L) and the result's ``induction`` [l, h] =
    (1/(N L)) sum_n sum_{p=L}^{2L-1} A_n[p, p - L + 1], ``duplicate_token`` the same mean of
    A_n[p, p - L], ``copying_accuracy`` = (1/(N (L-1))) #{(n, p): p in L..2L-2, argmax_v
    logits_n[p, v] = S_n[p + 1]} when ``copying`` says so for c and the model has an LM head,
    else NaN. Whether the offsets are the induction and duplicate-token keys depends on c: on
    a repeat of the prefix they are, on other ids they are the positional controls.
    ``retrieval`` (default: none) says per continuation whether to compute the per-layer
    in-context retrieval accuracy (:attr:`InductionResult.retrieval`; needs an LM head, else
    None): ``retrieval[l]`` = (1/(N (L-1))) #{(n, p): p in L..2L-2, the prefix id of largest
    logit ``W_U[id] . LN_f(x_n^l[p])`` is S_n[p + 1]}, x^l the residual stream after layer l
    (:func:`_retrieval_hits`), read by hooks on the blocks during the continuation's pass
    (:func:`mechgen.model.base.block_output_hooks`), which then runs through every layer.

    Per batch of ``batch_size`` sequences (None: all at once), the prefixes run once through
    every layer's attention (stopped there: nothing later feeds a cache) with a key/value cache
    (:func:`mechgen.model.base.new_cache`); each continuation then runs against that cache (a
    copy of it, but for the last). Under causal attention a prefix position computes the same
    whatever follows it, so every score equals that of one pass over the whole sequences up to
    float rounding, while the prefixes' cost is paid once instead of once per continuation.
    Attention is reduced inside a hook on each layer (:func:`repeat_offset_attention`), and the
    LM head runs only on positions L..2L-2 (:func:`_copying_hits`).
    """
    adapter = architectures.for_model(model)
    adapter.body(model, need_attention=True)
    vocab_size = adapter.vocab_size(model)
    prefixes = _continuation_ids(prefixes, vocab_size, "prefixes")
    n_sequences, half = prefixes.shape
    if half < 2:
        raise ValueError(f"prefixes must be [N >= 1, L >= 2]; got shape {tuple(prefixes.shape)}")
    continuations = [_continuation_ids(c, vocab_size, "continuations") for c in continuations]
    if any(c.shape != prefixes.shape for c in continuations):
        raise ValueError(
            f"every continuation must have the prefixes' shape {tuple(prefixes.shape)}; got "
            f"{[tuple(c.shape) for c in continuations]}"
        )
    if len(copying) != len(continuations):
        raise ValueError("copying must say, for each continuation, whether to count copying")
    retrieval = [False] * len(continuations) if retrieval is None else list(retrieval)
    if len(retrieval) != len(continuations):
        raise ValueError("retrieval must say, for each continuation, whether to compute it")
    batch_size = n_sequences if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    n_layers, n_heads, _, _ = adapter.shape(model)
    device = _device(model)
    prefixes = prefixes.to(device)
    continuations = [c.to(device) for c in continuations]
    has_lm_head = adapter.lm_head(model) is not None
    counts = [bool(wanted) and has_lm_head for wanted in copying]
    lens = [bool(wanted) and has_lm_head for wanted in retrieval]
    sums = torch.zeros(len(continuations), 2, n_layers, n_heads, dtype=torch.float64, device=device)
    hits = [0] * len(continuations)
    layer_hits = np.zeros((len(continuations), n_layers), dtype=np.int64)
    if any(lens):
        norm = adapter.final_layernorm(model)
        final_norm = LayerNormWeights(norm.weight.to(device), norm.bias.to(device), norm.eps)
        unembedding = adapter.unembedding(model).to(device)

    def on_attention_of(index: int) -> Callable[[int, torch.Tensor], None]:
        def on_attention(layer: int, attention: torch.Tensor) -> None:
            sums[index, 0, layer] += repeat_offset_attention(attention, half, half - 1)
            sums[index, 1, layer] += repeat_offset_attention(attention, half, half)

        return on_attention

    with eval_mode(model):
        for start in range(0, n_sequences, batch_size):
            stop = start + batch_size
            cache = new_cache()
            forward_with_attention(
                model, prefixes[start:stop], lambda *_: None, need_hidden=False, cache=cache
            )
            for index, continuation in enumerate(continuations):
                last = index == len(continuations) - 1
                batch = continuation[start:stop]
                hooks = contextlib.nullcontext()
                if lens[index]:
                    # Positions L..2L-2 (rows 0..L-2) against the batch's prefix ids.
                    def on_block(
                        layer: int,
                        residual: torch.Tensor,
                        index: int = index,
                        candidates: torch.Tensor = prefixes[start:stop],
                        targets: torch.Tensor = batch[:, 1:],
                    ) -> None:
                        layer_hits[index, layer] += _retrieval_hits(
                            residual[:, :-1], candidates, targets, final_norm, unembedding
                        )

                    hooks = block_output_hooks(adapter, model, on_block)
                with hooks:
                    hidden = forward_with_attention(
                        model,
                        batch,
                        on_attention_of(index),
                        need_hidden=counts[index] or lens[index],
                        cache=cache if last else fork_cache(cache),
                    )
                if counts[index]:
                    # Positions L..2L-2 (rows 0..L-2) predict tokens L+1..2L-1.
                    hits[index] += _copying_hits(model, hidden[:, :-1], batch[:, 1:])
    means = (sums / (n_sequences * half)).cpu().numpy()
    return [
        InductionResult(
            induction=means[index, 0],
            copying_accuracy=(
                hits[index] / (n_sequences * (half - 1)) if counts[index] else math.nan
            ),
            n_sequences=n_sequences,
            half_length=half,
            duplicate_token=means[index, 1],
            retrieval=(layer_hits[index] / (n_sequences * (half - 1)) if lens[index] else None),
        )
        for index in range(len(continuations))
    ]


def _continuation_ids(ids: Any, vocab_size: int, name: str) -> torch.Tensor:
    """Validated int64 ``[N >= 1, L]`` ids inside the vocabulary."""
    if isinstance(ids, np.ndarray):
        ids = torch.from_numpy(ids)
    if (
        not isinstance(ids, torch.Tensor)
        or ids.ndim != 2
        or ids.dtype not in (torch.int64, torch.int32)
        or ids.shape[0] < 1
    ):
        raise TypeError(f"{name} must be integer tensors [N >= 1, L]")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(
            f"{name}' token ids must be in [0, {vocab_size}) (the model's vocabulary); got "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )
    return ids.long()


def induction_frame(result: InductionResult) -> pd.DataFrame:
    """One row per (layer, head) with column ``induction``, to merge into the per-head table."""
    n_layers, n_heads = result.induction.shape
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    frame = pd.DataFrame(
        {"layer": layer.ravel(), "head": head.ravel(), "induction": result.induction.ravel()}
    )
    frame.attrs.update(
        copying_accuracy=result.copying_accuracy,
        n_sequences=result.n_sequences,
        half_length=result.half_length,
    )
    return frame


# ---------------------------------------------------------------------------------------------
# Weight-space composition


@dataclass(frozen=True)
class HeadWeights:
    """Per-head weight matrices of a model, float32, on the CPU.

    ``w_q``, ``w_k``, ``w_v``: ``[n_layers, n_heads, head_dim, d_model]`` *read* matrices
    (residual stream -> head space); ``w_o``: ``[n_layers, n_heads, d_model, head_dim]``
    (head output z -> residual stream). With ``folded_layernorm``, each read matrix W of
    layer l is ``W diag(gamma_l) P`` where gamma_l is the gain of layer l's
    ``input_layernorm`` and P = I - 11^T/d the centring LayerNorm applies, so that
    ``W LN(x) = (W diag(gamma) P) x / sigma(x) + W beta`` exactly; the position-dependent
    1/sigma(x) is a scalar per token and cancels in every normalised score here, and the
    LayerNorm bias beta (like the q/k/v/dense biases) is a constant offset, ignored.
    """

    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    w_o: torch.Tensor
    folded_layernorm: bool


def head_weights(model: torch.nn.Module, fold_layernorm: bool = True) -> HeadWeights:
    """Every layer's per-head read and write matrices, from the model's adapter
    (:meth:`mechgen.model.base.ArchitectureAdapter.qkv_weights` and ``output_weights``).

    With ``fold_layernorm`` the gain and centring of the layer's input layernorm (the adapter's
    ``input_layernorm``) are folded into the read matrices (see :class:`HeadWeights`). With
    GPT-NeoX's parallel residual attention and MLP of a layer read the same residual stream,
    and with GPT-2's sequential residual a head reads only earlier layers' outputs too, so in
    both only heads of *earlier* layers can compose with a head.
    """
    adapter = architectures.for_model(model)
    n_layers, _, _, _ = adapter.shape(model)
    w_q, w_k, w_v, w_o = [], [], [], []
    with torch.no_grad():
        for index in range(n_layers):
            q, k, v = adapter.qkv_weights(model, index)
            if fold_layernorm:
                gain = adapter.input_layernorm(model, index).weight
                q, k, v = (_fold_gain_and_centre(m, gain) for m in (q, k, v))
            w_q.append(q)
            w_k.append(k)
            w_v.append(v)
            w_o.append(adapter.output_weights(model, index))
    return HeadWeights(
        w_q=torch.stack(w_q),
        w_k=torch.stack(w_k),
        w_v=torch.stack(w_v),
        w_o=torch.stack(w_o),
        folded_layernorm=fold_layernorm,
    )


def _fold_gain_and_centre(read: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    # (W diag(gamma)) P = W diag(gamma) - (W diag(gamma)) 1 1^T / d: subtract each row's mean.
    scaled = read * gain
    return scaled - scaled.mean(dim=-1, keepdim=True)


def r_factor(matrix_t: torch.Tensor) -> torch.Tensor:
    """R of the reduced QR of ``matrix_t`` [..., d, head_dim]: ``matrix_t = Q R``, R [..., hd, hd].

    Used to shrink a d x d circuit to head_dim x d without changing Frobenius norms: if
    W^T = Q R then ||W^T X||_F = ||R X||_F for any X, since Q has orthonormal columns.
    """
    return torch.linalg.qr(matrix_t.double(), mode="r").R.float()


@dataclass(frozen=True)
class _CompositionFactors:
    """Reduced factors [n_layers, n_heads, head_dim, d] (reader) and [.., d, head_dim] (writer).

    For reader A_h2 and writer B_h1, ||A_h2 B_h1||_F equals the Frobenius norm of the d x d
    product of circuits the score is defined on, and ||A||_F, ||B||_F equal the circuits' norms.
    """

    readers: dict[str, torch.Tensor]
    writer: torch.Tensor


def _composition_factors(weights: HeadWeights, kinds: Sequence[str]) -> _CompositionFactors:
    # W_QK = W_Q^T W_K = Q_Q R_Q W_K  ->  reader K: R_Q W_K  (K-composition: W_QK W_OV)
    # W_QK^T = W_K^T W_Q = Q_K R_K W_Q -> reader Q: R_K W_Q  (Q-composition: W_QK^T W_OV)
    # W_OV = W_O W_V = Q_O R_O W_V     -> reader V: R_O W_V  (V-composition: W_OV2 W_OV1)
    # W_OV = W_O W_V = W_O R_V^T Q_V^T -> writer:  W_O R_V^T
    readers: dict[str, torch.Tensor] = {}
    if "K" in kinds:
        readers["K"] = r_factor(weights.w_q.transpose(-1, -2)) @ weights.w_k
    if "Q" in kinds:
        readers["Q"] = r_factor(weights.w_k.transpose(-1, -2)) @ weights.w_q
    if "V" in kinds:
        readers["V"] = r_factor(weights.w_o) @ weights.w_v
    writer = weights.w_o @ r_factor(weights.w_v.transpose(-1, -2)).transpose(-1, -2)
    return _CompositionFactors(readers=readers, writer=writer)


@dataclass(frozen=True)
class CompositionScores:
    """Composition of every (source head, later target head) pair, with a rotation baseline.

    Arrays are ``[n_layers, n_heads, n_layers, n_heads]`` indexed
    ``[target_layer, target_head, source_layer, source_head]``; entries with
    source_layer >= target_layer are NaN (a parallel-residual layer cannot read its own
    heads), as are pairs where either circuit is zero.
    ``score`` = ||C_target . W_OV^source||_F / (||C_target||_F ||W_OV^source||_F) with
    C = W_QK (kind K), W_QK^T (kind Q) or W_OV (kind V). ``baseline_mean``/``baseline_sd``:
    mean and SD of the same score with W_OV^source replaced by R W_OV^source R^T, R a
    Haar-random rotation of the residual stream (``n_baseline`` draws, ``seed``).
    """

    kind: str
    score: np.ndarray
    baseline_mean: np.ndarray
    baseline_sd: np.ndarray
    n_baseline: int
    seed: int
    folded_layernorm: bool

    @property
    def corrected(self) -> np.ndarray:
        """score - baseline_mean: composition beyond what unrelated subspaces give."""
        return self.score - self.baseline_mean

    @property
    def z(self) -> np.ndarray:
        """(score - baseline_mean) / baseline_sd."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.corrected / self.baseline_sd


def composition_scores(
    model: torch.nn.Module | HeadWeights,
    kinds: Sequence[Literal["K", "Q", "V"]] = ("K",),
    n_baseline: int = DEFAULT_N_BASELINE,
    seed: int = 0,
    fold_layernorm: bool = True,
) -> dict[str, CompositionScores]:
    """Weight-space composition (Elhage et al. 2021) between heads of earlier and later layers.

    For a source head h1 in layer l1 and a target head h2 in layer l2 > l1, with
    W_QK = W_Q^T W_K and W_OV = W_O W_V (d_model x d_model, LayerNorm gain and centring
    folded into the read matrices W_Q, W_K, W_V if ``fold_layernorm``):

    - K-composition = ||W_QK^h2 W_OV^h1||_F / (||W_QK^h2||_F ||W_OV^h1||_F): how much of what
      h1 writes the keys of h2 read (the previous-token -> induction link);
    - Q-composition = ||W_QK^h2^T W_OV^h1||_F / (...): the same for the queries;
    - V-composition = ||W_OV^h2 W_OV^h1||_F / (||W_OV^h2||_F ||W_OV^h1||_F).

    All scores are in [0, 1] (dimensionless). Each pair is computed exactly through
    head_dim x d factors (QR of the per-head matrices), never forming d x d products, in one
    matrix product per target layer.

    Choices, and what they mean for the result:

    - Biases (q/k/v/dense and LayerNorm beta) are ignored: they add constants to scores and
      outputs, not a read/write of the residual stream.
    - Rotary embeddings: the attention score of query i and key j is
      x_i^T W_Q^T R(j - i) W_K x_j, with R a rotation of the first ``rotary_ndims`` head
      dimensions. The scores use W_QK at relative offset 0 (R = I), i.e. the rotation is
      ignored. Consequence: K- and Q-composition describe the content part of the QK circuit
      at offset 0; a head whose keys read a subspace through a rotary phase that is only
      large at other offsets is scored as if at offset 0. The K-side factor alone,
      ||W_K W_OV||, is offset-invariant (R is orthogonal), but the normalised product is not.
    - Paths through MLPs (and the parallel residual) are not part of the score: it is the
      direct path from h1's output to h2's input only.

    Baseline: the same score with W_OV^h1 replaced by R W_OV^h1 R^T for Haar-random
    rotations R of the residual stream, the composition expected between unrelated
    subspaces of the same singular spectra (its squared value has mean exactly 1/d_model).
    It is sampled exactly but cheaply: with C = U_C S_C V_C^T and W_OV = U S V^T,
    ||C R W_OV||_F^2 = sum_ij s_C,i^2 s_j^2 G_ij^2 where G = V_C^T R U is distributed as the
    top-left head_dim x head_dim block of a Haar orthogonal matrix, drawn as the first
    head_dim rows of the Q of a Gaussian d x head_dim matrix (one G per draw, shared by all
    pairs of that draw; ``numpy.random.default_rng(seed)``).

    ``model`` may be a loaded model (any adapter family) or precomputed :class:`HeadWeights`
    (whose own ``folded_layernorm`` then applies). Returns ``{kind: CompositionScores}``.
    """
    kinds = list(dict.fromkeys(kinds))
    if not kinds or any(kind not in ("K", "Q", "V") for kind in kinds):
        raise ValueError(f"kinds must be a non-empty subset of 'K', 'Q', 'V'; got {kinds!r}")
    if isinstance(n_baseline, bool) or not isinstance(n_baseline, int) or n_baseline < 2:
        raise ValueError(f"n_baseline must be an int >= 2; got {n_baseline!r}")
    weights = model if isinstance(model, HeadWeights) else head_weights(model, fold_layernorm)
    n_layers, n_heads, head_dim, d_model = weights.w_q.shape
    factors = _composition_factors(weights, kinds)
    writer = factors.writer  # [L, H, d, hd]
    writer_norm = torch.linalg.matrix_norm(writer).double()  # [L, H]
    writer_flat = writer.permute(2, 0, 1, 3).reshape(d_model, n_layers * n_heads * head_dim)

    baseline_draws = _haar_block_squares(d_model, head_dim, n_baseline, seed)  # [n, hd, hd]
    writer_spectrum = _normalised_squared_spectrum(writer)  # [L*H, hd]

    results: dict[str, CompositionScores] = {}
    for kind in kinds:
        reader = factors.readers[kind]  # [L, H, hd, d]
        reader_norm = torch.linalg.matrix_norm(reader).double()
        score = torch.full((n_layers, n_heads, n_layers, n_heads), math.nan, dtype=torch.float64)
        for target_layer in range(1, n_layers):
            n_sources = target_layer * n_heads * head_dim
            product = (
                reader[target_layer].reshape(n_heads * head_dim, d_model)
                @ writer_flat[:, :n_sources]
            )
            blocks = product.view(n_heads, head_dim, target_layer, n_heads, head_dim)
            norms = torch.linalg.vector_norm(blocks.double(), dim=(1, 4))  # [H, l1, H]
            denominator = (
                reader_norm[target_layer][:, None, None] * writer_norm[:target_layer][None]
            )
            score[target_layer, :, :target_layer] = norms / denominator
        baseline_mean, baseline_sd = _rotation_baseline(
            _normalised_squared_spectrum(reader), writer_spectrum, baseline_draws
        )
        shape = (n_layers, n_heads, n_layers, n_heads)
        valid = torch.isfinite(score).numpy()
        results[kind] = CompositionScores(
            kind=kind,
            score=score.numpy(),
            baseline_mean=np.where(valid, baseline_mean.reshape(shape), np.nan),
            baseline_sd=np.where(valid, baseline_sd.reshape(shape), np.nan),
            n_baseline=n_baseline,
            seed=int(seed),
            folded_layernorm=weights.folded_layernorm,
        )
    return results


def finite_svdvals(matrices: torch.Tensor) -> torch.Tensor:
    """Singular values of each matrix of a batch ``[..., a, b]`` in float64, NaN for a matrix
    with a non-finite entry: a checkpoint with NaN/inf weights in one head (flagged
    ``nonfinite`` by the scorer) must not make the SVD of every head fail."""
    matrices = matrices.double()
    finite = torch.isfinite(matrices).flatten(-2).all(-1)
    singular = torch.linalg.svdvals(torch.where(finite[..., None, None], matrices, 0.0))
    return torch.where(finite[..., None], singular, torch.nan)


def _normalised_squared_spectrum(matrices: torch.Tensor) -> torch.Tensor:
    """s_i^2 / sum_j s_j^2 of each matrix [L, H, a, b] -> [L*H, min(a, b)] float64 (NaN if zero)."""
    singular = finite_svdvals(matrices).reshape(-1, min(matrices.shape[-2:]))
    squares = singular**2
    return squares / squares.sum(dim=1, keepdim=True)


def _haar_block_squares(d_model: int, head_dim: int, n_draws: int, seed: int) -> torch.Tensor:
    """Squared entries of the top-left head_dim x head_dim block of n Haar d x d rotations.

    float64 ``[n_draws, head_dim, head_dim]``; Gaussians from ``numpy.random.default_rng(seed)``.
    """
    if head_dim > d_model:
        raise ValueError(f"head_dim ({head_dim}) cannot exceed d_model ({d_model})")
    rng = np.random.default_rng(seed)
    blocks = []
    # torch, not numpy, for the linear algebra here: torch honours torch.set_num_threads,
    # numpy's BLAS does not and oversubscribes a shared machine's cores (measured: a
    # 256 x 64 numpy QR took 0.16 s under load). Chunks bound the memory at ~64 MiB.
    chunk = max(1, 2**23 // (d_model * head_dim))
    for start in range(0, n_draws, chunk):
        size = min(chunk, n_draws - start)
        gaussian = torch.from_numpy(rng.standard_normal((size, d_model, head_dim)))
        # The Q of a Gaussian matrix is a uniformly random orthonormal frame up to column
        # signs, which squaring removes.
        frames = torch.linalg.qr(gaussian).Q
        blocks.append(frames[:, :head_dim] ** 2)
    return torch.cat(blocks)


def _rotation_baseline(
    reader_spectrum: torch.Tensor, writer_spectrum: torch.Tensor, draws: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and SD over draws of sqrt(a^T G2 b) for every (reader a, writer b) pair."""
    total = torch.zeros(reader_spectrum.shape[0], writer_spectrum.shape[0], dtype=torch.float64)
    total_squares = torch.zeros_like(total)
    for block_squares in draws:
        squared = (reader_spectrum @ block_squares @ writer_spectrum.T).clamp(min=0.0)
        total += squared.sqrt()
        total_squares += squared
    n_draws = len(draws)
    mean = total / n_draws
    variance = ((total_squares - n_draws * mean**2) / (n_draws - 1)).clamp(min=0.0)
    return mean.numpy(), variance.sqrt().numpy()


def composition_frame(
    scores: CompositionScores, pairs: Sequence[tuple[HeadId, HeadId]] | None = None
) -> pd.DataFrame:
    """Tidy rows of one :class:`CompositionScores`: one per (source head, target head) pair.

    Columns: kind, source_layer, source_head, target_layer, target_head, score,
    baseline_mean, baseline_sd, corrected, z. ``pairs`` = [((source_layer, source_head),
    (target_layer, target_head)), ...] restricts the rows (default: every defined pair).
    """
    n_layers, n_heads = scores.score.shape[:2]
    if pairs is None:
        index = np.argwhere(np.isfinite(scores.score))
    else:
        index = np.array([[t[0], t[1], s[0], s[1]] for s, t in pairs], dtype=int).reshape(-1, 4)
        if index.size and (
            (index < 0).any()
            or (index[:, [0, 2]] >= n_layers).any()
            or (index[:, [1, 3]] >= n_heads).any()
        ):
            raise ValueError(f"a pair is outside {n_layers} layers x {n_heads} heads: {pairs!r}")
    take = tuple(index.T) if index.size else (np.array([], int),) * 4
    return pd.DataFrame(
        {
            "kind": scores.kind,
            "source_layer": index[:, 2],
            "source_head": index[:, 3],
            "target_layer": index[:, 0],
            "target_head": index[:, 1],
            "score": scores.score[take],
            "baseline_mean": scores.baseline_mean[take],
            "baseline_sd": scores.baseline_sd[take],
            "corrected": scores.corrected[take],
            "z": scores.z[take],
        }
    )


# ---------------------------------------------------------------------------------------------
# Causal dependence: mean ablation


def real_queries_from_attention_mask(
    mask: torch.Tensor | None, batch: int, length: int
) -> torch.Tensor | None:
    """[B, T] bool: which query positions are real tokens, from the mask an attention module gets.

    transformers passes the attention module (GPT-NeoX and GPT-2 alike) a 4-D mask
    ``[B or 1, 1, T, T]``: boolean (True = may attend) or additive (0 = may attend, the dtype's
    minimum = masked). A padded query may not attend to itself, so the diagonal marks real
    queries. A 2-D ``[B, T]``
    mask (1 = real) is passed through; None (no mask) gives None, i.e. all real.
    """
    if mask is None:
        return None
    if mask.ndim == 2:
        if tuple(mask.shape) != (batch, length):
            raise ValueError(
                f"attention_mask must be [B, T] = {(batch, length)}; got {tuple(mask.shape)}"
            )
        return mask.bool()
    if mask.ndim == 4 and mask.shape[-1] == mask.shape[-2] == length:
        diagonal = mask[:, 0].diagonal(dim1=-2, dim2=-1)
        allowed = (
            diagonal.bool()
            if mask.dtype == torch.bool
            else diagonal > torch.finfo(mask.dtype).min / 2
        )
        return allowed.expand(batch, length)
    raise ValueError(
        f"attention_mask must be [B, T] or [B, 1, T, T]; got shape {tuple(mask.shape)}"
    )


class MeanHeadOutputs:
    """Running sums of every head's output z over real tokens, filled by :func:`mean_head_output_hooks`."""

    def __init__(self, n_layers: int, n_heads: int, head_dim: int, device: torch.device) -> None:
        self.sums = torch.zeros(n_layers, n_heads, head_dim, dtype=torch.float64, device=device)
        self.n_tokens = 0

    @property
    def mean_z(self) -> torch.Tensor:
        """``[n_layers, n_heads, head_dim]`` float64: sum of z over real tokens / their count."""
        if self.n_tokens == 0:
            raise ValueError("no real token was seen; cannot take a mean of head outputs")
        return self.sums / self.n_tokens


@contextmanager
def mean_head_output_hooks(model: torch.nn.Module) -> Iterator[MeanHeadOutputs]:
    """Accumulate every head's output z over the real tokens of any forward pass in the block.

    A forward pre-hook (with kwargs) on each attention module reads which query positions
    are real from the attention mask transformers passes it
    (:func:`real_queries_from_attention_mask`); a forward pre-hook on the output projection
    (the adapter's ``output_projection``) adds those positions' z (its input, heads
    concatenated) to the sums. So the mean can ride along another scorer's passes, e.g. ``mechgen.scoring.metrics.score_heads``.
    """
    adapter = architectures.for_model(model)
    n_layers, n_heads, head_dim, _ = adapter.shape(model)
    accumulator = MeanHeadOutputs(n_layers, n_heads, head_dim, _device(model))
    real_queries: dict[int, torch.Tensor | None] = {}

    def attention_pre_hook_for(layer_index: int) -> Callable[..., None]:
        def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            real_queries[layer_index] = real_queries_from_attention_mask(
                kwargs.get("attention_mask"), hidden.shape[0], hidden.shape[1]
            )

        return pre_hook

    def dense_pre_hook_for(layer_index: int) -> Callable[..., None]:
        def pre_hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            z = args[0]  # [B, T, n_heads * head_dim]
            real = real_queries.pop(layer_index, None)
            selected = z.reshape(-1, z.shape[-1]) if real is None else z[real]
            accumulator.sums[layer_index] += (
                selected.to(torch.float64).sum(dim=0).view(n_heads, head_dim)
            )
            if layer_index == 0:
                accumulator.n_tokens += int(selected.shape[0])

        return pre_hook

    handles = []
    for index in range(n_layers):
        handles.append(
            adapter.attention(model, index).register_forward_pre_hook(
                attention_pre_hook_for(index), with_kwargs=True
            )
        )
        handles.append(
            adapter.output_projection(model, index).register_forward_pre_hook(
                dense_pre_hook_for(index)
            )
        )
    try:
        yield accumulator
    finally:
        for handle in handles:
            handle.remove()


def mean_head_outputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Mean of every head's output z over the evaluation tokens: ``[n_layers, n_heads, head_dim]``.

    z is the head's attention-weighted value vector, the head's slice of the input of the
    output projection. The mean is over all real tokens
    (``attention_mask == 1``; every token when no mask is given) of all sequences, pooled:
    one position-independent vector per head. float64, on the model's device. To get it for
    free during 1-back scoring, wrap ``score_heads`` in :func:`mean_head_output_hooks`.
    """
    body = model_body(model, need_attention=False)
    device = _device(model)
    input_ids = torch.as_tensor(input_ids).to(device)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, T]; got shape {tuple(input_ids.shape)}")
    mask = (
        torch.ones_like(input_ids)
        if attention_mask is None
        else torch.as_tensor(attention_mask).to(device)
    )
    if mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    batch_size = input_ids.shape[0] if batch_size is None else int(batch_size)
    with mean_head_output_hooks(model) as accumulator, eval_mode(model):
        for start in range(0, input_ids.shape[0], batch_size):
            body(
                input_ids=input_ids[start : start + batch_size],
                attention_mask=mask[start : start + batch_size].long(),
                use_cache=False,
            )
    return accumulator.mean_z


@contextmanager
def mean_ablated(
    model: torch.nn.Module, heads: Sequence[HeadId], mean_z: torch.Tensor
) -> Iterator[None]:
    """Within the block, each listed head's output z is replaced by ``mean_z[layer, head]``.

    Implemented as a forward pre-hook on the layer's output projection (the adapter's
    ``output_projection``: GPT-NeoX ``attention.dense``, GPT-2 ``attn.c_proj``) that overwrites
    the head's slice ``[head * head_dim, (head + 1) * head_dim)`` of the dense input at every
    position, so the head's contribution to the residual stream becomes the constant
    W_O^head mean_z (the dense bias is unchanged).
    ``mean_z``: ``[n_layers, n_heads, head_dim]`` from :func:`mean_head_outputs`.
    """
    adapter = architectures.for_model(model)
    n_layers, n_heads, head_dim, _ = adapter.shape(model)
    if tuple(mean_z.shape) != (n_layers, n_heads, head_dim):
        raise ValueError(
            f"mean_z must be [n_layers, n_heads, head_dim] = {(n_layers, n_heads, head_dim)}; "
            f"got {tuple(mean_z.shape)}"
        )
    by_layer: dict[int, list[int]] = {}
    for head in heads:
        layer, index = check_head(model, head, "ablated head")
        by_layer.setdefault(layer, []).append(index)

    def pre_hook_for(layer_index: int, indices: list[int]) -> Callable[..., tuple[torch.Tensor]]:
        def pre_hook(
            module: torch.nn.Module, args: tuple[torch.Tensor, ...]
        ) -> tuple[torch.Tensor]:
            z = args[0].clone()
            for index in indices:
                z[..., index * head_dim : (index + 1) * head_dim] = mean_z[layer_index, index].to(z)
            return (z, *args[1:])

        return pre_hook

    handles = [
        adapter.output_projection(model, layer).register_forward_pre_hook(
            pre_hook_for(layer, indices)
        )
        for layer, indices in by_layer.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class CausalDependence:
    """Effect of mean-ablating a source head (and a same-layer control head) on induction.

    ``*_before`` / ``*_after_source`` / ``*_after_control``: the target head's induction
    score and the model's copying accuracy without ablation, with the source head
    mean-ablated, and with the control head mean-ablated. ``induction_drop`` = before -
    after_source (probability); ``control_induction_drop`` likewise for the control;
    ``copying_drop`` / ``control_copying_drop`` in accuracy units. The full per-head induction
    arrays of the three conditions are kept in ``induction_*_all``, and the three passes' whole
    results (every repeated-sequence score) in ``passes``, for the other links with this
    source (:func:`link_effect`).
    """

    source: HeadId
    control: HeadId | None
    target: HeadId | None
    induction_before: float
    induction_after_source: float
    induction_after_control: float
    copying_before: float
    copying_after_source: float
    copying_after_control: float
    induction_before_all: np.ndarray = field(repr=False)
    induction_after_source_all: np.ndarray = field(repr=False)
    induction_after_control_all: np.ndarray | None = field(repr=False)
    passes: AblationPasses | None = field(default=None, repr=False, compare=False)

    @property
    def induction_drop(self) -> float:
        """induction_before - induction_after_source (probability)."""
        return self.induction_before - self.induction_after_source

    @property
    def control_induction_drop(self) -> float:
        """induction_before - induction_after_control (probability)."""
        return self.induction_before - self.induction_after_control

    @property
    def copying_drop(self) -> float:
        """copying_before - copying_after_source (accuracy)."""
        return self.copying_before - self.copying_after_source

    @property
    def control_copying_drop(self) -> float:
        """copying_before - copying_after_control (accuracy)."""
        return self.copying_before - self.copying_after_control

    def as_row(self) -> dict[str, Any]:
        """A flat dict (one table row) of the scalar fields and drops."""
        return {
            "source_layer": self.source[0],
            "source_head": self.source[1],
            "control_head": self.control[1] if self.control else pd.NA,
            "target_layer": self.target[0] if self.target else pd.NA,
            "target_head": self.target[1] if self.target else pd.NA,
            "induction_before": self.induction_before,
            "induction_after_source": self.induction_after_source,
            "induction_after_control": self.induction_after_control,
            "induction_drop": self.induction_drop,
            "control_induction_drop": self.control_induction_drop,
            "copying_before": self.copying_before,
            "copying_after_source": self.copying_after_source,
            "copying_after_control": self.copying_after_control,
            "copying_drop": self.copying_drop,
            "control_copying_drop": self.control_copying_drop,
        }


REPEATED_SEQUENCE_SCORES = ("induction", "duplicate_token")
"""The per-head scores one :func:`score_induction` pass yields (fields of
:class:`InductionResult`): the scores a mean-ablation test can re-measure
(``Mechanism.ablation_pass == "repeated_sequences"``)."""


@dataclass(frozen=True)
class AblationPasses:
    """:func:`score_induction` on the same sequences unablated (``before``), with ``source``
    mean-ablated and with ``control`` (a head of the source's layer; None with one head per
    layer) mean-ablated."""

    source: HeadId
    control: HeadId | None
    before: InductionResult
    after_source: InductionResult
    after_control: InductionResult | None


def ablation_passes(
    model: torch.nn.Module,
    sequences: RepeatedSequences | torch.Tensor,
    source: HeadId,
    mean_z: torch.Tensor,
    control_seed: int = 0,
    batch_size: int | None = DEFAULT_INDUCTION_BATCH,
    baseline: InductionResult | None = None,
    copying: bool = True,
) -> AblationPasses:
    """The passes of the mean-ablation test (see :func:`causal_dependence`, which documents the
    arguments): 2 forward passes over the sequences (3 without ``baseline``)."""
    source = check_head(model, source, "source")
    _, n_heads, _, _ = model_shape(model)
    before = (
        baseline if baseline is not None else score_induction(model, sequences, batch_size, copying)
    )
    with mean_ablated(model, [source], mean_z):
        after_source = score_induction(model, sequences, batch_size, copying)
    others = [head for head in range(n_heads) if head != source[1]]
    control: HeadId | None = None
    after_control: InductionResult | None = None
    if others:
        control = (source[0], int(np.random.default_rng(control_seed).choice(others)))
        with mean_ablated(model, [control], mean_z):
            after_control = score_induction(model, sequences, batch_size, copying)
    return AblationPasses(source, control, before, after_source, after_control)


def strongest_later_head(scores: np.ndarray, layer: int) -> HeadId | None:
    """(layer, head) of the largest finite ``scores[l, h]`` with l > ``layer`` (first maximum:
    lowest layer, then head); None when no later layer has a finite score."""
    later = np.asarray(scores, dtype=float)[layer + 1 :]
    if not (later.size and np.isfinite(later).any()):
        return None
    flat = int(np.nanargmax(later))
    return (layer + 1 + flat // later.shape[1], flat % later.shape[1])


def link_effect(passes: AblationPasses, score: str, target: HeadId | None = None) -> dict[str, Any]:
    """The mean-ablation effect on one repeated-sequence score (``score``, one of
    :data:`REPEATED_SEQUENCE_SCORES`) read from ``passes``: at ``target`` (default: the head
    with the largest unablated ``score`` in a layer after the source's,
    :func:`strongest_later_head`), its value ``before``, ``after_source`` and
    ``after_control``, ``drop`` = before - after_source and ``control_drop`` = before -
    after_control (the score's units; NaN without a target or a control)."""
    if score not in REPEATED_SEQUENCE_SCORES:
        raise ValueError(f"{score!r} is not re-measured by the ablation passes")

    def values(result: InductionResult | None) -> np.ndarray | None:
        return None if result is None else getattr(result, score)

    before = values(passes.before)
    if target is None and before is not None:
        target = strongest_later_head(before, passes.source[0])

    def at(result: InductionResult | None) -> float:
        array = values(result)
        return float(array[target]) if array is not None and target is not None else math.nan

    b, s, c = at(passes.before), at(passes.after_source), at(passes.after_control)
    return {
        "source_layer": passes.source[0],
        "source_head": passes.source[1],
        "control_head": passes.control[1] if passes.control else None,
        "target_layer": target[0] if target else None,
        "target_head": target[1] if target else None,
        "before": b,
        "after_source": s,
        "after_control": c,
        "drop": b - s,
        "control_drop": b - c,
    }


def causal_dependence(
    model: torch.nn.Module,
    sequences: RepeatedSequences | torch.Tensor,
    source: HeadId,
    mean_z: torch.Tensor,
    target: HeadId | None = None,
    control_seed: int = 0,
    batch_size: int | None = DEFAULT_INDUCTION_BATCH,
    baseline: InductionResult | None = None,
    copying: bool = True,
) -> CausalDependence:
    """Mean-ablate ``source`` and re-measure the induction score of ``target`` and copying.

    The source head's z is replaced by its mean over the evaluation text (``mean_z`` from
    :func:`mean_head_outputs`) with :func:`mean_ablated`, and :func:`score_induction` is rerun
    on ``sequences``. ``target`` defaults to the head with the largest unablated induction
    score in a layer after the source's (ties: lowest layer, then head); None if the source
    is in the last layer. Control: a head of the source's layer other than the source, drawn
    uniformly with ``numpy.random.default_rng(control_seed)``, ablated the same way (no
    control, and NaN control values, if the layer has one head). ``baseline``: a precomputed
    unablated :func:`score_induction` result on the same sequences, to skip that pass.
    ``copying=False`` skips the LM head (copying values NaN). Cost: 2 (or 3 without
    ``baseline``) forward passes over the sequences (:func:`ablation_passes`).
    """
    passes = ablation_passes(
        model, sequences, source, mean_z, control_seed, batch_size, baseline, copying
    )
    if target is None:
        target = strongest_later_head(passes.before.induction, passes.source[0])
    else:
        target = check_head(model, target, "target")
    before, after_source, after_control = passes.before, passes.after_source, passes.after_control

    def at_target(result: InductionResult | None) -> float:
        return (
            float(result.induction[target])
            if (result is not None and target is not None)
            else math.nan
        )

    return CausalDependence(
        source=passes.source,
        control=passes.control,
        target=target,
        induction_before=at_target(before),
        induction_after_source=at_target(after_source),
        induction_after_control=at_target(after_control),
        copying_before=before.copying_accuracy,
        copying_after_source=after_source.copying_accuracy,
        copying_after_control=after_control.copying_accuracy if after_control else math.nan,
        induction_before_all=before.induction,
        induction_after_source_all=after_source.induction,
        induction_after_control_all=after_control.induction if after_control else None,
        passes=passes,
    )
