"""The toy GPT-2 family on the data side: trained by mechgen.sources.toy with ``architecture="gpt2"``, saved
with ``checkpoint-N`` revisions, and served through the offline Hugging Face cache and the fake
hub so that the real ``hf`` download code (huggingface_hub, revision="checkpoint-N") fetches GPT-2
weights and names. Every check compares with an independent reading of the saved files.

The end-to-end test scores a revision through the GPT-2 architecture adapter (mechgen/model/).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support.fakehub import FakeHub
from support.offline_hub import build_offline_cache, run_revisions

from mechgen.config import Run
from mechgen.sources import toy, toytext
from mechgen.sources.checkpoints import (
    MissingCheckpoint,
    fetch_checkpoint,
    fetch_tokenizer,
    release,
    resolve_checkpoint,
)
from mechgen.sources.hubcache import file_sha256, repo_cache_dir
from mechgen.sources.toy_tokenizer import train_tokenizer

VOCAB = 512
SIZE = {"n_layers": 2, "n_heads": 2, "d_model": 32}
TRAINING = {
    "steps": 6,
    "batch_size": 2,
    "seq_len": 16,
    "learning_rate": 3e-3,
    "warmup_steps": 2,
    "weight_decay": 0.01,
}
SCHEDULE = [0, 2, 4, 6]
REPO = "toy-org/toy-gpt2-tiny-seed1"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A toy GPT-2 run: ``<dir>/checkpoint-{0,2,4,6}/`` and its manifest."""
    torch.set_num_threads(1)
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(tokenizer_dir, VOCAB)
    out = tmp_path_factory.mktemp("toy-gpt2-tiny-seed1")
    manifest = toy.train_run(
        tokenizer_dir, out, SIZE, 1, TRAINING, SCHEDULE, VOCAB, threads=1, progress=False,
        architecture="gpt2",
    )
    return out, manifest


def _hf_run(repo: str = REPO, architecture: str = "gpt2") -> Run:
    return Run("t", "toy-gpt2-tiny-seed1", "toy-gpt2-tiny", "tiny", 1, "hf", repo, architecture)


def _saved(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / f"checkpoint-{step}" / "model.safetensors"))


def _weights_of(files) -> dict[str, torch.Tensor]:
    """The tensors of a fetched weight file, read without mechgen's loader."""
    if files.weight_format == "safetensors":
        return load_file(str(files.weight_file))
    return torch.load(files.weight_file, map_location="cpu", weights_only=True)


# --- the toy GPT-2 family ----------------------------------------------------------------------


def test_toy_gpt2_saves_checkpoint_revisions_of_a_gpt2_model(gpt2_run) -> None:
    run_dir, manifest = gpt2_run
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == sorted(
        f"checkpoint-{s}" for s in SCHEDULE
    )
    assert manifest["architecture"] == "gpt2" and manifest["steps"] == SCHEDULE
    config = json.loads((run_dir / "checkpoint-6" / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    assert config["n_positions"] == 512 and config["tie_word_embeddings"] is True
    assert "rotary_pct" not in config
    state = _saved(run_dir, 6)
    d, ff, n_pos, layers = SIZE["d_model"], 4 * SIZE["d_model"], 512, SIZE["n_layers"]
    # Learned absolute positions, and GPT-2's fused Conv1D c_attn: weight (d, 3d).
    assert state["transformer.wpe.weight"].shape == (n_pos, d)
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (d, 3 * d)
    # The parameter count by GPT-2's formula, LM head tied to wte (counted once).
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + 2 * 2 * d + (d * ff + ff) + (ff * d + d)
    assert manifest["n_params"] == VOCAB * d + n_pos * d + layers * per_layer + 2 * d
    # Step 0 is the initialisation of seed 1; training changed every block.
    init = toy.init_model(SIZE, VOCAB, TRAINING["seq_len"], 1, architecture="gpt2").state_dict()
    step0 = _saved(run_dir, 0)
    assert all(torch.equal(step0[k], init[k]) for k in step0)
    assert not torch.equal(state["transformer.h.1.attn.c_attn.weight"], step0["transformer.h.1.attn.c_attn.weight"])
    # Tokenizer files ride along with every revision, as on the hub.
    assert (run_dir / "checkpoint-6" / "tokenizer.json").is_file()


def test_run_revisions_lists_the_family_names(gpt2_run) -> None:
    run_dir, _ = gpt2_run
    assert list(run_revisions(run_dir, "gpt2")) == [f"checkpoint-{s}" for s in SCHEDULE]
    assert run_revisions(run_dir, "gpt_neox") == {}
    with pytest.raises(KeyError, match="no folder checkpoint-3"):
        run_revisions(run_dir, "gpt2", steps=[3])


# --- the hf path: offline cache ---------------------------------------------------------------


@pytest.mark.parametrize("weight_format", ["safetensors", "pytorch"])
def test_hf_fetch_of_checkpoint_revisions_gives_the_saved_tensors(gpt2_run, tmp_path, weight_format) -> None:
    run_dir, _ = gpt2_run
    cache = tmp_path / "hub"
    # checkpoint-2 left out: a revision the hub does not have.
    build_offline_cache(
        cache, REPO, run_revisions(run_dir, "gpt2", steps=[0, 4, 6]),
        weight_format=weight_format, legacy_pythia_keys=False,
    )
    files = fetch_checkpoint(_hf_run(), 6, cache_dir=cache)
    assert files.from_hub and files.revision == "checkpoint-6"
    assert files.weight_format == weight_format
    assert files.sha256 == file_sha256(files.weight_file)
    if weight_format == "safetensors":
        assert files.sha256 == file_sha256(run_dir / "checkpoint-6" / "model.safetensors")
    got, want = _weights_of(files), _saved(run_dir, 6)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads(files.weight_file.with_name("config.json").read_text())["model_type"] == "gpt2"

    with pytest.raises(MissingCheckpoint, match=rf"{REPO}@checkpoint-2"):
        fetch_checkpoint(_hf_run(), 2, cache_dir=cache)
    # The GPT-NeoX naming of the same step does not exist in a GPT-2 repo.
    with pytest.raises(MissingCheckpoint, match=rf"{REPO}@step6"):
        fetch_checkpoint(_hf_run(architecture="gpt_neox"), 6, cache_dir=cache)

    # Streaming: releasing the checkpoint deletes the weight blob, keeps config.json.
    assert release(files) == files.size_bytes
    repo = repo_cache_dir(cache, REPO)
    assert not files.weight_file.exists() and (files.directory / "config.json").is_file()
    assert not list(repo.glob(f"blobs/{files.sha256}"))


def test_hf_tokenizer_of_a_checkpoint_revision_adds_no_bos(gpt2_run, tmp_path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    run_dir, _ = gpt2_run
    cache = tmp_path / "hub"
    build_offline_cache(cache, REPO, run_revisions(run_dir, "gpt2"), legacy_pythia_keys=False)
    directory = fetch_tokenizer(_hf_run(), "checkpoint-6", cache_dir=cache)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    sentence = " The value of the expression is returned."
    raw = Tokenizer.from_file(str(run_dir / "checkpoint-6" / "tokenizer.json"))
    assert tokenizer(sentence)["input_ids"] == raw.encode(sentence, add_special_tokens=False).ids
    assert tokenizer(sentence)["input_ids"][0] != tokenizer.bos_token_id


def test_missing_revision_is_recorded_and_the_sweep_goes_on(gpt2_run, tmp_path) -> None:
    from mechgen.scoring.job import score_checkpoint

    run_dir, _ = gpt2_run
    cache = tmp_path / "hub"
    build_offline_cache(
        cache, REPO, run_revisions(run_dir, "gpt2", steps=[0, 6]), legacy_pythia_keys=False
    )
    from huggingface_hub import constants

    saved = constants.HF_HUB_CACHE
    constants.HF_HUB_CACHE = str(cache)  # the scoring job's default cache, read at call time
    try:
        table, sidecar = score_checkpoint(_hf_run(), 4, [[5, 6, 7]], tokens_per_step=32)
        # The next checkpoint of the sweep resolves from the same cache.
        ref = resolve_checkpoint(_hf_run(), 6)
    finally:
        constants.HF_HUB_CACHE = saved
    assert ref.revision == "checkpoint-6" and ref.sha256 == file_sha256(
        run_dir / "checkpoint-6" / "model.safetensors"
    )
    assert sidecar["status"] == "missing" and table.empty
    assert sidecar["revision"] == "checkpoint-4" and sidecar["tokens_seen"] == 4 * 32
    assert f"{REPO}@checkpoint-4" in sidecar["reason"]


# --- the hf path: the fake hub (online download code) -----------------------------------------


def test_fake_hub_serves_checkpoint_revisions_streams_and_dedupes(gpt2_run, tmp_path) -> None:
    run_dir, _ = gpt2_run
    revisions = run_revisions(run_dir, "gpt2", steps=[4, 6])
    # checkpoint-5: byte-identical weights to checkpoint-4 (as Pythia's step0/step1 are).
    twin = tmp_path / "checkpoint-5"
    shutil.copytree(run_dir / "checkpoint-4", twin)
    revisions["checkpoint-5"] = twin
    client = tmp_path / "client"
    with FakeHub(max_seconds=120) as hub:
        hub.add_checkpoints(tmp_path / "server", REPO, revisions, legacy_pythia_keys=False)
        with hub.patched_huggingface_hub():
            refs = {s: resolve_checkpoint(_hf_run(), s, cache_dir=client) for s in (4, 5, 6)}
            # Identity known before any weight download: what the score cache keys on.
            assert hub.count("GET", "model.safetensors") == 0
            assert refs[4].sha256 == refs[5].sha256 != refs[6].sha256
            assert refs[4].commit != refs[5].commit
            files = fetch_checkpoint(_hf_run(), 6, cache_dir=client)
            with pytest.raises(MissingCheckpoint, match=r"checkpoint-2.*revision does not exist"):
                fetch_checkpoint(_hf_run(), 2, cache_dir=client)
        gets = [r for r in hub.requests if r.method == "GET" and r.filename == "model.safetensors"]
    assert [r.revision for r in gets] == [files.commit]  # one download, pinned to the commit
    assert any(r.revision == "checkpoint-6" for r in hub.requests)
    want = _saved(run_dir, 6)
    got = load_file(str(files.weight_file))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert files.sha256 == hashlib.sha256((run_dir / "checkpoint-6" / "model.safetensors").read_bytes()).hexdigest()
    assert release(files) == files.size_bytes


# --- end to end: scored through the GPT-2 adapter -------------------------------------------------------


def _brute_force_one_back(checkpoint: Path, token_ids: list[list[int]]) -> np.ndarray:
    """Per-head mean over sentences of mean_{i>=1} A[i, i-1], one sentence at a time through
    the full GPT2LMHeadModel with output_attentions."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(checkpoint, attn_implementation="eager").eval()
    layers, heads = model.config.n_layer, model.config.n_head
    totals, n = np.zeros((layers, heads)), 0
    with torch.no_grad():
        for ids in token_ids:
            if len(ids) < 2:
                continue
            out = model(torch.tensor([ids]), output_attentions=True)
            for layer in range(layers):
                for head in range(heads):
                    attn = out.attentions[layer][0, head].double()
                    totals[layer, head] += float(torch.diagonal(attn, offset=-1).mean())
            n += 1
    return totals / n


def test_gpt2_scores_through_the_hf_path_match_brute_force(gpt2_run, tmp_path) -> None:
    """End to end GPT-2 scoring through the hf path, against a brute-force forward."""
    run_dir, _ = gpt2_run
    from huggingface_hub import constants
    from tokenizers import Tokenizer

    from mechgen.scoring.job import score_checkpoint

    cache = tmp_path / "hub"
    revisions = run_revisions(run_dir, "gpt2")
    revisions["checkpoint-7"] = revisions["checkpoint-6"]  # the same weights under another branch
    build_offline_cache(cache, REPO, revisions, weight_format="pytorch", legacy_pythia_keys=False)
    raw = Tokenizer.from_file(str(run_dir / "checkpoint-6" / "tokenizer.json"))
    sentences = toytext.heldout_sentences(12)
    token_ids = [raw.encode(s, add_special_tokens=False).ids for s in sentences]
    saved = constants.HF_HUB_CACHE
    constants.HF_HUB_CACHE = str(cache)
    try:
        table, sidecar = score_checkpoint(
            _hf_run(), 6, token_ids, tokens_per_step=32, score_cache_dir=tmp_path / "score_cache"
        )
        # The same weights under another revision: a score-cache hit, no second download.
        _, sidecar2 = score_checkpoint(
            _hf_run(), 7, token_ids, tokens_per_step=32, score_cache_dir=tmp_path / "score_cache"
        )
    finally:
        constants.HF_HUB_CACHE = saved
    assert sidecar["status"] == "ok" and sidecar["revision"] == "checkpoint-6"
    assert sidecar["weight_format"] == "pytorch"
    assert sidecar2["score_cache"]["hit"] and sidecar2["duplicate_of"] == "checkpoint-6"
    assert not sidecar2["weights_downloaded"]
    expected = _brute_force_one_back(run_dir / "checkpoint-6", token_ids)
    got = table.sort_values(["layer", "head"])["one_back"].to_numpy().reshape(expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
