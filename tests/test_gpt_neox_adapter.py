"""The GPT-NeoX adapter (mechgen.model.gpt_neox) and the OV-circuit logits
(mechgen.model.weight_scores.ov_logits) against brute-force forwards of transformers' own
GPTNeoX modules, on a small random model with every weight (layernorms and biases included)
random."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from mechgen.model import gpt_neox
from mechgen.model.weight_scores import effective_embedding, ov_logits

N_LAYERS, N_HEADS, D_MODEL, VOCAB = 2, 4, 32, 40
HEAD_DIM = D_MODEL // N_HEADS


def random_model(parallel: bool = True) -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        intermediate_size=48,
        max_position_embeddings=16,
        tie_word_embeddings=False,
        use_parallel_residual=parallel,
        attention_bias=True,
        layer_norm_eps=1e-5,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
    return model


def test_single_token_attention_is_sum_of_per_head_ov() -> None:
    """On a one-token sequence each head attends to itself with probability 1, so the dense
    input is [W_V[h] LN(x) + b_V[h]]_h and the attention output sum_h W_O[h] z_h + b_O."""
    model = random_model()
    body = model.gpt_neox
    seen: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(body.layers):
        layer.input_layernorm.register_forward_hook(
            lambda m, a, out, i=index: seen.__setitem__(f"ln{i}", out.detach())
        )
        layer.attention.dense.register_forward_pre_hook(
            lambda m, a, i=index: seen.__setitem__(f"z{i}", a[0].detach())
        )
        layer.attention.register_forward_hook(
            lambda m, a, out, i=index: seen.__setitem__(f"attn{i}", out[0].detach())
        )
    with torch.no_grad():
        body(input_ids=torch.tensor([[7]]), use_cache=False)
    for layer in range(N_LAYERS):
        x = seen[f"ln{layer}"][0, 0]
        _, _, w_v = gpt_neox.qkv_weights(model, layer)
        _, _, b_v = gpt_neox.qkv_biases(model, layer)
        z = torch.einsum("hid,d->hi", w_v, x) + b_v
        torch.testing.assert_close(z.reshape(-1), seen[f"z{layer}"][0, 0], rtol=1e-5, atol=1e-5)
        w_o = gpt_neox.output_weights(model, layer)
        out = torch.einsum("hdi,hi->d", w_o, z) + gpt_neox.output_bias(model, layer)
        torch.testing.assert_close(out, seen[f"attn{layer}"][0, 0], rtol=1e-5, atol=1e-5)


def test_query_and_key_split_of_the_fused_qkv() -> None:
    """q, k of a head equal the modules' q, k before rotary: captured at position 0, where
    rotary is the identity (cos 0 = 1, sin 0 = 0), via the attention scores of a 1-token pass."""
    model = random_model()
    layer = model.gpt_neox.layers[1]
    seen = {}
    layer.attention.query_key_value.register_forward_hook(
        lambda m, a, out: seen.update(x=a[0].detach(), qkv=out.detach())
    )
    with torch.no_grad():
        model.gpt_neox(input_ids=torch.tensor([[3]]), use_cache=False)
    x = seen["x"][0, 0]
    w_q, w_k, w_v = gpt_neox.qkv_weights(model, 1)
    b_q, b_k, b_v = gpt_neox.qkv_biases(model, 1)
    # transformers: view(..., n_heads, 3 * head_dim).chunk(3) per head
    fused = seen["qkv"][0, 0].view(N_HEADS, 3 * HEAD_DIM)
    for component, (w, b) in enumerate(((w_q, b_q), (w_k, b_k), (w_v, b_v))):
        expected = fused[:, component * HEAD_DIM : (component + 1) * HEAD_DIM]
        torch.testing.assert_close(w @ x + b, expected, rtol=1e-5, atol=1e-5)


def test_embedding_final_layernorm_and_unembedding() -> None:
    model = random_model()
    seen = {}
    model.gpt_neox.final_layer_norm.register_forward_pre_hook(
        lambda m, a: seen.update(h=a[0].detach())
    )
    ids = torch.tensor([[5, 9, 2]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
        torch.testing.assert_close(
            gpt_neox.embedding(model)[ids[0]], model.gpt_neox.embed_in(ids)[0]
        )
    final = gpt_neox.final_layernorm(model)
    torch.testing.assert_close(
        final(seen["h"][0]) @ gpt_neox.unembedding(model).T, logits, rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(
        final(seen["h"][0], with_bias=False) + final.bias, final(seen["h"][0])
    )


@pytest.mark.parametrize("parallel", [True, False])
def test_neox_effective_embedding_is_layer0_output_minus_its_attention(parallel: bool) -> None:
    """e(s) = W_E[s] + MLP0(LN(W_E[s])): layer 0's output on a lone token with its attention
    output removed (zeroed in the module itself, which the sequential residual's MLP then reads
    too)."""
    model = random_model(parallel)
    layer0 = model.gpt_neox.layers[0]
    layer0.attention.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), *out[1:]))
    seen = {}
    layer0.register_forward_hook(lambda m, a, out: seen.update(h=out.detach()))
    for token in (0, 11, VOCAB - 1):
        with torch.no_grad():
            model.gpt_neox(input_ids=torch.tensor([[token]]), use_cache=False)
        torch.testing.assert_close(
            effective_embedding(model, [token], "neox")[0], seen["h"][0, 0], rtol=1e-5, atol=1e-5
        )


def test_tigges_effective_embedding_is_mlp0_of_the_raw_embedding() -> None:
    model = random_model()
    ids = torch.tensor([1, 4, 8])
    with torch.no_grad():
        expected = model.gpt_neox.layers[0].mlp(model.gpt_neox.embed_in(ids))
    torch.testing.assert_close(effective_embedding(model, ids.tolist(), "tigges"), expected)


def test_ov_logits_brute_force_through_the_modules() -> None:
    """L[l, h, s, c] by running transformers' modules on a model copy with every bias of the path
    zeroed: layer l's input is replaced by e(s) on a one-token pass, the other heads' z are
    zeroed at the dense input, and the captured attention output goes through the module's
    final layernorm and LM head."""
    model = random_model()
    sources, candidates = [3, 17, 25], [0, 3, 9, 17, 39]
    expected = ov_logits(model, sources, candidates, "neox")
    bare = copy.deepcopy(model)
    with torch.no_grad():
        for layer in bare.gpt_neox.layers:
            layer.input_layernorm.bias.zero_()
            layer.attention.query_key_value.bias.zero_()
            layer.attention.dense.bias.zero_()
        bare.gpt_neox.final_layer_norm.bias.zero_()
    e = effective_embedding(model, sources, "neox")
    for layer_index in range(N_LAYERS):
        layer = bare.gpt_neox.layers[layer_index]
        for head in range(N_HEADS):
            for s_index in range(len(sources)):
                seen = {}

                def replace_input(m, args, kwargs, row=e[s_index]):
                    return (row.view(1, 1, -1), *args[1:]), kwargs

                def keep_one_head(m, args, h=head):
                    z = args[0].clone().view(1, 1, N_HEADS, HEAD_DIM)
                    z[:, :, [i for i in range(N_HEADS) if i != h]] = 0
                    return (z.view(1, 1, -1),)

                handles = [
                    layer.register_forward_pre_hook(replace_input, with_kwargs=True),
                    layer.attention.dense.register_forward_pre_hook(keep_one_head),
                    layer.attention.register_forward_hook(
                        lambda m, a, out, seen=seen: seen.update(o=out[0].detach())
                    ),
                ]
                with torch.no_grad():
                    bare.gpt_neox(input_ids=torch.tensor([[0]]), use_cache=False)
                    logits = bare.get_output_embeddings()(
                        bare.gpt_neox.final_layer_norm(seen["o"][0, 0])
                    )
                for handle in handles:
                    handle.remove()
                torch.testing.assert_close(
                    expected[layer_index, head, s_index],
                    logits[candidates],
                    rtol=1e-4,
                    atol=1e-4,
                )
