"""Tests of mechgen.sources.checkpoints and mechgen.sources.hubcache: the real huggingface_hub download path, offline.

A tiny random GPT-NeoX and a tiny byte-level BPE tokenizer are saved as hub-layout ``step{N}``
folders; mechgen.sources.hubcache lays them out as a huggingface_hub cache for
``EleutherAI/pythia-14m-seed1`` (and friends); then ``fetch_checkpoint`` must resolve them through
``hf_hub_download`` with ``HF_HUB_OFFLINE=1``.

How the environment is made to take effect: huggingface_hub reads ``HF_HUB_OFFLINE``,
``HF_HOME`` and ``HF_HUB_CACHE`` once, at import (``huggingface_hub.constants``), and another
test module may have imported it first. So (1) this module sets ``HF_HUB_OFFLINE=1`` before
any HF import, (2) the ``offline`` fixture sets the env vars with monkeypatch AND patches
``huggingface_hub.constants.HF_HUB_OFFLINE``/``HF_HUB_CACHE`` (what the library actually
consults), and (3) most tests pass ``cache_dir`` explicitly. ``test_env_vars_in_a_fresh_process``
checks the real env handling (no ``cache_dir``) in a subprocess, where import-time reading works.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import

import pytest
import torch
from support.offline_hub import build_offline_cache

from mechgen.config import Run
from mechgen.sources.checkpoints import (
    CorruptCheckpoint,
    HubUnavailable,
    MissingCheckpoint,
    UnsupportedCheckpoint,
    count_parameters,
    fetch_checkpoint,
    fetch_tokenizer,
    load_model,
    release,
)
from mechgen.sources.hubcache import git_blob_sha1, repo_cache_dir

torch.set_num_threads(1)

REPO = "EleutherAI/pythia-14m-seed1"
REPO_BIN = "EleutherAI/pythia-14m-seed2"
STEPS = (0, 1000, 2000)
VOCAB = 320
REPO_ROOT = Path(__file__).resolve().parent.parent


def _hf_run(repo_id: str) -> Run:
    return Run("pythia", "pythia-14m-seed1", "pythia-14m", "14m", 1, "hf", repo_id)


def _local_run(run_dir: Path) -> Run:
    return Run("mine", run_dir.name, "toy-tiny", "tiny", 1, "local", str(run_dir))


def _tiny_config():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        rotary_pct=0.25,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """``<root>/pythia-14m-seed1/step{0,1000,2000}/`` (different random weights per step) and a
    tokenizer folder; tokenizer files are also saved in each step folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("checkpoints")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(
        ["the cat sat on the mat", "a dog ran far away from the cat"] * 50, trainer
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok_dir = root / "tokenizer"
    tokenizer.save_pretrained(tok_dir)

    run_dir = root / "pythia-14m-seed1"
    for step in STEPS:
        torch.manual_seed(step + 1)
        model = GPTNeoXForCausalLM(_tiny_config())
        model.save_pretrained(run_dir / f"step{step}")
        tokenizer.save_pretrained(run_dir / f"step{step}")
    return {"root": root, "run_dir": run_dir, "tokenizer_dir": tok_dir}


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """HF_HOME/HF_HUB_CACHE in tmp, offline mode on; returns the hub cache folder."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache(offline: Path, checkpoints: dict, repo: str = REPO, steps=(0, 1000), **kwargs) -> dict:
    run_dir = checkpoints["run_dir"]
    return build_offline_cache(
        offline,
        repo,
        {f"step{s}": run_dir / f"step{s}" for s in steps},
        tokenizer_dir=checkpoints["tokenizer_dir"],
        **kwargs,
    )


def _original_state(checkpoints: dict, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(checkpoints["run_dir"] / f"step{step}" / "model.safetensors"))
    # transformers saves GPT-NeoX's output projection under its legacy name (as Pythia's files
    # have it) and renames it to lm_head on load.
    return {
        ("lm_head." + k[len("embed_out.") :] if k.startswith("embed_out.") else k): v
        for k, v in state.items()
    }


def _assert_same_weights(model, original: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(original) <= set(loaded)
    for name, tensor in original.items():
        assert torch.equal(loaded[name], tensor), name


# --------------------------------------------------------------------------- hubcache


def test_offline_cache_resolves_through_hf_hub_download(offline, checkpoints):
    from huggingface_hub import hf_hub_download

    built = _cache(offline, checkpoints)
    repo_dir = offline / "models--EleutherAI--pythia-14m-seed1"
    assert built["repo_dir"] == repo_dir == repo_cache_dir(offline, REPO)
    commit = (repo_dir / "refs" / "step1000").read_text()
    assert len(commit) == 40 and commit == built["revisions"]["step1000"]["commit"]

    path = Path(hf_hub_download(REPO, "config.json", revision="step1000", cache_dir=offline))
    assert path == repo_dir / "snapshots" / commit / "config.json"
    original_config = (checkpoints["run_dir"] / "step1000" / "config.json").read_bytes()
    assert path.read_bytes() == original_config
    # small git file: etag = git blob sha1, checked against git itself when available
    blob_name = os.path.basename(os.readlink(path))
    assert (
        blob_name == hashlib.sha1(b"blob %d\0" % len(original_config) + original_config).hexdigest()
    )
    assert blob_name == git_blob_sha1(original_config)
    git = subprocess.run(
        ["git", "hash-object", str(path)], capture_output=True, text=True, check=False
    )
    if git.returncode == 0:
        assert git.stdout.strip() == blob_name
    # LFS file: etag = sha256 of the content
    weights = Path(
        hf_hub_download(REPO, "model.safetensors", revision="step1000", cache_dir=offline)
    )
    original_weights = (checkpoints["run_dir"] / "step1000" / "model.safetensors").read_bytes()
    assert os.path.basename(os.readlink(weights)) == hashlib.sha256(original_weights).hexdigest()
    assert weights.read_bytes() == original_weights


def test_offline_cache_resolves_without_cache_dir_argument(offline, checkpoints):
    """cache_dir=None: huggingface_hub's own HF_HUB_CACHE is used."""
    from huggingface_hub import hf_hub_download

    built = _cache(offline, checkpoints)
    path = hf_hub_download(REPO, "config.json", revision="step0")
    assert Path(path).parent == built["revisions"]["step0"]["snapshot"]


def test_env_vars_in_a_fresh_process(tmp_path, checkpoints):
    """HF_HOME + HF_HUB_OFFLINE set in the environment of a new process are honoured."""
    hf_home = tmp_path / "home"
    built = _cache(hf_home / "hub", checkpoints)
    code = (
        "from mechgen.config import Run; from mechgen.sources.checkpoints import fetch_checkpoint;"
        f"f = fetch_checkpoint(Run('p','r','m','14m',1,'hf',{REPO!r}), 1000);"
        "print(f.commit, f.directory)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    commit, directory = out.stdout.split()
    assert commit == built["revisions"]["step1000"]["commit"]
    assert Path(directory) == built["revisions"]["step1000"]["snapshot"]


# --------------------------------------------------------------------------- fetch + load


def test_fetch_checkpoint_from_cache_and_load(offline, checkpoints):
    built = _cache(offline, checkpoints)
    files = fetch_checkpoint(_hf_run(REPO), 1000, cache_dir=offline)
    original = checkpoints["run_dir"] / "step1000" / "model.safetensors"
    assert files.from_hub and files.weight_format == "safetensors"
    assert files.revision == "step1000" and files.repo_id == REPO
    assert (
        files.commit
        == (offline / "models--EleutherAI--pythia-14m-seed1" / "refs" / "step1000").read_text()
    )
    assert files.commit == built["revisions"]["step1000"]["commit"]
    assert files.sha256 == hashlib.sha256(original.read_bytes()).hexdigest()
    assert files.size_bytes == original.stat().st_size
    assert (
        files.directory / "config.json"
    ).is_file() and files.weight_file.parent == files.directory

    model = load_model(files)
    assert not model.training
    assert model.config._attn_implementation == "eager"
    assert next(model.parameters()).dtype == torch.float32
    _assert_same_weights(model, _original_state(checkpoints, 1000))
    # and not step 0's weights: the revision really selects the checkpoint
    assert not torch.equal(
        model.state_dict()["gpt_neox.embed_in.weight"],
        _original_state(checkpoints, 0)["gpt_neox.embed_in.weight"],
    )


@pytest.mark.parametrize("mark_absent", [True, False])
def test_pytorch_bin_fallback(offline, checkpoints, mark_absent):
    """Pythia-like branch: only pytorch_model.bin (with the legacy embed_out name)."""
    built = _cache(
        offline,
        checkpoints,
        repo=REPO_BIN,
        steps=(1000,),
        weight_format="pytorch",
        mark_absent_safetensors=mark_absent,
    )
    files = fetch_checkpoint(_hf_run(REPO_BIN), 1000, cache_dir=offline)
    assert files.weight_format == "pytorch" and files.weight_file.name == "pytorch_model.bin"
    assert files.sha256 == built["revisions"]["step1000"]["files"]["pytorch_model.bin"]["sha256"]
    assert files.sha256 == hashlib.sha256(files.weight_file.read_bytes()).hexdigest()
    saved = torch.load(files.weight_file, weights_only=True)
    assert "embed_out.weight" in saved and "lm_head.weight" not in saved
    model = load_model(files)
    _assert_same_weights(model, _original_state(checkpoints, 1000))


def test_missing_revision_and_repo(offline, checkpoints):
    _cache(offline, checkpoints)  # step2000 deliberately absent
    with pytest.raises(
        MissingCheckpoint, match=r"EleutherAI/pythia-14m-seed1@step2000.*offline cache"
    ):
        fetch_checkpoint(_hf_run(REPO), 2000, cache_dir=offline)
    with pytest.raises(MissingCheckpoint, match="EleutherAI/pythia-14m-seed9@step1000"):
        fetch_checkpoint(_hf_run("EleutherAI/pythia-14m-seed9"), 1000, cache_dir=offline)


def test_truncated_weight_in_cache_is_corrupt(offline, checkpoints):
    built = _cache(offline, checkpoints)
    blob = built["revisions"]["step1000"]["files"]["model.safetensors"]["blob"]
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpoint) as info:
        fetch_checkpoint(_hf_run(REPO), 1000, cache_dir=offline)
    message = str(info.value)
    assert "\n" not in message
    assert "EleutherAI/pythia-14m-seed1@step1000/model.safetensors" in message
    assert "hash" in message
    assert not blob.exists()  # the bad blob is deleted, so a later online run re-downloads it
    # step 0 shares no weight blob with step 1000 and is untouched
    assert fetch_checkpoint(_hf_run(REPO), 0, cache_dir=offline).weight_format == "safetensors"


@pytest.mark.parametrize("weight_format", ["safetensors", "pytorch"])
def test_truncated_weight_fails_to_load(tmp_path, checkpoints, weight_format):
    """A local checkpoint has no hash to check against: loading must catch the truncation."""
    step_dir = tmp_path / "run" / "step5"
    step_dir.mkdir(parents=True)
    src = checkpoints["run_dir"] / "step1000"
    (step_dir / "config.json").write_bytes((src / "config.json").read_bytes())
    if weight_format == "safetensors":
        data = (src / "model.safetensors").read_bytes()
        (step_dir / "model.safetensors").write_bytes(data[: len(data) - 1000])
    else:
        torch.save(_original_state(checkpoints, 1000), step_dir / "pytorch_model.bin")
        data = (step_dir / "pytorch_model.bin").read_bytes()
        (step_dir / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    files = fetch_checkpoint(_local_run(tmp_path / "run"), 5)
    assert files.weight_format == weight_format
    with pytest.raises(
        CorruptCheckpoint, match=r"corrupt checkpoint: \S*/run/step5/(model\.safetensors|pytorch_model\.bin): "
    ):
        load_model(files)


class _WritesMarker:
    """A pickle payload that would run code: its __reduce__ calls open(marker, "w")."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_refused(offline, tmp_path, checkpoints, zip_format):
    marker = tmp_path / "pwned"
    control = tmp_path / "control"
    step_dir = tmp_path / "evil" / "step1000"
    step_dir.mkdir(parents=True)
    (step_dir / "config.json").write_bytes(
        (checkpoints["run_dir"] / "step1000" / "config.json").read_bytes()
    )
    state = {"gpt_neox.embed_in.weight": torch.zeros(2, 2), "payload": _WritesMarker(marker)}
    torch.save(state, step_dir / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    # Control: the payload is live (an unrestricted unpickler runs it).
    torch.save(
        {"payload": _WritesMarker(control)},
        tmp_path / "control.bin",
        _use_new_zipfile_serialization=zip_format,
    )
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert control.exists()

    # local source
    files = fetch_checkpoint(_local_run(tmp_path / "evil"), 1000)
    with pytest.raises(CorruptCheckpoint, match=r"/evil/step1000/pytorch_model\.bin: refused"):
        load_model(files)
    assert not marker.exists()
    # and through the hub cache (its sha256 is right, so only loading can refuse it)
    build_offline_cache(offline, "EleutherAI/evil", {"step1000": step_dir}, weight_format="pytorch")
    files = fetch_checkpoint(_hf_run("EleutherAI/evil"), 1000, cache_dir=offline)
    with pytest.raises(
        CorruptCheckpoint, match=r"EleutherAI/evil@step1000/pytorch_model\.bin: refused"
    ):
        load_model(files)
    assert not marker.exists()


def test_release_deletes_weight_blob_only(offline, checkpoints):
    run_dir = checkpoints["run_dir"]
    # step3000 is the same checkpoint as step1000: both snapshots link to one weight blob
    built = build_offline_cache(
        offline,
        REPO,
        {"step1000": run_dir / "step1000", "step3000": run_dir / "step1000"},
        tokenizer_dir=checkpoints["tokenizer_dir"],
    )
    blob = built["revisions"]["step1000"]["files"]["model.safetensors"]["blob"]
    assert blob == built["revisions"]["step3000"]["files"]["model.safetensors"]["blob"]
    size = blob.stat().st_size

    first = fetch_checkpoint(_hf_run(REPO), 1000, cache_dir=offline)
    second = fetch_checkpoint(_hf_run(REPO), 3000, cache_dir=offline)
    assert first.commit != second.commit
    assert release(first) == 0  # step3000 still links to the blob
    assert blob.exists() and not first.weight_file.is_symlink()
    assert (first.directory / "config.json").is_file() and (
        first.directory / "tokenizer.json"
    ).is_file()
    assert release(second) == size
    assert not blob.exists() and not second.weight_file.is_symlink()
    assert (second.directory / "config.json").is_file()
    assert release(second) == 0  # idempotent
    with pytest.raises(MissingCheckpoint, match="step1000"):
        fetch_checkpoint(_hf_run(REPO), 1000, cache_dir=offline)  # weights no longer cached


def test_local_source(checkpoints):
    run = _local_run(checkpoints["run_dir"])
    files = fetch_checkpoint(run, 2000)
    original = checkpoints["run_dir"] / "step2000" / "model.safetensors"
    assert not files.from_hub and files.commit is None
    assert files.weight_file == original
    assert files.sha256 == hashlib.sha256(original.read_bytes()).hexdigest()
    _assert_same_weights(load_model(files), _original_state(checkpoints, 2000))
    assert release(files) == 0 and original.exists()
    with pytest.raises(MissingCheckpoint, match="step7"):
        fetch_checkpoint(run, 7)


def test_fetch_tokenizer(offline, checkpoints):
    from transformers import AutoTokenizer

    _cache(offline, checkpoints)
    original = AutoTokenizer.from_pretrained(checkpoints["tokenizer_dir"])
    text = "the dog sat far away"
    expected = original(text, add_special_tokens=False)["input_ids"]
    hub_dir = fetch_tokenizer(_hf_run(REPO), "step1000", cache_dir=offline)
    assert (
        AutoTokenizer.from_pretrained(hub_dir)(text, add_special_tokens=False)["input_ids"]
        == expected
    )
    local_dir = fetch_tokenizer(_local_run(checkpoints["run_dir"]), None)
    assert local_dir == checkpoints["run_dir"] / "step2000"  # latest step with tokenizer files
    assert (
        AutoTokenizer.from_pretrained(local_dir)(text, add_special_tokens=False)["input_ids"]
        == expected
    )
    with pytest.raises(MissingCheckpoint, match="step2000"):
        fetch_tokenizer(_hf_run(REPO), "step2000", cache_dir=offline)


def test_model_type_must_be_a_known_family(tmp_path, checkpoints):
    import json

    step_dir = tmp_path / "run" / "step1"
    step_dir.mkdir(parents=True)
    config = json.loads((checkpoints["run_dir"] / "step0" / "config.json").read_text())
    config["model_type"] = "llama"
    (step_dir / "config.json").write_text(json.dumps(config))
    (step_dir / "model.safetensors").write_bytes(
        (checkpoints["run_dir"] / "step0" / "model.safetensors").read_bytes()
    )
    with pytest.raises(UnsupportedCheckpoint, match="model_type is 'llama'.*gpt_neox, gpt2"):
        load_model(fetch_checkpoint(_local_run(tmp_path / "run"), 1))


PYTHIA_SHAPES = {  # (hidden_size, num_hidden_layers, num_attention_heads) from the models' config.json
    "14m": (128, 6, 4),
    "70m": (512, 6, 8),
    "160m": (768, 12, 12),
    "410m": (1024, 24, 16),
}
PYTHIA_N_PARAMS = {"14m": 14_067_712, "70m": 70_426_624, "160m": 162_322_944, "410m": 405_334_016}
"""n_params as published in the reference study's tables."""


@pytest.mark.parametrize("size", sorted(PYTHIA_SHAPES))
def test_count_parameters_matches_reference_study(size):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hidden, layers, heads = PYTHIA_SHAPES[size]
    config = GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):  # shapes only, no memory
        assert count_parameters(GPTNeoXForCausalLM(config)) == PYTHIA_N_PARAMS[size]


def test_count_parameters_by_hand():
    from transformers import GPTNeoXForCausalLM

    with torch.device("meta"):
        tiny = GPTNeoXForCausalLM(_tiny_config())
    # 2 embeddings (V x d); per layer qkv + dense + 2 MLP linears (with biases) + 2 LNs; final LN
    d, ff, layers = 32, 64, 2
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d) + 4 * d
    assert count_parameters(tiny) == 2 * VOCAB * d + layers * per_layer + 2 * d


# --------------------------------------------------------------------------- online, fake hub
# A minimal stand-in for the hub's /resolve endpoint (HEAD + GET with the X-Repo-Commit, ETag
# and X-Error-Code headers huggingface_hub reads), serving the files of caches built by
# build_offline_cache, so the ONLINE code paths (404 fallback, .no_exist, re-fetch after a
# corrupt download) run for real against huggingface_hub's HTTP client.


class _FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.corrupt_gets: dict[tuple[str, str], int] = {}
        self.requests: list[tuple[str, str, str, str]] = []

    def add(self, built: dict) -> None:
        repo = self.repos.setdefault(built["repo_id"], {"refs": {}, "commits": {}})
        for revision, info in built["revisions"].items():
            repo["refs"][revision] = info["commit"]
            repo["commits"][info["commit"]] = {
                name: (meta["blob"].read_bytes(), meta["etag"])
                for name, meta in info["files"].items()
            }

    def handler(self):
        import json
        import re
        import urllib.parse
        from http.server import BaseHTTPRequestHandler

        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _error(self, code: str, commit: str | None = None) -> None:
                body = json.dumps({"error": code}).encode()
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            def _serve(self, head: bool) -> None:
                match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path)
                if not match:
                    return self._error("RepoNotFound")
                repo_id, revision, filename = (urllib.parse.unquote(g) for g in match.groups())
                hub.requests.append((self.command, repo_id, revision, filename))
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error("RepoNotFound")
                commit = revision if revision in repo["commits"] else repo["refs"].get(revision)
                if commit is None:
                    return self._error("RevisionNotFound")
                if filename not in repo["commits"][commit]:
                    return self._error("EntryNotFound", commit)
                body, etag = repo["commits"][commit][filename]
                if not head and hub.corrupt_gets.get((repo_id, filename), 0) > 0:
                    hub.corrupt_gets[(repo_id, filename)] -= 1
                    body = bytes([body[0] ^ 0xFF]) + body[1:]  # same size, wrong content
                self.send_response(200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        return Handler


@pytest.fixture
def online_hub(tmp_path, monkeypatch, checkpoints):
    """A fake hub on localhost serving REPO (step0, step1000: safetensors) and REPO_BIN (step1000:
    .bin only); huggingface_hub pointed at it, online; returns (hub, empty client cache)."""
    import threading
    from http.server import ThreadingHTTPServer

    import huggingface_hub.constants as hf_constants

    run_dir = checkpoints["run_dir"]
    server_side = tmp_path / "server"
    hub = _FakeHub()
    hub.add(_cache(server_side, checkpoints))
    hub.add(
        _cache(
            server_side,
            checkpoints,
            repo=REPO_BIN,
            steps=(1000,),
            weight_format="pytorch",
            mark_absent_safetensors=False,
        )
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), hub.handler())
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        hf_constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    assert run_dir.is_dir()
    yield hub, tmp_path / "client"
    server.shutdown()
    server.server_close()


def test_online_download_and_bin_fallback(online_hub, checkpoints):
    hub, cache = online_hub
    files = fetch_checkpoint(_hf_run(REPO), 1000, cache_dir=cache)
    assert files.weight_format == "safetensors"
    assert (
        files.sha256
        == hashlib.sha256(
            (checkpoints["run_dir"] / "step1000" / "model.safetensors").read_bytes()
        ).hexdigest()
    )
    _assert_same_weights(load_model(files), _original_state(checkpoints, 1000))
    assert ("GET", REPO, files.commit, "model.safetensors") in hub.requests  # pinned to the commit

    files = fetch_checkpoint(_hf_run(REPO_BIN), 1000, cache_dir=cache)
    assert files.weight_format == "pytorch"
    _assert_same_weights(load_model(files), _original_state(checkpoints, 1000))
    # the 404 is remembered, so the next fetch of this commit does not ask for safetensors again
    assert (
        repo_cache_dir(cache, REPO_BIN) / ".no_exist" / files.commit / "model.safetensors"
    ).is_file()
    hub.requests.clear()
    assert fetch_checkpoint(_hf_run(REPO_BIN), 1000, cache_dir=cache).weight_format == "pytorch"
    assert not [r for r in hub.requests if r[3] == "model.safetensors"]

    assert release(files) == files.size_bytes
    tok_dir = fetch_tokenizer(_hf_run(REPO), "step0", cache_dir=cache)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tok_dir.iterdir()}


def test_online_missing(online_hub):
    _, cache = online_hub
    with pytest.raises(
        MissingCheckpoint,
        match=r"EleutherAI/pythia-14m-seed1@step2000/config.json: revision does not exist",
    ):
        fetch_checkpoint(_hf_run(REPO), 2000, cache_dir=cache)
    with pytest.raises(
        MissingCheckpoint, match=r"EleutherAI/pythia-14m-seed9@step1000.*repo does not exist"
    ):
        fetch_checkpoint(_hf_run("EleutherAI/pythia-14m-seed9"), 1000, cache_dir=cache)


def test_online_corrupt_download_is_fetched_again(online_hub, checkpoints):
    hub, cache = online_hub
    expected = hashlib.sha256(
        (checkpoints["run_dir"] / "step1000" / "model.safetensors").read_bytes()
    ).hexdigest()
    hub.corrupt_gets[(REPO, "model.safetensors")] = 1  # first download corrupt, second good
    files = fetch_checkpoint(_hf_run(REPO), 1000, cache_dir=cache)
    assert files.sha256 == expected
    assert sum(1 for r in hub.requests if r[0] == "GET" and r[3] == "model.safetensors") == 2

    hub.corrupt_gets[(REPO, "model.safetensors")] = 2  # corrupt twice: give up
    with pytest.raises(
        CorruptCheckpoint,
        match=r"EleutherAI/pythia-14m-seed1@step0/model.safetensors: hash .* after re-fetching",
    ):
        fetch_checkpoint(_hf_run(REPO), 0, cache_dir=cache)
    assert not list((repo_cache_dir(cache, REPO) / "blobs").glob("*.incomplete"))


def test_online_unreachable_is_not_missing(online_hub, monkeypatch):
    """A network failure must fail loudly, not be recorded as a missing checkpoint."""
    import socket

    import huggingface_hub.constants as hf_constants

    _, cache = online_hub
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(
        hf_constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        dead + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(hf_constants, "ENDPOINT", dead)
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # huggingface_hub retries with backoff
    with pytest.raises(
        HubUnavailable, match=r"EleutherAI/pythia-14m-seed1@step1000/config.json: hub unreachable"
    ):
        fetch_checkpoint(_hf_run(REPO), 1000, cache_dir=cache)


def test_release_with_shared_blob_store(offline, checkpoints):
    """huggingface_hub >= 1.x moves Xet downloads into a cache-wide store and leaves
    ``blobs/<etag>`` as a link to ``<cache>/blobs/<2 hex>/<xet hash>``: the etag is still read
    from the snapshot link, and release() frees the store payload through the library's GC."""
    from huggingface_hub.utils import _shared_blobs

    built = _cache(offline, checkpoints)
    meta = built["revisions"]["step1000"]["files"]["model.safetensors"]
    xet_hash = hashlib.sha256(b"a made-up xet hash").hexdigest()
    assert _shared_blobs.publish_blob_to_shared_store(
        blob_path=str(meta["blob"]),
        xet_hash=xet_hash,
        cache_dir=offline,
        expected_size=meta["size"],
    )
    store_path = _shared_blobs.shared_blob_path(offline, xet_hash)
    assert meta["blob"].is_symlink() and store_path.is_file()

    files = fetch_checkpoint(_hf_run(REPO), 1000, cache_dir=offline)
    assert files.sha256 == meta["sha256"]  # verified against the etag, not the xet hash
    _assert_same_weights(load_model(files), _original_state(checkpoints, 1000))
    assert release(files) == meta["size"]
    assert not store_path.exists() and not meta["blob"].is_symlink()
    assert fetch_checkpoint(_hf_run(REPO), 0, cache_dir=offline).weight_format == "safetensors"
