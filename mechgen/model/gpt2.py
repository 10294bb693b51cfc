"""The GPT-2 architecture adapter (transformers ``GPT2LMHeadModel`` / ``GPT2Model``; Stanford
CRFM's Mistral runs and the toy GPT-2 suite).

Checked against transformers' ``modeling_gpt2.py`` (tests/test_gpt2_adapter.py does it by
brute force on the modules themselves):

- token embedding ``transformer.wte.weight`` ``[vocab, d]`` (W_E); learned absolute positions
  ``transformer.wpe.weight`` ``[n_positions, d]``, added to the token embedding before layer 0;
  unembedding: ``lm_head.weight`` ``[vocab, d]``, tied to ``wte`` (W_U; logits = W_U x, no bias),
  after ``transformer.ln_f``.
- ``attn.c_attn`` is a ``Conv1D(3d, d)``: y = x @ W + b with W stored ``[d_in, 3 d_out]``, i.e.
  transposed with respect to ``torch.nn.Linear``. Its output is split into q, k, v of width d
  each (``split(d, dim=2)``), each viewed as ``[..., n_heads, head_dim]``, so head h's W_Q is
  ``W[:, h * head_dim:(h + 1) * head_dim].T`` (``[head_dim, d]``), W_K the same columns offset
  by d and W_V by 2d; the bias splits likewise. ``attn.c_proj`` is a ``Conv1D(d, d)`` whose
  input is the heads concatenated (feature ``h * head_dim + i``), so head h's W_O is
  ``c_proj.weight[h * head_dim:(h + 1) * head_dim, :].T`` (``[d, head_dim]``).
- sequential residual: block l computes ``x' = x + attn(ln_1(x))`` then
  ``x' + mlp(ln_2(x'))``: the MLP reads the attention's output.
- attention logits are ``scaling * q.k`` with ``scaling = 1/sqrt(head_dim)`` when
  ``scale_attn_weights`` (the default), divided by ``layer + 1`` when
  ``scale_attn_by_inverse_layer_idx`` (set in the Mistral runs' configs).
  ``reorder_and_upcast_attn`` computes the same probabilities in float32.
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


def gpt2_body(model: torch.nn.Module, need_attention: bool = True) -> torch.nn.Module:
    """The transformer body (``GPT2Model``) of a GPT-2 model, validated (``need_attention``:
    the caller reads attention probabilities, which only eager attention returns)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "gpt2":
        raise TypeError(
            "expected a transformers GPT-2 model (GPT2LMHeadModel or GPT2Model); "
            f"got {type(model).__name__}"
        )
    body = model.base_model
    if not hasattr(body, "h"):
        raise TypeError(f"{type(model).__name__}.base_model has no `h`; not a GPT-2 body")
    if getattr(config, "add_cross_attention", False):
        raise ValueError("GPT-2 with cross-attention is not a decoder-only language model")
    if need_attention:
        check_eager(model)
    return body


def _block(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    return gpt2_body(model, need_attention=False).h[layer]


def shape(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """(n_layers, n_heads, head_dim, d_model) of a GPT-2 model."""
    config = model.config
    n_heads = int(config.n_head)
    d_model = int(config.n_embd)
    return int(config.n_layer), n_heads, d_model // n_heads, d_model


def embedding(model: torch.nn.Module) -> torch.Tensor:
    """W_E ``[vocab, d]`` float32 on the CPU (``wte``; do not modify)."""
    return gpt2_body(model, need_attention=False).wte.weight.detach().float().cpu()


def position_embedding(model: torch.nn.Module) -> torch.Tensor:
    """W_pos ``[n_positions, d]`` float32 on the CPU (``wpe``), added to W_E before layer 0."""
    return gpt2_body(model, need_attention=False).wpe.weight.detach().float().cpu()


def unembedding(model: torch.nn.Module) -> torch.Tensor:
    """W_U ``[vocab, d]`` float32 on the CPU: logits = x @ W_U.T (tied to W_E, no bias)."""
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no LM head (load GPT2LMHeadModel)")
    return head.weight.detach().float().cpu()


def final_layernorm(model: torch.nn.Module) -> LayerNormWeights:
    """``transformer.ln_f``, applied before W_U."""
    return layernorm_weights(gpt2_body(model, need_attention=False).ln_f)


def input_layernorm(model: torch.nn.Module, layer: int) -> LayerNormWeights:
    """Block ``layer``'s ``ln_1``, which every head of that layer reads through."""
    return layernorm_weights(_block(model, layer).ln_1)


def mlp_layernorm(model: torch.nn.Module, layer: int) -> LayerNormWeights:
    """Block ``layer``'s ``ln_2``, which its MLP reads through."""
    return layernorm_weights(_block(model, layer).ln_2)


def mlp(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """Block ``layer``'s MLP (``c_fc``, activation, ``c_proj``); call it under
    ``torch.no_grad()`` on float32 CPU inputs of width d, the model in eval mode."""
    return _block(model, layer).mlp


def parallel_residual(model: torch.nn.Module) -> bool:
    """False: GPT-2's MLP reads the residual stream after the layer's attention."""
    return False


def qkv_weights(
    model: torch.nn.Module, layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_Q, W_K, W_V) of every head of ``layer``, each ``[n_heads, head_dim, d]`` float32 CPU,
    from the transposed Conv1D weight ``c_attn.weight`` ``[d, 3d]`` (module docstring)."""
    _, n_heads, head_dim, d_model = shape(model)
    weight = _block(model, layer).attn.c_attn.weight.detach().float().cpu()  # [d_in, 3 d]
    # Column c * d + h * head_dim + i is component c (q, k, v), head h, dimension i.
    per_head = weight.T.reshape(3, n_heads, head_dim, d_model)
    return per_head[0].clone(), per_head[1].clone(), per_head[2].clone()


def qkv_biases(
    model: torch.nn.Module, layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b_Q, b_K, b_V) of every head of ``layer``, each ``[n_heads, head_dim]``."""
    _, n_heads, head_dim, _ = shape(model)
    bias = _block(model, layer).attn.c_attn.bias.detach().float().cpu().view(3, n_heads, head_dim)
    return bias[0].clone(), bias[1].clone(), bias[2].clone()


def output_weights(model: torch.nn.Module, layer: int) -> torch.Tensor:
    """W_O of every head of ``layer``: ``[n_heads, d, head_dim]`` float32 CPU, from the
    transposed Conv1D weight ``c_proj.weight`` ``[d_in = n_heads * head_dim, d]``."""
    _, n_heads, head_dim, d_model = shape(model)
    weight = _block(model, layer).attn.c_proj.weight.detach().float().cpu()
    return weight.view(n_heads, head_dim, d_model).transpose(1, 2).clone()


def output_bias(model: torch.nn.Module, layer: int) -> torch.Tensor:
    """b_O ``[d]`` of ``layer``'s output projection."""
    return _block(model, layer).attn.c_proj.bias.detach().float().cpu()


def attention_scale(model: torch.nn.Module, layer: int) -> float:
    """The factor of q.k in the attention logits (module docstring)."""
    config = model.config
    _, _, head_dim, _ = shape(model)
    scale = float(head_dim) ** -0.5 if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scale /= float(layer + 1)
    return scale


class GPT2Adapter:
    """The :class:`mechgen.model.base.ArchitectureAdapter` of GPT-2: the module functions
    above, ``h[l].attn`` (its eager forward returns the probabilities), ``h[l].attn.c_proj``
    (its input is the heads' z) and the ``checkpoint-N`` revisions of the CRFM runs."""

    name = "gpt2"
    model_types = ("gpt2",)

    body = staticmethod(gpt2_body)
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
        return int(model.config.n_positions)

    @staticmethod
    def attention(model: torch.nn.Module, layer: int) -> torch.nn.Module:
        return _block(model, layer).attn

    @staticmethod
    def block(model: torch.nn.Module, layer: int) -> torch.nn.Module:
        """Block ``layer`` (``h[layer]``): its forward returns the residual stream after the
        block, before ``ln_f`` (also for the last block)."""
        return _block(model, layer)

    @staticmethod
    def output_projection(model: torch.nn.Module, layer: int) -> torch.nn.Module:
        return _block(model, layer).attn.c_proj

    @staticmethod
    def lm_head(model: torch.nn.Module) -> torch.nn.Module | None:
        """The LM head (None for a bare ``GPT2Model``)."""
        if model is gpt2_body(model, need_attention=False):
            return None
        return model.get_output_embeddings()

    @staticmethod
    def revision(step: int) -> str:
        # The family's naming is stated once, torch-free, in mechgen.architectures.
        return architectures.revision_name(step, "gpt2")

    @staticmethod
    def causal_lm_class() -> type:
        # the model module of transformers costs ~7.5 CPU-s of imports: only when a model is built
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel


ADAPTER = GPT2Adapter()
