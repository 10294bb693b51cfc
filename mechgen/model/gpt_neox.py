"""The GPT-NeoX architecture adapter: every weight, module and hook point mechgen reads.

Checked against transformers' ``modeling_gpt_neox.py`` (tests/test_gpt_neox_adapter.py does
it by brute force on the modules themselves):

- token embedding ``gpt_neox.embed_in.weight`` ``[vocab, d]`` (W_E, one row per token id);
  unembedding: the LM head's weight (``get_output_embeddings()``: ``embed_out`` in transformers
  4, ``lm_head`` in 5) ``[vocab, d]`` (W_U; logits = W_U x), after
  ``gpt_neox.final_layer_norm``. Pythia does not tie them.
- fused QKV: ``attention.query_key_value`` is one ``Linear(d, 3d)`` whose output is viewed as
  ``[..., n_heads, 3 * head_dim]`` and chunked into q, k, v, so its weight is
  ``view(n_heads, 3, head_dim, d)`` (component 0 = q, 1 = k, 2 = v) and its bias
  ``view(n_heads, 3, head_dim)``. The output projection ``attention.dense`` takes the heads
  concatenated (input feature ``h * head_dim + i``), so head h's W_O is
  ``dense.weight[:, h * head_dim:(h + 1) * head_dim]``.
- parallel residual (``use_parallel_residual=True``, as in every Pythia): layer l computes
  ``x + attn(input_layernorm(x)) + mlp(post_attention_layernorm(x))``: the MLP reads the layer's
  *input* x, not the attention output. Without the parallel residual the MLP reads
  ``post_attention_layernorm(x + attn(...))``.
"""

from __future__ import annotations

import torch

from mechgen import architectures
from mechgen.model.base import (
    LayerNormWeights,
    check_eager,
    count_parameters,
    layernorm_weights,
)


def gpt_neox_body(model: torch.nn.Module, need_attention: bool = True) -> torch.nn.Module:
    """The transformer body (``GPTNeoXModel``) of a GPT-NeoX model, validated.

    GPTNeoXForCausalLM keeps the body in ``.gpt_neox``; GPTNeoXModel is the body itself; both
    expose it as ``base_model``. Running only the body skips the LM head, whose vocab-sized
    projection costs more than the whole body for small Pythias. ``need_attention``: the caller
    reads attention probabilities, which only eager attention returns.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "gpt_neox":
        raise TypeError(
            "expected a transformers GPT-NeoX model (GPTNeoXForCausalLM or GPTNeoXModel); "
            f"got {type(model).__name__}"
        )
    body = model.base_model
    if not hasattr(body, "layers"):
        raise TypeError(f"{type(model).__name__}.base_model has no `layers`; not a GPT-NeoX body")
    if need_attention:
        check_eager(model)
    return body


def shape(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """(n_layers, n_heads, head_dim, d_model) of a GPT-NeoX model."""
    config = model.config
    n_heads = int(config.num_attention_heads)
    d_model = int(config.hidden_size)
    return int(config.num_hidden_layers), n_heads, d_model // n_heads, d_model


def embedding(model: torch.nn.Module) -> torch.Tensor:
    """W_E ``[vocab, d]`` float32 on the CPU (a view of the parameter's data; do not modify)."""
    return gpt_neox_body(model, need_attention=False).embed_in.weight.detach().float().cpu()


def unembedding(model: torch.nn.Module) -> torch.Tensor:
    """W_U ``[vocab, d]`` float32 on the CPU: logits = x @ W_U.T (no bias in GPT-NeoX)."""
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no LM head (load GPTNeoXForCausalLM)")
    return head.weight.detach().float().cpu()


def final_layernorm(model: torch.nn.Module) -> LayerNormWeights:
    """``gpt_neox.final_layer_norm``, applied before W_U."""
    return layernorm_weights(gpt_neox_body(model, need_attention=False).final_layer_norm)


def input_layernorm(model: torch.nn.Module, layer: int) -> LayerNormWeights:
    """Layer ``layer``'s ``input_layernorm``, which every head of that layer reads through."""
    return layernorm_weights(
        gpt_neox_body(model, need_attention=False).layers[layer].input_layernorm
    )


def mlp_layernorm(model: torch.nn.Module, layer: int) -> LayerNormWeights:
    """Layer ``layer``'s ``post_attention_layernorm``, which its MLP reads through."""
    return layernorm_weights(
        gpt_neox_body(model, need_attention=False).layers[layer].post_attention_layernorm
    )


def mlp(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """Layer ``layer``'s MLP module (``dense_h_to_4h``, activation, ``dense_4h_to_h``); call it
    under ``torch.no_grad()`` on float32 CPU inputs of width d."""
    return gpt_neox_body(model, need_attention=False).layers[layer].mlp


def parallel_residual(model: torch.nn.Module) -> bool:
    """True when each layer's MLP reads the layer input (GPT-NeoX's parallel residual)."""
    return bool(getattr(model.config, "use_parallel_residual", True))


def qkv_weights(
    model: torch.nn.Module, layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_Q, W_K, W_V) of every head of ``layer``, each ``[n_heads, head_dim, d]`` float32 CPU
    (head h's query is ``W_Q[h] @ LN(x) + b_Q[h]``), split from the fused QKV weight."""
    _, n_heads, head_dim, d_model = shape(model)
    attention = gpt_neox_body(model, need_attention=False).layers[layer].attention
    fused = attention.query_key_value.weight.detach().float().cpu()
    fused = fused.view(n_heads, 3, head_dim, d_model)
    return fused[:, 0].clone(), fused[:, 1].clone(), fused[:, 2].clone()


def qkv_biases(
    model: torch.nn.Module, layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b_Q, b_K, b_V) of every head of ``layer``, each ``[n_heads, head_dim]`` (zeros when the
    fused QKV has no bias)."""
    _, n_heads, head_dim, _ = shape(model)
    linear = gpt_neox_body(model, need_attention=False).layers[layer].attention.query_key_value
    if linear.bias is None:
        zeros = torch.zeros(n_heads, head_dim)
        return zeros, zeros.clone(), zeros.clone()
    fused = linear.bias.detach().float().cpu().view(n_heads, 3, head_dim)
    return fused[:, 0].clone(), fused[:, 1].clone(), fused[:, 2].clone()


def output_weights(model: torch.nn.Module, layer: int) -> torch.Tensor:
    """W_O of every head of ``layer``: ``[n_heads, d, head_dim]`` float32 CPU, so the layer's
    attention output is ``sum_h W_O[h] @ z_h + b_O`` (``b_O`` = :func:`output_bias`)."""
    _, n_heads, head_dim, d_model = shape(model)
    dense = gpt_neox_body(model, need_attention=False).layers[layer].attention.dense
    weight = dense.weight.detach().float().cpu()
    return weight.view(d_model, n_heads, head_dim).permute(1, 0, 2).clone()


def output_bias(model: torch.nn.Module, layer: int) -> torch.Tensor:
    """b_O ``[d]`` of ``layer``'s output projection (zeros without a bias)."""
    dense = gpt_neox_body(model, need_attention=False).layers[layer].attention.dense
    if dense.bias is None:
        return torch.zeros(dense.out_features)
    return dense.bias.detach().float().cpu()


def attention_scale(model: torch.nn.Module, layer: int) -> float:
    """The factor of q.k in the attention logits: 1 / sqrt(head_dim) (``norm_factor``)."""
    _, _, head_dim, _ = shape(model)
    return float(head_dim) ** -0.5


class GPTNeoXAdapter:
    """The :class:`mechgen.model.base.ArchitectureAdapter` of GPT-NeoX (Pythia): the module
    functions above, plus the modules hooks attach to (``layers[l].attention``, whose eager
    forward returns the probabilities; ``layers[l].attention.dense``, whose input is the heads'
    z) and the ``stepN`` revision names of Pythia's branches."""

    name = "gpt_neox"
    model_types = ("gpt_neox",)

    body = staticmethod(gpt_neox_body)
    shape = staticmethod(shape)
    embedding = staticmethod(embedding)
    unembedding = staticmethod(unembedding)
    final_layernorm = staticmethod(final_layernorm)
    input_layernorm = staticmethod(input_layernorm)
    mlp_layernorm = staticmethod(mlp_layernorm)
    mlp = staticmethod(mlp)
    parallel_residual = staticmethod(parallel_residual)
    qkv_weights = staticmethod(qkv_weights)
    qkv_biases = staticmethod(qkv_biases)
    output_weights = staticmethod(output_weights)
    output_bias = staticmethod(output_bias)
    attention_scale = staticmethod(attention_scale)
    n_params = staticmethod(count_parameters)

    @staticmethod
    def vocab_size(model: torch.nn.Module) -> int:
        return int(model.config.vocab_size)

    @staticmethod
    def max_positions(model: torch.nn.Module) -> int:
        return int(model.config.max_position_embeddings)

    @staticmethod
    def attention(model: torch.nn.Module, layer: int) -> torch.nn.Module:
        return gpt_neox_body(model, need_attention=False).layers[layer].attention

    @staticmethod
    def output_projection(model: torch.nn.Module, layer: int) -> torch.nn.Module:
        return gpt_neox_body(model, need_attention=False).layers[layer].attention.dense

    @staticmethod
    def block(model: torch.nn.Module, layer: int) -> torch.nn.Module:
        """Layer ``layer`` (``layers[layer]``): its forward returns the residual stream after
        the layer, before ``final_layer_norm`` (also for the last layer)."""
        return gpt_neox_body(model, need_attention=False).layers[layer]

    @staticmethod
    def lm_head(model: torch.nn.Module) -> torch.nn.Module | None:
        """The LM head (None for a bare ``GPTNeoXModel``)."""
        if model is gpt_neox_body(model, need_attention=False):
            return None
        return model.get_output_embeddings()

    @staticmethod
    def revision(step: int) -> str:
        # The family's naming is stated once, torch-free, in mechgen.architectures.
        return architectures.revision_name(step, "gpt_neox")

    @staticmethod
    def causal_lm_class() -> type:
        # the model module of transformers costs ~7.5 CPU-s of imports: only when a model is built
        from transformers import GPTNeoXForCausalLM

        return GPTNeoXForCausalLM


ADAPTER = GPTNeoXAdapter()
