"""Per-head attention metrics of a GPT-NeoX or GPT-2 model on tokenised sentences.

Every metric is computed per (sentence, head) from that head's attention probabilities A
(A[i, j] = attention of query position i to key position j, causal, each row sums to 1) and
then averaged over sentences with equal weight per sentence, as in the reference study
(Trott 2025, arXiv 2509.22831), which ran one sentence at a time with no BOS token.

Two layers of API:

- :func:`sentence_attention_metrics` is a pure function of an attention tensor
  ``[batch, heads, T, T]`` and the true sentence lengths; it returns per-(sentence, head)
  metrics and is what the hand-worked tests check.
- :func:`score_heads` runs a model over sentences in length-sorted, right-padded batches and
  computes the metrics inside the forward pass with a hook on each layer's attention module,
  so that only one layer's attention tensor is alive at a time. Nothing that no metric reads
  is computed: no LM head, and the pass stops after the last layer's attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from mechgen.model import adapter as architectures
from mechgen.schema import ATTENTION_METRICS, FLAG_COLUMNS

__all__ = ["score_heads", "sentence_attention_metrics"]

MIN_SENTENCE_TOKENS = 2
"""Sentences shorter than this have no query position 1..L-1 (no 1-back) and are skipped."""

MIN_RECEIVED_KEYS = 2
"""``received_concentration`` needs at least this many keys 1..L-2 (L >= 4 tokens): the
concentration of one key is undefined (ln 1 = 0). Shorter sentences are left out of that
metric's mean over sentences only."""

RECEIVED_METRIC = "received_concentration"


@dataclass(frozen=True)
class _BatchGeometry:
    """Masks and distance matrices shared by every layer of one padded batch.

    Built once per batch so that the per-layer hook only does arithmetic on the attention.
    """

    causal_valid: torch.Tensor  # [B, 1, T, T] bool: j <= i < L_b
    lengths: torch.Tensor  # [B, 1] float, L_b
    # [T*T, 2] float: column 0 is i - j, column 1 is min(i - j, W), flattened over (i, j).
    # Entries with j > i are irrelevant (those probabilities are masked to 0).
    distances: torch.Tensor
    # Received attention (received_concentration): [B, 1, T] bool, key j in 1..L_b-2 (it has a
    # later query and is not position 0); [B, 1, T] float, L_b - 1 - j, its number of later
    # queries (clamped to >= 1 where unused); [B, 1] float, ln(L_b - 2), NaN where L_b < 4.
    received_keys: torch.Tensor
    later_queries: torch.Tensor
    log_received_keys: torch.Tensor


def _batch_geometry(
    lengths: torch.Tensor, padded_length: int, clipped_window: int, dtype: torch.dtype
) -> _BatchGeometry:
    device = lengths.device
    positions = torch.arange(padded_length, device=device)
    query = positions[:, None]
    key = positions[None, :]
    causal_valid = (key <= query)[None, None] & (query[None, None] < lengths[:, None, None, None])
    distance = (query - key).to(dtype)
    lengths_column = lengths[:, None, None]
    received_keys = (positions >= 1)[None, None] & (positions[None, None] <= lengths_column - 2)
    later_queries = (lengths_column - 1 - positions[None, None]).clamp(min=1).to(dtype)
    n_received = (lengths.to(dtype) - 2.0)[:, None]
    log_received_keys = torch.where(
        n_received >= MIN_RECEIVED_KEYS,
        torch.log(n_received),
        torch.full_like(n_received, math.nan),
    )
    return _BatchGeometry(
        causal_valid=causal_valid,
        lengths=lengths.to(dtype)[:, None],
        distances=torch.stack([distance, distance.clamp(max=clipped_window)], dim=-1).reshape(
            padded_length * padded_length, 2
        ),
        received_keys=received_keys,
        later_queries=later_queries,
        log_received_keys=log_received_keys,
    )


def _metric_dtype(dtype: torch.dtype) -> torch.dtype:
    # Every sum is taken in float64, whatever the attention's dtype: in float32 the distance
    # sums over a 512-token sentence (about 131,000 terms of up to 511 tokens each) are off by
    # ~1e-2 tokens; in float64 by ~1e-11.
    return torch.float64


def _metrics_from_geometry(
    attention: torch.Tensor, geometry: _BatchGeometry
) -> dict[str, torch.Tensor]:
    attention = attention.to(geometry.lengths.dtype)
    # Zero everything outside the causal block of real tokens: padded query rows (which do
    # attend to something) and padded/future keys. After this every sum over the full padded
    # axes equals the sum over the sentence's own positions, and NaN in padding is dropped.
    probs = attention.masked_fill(~geometry.causal_valid, 0.0)
    lengths = geometry.lengths
    lengths_from_second = lengths - 1.0

    # Attention entries are probabilities in [0, 1], so a row sum is non-finite exactly when
    # one of the row's entries is NaN or +-inf (finite entries cannot overflow the sum).
    row_sums = probs.sum(dim=-1)
    nonfinite = ~torch.isfinite(row_sums).all(dim=-1)

    # Row i of the offset -1 diagonal is A[i, i-1], i = 1..T-1; padded rows are already 0.
    one_back = probs.diagonal(offset=-1, dim1=-2, dim2=-1).sum(dim=-1) / lengths_from_second
    self_attention = probs.diagonal(offset=0, dim1=-2, dim2=-1).sum(dim=-1) / lengths
    first_column = probs[..., 0]
    first_token_ref = first_column.sum(dim=-1) / lengths
    first_token = first_column[..., 1:].sum(dim=-1) / lengths_from_second
    # xlogy(0, 0) = 0, the convention 0 ln 0 = 0.
    entropy = -torch.special.xlogy(probs, probs).sum(dim=(-2, -1)) / lengths
    # Both distance sums sum_{i,j} A[i, j] d(i, j) in one matrix product over the flattened
    # (i, j) axis: one pass over the attention instead of two.
    batch, heads, padded_length, _ = probs.shape
    distance_sums = probs.reshape(batch, heads, padded_length * padded_length) @ geometry.distances
    mean_distance = distance_sums[..., 0] / lengths
    clipped_distance = distance_sums[..., 1] / lengths
    received_concentration = _received_concentration(probs, geometry)

    return {
        "one_back": one_back,
        "self_attention": self_attention,
        "first_token": first_token,
        "first_token_ref": first_token_ref,
        "prev_self_ratio": one_back / self_attention,
        "prev_uniform_ratio": one_back * lengths,
        "entropy": entropy,
        "mean_distance": mean_distance,
        "clipped_distance": clipped_distance,
        "received_concentration": received_concentration,
        "nonfinite": nonfinite,
    }


def _received_concentration(probs: torch.Tensor, geometry: _BatchGeometry) -> torch.Tensor:
    """1 - H(p) / ln(L-2) of the received-attention distribution p over keys 1..L-2.

    ``probs`` is already zero outside the causal block of real tokens, so a column sum minus
    the diagonal is the attention key j receives from the later queries i = j+1..L-1.
    """
    from_later = probs.sum(dim=-2) - probs.diagonal(dim1=-2, dim2=-1)
    received = (from_later / geometry.later_queries).masked_fill(~geometry.received_keys, 0.0)
    total = received.sum(dim=-1, keepdim=True)
    share = received / total
    entropy = -torch.special.xlogy(share, share).sum(dim=-1)  # xlogy(0, 0) = 0
    concentration = 1.0 - entropy / geometry.log_received_keys
    # No received attention at all (total 0, shares 0/0): nothing is concentrated, score 0.
    # Non-finite attention keeps its NaN (the head is flagged).
    nothing_received = (total[..., 0] == 0) & torch.isfinite(geometry.log_received_keys)
    return concentration.masked_fill(nothing_received, 0.0)


def sentence_attention_metrics(
    attention: torch.Tensor, lengths: torch.Tensor | Sequence[int], clipped_window: int = 8
) -> dict[str, torch.Tensor]:
    """Per-(sentence, head) attention metrics of one right-padded batch.

    ``attention`` holds attention probabilities ``[batch, heads, T, T]`` (query i, key j);
    sentence b occupies positions ``0..L_b-1`` with ``2 <= L_b <= T``. Only the causal block
    ``j <= i < L_b`` is read; everything else (padding, future keys) is ignored. With
    ``A = attention[b, h]`` and ``L = L_b``, the returned ``[batch, heads]`` tensors are:

    - ``one_back`` = (1/(L-1)) * sum_{i=1}^{L-1} A[i, i-1]  (probability)
    - ``self_attention`` = (1/L) * sum_{i=0}^{L-1} A[i, i]  (probability)
    - ``first_token`` = (1/(L-1)) * sum_{i=1}^{L-1} A[i, 0]  (probability)
    - ``first_token_ref`` = (1/L) * sum_{i=0}^{L-1} A[i, 0]  (the reference study's version,
      row 0, which is always 1, included)
    - ``prev_self_ratio`` = one_back / self_attention  (dimensionless)
    - ``prev_uniform_ratio`` = one_back * L  (dimensionless; the reference study's
      ``mean_prev_all_ratio``: one_back over 1/L, the attention each key of the sentence would
      get if a row spread it evenly over all L tokens). It is *not* 1 for uniform causal
      attention: row i spreads over only i + 1 keys, so A[i, i-1] = 1/(i+1) and the ratio is
      (L/(L-1)) * sum_{i=1}^{L-1} 1/(i+1) = (L/(L-1)) * (H_L - 1), H_L the harmonic number:
      1.6 at L = 5, about 2.8-2.9 at Natural Stories' lengths (~25 tokens), growing like ln L.
      A perfect previous-token head scores L.
    - ``entropy`` = (1/L) * sum_i -sum_{j<=i} A[i, j] ln A[i, j]  (nats; 0 ln 0 = 0)
    - ``mean_distance`` = (1/L) * sum_i sum_{j<=i} A[i, j] (i - j)  (tokens)
    - ``clipped_distance`` = (1/L) * sum_i sum_{j<=i} A[i, j] min(i - j, W)  (tokens,
      W = ``clipped_window``)
    - ``received_concentration`` (dimensionless, in [0, 1]): how concentrated the attention
      that keys *receive* from later queries is, position 0 left out. With
      r_j = (1/(L-1-j)) * sum_{i=j+1}^{L-1} A[i, j], the mean attention key j receives from
      the queries after it, for j = 1..L-2 (position 0, the usual attention sink, and the last
      position, which no later query sees, are left out), and p_j = r_j / sum_k r_k:
      1 - (-sum_j p_j ln p_j) / ln(L-2), one minus the normalised entropy of p. 0 when every
      key receives equally, 1 when one key receives everything (a globally focused head);
      0 when no key 1..L-2 receives anything. Uniform causal attention (A[i, j] = 1/(i+1))
      scores above 0, since early keys are seen by more small-denominator rows
      (:func:`mechgen.mechanisms.locality.uniform_received_concentration`). NaN for L < 4
      (fewer than two keys); :func:`score_heads` averages it over the sentences with L >= 4.
    - ``nonfinite`` (bool): some entry of the causal block is NaN or +-inf; the other
      metrics of that (sentence, head) are then meaningless (:func:`score_heads` sets them to
      NaN for the head).

    Every sum is accumulated in float64 and the metrics are returned as float64, whatever the
    attention's dtype, so they are exact to ~1e-11 even at 512 tokens.
    """
    if attention.ndim != 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(
            f"attention must have shape [batch, heads, T, T]; got {tuple(attention.shape)}"
        )
    if not attention.is_floating_point():
        raise ValueError(f"attention must be a floating-point tensor; got {attention.dtype}")
    lengths = torch.as_tensor(lengths, device=attention.device)
    padded_length = attention.shape[-1]
    if lengths.shape != (attention.shape[0],):
        raise ValueError(
            f"lengths must have one entry per sentence ({attention.shape[0]}); "
            f"got shape {tuple(lengths.shape)}"
        )
    if lengths.numel() and (
        int(lengths.min()) < MIN_SENTENCE_TOKENS or int(lengths.max()) > padded_length
    ):
        raise ValueError(
            f"every length must be in [{MIN_SENTENCE_TOKENS}, {padded_length}] (T of the "
            f"attention tensor); got {lengths.tolist()}"
        )
    _check_clipped_window(clipped_window)
    geometry = _batch_geometry(
        lengths, padded_length, clipped_window, _metric_dtype(attention.dtype)
    )
    return _metrics_from_geometry(attention, geometry)


def _check_clipped_window(clipped_window: int) -> None:
    if isinstance(clipped_window, bool) or not isinstance(clipped_window, int):
        raise TypeError(f"clipped_window must be an int; got {clipped_window!r}")
    if clipped_window < 1:
        raise ValueError(f"clipped_window must be >= 1 token; got {clipped_window}")


class _AllLayersScored(Exception):
    """Raised by the last layer's hook to end the forward pass early.

    Nothing after the last attention (its MLP, the final layer norm) feeds a metric, so the
    pass stops there; for a 4-6 layer model that is 10-17% of the body's compute.
    """


class _HeadMetricAccumulator:
    """Running per-(layer, head) sums over sentences of each metric, in float64.

    Filled by one forward hook per layer; ``geometry`` is set before each batch.
    """

    def __init__(self, n_layers: int, n_heads: int, device: torch.device) -> None:
        self.n_layers = n_layers
        self.sums = {
            name: torch.zeros(n_layers, n_heads, dtype=torch.float64, device=device)
            for name in ATTENTION_METRICS
        }
        self.nonfinite = torch.zeros(n_layers, n_heads, dtype=torch.bool, device=device)
        self.received_sentences = 0  # sentences with L >= 4, the received_concentration mean's
        self.geometry: _BatchGeometry | None = None

    def hook_for_layer(self, layer_index: int):
        """A forward hook for the attention module of layer ``layer_index``."""

        def hook(module: torch.nn.Module, inputs: object, output: object) -> None:
            attention = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if attention is None:
                raise RuntimeError(
                    f"layer {layer_index}'s attention module returned no attention "
                    "probabilities; load the model with attn_implementation='eager'"
                )
            assert self.geometry is not None, "geometry must be set before the forward pass"
            per_sentence = _metrics_from_geometry(attention, self.geometry)
            self.nonfinite[layer_index] |= per_sentence.pop("nonfinite").any(dim=0)
            received = per_sentence.pop(RECEIVED_METRIC)
            for name, values in per_sentence.items():
                self.sums[name][layer_index] += values.sum(dim=0, dtype=torch.float64)
            # Sentences with L < 4 have no received concentration (NaN): left out of its sum
            # and its count. NaN from non-finite attention stays (the head is flagged).
            long_enough = torch.isfinite(self.geometry.log_received_keys)
            self.sums[RECEIVED_METRIC][layer_index] += torch.where(long_enough, received, 0.0).sum(
                dim=0, dtype=torch.float64
            )
            if layer_index == 0:
                self.received_sentences += int(long_enough.sum())
            if layer_index == self.n_layers - 1:
                raise _AllLayersScored

        return hook


def _validate_sentences(sentences: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if isinstance(sentences, (str, bytes)) or not isinstance(sentences, Sequence):
        raise TypeError("sentences must be a list of token-id lists")
    checked: list[list[int]] = []
    for index, sentence in enumerate(sentences):
        token_ids = [int(token) for token in sentence]
        if not token_ids:
            raise ValueError(f"sentence {index} is empty; every sentence needs >= 1 token")
        if min(token_ids) < 0 or max(token_ids) >= vocab_size:
            raise ValueError(
                f"sentence {index} has a token id outside the vocabulary [0, {vocab_size}): "
                f"min {min(token_ids)}, max {max(token_ids)}"
            )
        checked.append(token_ids)
    return checked


def score_heads(
    model: torch.nn.Module,
    sentences: list[list[int]],
    batch_size: int = 16,
    clipped_window: int = 8,
    progress: bool = False,
) -> pd.DataFrame:
    """Score every attention head of a GPT-NeoX or GPT-2 model on tokenised sentences.

    ``model`` is a causal LM or its body of a family :mod:`mechgen.model.adapter` knows
    (``GPTNeoXForCausalLM``, ``GPT2LMHeadModel``, ...), loaded with
    ``attn_implementation="eager"`` and read only through its adapter; ``sentences`` are
    token-id lists (no BOS added).
    Sentences are run through the transformer body only (no LM head, and the pass stops
    after the last layer's attention), sorted by length, in right-padded batches of
    ``batch_size`` with an attention mask, so each sentence's attention equals that of running
    it alone (up to float rounding). The per-(sentence, head) metrics of
    :func:`sentence_attention_metrics` are computed inside the forward pass and averaged over
    sentences with equal weight: metric(head) = (1/N) * sum_s metric(s, head).

    Sentences of one token have no query position 1..L-1 and are skipped entirely (for every
    metric, so all metrics average over the same sentences, except ``received_concentration``,
    which averages over the sentences of >= 4 tokens); ``df.attrs`` counts them. The
    model is put in eval mode (no dropout) for the call and its mode restored afterwards.

    Returns one row per (layer, head), both 0-indexed, with the columns of
    ``mechgen.schema.ATTENTION_METRICS`` (float64) and ``nonfinite`` (bool: the head's
    attention had a NaN/inf on some sentence; its metrics are then NaN). ``df.attrs`` holds
    ``n_sentences`` and ``n_tokens`` (sentences and tokens scored),
    ``n_sentences_too_short`` (skipped one-token sentences), ``n_sentences_received`` (the
    sentences of >= 4 tokens that ``received_concentration`` averages over), ``batch_size`` and
    ``clipped_window``.
    """
    adapter = architectures.for_model(model)
    body = adapter.body(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    _check_clipped_window(clipped_window)
    token_lists = _validate_sentences(sentences, adapter.vocab_size(model))
    scored = [tokens for tokens in token_lists if len(tokens) >= MIN_SENTENCE_TOKENS]
    if not scored:
        raise ValueError(
            f"no sentence has >= {MIN_SENTENCE_TOKENS} tokens; there is nothing to score"
        )
    longest = max(len(tokens) for tokens in scored)
    max_positions = adapter.max_positions(model)
    if longest > max_positions:
        raise ValueError(
            f"a sentence has {longest} tokens, more than the model's "
            f"max_position_embeddings ({max_positions}); truncate it first"
        )
    # Sorting by length keeps padding (wasted compute) small; the mean over sentences does
    # not depend on the order.
    scored.sort(key=len)

    n_layers, n_heads, _, _ = adapter.shape(model)
    device = next(model.parameters()).device
    metric_dtype = _metric_dtype(next(model.parameters()).dtype)
    accumulator = _HeadMetricAccumulator(n_layers, n_heads, device)
    handles = [
        adapter.attention(model, layer_index).register_forward_hook(
            accumulator.hook_for_layer(layer_index)
        )
        for layer_index in range(n_layers)
    ]
    batch_starts = range(0, len(scored), batch_size)
    if progress:
        from tqdm.auto import tqdm  # only when a bar is asked for

        batch_starts = tqdm(batch_starts, desc="scoring heads", unit="batch")
    was_training = model.training
    model.eval()  # dropout off; the reference loaded with from_pretrained, which is eval
    try:
        with torch.inference_mode():
            for start in batch_starts:
                batch = scored[start : start + batch_size]
                input_ids, attention_mask, lengths = _right_padded(batch, device)
                accumulator.geometry = _batch_geometry(
                    lengths, input_ids.shape[1], clipped_window, metric_dtype
                )
                try:
                    body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                except _AllLayersScored:
                    pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    n_sentences = len(scored)
    nonfinite = accumulator.nonfinite.cpu()
    layer_index, head_index = torch.meshgrid(
        torch.arange(n_layers), torch.arange(n_heads), indexing="ij"
    )
    columns: dict[str, object] = {
        "layer": layer_index.flatten().numpy(),
        "head": head_index.flatten().numpy(),
    }
    for name in ATTENTION_METRICS:
        count = accumulator.received_sentences if name == RECEIVED_METRIC else n_sentences
        mean = (
            accumulator.sums[name].cpu() / count
            if count
            else torch.full_like(accumulator.sums[name].cpu(), math.nan)
        )
        # Never average non-finite values silently: a flagged head gets NaN for every metric.
        columns[name] = mean.masked_fill(nonfinite, math.nan).flatten().numpy()
    (flag_column,) = FLAG_COLUMNS
    columns[flag_column] = nonfinite.flatten().numpy()
    frame = pd.DataFrame(columns)
    frame.attrs.update(
        n_sentences=n_sentences,
        n_tokens=sum(len(tokens) for tokens in scored),
        n_sentences_too_short=len(token_lists) - n_sentences,
        n_sentences_received=accumulator.received_sentences,
        batch_size=batch_size,
        clipped_window=clipped_window,
    )
    return frame


def _right_padded(
    batch: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask ``[B, T]`` (T = longest), and lengths ``[B]``."""
    lengths = torch.tensor([len(tokens) for tokens in batch], device=device)
    padded_length = int(lengths.max())
    # Pad id 0 is arbitrary: padded keys are masked and padded queries are never read.
    input_ids = torch.zeros(len(batch), padded_length, dtype=torch.long)
    for row, tokens in enumerate(batch):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
    attention_mask = torch.arange(padded_length, device=device)[None, :] < lengths[:, None]
    return input_ids.to(device), attention_mask.long(), lengths
