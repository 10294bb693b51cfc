"""Tests of the embedded toy suite (mechgen.sources.toy and scripts/toy_*.py).

Every training here is a few updates of a tiny GPT-NeoX (1-2 layers, d_model 32-64) on a
512-entry tokenizer, so the file runs in well under a minute on one thread.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file

from mechgen.sources import toy, toytext
from mechgen.sources.toy_tokenizer import train_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
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
SCHEDULE = [0, 1, 2, 4, 6]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out, VOCAB)
    return out


@pytest.fixture(scope="module")
def run_seed1(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run_seed1")
    manifest = toy.train_run(
        tokenizer_dir, out, SIZE, 1, TRAINING, SCHEDULE, VOCAB, threads=1, progress=False
    )
    return out, manifest


def _weights(step_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(step_dir / "model.safetensors"))


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- text ------------------------------------------------------------------------------------


def test_heldout_sentences_come_from_pydoc_and_are_not_trained_on() -> None:
    from pydoc_data.topics import topics

    source = " ".join(" ".join(topics[k].split()) for k in sorted(topics))
    training = " ".join(toytext.read_training_text().split())
    sentences = toytext.heldout_sentences(toytext.heldout_pool_size())
    assert len(sentences) >= 300  # the toy eval asks for 200 by default
    for sentence in sentences:
        assert sentence in source, sentence  # real text of the source, not an artefact
        assert sentence not in training, sentence
        assert toytext.SENTENCE_MIN_WORDS <= len(sentence.split()) <= toytext.SENTENCE_MAX_WORDS
        assert sentence[-1] in ".!?"
    # Holding out must leave most of the text for training: ~87% of the characters.
    assert 0.8 * len(source) < len(training) < 0.95 * len(source)


def test_heldout_sentences_are_deterministic_distinct_and_checked() -> None:
    first = toytext.heldout_sentences(200)
    assert first == toytext.heldout_sentences(200)
    assert len(set(first)) == 200
    # Spread over the pool: 200 of ~340 must not simply be a prefix of it.
    assert first != toytext.heldout_sentences(toytext.heldout_pool_size())[:200]
    with pytest.raises(ValueError, match="only"):
        toytext.heldout_sentences(toytext.heldout_pool_size() + 1)
    with pytest.raises(ValueError, match="positive int"):
        toytext.heldout_sentences(0)


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_loads_adds_no_bos_and_is_deterministic(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    special = json.loads((tokenizer_dir / "special_tokens_map.json").read_text())
    assert special["eos_token"] == "<|endoftext|>" and special["pad_token"] == "<|padding|>"

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    text = "The assert statement raises an exception."
    ids = hf(text)["input_ids"]
    # No BOS/EOS: exactly the BPE pieces of the text, which decode back to it.
    assert ids == raw.encode(text, add_special_tokens=False).ids
    assert 0 not in ids and 1 not in ids
    assert hf.decode(ids) == text
    assert (hf.convert_tokens_to_ids("<|endoftext|>"), hf.pad_token_id) == (0, 1)
    assert hf.bos_token == "<|endoftext|>"
    assert len(hf) == VOCAB

    again = tmp_path / "again"
    train_tokenizer(again, VOCAB)
    assert (again / "tokenizer.json").read_bytes() == (
        tokenizer_dir / "tokenizer.json"
    ).read_bytes()


def test_train_tokenizer_rejects_tiny_vocab(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(tmp_path, 100)


# --- model -----------------------------------------------------------------------------------


def test_model_config_follows_the_size_spec() -> None:
    config = toy.model_config({"n_layers": 3, "n_heads": 4, "d_model": 256}, 2048, 128)
    assert (config.num_hidden_layers, config.num_attention_heads, config.hidden_size) == (3, 4, 256)
    assert config.intermediate_size == 1024  # 4 x d_model by default
    assert config.hidden_size // config.num_attention_heads == 64
    assert config.rope_parameters["partial_rotary_factor"] == 1.0
    assert config.max_position_embeddings == 512  # >= 512 even for seq_len 128
    assert toy.model_config(SIZE, VOCAB, 1024).max_position_embeddings == 1024
    assert config.tie_word_embeddings is False
    assert toy.model_config({**SIZE, "d_ff": 48}, VOCAB, 16).intermediate_size == 48
    with pytest.raises(ValueError, match="multiple of size_spec.n_heads"):
        toy.model_config({"n_layers": 1, "n_heads": 3, "d_model": 32}, VOCAB, 16)
    with pytest.raises(ValueError, match="lacks key"):
        toy.model_config({"n_layers": 1, "d_model": 32}, VOCAB, 16)
    with pytest.raises(ValueError, match="unknown key"):
        toy.model_config({**SIZE, "n_kv_heads": 1}, VOCAB, 16)


def test_lr_schedule_hand_worked() -> None:
    # warmup 10, total 110, peak 1: linear to 1 at step 10, cosine to 0.1 at step 110.
    assert toy.lr_at_step(5, 1.0, 10, 110) == pytest.approx(0.5)
    assert toy.lr_at_step(10, 1.0, 10, 110) == pytest.approx(1.0)
    assert toy.lr_at_step(60, 1.0, 10, 110) == pytest.approx(0.55)  # cos(pi/2) = 0: midway
    assert toy.lr_at_step(110, 1.0, 10, 110) == pytest.approx(0.1)
    assert toy.lr_at_step(1, 2.0, 0, 1) == pytest.approx(0.2)


# --- training --------------------------------------------------------------------------------


def test_hub_layout_and_manifest(run_seed1: tuple[Path, dict]) -> None:
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    out, manifest = run_seed1
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["steps"] == SCHEDULE
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        f"step{s}" for s in SCHEDULE
    )
    for step in SCHEDULE:
        step_dir = out / f"step{step}"
        model = GPTNeoXForCausalLM.from_pretrained(str(step_dir))
        tokenizer = AutoTokenizer.from_pretrained(str(step_dir))
        assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 32)
        assert model.config.rope_parameters["partial_rotary_factor"] == 1.0
        assert tokenizer("a b")["input_ids"][0] != tokenizer.bos_token_id
        config = json.loads((step_dir / "config.json").read_text())
        assert config["rotary_pct"] == 1.0  # what transformers 4 reads
        assert json.loads((step_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == (
            "PreTrainedTokenizerFast"
        )
    # n_params counted independently: embeddings + per-layer blocks + final norm + LM head.
    d, v, layers = SIZE["d_model"], VOCAB, SIZE["n_layers"]
    per_layer = (
        2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    )
    assert manifest["n_params"] == v * d + layers * per_layer + 2 * d + d * v
    assert (
        manifest["seed"] == 1 and manifest["size_spec"] == SIZE and manifest["training"] == TRAINING
    )
    assert set(manifest["checkpoint_losses"]) == {str(s) for s in SCHEDULE}
    assert manifest["final_loss"] == pytest.approx(manifest["final_loss"])  # finite, not NaN
    assert manifest["versions"]["torch"] == torch.__version__


def test_step0_is_the_seeded_initialisation(run_seed1: tuple[Path, dict]) -> None:
    from transformers import GPTNeoXForCausalLM

    out, _ = run_seed1
    torch.manual_seed(1)
    fresh = GPTNeoXForCausalLM(toy.model_config(SIZE, VOCAB, TRAINING["seq_len"]))
    loaded = GPTNeoXForCausalLM.from_pretrained(str(out / "step0"))
    assert _same_weights(fresh.state_dict(), loaded.state_dict())
    # Per layer: 2 norms, qkv, dense and 2 MLP matrices, each weight + bias; plus embed_in,
    # the final norm's weight + bias and the LM head.
    assert len(fresh.state_dict()) == 2 * 12 + 4
    # ... and training moved away from it.
    assert not _same_weights(_weights(out / "step0"), _weights(out / "step1"))


def test_training_is_deterministic_per_seed(
    run_seed1: tuple[Path, dict], tokenizer_dir: Path, tmp_path: Path
) -> None:
    out1, manifest1 = run_seed1
    again = toy.train_run(
        tokenizer_dir,
        tmp_path / "again",
        SIZE,
        1,
        TRAINING,
        SCHEDULE,
        VOCAB,
        threads=1,
        progress=False,
    )
    other = toy.train_run(
        tokenizer_dir,
        tmp_path / "seed2",
        SIZE,
        2,
        TRAINING,
        SCHEDULE,
        VOCAB,
        threads=1,
        progress=False,
    )
    for step in SCHEDULE:
        assert _same_weights(
            _weights(out1 / f"step{step}"), _weights(tmp_path / "again" / f"step{step}")
        )
        assert not _same_weights(
            _weights(out1 / f"step{step}"), _weights(tmp_path / "seed2" / f"step{step}")
        )
    assert again["checkpoint_losses"] == manifest1["checkpoint_losses"]
    assert other["checkpoint_losses"] != manifest1["checkpoint_losses"]


def test_training_lowers_the_loss(tokenizer_dir: Path, tmp_path: Path) -> None:
    training = {**TRAINING, "steps": 40, "batch_size": 4, "seq_len": 32, "warmup_steps": 5}
    manifest = toy.train_run(
        tokenizer_dir,
        tmp_path,
        {"n_layers": 1, "n_heads": 1, "d_model": 32},
        3,
        training,
        [0, 40],
        VOCAB,
        progress=False,
    )
    # ln(512) = 6.24 nats at initialisation; 40 updates at 3e-3 learn the unigram statistics.
    assert manifest["checkpoint_losses"]["0"] == pytest.approx(6.24, abs=0.2)
    assert manifest["checkpoint_losses"]["40"] < manifest["checkpoint_losses"]["0"] - 0.5


def test_train_run_rejects_bad_input(tokenizer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"schedule steps \[10\] exceed training.steps = 6"):
        toy.train_run(tokenizer_dir, tmp_path, SIZE, 1, TRAINING, [0, 10], VOCAB, progress=False)
    with pytest.raises(ValueError, match="training lacks key"):
        bad = {k: v for k, v in TRAINING.items() if k != "seq_len"}
        toy.train_run(tokenizer_dir, tmp_path, SIZE, 1, bad, [0], VOCAB, progress=False)
    with pytest.raises(ValueError, match="the tokenizer has 512 ids but vocab_size is 400"):
        toy.train_run(tokenizer_dir, tmp_path, SIZE, 1, TRAINING, [0], 400, progress=False)
    with pytest.raises(FileNotFoundError, match="lacks"):
        toy.train_run(tmp_path, tmp_path / "out", SIZE, 1, TRAINING, [0], VOCAB, progress=False)
    assert not (tmp_path / "manifest.json").exists()


class _FakeNamedList(list):
    """Stands in for Snakemake's Namedlist: positional items, attribute access and .get()."""

    def __init__(self, **named: object) -> None:
        super().__init__(named.values())
        self.__dict__.update(named)

    def get(self, key: str, default: object = None) -> object:
        return self.__dict__.get(key, default)


def _run_script(name: str, argv: list[str] | None = None, snakemake: object = None) -> None:
    """Run scripts/<name> in this process (no interpreter start-up), like Snakemake or a shell."""
    import logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    old_argv = sys.argv
    sys.argv = [name, *(argv or [])]
    try:
        init = {"snakemake": snakemake} if snakemake is not None else {}
        runpy.run_path(str(REPO_ROOT / "scripts" / name), init_globals=init, run_name="__main__")
    finally:
        sys.argv = old_argv
        for handler in root.handlers[:]:
            if handler not in saved[0]:
                root.removeHandler(handler)
                handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_scripts_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run_script("toy_tokenizer.py", [str(tmp_path / "tok"), "--vocab-size", "300"])
    (tmp_path / "run" / "step7").mkdir(parents=True)  # a stale checkpoint of an earlier run
    capsys.readouterr()
    _run_script(
        "toy_train.py",
        [
            str(tmp_path / "tok"),
            str(tmp_path / "run"),
            "--size",
            json.dumps({"n_layers": 1, "n_heads": 1, "d_model": 16}),
            "--seed",
            "5",
            "--training",
            json.dumps({**TRAINING, "steps": 2}),
            "--schedule",
            "0",
            "2",
            "--vocab-size",
            "300",
        ],
    )
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert json.loads(capsys.readouterr().out) == manifest
    assert manifest["steps"] == [0, 2] and manifest["seed"] == 5
    assert manifest["size_spec"] == {"n_layers": 1, "n_heads": 1, "d_model": 16}
    assert (tmp_path / "run" / "step2" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "step7").exists()


def test_scripts_under_snakemake(tmp_path: Path) -> None:
    """The rule interface the workflow uses (workflow/rules/toy.smk): names of input/output/params."""
    tokenizer_json = tmp_path / "tokenizer" / "tokenizer.json"
    _run_script(
        "toy_tokenizer.py",
        snakemake=SimpleNamespace(
            input=_FakeNamedList(),
            output=_FakeNamedList(tokenizer=str(tokenizer_json)),
            params=_FakeNamedList(vocab_size=300),
            threads=1,
            log=_FakeNamedList(log=str(tmp_path / "logs" / "tok.log")),
            rule="toy_tokenizer",
        ),
    )
    assert json.loads(tokenizer_json.read_text())["model"]["type"] == "BPE"
    manifest_path = tmp_path / "hub" / "toy-tiny-seed4" / "manifest.json"
    size = {"n_layers": 1, "n_heads": 2, "d_model": 16, "d_ff": 24}
    _run_script(
        "toy_train.py",
        snakemake=SimpleNamespace(
            input=_FakeNamedList(tokenizer=str(tokenizer_json)),
            output=_FakeNamedList(manifest=str(manifest_path)),
            params=_FakeNamedList(
                size_spec=size,
                seed=4,
                data_seed=4,
                weight_seed=4,
                training={**TRAINING, "steps": 2, "threads": 1},
                schedule=[0, 1, 2],
                vocab_size=300,
            ),
            threads=1,
            log=_FakeNamedList(log=str(tmp_path / "logs" / "train.log")),
            rule="toy_train",
        ),
    )
    manifest = json.loads(manifest_path.read_text())
    assert (
        manifest["seed"] == 4 and manifest["steps"] == [0, 1, 2] and manifest["size_spec"] == size
    )
    assert sorted(p.name for p in manifest_path.parent.iterdir()) == [
        "manifest.json",
        "step0",
        "step1",
        "step2",
    ]
    # The log file gets one line per saved checkpoint and the summary.
    log_text = (tmp_path / "logs" / "train.log").read_text()
    assert "step 2: loss" in log_text and "3 steps saved" in log_text


# --- repeated-content rows (induction heads need in-context copying to pay off) -------------


def test_repeated_rows_hand_worked() -> None:
    generator = torch.Generator().manual_seed(0)
    rows = toy.repeated_rows(3, 9, "random", generator, vocab_size=20)
    assert rows.shape == (3, 9) and rows.dtype == torch.long
    # A half of 9 // 2 = 4 ids placed twice, then its first id once more (odd length).
    assert torch.equal(rows[:, :4], rows[:, 4:8]) and torch.equal(rows[:, 8], rows[:, 0])
    assert int(rows.min()) >= toy.REPEAT_ID_LO and int(rows.max()) < 20
    # Drawn from the generator alone: the same state gives the same rows.
    again = toy.repeated_rows(3, 9, "random", torch.Generator().manual_seed(0), vocab_size=20)
    assert torch.equal(rows, again)
    stream = torch.arange(100, 200)
    corpus = toy.repeated_rows(2, 8, "corpus", torch.Generator().manual_seed(1), stream=stream)
    for row in corpus.tolist():
        start = row[0] - 100
        assert row == list(range(100 + start, 104 + start)) * 2  # a window of the stream, twice
    assert [toy.n_repeated_rows(b, f) for b, f in ((12, 0.25), (8, 0.25), (4, 0.0), (5, 1.0))] == [
        3,
        2,
        0,
        5,
    ]


def test_repeat_fraction_zero_is_the_plain_training_and_nonzero_is_seeded(
    run_seed1: tuple[Path, dict], tokenizer_dir: Path, tmp_path: Path
) -> None:
    out1, manifest1 = run_seed1
    explicit_zero = toy.train_run(
        tokenizer_dir,
        tmp_path / "zero",
        SIZE,
        1,
        {**TRAINING, "repeat_fraction": 0.0},
        SCHEDULE,
        VOCAB,
        threads=1,
        progress=False,
    )
    assert explicit_zero["checkpoint_losses"] == manifest1["checkpoint_losses"]
    assert _same_weights(_weights(out1 / "step6"), _weights(tmp_path / "zero" / "step6"))
    repeated = {**TRAINING, "repeat_fraction": 0.5}
    first = toy.train_run(
        tokenizer_dir,
        tmp_path / "rep1",
        SIZE,
        1,
        repeated,
        SCHEDULE,
        VOCAB,
        threads=1,
        progress=False,
    )
    second = toy.train_run(
        tokenizer_dir,
        tmp_path / "rep2",
        SIZE,
        1,
        repeated,
        SCHEDULE,
        VOCAB,
        threads=1,
        progress=False,
    )
    assert first["checkpoint_losses"] == second["checkpoint_losses"]
    assert _same_weights(
        _weights(tmp_path / "rep1" / "step6"), _weights(tmp_path / "rep2" / "step6")
    )
    assert first["checkpoint_losses"] != manifest1["checkpoint_losses"]
    assert first["training"]["repeat_fraction"] == 0.5


def test_repeat_settings_are_checked(tokenizer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"repeat_fraction must be a number in \[0, 1\]"):
        toy.train_run(
            tokenizer_dir,
            tmp_path,
            SIZE,
            1,
            {**TRAINING, "repeat_fraction": 1.5},
            [0],
            VOCAB,
            progress=False,
        )
    with pytest.raises(ValueError, match="repeat_source must be one of random, corpus, window"):
        toy.train_run(
            tokenizer_dir,
            tmp_path,
            SIZE,
            1,
            {**TRAINING, "repeat_source": "x"},
            [0],
            VOCAB,
            progress=False,
        )
    with pytest.raises(ValueError, match="'window' needs training.repeat_min_half"):
        toy.train_run(
            tokenizer_dir,
            tmp_path,
            SIZE,
            1,
            {**TRAINING, "repeat_fraction": 1.0, "repeat_source": "window"},
            [0],
            VOCAB,
            progress=False,
        )
    with pytest.raises(ValueError, match=r"repeat_min_half must be in 1\.\."):
        toy.train_run(
            tokenizer_dir,
            tmp_path,
            SIZE,
            1,
            {**TRAINING, "repeat_fraction": 1.0, "repeat_source": "window", "repeat_min_half": 99},
            [0],
            VOCAB,
            progress=False,
        )


def test_window_repeats_hand_worked() -> None:
    """Each row keeps its text except that one span of length H in min_half..seq_len // 2 is
    followed by a copy of itself; the draws (H, then start, per row) replayed by hand."""
    rows = torch.arange(1000, 1000 + 4 * 20).reshape(4, 20)
    out = toy.window_repeats(rows, torch.Generator().manual_seed(3), min_half=3)
    assert torch.equal(rows, torch.arange(1000, 1080).reshape(4, 20))  # input untouched
    replay = torch.Generator().manual_seed(3)
    halves = set()
    for row, got in zip(rows.tolist(), out.tolist()):
        half = int(torch.randint(3, 11, (1,), generator=replay))
        start = int(torch.randint(0, 20 - 2 * half + 1, (1,), generator=replay))
        expected = row[: start + half] + row[start : start + half] + row[start + 2 * half :]
        assert got == expected and len(got) == 20
        halves.add(half)
    # Brute force over every (H, start): exactly one placement explains each row, so the
    # repeat's offset H - 1 from the copy's first predictable position varies between rows.
    for row, got in zip(rows.tolist(), out.tolist()):
        fits = [
            (h, s)
            for h in range(3, 11)
            for s in range(20 - 2 * h + 1)
            if got == row[: s + h] + row[s : s + h] + row[s + 2 * h :]
        ]
        assert len(fits) == 1
    assert len(halves) > 1
    with pytest.raises(ValueError, match="min_half must be in 1..10"):
        toy.window_repeats(rows, torch.Generator(), min_half=11)


def test_window_training_is_seeded(tokenizer_dir: Path, tmp_path: Path) -> None:
    window = {**TRAINING, "repeat_fraction": 1.0, "repeat_source": "window", "repeat_min_half": 4}
    first, second = (
        toy.train_run(
            tokenizer_dir, tmp_path / name, SIZE, 2, window, SCHEDULE, VOCAB, threads=1,
            progress=False,
        )
        for name in ("a", "b")
    )
    assert first["checkpoint_losses"] == second["checkpoint_losses"]
    assert _same_weights(_weights(tmp_path / "a" / "step6"), _weights(tmp_path / "b" / "step6"))
