"""Tests of mechgen.scoring.configurational: spectra, offset profiles, similarities, CKA, alignment,
stability.

Independent checks: SVD of explicit d x d circuits and their invariance under a rotation of
the residual stream; offset profiles against a loop over sequences and positions of
``output_attentions`` (with padding); CKA against the Gram-matrix (HSIC) form and its
invariances; the head outputs summing to the attention module's output; W_QK cosines against
explicit matrices; hand-worked alignment and stability cases.
"""

from __future__ import annotations

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from scipy.stats import ortho_group
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from mechgen.axes.similarity import (
    align_by_similarity,
    align_heads,
    cka_vs_random_heads,
    identity_fixed_from,
    linear_cka,
    load_qk_factors,
    profile_similarity_matrix,
    qk_cosine,
    random_heads,
    save_qk_factors,
    similarity_vs_random_pairs,
    spectrum_similarity_matrix,
    strongest_head_qk_stability,
)
from mechgen.scoring.configurational import (
    OffsetProfileAccumulator,
    head_outputs,
    head_spectra,
    offset_profile,
    offset_profile_hooks,
    offset_profiles,
    qk_factors,
)
from mechgen.scoring.relational import HeadWeights, head_weights

torch.set_num_threads(1)

N_LAYERS, N_HEADS, HEAD_DIM, D_MODEL, VOCAB = 2, 4, 8, 32, 53


def random_model(seed: int = 0) -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        intermediate_size=64,
        max_position_embeddings=64,
        rotary_pct=0.25,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config)
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            layer.attention.query_key_value.weight.mul_(8.0)
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> GPTNeoXForCausalLM:
    return random_model(0)


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask for lengths 9, 4, 1, 7 (padded to 9)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [9, 4, 1, 7]
    input_ids = torch.randint(0, VOCAB, (4, 9), generator=generator)
    mask = (torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]).long()
    return input_ids, mask


# ---------------------------------------------------------------------------------------------
# Spectra


def test_spectra_match_svd_of_explicit_circuits(model):
    spectra = head_spectra(model, normalise="l2")
    raw = head_spectra(model, normalise="sum")
    weights = head_weights(model)
    for layer in range(N_LAYERS):
        for head in range(N_HEADS):
            qk = (weights.w_q[layer, head].T @ weights.w_k[layer, head]).double().numpy()
            ov = (weights.w_o[layer, head] @ weights.w_v[layer, head]).double().numpy()
            qk_sv = np.linalg.svd(qk, compute_uv=False)[:HEAD_DIM]
            ov_sv = np.linalg.svd(ov, compute_uv=False)[:HEAD_DIM]
            np.testing.assert_allclose(
                spectra.qk[layer, head], qk_sv / np.linalg.norm(qk_sv), rtol=1e-4
            )
            np.testing.assert_allclose(
                spectra.ov[layer, head], ov_sv / np.linalg.norm(ov_sv), rtol=1e-4
            )
            np.testing.assert_allclose(raw.qk[layer, head], qk_sv / qk_sv.sum(), rtol=1e-4)
    assert np.all(np.diff(spectra.qk, axis=-1) <= 1e-12)  # descending


def test_spectra_are_invariant_to_a_rotation_of_the_residual_stream(model):
    weights = head_weights(model, fold_layernorm=False)
    rotation = torch.from_numpy(ortho_group.rvs(D_MODEL, random_state=1)).float()
    # Reading R x with W R^T and writing R W_O: every circuit becomes R C R^T.
    rotated = HeadWeights(
        w_q=weights.w_q @ rotation.T,
        w_k=weights.w_k @ rotation.T,
        w_v=weights.w_v @ rotation.T,
        w_o=rotation @ weights.w_o,
        folded_layernorm=False,
    )
    original, turned = head_spectra(weights), head_spectra(rotated)
    np.testing.assert_allclose(original.qk, turned.qk, atol=1e-5)
    np.testing.assert_allclose(original.ov, turned.ov, atol=1e-5)
    similarity = spectrum_similarity_matrix(
        original.qk.reshape(-1, HEAD_DIM), turned.qk.reshape(-1, HEAD_DIM)
    )
    np.testing.assert_allclose(np.diag(similarity), 1.0, atol=1e-6)


def test_spectrum_similarity_cosine_and_wasserstein():
    a = np.array([[4.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    b = np.array([[8.0, 4.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    cosine = spectrum_similarity_matrix(a, b, "cosine")
    assert cosine[0, 0] == pytest.approx(1.0)  # scale does not matter
    assert cosine[1, 1] == pytest.approx(0.5)  # (1 x 3) / (2 x 3)
    # Zero padding of a shorter spectrum is exact: [4, 2, 1] vs [4, 2, 1, 0].
    assert spectrum_similarity_matrix(a[:1, :3], a[:1], "cosine")[0, 0] == pytest.approx(1.0)
    wasserstein = spectrum_similarity_matrix(a, b, "wasserstein")
    positions = (np.arange(4) + 0.5) / 4
    for i in range(2):
        for j in range(2):
            expected = 1 - stats.wasserstein_distance(positions, positions, a[i], b[j])
            assert wasserstein[i, j] == pytest.approx(expected)
    # All mass on rank 1 vs uniform over 4 ranks: W1 = mean distance from 1/8 = 3/8.
    assert wasserstein[1, 1] == pytest.approx(1 - 3 / 8)
    # Unequal lengths: flat spectra of 2 and 4 values put mass 1/2 at 1/4, 3/4 and 1/4 at
    # 1/8, 3/8, 5/8, 7/8 of the relative rank; each half moves 1/8: W1 = 1/8.
    uneven = spectrum_similarity_matrix(
        np.array([[1.0, 1.0]]), np.array([[1.0, 1.0, 1.0, 1.0]]), "wasserstein"
    )
    assert uneven[0, 0] == pytest.approx(1 - 1 / 8)
    with pytest.raises(ValueError, match="method"):
        spectrum_similarity_matrix(a, b, "euclid")


# ---------------------------------------------------------------------------------------------
# Offset profiles


def brute_force_profile(attentions, mask: torch.Tensor, max_offset: int) -> np.ndarray:
    lengths = mask.sum(dim=1).tolist()
    profile = np.zeros((N_LAYERS, N_HEADS, max_offset + 1))
    for layer in range(N_LAYERS):
        for head in range(N_HEADS):
            for offset in range(max_offset + 1):
                per_sequence = []
                for b, length in enumerate(lengths):
                    values = [
                        float(attentions[layer][b, head, i, i - offset])
                        for i in range(offset, length)
                    ]
                    if values:
                        per_sequence.append(np.mean(values))
                profile[layer, head, offset] = np.mean(per_sequence)
    return profile


def test_offset_profile_matches_brute_force_with_padding(model):
    input_ids, mask = padded_batch()
    with torch.no_grad():
        attentions = model(input_ids, attention_mask=mask, output_attentions=True).attentions
    expected = brute_force_profile(attentions, mask, max_offset=5)
    np.testing.assert_allclose(offset_profile(attentions, 5, mask), expected, rtol=1e-5)
    # Run by the model-level helper in batches of 3 (one sequence alone in the last batch),
    # with the mask the hooks read from the attention module's 4-D mask.
    np.testing.assert_allclose(
        offset_profiles(model, input_ids, mask, max_offset=5, batch_size=3), expected, rtol=1e-5
    )
    # Offsets no sequence reaches are NaN, not 0.
    assert np.isnan(offset_profile(attentions, 10, mask)[..., 9:]).all()


def test_offset_hooks_ride_along_the_one_back_scorer(model):
    from mechgen.scoring.metrics import score_heads

    input_ids, mask = padded_batch(seed=1)
    sentences = [row[: int(m.sum())].tolist() for row, m in zip(input_ids, mask)]
    with offset_profile_hooks(model, max_offset=3) as accumulator:
        table = score_heads(model, sentences, batch_size=2)
    with torch.no_grad():
        attentions = model(input_ids, attention_mask=mask, output_attentions=True).attentions
    # score_heads skips one-token sentences (never runs them), so the hooks see the others.
    kept = mask.sum(1) >= 2
    expected = brute_force_profile([a[kept] for a in attentions], mask[kept], max_offset=3)
    np.testing.assert_allclose(accumulator.profile, expected, rtol=1e-5)
    # The profile at offset 1 is the 1-back score of the same pass.
    one_back = table.set_index(["layer", "head"])["one_back"].to_numpy().reshape(N_LAYERS, N_HEADS)
    np.testing.assert_allclose(one_back, expected[..., 1], rtol=1e-5)


def test_profile_similarity_is_pearson():
    a = np.array([[0.1, 0.7, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    b = np.array([[0.2, 0.5, 0.2, 0.1]])
    similarity = profile_similarity_matrix(a, b)
    assert similarity[0, 0] == pytest.approx(stats.pearsonr(a[0], b[0]).statistic)
    assert np.isnan(similarity[1, 0])  # a constant profile has no correlation


def test_similarity_null_p_value_and_seed():
    similarity = np.arange(16, dtype=float).reshape(4, 4) / 16
    top = similarity_vs_random_pairs(similarity, (3, 3), n_null=500, seed=0)
    # The observed pair is the maximum and excluded from the pool: no null draw reaches it.
    assert top.p_value == pytest.approx(1 / 501)
    pool = np.delete(similarity.ravel(), 15)
    assert top.null_mean == pytest.approx(pool.mean(), abs=0.03)
    assert top.z > 1.5
    again = similarity_vs_random_pairs(similarity, (3, 3), n_null=500, seed=0)
    assert again == top
    low = similarity_vs_random_pairs(similarity, (0, 0), n_null=200, seed=1)
    assert low.p_value == 1.0
    with pytest.raises(ValueError, match="outside"):
        similarity_vs_random_pairs(similarity, (4, 0))


# ---------------------------------------------------------------------------------------------
# CKA


def gram_cka(x: np.ndarray, y: np.ndarray) -> float:
    """The HSIC form: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = X X^T, L = Y Y^T."""
    n = x.shape[0]
    centring = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    return np.trace(k @ centring @ l @ centring) / math.sqrt(
        np.trace(k @ centring @ k @ centring) * np.trace(l @ centring @ l @ centring)
    )


def test_cka_invariances_and_gram_form():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12)) + 3.0  # correlated, offset
    rotation = ortho_group.rvs(12, random_state=2)
    assert linear_cka(x, x @ rotation) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, -x + 100.0) == pytest.approx(1.0, abs=1e-10)
    noise = rng.standard_normal((300, 12))
    assert linear_cka(x, noise) < 0.1
    partial = x[:, :6]
    assert linear_cka(x, partial) == pytest.approx(gram_cka(x, partial), rel=1e-10)
    assert linear_cka(torch.from_numpy(x), noise) == pytest.approx(gram_cka(x, noise), rel=1e-10)
    with pytest.raises(ValueError, match="same n"):
        linear_cka(x, x[:10])


def test_head_outputs_sum_to_attention_output(model):
    input_ids, mask = padded_batch()
    heads = [(1, h) for h in range(N_HEADS)]
    outputs = head_outputs(model, input_ids, heads, attention_mask=mask, batch_size=3)
    z_outputs = head_outputs(model, input_ids, [(1, 2)], attention_mask=mask, space="z")
    captured = []
    attention = model.gpt_neox.layers[1].attention
    handle = attention.register_forward_hook(lambda m, a, out: captured.append(out[0].detach()))
    with torch.no_grad():
        model.gpt_neox(input_ids=input_ids, attention_mask=mask)
    handle.remove()
    module_output = captured[0][mask.bool()]  # [n_real_tokens, d]
    summed = sum(outputs[head] for head in heads) + attention.dense.bias.detach()
    torch.testing.assert_close(summed, module_output, rtol=1e-4, atol=1e-5)
    assert outputs[(1, 0)].shape == (int(mask.sum()), D_MODEL)
    assert z_outputs[(1, 2)].shape == (int(mask.sum()), HEAD_DIM)
    # CKA is invariant to the map z -> W_O z only when W_O is orthogonal; check the shape only
    # and that the same head in two identical models has CKA 1.
    twin = random_model(0)
    twin_outputs = head_outputs(twin, input_ids, [(1, 0)], attention_mask=mask)
    assert linear_cka(outputs[(1, 0)], twin_outputs[(1, 0)]) == pytest.approx(1.0, abs=1e-8)


def test_cka_null_from_random_heads():
    rng = np.random.default_rng(3)
    reference = rng.standard_normal((400, 8))
    matched = reference @ ortho_group.rvs(8, random_state=4)
    randoms = [rng.standard_normal((400, 8)) for _ in range(30)]
    result = cka_vs_random_heads(reference, matched, randoms)
    assert result.observed == pytest.approx(1.0)
    assert result.test.p_value == pytest.approx(1 / 31)
    assert result.null.max() < 0.2
    picks = random_heads(4, 3, 5, seed=9, exclude=[(0, 0)])
    assert picks == random_heads(4, 3, 5, seed=9, exclude=[(0, 0)])
    assert len(set(picks)) == 5 and (0, 0) not in picks
    with pytest.raises(ValueError, match="only"):
        random_heads(2, 2, 5)


# ---------------------------------------------------------------------------------------------
# Alignment


def test_alignment_recovers_a_permutation():
    rng = np.random.default_rng(5)
    signatures = rng.standard_normal((6, 10))
    permutation = rng.permutation(6)
    similarity = profile_similarity_matrix(signatures, signatures[permutation])
    match = align_by_similarity(similarity)
    # Head i of A is head j of B where permutation[j] = i.
    assert (permutation[match] == np.arange(6)).all()
    rectangular = align_heads(np.array([[0.0, 5.0], [5.0, 0.0], [1.0, 1.0]]))
    assert rectangular.tolist() == [0, 1, -1]
    with_nan = align_heads(np.array([[np.nan, 1.0], [0.0, 2.0]]))
    assert with_nan.tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------
# Stability over training


def test_qk_cosine_matches_explicit_matrices(tmp_path):
    first, second = random_model(0), random_model(1)
    factors_a = qk_factors(first, heads=[(1, 2), (0, 0)])
    factors_b = qk_factors(second)
    assert len(factors_b) == N_LAYERS * N_HEADS
    w_q, w_k = (m.astype(np.float64) for m in factors_a[(1, 2)])
    v_q, v_k = (m.astype(np.float64) for m in factors_b[(1, 2)])
    qk_a, qk_b = w_q.T @ w_k, v_q.T @ v_k
    expected = (qk_a * qk_b).sum() / (np.linalg.norm(qk_a) * np.linalg.norm(qk_b))
    assert qk_cosine(factors_a[(1, 2)], factors_b[(1, 2)]) == pytest.approx(expected, rel=1e-9)
    assert qk_cosine(factors_a[(1, 2)], factors_a[(1, 2)]) == pytest.approx(1.0)
    assert qk_cosine(factors_a[(1, 2)], (w_q * 3.0, -w_k)) == pytest.approx(-1.0)
    path = tmp_path / "qk.npz"
    save_qk_factors(path, factors_a)
    loaded = load_qk_factors(path)
    assert set(loaded) == {(1, 2), (0, 0)}
    np.testing.assert_array_equal(loaded[(0, 0)][1], factors_a[(0, 0)][1])


def test_strongest_head_stability_and_fixed_identity():
    rng = np.random.default_rng(6)
    base = (rng.standard_normal((4, 16)), rng.standard_normal((4, 16)))
    other = (rng.standard_normal((4, 16)), rng.standard_normal((4, 16)))
    factors_by_step = {
        0: {(0, 1): other},
        1: {(0, 1): base, (1, 0): other},
        2: {(1, 0): base},
        3: {(1, 0): base},
    }
    trajectory = pd.DataFrame(
        {
            "run": "r",
            "step": [3, 0, 1, 2],
            "argmax_layer": [1, 0, 0, 1],
            "argmax_head": [0, 1, 1, 0],
        }
    )
    table = strongest_head_qk_stability(trajectory, factors_by_step)
    assert table["step"].tolist() == [1, 2, 3]
    assert table["previous_step"].tolist() == [0, 1, 2]
    assert table["qk_cosine"].iloc[0] == pytest.approx(qk_cosine(other, base))
    assert table["qk_cosine"].iloc[1] == pytest.approx(
        qk_cosine(other, base)
    )  # (1,0) at steps 1 and 2
    assert table["qk_cosine"].iloc[2] == pytest.approx(1.0)
    assert identity_fixed_from(trajectory) == 2
    flips_back = pd.DataFrame(
        {"step": [0, 1, 2, 3], "argmax_layer": [1, 0, 1, 1], "argmax_head": [0, 1, 0, 0]}
    )
    assert identity_fixed_from(flips_back) == 2  # (1, 0) at step 0 does not count: it left
    changes_last = pd.DataFrame({"step": [0, 5], "argmax_layer": [0, 1], "argmax_head": [0, 0]})
    assert identity_fixed_from(changes_last) == 5
    assert math.isnan(identity_fixed_from(changes_last.iloc[:0]))


def test_accumulator_weighs_sequences_equally():
    # Two sequences: one of length 2 attending fully back (offset-1 profile 1), one of length
    # 4 attending to itself (offset-1 profile 0): the mean is 0.5, not 1/4 (token-weighted).
    attention = torch.zeros(2, 1, 4, 4)
    attention[0, 0, 0, 0] = attention[0, 0, 1, 0] = 1.0
    for i in range(4):
        attention[1, 0, i, i] = 1.0
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    accumulator = OffsetProfileAccumulator(1, 1, max_offset=2)
    accumulator.add(0, attention, mask)
    assert accumulator.profile[0, 0, 1] == pytest.approx(0.5)
    assert accumulator.profile[0, 0, 0] == pytest.approx((0.5 + 1.0) / 2)
    assert accumulator.profile[0, 0, 2] == pytest.approx(0.0)  # only sequence 2 has offset 2
    # A NaN in a head's attention is not hidden as 0.
    broken = attention.clone()
    broken[1, 0, 3, 2] = math.nan
    flagged = OffsetProfileAccumulator(1, 1, max_offset=2)
    flagged.add(0, broken, mask)
    assert np.isnan(flagged.profile[0, 0, 1]) and not np.isnan(flagged.profile[0, 0, 0])
