"""The configurational axis: is the *shape* of a head the same across seeds and sizes?

Heads of two training runs live in unrelated bases (the residual stream of each run is only
defined up to rotation, and heads within a layer are unordered), so every comparison of them is
either basis-invariant or made after an explicit alignment (:mod:`mechgen.axes.similarity`). Here,
the signatures, computed on a loaded model:

- Signatures per head (basis-invariant): the normalised singular-value spectra of W_QK and
  W_OV (:func:`head_spectra`) and the relative-offset attention profile, mean attention to
  offsets 0..k (:func:`offset_profile`, :func:`offset_profiles`,
  :class:`OffsetProfileAccumulator`).
- Per-token outputs z of chosen heads (:func:`head_outputs`, for linear CKA) and the W_Q, W_K
  factors of chosen heads (:func:`qk_factors`, for the stability of W_QK over training).

Comparing these signatures across runs (similarities, their nulls, CKA, Hungarian alignment,
stability) needs no model: it is table-side, in :mod:`mechgen.axes.similarity`.

Per-head weight matrices come from :func:`mechgen.scoring.relational.head_weights` (through the
model's architecture adapter, GPT-NeoX or GPT-2; LayerNorm gain and centring folded into the
read side; GPT-NeoX's rotary ignored, i.e. W_QK at relative offset 0, and GPT-2's learned
positions left out likewise; biases ignored).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mechgen.axes.similarity import QKFactors
from mechgen.model import adapter as architectures
from mechgen.model.base import attention_hooks
from mechgen.scoring.relational import (
    HeadId,
    HeadWeights,
    check_head,
    eval_mode,
    finite_svdvals,
    head_weights,
    model_body,
    r_factor,
    real_queries_from_attention_mask,
)

__all__ = [
    "HeadSpectra",
    "OffsetProfileAccumulator",
    "head_outputs",
    "head_spectra",
    "offset_profile",
    "offset_profile_hooks",
    "offset_profile_per_sequence",
    "offset_profiles",
    "qk_factors",
]

Normalisation = Literal["l2", "sum"]
DEFAULT_MAX_OFFSET = 8


# ---------------------------------------------------------------------------------------------
# Singular-value spectra


@dataclass(frozen=True)
class HeadSpectra:
    """Normalised singular values of every head's circuits, descending, ``[n_layers, n_heads, hd]``.

    ``qk``: of W_QK = W_Q^T W_K; ``ov``: of W_OV = W_O W_V (both d x d of rank <= head_dim,
    so head_dim values hold the whole non-zero spectrum). ``normalise``: ``"l2"`` divides by
    ||sigma||_2 = ||W||_F (the spectrum is then a unit vector, and the cosine of two spectra
    is their dot product); ``"sum"`` divides by sum(sigma) = the nuclear norm (the spectrum
    is then a distribution over rank). A zero circuit gives NaN.
    """

    qk: np.ndarray
    ov: np.ndarray
    normalise: str


def head_spectra(
    model: torch.nn.Module | HeadWeights,
    normalise: Normalisation = "l2",
    fold_layernorm: bool = True,
) -> HeadSpectra:
    """Basis-invariant spectra of W_QK and W_OV of every head (see :class:`HeadSpectra`).

    Singular values are invariant to rotations of the residual stream and of head space, so
    spectra of heads of different runs can be compared directly. Computed exactly from
    head_dim x d factors: sigma(W_Q^T W_K) = sigma(R_Q W_K) with W_Q^T = Q_Q R_Q, and
    sigma(W_O W_V) = sigma(W_O R_V^T) with W_V^T = Q_V R_V.
    """
    if normalise not in ("l2", "sum"):
        raise ValueError(f"normalise must be 'l2' or 'sum'; got {normalise!r}")
    weights = model if isinstance(model, HeadWeights) else head_weights(model, fold_layernorm)
    qk_factor = r_factor(weights.w_q.transpose(-1, -2)) @ weights.w_k
    ov_factor = weights.w_o @ r_factor(weights.w_v.transpose(-1, -2)).transpose(-1, -2)
    return HeadSpectra(
        qk=_normalise_spectrum(finite_svdvals(qk_factor).numpy(), normalise),
        ov=_normalise_spectrum(finite_svdvals(ov_factor).numpy(), normalise),
        normalise=normalise,
    )


def _normalise_spectrum(singular: np.ndarray, normalise: str) -> np.ndarray:
    scale = (
        np.linalg.norm(singular, axis=-1, keepdims=True)
        if normalise == "l2"
        else singular.sum(axis=-1, keepdims=True)
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, singular / scale, np.nan)


# ---------------------------------------------------------------------------------------------
# Relative-offset attention profiles


def offset_profile_per_sequence(
    attention: torch.Tensor, max_offset: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per sequence and head, mean attention to each relative offset: ``[B, H, max_offset + 1]``.

    ``attention``: probabilities ``[B, H, T, T]`` (query i, key j). For offset o,
    profile[b, h, o] = mean over query positions i with both i and i - o real tokens of
    A[b, h, i, i - o] (probability); NaN when the sequence has no such i (shorter than o + 1).
    ``attention_mask``: ``[B, T]`` (1 = real token), or a 4-D additive/boolean mask
    ``[B, 1, T, T]`` as transformers passes to attention modules (a query is real when its
    diagonal entry is unmasked); None = every position is real.
    """
    means, defined = _offset_means(attention, max_offset, attention_mask)
    return means.masked_fill(~defined[:, None, :], math.nan)


def _offset_means(
    attention: torch.Tensor, max_offset: int, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence offset means [B, H, K+1] (0 where undefined) and definedness [B, K+1].

    Kept apart so that a NaN in the attention itself propagates while a sequence too short
    for an offset is merely skipped.
    """
    if attention.ndim != 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention must be [batch, heads, T, T]; got {tuple(attention.shape)}")
    if isinstance(max_offset, bool) or not isinstance(max_offset, int) or max_offset < 0:
        raise ValueError(f"max_offset must be an int >= 0; got {max_offset!r}")
    batch, n_heads, length, _ = attention.shape
    pair_valid = _pair_validity(attention_mask, batch, length, attention.device)
    means = torch.zeros(
        batch, n_heads, max_offset + 1, dtype=torch.float64, device=attention.device
    )
    defined = torch.zeros(batch, max_offset + 1, dtype=torch.bool, device=attention.device)
    for offset in range(min(max_offset, length - 1) + 1):
        # Row i of the offset -o diagonal is A[i, i - o], i = o..T-1: [B, H, T - o].
        diagonal = attention.diagonal(offset=-offset, dim1=-2, dim2=-1).to(torch.float64)
        valid = pair_valid(offset)  # [B, T - o]
        count = valid.sum(dim=-1)  # [B]
        # where(), not a product with the mask, so a NaN at a padded position cannot leak in.
        summed = torch.where(valid[:, None, :], diagonal, 0.0).sum(dim=-1)
        means[:, :, offset] = summed / count.clamp(min=1)[:, None]
        defined[:, offset] = count > 0
    return means, defined


def _pair_validity(
    attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> Callable[[int], torch.Tensor]:
    """offset -> [B, T - offset] bool validity of (query i, key i - offset) pairs."""
    if attention_mask is None:
        return lambda offset: torch.ones(batch, length - offset, dtype=torch.bool, device=device)
    mask = attention_mask.to(device)
    real = real_queries_from_attention_mask(mask, batch, length)
    if mask.ndim == 2:
        return lambda offset: real[:, offset:] & real[:, : length - offset]
    # transformers' 4-D mask: key j allowed for query i where True / not the dtype's minimum.
    allowed = (
        mask[:, 0].bool()
        if mask.dtype == torch.bool
        else mask[:, 0] > torch.finfo(mask.dtype).min / 2
    )
    allowed = allowed.expand(batch, length, length)
    return lambda offset: real[:, offset:] & allowed.diagonal(offset=-offset, dim1=-2, dim2=-1)


class OffsetProfileAccumulator:
    """Running per-(layer, head) offset profiles, summed over sequences (float64).

    Call :meth:`add` with each layer's attention of each batch; :attr:`profile` is then
    ``[n_layers, n_heads, max_offset + 1]`` = for each offset, the mean over sequences that
    have the offset of their per-sequence profile (:func:`offset_profile_per_sequence`), i.e.
    every sequence weighs equally, as in the per-head table.
    """

    def __init__(self, n_layers: int, n_heads: int, max_offset: int = DEFAULT_MAX_OFFSET) -> None:
        self.max_offset = max_offset
        self.sums = torch.zeros(n_layers, n_heads, max_offset + 1, dtype=torch.float64)
        self.counts = torch.zeros(n_layers, max_offset + 1, dtype=torch.float64)

    def add(
        self, layer: int, attention: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> None:
        """Add one layer's attention ``[B, H, T, T]`` of one batch (mask as in the per-sequence function)."""
        means, defined = _offset_means(attention, self.max_offset, attention_mask)
        # A NaN attention value (a non-finite head) propagates into that head's profile.
        self.sums[layer] += means.cpu().sum(dim=0)
        self.counts[layer] += defined.cpu().sum(dim=0)

    @property
    def profile(self) -> np.ndarray:
        """``[n_layers, n_heads, max_offset + 1]`` mean attention to each offset (NaN if unseen)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.sums / self.counts[:, None, :]).numpy()


def offset_profile(
    attentions: Sequence[torch.Tensor] | torch.Tensor,
    max_offset: int = DEFAULT_MAX_OFFSET,
    attention_mask: torch.Tensor | None = None,
) -> np.ndarray:
    """Relative-offset profile of every head from attention probabilities.

    ``attentions``: one ``[B, H, T, T]`` tensor per layer (e.g. ``output_attentions``) or a
    stacked ``[n_layers, B, H, T, T]``. Returns ``[n_layers, n_heads, max_offset + 1]``:
    profile[l, h, o] = mean over sequences of (mean over query positions i with i and i - o
    real of A[i, i - o]) (probability; the sum over all offsets 0..i of a row is 1).
    """
    layers = list(attentions)
    if not layers:
        raise ValueError("attentions is empty")
    accumulator = OffsetProfileAccumulator(len(layers), layers[0].shape[1], max_offset)
    for index, attention in enumerate(layers):
        accumulator.add(index, attention, attention_mask)
    return accumulator.profile


@contextmanager
def offset_profile_hooks(
    model: torch.nn.Module, max_offset: int = DEFAULT_MAX_OFFSET
) -> Iterator[OffsetProfileAccumulator]:
    """Accumulate offset profiles during *any* forward passes of ``model`` inside the block.

    Registers a forward hook (with kwargs) on every attention module that reads the
    attention probabilities and the 4-D attention mask transformers passes to the module, so
    it can ride along another scorer's forward passes (e.g. ``mechgen.scoring.metrics.score_heads``)
    at the cost of the reduction only. Needs eager attention.
    """
    adapter = architectures.for_model(model)
    n_layers, n_heads, _, _ = adapter.shape(model)
    accumulator = OffsetProfileAccumulator(n_layers, n_heads, max_offset)

    def on_attention(layer_index: int, attention: torch.Tensor, kwargs: dict) -> None:
        accumulator.add(layer_index, attention, kwargs.get("attention_mask"))

    with attention_hooks(adapter, model, on_attention):
        yield accumulator


def offset_profiles(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_offset: int = DEFAULT_MAX_OFFSET,
    batch_size: int = 16,
) -> np.ndarray:
    """Offset profiles ``[n_layers, n_heads, max_offset + 1]`` from forward passes over ``input_ids``.

    ``input_ids``/``attention_mask``: ``[N, T]`` (mask 1 = real token; right or left padding).
    See :func:`offset_profile` for the definition. Cheaper inside the 1-back scoring pass:
    wrap ``score_heads`` in :func:`offset_profile_hooks` instead.
    """
    body = model_body(model, need_attention=True)
    device = next(model.parameters()).device
    input_ids = torch.as_tensor(input_ids).to(device)
    mask = None if attention_mask is None else torch.as_tensor(attention_mask).to(device)
    with offset_profile_hooks(model, max_offset) as accumulator, eval_mode(model):
        for start in range(0, input_ids.shape[0], batch_size):
            body(
                input_ids=input_ids[start : start + batch_size],
                attention_mask=None if mask is None else mask[start : start + batch_size],
                use_cache=False,
            )
    return accumulator.profile


# ---------------------------------------------------------------------------------------------
# Per-token head outputs (for linear CKA, mechgen.axes.similarity.linear_cka)


def head_outputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    heads: Sequence[HeadId],
    attention_mask: torch.Tensor | None = None,
    batch_size: int | None = None,
    space: Literal["residual", "z"] = "residual",
) -> dict[HeadId, torch.Tensor]:
    """Per-token outputs of the given heads over the real tokens of ``input_ids``.

    ``space="z"``: the head's attention-weighted value vector z (``[n_tokens, head_dim]``);
    ``"residual"``: its contribution to the residual stream W_O^h z (``[n_tokens, d_model]``,
    without the dense bias). Tokens are the real ones (``attention_mask == 1``) in
    (sequence, position) order, so two models fed the same ids give row-aligned outputs.
    float32 on the CPU. Only the requested heads are kept (memory: n_tokens x d per head).
    """
    if space not in ("residual", "z"):
        raise ValueError(f"space must be 'residual' or 'z'; got {space!r}")
    adapter = architectures.for_model(model)
    body = adapter.body(model, need_attention=False)
    _, _, head_dim, _ = adapter.shape(model)
    heads = [check_head(model, head, "head") for head in heads]
    if not heads:
        raise ValueError("heads is empty")
    device = next(model.parameters()).device
    input_ids = torch.as_tensor(input_ids).to(device)
    mask = (
        torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is None
        else torch.as_tensor(attention_mask).to(device).bool()
    )
    batch_size = input_ids.shape[0] if batch_size is None else int(batch_size)
    collected: dict[HeadId, list[torch.Tensor]] = {head: [] for head in heads}
    current: list[torch.Tensor] = []
    by_layer: dict[int, list[int]] = {}
    for layer, index in heads:
        by_layer.setdefault(layer, []).append(index)

    def pre_hook_for(layer: int, indices: list[int]) -> Callable[..., None]:
        w_o = adapter.output_weights(model, layer)  # [n_heads, d, head_dim]

        def pre_hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            z = args[0][current[0]]  # [n_real, n_heads * head_dim]
            for index in indices:
                z_head = z[:, index * head_dim : (index + 1) * head_dim]
                if space == "residual":
                    z_head = z_head @ w_o[index].to(z_head).T
                collected[(layer, index)].append(z_head.float().cpu())

        return pre_hook

    handles = [
        adapter.output_projection(model, layer).register_forward_pre_hook(
            pre_hook_for(layer, indices)
        )
        for layer, indices in by_layer.items()
    ]
    try:
        with eval_mode(model):
            for start in range(0, input_ids.shape[0], batch_size):
                current[:] = [mask[start : start + batch_size]]
                body(
                    input_ids=input_ids[start : start + batch_size],
                    attention_mask=current[0].long(),
                    use_cache=False,
                )
    finally:
        for handle in handles:
            handle.remove()
    return {head: torch.cat(parts) for head, parts in collected.items()}


# ---------------------------------------------------------------------------------------------
# W_Q, W_K factors, for the stability over training (mechgen.axes.similarity.qk_cosine)


def qk_factors(
    model: torch.nn.Module | HeadWeights,
    heads: Sequence[HeadId] | None = None,
    fold_layernorm: bool = True,
) -> dict[HeadId, QKFactors]:
    """(W_Q, W_K) of the given heads (default: all), float32 numpy, to save per checkpoint.

    2 x head_dim x d_model floats per head (0.5 MiB for Pythia-410m), enough to compute the
    cosine of W_QK between checkpoints later without keeping the weights.
    """
    weights = model if isinstance(model, HeadWeights) else head_weights(model, fold_layernorm)
    n_layers, n_heads = weights.w_q.shape[:2]
    if heads is None:
        heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    out: dict[HeadId, QKFactors] = {}
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(
                f"head ({layer}, {head}) is outside {n_layers} layers x {n_heads} heads"
            )
        out[(int(layer), int(head))] = (
            weights.w_q[layer, head].numpy().copy(),
            weights.w_k[layer, head].numpy().copy(),
        )
    return out
