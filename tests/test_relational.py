"""Tests of mechgen.scoring.relational: induction score, copying, composition, ablation, run tables.

Independent checks:
- a 2-layer attention-only GPTNeoXForCausalLM whose weights are set by hand so that head 0.0
  is an exact previous-token head and head 1.0 an exact induction head (its scores are known
  on paper: induction 1, copying 1, collapse under ablation of 0.0);
- brute-force loops over sequences and positions of the full model's ``output_attentions``
  and logits;
- composition against explicit d x d circuits, hand-set orthogonal/aligned subspaces, and the
  analytic mean 1/d of the squared rotation baseline;
- per-run tables against hand-worked expectations and the Wilson formula written out.
"""

from __future__ import annotations

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from mechgen.axes.circuit_tables import relation_fraction_by_size, relational_run_table
from mechgen.scoring.relational import (
    HeadWeights,
    RepeatedSequences,
    causal_dependence,
    composition_frame,
    composition_scores,
    head_weights,
    induction_frame,
    make_repeated_sequences,
    mean_ablated,
    mean_head_output_hooks,
    mean_head_outputs,
    score_induction,
)

torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------
# The hand-built induction circuit
#
# Vocabulary V tokens, d_model = 6V in six blocks of V dimensions: A/A' (the token, +1/-1, so
# every residual vector has mean 0 and LayerNorm is a fixed scale), B/B' (the previous token,
# written by head 0.0), C/C' (the copied token, written by head 1.0). Three heads per layer,
# head_dim = 2V: the first V dimensions rotary (partial_rotary_factor 0.5), the last V not.
# - Head 0.0: q and k are constant biases in the rotary dimensions with q = R(-1) k, so
#   q.R(j - i)k = c^2 sum_f cos((1 - (i - j)) theta_f): a maximum at i - j = 1 whatever the
#   tokens; large c makes the softmax one-hot. Its value copies block A, dense writes it to B.
# - Head 1.0: query = token (A), key = previous token (B) minus own token (A), both in the
#   non-rotary dimensions, so the score is 1 exactly at the key j whose previous token equals
#   the query token and whose own token does not (this rules out j = 0, where head 0.0 can
#   only attend to itself). Its value copies A, dense writes it to C; the LM head reads C.
# - Every other head and every MLP is zero.

VOCAB = 16
N_HEADS_HAND = 3
POSITION_SCALE = 15.0
MATCH_SCALE = 4.0
READOUT_SCALE = 10.0


def build_induction_model() -> GPTNeoXForCausalLM:
    v = VOCAB
    d_model = 6 * v
    head_dim = d_model // N_HEADS_HAND
    rotary_dims = v
    config = GPTNeoXConfig(
        vocab_size=v,
        hidden_size=d_model,
        num_hidden_layers=2,
        num_attention_heads=N_HEADS_HAND,
        intermediate_size=4,
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10.0,
            "partial_rotary_factor": rotary_dims / head_dim,
        },
        tie_word_embeddings=False,
        use_parallel_residual=True,
        attention_bias=True,
        layer_norm_eps=1e-6,
    )
    config._attn_implementation = "eager"
    model = GPTNeoXForCausalLM(config)
    tokens = torch.arange(v)
    block_a, block_a_neg, block_b, block_b_neg, block_c, block_c_neg = (
        tokens + k * v for k in range(6)
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        body = model.gpt_neox
        for norm in [body.final_layer_norm] + [
            m
            for layer in body.layers
            for m in (layer.input_layernorm, layer.post_attention_layernorm)
        ]:
            norm.weight.fill_(1.0)
        body.embed_in.weight[tokens, block_a] = 1.0
        body.embed_in.weight[tokens, block_a_neg] = -1.0

        attention0 = body.layers[0].attention
        inv_freq = body.rotary_emb.inv_freq
        half = rotary_dims // 2
        bias0 = attention0.query_key_value.bias.view(N_HEADS_HAND, 3, head_dim)
        bias0[0, 1, :half] = POSITION_SCALE  # k
        bias0[0, 0, :half] = POSITION_SCALE * torch.cos(inv_freq)  # q = R(-1) k
        bias0[0, 0, half:rotary_dims] = -POSITION_SCALE * torch.sin(inv_freq)
        weight0 = attention0.query_key_value.weight.view(N_HEADS_HAND, 3, head_dim, d_model)
        weight0[0, 2, tokens, block_a] = 1.0
        # LayerNorm divides a residual with two +-1 entries by sqrt(2/d); undo it on writing.
        attention0.dense.weight[block_b, tokens] = math.sqrt(2 / d_model)
        attention0.dense.weight[block_b_neg, tokens] = -math.sqrt(2 / d_model)

        attention1 = body.layers[1].attention
        weight1 = attention1.query_key_value.weight.view(N_HEADS_HAND, 3, head_dim, d_model)
        weight1[0, 0, rotary_dims + tokens, block_a] = MATCH_SCALE
        weight1[0, 1, rotary_dims + tokens, block_b] = MATCH_SCALE
        weight1[0, 1, rotary_dims + tokens, block_a] = -MATCH_SCALE
        weight1[0, 2, tokens, block_a] = 1.0
        attention1.dense.weight[block_c, tokens] = math.sqrt(4 / d_model)
        attention1.dense.weight[block_c_neg, tokens] = -math.sqrt(4 / d_model)
        model.lm_head.weight[tokens, block_c] = READOUT_SCALE
    return model.eval()


@pytest.fixture(scope="module")
def induction_model() -> GPTNeoXForCausalLM:
    return build_induction_model()


@pytest.fixture(scope="module")
def hand_sequences() -> RepeatedSequences:
    return make_repeated_sequences(lo=0, hi=VOCAB, n_sequences=16, half_length=12, seed=3)


def test_hand_built_heads_are_exact(induction_model, hand_sequences):
    # The construction itself: head 0.0 puts all its mass one token back (row 0: on itself).
    attention = induction_model(hand_sequences.input_ids[:2], output_attentions=True).attentions
    previous = attention[0][:, 0]
    assert torch.allclose(
        previous.diagonal(offset=-1, dim1=-2, dim2=-1), torch.ones(2, 23), atol=1e-6
    )


def test_hand_built_induction_head_scores_one(induction_model, hand_sequences):
    result = score_induction(induction_model, hand_sequences)
    assert result.induction[1, 0] == pytest.approx(1.0, abs=1e-4)
    # Head 0.0 looks one token back, never L - 1 back; the zero heads attend uniformly,
    # which gives the mean of 1/(p + 1) over p = L..2L-1.
    assert result.induction[0, 0] < 1e-4
    uniform = np.mean([1 / (p + 1) for p in range(12, 24)])
    assert result.induction[1, 1] == pytest.approx(uniform, rel=1e-4)
    assert result.copying_accuracy == 1.0


def test_mean_ablating_previous_token_head_collapses_induction(induction_model, hand_sequences):
    mean_z = mean_head_outputs(induction_model, hand_sequences.input_ids)
    effect = causal_dependence(
        induction_model, hand_sequences, source=(0, 0), mean_z=mean_z, control_seed=0
    )
    assert effect.target == (1, 0)  # the default target: the strongest later induction head
    assert effect.induction_before == pytest.approx(1.0, abs=1e-4)
    assert effect.induction_after_source < 0.15
    assert effect.induction_drop > 0.85
    assert effect.copying_before == 1.0
    assert effect.copying_after_source < 0.2
    # The control is another head of layer 0 (both are zero heads): ablating it changes nothing.
    assert effect.control[0] == 0 and effect.control[1] in (1, 2)
    assert effect.control_induction_drop == pytest.approx(0.0, abs=1e-6)
    assert effect.control_copying_drop == 0.0
    row = effect.as_row()
    assert row["induction_drop"] == pytest.approx(effect.induction_drop)


def test_control_head_is_seeded(induction_model, hand_sequences):
    mean_z = mean_head_outputs(induction_model, hand_sequences.input_ids)
    baseline = score_induction(induction_model, hand_sequences)
    controls = {
        causal_dependence(
            induction_model, hand_sequences, (0, 0), mean_z, control_seed=s, baseline=baseline
        ).control
        for s in range(12)
    }
    assert controls == {(0, 1), (0, 2)}  # never the source; both others reachable
    again = causal_dependence(
        induction_model, hand_sequences, (0, 0), mean_z, control_seed=5, baseline=baseline
    )
    assert (
        again.control
        == causal_dependence(
            induction_model, hand_sequences, (0, 0), mean_z, control_seed=5, baseline=baseline
        ).control
    )


def test_every_declared_link_gets_its_ablation_test_on_the_hand_built_circuit(
    induction_model,
):
    """The detail step's mean-ablation test of links other than previous_token -> induction,
    with answers known from the construction: head 0.0 the previous-token head, 1.0 the
    induction head, every other head zero (uniform attention, zero output)."""
    from mechgen.mechanisms import Link
    from mechgen.scoring import circuit, metrics

    settings = circuit.CircuitSettings(
        n_sequences=16, half_length=12, token_lo=0, token_hi=VOCAB, seed=3, batch_size=16,
        detail=True, n_baseline=4, n_random_heads=2, cka_max_tokens=64,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    sentences = [rng.integers(0, VOCAB, size=10).tolist() for _ in range(6)]
    with circuit.ride_along(induction_model, settings) as ride:
        table = metrics.score_heads(induction_model, sentences, batch_size=6)
    declared = [
        Link("previous_token", "induction"),
        Link("previous_token", "duplicate_token"),  # test-only: same source, shared passes
        Link("duplicate_token", "induction"),  # test-only: another source, its own passes
        Link("previous_token", "successor"),  # scored from the weights alone
    ]
    result = circuit.score_circuit(induction_model, table, ride, settings, sentences, declared)
    tests = result.record["link_ablations"]
    assert list(tests) == [f"{link.source}->{link.target}" for link in declared]
    # The declared link: the same numbers as the `ablation` record of stats/relational.csv.
    main, legacy = tests["previous_token->induction"], result.record["ablation"]
    assert main["status"] == "measured"
    assert (main["source_layer"], main["source_head"]) == (0, 0)
    assert (main["target_layer"], main["target_head"]) == (1, 0)
    assert main["drop"] == legacy["induction_drop"] > 0.85
    assert main["control_drop"] == legacy["control_induction_drop"]
    # Duplicate-token heads re-measured at the target's strongest later head: 1.0 attends to
    # p - L + 1 (not p - L), so the zero heads 1.1 and 1.2 tie at the uniform level, and
    # ablating 0.0 leaves a zero head's uniform attention exactly as it was.
    dup = tests["previous_token->duplicate_token"]
    uniform = np.mean([1 / (p + 1) for p in range(12, 24)])
    assert dup["status"] == "measured" and (dup["source_layer"], dup["source_head"]) == (0, 0)
    assert (dup["target_layer"], dup["target_head"]) == (1, 1)
    assert dup["before"] == pytest.approx(uniform, rel=1e-5)
    assert dup["drop"] == pytest.approx(0.0, abs=1e-7)
    assert dup["control_head"] == main["control_head"]  # the same control pass
    # Source = the strongest duplicate-token head: the first of the zero heads at the uniform
    # level, (0, 1); ablating it (z = 0 everywhere) changes nothing, while the control drawn
    # from {0.0, 0.2} collapses induction when it is the previous-token head 0.0.
    other = tests["duplicate_token->induction"]
    control = int(np.random.default_rng(settings.control_seed).choice([0, 2]))
    assert (other["source_layer"], other["source_head"], other["control_head"]) == (0, 1, control)
    assert (other["target_layer"], other["target_head"]) == (1, 0)
    assert other["before"] == pytest.approx(1.0, abs=1e-4)
    assert other["drop"] == pytest.approx(0.0, abs=1e-6)
    assert other["control_drop"] > 0.85 if control == 0 else abs(other["control_drop"]) < 1e-6
    # Every mechanism that declares the repeated-sequence pass is a score that pass yields.
    from mechgen import mechanisms
    from mechgen.scoring.relational import REPEATED_SEQUENCE_SCORES

    for mechanism in mechanisms.catalog().values():
        if mechanism.ablation_pass is not None:
            assert mechanism.score_column in REPEATED_SEQUENCE_SCORES, mechanism.name
    # A target scored from the weights alone cannot be re-measured: not applicable, not NaN.
    assert tests["previous_token->successor"]["status"] == "not applicable"
    assert "drop" not in tests["previous_token->successor"]


def test_composition_of_hand_built_circuit_beats_rotation_baseline(induction_model):
    scores = composition_scores(
        induction_model, kinds=("K", "Q"), n_baseline=300, seed=0, fold_layernorm=False
    )
    k_comp = scores["K"]
    # Worked out on paper: both circuits have rank V with equal singular values; head 1.0's
    # keys read B - A (half their energy on B), head 0.0 writes B - B' (half its energy on
    # B): ||W_QK W_OV|| / (||W_QK|| ||W_OV||) = (1/2) / sqrt(V).
    assert k_comp.score[1, 0, 0, 0] == pytest.approx(0.5 / math.sqrt(VOCAB), rel=1e-5)
    # Folding the LayerNorm centring only removes head 0.0's read of the mean (1/d of it).
    folded = composition_scores(induction_model, kinds=("K",), n_baseline=10)["K"]
    assert folded.score[1, 0, 0, 0] == pytest.approx(0.5 / math.sqrt(VOCAB), rel=2e-3)
    assert k_comp.z[1, 0, 0, 0] > 3
    # Head 1.0's queries read A, which head 0.0 never writes: no Q-composition.
    assert scores["Q"].score[1, 0, 0, 0] == pytest.approx(0.0, abs=1e-6)
    # Zero heads have no circuit: undefined, not 0.
    assert np.isnan(k_comp.score[1, 1, 0, 0]) and np.isnan(k_comp.score[1, 0, 0, 1])
    # Same layer and backwards pairs are undefined under the parallel residual.
    assert np.isnan(k_comp.score[0, 0, 0, 0]) and np.isnan(k_comp.score[0, 0, 1, 0])


# ---------------------------------------------------------------------------------------------
# Brute force against output_attentions


def random_model(
    seed: int = 0,
    n_layers: int = 3,
    n_heads: int = 4,
    d_model: int = 32,
    vocab: int = 61,
    rotary_pct: float = 0.25,
) -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=2 * d_model,
        max_position_embeddings=128,
        rotary_pct=rotary_pct,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config)
    with torch.no_grad():
        # Larger weights than the init so attention is far from uniform, and non-trivial
        # LayerNorm gains so folding them matters.
        for layer in model.gpt_neox.layers:
            layer.attention.query_key_value.weight.mul_(8.0)
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.input_layernorm.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_induction_matches_brute_force_loop():
    model = random_model(seed=1)
    sequences = make_repeated_sequences(lo=5, hi=61, n_sequences=7, half_length=9, seed=11)
    result = score_induction(model, sequences)
    input_ids = sequences.input_ids
    half = sequences.half_length
    with torch.no_grad():
        output = model(input_ids, output_attentions=True)
    n_layers, n_heads = 3, 4
    expected = np.zeros((n_layers, n_heads))
    hits = total = 0
    for n in range(input_ids.shape[0]):
        for p in range(half, 2 * half):
            for layer in range(n_layers):
                for head in range(n_heads):
                    expected[layer, head] += float(
                        output.attentions[layer][n, head, p, p - half + 1]
                    )
            if p < 2 * half - 1:
                total += 1
                hits += int(int(output.logits[n, p].argmax()) == int(input_ids[n, p + 1]))
    expected /= input_ids.shape[0] * half
    np.testing.assert_allclose(result.induction, expected, rtol=1e-5, atol=1e-7)
    assert result.copying_accuracy == pytest.approx(hits / total)
    assert total == 7 * (half - 1)
    # Batching does not change the score.
    batched = score_induction(model, input_ids, batch_size=3)
    np.testing.assert_allclose(batched.induction, result.induction, rtol=1e-5, atol=1e-7)
    assert batched.copying_accuracy == result.copying_accuracy
    without_copying = score_induction(model, input_ids, copying=False)
    assert math.isnan(without_copying.copying_accuracy)
    np.testing.assert_allclose(without_copying.induction, result.induction, rtol=1e-5, atol=1e-7)
    frame = induction_frame(result)
    assert list(frame.columns) == ["layer", "head", "induction"]
    assert frame.loc[
        (frame["layer"] == 2) & (frame["head"] == 1), "induction"
    ].item() == pytest.approx(expected[2, 1])


def full_pass_scores(model, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """Brute force on one full forward pass per sequence [first half, second half] (no cache):
    per head the sums of A[p, p - L + 1] and A[p, p - L] over p = L..2L-1 (divided by N L),
    and the count of positions p = L..2L-2 whose argmax logit is token p + 1."""
    half = ids.shape[1] // 2
    induction = duplicate = 0.0
    hits = 0
    for row in ids:
        with torch.no_grad():
            output = model(row[None], output_attentions=True)
        attention = torch.stack(output.attentions)[:, 0].double()  # [layers, heads, 2L, 2L]
        for p in range(half, 2 * half):
            induction = induction + attention[:, :, p, p - half + 1].numpy()
            duplicate = duplicate + attention[:, :, p, p - half].numpy()
        predicted = output.logits[0].argmax(dim=-1)
        hits += sum(int(predicted[p] == row[p + 1]) for p in range(half, 2 * half - 1))
    n = ids.shape[0] * half
    return induction / n, duplicate / n, hits


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2"])
def test_shared_first_halves_equal_separate_full_passes(family: str) -> None:
    """score_induction_with_control runs each batch's first halves once and both second halves
    (the repeat, with copying, and the control's other ids) against their key/value cache.
    Every score equals one full pass over each whole sequence (transformers' own attentions
    and logits): rotary (GPT-NeoX) and learned (GPT-2) positions continue after the cache, the
    control's pass does not see the repeat's keys, a partial last batch is scored, and the
    copying count is exactly the full passes'."""
    from test_gpt2_adapter import random_gpt2

    from mechgen.scoring import circuit
    from mechgen.scoring.relational import score_induction_with_control

    if family == "gpt_neox":
        model, vocab = random_model(seed=2, vocab=13), 13
    else:
        model, vocab = random_gpt2(dtype=torch.float32, seed=0), 64
    sequences = make_repeated_sequences(lo=1, hi=vocab, n_sequences=7, half_length=9, seed=4)
    other = circuit.control_half(sequences)
    induction, control = score_induction_with_control(
        model, sequences, other, batch_size=3, copying=True
    )
    total = 7 * (9 - 1)
    for result, second_half in ((induction, sequences.first_half), (control, other)):
        ids = torch.from_numpy(np.concatenate([sequences.first_half, second_half], axis=1))
        expected_induction, expected_duplicate, hits = full_pass_scores(model, ids)
        np.testing.assert_allclose(result.induction, expected_induction, rtol=0, atol=1e-6)
        np.testing.assert_allclose(result.duplicate_token, expected_duplicate, rtol=0, atol=1e-6)
        if result is induction:
            assert result.copying_accuracy == hits / total
            assert 0 < hits < total  # neither no copying nor all: the count is what is checked
    assert math.isnan(control.copying_accuracy)
    assert np.ptp(control.induction) > 0.01  # heads differ: not a degenerate comparison
    # The separate calls (each with its own first-half passes) agree with the shared one.
    alone = score_induction(model, sequences, batch_size=3)
    np.testing.assert_allclose(alone.induction, induction.induction, rtol=0, atol=1e-6)
    assert alone.copying_accuracy == induction.copying_accuracy
    controls = circuit.positional_controls(model, sequences, batch_size=3)
    np.testing.assert_allclose(controls["induction_control"], control.induction, atol=1e-6)
    np.testing.assert_allclose(
        controls["duplicate_token_control"], control.duplicate_token, atol=1e-6
    )


def test_mean_head_outputs_match_manual_capture():
    model = random_model(seed=2)
    torch.manual_seed(0)
    input_ids = torch.randint(0, 61, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    captured = []
    handle = model.gpt_neox.layers[1].attention.dense.register_forward_pre_hook(
        lambda m, a: captured.append(a[0].detach().clone())
    )
    with torch.no_grad():
        model.gpt_neox(input_ids=input_ids, attention_mask=mask)
    handle.remove()
    z = captured[0].view(4, 10, 4, 8)
    manual = (
        torch.stack([z[b, t] for b in range(4) for t in range(10) if mask[b, t]])
        .double()
        .mean(dim=0)
    )
    means = mean_head_outputs(model, input_ids, attention_mask=mask, batch_size=3)
    assert means.shape == (3, 4, 8)
    torch.testing.assert_close(means[1], manual, rtol=1e-5, atol=1e-6)


def test_mean_head_outputs_ride_along_the_one_back_scorer():
    from mechgen.scoring.metrics import score_heads

    model = random_model(seed=2)
    torch.manual_seed(3)
    lengths = [6, 2, 9, 1, 4]
    sentences = [torch.randint(0, 61, (n,)).tolist() for n in lengths]
    with mean_head_output_hooks(model) as accumulator:
        score_heads(model, sentences, batch_size=2)
    # score_heads skips the one-token sentence; pad the rest right and average directly.
    kept = [s for s in sentences if len(s) >= 2]
    input_ids = torch.zeros(len(kept), 9, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, tokens in enumerate(kept):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    assert accumulator.n_tokens == sum(len(s) for s in kept)
    torch.testing.assert_close(
        accumulator.mean_z, mean_head_outputs(model, input_ids, mask), rtol=1e-5, atol=1e-6
    )


def test_mean_ablation_replaces_exactly_one_slice():
    model = random_model(seed=3)
    torch.manual_seed(1)
    input_ids = torch.randint(0, 61, (2, 8))
    mean_z = torch.randn(3, 4, 8, dtype=torch.float64)
    dense = model.gpt_neox.layers[2].attention.dense

    def dense_input() -> torch.Tensor:
        # A probe registered now runs after any pre-hook registered before it.
        seen = []
        probe = dense.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
        with torch.no_grad():
            model.gpt_neox(input_ids=input_ids)
        probe.remove()
        return seen[0].view(2, 8, 4, 8)

    plain = dense_input()
    with mean_ablated(model, [(2, 1)], mean_z):
        ablated = dense_input()
    restored = dense_input()
    torch.testing.assert_close(ablated[:, :, 1], mean_z[2, 1].float().expand(2, 8, 8))
    torch.testing.assert_close(ablated[:, :, [0, 2, 3]], plain[:, :, [0, 2, 3]])
    assert not torch.allclose(plain[:, :, 1], ablated[:, :, 1])
    assert torch.equal(plain, restored)  # the hook is gone after the block


# ---------------------------------------------------------------------------------------------
# Sequences


def test_same_seed_gives_identical_ids_and_sidecar():
    first = make_repeated_sequences(lo=100, hi=1000, n_sequences=20, half_length=50, seed=7)
    second = make_repeated_sequences(lo=100, hi=1000, n_sequences=20, half_length=50, seed=7)
    other = make_repeated_sequences(lo=100, hi=1000, n_sequences=20, half_length=50, seed=8)
    assert np.array_equal(first.first_half, second.first_half)
    assert first.sidecar() == second.sidecar()
    assert not np.array_equal(first.first_half, other.first_half)
    assert first.sidecar()["sha256"] != other.sidecar()["sha256"]
    ids = first.first_half
    assert ids.min() >= 100 and ids.max() < 1000
    assert all(len(set(row)) == 50 for row in ids.tolist())
    full = first.input_ids
    assert full.shape == (20, 100) and torch.equal(full[:, :50], full[:, 50:])
    sidecar = first.sidecar()
    assert sidecar["token_ids"] == ids.tolist() and sidecar["seed"] == 7


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="distinct ids"):
        make_repeated_sequences(lo=0, hi=10, half_length=11)
    with pytest.raises(ValueError, match=r"\[lo, hi\)"):
        make_repeated_sequences(lo=5, hi=5)
    model = random_model(seed=0)
    with pytest.raises(ValueError, match="repeat its first half"):
        score_induction(model, torch.tensor([[1, 2, 3, 1, 2, 4]]))
    with pytest.raises(ValueError, match="vocabulary"):
        score_induction(model, torch.tensor([[1, 99, 1, 99]]))
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="eager"):
        score_induction(model, torch.tensor([[1, 2, 1, 2]]))
    with pytest.raises(ValueError, match="outside the model"):
        mean_ablated(random_model(seed=0), [(5, 0)], torch.zeros(3, 4, 8)).__enter__()


# ---------------------------------------------------------------------------------------------
# Composition


def test_composition_matches_explicit_circuits():
    model = random_model(seed=4)
    scores = composition_scores(model, kinds=("K", "Q", "V"), n_baseline=10)
    weights = head_weights(model, fold_layernorm=True)
    # Independent reconstruction of the folded read matrices from the raw parameters.
    layer = model.gpt_neox.layers[1]
    raw = layer.attention.query_key_value.weight.detach().double().view(4, 3, 8, 32)
    centring = torch.eye(32, dtype=torch.float64) - 1.0 / 32
    fold = torch.diag(layer.input_layernorm.weight.detach().double()) @ centring
    torch.testing.assert_close(weights.w_k[1, 2].double(), raw[2, 1] @ fold, rtol=1e-5, atol=1e-6)
    w_o_raw = model.gpt_neox.layers[0].attention.dense.weight.detach().double()[:, 3 * 8 : 4 * 8]
    torch.testing.assert_close(weights.w_o[0, 3].double(), w_o_raw)

    def fro(matrix: torch.Tensor) -> float:
        return float(torch.linalg.matrix_norm(matrix))

    for target_layer in range(3):
        for target_head in range(4):
            qk = (
                weights.w_q[target_layer, target_head].double().T
                @ weights.w_k[target_layer, target_head].double()
            )
            ov_target = (
                weights.w_o[target_layer, target_head].double()
                @ weights.w_v[target_layer, target_head].double()
            )
            for source_layer in range(3):
                for source_head in range(4):
                    index = (target_layer, target_head, source_layer, source_head)
                    if source_layer >= target_layer:
                        assert all(np.isnan(scores[k].score[index]) for k in "KQV")
                        continue
                    ov = (
                        weights.w_o[source_layer, source_head].double()
                        @ weights.w_v[source_layer, source_head].double()
                    )
                    expected = {
                        "K": fro(qk @ ov) / (fro(qk) * fro(ov)),
                        "Q": fro(qk.T @ ov) / (fro(qk) * fro(ov)),
                        "V": fro(ov_target @ ov) / (fro(ov_target) * fro(ov)),
                    }
                    for kind, value in expected.items():
                        assert scores[kind].score[index] == pytest.approx(value, rel=1e-4)


def test_composition_orthogonal_is_zero_and_aligned_is_one_over_sqrt_rank():
    # Hand-set HeadWeights (d = 32, head_dim = 8, 2 layers x 2 heads). Head 0.0 reads and
    # writes dimensions 0..7 (W_OV = projection P0 of rank 8). Head 1.0 reads 0..7 for query
    # and key: W_QK = P0, so ||P0 P0|| / (||P0|| ||P0||) = sqrt(8) / 8 = 1/sqrt(8). Head 1.1
    # reads keys from 8..15 (orthogonal to what 0.0 writes) and queries from 0..7.
    d_model, head_dim = 32, 8
    eye = torch.eye(d_model)
    w_q = torch.zeros(2, 2, head_dim, d_model)
    w_k = torch.zeros_like(w_q)
    w_v = torch.zeros_like(w_q)
    w_o = torch.zeros(2, 2, d_model, head_dim)
    first, second, third = eye[0:8], eye[8:16], eye[16:24]
    w_v[0, 0], w_o[0, 0] = first, first.T
    w_v[0, 1], w_o[0, 1] = third, third.T
    w_q[1, 0], w_k[1, 0] = first, first
    w_q[1, 1], w_k[1, 1] = first, second
    w_v[1, 0], w_o[1, 0] = first, first.T
    w_v[1, 1], w_o[1, 1] = second, second.T
    weights = HeadWeights(w_q=w_q, w_k=w_k, w_v=w_v, w_o=w_o, folded_layernorm=False)
    scores = composition_scores(weights, kinds=("K", "Q", "V"), n_baseline=50)
    k_comp, q_comp, v_comp = scores["K"].score, scores["Q"].score, scores["V"].score
    assert k_comp[1, 0, 0, 0] == pytest.approx(1 / math.sqrt(8), rel=1e-6)
    assert k_comp[1, 1, 0, 0] == pytest.approx(0.0, abs=1e-7)
    assert q_comp[1, 1, 0, 0] == pytest.approx(1 / math.sqrt(8), rel=1e-6)
    assert k_comp[1, 0, 0, 1] == pytest.approx(0.0, abs=1e-7)  # 0.1 writes 16..23
    assert v_comp[1, 0, 0, 0] == pytest.approx(1 / math.sqrt(8), rel=1e-6)
    assert v_comp[1, 1, 0, 0] == pytest.approx(0.0, abs=1e-7)
    frame = composition_frame(scores["K"], pairs=[((0, 0), (1, 0)), ((0, 0), (1, 1))])
    assert frame["score"].tolist() == pytest.approx([1 / math.sqrt(8), 0.0], abs=1e-7)
    assert (frame["target_layer"] == 1).all() and frame["source_head"].tolist() == [0, 0]
    assert frame["corrected"].iloc[0] == pytest.approx(
        frame["score"].iloc[0] - frame["baseline_mean"].iloc[0]
    )


def test_rotation_baseline_has_the_analytic_mean_square():
    # For Haar R, E ||A R B||^2 = ||A||^2 ||B||^2 / d, so E[baseline score^2] = 1/d for every
    # pair, whatever the spectra: mean^2 + sd^2 estimates it.
    model = random_model(seed=5, d_model=48, n_heads=4)
    scores = composition_scores(model, kinds=("K",), n_baseline=3000, seed=1)["K"]
    second_moment = scores.baseline_mean**2 + scores.baseline_sd**2 * (2999 / 3000)
    finite = np.isfinite(second_moment)
    assert finite.sum() == 4 * 4 * 3  # (1,0), (2,0), (2,1) layer pairs x 16 head pairs
    np.testing.assert_allclose(second_moment[finite], 1 / 48, rtol=0.04)
    # Monte Carlo check of the sampling shortcut against explicit Haar rotations of W_OV.
    weights = head_weights(model)
    qk = weights.w_q[2, 1].double().T @ weights.w_k[2, 1].double()
    ov = weights.w_o[0, 3].double() @ weights.w_v[0, 3].double()
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(2000):
        rotation, _ = np.linalg.qr(rng.standard_normal((48, 48)))
        rotated = torch.from_numpy(rotation) @ ov @ torch.from_numpy(rotation).T
        draws.append(
            float(
                torch.linalg.matrix_norm(qk @ rotated)
                / (torch.linalg.matrix_norm(qk) * torch.linalg.matrix_norm(ov))
            )
        )
    assert scores.baseline_mean[2, 1, 0, 3] == pytest.approx(np.mean(draws), rel=0.02)
    assert scores.baseline_sd[2, 1, 0, 3] == pytest.approx(np.std(draws, ddof=1), rel=0.12)


# ---------------------------------------------------------------------------------------------
# Per-run tables


def synthetic_heads() -> pd.DataFrame:
    """Two sizes x two seeds, 3 layers x 2 heads, steps 0..4 (tokens = 10 x step).

    one_back grows in (layer 0, head 1) from step 1 (or (layer 2, head 0) for run b-2);
    induction grows in (layer 1, head 0) from step 3 (step 2 for run b-1).
    """
    rows = []
    runs = [("a", 1, 1000), ("a", 2, 1000), ("b", 1, 5000), ("b", 2, 5000)]
    for size, seed, n_params in runs:
        run = f"toy-{size}-seed{seed}"
        one_back_head = (2, 0) if run == "toy-b-seed2" else (0, 1)
        induction_start = 2 if run == "toy-b-seed1" else 3
        for step in range(5):
            for layer in range(3):
                for head in range(2):
                    one_back = 0.1 + (
                        0.2 * step if (layer, head) == one_back_head and step >= 1 else 0.0
                    )
                    induction = 0.05 + (
                        0.3 * (step - induction_start + 1)
                        if (layer, head) == (1, 0) and step >= induction_start
                        else 0.0
                    )
                    rows.append(
                        {
                            "suite": "toy",
                            "model": f"toy-{size}",
                            "size": size,
                            "seed": seed,
                            "run": run,
                            "step": step,
                            "tokens_seen": 10 * step,
                            "layer": layer,
                            "head": head,
                            "n_layers": 3,
                            "n_heads": 2,
                            "n_params": n_params,
                            "one_back": one_back,
                            "induction": induction,
                            "nonfinite": False,
                        }
                    )
    return pd.DataFrame(rows)


def first_above(threshold: float):
    def onset(steps: np.ndarray, values: np.ndarray) -> float:
        above = np.flatnonzero(values > threshold)
        return float(steps[above[0]]) if above.size else math.nan

    return onset


def test_relational_run_table_hand_worked():
    table = relational_run_table(synthetic_heads(), onset=first_above(0.2))
    table = table.set_index("run")
    a1 = table.loc["toy-a-seed1"]
    assert (a1.induction_layer, a1.induction_head) == (1, 0)
    assert (a1.one_back_layer, a1.one_back_head) == (0, 1)
    assert a1.one_back_earlier_layer
    assert a1.onset_one_back_step == 1 and a1.onset_induction_step == 3
    assert a1.lag_steps == 2 and a1.lag_tokens == 20
    # trajectories: one_back max = 0.1, 0.3, 0.5, 0.7, 0.9; induction max = .05, .05, .05, .35, .65
    expected_r = np.corrcoef([0.1, 0.3, 0.5, 0.7, 0.9], [0.05, 0.05, 0.05, 0.35, 0.65])[0, 1]
    assert a1.trajectory_r == pytest.approx(expected_r)
    assert a1.trajectory_n == 5
    assert table.loc["toy-b-seed1"].lag_steps == 1
    assert not table.loc["toy-b-seed2"].one_back_earlier_layer  # its 1-back head is in layer 2
    extra = pd.DataFrame({"run": ["toy-a-seed1"], "induction_drop": [0.5]})
    merged = relational_run_table(synthetic_heads(), onset=first_above(0.2), extra=extra).set_index(
        "run"
    )
    assert merged.loc["toy-a-seed1", "induction_drop"] == 0.5 and np.isnan(
        merged.loc["toy-a-seed2", "induction_drop"]
    )


def test_relation_fraction_uses_wilson_interval():
    runs = relational_run_table(synthetic_heads(), onset=first_above(0.2))
    fractions = relation_fraction_by_size(runs, confidence=0.95).set_index("size")
    assert fractions.loc["a", "n_holds"] == 2 and fractions.loc["a", "fraction"] == 1.0
    assert fractions.loc["b", "n_holds"] == 1 and fractions.loc["b", "n_runs"] == 2
    # Wilson score interval written out: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    z, n, p = 1.959963984540054, 2, 0.5
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half_width = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    assert fractions.loc["b", "ci_low"] == pytest.approx(centre - half_width)
    assert fractions.loc["b", "ci_high"] == pytest.approx(centre + half_width)
    with pytest.raises(ValueError, match="no column"):
        relation_fraction_by_size(runs, relation="nope")


def test_finite_svdvals_isolates_a_nonfinite_head():
    """A NaN weight in one head gives NaN singular values for that head only; the others
    equal numpy's SVD (a checkpoint flagged nonfinite must not crash the spectra)."""
    import numpy as np
    import torch

    from mechgen.scoring.relational import finite_svdvals

    gen = torch.Generator().manual_seed(0)
    matrices = torch.randn(2, 3, 4, 6, generator=gen)
    matrices[1, 2, 0, 0] = float("inf")
    got = finite_svdvals(matrices)
    assert torch.isnan(got[1, 2]).all()
    for layer, head in [(0, 0), (0, 2), (1, 1)]:
        want = np.linalg.svd(matrices[layer, head].double().numpy(), compute_uv=False)
        np.testing.assert_allclose(got[layer, head].numpy(), want, rtol=1e-12)


def _full_argmax_hits(lm_head, states, targets, rows_per_chunk):
    """The copying count without the refuting stage: the full-vocabulary argmax in the same
    chunks (the computation _copying_hits keeps for every chunk it does not skip)."""
    hits = 0
    for start in range(0, states.shape[0], rows_per_chunk):
        predicted = lm_head(states[start : start + rows_per_chunk]).argmax(dim=-1)
        hits += int((predicted == targets[start : start + rows_per_chunk]).sum())
    return hits


@pytest.mark.parametrize("bias", [False, True])
def test_copying_count_equals_the_full_argmax(bias: bool, monkeypatch) -> None:
    # A 6000-token unembedding (more than REFUTING_ROWS) and states of three kinds: random
    # (nearly all misses), aimed at their target (hits, as once copying works), and
    # states equal to the largest-norm row, which is their target (a candidate row is never
    # refuted by itself).
    from types import SimpleNamespace

    from mechgen.scoring import relational

    torch.manual_seed(0)
    vocab, width, half = 6000, 32, 40
    lm_head = torch.nn.Linear(width, vocab, bias=bias)
    with torch.no_grad():
        lm_head.weight.mul_(torch.linspace(0.5, 2.0, vocab)[:, None])
    ids = torch.randint(0, vocab, (6, 2 * half))
    hidden = torch.randn(6, 2 * half, width)
    targets = ids[:, half + 1 : 2 * half]
    with torch.no_grad():
        weight = lm_head.weight
        hidden[2:4, half : 2 * half - 1] = 3 * weight[targets[2:4]]  # aimed: mostly hits
        top = int(torch.linalg.vector_norm(weight, dim=1).argmax())
        ids[4, half + 1 : 2 * half] = top
        hidden[4, half : 2 * half - 1] = weight[top]
        hidden[5, half] = float("nan")
    # A stand-in adapter hands _copying_hits the LM head (no model needed).
    stand_in = SimpleNamespace(lm_head=lambda model: lm_head, vocab_size=lambda model: vocab)
    monkeypatch.setattr(relational.architectures, "for_model", lambda model: stand_in)
    model = object()
    # Small chunks, so that some are skipped and some computed.
    monkeypatch.setattr(relational, "LOGITS_CHUNK_ELEMENTS", 50 * vocab)
    states = hidden[:, half : 2 * half - 1].reshape(-1, width)
    flat_targets = ids[:, half + 1 : 2 * half].reshape(-1)
    with torch.no_grad():
        refuted = relational._refuted_positions(lm_head, states, flat_targets)
        expected = _full_argmax_hits(lm_head, states, flat_targets, 50)
        got = relational._copying_hits(
            model, hidden[:, half : 2 * half - 1], ids[:, half + 1 : 2 * half]
        )
        full = lm_head(states).argmax(dim=-1)
    assert got == expected and expected > 40
    # Every refuted position is a miss of the full argmax; random states are nearly all refuted.
    assert not bool((full[refuted] == flat_targets[refuted]).any())
    assert refuted[: 2 * (half - 1)].float().mean() > 0.9
    assert not bool(refuted[4 * (half - 1) : 5 * (half - 1)].any())  # the target's own row
    assert not bool(refuted[5 * (half - 1)])  # NaN: left to the full product
