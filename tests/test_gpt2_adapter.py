"""The GPT-2 adapter (mechgen.model.gpt2) and every model-side score through it, against
brute-force forwards of transformers' own GPT2 modules on a small random GPT2LMHeadModel
(every weight random, layernorms and biases included; no download)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from test_metrics import SENTENCE_LENGTHS, VOCAB_SIZE, brute_force_scores, sentences
from test_weight_mechanisms import PLANTED_TASKS, WORDS
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from mechgen.mechanisms import catalog, successor
from mechgen.model import adapter as architectures
from mechgen.model import gpt2, gpt_neox
from mechgen.model.weight_scores import (
    WEIGHT_COLUMNS,
    WeightTasks,
    effective_embedding,
    ov_logits,
    score_weight_mechanisms,
)
from mechgen.schema import ATTENTION_METRICS
from mechgen.scoring.metrics import score_heads
from mechgen.scoring.relational import (
    make_repeated_sequences,
    mean_ablated,
    mean_head_outputs,
    score_continuations,
    score_induction,
)

N_LAYERS, N_HEADS, D_MODEL = 3, 4, 32
HEAD_DIM = D_MODEL // N_HEADS


def random_gpt2(
    inverse_layer_scaling: bool = False, dtype: torch.dtype = torch.float64, seed: int = 0
) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=64,
        n_embd=D_MODEL,
        n_layer=N_LAYERS,
        n_head=N_HEADS,
        n_inner=48,
        scale_attn_by_inverse_layer_idx=inverse_layer_scaling,
        # Dropout acts only in training mode: a scorer that forgot eval mode would fail.
        attn_pdrop=0.3,
        resid_pdrop=0.3,
        embd_pdrop=0.3,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).to(dtype)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            # Random everything; the QK part large enough that heads differ from uniform.
            scale = 0.8 if "c_attn" in name else 0.3
            # float32-representable values, so the adapter's float32 copies are exact and a
            # float64 model is checked to float64 rounding.
            parameter.copy_((torch.randn_like(parameter) * scale).float())
        for block in model.transformer.h:
            block.ln_1.weight.add_(1.0)
            block.ln_2.weight.add_(1.0)
        model.transformer.ln_f.weight.add_(1.0)
        for parameter in model.parameters():
            parameter.copy_(parameter.float())
    return model.eval()


def test_registry_picks_the_adapter_by_model_type() -> None:
    model = random_gpt2()
    assert architectures.for_model(model) is gpt2.ADAPTER
    assert architectures.for_model(model.transformer) is gpt2.ADAPTER
    assert architectures.get("gpt2") is gpt2.ADAPTER
    assert architectures.ARCHITECTURES == ("gpt_neox", "gpt2")
    with pytest.raises(KeyError, match="gpt_neox, gpt2"):
        architectures.get("olmo")
    with pytest.raises(TypeError, match="GPT-NeoX or GPT-2"):
        architectures.for_model(torch.nn.Linear(2, 2))
    assert gpt2.ADAPTER.revision(1500) == "checkpoint-1500"
    assert gpt2.ADAPTER.causal_lm_class() is GPT2LMHeadModel
    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=VOCAB_SIZE, hidden_size=16, num_hidden_layers=1, num_attention_heads=2
        )
    )
    assert architectures.for_model(neox) is architectures.get("gpt_neox") is gpt_neox.ADAPTER
    assert architectures.for_model(neox.gpt_neox) is gpt_neox.ADAPTER
    assert gpt_neox.ADAPTER.lm_head(neox.gpt_neox) is None
    assert gpt_neox.ADAPTER.revision(1000) == "step1000"
    assert gpt_neox.ADAPTER.causal_lm_class() is GPTNeoXForCausalLM


def _hand_attention(model, layer: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One layer's attention from the adapter's per-head matrices, by explicit loops over heads:
    x [T, d] is the layer's ln_1 output; returns probabilities [H, T, T], z [H, T, hd] and the
    attention output [T, d]."""
    w_q, w_k, w_v = gpt2.qkv_weights(model, layer)
    b_q, b_k, b_v = gpt2.qkv_biases(model, layer)
    w_o, b_o = gpt2.output_weights(model, layer), gpt2.output_bias(model, layer)
    scale = gpt2.attention_scale(model, layer)
    x = x.double()
    length = x.shape[0]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    probs, zs = [], []
    out = b_o.double().clone().expand(length, -1).clone()
    for h in range(N_HEADS):
        q = x @ w_q[h].double().T + b_q[h].double()
        k = x @ w_k[h].double().T + b_k[h].double()
        v = x @ w_v[h].double().T + b_v[h].double()
        logits = (q @ k.T * scale).masked_fill(~causal, -math.inf)
        a = torch.softmax(logits, dim=-1)
        z = a @ v
        out = out + z @ w_o[h].double().T
        probs.append(a)
        zs.append(z)
    return {"probs": torch.stack(probs), "z": torch.stack(zs), "out": out}


@pytest.mark.parametrize("inverse_layer_scaling", [False, True])
def test_per_head_qkvo_from_conv1d_give_the_modules_attention(inverse_layer_scaling: bool) -> None:
    """Per-head W_Q, W_K, W_V, W_O split from the transposed Conv1D weights reproduce, head by
    head, the probabilities transformers returns, the c_proj input (z) and the attention output."""
    model = random_gpt2(inverse_layer_scaling)
    seen: dict[str, torch.Tensor] = {}
    for index, block in enumerate(model.transformer.h):
        block.ln_1.register_forward_hook(lambda m, a, o, i=index: seen.__setitem__(f"x{i}", o))
        block.attn.c_proj.register_forward_pre_hook(
            lambda m, a, i=index: seen.__setitem__(f"z{i}", a[0])
        )
        block.attn.register_forward_hook(lambda m, a, o, i=index: seen.__setitem__(f"o{i}", o[0]))
    ids = torch.tensor([[5, 9, 2, 33, 9, 60, 1]])
    with torch.no_grad():
        output = model(ids, output_attentions=True)
    for layer in range(N_LAYERS):
        hand = _hand_attention(model, layer, seen[f"x{layer}"][0])
        torch.testing.assert_close(hand["probs"], output.attentions[layer][0], rtol=0, atol=1e-6)
        z = seen[f"z{layer}"][0].view(-1, N_HEADS, HEAD_DIM).transpose(0, 1)
        torch.testing.assert_close(hand["z"], z, rtol=0, atol=1e-6)
        torch.testing.assert_close(hand["out"], seen[f"o{layer}"][0], rtol=0, atol=1e-6)


def test_embeddings_layernorms_mlp_and_unembedding() -> None:
    """W_E + W_pos, ln_1 / ln_2 / ln_f from the adapter and the unembedding reproduce the model's
    residual stream and logits, written out as GPT-2's sequential residual."""
    model = random_gpt2()
    adapter = architectures.for_model(model)
    ids = torch.tensor([[5, 9, 2, 33]])
    with torch.no_grad():
        output = model(ids, output_attentions=True, output_hidden_states=True)
        h = (adapter.embedding(model)[ids[0]] + gpt2.position_embedding(model)[:4]).double()
        torch.testing.assert_close(h, output.hidden_states[0][0], rtol=0, atol=1e-6)
        for layer in range(N_LAYERS):
            x = adapter.input_layernorm(model, layer)(h.float()).double()
            h = h + _hand_attention(model, layer, x)["out"]
            mlp_in = adapter.mlp_layernorm(model, layer)(h.float()).to(torch.float64)
            h = h + adapter.mlp(model, layer)(mlp_in)
        logits = (
            adapter.final_layernorm(model)(h.float()).double()
            @ adapter.unembedding(model).double().T
        )
    torch.testing.assert_close(logits, output.logits[0], rtol=1e-5, atol=1e-5)
    assert not adapter.parallel_residual(model)
    assert adapter.lm_head(model.transformer) is None


def test_parameter_count_of_gpt2_small_counts_the_tied_unembedding_once() -> None:
    """The study's count (every parameter once, tied W_U = W_E once, W_pos included):
    124,439,808 for GPT-2 small, the published 124M."""
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    d, vocab, positions, layers = 768, 50257, 1024, 12
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d
    expected = vocab * d + positions * d + layers * per_layer + 2 * d
    assert architectures.for_model(model).n_params(model) == expected == 124_439_808


@pytest.mark.parametrize(("dtype", "batch_size"), [(torch.float64, 4), (torch.float32, 5)])
def test_every_attention_metric_matches_brute_force(dtype: torch.dtype, batch_size: int) -> None:
    """score_heads on GPT-2 (right-padded batches through the adapter's hooks) equals one
    sentence at a time through the full LM with output_attentions and plain loops, to 1e-6."""
    model = random_gpt2(dtype=dtype)
    token_lists = sentences()
    model.train()
    scores = score_heads(model, token_lists, batch_size=batch_size, clipped_window=3)
    assert model.training and all(not b.attn._forward_hooks for b in model.transformer.h)
    model.eval()
    expected = brute_force_scores(model, token_lists, 3)
    assert list(scores["layer"]) == list(expected["layer"])
    assert list(scores["head"]) == list(expected["head"])
    for name in ATTENTION_METRICS:
        np.testing.assert_allclose(scores[name], expected[name], rtol=1e-6, atol=1e-6, err_msg=name)
    assert scores.attrs["n_sentences"] == sum(1 for n in SENTENCE_LENGTHS if n >= 2)
    assert scores["one_back"].max() - scores["one_back"].min() > 0.05


def test_induction_and_duplicate_token_match_brute_force() -> None:
    model = random_gpt2()
    sequences = make_repeated_sequences(2, VOCAB_SIZE, 5, 6, seed=3)
    result = score_induction(model, sequences, batch_size=2, copying=True)
    ids = sequences.input_ids
    half = ids.shape[1] // 2
    induction = np.zeros((N_LAYERS, N_HEADS))
    duplicate = np.zeros((N_LAYERS, N_HEADS))
    hits = 0
    for row in ids:
        with torch.no_grad():
            output = model(row[None], output_attentions=True)
        for layer, attention in enumerate(output.attentions):
            for head in range(N_HEADS):
                a = attention[0, head]
                induction[layer, head] += sum(
                    float(a[p, p - half + 1]) for p in range(half, 2 * half)
                )
                duplicate[layer, head] += sum(float(a[p, p - half]) for p in range(half, 2 * half))
        predicted = output.logits[0].argmax(dim=-1)
        hits += sum(int(predicted[p] == row[p + 1]) for p in range(half, 2 * half - 1))
    n = ids.shape[0] * half
    np.testing.assert_allclose(result.induction, induction / n, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.duplicate_token, duplicate / n, rtol=0, atol=1e-6)
    assert result.copying_accuracy == pytest.approx(hits / (ids.shape[0] * (half - 1)))


def test_mean_head_outputs_and_mean_ablation_match_brute_force() -> None:
    """The mean z over real tokens (padded batch) equals the hand-computed z of each sentence
    alone; mean-ablating head (1, 2) changes layer 1's attention output by exactly
    W_O[2] (mean_z - z) and leaves layer 0 alone."""
    model = random_gpt2()
    rows = [[5, 9, 2, 33, 9], [7, 1, 60], [3, 3, 8, 40]]
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    mean_z = mean_head_outputs(model, ids, mask, batch_size=2)

    seen: dict[str, torch.Tensor] = {}
    handles = [
        block.ln_1.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(f"x{i}", o))
        for i, block in enumerate(model.transformer.h)
    ]
    handles += [
        block.attn.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(f"o{i}", o[0]))
        for i, block in enumerate(model.transformer.h)
    ]
    sums = torch.zeros(N_LAYERS, N_HEADS, HEAD_DIM, dtype=torch.float64)
    z_alone = []
    for r in rows:
        with torch.no_grad():
            model(torch.tensor([r]))
        hand = [_hand_attention(model, i, seen[f"x{i}"][0]) for i in range(N_LAYERS)]
        sums += torch.stack([h["z"].sum(dim=1) for h in hand])
        z_alone.append((hand, {k: v.clone() for k, v in seen.items()}))
    torch.testing.assert_close(mean_z, sums / sum(map(len, rows)), rtol=0, atol=1e-6)

    w_o = gpt2.output_weights(model, 1)[2].double()
    for r, (hand, before) in zip(rows, z_alone, strict=True):
        with mean_ablated(model, [(1, 2)], mean_z), torch.no_grad():
            model(torch.tensor([r]))
        torch.testing.assert_close(seen["o0"], before["o0"], rtol=0, atol=1e-9)
        expected = before["o1"][0] + (mean_z[1, 2] - hand[1]["z"][2]) @ w_o.T
        torch.testing.assert_close(seen["o1"][0], expected, rtol=0, atol=1e-6)
    for handle in handles:
        handle.remove()
    assert all(not b.attn.c_proj._forward_pre_hooks for b in model.transformer.h)


def test_effective_embedding_is_layer0_output_without_attention_and_positions() -> None:
    """The "neox" convention on GPT-2: W_E + MLP0(ln_2(W_E)), the lone token's layer-0 output
    with the attention output zeroed and W_pos zeroed (module docstring of weight_scores)."""
    model = random_gpt2(dtype=torch.float32)
    bare = copy.deepcopy(model)
    with torch.no_grad():
        bare.transformer.wpe.weight.zero_()
    block0 = bare.transformer.h[0]
    block0.attn.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), *out[1:]))
    seen = {}
    block0.register_forward_hook(lambda m, a, out: seen.update(h=out))
    for token in (0, 11, VOCAB_SIZE - 1):
        with torch.no_grad():
            bare.transformer(input_ids=torch.tensor([[token]]), use_cache=False)
        torch.testing.assert_close(
            effective_embedding(model, [token], "neox")[0],
            seen["h"][0, 0],
            rtol=1e-5,
            atol=1e-5,
        )
    with torch.no_grad():
        tigges = model.transformer.h[0].mlp(model.transformer.wte(torch.tensor([4])))
    torch.testing.assert_close(
        effective_embedding(model, [4], "tigges"), tigges, rtol=1e-5, atol=1e-5
    )


def test_ov_logits_brute_force_through_the_modules() -> None:
    """L[l, h, s, c] by transformers' modules on a copy with every bias of the path zeroed:
    block l's input is e(s) on a one-token pass (where the head attends to itself), the other
    heads' z are zeroed at the c_proj input, and the attention output goes through ln_f and the
    LM head."""
    model = random_gpt2(dtype=torch.float32)
    sources, candidates = [3, 17, 25], [0, 3, 9, 17, 63]
    expected = ov_logits(model, sources, candidates, "neox")
    bare = copy.deepcopy(model)
    with torch.no_grad():
        for block in bare.transformer.h:
            block.ln_1.bias.zero_()
            block.attn.c_attn.bias.zero_()
            block.attn.c_proj.bias.zero_()
        bare.transformer.ln_f.bias.zero_()
    e = effective_embedding(model, sources, "neox")
    for layer in range(N_LAYERS):
        block = bare.transformer.h[layer]
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
                    block.register_forward_pre_hook(replace_input, with_kwargs=True),
                    block.attn.c_proj.register_forward_pre_hook(keep_one_head),
                    block.attn.register_forward_hook(
                        lambda m, a, out, seen=seen: seen.update(o=out[0])
                    ),
                ]
                with torch.no_grad():
                    bare.transformer(input_ids=torch.tensor([[0]]), use_cache=False)
                    logits = bare.lm_head(bare.transformer.ln_f(seen["o"][0, 0]))
                for handle in handles:
                    handle.remove()
                torch.testing.assert_close(
                    expected[layer, head, s_index],
                    logits[candidates],
                    rtol=1e-4,
                    atol=1e-4,
                )


def test_every_catalog_mechanism_scores_a_gpt2_model() -> None:
    """Each head-unit mechanism of the catalog gets a finite score column for every head of a
    GPT-2 model, and each layer-unit one a finite score for every layer, from the model-side
    scorer that computes it in the pipeline."""
    model = random_gpt2(dtype=torch.float32)
    table = score_heads(model, sentences(), batch_size=4)
    first = torch.from_numpy(make_repeated_sequences(2, VOCAB_SIZE, 4, 6, seed=1).first_half)
    # score_induction's pass (the repeat against the first half's cache), with the layer scores.
    (induction,) = score_continuations(model, first, [first], [False], retrieval=[True])
    layer_scores = {"in_context_retrieval": induction.retrieval}
    table["induction"] = induction.induction.reshape(-1)
    table["duplicate_token"] = induction.duplicate_token.reshape(-1)
    record = successor.task_token_ids(WORDS.__getitem__, tasks=PLANTED_TASKS)
    weights = score_weight_mechanisms(
        model, WeightTasks(successor=record, copy_token_ids=(40, 2, 7, 30, 11))
    )
    for column in WEIGHT_COLUMNS:
        table[column] = weights[column].to_numpy()
    for name, mechanism in catalog().items():
        if mechanism.unit == "layer":
            values = np.asarray(layer_scores[mechanism.score_column], dtype=float)
            assert values.shape == (N_LAYERS,) and np.isfinite(values).all(), name
            continue
        assert mechanism.unit == "head", name
        values = table[mechanism.score_column].to_numpy(dtype=float)
        assert values.shape == (N_LAYERS * N_HEADS,) and np.isfinite(values).all(), name


def test_head_outputs_in_the_residual_stream_match_the_hand_attention() -> None:
    """configurational.head_outputs (pre-hooks on c_proj, W_O from the adapter) equals the
    hand-computed z and W_O z of each head, sentence by sentence."""
    from mechgen.scoring.configurational import head_outputs

    model = random_gpt2()
    rows = [[5, 9, 2, 33, 9], [7, 1, 60]]
    ids = torch.tensor([rows[0], rows[1] + [0, 0]])
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    heads = [(0, 1), (2, 3)]
    residual = head_outputs(model, ids, heads, mask, space="residual")
    z_space = head_outputs(model, ids, heads, mask, space="z")
    seen: dict[str, torch.Tensor] = {}
    handles = [
        block.ln_1.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(f"x{i}", o))
        for i, block in enumerate(model.transformer.h)
    ]
    hand_z: dict[tuple[int, int], list[torch.Tensor]] = {head: [] for head in heads}
    for r in rows:
        with torch.no_grad():
            model(torch.tensor([r]))
        for layer, head in heads:
            hand_z[(layer, head)].append(
                _hand_attention(model, layer, seen[f"x{layer}"][0])["z"][head]
            )
    for handle in handles:
        handle.remove()
    for layer, head in heads:
        z = torch.cat(hand_z[(layer, head)])
        w_o = gpt2.output_weights(model, layer)[head].double()
        torch.testing.assert_close(z_space[(layer, head)].double(), z, rtol=0, atol=1e-6)
        torch.testing.assert_close(residual[(layer, head)].double(), z @ w_o.T, rtol=0, atol=1e-5)


def test_relational_and_configurational_scores_run_on_gpt2() -> None:
    """The scoring job's relational part (ride-along hooks, induction and its controls, spectra,
    QK factors, composition, mean ablation, CKA outputs) runs on a GPT-2 model through the
    adapter, and its induction equals score_induction's."""
    from mechgen.scoring import circuit

    model = random_gpt2(dtype=torch.float32)
    settings = circuit.CircuitSettings(
        n_sequences=4,
        half_length=6,
        token_hi=VOCAB_SIZE,
        batch_size=2,
        detail=True,
        n_baseline=10,
        n_random_heads=2,
        cka_max_tokens=40,
        max_offset=3,
    )
    token_lists = [s for s in sentences() if len(s) >= 3]
    with circuit.ride_along(model, settings) as ride:
        one_back = score_heads(model, token_lists, batch_size=4)
    result = circuit.score_circuit(model, one_back, ride, settings, token_lists)
    direct = score_induction(
        model,
        make_repeated_sequences(settings.token_lo, VOCAB_SIZE, 4, 6, settings.seed),
        batch_size=2,
    )
    np.testing.assert_allclose(result.arrays["induction"], direct.induction, atol=1e-6)
    assert np.isfinite(result.arrays["k_composition"][1:]).any()
    assert "ablation" in result.record
