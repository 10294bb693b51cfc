"""Tests of mechgen.scoring.metrics: the per-head attention scorer.

Three independent checks: hand-worked attention patterns with metrics derived on paper, the
batched scorer against a brute-force loop over sentences and heads of the full causal LM's
``output_attentions``, and the NaN flag.
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

from mechgen.schema import ATTENTION_METRICS
from mechgen.scoring.metrics import score_heads, sentence_attention_metrics

torch.set_num_threads(1)

VOCAB_SIZE = 64
N_LAYERS = 2
N_HEADS = 4
HEAD_SIZE = 8
# Lengths 1 (skipped) and 2 are the edge cases; with batch_size 4 the length-sorted batches
# [2, 2, 3, 4], [5, 6, 7, 9], [11, 12, 17] all mix lengths, so padding matters in each.
SENTENCE_LENGTHS = [7, 1, 2, 12, 5, 3, 17, 2, 9, 1, 4, 11, 6]


# ---------------------------------------------------------------------------------------------
# Hand-worked patterns: sentence_attention_metrics on known matrices


def previous_token_pattern(length: int) -> torch.Tensor:
    """Row 0 attends to itself, every later row entirely to the token before."""
    pattern = torch.zeros(length, length, dtype=torch.float64)
    pattern[0, 0] = 1.0
    for query in range(1, length):
        pattern[query, query - 1] = 1.0
    return pattern


def uniform_causal_pattern(length: int) -> torch.Tensor:
    """A[i, j] = 1/(i+1) for j <= i: what a head with constant scores does."""
    rows = [[1.0 / (i + 1) if j <= i else 0.0 for j in range(length)] for i in range(length)]
    return torch.tensor(rows, dtype=torch.float64)


def first_token_pattern(length: int) -> torch.Tensor:
    pattern = torch.zeros(length, length, dtype=torch.float64)
    pattern[:, 0] = 1.0
    return pattern


def single(pattern: torch.Tensor, clipped_window: int = 8) -> dict[str, float]:
    """Metrics of one sentence with one head."""
    metrics = sentence_attention_metrics(pattern[None, None], [pattern.shape[0]], clipped_window)
    return {name: values.item() for name, values in metrics.items()}


def test_previous_token_pattern() -> None:
    length = 5
    metrics = single(previous_token_pattern(length), clipped_window=8)
    assert metrics["one_back"] == pytest.approx(1.0)
    assert metrics["self_attention"] == pytest.approx(1 / length)  # only row 0
    assert metrics["first_token"] == pytest.approx(1 / (length - 1))  # only row 1
    assert metrics["first_token_ref"] == pytest.approx(2 / length)  # rows 0 and 1
    assert metrics["prev_self_ratio"] == pytest.approx(length)
    assert metrics["prev_uniform_ratio"] == pytest.approx(length)
    assert metrics["entropy"] == pytest.approx(0.0, abs=1e-15)
    # Row 0 is at distance 0, the L-1 others at distance 1.
    assert metrics["mean_distance"] == pytest.approx((length - 1) / length)
    assert metrics["clipped_distance"] == pytest.approx((length - 1) / length)
    assert metrics["nonfinite"] is False


def test_uniform_causal_pattern() -> None:
    # L = 5, W = 2. Row i spreads 1/(i+1) over keys 0..i.
    metrics = single(uniform_causal_pattern(5), clipped_window=2)
    one_back = (1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4  # = 77/240
    self_attention = (1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 5  # = 137/300
    assert metrics["one_back"] == pytest.approx(77 / 240)
    assert metrics["one_back"] == pytest.approx(one_back)
    assert metrics["self_attention"] == pytest.approx(137 / 300)
    assert metrics["first_token"] == pytest.approx(77 / 240)
    assert metrics["first_token_ref"] == pytest.approx(137 / 300)
    assert metrics["prev_self_ratio"] == pytest.approx(one_back / self_attention)
    assert metrics["prev_uniform_ratio"] == pytest.approx(5 * 77 / 240)
    # Row i has entropy ln(i+1): (ln1 + ln2 + ln3 + ln4 + ln5) / 5 = ln(120) / 5.
    assert metrics["entropy"] == pytest.approx(math.log(120) / 5)
    # Row i has mean distance i/2: (0 + 0.5 + 1 + 1.5 + 2) / 5 = 1.
    assert metrics["mean_distance"] == pytest.approx(1.0)
    # Clipped at 2: rows give 0, 1/2, 3/3, (2+2+1)/4, (2+2+2+1)/5 -> 4.15 / 5.
    assert metrics["clipped_distance"] == pytest.approx(4.15 / 5)


def test_first_token_and_self_patterns() -> None:
    length, window = 6, 3
    first = single(first_token_pattern(length), clipped_window=window)
    assert first["first_token"] == pytest.approx(1.0)
    assert first["first_token_ref"] == pytest.approx(1.0)
    assert first["one_back"] == pytest.approx(1 / (length - 1))  # row 1's key 0 is i-1
    assert first["self_attention"] == pytest.approx(1 / length)  # row 0's key 0 is i
    assert first["entropy"] == pytest.approx(0.0, abs=1e-15)
    assert first["mean_distance"] == pytest.approx((length - 1) / 2)  # mean of i
    assert first["clipped_distance"] == pytest.approx((0 + 1 + 2 + 3 + 3 + 3) / length)

    diagonal = single(torch.eye(length, dtype=torch.float64))
    assert diagonal["self_attention"] == pytest.approx(1.0)
    assert diagonal["one_back"] == 0.0
    assert diagonal["first_token"] == 0.0
    assert diagonal["first_token_ref"] == pytest.approx(1 / length)
    assert diagonal["prev_self_ratio"] == 0.0
    assert diagonal["mean_distance"] == 0.0


def test_received_concentration_hand_worked() -> None:
    # Every query from position 2 on attends only to key 1: key 1 receives everything.
    length = 6
    focused = torch.zeros(length, length, dtype=torch.float64)
    focused[0, 0] = focused[1, 1] = 1.0
    focused[2:, 1] = 1.0
    assert single(focused)["received_concentration"] == pytest.approx(1.0)
    # Previous-token head, L = 4: keys 1, 2 receive means 1/2 (from rows 2, 3) and 1 (row 3),
    # p = (1/3, 2/3): 1 - H(p)/ln 2 = 1 - (ln 3 - (2/3) ln 2)/ln 2.
    expected = 1 - (math.log(3) - 2 / 3 * math.log(2)) / math.log(2)
    assert single(previous_token_pattern(4))["received_concentration"] == pytest.approx(expected)
    # First-token and diagonal heads: nothing reaches keys 1..L-2 from later queries: 0.
    assert single(first_token_pattern(length))["received_concentration"] == 0.0
    assert single(torch.eye(length, dtype=torch.float64))["received_concentration"] == 0.0
    # Rows spread evenly over keys 1..i-1: key j receives the mean of 1/(i-1) over i > j.
    even = torch.zeros(length, length, dtype=torch.float64)
    even[0, 0] = even[1, 1] = 1.0
    for i in range(2, length):
        even[i, 1:i] = 1.0 / (i - 1)
    assert single(even)["received_concentration"] == pytest.approx(
        received_concentration_loops(even.tolist(), length)
    )
    # Fewer than two keys 1..L-2: undefined.
    assert math.isnan(single(uniform_causal_pattern(3))["received_concentration"])


def test_received_concentration_null_is_uniform_attention() -> None:
    """The locality null (numpy) equals the scorer on uniform causal attention, per sentence
    and as the mean over sentences of >= 4 tokens; uniform attention is far from focused."""
    from mechgen.mechanisms.locality import (
        received_concentration_of_uniform,
        uniform_received_concentration,
    )

    values = []
    for length in (4, 5, 9, 25, 60):
        scored = single(uniform_causal_pattern(length))["received_concentration"]
        assert received_concentration_of_uniform(length) == pytest.approx(scored, rel=1e-12)
        values.append(scored)
    assert uniform_received_concentration([2, 3, 4, 5, 9, 25, 60]) == pytest.approx(
        np.mean(values), rel=1e-12
    )
    assert 0 < received_concentration_of_uniform(25) < 0.02
    with pytest.raises(ValueError, match=">= 4 tokens"):
        uniform_received_concentration([2, 3])


def test_length_two_sentence() -> None:
    metrics = single(torch.tensor([[1.0, 0.0], [0.25, 0.75]], dtype=torch.float64))
    assert metrics["one_back"] == pytest.approx(0.25)
    assert metrics["self_attention"] == pytest.approx((1 + 0.75) / 2)
    assert metrics["first_token"] == pytest.approx(0.25)
    assert metrics["first_token_ref"] == pytest.approx((1 + 0.25) / 2)
    assert metrics["prev_uniform_ratio"] == pytest.approx(0.5)
    entropy_row_1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert metrics["entropy"] == pytest.approx(entropy_row_1 / 2)
    assert metrics["mean_distance"] == pytest.approx(0.25 / 2)


def test_padding_and_heads_are_independent() -> None:
    """A padded batch of several heads gives each (sentence, head) its unpadded metrics."""
    patterns = {
        3: [
            previous_token_pattern(3),
            uniform_causal_pattern(3),
            torch.eye(3, dtype=torch.float64),
        ],
        6: [uniform_causal_pattern(6), first_token_pattern(6), previous_token_pattern(6)],
    }
    padded_length = 8
    batch = torch.full((2, 3, padded_length, padded_length), 0.5, dtype=torch.float64)
    batch[0, :, 5, :] = math.nan  # padding of sentence 0 (rows >= 3) must be ignored
    batch[0, :, :, 7] = math.inf  # and so must its padded keys
    for row, (length, heads) in enumerate(patterns.items()):
        for head, pattern in enumerate(heads):
            batch[row, head, :length, :length] = pattern
    metrics = sentence_attention_metrics(batch, torch.tensor([3, 6]), clipped_window=2)
    for row, (length, heads) in enumerate(patterns.items()):
        for head, pattern in enumerate(heads):
            alone = single(pattern, clipped_window=2)
            for name, value in alone.items():
                assert metrics[name][row, head].item() == pytest.approx(value, nan_ok=True), (
                    name, row, head
                )
    assert not metrics["nonfinite"].any()


@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_nonfinite_entry_flags_only_its_head(bad_value: float) -> None:
    attention = uniform_causal_pattern(5).expand(2, 3, 5, 5).clone()
    attention[1, 2, 3, 1] = bad_value
    metrics = sentence_attention_metrics(attention, [5, 5])
    expected = torch.zeros(2, 3, dtype=torch.bool)
    expected[1, 2] = True
    assert torch.equal(metrics["nonfinite"], expected)
    assert not math.isfinite(metrics["entropy"][1, 2].item())
    # Everything else is untouched.
    assert torch.isfinite(metrics["entropy"][~expected]).all()


def test_half_precision_attention_is_summed_in_float64() -> None:
    # Row sums of 1/(i+1) are not exact in bfloat16 (8-bit mantissa); summing in bfloat16
    # would be off by ~1e-2. The same bfloat16 values are summed in float64: exactly what a
    # float64 copy of them gives.
    attention = uniform_causal_pattern(40).to(torch.bfloat16)[None, None]
    metrics = sentence_attention_metrics(attention, [40])
    expected = sentence_attention_metrics(attention.to(torch.float64), [40])
    assert metrics["entropy"].dtype == torch.float64
    for name in ATTENTION_METRICS:
        assert metrics[name].item() == pytest.approx(expected[name].item(), rel=1e-12), name


def test_bad_lengths_are_rejected() -> None:
    attention = uniform_causal_pattern(4)[None, None]
    with pytest.raises(ValueError, match="length"):
        sentence_attention_metrics(attention, [1])
    with pytest.raises(ValueError, match="length"):
        sentence_attention_metrics(attention, [5])
    with pytest.raises(ValueError, match="one entry per sentence"):
        sentence_attention_metrics(attention, [4, 4])
    with pytest.raises(ValueError, match="shape"):
        sentence_attention_metrics(attention[0], [4])


# ---------------------------------------------------------------------------------------------
# The batched scorer against a brute-force loop over the full causal LM's output_attentions


def tiny_model(dtype: torch.dtype, seed: int = 0, max_positions: int = 64) -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=N_HEADS * HEAD_SIZE,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        intermediate_size=64,
        rotary_pct=0.5,
        max_position_embeddings=max_positions,
        # Dropout only acts in training mode; it is here so that a scorer that forgot to
        # switch to eval mode would fail the comparison with the brute-force loop.
        attention_dropout=0.3,
        hidden_dropout=0.3,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config).to(dtype)
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            # With the default init (std 0.02) every head attends almost uniformly, which
            # would make 1-back, self and first-token scores nearly identical across heads.
            layer.attention.query_key_value.weight.mul_(12.0)
    return model.eval()


def sentences(seed: int = 1) -> list[list[int]]:
    generator = np.random.default_rng(seed)
    return [generator.integers(0, VOCAB_SIZE, size=length).tolist() for length in SENTENCE_LENGTHS]


def received_concentration_loops(a: list[list[float]], length: int) -> float:
    """received_concentration by plain loops: r_j = mean_{i>j} a[i][j] for j = 1..L-2, then
    1 - H(r / sum r) / ln(L-2); NaN for L < 4."""
    if length < 4:
        return math.nan
    received = [
        math.fsum(a[i][j] for i in range(j + 1, length)) / (length - 1 - j)
        for j in range(1, length - 1)
    ]
    total = math.fsum(received)
    entropy = -math.fsum(r / total * math.log(r / total) for r in received if r > 0)
    return 1.0 - entropy / math.log(length - 2)


def brute_force_scores(
    model: GPTNeoXForCausalLM, token_lists: list[list[int]], window: int
) -> pd.DataFrame:
    """One sentence at a time through the full causal LM; metrics by plain Python loops."""
    per_head: dict[tuple[int, int], dict[str, list[float]]] = {}
    for tokens in token_lists:
        length = len(tokens)
        if length < 2:
            continue
        with torch.no_grad():
            output = model(torch.tensor([tokens]), output_attentions=True)
        for layer, layer_attention in enumerate(output.attentions):
            for head in range(model.config.num_attention_heads):
                a = layer_attention[0, head].numpy().tolist()
                rows = range(length)
                one_back = sum(a[i][i - 1] for i in range(1, length)) / (length - 1)
                self_attention = sum(a[i][i] for i in rows) / length
                entropy = sum(
                    -a[i][j] * math.log(a[i][j]) for i in rows for j in range(length) if a[i][j] > 0
                )
                values = {
                    "one_back": one_back,
                    "self_attention": self_attention,
                    "first_token": sum(a[i][0] for i in range(1, length)) / (length - 1),
                    "first_token_ref": sum(a[i][0] for i in rows) / length,
                    "prev_self_ratio": one_back / self_attention,
                    "prev_uniform_ratio": one_back / (sum(map(sum, a)) / length**2),
                    "entropy": entropy / length,
                    "mean_distance": sum(a[i][j] * (i - j) for i in rows for j in range(length))
                    / length,
                    "clipped_distance": sum(
                        a[i][j] * min(i - j, window) for i in rows for j in range(length)
                    )
                    / length,
                    "received_concentration": received_concentration_loops(a, length),
                }
                store = per_head.setdefault((layer, head), {name: [] for name in values})
                for name, value in values.items():
                    store[name].append(value)
    rows_out = [
        # nanmean: received_concentration averages over the sentences of >= 4 tokens only.
        {"layer": layer, "head": head, **{name: float(np.nanmean(v)) for name, v in store.items()}}
        for (layer, head), store in sorted(per_head.items())
    ]
    return pd.DataFrame(rows_out)


@pytest.mark.parametrize(
    ("dtype", "batch_size", "tolerance"),
    [
        # Eager attention takes its softmax in float32 whatever the model dtype, so even a
        # float64 model's attention is only float32-accurate when batch shapes differ: 1e-6.
        (torch.float64, 4, 1e-6),
        (torch.float64, 1, 1e-6),
        # The pipeline's float32 model; the metrics are summed in float64.
        (torch.float32, 5, 1e-6),
    ],
)
def test_batched_scores_match_brute_force(
    dtype: torch.dtype, batch_size: int, tolerance: float
) -> None:
    model = tiny_model(dtype)
    token_lists = sentences()
    window = 3
    model.train()  # score_heads must switch dropout off and restore the mode
    scores = score_heads(model, token_lists, batch_size=batch_size, clipped_window=window)
    assert all(not layer.attention._forward_hooks for layer in model.gpt_neox.layers)
    assert model.training
    model.eval()
    expected = brute_force_scores(model, token_lists, window)

    assert list(scores["layer"]) == list(expected["layer"])
    assert list(scores["head"]) == list(expected["head"])
    for name in ATTENTION_METRICS:
        np.testing.assert_allclose(
            scores[name], expected[name], rtol=tolerance, atol=tolerance, err_msg=name
        )
    assert not scores["nonfinite"].any()

    scored_lengths = [length for length in SENTENCE_LENGTHS if length >= 2]
    assert scores.attrs["n_sentences"] == len(scored_lengths)
    assert scores.attrs["n_tokens"] == sum(scored_lengths)
    assert scores.attrs["n_sentences_too_short"] == SENTENCE_LENGTHS.count(1)
    # The fixture is not degenerate: heads differ and attention is far from uniform.
    assert scores["one_back"].max() - scores["one_back"].min() > 0.05
    assert (expected["prev_uniform_ratio"] - 1).abs().max() > 0.5


def test_body_model_scores_like_causal_lm() -> None:
    """GPTNeoXModel (no LM head) scores exactly like the causal LM that contains it."""
    model = tiny_model(torch.float64)
    token_lists = sentences(seed=2)
    from_causal_lm = score_heads(model, token_lists, batch_size=3)
    from_body = score_heads(model.gpt_neox, token_lists, batch_size=3)
    pd.testing.assert_frame_equal(from_causal_lm, from_body)


def test_nan_in_one_head_is_flagged_for_that_head_only() -> None:
    model = tiny_model(torch.float64)
    token_lists = sentences()
    clean = score_heads(model, token_lists, batch_size=4)
    last_layer, broken_head = N_LAYERS - 1, 2
    with torch.no_grad():
        # query_key_value's output is viewed as [heads, 3 * head_size] with the query first,
        # so these rows are the query of `broken_head`. In the last layer nothing downstream
        # reads its output, so no other head is touched.
        first_row = broken_head * 3 * HEAD_SIZE
        weight = model.gpt_neox.layers[last_layer].attention.query_key_value.weight
        weight[first_row : first_row + HEAD_SIZE] = math.nan
    broken = score_heads(model, token_lists, batch_size=4)

    is_broken = (broken["layer"] == last_layer) & (broken["head"] == broken_head)
    assert broken["nonfinite"].tolist() == is_broken.tolist()
    assert broken.loc[is_broken, ATTENTION_METRICS].isna().all(axis=None)
    pd.testing.assert_frame_equal(
        broken.loc[~is_broken, ATTENTION_METRICS], clean.loc[~is_broken, ATTENTION_METRICS]
    )


def test_bad_input_is_rejected() -> None:
    model = tiny_model(torch.float32)
    with pytest.raises(ValueError, match="vocabulary"):
        score_heads(model, [[1, 2, VOCAB_SIZE]])
    with pytest.raises(ValueError, match="sentence 1 is empty"):
        score_heads(model, [[1, 2], []])
    with pytest.raises(ValueError, match="nothing to score"):
        score_heads(model, [[1], [2]])
    with pytest.raises(ValueError, match="batch_size"):
        score_heads(model, [[1, 2]], batch_size=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        score_heads(model, [[1] * 65])
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="eager"):
        score_heads(model, [[1, 2]])
    with pytest.raises(TypeError, match="GPT-NeoX"):
        score_heads(torch.nn.Linear(2, 2), [[1, 2]])


def brute_force_long(model: GPTNeoXForCausalLM, tokens: list[int], window: int) -> dict:
    """One sentence through the full causal LM; every metric as an explicit float64 sum over the
    causal entries (numpy, no shared code with mechgen). Returns {(layer, head): {metric: v}}."""
    length = len(tokens)
    with torch.no_grad():
        output = model(torch.tensor([tokens]), output_attentions=True)
    query, key = np.tril_indices(length)  # every (i, j) with j <= i
    distance = (query - key).astype(np.float64)
    out = {}
    for layer, layer_attention in enumerate(output.attentions):
        for head in range(model.config.num_attention_heads):
            a = layer_attention[0, head].numpy().astype(np.float64)
            causal = a[query, key]
            one_back = math.fsum(a[i, i - 1] for i in range(1, length)) / (length - 1)
            self_attention = math.fsum(a[i, i] for i in range(length)) / length
            positive = causal[causal > 0]
            out[(layer, head)] = {
                "one_back": one_back,
                "self_attention": self_attention,
                "first_token": math.fsum(a[1:, 0]) / (length - 1),
                "first_token_ref": math.fsum(a[:, 0]) / length,
                "prev_self_ratio": one_back / self_attention,
                "prev_uniform_ratio": one_back * length,
                "entropy": -math.fsum(positive * np.log(positive)) / length,
                "mean_distance": math.fsum(causal * distance) / length,
                "clipped_distance": math.fsum(causal * np.minimum(distance, window)) / length,
                "received_concentration": received_concentration_loops(a.tolist(), length),
            }
    return out


def test_every_metric_is_exact_to_1e6_at_max_tokens() -> None:
    """Sentences of 512 (= scoring.max_tokens) and 249 tokens, float32 weights and attention as
    in the pipeline: every metric within 1e-6 of an exact float64 sum. (With the distances
    summed in float32 mean_distance was off by ~1e-2 tokens at 512 tokens.)"""
    model = tiny_model(torch.float32, seed=3, max_positions=512)
    generator = np.random.default_rng(4)
    lengths = [512, 249]
    token_lists = [generator.integers(0, VOCAB_SIZE, size=n).tolist() for n in lengths]
    window = 8
    for batch_size in (1, 2):  # alone, and the 249-token sentence padded to 512
        scores = score_heads(model, token_lists, batch_size=batch_size, clipped_window=window)
        per_sentence = [brute_force_long(model, tokens, window) for tokens in token_lists]
        for row in scores.itertuples():
            for name in ATTENTION_METRICS:
                expected = np.mean([s[(row.layer, row.head)][name] for s in per_sentence])
                assert abs(getattr(row, name) - expected) <= 1e-6 * max(1.0, abs(expected)), (
                    name, batch_size, getattr(row, name), expected
                )
    # Not degenerate: long-range distances matter (a head attends far back on average).
    assert scores["mean_distance"].max() > 20


def test_prev_uniform_ratio_of_uniform_attention_is_not_one() -> None:
    """What uniform causal attention scores on prev_uniform_ratio: (L/(L-1)) (H_L - 1), with
    H_L the harmonic number (A[i, i-1] = 1/(i+1)), e.g. 2.92 as the mean over the 666 Natural
    Stories sentences' Pythia token counts (mean 27.4 tokens), and never 1."""
    lengths = [2, 5, 25, 85]
    for length in lengths:
        metrics = single(uniform_causal_pattern(length))
        harmonic = math.fsum(1 / k for k in range(1, length + 1))
        assert metrics["prev_uniform_ratio"] == pytest.approx(
            length / (length - 1) * (harmonic - 1), rel=1e-12
        )
    assert single(uniform_causal_pattern(25))["prev_uniform_ratio"] == pytest.approx(2.93, abs=0.01)
    # The docstring says so, and no longer that uniform attention gives 1.
    doc = sentence_attention_metrics.__doc__
    assert "H_L" in doc and "1 = what uniform" not in doc
