"""Successor heads and copy suppression/copying (mechgen.mechanisms.successor,
copy_suppression; model side mechgen.model.weight_scores): hand-worked scores, the exact chance
level, the real Pythia tokenizer's single-token items, and planted heads with known answers."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from mechgen.mechanisms import NullContext, copy_suppression, get, successor
from mechgen.model.weight_scores import WEIGHT_COLUMNS, WeightTasks, score_weight_mechanisms

PYTHIA_TOKENIZER = Path(__file__).parent / "data" / "pythia-tokenizer" / "tokenizer.json"


def pythia_encode():
    tokenizer = Tokenizer.from_file(str(PYTHIA_TOKENIZER))
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


# ------------------------------------------------------------------ task data


def test_pythia_tokenizer_keeps_single_token_items_with_a_leading_space() -> None:
    encode = pythia_encode()
    record = successor.task_token_ids(encode)
    tasks = record["tasks"]
    for word, task in ((" one", "number_words"), (" Monday", "days"), (" January", "months")):
        (token,) = encode(word)
        assert tasks[task]["token_ids"][tasks[task]["items"].index(word.strip())] == token
    assert len(tasks["days"]["items"]) == 7 and len(tasks["months"]["items"]) == 12
    assert tasks["numbers"]["items"] == [str(n) for n in range(1, 101)]
    # Roman numerals that the BPE splits are dropped and listed, with their ids.
    dropped = {d["item"]: d["token_ids"] for d in tasks["roman_numerals"]["dropped"]}
    assert set(dropped) == {"XIV", "XVI", "XVII", "XVIII", "XIX"}
    assert all(len(encode(" " + item)) > 1 for item in dropped)
    assert dropped["XIX"] == encode(" XIX")
    # XIII -> XIV -> XV loses both pairs; XV -> XX keeps none across the gap
    items = tasks["roman_numerals"]["items"]
    pairs = {(items[i], items[j]) for i, j in tasks["roman_numerals"]["pairs"]}
    assert ("XIII", "XV") not in pairs and ("XII", "XIII") in pairs and ("XV", "XX") not in pairs
    assert len(pairs) == 12
    assert record["dropped_tasks"] == {}


def test_task_record_is_deterministic_and_its_sha256_checks() -> None:
    encode = pythia_encode()
    first, second = successor.task_token_ids(encode), successor.task_token_ids(encode)
    assert first == second and len(first["sha256"]) == 64
    successor.check_task_record(first)
    first["tasks"]["days"]["token_ids"][0] += 1
    with pytest.raises(ValueError, match="sha256"):
        successor.check_task_record(first)


def test_a_task_without_enough_single_token_items_is_dropped_whole() -> None:
    vocab = {" a": [1], " b": [2], " c": [3, 4], " d": [5], " e": [6], " f": [7]}
    record = successor.task_token_ids(
        vocab.__getitem__, tasks={"short": ("a", "b", "c"), "ok": ("a", "b", "d", "e", "f")}
    )
    assert set(record["tasks"]) == {"ok"}
    assert "short" in record["dropped_tasks"] and "'c'" in record["dropped_tasks"]["short"]
    assert record["tasks"]["ok"]["pairs"] == [[0, 1], [1, 2], [2, 3], [3, 4]]


# ------------------------------------------------------------------ scores on logits


def test_successor_score_is_a_mean_over_tasks_not_pairs() -> None:
    record = {
        "tasks": {
            "big": {"items": list("abcde"), "pairs": [[0, 1], [1, 2], [2, 3], [3, 4]]},
            "small": {"items": list("xyz"), "pairs": [[0, 1], [1, 2]]},
        }
    }
    big = np.zeros((5, 5))
    for s, t in [(0, 1), (1, 2), (2, 3), (3, 4)]:
        big[s, t] = 1.0  # 4/4 hits
    small = np.zeros((3, 3))
    small[0, 1] = 1.0  # x -> y hit; y -> z: all zero, a tie for the top, a miss
    scores = successor.successor_scores({"big": big, "small": small}, record)
    assert scores["successor"] == pytest.approx((1.0 + 0.5) / 2)  # pairs would give 5/6
    assert scores["successor_chance"] == pytest.approx((1 / 5 + 1 / 3) / 2)
    assert scores["successor_permuted"] == pytest.approx(0.0)  # a derangement never hits


def test_chance_level_is_exact_over_relabellings_of_the_candidates() -> None:
    """Averaged over the n cyclic relabellings of a task's candidates, the hit rate of any
    tie-free head is exactly 1/n (each relabelling makes a different candidate the target)."""
    rng = np.random.default_rng(3)
    n = 6
    logits = rng.normal(size=(n, n))
    pairs = np.array([[i, i + 1] for i in range(n - 1)])
    rates = [
        successor.top1_hits(
            logits[:, np.roll(np.arange(n), shift)], pairs[:, 0], pairs[:, 1]
        ).mean()
        for shift in range(n)
    ]
    assert np.mean(rates) == pytest.approx(1 / n)


def test_permuted_targets_is_a_seeded_derangement() -> None:
    for n in (2, 3, 11, 99):
        perm = successor.permuted_targets(n)
        assert sorted(perm) == list(range(n)) and not np.any(perm == np.arange(n))
        assert np.array_equal(perm, successor.permuted_targets(n))


def test_copy_scores_hand_worked() -> None:
    k = 4
    identity = np.eye(k)
    assert copy_suppression.copy_scores(identity)["copying"] == pytest.approx(1.0)
    assert copy_suppression.copy_scores(-identity)["copy_suppression"] == pytest.approx(1.0)
    assert copy_suppression.copy_scores(np.zeros((k, k)))["copying"] == pytest.approx(0.5)
    # source 0's own logit has 1 above, 2 below; sources 1..3 are the lowest (rank 3/3)
    logits = np.array(
        [[2.0, 3.0, 1.0, 0.0], [9, -9, 0, 0], [9, 0, -9, 0], [9, 0, 0, -9]], dtype=float
    )
    expected = (1 / 3 + 1 + 1 + 1) / 4
    assert copy_suppression.copy_scores(logits)["copy_suppression"] == pytest.approx(expected)
    # a permutation of the candidates puts the own token at a uniform rank: mean 0.5 exactly
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(k, k))
    means = [
        copy_suppression.copy_scores(logits[:, list(p)])["copying"]
        for p in itertools.permutations(range(k))
    ]
    assert np.mean(means) == pytest.approx(copy_suppression.RANDOM_RANK_NULL)


def test_frequent_tokens_by_count_then_id() -> None:
    ids = [[5, 5, 3, 9], [9, 3, 3, 7], [5]]
    assert copy_suppression.frequent_tokens(ids, 3) == [3, 5, 9]
    assert copy_suppression.frequent_tokens(ids, 10) == [3, 5, 9, 7]


def test_nulls_and_criteria_from_the_table() -> None:
    table = pd.DataFrame(
        {
            "run": ["r1", "r1", "r2"],
            "successor": [0.9, 0.1, 0.5],
            "successor_permuted": [0.0, 0.1, 0.4],
            "successor_chance": [0.1, 0.1, 0.2],
            "copy_suppression": [0.95, 0.5, 0.2],
        }
    )
    mech = get("successor")
    null = mech.null(table, NullContext()).reindex(table["run"]).to_numpy()
    assert list(null) == [0.1, 0.1, 0.2]
    met = mech.meets_criterion(table["successor"], null, table["successor_permuted"])
    assert list(met) == [True, False, False]  # r2: 0.5 >= 0.4 but its permuted control 0.4
    imported = mech.null(table.drop(columns="successor_chance"), NullContext())
    assert list(imported.index) == ["r1", "r2"] and imported.isna().all()
    cs = get("copy_suppression")
    cs_null = cs.null(table, NullContext()).reindex(table["run"]).to_numpy()
    assert list(cs.meets_criterion(table["copy_suppression"], cs_null)) == [True, False, False]


# ------------------------------------------------------------------ planted heads

N_HEADS, D_MODEL, VOCAB = 4, 64, 16
HEAD_DIM = D_MODEL // N_HEADS
WORDS = {f" {w}": [i + 2] for i, w in enumerate("abcdefghijk")} | {" z": [14, 15]}
PLANTED_TASKS = {"first": tuple("abcdef"), "second": tuple("ghijk") + ("z",)}


def planted_model(record: dict) -> GPTNeoXForCausalLM:
    """Layer 0: head 0 maps each task token to its successor, head 1 copies every token,
    head 2 suppresses it (-identity), head 3 maps each pair's source to the derangement's
    target; layer 1 writes nothing. Embedding rows u_t and unembedding rows w_t are orthonormal
    and centred, MLP0 writes zero, every layernorm gain is 1 and every bias random (the scores
    leave biases out)."""
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        num_hidden_layers=2,
        num_attention_heads=N_HEADS,
        intermediate_size=8,
        max_position_embeddings=16,
        tie_word_embeddings=False,
        use_parallel_residual=True,
        attention_bias=True,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).eval()
    centred = torch.eye(D_MODEL) - 1 / D_MODEL
    basis = torch.linalg.qr(centred @ torch.randn(D_MODEL, 2 * VOCAB)).Q  # centred, orthonormal
    u, w = basis[:, :VOCAB].T, basis[:, VOCAB:].T  # [VOCAB, d] each
    maps = {h: {} for h in range(N_HEADS)}  # head -> {source id: (target id, sign)}
    for task in record["tasks"].values():
        ids, pairs = task["token_ids"], np.asarray(task["pairs"])
        derangement = pairs[successor.permuted_targets(len(pairs)), 1]
        for (s, t), t_perm in zip(pairs, derangement, strict=True):
            maps[0][ids[s]] = (ids[t], 1.0)
            maps[3][ids[s]] = (ids[t_perm], 1.0)
    for token in range(VOCAB):
        maps[1][token] = (token, 1.0)
        maps[2][token] = (token, -1.0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter))
        body = model.gpt_neox
        body.embed_in.weight.copy_(u)
        model.get_output_embeddings().weight.copy_(w)
        for layer in body.layers:
            for ln in (layer.input_layernorm, layer.post_attention_layernorm):
                ln.weight.fill_(1.0)
            layer.mlp.dense_4h_to_h.weight.zero_()
            layer.mlp.dense_4h_to_h.bias.zero_()
            layer.attention.dense.weight.zero_()
        body.final_layer_norm.weight.fill_(1.0)
        fused = body.layers[0].attention.query_key_value.weight.view(N_HEADS, 3, HEAD_DIM, D_MODEL)
        dense = body.layers[0].attention.dense.weight.view(D_MODEL, N_HEADS, HEAD_DIM)
        for head, mapping in maps.items():
            for slot, (source, (target, sign)) in enumerate(sorted(mapping.items())):
                fused[head, 2, slot] = u[source]
                dense[:, head, slot] = sign * w[target]
    return model


def test_planted_heads_score_their_known_answers() -> None:
    record = successor.task_token_ids(WORDS.__getitem__, tasks=PLANTED_TASKS)
    assert record["tasks"]["second"]["dropped"] == [{"item": "z", "token_ids": [14, 15]}]
    copy_ids = tuple(range(2, 14))  # 12 tokens: within the head dimension of 16
    tasks = WeightTasks(successor=record, copy_token_ids=copy_ids)
    frame = score_weight_mechanisms(planted_model(record), tasks).set_index(["layer", "head"])
    assert list(frame.columns) == WEIGHT_COLUMNS
    chance = (1 / 6 + 1 / 5) / 2
    assert frame["successor_chance"].to_numpy() == pytest.approx(np.full(len(frame), chance))
    # the copying head hits a permuted pair exactly where the permuted target is the source
    copy_hits_permuted = np.mean(
        [
            np.mean(pairs[successor.permuted_targets(len(pairs)), 1] == pairs[:, 0])
            for pairs in (np.asarray(t["pairs"]) for t in record["tasks"].values())
        ]
    )
    expected = {  # (layer, head): successor, successor_permuted, copy_suppression, copying
        (0, 0): (1.0, 0.0, None, None),
        (0, 1): (0.0, copy_hits_permuted, 0.0, 1.0),
        (0, 2): (None, None, 1.0, 0.0),  # the rest of its logits tie up to rounding
        (0, 3): (0.0, 1.0, None, None),
    }
    for head, (succ, perm, supp, copying) in expected.items():
        row = frame.loc[head]
        if succ is not None:
            assert row["successor"] == pytest.approx(succ), head
            assert row["successor_permuted"] == pytest.approx(perm), head
        if supp is not None:
            assert row["copy_suppression"] == pytest.approx(supp), head
            assert row["copying"] == pytest.approx(copying), head
    # layer 1 writes nothing: every logit ties, so no successor hit and the copy rank is the null
    layer1 = frame.loc[1]
    assert (layer1["successor"] == 0).all()
    assert layer1["copy_suppression"].to_numpy() == pytest.approx(copy_suppression.RANDOM_RANK_NULL)


def test_a_run_whose_tokenizer_keeps_no_task_is_not_formed() -> None:
    split = {f" {w}": [2, 3] for w in "abcdefghijk"} | {" z": [14, 15]}
    record = successor.task_token_ids(split.__getitem__, tasks=PLANTED_TASKS)
    assert record["tasks"] == {} and set(record["dropped_tasks"]) == {"first", "second"}
    frame = score_weight_mechanisms(
        planted_model({"tasks": {}}), WeightTasks(successor=record, copy_token_ids=(2, 3, 4))
    )
    assert frame["successor"].isna().all() and frame["successor_chance"].isna().all()
    mech = get("successor")
    null = mech.null(frame.assign(run="r"), NullContext()).iloc[0]
    assert not mech.meets_criterion(frame["successor"], null, frame["successor_permuted"]).any()


# ------------------------------------------------------------------ the scoring job


def test_scoring_job_adds_the_weight_columns_and_caches_them(tmp_path: Path, monkeypatch) -> None:
    """score_checkpoint with weight tasks: the columns equal an independent
    score_weight_mechanisms on the checkpoint loaded by transformers, the sidecar records the
    tasks, and a byte-identical checkpoint reads them from the score cache (no forward pass)."""
    from support.fakehub import save_random_checkpoint, tiny_gpt_neox_config

    from mechgen.config import Run
    from mechgen.scoring import metrics
    from mechgen.scoring.job import score_checkpoint

    run_dir = tmp_path / "tiny-a-seed1"
    save_random_checkpoint(run_dir / "step0", tiny_gpt_neox_config(), seed=1)
    (run_dir / "step1").mkdir()
    for path in (run_dir / "step0").iterdir():
        (run_dir / "step1" / path.name).write_bytes(path.read_bytes())
    run = Run("mine", run_dir.name, "tiny-a", "a", 1, "local", str(run_dir))
    token_ids = [[5, 17, 99, 3, 250, 7, 8], [11, 12, 5, 5], [200, 201, 3]]
    record = successor.task_token_ids(WORDS.__getitem__, tasks=PLANTED_TASKS)
    tasks = WeightTasks.from_eval_tokens({"token_ids": token_ids, "successor_tasks": record})
    assert tasks.copy_token_ids[:2] == (5, 3)  # by count, then id

    def score(step: int, **kwargs):
        return score_checkpoint(
            run, step, token_ids, tokens_per_step=10, score_cache_dir=tmp_path / "cache", **kwargs
        )

    table, sidecar = score(0, weight_tasks=tasks)
    model = GPTNeoXForCausalLM.from_pretrained(str(run_dir / "step0"), attn_implementation="eager")
    expected = score_weight_mechanisms(model, tasks)
    pd.testing.assert_frame_equal(
        table[["layer", "head", *WEIGHT_COLUMNS]].reset_index(drop=True), expected
    )
    assert sidecar["weight_mechanisms"] == tasks.record()
    assert sidecar["weight_mechanisms"]["effective_embedding"] == "neox"
    assert sidecar["weight_mechanisms"]["successor_dropped_items"] == {"second": ["z"]}

    calls = []
    real = metrics.score_heads
    monkeypatch.setattr(metrics, "score_heads", lambda *a, **k: calls.append(1) or real(*a, **k))
    hit, hit_sidecar = score(1, weight_tasks=tasks)
    assert hit_sidecar["score_cache"]["hit"] and not calls
    pd.testing.assert_frame_equal(
        hit[WEIGHT_COLUMNS].reset_index(drop=True), table[WEIGHT_COLUMNS].reset_index(drop=True)
    )
    # without weight tasks the key differs (no hit) and the columns are absent
    plain, plain_sidecar = score(1)
    assert not plain_sidecar["score_cache"]["hit"] and calls
    assert not set(WEIGHT_COLUMNS) & set(plain.columns)
    assert "weight_mechanisms" not in plain_sidecar


def test_per_block_scores_equal_the_scores_of_the_full_logit_matrix() -> None:
    """score_weight_mechanisms (head outputs once per layer, logits per block) equals the
    mechanism scores of each block cut from ov_logits over all tokens, on a random model."""
    from support.fakehub import tiny_gpt_neox_config

    from mechgen.model.weight_scores import ov_logits

    torch.manual_seed(4)
    model = GPTNeoXForCausalLM(tiny_gpt_neox_config()).eval()
    record = successor.task_token_ids(WORDS.__getitem__, tasks=PLANTED_TASKS)
    tasks = WeightTasks(successor=record, copy_token_ids=(40, 2, 7, 300, 11))
    frame = score_weight_mechanisms(model, tasks)
    ids = list(range(320))
    full = ov_logits(model, ids, ids).double().numpy()

    def block(token_ids):
        return full[:, :, token_ids][:, :, :, token_ids]

    expected = successor.successor_scores(
        {name: block(task["token_ids"]) for name, task in record["tasks"].items()}, record
    )
    expected.update(copy_suppression.copy_scores(block(list(tasks.copy_token_ids))))
    for column in WEIGHT_COLUMNS:
        want = np.broadcast_to(expected[column], full.shape[:2]).reshape(-1)
        np.testing.assert_allclose(frame[column].to_numpy(), want, err_msg=column)
