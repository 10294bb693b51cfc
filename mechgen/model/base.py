"""What an architecture adapter provides (:class:`ArchitectureAdapter`), and the pieces every
family shares: layernorm weights, hooks on the attention modules, the body forward that stops
after the last layer it needs and can continue sequences from a key/value cache.

An adapter is a stateless object; every method takes the loaded transformers model (the causal
LM or its body). Shapes and conventions, whatever the family's storage layout:

- ``qkv_weights``: (W_Q, W_K, W_V), each ``[n_heads, head_dim, d]``: head h's query is
  ``W_Q[h] @ LN(x) + b_Q[h]`` (``qkv_biases``: ``[n_heads, head_dim]`` each);
- ``output_weights``: W_O ``[n_heads, d, head_dim]``: the attention output is
  ``sum_h W_O[h] @ z_h + b_O`` (``output_bias``: ``[d]``), z_h the head's attention-weighted
  values;
- ``output_projection(model, layer)``: the module whose *input* is the heads' z concatenated
  (feature ``h * head_dim + i``): mean-ablation and head-output hooks are forward pre-hooks on
  it;
- ``attention(model, layer)``: the module whose forward returns ``(output, probabilities
  [B, H, T, T], ...)`` in eager mode and receives the 4-D attention mask as keyword
  ``attention_mask``;
- ``block(model, layer)``: layer ``layer``'s whole block, whose forward returns the residual
  stream after it (a tensor ``[B, T, d]``, or a tuple whose first element is), before the final
  layernorm, also for the last layer (transformers' ``output_hidden_states`` applies the final
  layernorm to its last entry; a hook on the block does not): :func:`block_output_hooks`;
- ``embedding`` W_E ``[vocab, d]``, ``unembedding`` W_U ``[vocab, d]`` (logits = W_U x after
  ``final_layernorm``), ``input_layernorm`` (what the heads read through), ``mlp_layernorm`` and
  ``mlp`` (layer l's MLP and the layernorm in front of it), ``parallel_residual``;
- ``n_params``: the parameter count the study uses: every parameter counted once,
  ``sum(p.numel() for p in model.parameters())`` (tied tensors are yielded once), embeddings,
  positional embeddings and LM head included;
- ``revision(step)``: the hub revision (branch) name of a training step;
- ``causal_lm_class()``: the transformers class that loads a checkpoint (never remote code).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class LayerNormWeights:
    """A LayerNorm's gain ``weight`` [d], ``bias`` [d] and ``eps``:
    LN(x) = weight * (x - mean(x)) / sqrt(var(x) + eps) + bias (biased variance, over d)."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """LN over the last dimension of ``x``; ``with_bias=False`` leaves out ``bias``."""
        centred = x - x.mean(dim=-1, keepdim=True)
        normed = centred / torch.sqrt(centred.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed * self.weight + (self.bias if with_bias else 0.0)


def layernorm_weights(module: torch.nn.Module) -> LayerNormWeights:
    """The weights of a ``torch.nn.LayerNorm`` as float32 CPU tensors (zeros without a bias)."""
    weight = module.weight.detach().float().cpu()
    bias = torch.zeros_like(weight) if module.bias is None else module.bias.detach().float().cpu()
    return LayerNormWeights(weight=weight, bias=bias, eps=float(module.eps))


class ArchitectureAdapter(Protocol):
    """Everything mechgen reads from a model, for one architecture family (module docstring)."""

    name: str
    """The suite key ``architecture`` value (``gpt_neox``, ``gpt2``)."""
    model_types: tuple[str, ...]
    """The transformers ``config.model_type`` values this adapter reads."""

    def body(self, model: torch.nn.Module, need_attention: bool = True) -> torch.nn.Module: ...
    def shape(self, model: torch.nn.Module) -> tuple[int, int, int, int]: ...
    def vocab_size(self, model: torch.nn.Module) -> int: ...
    def max_positions(self, model: torch.nn.Module) -> int: ...
    def attention(self, model: torch.nn.Module, layer: int) -> torch.nn.Module: ...
    def output_projection(self, model: torch.nn.Module, layer: int) -> torch.nn.Module: ...
    def block(self, model: torch.nn.Module, layer: int) -> torch.nn.Module: ...
    def lm_head(self, model: torch.nn.Module) -> torch.nn.Module | None: ...
    def embedding(self, model: torch.nn.Module) -> torch.Tensor: ...
    def unembedding(self, model: torch.nn.Module) -> torch.Tensor: ...
    def final_layernorm(self, model: torch.nn.Module) -> LayerNormWeights: ...
    def input_layernorm(self, model: torch.nn.Module, layer: int) -> LayerNormWeights: ...
    def mlp_layernorm(self, model: torch.nn.Module, layer: int) -> LayerNormWeights: ...
    def mlp(self, model: torch.nn.Module, layer: int) -> torch.nn.Module: ...
    def parallel_residual(self, model: torch.nn.Module) -> bool: ...
    def qkv_weights(
        self, model: torch.nn.Module, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def qkv_biases(
        self, model: torch.nn.Module, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def output_weights(self, model: torch.nn.Module, layer: int) -> torch.Tensor: ...
    def output_bias(self, model: torch.nn.Module, layer: int) -> torch.Tensor: ...
    def attention_scale(self, model: torch.nn.Module, layer: int) -> float: ...
    def n_params(self, model: torch.nn.Module) -> int: ...
    def revision(self, step: int) -> str: ...
    def causal_lm_class(self) -> type: ...


def check_eager(model: torch.nn.Module) -> None:
    """Raise unless ``model`` runs eager attention, the only one that returns probabilities."""
    implementation = model.config._attn_implementation
    if implementation != "eager":
        raise ValueError(
            "attention probabilities are read, which only eager attention returns; the model "
            f"uses {implementation!r}. Load it with "
            "from_pretrained(..., attn_implementation='eager') or call "
            "model.set_attn_implementation('eager')."
        )


def count_parameters(model: torch.nn.Module) -> int:
    """``sum(p.numel() for p in model.parameters())``: every parameter once (tied tensors are
    yielded once by ``parameters()``)."""
    return int(sum(p.numel() for p in model.parameters()))


class StopForward(Exception):
    """Raised by the hook of the last layer a caller needs, to end the forward pass there:
    nothing after that layer's attention (its MLP, later layers, the final layernorm) feeds a
    per-head score."""


AttentionCallback = Callable[[int, torch.Tensor, dict], None]
"""``callback(layer, probabilities [B, H, T, T], kwargs)``: ``kwargs`` are the keyword
arguments the attention module received (``attention_mask``: the 4-D additive mask)."""


@contextmanager
def attention_hooks(
    adapter: ArchitectureAdapter,
    model: torch.nn.Module,
    callback: AttentionCallback,
    layers: Sequence[int] | None = None,
    stop_after: int | None = None,
) -> Iterator[None]:
    """Within the block, every forward pass calls ``callback`` with each listed layer's
    attention probabilities (all layers by default); after layer ``stop_after``'s callback the
    pass is ended with :class:`StopForward` (catch it around the forward call;
    :func:`forward_body` does). Needs eager attention."""
    adapter.body(model, need_attention=True)
    n_layers = adapter.shape(model)[0]
    selected = range(n_layers) if layers is None else layers

    def hook_for(layer_index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: object, kwargs: dict, output: object) -> None:
            attention = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if attention is None:
                raise RuntimeError(
                    f"layer {layer_index}'s attention module returned no attention "
                    "probabilities; load the model with attn_implementation='eager'"
                )
            callback(layer_index, attention, kwargs)
            if layer_index == stop_after:
                raise StopForward

        return hook

    handles = [
        adapter.attention(model, index).register_forward_hook(hook_for(index), with_kwargs=True)
        for index in selected
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def block_output_hooks(
    adapter: ArchitectureAdapter,
    model: torch.nn.Module,
    callback: Callable[[int, torch.Tensor], None],
) -> Iterator[None]:
    """Within the block, every forward pass calls ``callback(layer, residual [B, T, d])`` with
    the residual stream after each layer (the adapter's ``block`` output, before the final
    layernorm)."""
    n_layers = adapter.shape(model)[0]

    def hook_for(layer_index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: object, output: object) -> None:
            callback(layer_index, output[0] if isinstance(output, tuple) else output)

        return hook

    handles = [
        adapter.block(model, index).register_forward_hook(hook_for(index))
        for index in range(n_layers)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def new_cache() -> Any:
    """An empty key/value cache (transformers' ``DynamicCache``) for :func:`forward_body`.

    A pass with it stores every layer's keys and values of its tokens; a later pass with the
    same cache continues those sequences: its positions start after the cached tokens (rotary
    angles, learned position embeddings) and its queries attend to the cached keys under the
    causal mask, so it computes what the same positions of one pass over the whole sequence
    would, up to float rounding. A pass ended by :class:`StopForward` after the last layer's
    attention has stored every layer (each attention module stores its keys and values before
    its hook runs)."""
    # Imported here: table-side processes import the adapters (through mechgen.scoring.circuit)
    # without loading transformers, which only a process that holds a model needs.
    from transformers import DynamicCache

    return DynamicCache()


def fork_cache(cache: Any) -> Any:
    """An independent copy of ``cache``: a pass with the copy leaves ``cache`` as it was (a pass
    appends its keys and values to the cache it is given)."""
    return copy.deepcopy(cache)


def _cache_keyword(body: torch.nn.Module) -> str:
    # transformers 5 renamed the body's ``past_key_values`` argument to ``cache`` (the old name
    # is deprecated, with a warning); pass whichever this version's forward declares.
    parameters = inspect.signature(body.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def forward_body(
    adapter: ArchitectureAdapter,
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache: Any = None,
) -> torch.Tensor | None:
    """Run the body (no LM head) once: the final hidden states ``[B, T, d]`` (after the final
    layernorm), or None when a hook ended the pass early (:class:`StopForward`).

    ``cache`` (:func:`new_cache`): the pass continues the sequences whose keys and values it
    holds (``input_ids`` are the tokens after them) and appends its own to it."""
    body = adapter.body(model, need_attention=False)
    extra = {} if cache is None else {_cache_keyword(body): cache}
    try:
        return body(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=cache is not None, **extra
        )[0]
    except StopForward:
        return None
