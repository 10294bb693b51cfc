"""Weight-based mechanism scores of every head, from a loaded model (no text pass).

The scoring job calls :func:`score_weight_mechanisms` once per checkpoint. Per head (layer l,
head h) and per pair of tokens (source s, candidate c), the OV-circuit logit is

    L[s, c] = W_U[c] . LN_f( W_O[l, h] W_V[l, h] LN_l( e(s) ) )

where e(s) is the *effective embedding* of token s (below), LN_l the layer's
``input_layernorm`` (through which the head reads), LN_f the final layernorm, W_V/W_O the
head's value and output matrices and W_U the unembedding, all read through the model's
architecture adapter (:mod:`mechgen.model.adapter`; GPT-NeoX and GPT-2 alike). Every
bias (the layernorms' beta, b_V, b_O) is left out: they add the same vector whatever the
source, so L is a property of the head's OV circuit alone. Attention is taken to sit entirely
on the source token (the OV circuit read in isolation, as Gould et al. and McDougall et al. do).

Effective embedding conventions (:data:`CONVENTIONS`, recorded in the sidecar):

- ``"neox"`` (the default): e(s) = W_E[s] + MLP0(LN0_mlp(W_E[s])), what the residual stream
  holds after layer 0 for a lone token minus layer 0's attention output. Faithful to GPT-NeoX's
  parallel residual, where MLP0 reads ``post_attention_layernorm`` of the layer *input* (the
  embedding), not of the attention output (the adapter's ``parallel_residual``).
  With a sequential residual (GPT-2, or GPT-NeoX without the parallel residual) the exact
  layer-0 output is W_E + a0 + MLP0(LN(W_E + a0)), a0 layer 0's attention output; the same
  formula is used with a0 left out (the attention output depends on the context, not on the
  token alone), so e(s) is the layer-0 output of a lone token whose layer-0 attention output
  is zeroed. For GPT-2 the learned position embedding is left out too (W_pos is the same for
  every token at a position, so it is no part of the token's identity).
- ``"tigges"``: e(s) = MLP0(W_E[s]): Tigges et al.'s MLP0 output on the raw embedding, with
  neither the layernorm in front of MLP0 nor the residual.

The per-token scores live in :mod:`mechgen.mechanisms.successor` and
:mod:`mechgen.mechanisms.copy_suppression`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from mechgen.mechanisms import copy_suppression, successor
from mechgen.model import adapter as architectures
from mechgen.schema import WEIGHT_COLUMNS

CONVENTIONS = ("neox", "tigges")
DEFAULT_CONVENTION = "neox"
"""The effective-embedding convention the scoring job uses (module docstring)."""

WEIGHT_SCORES_VERSION = 1
"""Bump when a weight-based score changes meaning: it is part of the score-cache key."""


@dataclass(frozen=True)
class WeightTasks:
    """What the weight-based scores of one run read besides the weights.

    ``successor``: the run's successor task record (:func:`mechgen.mechanisms.successor.
    task_token_ids`, written by the ``eval_tokens`` rule); ``copy_token_ids``: the K most frequent
    evaluation token ids (:func:`mechgen.mechanisms.copy_suppression.frequent_tokens`);
    ``convention``: the effective embedding (:data:`CONVENTIONS`).
    """

    successor: Mapping[str, Any]
    copy_token_ids: tuple[int, ...]
    convention: str = DEFAULT_CONVENTION

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ValueError(
                f"effective-embedding convention must be one of {CONVENTIONS}, "
                f"got {self.convention!r}"
            )
        successor.check_task_record(self.successor)

    @classmethod
    def from_eval_tokens(
        cls,
        record: Mapping[str, Any],
        top_k: int = copy_suppression.DEFAULT_TOP_K,
        convention: str = DEFAULT_CONVENTION,
    ) -> WeightTasks:
        """From the ``eval_tokens`` JSON of a run (its ``token_ids`` and ``successor_tasks``)."""
        if "successor_tasks" not in record:
            raise KeyError(
                "the eval_tokens record has no 'successor_tasks'; rerun rule eval_tokens"
            )
        return cls(
            successor=record["successor_tasks"],
            copy_token_ids=tuple(copy_suppression.frequent_tokens(record["token_ids"], top_k)),
            convention=convention,
        )

    def record(self) -> dict[str, Any]:
        """The sidecar's (and score-cache key's) record: version, convention, the successor
        task's sha256, kept task sizes and dropped items, K and the sha256 of the K ids
        (sha256 of their JSON list)."""
        copy_ids = json.dumps(list(self.copy_token_ids), separators=(",", ":"))
        return {
            "version": WEIGHT_SCORES_VERSION,
            "effective_embedding": self.convention,
            "successor_sha256": self.successor["sha256"],
            "successor_tasks": {
                name: len(task["items"]) for name, task in self.successor["tasks"].items()
            },
            "successor_dropped_items": {
                name: [d["item"] for d in task["dropped"]]
                for name, task in self.successor["tasks"].items()
                if task["dropped"]
            },
            "successor_dropped_tasks": dict(self.successor["dropped_tasks"]),
            "copy_top_k": len(self.copy_token_ids),
            "copy_token_ids_sha256": hashlib.sha256(copy_ids.encode()).hexdigest(),
        }


def effective_embedding(
    model: torch.nn.Module, token_ids: Sequence[int], convention: str = DEFAULT_CONVENTION
) -> torch.Tensor:
    """e(s) ``[n, d]`` float32 of ``token_ids`` under ``convention`` (module docstring)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    adapter = architectures.for_model(model)
    w_e = adapter.embedding(model)
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= w_e.shape[0]):
        raise ValueError(f"token ids must be in [0, {w_e.shape[0]}) (the model's vocabulary)")
    rows = w_e[ids]
    mlp0 = adapter.mlp(model, 0)
    with torch.no_grad():
        if convention == "tigges":
            return mlp0(rows).float()
        return rows + mlp0(adapter.mlp_layernorm(model, 0)(rows)).float()


def _head_outputs(model: torch.nn.Module, layer: int, e: torch.Tensor) -> torch.Tensor:
    """LN_f(W_O[l, h] W_V[l, h] LN_l(e)) of every head of ``layer``: ``[n_heads, n, d]``, the
    vectors W_U reads (biases left out; module docstring)."""
    adapter = architectures.for_model(model)
    x = adapter.input_layernorm(model, layer)(e, with_bias=False)  # [n, d]
    _, _, w_v = adapter.qkv_weights(model, layer)  # [H, hd, d]
    w_o = adapter.output_weights(model, layer)  # [H, d, hd]
    z = torch.einsum("hid,nd->hni", w_v, x)
    return adapter.final_layernorm(model)(torch.einsum("hdi,hni->hnd", w_o, z), with_bias=False)


def ov_logits(
    model: torch.nn.Module,
    source_ids: Sequence[int],
    candidate_ids: Sequence[int],
    convention: str = DEFAULT_CONVENTION,
) -> torch.Tensor:
    """L ``[n_layers, n_heads, n_sources, n_candidates]`` float32 (module docstring)."""
    adapter = architectures.for_model(model)
    n_layers, _, _, _ = adapter.shape(model)
    e = effective_embedding(model, source_ids, convention)
    w_u = adapter.unembedding(model)[torch.as_tensor(list(candidate_ids), dtype=torch.long)]
    with torch.no_grad():
        return torch.stack([_head_outputs(model, layer, e) @ w_u.T for layer in range(n_layers)])


def score_weight_mechanisms(model: torch.nn.Module, tasks: WeightTasks) -> pd.DataFrame:
    """One row per head: layer, head and :data:`WEIGHT_COLUMNS` (float64).

    The head outputs of the union of the successor items and the K frequent tokens are computed
    once per layer; each task then takes its own block of :func:`ov_logits` (its items as
    sources and candidates): successor scores
    (:func:`mechgen.mechanisms.successor.successor_scores`) and copy scores
    (:func:`mechgen.mechanisms.copy_suppression.copy_scores`; NaN with fewer than 2 tokens).
    """
    adapter = architectures.for_model(model)
    n_layers, n_heads, _, _ = adapter.shape(model)
    blocks = {name: task["token_ids"] for name, task in tasks.successor["tasks"].items()}
    copy_key = object()  # a key no task name can equal
    if len(tasks.copy_token_ids) >= 2:
        blocks[copy_key] = list(tasks.copy_token_ids)
    union = sorted({i for ids in blocks.values() for i in ids})
    where = {token: index for index, token in enumerate(union)}
    w_u = adapter.unembedding(model)
    logits: dict[Any, list[np.ndarray]] = {name: [] for name in blocks}
    if union:
        e = effective_embedding(model, union, tasks.convention)
        with torch.no_grad():
            for layer in range(n_layers):
                outputs = _head_outputs(model, layer, e)  # [H, n_union, d]
                for name, ids in blocks.items():
                    rows = outputs[:, [where[i] for i in ids]]
                    block = rows @ w_u[torch.as_tensor(ids, dtype=torch.long)].T
                    logits[name].append(block.double().numpy())
    stacked = {name: np.stack(layers) for name, layers in logits.items() if layers}
    scores = successor.successor_scores(
        {name: stacked[name] for name in tasks.successor["tasks"]}, tasks.successor
    )
    if copy_key in stacked:
        scores.update(copy_suppression.copy_scores(stacked[copy_key]))
    else:
        scores.update(copy_suppression=np.nan, copying=np.nan)
    layer_index, head_index = np.divmod(np.arange(n_layers * n_heads), n_heads)
    frame = pd.DataFrame({"layer": layer_index, "head": head_index})
    for column in WEIGHT_COLUMNS:
        frame[column] = np.broadcast_to(
            np.asarray(scores[column], dtype=float), (n_layers, n_heads)
        ).reshape(-1)
    return frame


def add_weight_columns(
    result: pd.DataFrame, model: torch.nn.Module, tasks: WeightTasks
) -> pd.DataFrame:
    """``result`` (per-head rows with ``layer`` and ``head``) with :data:`WEIGHT_COLUMNS` added
    from :func:`score_weight_mechanisms`; a copy, keeping ``result.attrs``."""
    scores = score_weight_mechanisms(model, tasks).set_index(["layer", "head"])
    index = pd.MultiIndex.from_frame(result[["layer", "head"]].astype("int64"))
    out = result.copy()
    for column in WEIGHT_COLUMNS:
        out[column] = scores[column].reindex(index).to_numpy()
    return out
