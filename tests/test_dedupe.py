"""Identical weight blobs are scored once: the score cache of mechgen.scoring.job.

Pythia branches such as ``step0`` and ``step1`` can hold byte-identical weights. The fake hub
(tests/support/fakehub.py, on 127.0.0.1, reached by huggingface_hub through its endpoint constants)
serves ``step0`` and ``step1`` with the same ``model.safetensors`` and ``step1000`` with other
weights; the tests count the GETs it answers and the forward passes (calls of
``mechgen.scoring.metrics.score_heads``) to show that a duplicate costs neither, and compare its rows
with the original's.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import; the fake hub switches it off

import numpy as np
import pandas as pd
import pytest
import torch
from support.fakehub import (
    FakeHub,
    save_random_checkpoint,
    tiny_gpt_neox_config,
    train_tiny_tokenizer,
)
from support.offline_hub import build_offline_cache

from mechgen.config import Run
from mechgen.schema import ATTENTION_METRICS, HEAD_COLUMNS
from mechgen.scoring import job as scoring
from mechgen.scoring import metrics
from mechgen.scoring.job import (
    ScoreCache,
    score_cache_key,
    score_checkpoint,
    token_ids_sha256,
    write_result,
)
from mechgen.tables.aggregate import concat_head_tables, read_sidecars

torch.set_num_threads(1)

REPO = "EleutherAI/pythia-14m-seed1"
TOKENS_PER_STEP = 1000
# Sentences of different lengths, so padding and batch composition matter to the forward pass.
TOKEN_IDS = [
    [5, 17, 99, 3, 250, 7, 8],
    [11, 12],
    [200, 201, 202, 203, 1, 2, 3, 4, 5, 6, 7],
    [9, 9, 9, 30],
]
SCORE_HEADS = (
    metrics.score_heads
)  # the real one, for independent computations (tests count the patched one)


def _hf_run() -> Run:
    return Run("pythia", "pythia-14m-seed1", "pythia-14m", "14m", 1, "hf", REPO)


def _local_run(run_dir: Path) -> Run:
    return Run("mine", run_dir.name, "tiny-a", "a", 1, "local", str(run_dir))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """``<root>/run/step{0,1,1000}``: step1 is a byte copy of step0, step1000 other weights."""
    root = tmp_path_factory.mktemp("dedupe")
    tokenizer = train_tiny_tokenizer(root / "tokenizer")
    config = tiny_gpt_neox_config()
    run_dir = root / "tiny-a-seed1"
    save_random_checkpoint(run_dir / "step0", config, seed=1, tokenizer_dir=tokenizer)
    save_random_checkpoint(run_dir / "step1000", config, seed=2, tokenizer_dir=tokenizer)
    (run_dir / "step1").mkdir()
    for path in (run_dir / "step0").iterdir():
        (run_dir / "step1" / path.name).write_bytes(path.read_bytes())
    return {"root": root, "run_dir": run_dir, "tokenizer": tokenizer}


@pytest.fixture
def hub(checkpoints, tmp_path, monkeypatch):
    """The fake hub serving REPO's step0/step1/step1000; huggingface_hub of this process pointed
    at it, online, with its cache in tmp. Yields the hub."""
    import huggingface_hub.constants as hf_constants

    run_dir = checkpoints["run_dir"]
    fake = FakeHub(max_seconds=120)
    fake.add_checkpoints(
        tmp_path / "server",
        REPO,
        {name: run_dir / name for name in ("step0", "step1", "step1000")},
        tokenizer_dir=checkpoints["tokenizer"],
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "client" / "hub"))
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    with fake, fake.patched_huggingface_hub():
        yield fake


@pytest.fixture
def forward_passes(monkeypatch) -> list[int]:
    """Counts calls of mechgen.scoring.metrics.score_heads (the forward pass of a scoring job)."""
    calls: list[int] = []
    real = metrics.score_heads

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics, "score_heads", counting)
    return calls


def _score(run: Run, step: int, cache_dir: Path, **kwargs):
    kwargs.setdefault("batch_size", 16)
    return score_checkpoint(
        run, step, TOKEN_IDS, tokens_per_step=TOKENS_PER_STEP, score_cache_dir=cache_dir, **kwargs
    )


def _independent_scores(
    step_dir: Path, batch_size: int = 1, clipped_window: int = 8
) -> pd.DataFrame:
    """Scores computed outside mechgen.sources.checkpoints/scoring: transformers loads the folder directly."""
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(str(step_dir), attn_implementation="eager")
    return SCORE_HEADS(model, TOKEN_IDS, batch_size=batch_size, clipped_window=clipped_window)


def _weight_gets(fake: FakeHub) -> int:
    return fake.count("GET", "model.safetensors", status=200)


def test_duplicate_branch_costs_no_download_and_no_forward_pass(
    hub, checkpoints, tmp_path, forward_passes
):
    cache_dir = tmp_path / "score_cache"
    first, first_sidecar = _score(_hf_run(), 0, cache_dir)
    assert first_sidecar["status"] == "ok" and "duplicate_of" not in first_sidecar
    assert first_sidecar["weights_downloaded"] and not first_sidecar["score_cache"]["hit"]
    assert _weight_gets(hub) == 1 and len(forward_passes) == 1

    second, second_sidecar = _score(_hf_run(), 1, cache_dir)
    assert _weight_gets(hub) == 1, "the duplicate branch downloaded its weights"
    assert len(forward_passes) == 1, "the duplicate branch ran a forward pass"
    # Its metadata was asked for (that is how the duplicate is recognised), pinned to its commit.
    step1_commit = second_sidecar["commit"]
    assert hub.count("HEAD", "model.safetensors", revision=step1_commit) == 1
    assert step1_commit != first_sidecar["commit"]
    assert second_sidecar["status"] == "ok"
    assert (
        second_sidecar["duplicate_of"] == "step0"
        and second_sidecar["duplicate_of_run"] == "pythia-14m-seed1"
    )
    assert second_sidecar["sha256"] == first_sidecar["sha256"]
    assert second_sidecar["score_cache"]["hit"] and not second_sidecar["weights_downloaded"]
    assert second_sidecar["n_sentences"] == first_sidecar["n_sentences"] == len(TOKEN_IDS)

    # Rows: the original's, except the step and tokens seen.
    assert list(second.columns) == list(first.columns) == HEAD_COLUMNS
    assert (second["step"] == 1).all() and (second["tokens_seen"] == TOKENS_PER_STEP).all()
    assert (first["step"] == 0).all() and (first["tokens_seen"] == 0).all()
    same = [c for c in HEAD_COLUMNS if c not in ("step", "tokens_seen")]
    pd.testing.assert_frame_equal(second[same], first[same])
    # ... and the original's values are right: an independent load and scoring of step0.
    expected = _independent_scores(checkpoints["run_dir"] / "step0")
    np.testing.assert_allclose(
        first[ATTENTION_METRICS].to_numpy(),
        expected[ATTENTION_METRICS].to_numpy(),
        rtol=1e-6,
        atol=1e-9,
    )

    # Other weights are not a duplicate: downloaded and scored.
    third, third_sidecar = _score(_hf_run(), 1000, cache_dir)
    assert _weight_gets(hub) == 2 and len(forward_passes) == 2
    assert "duplicate_of" not in third_sidecar and not third_sidecar["score_cache"]["hit"]
    assert not np.allclose(third["one_back"], first["one_back"])

    # The aggregate still has one row per (run, step, layer, head), and the duplicate is named.
    paths = []
    for step, (table, sidecar) in {
        0: (first, first_sidecar),
        1: (second, second_sidecar),
        1000: (third, third_sidecar),
    }.items():
        write_result(
            table, sidecar, tmp_path / f"step{step}.parquet", tmp_path / f"step{step}.json"
        )
        paths.append(tmp_path / f"step{step}.parquet")
    heads = concat_head_tables(paths)
    assert len(heads) == 3 * 2 * 4
    assert not heads.duplicated(["run", "step", "layer", "head"]).any()
    jobs = read_sidecars([p.with_suffix(".json") for p in paths]).set_index("step")
    assert jobs.loc[1, "duplicate_of"] == "step0" and jobs.loc[0, "duplicate_of"] == ""
    # Weights are streamed: nothing of either blob is left in the client cache.
    leftovers = [
        p for p in (tmp_path / "client").rglob("*") if p.is_file() and p.stat().st_size > 50_000
    ]
    assert leftovers == []


def test_cache_key_ignores_batch_size_but_not_window_or_tokens(
    checkpoints, tmp_path, forward_passes
):
    run = _local_run(checkpoints["run_dir"])
    cache_dir = tmp_path / "score_cache"
    base, _ = _score(run, 0, cache_dir, batch_size=4)
    assert len(forward_passes) == 1

    # Another batch size: a cache hit (same key), and rightly so: scoring afresh with batch size
    # 1 (no padding at all) gives the same values to float rounding.
    other_batch, sidecar = _score(run, 0, cache_dir, batch_size=1)
    assert sidecar["score_cache"]["hit"] and len(forward_passes) == 1
    pd.testing.assert_frame_equal(other_batch, base)
    fresh = _independent_scores(checkpoints["run_dir"] / "step0", batch_size=1)
    np.testing.assert_allclose(
        base[ATTENTION_METRICS].to_numpy(),
        fresh[ATTENTION_METRICS].to_numpy(),
        rtol=1e-5,
        atol=1e-7,
    )

    # Another clipped window changes clipped_distance: a miss, scored again.
    other_window, sidecar = _score(run, 0, cache_dir, clipped_window=2)
    assert not sidecar["score_cache"]["hit"] and len(forward_passes) == 2
    assert not np.allclose(other_window["clipped_distance"], base["clipped_distance"])
    np.testing.assert_allclose(other_window["one_back"], base["one_back"], rtol=1e-6)

    # Other token ids: a miss.
    assert token_ids_sha256(TOKEN_IDS[:-1]) != token_ids_sha256(TOKEN_IDS)
    _, sidecar = score_checkpoint(
        run, 0, TOKEN_IDS[:-1], tokens_per_step=TOKENS_PER_STEP, score_cache_dir=cache_dir
    )
    assert not sidecar["score_cache"]["hit"] and len(forward_passes) == 3

    # A local byte-identical copy (step1) is a duplicate too: the key is the content hash.
    _, sidecar = _score(run, 1, cache_dir, batch_size=4)
    assert sidecar["duplicate_of"] == "step0" and len(forward_passes) == 3


def test_cache_key_fields():
    fields_a = score_cache_key("a" * 64, "c" * 64, "t" * 64, 8, {"torch": "1", "transformers": "2"})
    assert fields_a == score_cache_key(
        "a" * 64, "c" * 64, "t" * 64, 8, {"torch": "1", "transformers": "2"}
    )
    for changed in (
        ("b" * 64, "c" * 64, "t" * 64, 8, {"torch": "1", "transformers": "2"}),
        ("a" * 64, "d" * 64, "t" * 64, 8, {"torch": "1", "transformers": "2"}),
        ("a" * 64, "c" * 64, "u" * 64, 8, {"torch": "1", "transformers": "2"}),
        ("a" * 64, "c" * 64, "t" * 64, 4, {"torch": "1", "transformers": "2"}),
        ("a" * 64, "c" * 64, "t" * 64, 8, {"torch": "1", "transformers": "3"}),
    ):
        assert score_cache_key(*changed)[0] != fields_a[0]


def test_cache_key_holds_the_scored_mechanisms_versions(monkeypatch):
    """Bumping the catalog version of a mechanism an entry holds changes its key; the circuit
    mechanisms count only when the circuit scores are in the entry."""
    import dataclasses

    from mechgen import mechanisms
    from mechgen.scoring import job as scoring

    args = ("a" * 64, "c" * 64, "t" * 64, 8, {"torch": "1", "transformers": "2"})
    key, fields = score_cache_key(*args)
    assert fields["mechanisms"] == {"previous_token": 1, "locality": 1}
    circuit_key, circuit_fields = score_cache_key(*args, circuit={"n_sequences": 5})
    assert circuit_fields["mechanisms"] == {
        "previous_token": 1, "locality": 1, "induction": 1, "duplicate_token": 1,
        "in_context_retrieval": 1,
    }  # fmt: skip
    bumped = {
        name: dataclasses.replace(m, version=m.version + 1) if name == "duplicate_token" else m
        for name, m in mechanisms.catalog().items()
    }
    monkeypatch.setattr(scoring, "get_mechanism", bumped.__getitem__)
    assert score_cache_key(*args)[0] == key  # not in the sentence-pass entry
    assert score_cache_key(*args, circuit={"n_sequences": 5})[0] != circuit_key
    assert score_cache_key(*args, mechanisms={"previous_token": 1, "locality": 1})[0] == key


def test_config_hash_ignores_bookkeeping_keys(checkpoints, tmp_path):
    config = json.loads((checkpoints["run_dir"] / "step0" / "config.json").read_text())
    (tmp_path / "a.json").write_text(json.dumps(config))
    (tmp_path / "b.json").write_text(
        json.dumps({**config, "transformers_version": "0.0.1"}, indent=4)
    )
    (tmp_path / "c.json").write_text(json.dumps({**config, "rotary_pct": 0.5}))
    assert scoring.model_config_sha256(tmp_path / "a.json") == scoring.model_config_sha256(
        tmp_path / "b.json"
    )
    assert scoring.model_config_sha256(tmp_path / "a.json") != scoring.model_config_sha256(
        tmp_path / "c.json"
    )


def test_two_concurrent_jobs_with_the_same_weights(hub, tmp_path, forward_passes):
    """step0 and step1 at the same time: the blob lock makes one wait and reuse the other's score."""
    # Slow the download down so that both jobs are surely in flight together.
    hub.bytes_per_s = 400_000
    cache_dir = tmp_path / "score_cache"
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def job(step: int) -> None:
        try:
            results[step] = _score(_hf_run(), step, cache_dir)
        except BaseException as err:  # noqa: BLE001 - surfaced by the assert below
            errors.append(err)

    threads = [threading.Thread(target=job, args=(step,)) for step in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert _weight_gets(hub) == 1 and len(forward_passes) == 1
    hits = sorted(results[step][1]["score_cache"]["hit"] for step in (0, 1))
    assert hits == [False, True]
    duplicate = next(s for s in (0, 1) if results[s][1]["score_cache"]["hit"])
    assert results[duplicate][1]["duplicate_of"] == f"step{1 - duplicate}"
    pd.testing.assert_frame_equal(
        results[0][0].drop(columns=["step", "tokens_seen"]),
        results[1][0].drop(columns=["step", "tokens_seen"]),
    )
    assert [p.name for p in cache_dir.iterdir() if p.suffix == ".tmp"] == []


def test_offline_cache_duplicates_are_recognised_by_blob_name(
    checkpoints, tmp_path, monkeypatch, forward_passes
):
    """Offline, the sha256 is the cache's blob name: no hashing or loading for the duplicate."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    run_dir = checkpoints["run_dir"]
    build_offline_cache(cache, REPO, {"step0": run_dir / "step0", "step1": run_dir / "step1"})
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    cache_dir = tmp_path / "score_cache"
    _score(_hf_run(), 0, cache_dir, delete_weights=False)
    _, second = _score(_hf_run(), 1, cache_dir, delete_weights=False)
    assert second["duplicate_of"] == "step0" and len(forward_passes) == 1


def test_damaged_cache_entry_is_a_miss(checkpoints, tmp_path, forward_passes):
    run = _local_run(checkpoints["run_dir"])
    cache_dir = tmp_path / "score_cache"
    table, sidecar = _score(run, 0, cache_dir)
    entry = Path(sidecar["score_cache"]["path"])
    assert ScoreCache(cache_dir).get(sidecar["score_cache"]["key"]) is not None
    entry.write_bytes(entry.read_bytes()[:100])
    again, sidecar = _score(run, 0, cache_dir)
    assert not sidecar["score_cache"]["hit"] and len(forward_passes) == 2
    pd.testing.assert_frame_equal(again, table)
    assert ScoreCache(cache_dir).get(sidecar["score_cache"]["key"]) is not None  # rewritten whole
