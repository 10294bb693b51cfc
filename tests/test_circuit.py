"""Tests of mechgen.scoring.circuit: the per-checkpoint relational/configurational scores and their
per-suite analysis, each against an independent computation (brute force from
``output_attentions``, hand-worked tables)."""

from __future__ import annotations

import json
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest
import torch

from mechgen.axes import circuit_tables
from mechgen.axes.developmental import onset_thresholds, threshold_onset
from mechgen.scoring import circuit, metrics
from mechgen.tables import circuit_files
from mechgen.tables.baselines import uniform_induction_baseline

VOCAB = 64


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(config).eval()


@pytest.fixture(scope="module")
def sentences() -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(2, VOCAB, size=int(rng.integers(3, 12))).tolist() for _ in range(9)]


@pytest.fixture(scope="module")
def scored(model, sentences):
    torch.set_num_threads(1)
    settings = circuit.CircuitSettings(
        n_sequences=5,
        half_length=6,
        token_hi=VOCAB,
        batch_size=2,
        detail=True,
        n_baseline=10,
        n_random_heads=2,
        cka_max_tokens=40,
        max_offset=3,
    )
    with circuit.ride_along(model, settings) as ride:
        one_back = metrics.score_heads(model, sentences, batch_size=4)
    return one_back, circuit.score_circuit(model, one_back, ride, settings, sentences), settings


def _attentions(model, ids: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model(input_ids=ids, output_attentions=True).attentions)


def test_induction_and_copying_match_brute_force(model, scored) -> None:
    _, result, settings = scored
    # Regenerate the ids independently: numpy's generator, one choice per row, rows in order.
    rng = np.random.default_rng(settings.seed)
    first = np.stack([rng.choice(VOCAB - 2, size=6, replace=False) + 2 for _ in range(5)])
    ids = torch.from_numpy(np.concatenate([first, first], axis=1))
    attentions = _attentions(model, ids)
    expected = np.zeros((3, 2))
    for layer, attention in enumerate(attentions):
        for head in range(2):
            values = [
                attention[n, head, p, p - 6 + 1].item() for n in range(5) for p in range(6, 12)
            ]
            expected[layer, head] = np.mean(values)
    np.testing.assert_allclose(result.induction, expected, atol=1e-6)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    hits = [int(logits[n, p].argmax() == ids[n, p + 1]) for n in range(5) for p in range(6, 11)]
    assert result.copying_accuracy == pytest.approx(np.mean(hits))
    record = result.record["sequences"]
    ids_bytes = np.ascontiguousarray(first, dtype="<i8").tobytes()
    import hashlib

    assert record["sha256"] == hashlib.sha256(ids_bytes).hexdigest()
    assert (record["lo"], record["hi"], record["seed"]) == (2, VOCAB, 0)


def test_positional_control_matches_brute_force(model, scored) -> None:
    _, result, settings = scored
    rng = np.random.default_rng(settings.seed)
    first = np.stack([rng.choice(VOCAB - 2, size=6, replace=False) + 2 for _ in range(5)])
    rng = np.random.default_rng(settings.seed + 1)
    second = np.stack([rng.choice(VOCAB - 2, size=6, replace=False) + 2 for _ in range(5)])
    attentions = _attentions(model, torch.from_numpy(np.concatenate([first, second], axis=1)))
    expected = np.array(
        [
            [
                np.mean([a[n, h, p, p - 5].item() for n in range(5) for p in range(6, 12)])
                for h in range(2)
            ]
            for a in attentions
        ]
    )
    np.testing.assert_allclose(result.arrays["induction_control"], expected, atol=1e-6)


def test_offset_profile_rides_along_and_matches_brute_force(model, sentences, scored) -> None:
    _, result, _ = scored
    # Each sentence alone (no padding): profile = mean over sentences of the mean over i of
    # A[i, i - o], for the sentences that have offset o.
    sums = np.zeros((3, 2, 4))
    counts = np.zeros(4)
    for sentence in sentences:
        attentions = _attentions(model, torch.tensor([sentence]))
        for offset in range(4):
            if len(sentence) <= offset:
                continue
            counts[offset] += 1
            for layer, attention in enumerate(attentions):
                diagonal = attention[0].diagonal(offset=-offset, dim1=-2, dim2=-1)
                sums[layer, :, offset] += diagonal.mean(dim=-1).numpy()
    np.testing.assert_allclose(result.arrays["offset_profile"], sums / counts, atol=1e-6)


def test_strongest_head_spectra_and_qk_factors(model, scored) -> None:
    one_back, result, _ = scored
    best = one_back.loc[one_back["one_back"].idxmax()]
    assert tuple(result.arrays["strongest_one_back"]) == (best["layer"], best["head"])
    # The saved factors are the top-3 one_back heads, strongest first.
    top = one_back.sort_values("one_back", ascending=False).head(3)
    assert [tuple(h) for h in result.arrays["qk_heads"]] == list(zip(top["layer"], top["head"]))
    # Spectrum of one head from the dense d x d W_QK = W_Q^T W_K (LayerNorm folded).
    from mechgen.scoring.relational import head_weights

    weights = head_weights(model)
    layer, head = (int(x) for x in result.arrays["strongest_one_back"])
    w_qk = weights.w_q[layer, head].double().T @ weights.w_k[layer, head].double()
    singular = torch.linalg.svdvals(w_qk).numpy()[:16]
    np.testing.assert_allclose(
        result.arrays["qk_spectrum"][layer, head], singular / np.linalg.norm(singular), atol=1e-5
    )
    np.testing.assert_allclose(result.arrays["qk_q"][0], weights.w_q[layer, head].numpy())


def test_detail_step_ablation_composition_and_cka_outputs(model, sentences, scored) -> None:
    from mechgen.scoring.configurational import head_outputs
    from mechgen.scoring.relational import (
        causal_dependence,
        composition_scores,
        make_repeated_sequences,
        mean_head_outputs,
    )

    one_back, result, _ = scored
    source = tuple(int(x) for x in result.arrays["strongest_one_back"])
    # The ride-along mean z equals a separate pass over the padded sentences.
    ids, mask, _ = circuit.eval_token_prefix(sentences, 10**6)
    mean_z = mean_head_outputs(model, ids, mask)
    sequences = make_repeated_sequences(2, VOCAB, 5, 6, 0)
    direct = causal_dependence(model, sequences, source, mean_z, batch_size=2)
    ablation = result.record["ablation"]
    assert ablation["induction_drop"] == pytest.approx(direct.induction_drop, abs=1e-6)
    assert ablation["control_induction_drop"] == pytest.approx(
        direct.control_induction_drop, abs=1e-6
    )
    k = composition_scores(model, ("K",), n_baseline=10)["K"]
    np.testing.assert_allclose(result.arrays["k_composition"], k.score, equal_nan=True)
    # CKA outputs: the strongest head first, then seeded random heads, then every other
    # mechanism's strongest head (each head once), on the first <= 40 tokens.
    heads = [tuple(map(int, h)) for h in result.arrays["cka_heads"]]
    random = circuit.random_cka_heads(3, 2, source, 2, seed=0)
    assert heads[:3] == [source, *random] and len(set(heads)) == len(heads)
    assert result.arrays["cka_random"].tolist() == [h in random for h in heads]
    scores = one_back.assign(
        induction=result.induction[one_back["layer"], one_back["head"]],
        duplicate_token=result.arrays["duplicate_token"][one_back["layer"], one_back["head"]],
    )
    expected = {}
    for name, column in (
        ("previous_token", "one_back"), ("induction", "induction"),
        ("duplicate_token", "duplicate_token"), ("locality", "received_concentration"),
    ):  # fmt: skip
        best = scores.sort_values([column, "layer", "head"], ascending=[False, True, True])
        expected[name] = [int(best["layer"].iloc[0]), int(best["head"].iloc[0])]
    assert result.record["cka_strongest"] == expected  # no weight-based scores in this job
    assert {tuple(h) for h in expected.values()} <= set(heads)
    prefix_ids, prefix_mask, prefix_digest = circuit.eval_token_prefix(sentences, 40)
    assert int(prefix_mask.sum()) <= 40 and result.record["cka_n_tokens"] == int(prefix_mask.sum())
    outputs = head_outputs(model, prefix_ids, heads, prefix_mask, space="z")
    for row, head in enumerate(heads):
        np.testing.assert_allclose(result.arrays["cka_outputs"][row], outputs[head], atol=1e-6)
    assert result.record["cka_tokens_sha256"] == prefix_digest


def test_save_load_roundtrip_and_columns(tmp_path, scored) -> None:
    one_back, result, _ = scored
    path = result.save(tmp_path / "step3.circuit.npz")
    loaded = circuit_files.load_circuit(path)
    assert loaded.record == json.loads(json.dumps(result.record, default=str))
    for key, value in result.arrays.items():
        np.testing.assert_array_equal(loaded.arrays[key], value)
    shuffled = one_back.sample(frac=1.0, random_state=0)
    table = circuit_files.add_circuit_columns(shuffled, loaded)
    for row in table.itertuples():
        assert row.induction == result.induction[row.layer, row.head]
        assert row.duplicate_token == result.arrays["duplicate_token"][row.layer, row.head]
        assert (
            row.duplicate_token_control
            == result.arrays["duplicate_token_control"][row.layer, row.head]
        )
    assert (table["copying_accuracy"] == result.copying_accuracy).all()


def test_helpers_hand_worked() -> None:
    # Same layer first, then the other layers.
    heads = circuit.random_cka_heads(3, 2, (1, 0), 3, seed=0)
    assert heads[0] == (1, 1) and all(h[0] != 1 for h in heads[1:]) and len(set(heads)) == 3
    assert circuit.random_cka_heads(1, 1, (0, 0), 2, seed=0) == []
    ids, mask, digest = circuit.eval_token_prefix([[5, 6, 7], [8, 9], [1, 2, 3, 4]], 5)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 0]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    import hashlib

    assert digest == hashlib.sha256(b"[[5,6,7],[8,9]]").hexdigest()
    table = pd.DataFrame(
        {
            "layer": [0, 0, 1, 1],
            "head": [0, 1, 0, 1],
            "one_back": [0.2, np.nan, 0.5, 0.5],
            "nonfinite": [False, True, False, False],
        }
    )
    assert circuit_files.strongest_head(table) == (1, 0)  # tie at 0.5: the lower head
    with pytest.raises(ValueError, match="positive int"):
        circuit.CircuitSettings.from_mapping({"n_sequences": 0})


# --- per-suite analysis on hand-built inputs --------------------------------------------------


STEPS = [0, 10, 100, 1000]


def _heads(runs: dict[str, tuple[str, int, int]]) -> pd.DataFrame:
    """Per-head table: 2 layers x 2 heads; one_back of (0, 1) rises at step 10, induction of
    (1, 0) at step 100 (run's ``late`` shifts it to 1000)."""
    rows = []
    for run, (model, seed, late) in runs.items():
        for step in STEPS:
            for layer in range(2):
                for head in range(2):
                    one_back = 0.1 + (0.5 if (layer, head) == (0, 1) and step >= 10 else 0.0)
                    induction = 0.02 + (0.3 if (layer, head) == (1, 0) and step >= late else 0.0)
                    rows.append(
                        {
                            "suite": "t",
                            "model": model,
                            "size": model[-1],
                            "seed": seed,
                            "run": run,
                            "step": step,
                            "tokens_seen": step * 8,
                            "layer": layer,
                            "head": head,
                            "n_layers": 2,
                            "n_heads": 2,
                            "n_params": 1000 if model.endswith("a") else 4000,
                            "one_back": one_back,
                            "induction": induction,
                            "nonfinite": False,
                            # r2's "induction" head is positional: as high without the repeat.
                            "induction_control": induction if run == "r2" else 0.02,
                        }
                    )
    return pd.DataFrame(rows)


def _circuit(
    profile_shift: float = 0.0, drop: float = 0.2, detail: bool = True, factors_seed: int = 0
) -> circuit_files.CircuitResult:
    profile = np.tile(np.linspace(0.1, 0.9, 4), (2, 2, 1))
    profile[0, 1] = [0.05, 0.8, 0.1, 0.05]  # the 1-back head
    profile[0, 1, 1] += profile_shift
    rng = np.random.default_rng(factors_seed)
    arrays = {
        "induction": np.array([[0.02, 0.02], [0.32, 0.02]]),
        "copying_accuracy": np.array(0.5),
        "offset_profile": profile,
        "qk_spectrum": np.sort(rng.random((2, 2, 4)), axis=-1)[..., ::-1],
        "ov_spectrum": np.sort(rng.random((2, 2, 4)), axis=-1)[..., ::-1],
        "strongest_one_back": np.array([0, 1]),
        "qk_heads": np.array([[0, 1], [1, 0]]),
        "qk_q": np.ones((2, 2, 4)),
        "qk_k": np.ones((2, 2, 4)),
    }
    record: dict = {}
    if detail:
        k = np.full((2, 2, 2, 2), np.nan)
        k[1, 0, 0, 1] = 0.5
        arrays.update(
            k_composition=k,
            k_baseline_mean=np.where(np.isfinite(k), 0.3, np.nan),
            k_baseline_sd=np.where(np.isfinite(k), 0.05, np.nan),
            cka_heads=np.array([[0, 1], [0, 0], [1, 1]]),
            cka_outputs=rng.standard_normal((3, 20, 4)).astype(np.float32),
        )
        record = {
            "ablation": {
                "source_layer": 0,
                "source_head": 1,
                "control_head": 0,
                "target_layer": 1,
                "target_head": 0,
                "induction_before": 0.32,
                "induction_after_source": 0.32 - drop,
                "induction_after_control": 0.31,
                "induction_drop": drop,
                "control_induction_drop": 0.01,
                "copying_before": 0.5,
                "copying_drop": 0.3,
                "control_copying_drop": 0.0,
            },
            "cka_tokens_sha256": "same",
        }
    return circuit_files.CircuitResult(arrays=arrays, record=record)


def test_relational_table_finds_the_order_hand_worked() -> None:
    heads = _heads({"r1": ("toy-a", 1, 100), "r2": ("toy-a", 2, 1000), "r3": ("toy-b", 1, 100)})
    circuits = {(run, 1000): _circuit(drop=d) for run, d in (("r1", 0.2), ("r2", 0.0), ("r3", 0.1))}
    for run in ("r1", "r2"):
        circuits[(run, 1000)].record["settings"] = {"half_length": 4}
    thresholds = onset_thresholds()
    table = circuit_tables.relational_table(heads, circuits, thresholds).set_index("run")
    # Independent onsets: threshold_onset of the hand-built max-over-heads trajectories.
    one_back = threshold_onset(np.array(STEPS), np.array([0.1, 0.6, 0.6, 0.6]), thresholds)[0]
    induction = threshold_onset(np.array(STEPS), np.array([0.1, 0.1, 0.32, 0.32]), thresholds)[0]
    assert one_back == 10 and induction == 100
    assert table.at["r1", "lag_steps"] == induction - one_back == 90
    assert table.at["r1", "lag_tokens"] == 90 * 8
    assert bool(table.at["r1", "one_back_earlier_layer"]) and bool(table.at["r1", "expected_order"])
    assert (table.at["r1", "induction_layer"], table.at["r1", "one_back_layer"]) == (1, 0)
    assert table.at["r1", "k_composition_z"] == pytest.approx((0.5 - 0.3) / 0.05)
    assert table.at["r1", "drop_minus_control"] == pytest.approx(0.19)
    assert not bool(table.at["r2", "drop_exceeds_control"])
    assert table.at["r1", "induction_content"] == pytest.approx(0.32 - 0.02)
    assert not bool(table.at["r1", "induction_positional"])
    assert bool(table.at["r2", "induction_positional"]) and table.at["r2", "induction_content"] == 0
    # Uniform attention over 0..p at p = 4..7 (L = 4): (1/5 + 1/6 + 1/7 + 1/8) / 4 = 0.158631.
    assert table.at["r1", "induction_uniform"] == pytest.approx(0.158631, abs=1e-6)
    assert bool(table.at["r1", "induction_formed"])  # 0.32 >= 2 x 0.1586, content-based
    assert not bool(table.at["r2", "induction_formed"])  # as high without the repeat
    # r2's order holds in layer and onset, but with no content-based induction head it is not
    # the expected circuit; r3's unknown induction_formed does not count against it.
    assert bool(table.at["r2", "one_back_first"]) and bool(table.at["r2", "one_back_earlier_layer"])
    assert not bool(table.at["r2", "expected_order"])
    assert bool(table.at["r3", "expected_order"])
    assert np.isnan(table.at["r3", "induction_uniform"]) and pd.isna(
        table.at["r3", "induction_formed"]
    )

    sizes = circuit_tables.relational_sizes(table.reset_index())
    row = sizes[(sizes["relation"] == "drop_exceeds_control") & (sizes["model"] == "toy-a")]
    assert (int(row["n_holds"].iloc[0]), int(row["n_runs"].iloc[0])) == (1, 2)
    from statsmodels.stats.proportion import proportion_confint

    assert row["ci_low"].iloc[0] == pytest.approx(proportion_confint(1, 2, method="wilson")[0])
    regressions = circuit_tables.relational_regressions(table.reset_index())
    assert set(regressions["analysis"]) == {
        "relational_lag_steps",
        "relational_induction_drop",
        "relational_drop_minus_control",
    }


def test_no_induction_head_is_neither_formed_nor_positional() -> None:
    heads = _heads({"r1": ("toy-a", 1, 10**9)})  # induction never rises: 0.02 everywhere
    result = _circuit()
    result.record["settings"] = {"half_length": 4}
    table = circuit_tables.relational_table(heads, {("r1", 1000): result}, onset_thresholds())
    row = table.set_index("run").loc["r1"]
    assert row["induction_max"] == pytest.approx(0.02)
    assert pd.isna(row["induction_positional"])  # 0.02 < 2 x uniform: nothing to call positional
    assert not bool(row["induction_formed"])
    # No induction head, so no order to find, whatever the noise onsets say.
    assert not pd.isna(row["expected_order"]) and not bool(row["expected_order"])


def test_relational_regressions_skip_a_single_seed() -> None:
    heads = _heads({"r1": ("toy-a", 1, 100), "r2": ("toy-b", 1, 100)})
    circuits = {(run, 1000): _circuit() for run in ("r1", "r2")}
    table = circuit_tables.relational_table(heads, circuits, onset_thresholds())
    regressions = circuit_tables.relational_regressions(table)
    assert regressions["note"].str.contains("skipped: only one level of 'seed'").all()


def test_relational_table_needs_the_induction_column() -> None:
    heads = _heads({"r1": ("toy-a", 1, 100)}).drop(columns="induction")
    with pytest.raises(ValueError, match="no 'induction' column"):
        circuit_tables.relational_table(heads, {}, onset_thresholds())


def test_configurational_table_against_hand_worked_nulls() -> None:
    heads = _heads({"r1": ("toy-a", 1, 100), "r2": ("toy-a", 2, 100)})
    a, b = _circuit(factors_seed=0), _circuit(profile_shift=0.05, factors_seed=0)
    b.arrays["cka_outputs"] = a.arrays["cka_outputs"].copy()
    b.arrays["cka_outputs"][0] = (
        a.arrays["cka_outputs"][0]
        @ np.linalg.qr(np.random.default_rng(5).standard_normal((4, 4)))[0]
    )  # a rotation of A's strongest head: CKA exactly 1
    table = circuit_tables.configurational_table(
        heads, {("r1", 1000): a, ("r2", 1000): b}, n_null=50
    )
    assert len(table) == 2  # both orders
    row = table[table["run_a"] == "r1"].iloc[0]
    # Identical spectra: cosine 1 for the tested pair; the null is random pairs of other heads.
    assert row["qk_spectrum_similarity"] == pytest.approx(1.0)
    others = np.array(
        [
            [
                np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y)
                for y in a.arrays["qk_spectrum"].reshape(4, 4)
            ]
            for x in a.arrays["qk_spectrum"].reshape(4, 4)
        ]
    ).ravel()
    others = np.delete(others, 1 * 4 + 1)
    assert row["qk_spectrum_null_mean"] == pytest.approx(
        np.random.default_rng(0).choice(others, 50).mean()
    )
    expected_r = np.corrcoef(a.arrays["offset_profile"][0, 1], b.arrays["offset_profile"][0, 1])[
        0, 1
    ]
    assert row["profile_similarity"] == pytest.approx(expected_r)
    assert row["aligned_head_b"] == 1 and bool(row["aligned_is_strongest"])
    assert row["cka"] == pytest.approx(1.0)
    assert row["cka_n_null"] == 2 and row["cka_p"] == pytest.approx(1 / 3)
    # Different evaluation tokens: no CKA, and a note says why.
    b.record["cka_tokens_sha256"] = "other"
    table = circuit_tables.configurational_table(
        heads, {("r1", 1000): a, ("r2", 1000): b}, n_null=50
    )
    assert table["cka"].isna().all() and table["cka_note"].str.contains("different").all()


def _linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_configurational_cka_of_each_mechanisms_stored_head_against_random_heads() -> None:
    heads = _heads({"r1": ("toy-a", 1, 100), "r2": ("toy-a", 2, 100)})
    a, b = _circuit(), _circuit()  # identical stored outputs: rows (0,1), (0,0), (1,1)
    before = circuit_tables.configurational_table(
        heads, {("r1", 1000): a, ("r2", 1000): b}, n_null=50
    )
    rng = np.random.default_rng(7)
    x = rng.standard_normal((20, 4))
    rotation = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    for result, extra in ((a, x), (b, x @ rotation)):
        # The strongest induction head (1, 0), stored after the random heads (0,0) and (1,1).
        result.arrays["cka_heads"] = np.vstack([result.arrays["cka_heads"], [[1, 0]]])
        result.arrays["cka_outputs"] = np.concatenate(
            [result.arrays["cka_outputs"], extra[None].astype(np.float32)]
        )
        result.arrays["cka_random"] = np.array([False, True, True, False])
    circuits = {("r1", 1000): a, ("r2", 1000): b}
    # The previous-token comparison is unchanged by another mechanism's stored head.
    pd.testing.assert_frame_equal(
        before, circuit_tables.configurational_table(heads, circuits, n_null=50)
    )
    table = circuit_tables.configurational_table(
        heads, circuits, n_null=50, strongest={("r1", 1000): (1, 0), ("r2", 1000): (1, 0)}
    )
    row = table[table["run_a"] == "r1"].iloc[0]
    assert row["cka_note"] == ""
    assert row["cka"] == pytest.approx(1.0)  # B's induction head: a rotation of A's
    # The null: A's induction head against B's two random heads (rows 1 and 2).
    null = [_linear_cka(x, b.arrays["cka_outputs"][j].astype(float)) for j in (1, 2)]
    assert row["cka_n_null"] == 2 and row["cka_null_mean"] == pytest.approx(np.mean(null))
    assert row["cka_p"] == pytest.approx(1 / 3)
    # Alignment within layer 1 over {(1,0), (1,1)} in both runs: (1,0) pairs with (1,0).
    assert row["cka_aligned_head_b"] == 0 and row["cka_aligned"] == pytest.approx(1.0)


def test_stability_table_hand_worked() -> None:
    heads = _heads({"r1": ("toy-a", 1, 100)})
    q = np.random.default_rng(0).standard_normal((2, 2, 4))
    circuits = {}
    for step in STEPS:
        result = _circuit(detail=False)
        result.arrays["qk_q"] = q.copy()
        result.arrays["qk_k"] = q.copy()
        if step == 1000:  # the strongest head's W_Q turns: cosine with itself at 100 is -1
            result.arrays["qk_q"][0] = -q[0]
        circuits[("r1", step)] = result
    table = circuit_tables.stability_table(heads, circuits)
    assert table["step"].tolist() == [10, 100, 1000]
    # Steps 0 -> 10: the strongest head changes from (0, 0) (all tied at 0.1) to (0, 1).
    assert table["identity_fixed_from_step"].eq(10).all()
    assert table["qk_cosine"].tolist()[1] == pytest.approx(1.0)
    assert table["qk_cosine"].tolist()[2] == pytest.approx(-1.0)
    assert table["qk_cosine_n_null"].tolist() == [1, 1, 1]
    assert math.isfinite(table["qk_cosine_null_mean"].iloc[0])


# --- inside the scoring job: cache hits (duplicate weights) and missing checkpoints -----------


def test_scoring_job_caches_circuit_scores_with_duplicates(tmp_path, monkeypatch) -> None:
    from support.fakehub import save_random_checkpoint, tiny_gpt_neox_config, train_tiny_tokenizer

    from mechgen.config import Run
    from mechgen.scoring import job as scoring

    tokenizer = train_tiny_tokenizer(tmp_path / "tokenizer")
    config = tiny_gpt_neox_config()
    run_dir = tmp_path / "tiny-a-seed1"
    save_random_checkpoint(run_dir / "step0", config, seed=1, tokenizer_dir=tokenizer)
    (run_dir / "step1").mkdir()
    for path in (run_dir / "step0").iterdir():  # byte copies: the same weights at step 1
        (run_dir / "step1" / path.name).write_bytes(path.read_bytes())
    run = Run("mine", run_dir.name, "tiny-a", "a", 1, "local", str(run_dir))
    settings = circuit.CircuitSettings(
        n_sequences=4, half_length=5, token_hi=int(config.vocab_size), n_baseline=4, detail=True
    )
    calls: list[int] = []
    real = metrics.score_heads
    monkeypatch.setattr(metrics, "score_heads", lambda *a, **k: calls.append(1) or real(*a, **k))
    sentences = [[5, 17, 99, 3, 7], [11, 12, 13], [20, 21, 22, 23, 24, 25]]
    tables, layer_scores = {}, {}
    for step in (0, 1):
        tables[step], sidecar = scoring.score_checkpoint(
            run,
            step,
            sentences,
            tokens_per_step=10,
            score_cache_dir=tmp_path / "cache",
            circuit_settings=settings,
            circuit_path=tmp_path / f"step{step}.circuit.npz",
        )
        assert sidecar["relational"]["sequences"]["n_sequences"] == 4
        layer_scores[step] = sidecar["layer_scores"]
    assert len(calls) == 1  # the duplicate was not scored again, circuit scores included
    # The layer-unit mechanism's per-layer values reach the sidecar from the fresh scores and
    # from the cache entry alike (the aggregate's layers.parquet reads them there).
    assert layer_scores[0] == layer_scores[1]
    assert len(layer_scores[0]["in_context_retrieval"]) == config.num_hidden_layers
    columns = ["layer", "head", "induction", "induction_control", "copying_accuracy"]
    pd.testing.assert_frame_equal(tables[0][columns], tables[1][columns])
    first = circuit_files.load_circuit(tmp_path / "step0.circuit.npz")
    second = circuit_files.load_circuit(tmp_path / "step1.circuit.npz")
    assert first.arrays.keys() == second.arrays.keys() and "k_composition" in first.arrays
    for key in first.arrays:
        np.testing.assert_array_equal(first.arrays[key], second.arrays[key])
    assert first.arrays["in_context_retrieval"].tolist() == layer_scores[0]["in_context_retrieval"]
    # Other relational settings are another cache entry: scored again.
    scoring.score_checkpoint(
        run,
        1,
        sentences,
        tokens_per_step=10,
        score_cache_dir=tmp_path / "cache",
        circuit_settings=circuit.CircuitSettings(n_sequences=3, half_length=5, token_hi=50),
        circuit_path=tmp_path / "again.circuit.npz",
    )
    assert len(calls) == 2
    # A new CIRCUIT_VERSION (what a circuit file holds changed) is another entry too.
    monkeypatch.setattr(circuit, "CIRCUIT_VERSION", circuit.CIRCUIT_VERSION + 1)
    scoring.score_checkpoint(
        run,
        1,
        sentences,
        tokens_per_step=10,
        score_cache_dir=tmp_path / "cache",
        circuit_settings=settings,
        circuit_path=tmp_path / "bumped.circuit.npz",
    )
    assert len(calls) == 3
    assert "link_ablations" in circuit_files.load_circuit(tmp_path / "bumped.circuit.npz").record
    # A checkpoint that does not exist: zero rows and a circuit file without arrays.
    table, sidecar = scoring.score_checkpoint(
        run,
        7,
        sentences,
        tokens_per_step=10,
        circuit_settings=settings,
        circuit_path=tmp_path / "step7.circuit.npz",
    )
    assert sidecar["status"] == "missing" and table.empty
    assert circuit_files.read_circuits([tmp_path / "step7.circuit.npz"]) == {}


# --- figures ----------------------------------------------------------------------------------


def test_relational_figures_draw_the_tables(tmp_path) -> None:
    from mechgen.axes.developmental import trajectories
    from mechgen.figures import suite as figures

    heads = _heads({"r1": ("toy-a", 1, 100), "r2": ("toy-a", 2, 1000)})
    fig = figures.plot_relational_trajectories(
        trajectories(heads, "one_back"),
        trajectories(heads, "induction"),
        tmp_path / "t.png",
        uniform_induction_baseline(2),
        trajectories(heads, "induction_control"),
    )
    lines = {line.get_gid(): line for line in fig.axes[0].get_lines()}
    # Mean over the two seeds of the max-over-heads induction: 0.32 from step 1000, where both
    # have risen; at step 100 only r1 has (0.32 and 0.02).
    np.testing.assert_allclose(lines["mean:induction"].get_ydata(), [0.02, 0.02, 0.17, 0.32])
    np.testing.assert_allclose(lines["mean:induction"].get_xdata(), np.array(STEPS) + 1)
    assert uniform_induction_baseline(2) == pytest.approx((1 / 3 + 1 / 4) / 2)
    relational = pd.DataFrame(
        {
            "model": ["toy-a", "toy-a", "toy-b"],
            "n_params": [1, 1, 2],
            "lag_steps": [90.0, np.nan, 10.0],
            "induction_drop": [0.2, 0.1, 0.0],
            "control_induction_drop": [0.0, 0.01, 0.02],
        }
    )
    fig = figures.plot_onset_lags(relational, tmp_path / "lag.png")
    points = {c.get_gid(): c.get_offsets() for c in fig.axes[0].collections}
    assert points["seeds:toy-a"][:, 1].tolist() == [90.0] and points["seeds:toy-b"][
        :, 1
    ].tolist() == [10.0]
    assert "1 run(s) without both onsets" in fig.axes[0].get_title()
    fig = figures.plot_ablation(relational, tmp_path / "ablation.png")
    points = {c.get_gid(): c.get_offsets() for c in fig.axes[0].collections}
    assert sorted(points["source:toy-a"][:, 1].tolist()) == [0.1, 0.2]
    assert sorted(points["control:toy-a"][:, 1].tolist()) == [0.0, 0.01]
    a, b = _circuit(), _circuit(profile_shift=0.05)
    configurational = circuit_tables.configurational_table(
        _heads({"r1": ("toy-a", 1, 100), "r2": ("toy-a", 2, 100)}),
        {("r1", 1000): a, ("r2", 1000): b},
    )
    fig = figures.plot_configurational(configurational, tmp_path / "conf.png")
    image = fig.axes[0].get_images()[0].get_array()
    # The cell is the contrast with the null: z of the observed similarity.
    first = configurational.iloc[0]
    assert (first["run_a"], first["run_b"]) == ("r1", "r2")
    assert image[0, 1] == pytest.approx(first["qk_spectrum_z"])
    assert np.ma.is_masked(image[0, 0])  # the diagonal: no self-comparison


def test_detail_step_scores_every_declared_composition_kind(model, sentences, monkeypatch) -> None:
    # A catalog that declared a V-composition link: the detail step saves v_* next to k_*,
    # each equal to composition_scores of that kind, and K unchanged by the extra kind.
    from mechgen.scoring.relational import composition_scores

    torch.set_num_threads(1)
    monkeypatch.setattr(circuit, "composition_kinds", lambda: ("K", "V"))
    settings = circuit.CircuitSettings(
        n_sequences=3,
        half_length=4,
        token_hi=VOCAB,
        batch_size=2,
        detail=True,
        n_baseline=10,
        n_random_heads=1,
        cka_max_tokens=20,
        max_offset=2,
    )
    with circuit.ride_along(model, settings) as ride:
        one_back = metrics.score_heads(model, sentences, batch_size=4)
    result = circuit.score_circuit(model, one_back, ride, settings, sentences)
    for kind in ("K", "V"):
        direct = composition_scores(model, (kind,), n_baseline=10)[kind]
        prefix = kind.lower()
        np.testing.assert_allclose(
            result.arrays[f"{prefix}_composition"], direct.score, equal_nan=True
        )
        np.testing.assert_allclose(
            result.arrays[f"{prefix}_baseline_sd"], direct.baseline_sd, equal_nan=True
        )
    assert "q_composition" not in result.arrays


def test_configurational_table_of_another_mechanisms_strongest_heads() -> None:
    from mechgen.mechanisms import NullContext, get
    from mechgen.stats import crossmech

    heads = _heads({"r1": ("toy-a", 1, 100), "r2": ("toy-a", 2, 100)})
    a, b = _circuit(profile_shift=0.1), _circuit(factors_seed=1)
    b.record["cka_tokens_sha256"] = a.record["cka_tokens_sha256"] = "same"
    circuits = {("r1", 1000): a, ("r2", 1000): b}
    default = circuit_tables.configurational_table(heads, circuits, n_null=50)
    # Naming the stored strongest 1-back heads reproduces the default table exactly.
    same = circuit_tables.configurational_table(
        heads, circuits, n_null=50, strongest={("r1", 1000): (0, 1), ("r2", 1000): (0, 1)}
    )
    pd.testing.assert_frame_equal(default, same)
    # The induction mechanism's strongest head at the compared step, from the per-head table.
    scored = crossmech.scored_heads(
        heads, get("induction"), NullContext(settings={"half_length": 10})
    ).heads
    strongest = crossmech.strongest_at(scored, circuit_tables.configurational_steps(circuits))
    at_step = heads[heads["step"] == 1000]
    for run in ("r1", "r2"):
        best = (
            at_step[at_step["run"] == run]
            .sort_values(["induction", "layer", "head"], ascending=[False, True, True])
            .iloc[0]
        )
        assert strongest[(run, 1000)] == (int(best["layer"]), int(best["head"]))
    table = circuit_tables.configurational_table(heads, circuits, n_null=50, strongest=strongest)
    row = table[table["run_a"] == "r1"].iloc[0]
    (la, ha), (lb, hb) = strongest[("r1", 1000)], strongest[("r2", 1000)]
    assert (row["layer_a"], row["head_a"], row["layer_b"], row["head_b"]) == (la, ha, lb, hb)
    expected = np.corrcoef(a.arrays["offset_profile"][la, ha], b.arrays["offset_profile"][lb, hb])
    assert row["profile_similarity"] == pytest.approx(expected[0, 1])
    # This file saved no outputs of the strongest induction head: no CKA for it, and why.
    assert math.isnan(row["cka"]) and row["cka_note"] == "no outputs saved for this head"
    # The profile takes each mechanism's own mean profile z.
    profile = pd.DataFrame(
        [{"mechanism": "induction", "model": "all", "size": "all", "scored": True}]
    ).assign(configurational_z=np.nan)
    filled = crossmech.with_configurational_z(profile, {"induction": table})
    assert filled["configurational_z"].iloc[0] == pytest.approx(table["profile_z"].mean())
