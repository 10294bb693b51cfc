"""The configurational axis: is the *shape* of a head the same across seeds and sizes?

Heads of two training runs live in unrelated bases (the residual stream of each run is only
defined up to rotation, and heads within a layer are unordered), so every comparison here is
either basis-invariant or made after an explicit alignment:

- Signatures per head (basis-invariant): the normalised singular-value spectra of W_QK and
  W_OV (:func:`head_spectra`) and the relative-offset attention profile, mean attention to
  offsets 0..k (:func:`offset_profile`, :func:`offset_profiles`,
  :class:`OffsetProfileAccumulator`).
- Similarities of signatures that need no shared basis (:func:`spectrum_similarity_matrix`,
  :func:`profile_similarity_matrix`) and a null from random head pairs
  (:func:`similarity_vs_random_pairs`).
- Linear CKA (Kornblith et al. 2019) between two heads' per-token outputs
  (:func:`linear_cka`, :func:`head_outputs`) with a null of random heads
  (:func:`cka_vs_random_heads`).
- Hungarian alignment of heads within a layer from any cost matrix (:func:`align_heads`).
- Stability over training (:func:`qk_cosine`, :func:`strongest_head_qk_stability`,
  :func:`identity_fixed_from`).

Per-head weight matrices come from :func:`mechgen.relational.head_weights` (through the
model's architecture adapter, GPT-NeoX or GPT-2; LayerNorm gain and centring folded into the
read side; GPT-NeoX's rotary ignored, i.e. W_QK at relative offset 0, and GPT-2's learned
positions left out likewise; biases ignored).

On CKA: maintained PyPI packages exist (``ckatorch``, ``torch-cka``, ``pytorch-cka``), but
they compare whole layers of two models through a dataloader and module names, not the
per-head slices needed here, and none is widely used; linear CKA is a one-line definition,
implemented in :func:`linear_cka` and tested against its invariances.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from scipy import stats
from scipy.optimize import linear_sum_assignment

from mechgen.atomic import atomic_path
from mechgen.model import adapter as architectures
from mechgen.model.base import attention_hooks
from mechgen.relational import (
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
    "CKATest",
    "HeadSpectra",
    "OffsetProfileAccumulator",
    "SimilarityTest",
    "align_by_similarity",
    "align_heads",
    "cka_vs_random_heads",
    "head_outputs",
    "head_spectra",
    "identity_fixed_from",
    "linear_cka",
    "load_qk_factors",
    "offset_profile",
    "offset_profile_hooks",
    "offset_profile_per_sequence",
    "offset_profiles",
    "profile_similarity_matrix",
    "qk_cosine",
    "qk_factors",
    "random_heads",
    "save_qk_factors",
    "similarity_vs_random_pairs",
    "spectrum_similarity_matrix",
    "strongest_head_qk_stability",
]

Normalisation = Literal["l2", "sum"]
DEFAULT_MAX_OFFSET = 8
DEFAULT_N_NULL = 1000


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
    it can ride along another scorer's forward passes (e.g. ``mechgen.metrics.score_heads``)
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
# Similarities of signatures and their null


def spectrum_similarity_matrix(
    spectra_a: np.ndarray,
    spectra_b: np.ndarray,
    method: Literal["cosine", "wasserstein"] = "cosine",
) -> np.ndarray:
    """Similarity of every pair of spectra: ``[n_a, n_b]`` from ``[n_a, m_a]`` and ``[n_b, m_b]``.

    Spectra are descending singular values (any positive scale; rows with NaN give NaN).

    - ``cosine``: sum_i a_i b_i / (||a|| ||b||) after zero-padding the shorter spectrum
      (exact: the missing singular values of a d x d circuit of rank head_dim are zero).
      In [0, 1]; 1 = same shape of spectrum.
    - ``wasserstein``: 1 - W1 between the spectra read as distributions of energy over
      relative rank: mass sigma_i / sum(sigma) at position (i - 1/2) / m, i = 1..m
      (``scipy.stats.wasserstein_distance``; for equal m computed as the vectorised
      (1/m) sum_k |F_a(k) - F_b(k)| of the cumulative masses, which equals it). In [0, 1];
      1 = same distribution.
    """
    a = np.atleast_2d(np.asarray(spectra_a, dtype=float))
    b = np.atleast_2d(np.asarray(spectra_b, dtype=float))
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"spectra must be [n, m] arrays; got shapes {a.shape} and {b.shape}")
    if (a[np.isfinite(a)] < 0).any() or (b[np.isfinite(b)] < 0).any():
        raise ValueError("singular values must be >= 0")
    if method == "cosine":
        width = max(a.shape[1], b.shape[1])
        a_padded = np.pad(a, ((0, 0), (0, width - a.shape[1])))
        b_padded = np.pad(b, ((0, 0), (0, width - b.shape[1])))
        with np.errstate(invalid="ignore", divide="ignore"):
            a_unit = a_padded / np.linalg.norm(a_padded, axis=1, keepdims=True)
            b_unit = b_padded / np.linalg.norm(b_padded, axis=1, keepdims=True)
        return a_unit @ b_unit.T
    if method == "wasserstein":
        with np.errstate(invalid="ignore", divide="ignore"):
            a_mass = a / a.sum(axis=1, keepdims=True)
            b_mass = b / b.sum(axis=1, keepdims=True)
        if a.shape[1] == b.shape[1]:
            a_cdf = np.cumsum(a_mass, axis=1)
            b_cdf = np.cumsum(b_mass, axis=1)
            distance = np.abs(a_cdf[:, None, :] - b_cdf[None, :, :]).sum(axis=-1) / a.shape[1]
            return 1.0 - distance
        a_positions = (np.arange(a.shape[1]) + 0.5) / a.shape[1]
        b_positions = (np.arange(b.shape[1]) + 0.5) / b.shape[1]
        similarity = np.full((a.shape[0], b.shape[0]), np.nan)
        for i, a_row in enumerate(a_mass):
            for j, b_row in enumerate(b_mass):
                if np.isfinite(a_row).all() and np.isfinite(b_row).all():
                    similarity[i, j] = 1.0 - stats.wasserstein_distance(
                        a_positions, b_positions, a_row, b_row
                    )
        return similarity
    raise ValueError(f"method must be 'cosine' or 'wasserstein'; got {method!r}")


def profile_similarity_matrix(profiles_a: np.ndarray, profiles_b: np.ndarray) -> np.ndarray:
    """Pearson r of every pair of offset profiles: ``[n_a, n_b]`` from ``[n_a, K+1]``, ``[n_b, K+1]``.

    r in [-1, 1] over the offsets 0..K; NaN for a constant profile or one with NaN entries.
    """
    a = np.atleast_2d(np.asarray(profiles_a, dtype=float))
    b = np.atleast_2d(np.asarray(profiles_b, dtype=float))
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"profiles must cover the same offsets; got {a.shape[1]} and {b.shape[1]} columns"
        )
    a_centred = a - a.mean(axis=1, keepdims=True)
    b_centred = b - b.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norms = (
            np.linalg.norm(a_centred, axis=1)[:, None] * np.linalg.norm(b_centred, axis=1)[None, :]
        )
        return (a_centred @ b_centred.T) / np.where(norms > 0, norms, np.nan)


@dataclass(frozen=True)
class SimilarityTest:
    """An observed similarity against a null sample.

    ``z`` = (observed - null_mean) / null_sd; ``p_value`` = (1 + #{null >= observed}) /
    (1 + n_null), the one-sided permutation p-value (large similarity = evidence).
    """

    observed: float
    null_mean: float
    null_sd: float
    z: float
    p_value: float
    n_null: int


def _test_against(observed: float, null: np.ndarray) -> SimilarityTest:
    null = np.asarray(null, dtype=float)
    null = null[np.isfinite(null)]
    if null.size < 2 or not np.isfinite(observed):
        return SimilarityTest(
            float(observed), math.nan, math.nan, math.nan, math.nan, int(null.size)
        )
    sd = float(null.std(ddof=1))
    z = (observed - float(null.mean())) / sd if sd > 0 else math.nan
    p_value = (1 + int((null >= observed).sum())) / (1 + null.size)
    return SimilarityTest(float(observed), float(null.mean()), sd, z, p_value, int(null.size))


def similarity_vs_random_pairs(
    similarity: np.ndarray, pair: tuple[int, int], n_null: int = DEFAULT_N_NULL, seed: int = 0
) -> SimilarityTest:
    """Test the similarity of one head pair against random head pairs of the same layers.

    ``similarity``: ``[n_a, n_b]`` similarities between heads of run A (rows) and run B
    (columns), restricted by the caller to the layers being compared (e.g. all heads of layer
    l in both runs). ``pair``: (row, column) of the pair under test. Null: ``n_null`` pairs
    drawn uniformly with replacement from all other (row, column) pairs of the matrix with a
    finite similarity (``numpy.random.default_rng(seed)``).
    """
    sim = np.asarray(similarity, dtype=float)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be a 2-D [n_a, n_b] array; got shape {sim.shape}")
    row, column = pair
    if not (0 <= row < sim.shape[0] and 0 <= column < sim.shape[1]):
        raise ValueError(f"pair {pair!r} is outside the {sim.shape} similarity matrix")
    pool = sim.ravel()
    keep = np.isfinite(pool)
    keep[row * sim.shape[1] + column] = False
    pool = pool[keep]
    if pool.size == 0:
        raise ValueError("no other finite pair to build a null from")
    null = np.random.default_rng(seed).choice(pool, size=n_null, replace=True)
    return _test_against(float(sim[row, column]), null)


# ---------------------------------------------------------------------------------------------
# Linear CKA of per-token head outputs


def linear_cka(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same n tokens.

    ``x`` [n, p], ``y`` [n, q]; columns are centred (X <- X - 1 mean(X)), then
    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), in [0, 1]; invariant to orthogonal
    transforms and isotropic scaling of either side. Computed in float64. NaN if either
    centred matrix is zero.
    """
    x64 = torch.as_tensor(x).to(torch.float64)
    y64 = torch.as_tensor(y).to(torch.float64)
    if x64.ndim != 2 or y64.ndim != 2 or x64.shape[0] != y64.shape[0]:
        raise ValueError(
            f"x and y must be [n, p] and [n, q] with the same n; got {tuple(x64.shape)} and {tuple(y64.shape)}"
        )
    if x64.shape[0] < 2:
        raise ValueError("CKA needs at least 2 tokens")
    x64 = x64 - x64.mean(dim=0, keepdim=True)
    y64 = y64 - y64.mean(dim=0, keepdim=True)
    cross = torch.linalg.matrix_norm(y64.T @ x64) ** 2
    denominator = torch.linalg.matrix_norm(x64.T @ x64) * torch.linalg.matrix_norm(y64.T @ y64)
    return float(cross / denominator) if float(denominator) > 0 else math.nan


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


def random_heads(
    n_layers: int, n_heads: int, n: int, seed: int = 0, exclude: Sequence[HeadId] = ()
) -> list[HeadId]:
    """``n`` distinct (layer, head) pairs drawn uniformly without replacement, minus ``exclude``.

    ``numpy.random.default_rng(seed)``; raises if fewer than ``n`` heads are available.
    """
    excluded = {(int(layer), int(head)) for layer, head in exclude}
    pool = [
        (layer, head)
        for layer in range(n_layers)
        for head in range(n_heads)
        if (layer, head) not in excluded
    ]
    if n > len(pool):
        raise ValueError(f"asked for {n} random heads but only {len(pool)} are available")
    picks = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
    return [pool[int(i)] for i in picks]


@dataclass(frozen=True)
class CKATest:
    """CKA of a matched head pair against CKA of the reference head with random heads."""

    observed: float
    null: np.ndarray
    test: SimilarityTest


def cka_vs_random_heads(
    reference: np.ndarray | torch.Tensor,
    matched: np.ndarray | torch.Tensor,
    random_outputs: Sequence[np.ndarray | torch.Tensor],
) -> CKATest:
    """CKA(reference, matched) tested against CKA(reference, r) for random heads r.

    ``reference``: outputs [n_tokens, p] of the strongest head of run A; ``matched``: its
    aligned counterpart in run B; ``random_outputs``: outputs of random heads of run B
    (:func:`random_heads`, :func:`head_outputs`), all on the same tokens. z and the one-sided
    permutation p-value as in :class:`SimilarityTest`.
    """
    observed = linear_cka(reference, matched)
    null = np.array([linear_cka(reference, other) for other in random_outputs], dtype=float)
    return CKATest(observed=observed, null=null, test=_test_against(observed, null))


# ---------------------------------------------------------------------------------------------
# Alignment


def align_heads(cost: np.ndarray) -> np.ndarray:
    """Hungarian matching from a cost matrix: ``match[i]`` = head of B paired with head i of A.

    ``cost``: ``[n_a, n_b]`` (e.g. 1 - similarity of signatures within one layer); minimises
    the summed cost over one-to-one pairings (``scipy.optimize.linear_sum_assignment``).
    Rectangular matrices are allowed: unmatched rows get -1. NaN costs are treated as worse
    than any finite cost.
    """
    matrix = np.asarray(cost, dtype=float)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"cost must be a non-empty 2-D array; got shape {matrix.shape}")
    finite = np.isfinite(matrix)
    if not finite.any():
        raise ValueError("cost has no finite entry")
    worst = matrix[finite].max()
    spread = worst - matrix[finite].min()
    matrix = np.where(finite, matrix, worst + spread + 1.0)
    rows, cols = linear_sum_assignment(matrix)
    match = np.full(matrix.shape[0], -1, dtype=int)
    match[rows] = cols
    return match


def align_by_similarity(similarity: np.ndarray) -> np.ndarray:
    """:func:`align_heads` maximising the summed similarity (cost = -similarity)."""
    return align_heads(-np.asarray(similarity, dtype=float))


# ---------------------------------------------------------------------------------------------
# Stability over training

QKFactors = tuple[np.ndarray, np.ndarray]
"""(W_Q, W_K) of one head, each [head_dim, d_model], read side with LayerNorm folded."""


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


def save_qk_factors(path: str | Path, factors: Mapping[HeadId, QKFactors]) -> None:
    """Write factors to a ``.npz`` (keys ``L{layer}H{head}_q`` / ``_k``; no pickles)."""
    arrays = {}
    for (layer, head), (w_q, w_k) in factors.items():
        arrays[f"L{layer}H{head}_q"] = w_q
        arrays[f"L{layer}H{head}_k"] = w_k
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file: savez would add .npz
        np.savez(fh, **arrays)


def load_qk_factors(path: str | Path) -> dict[HeadId, QKFactors]:
    """Read a file written by :func:`save_qk_factors` (``allow_pickle=False``)."""
    out: dict[HeadId, QKFactors] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            if not key.endswith("_q"):
                continue
            layer_text, head_text = key[1:-2].split("H")
            out[(int(layer_text), int(head_text))] = (data[key], data[key[:-2] + "_k"])
    return out


def qk_cosine(a: QKFactors, b: QKFactors) -> float:
    """Cosine of two W_QK = W_Q^T W_K: <W_QK^a, W_QK^b>_F / (||W_QK^a||_F ||W_QK^b||_F).

    Computed through head_dim x head_dim products: <W_QK^a, W_QK^b>_F =
    tr((W_Q^a W_Q^b^T)(W_K^b W_K^a^T)) and ||W_QK||_F^2 = tr((W_Q W_Q^T)(W_K W_K^T)).
    In [-1, 1]; NaN if either circuit is zero. Meaningful within one run (the same residual
    basis, drifting slowly), not across runs.
    """
    qa, ka = (np.asarray(m, dtype=np.float64) for m in a)
    qb, kb = (np.asarray(m, dtype=np.float64) for m in b)
    if qa.shape[1] != qb.shape[1]:
        raise ValueError(f"W_QK of different d_model: {qa.shape[1]} vs {qb.shape[1]}")
    inner = np.trace((qa @ qb.T) @ (kb @ ka.T))
    norm_a = np.trace((qa @ qa.T) @ (ka @ ka.T))
    norm_b = np.trace((qb @ qb.T) @ (kb @ kb.T))
    if norm_a <= 0 or norm_b <= 0:
        return math.nan
    return float(inner / math.sqrt(norm_a * norm_b))


def strongest_head_qk_stability(
    trajectory: pd.DataFrame, factors_by_step: Mapping[int, Mapping[HeadId, QKFactors]]
) -> pd.DataFrame:
    """Per consecutive checkpoint pair of one run: cosine of the strongest head's W_QK.

    ``trajectory``: one run's rows with ``step``, ``argmax_layer``, ``argmax_head`` (as from
    :func:`mechgen.developmental.trajectories`). ``factors_by_step``: step -> {(layer, head):
    (W_Q, W_K)} saved per checkpoint (:func:`qk_factors`). For each step s after the first,
    with previous step s', the head h = argmax at s is compared with itself at s':
    ``qk_cosine`` = :func:`qk_cosine` of h's factors at s' and s (NaN if either was not
    saved). Columns: step, previous_step, layer, head, qk_cosine.
    """
    if "run" in trajectory.columns and trajectory["run"].nunique() > 1:
        raise ValueError("trajectory must hold a single run")
    ordered = trajectory.sort_values("step")
    rows = []
    steps = ordered["step"].to_numpy()
    for previous_step, (_, row) in zip(steps[:-1], ordered.iloc[1:].iterrows()):
        head = (int(row["argmax_layer"]), int(row["argmax_head"]))
        now = factors_by_step.get(int(row["step"]), {}).get(head)
        before = factors_by_step.get(int(previous_step), {}).get(head)
        cosine = qk_cosine(before, now) if now is not None and before is not None else math.nan
        rows.append(
            {
                "step": int(row["step"]),
                "previous_step": int(previous_step),
                "layer": head[0],
                "head": head[1],
                "qk_cosine": cosine,
            }
        )
    return pd.DataFrame(rows, columns=["step", "previous_step", "layer", "head", "qk_cosine"])


def identity_fixed_from(trajectory: pd.DataFrame, head_column: str = "argmax_head") -> float:
    """The first step from which the strongest head's identity never changes again.

    ``trajectory``: one run's rows with ``step``, ``argmax_layer`` and ``head_column`` (use a
    column of aligned head ids when heads were matched across checkpoints; within one run
    head indices are already consistent). Returns the earliest step s such that (layer, head)
    at every step >= s equals the final one (the final step if it changed at the last
    checkpoint); NaN for an empty trajectory.
    """
    if trajectory.empty:
        return math.nan
    ordered = trajectory.sort_values("step")
    identity = list(zip(ordered["argmax_layer"].astype(int), ordered[head_column].astype(int)))
    steps = ordered["step"].to_numpy()
    first = len(identity) - 1
    while first > 0 and identity[first - 1] == identity[-1]:
        first -= 1
    return float(steps[first])
