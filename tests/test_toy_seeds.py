"""The toy trainer's two seeds: ``weight_seed`` sets the init alone, ``data_seed`` the batches
alone, and both default to the run's seed (so the default suite trains exactly as before); the
suite key ``variation`` and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_toy import SCHEDULE, SIZE, TRAINING, VOCAB, _same_weights, _weights

from mechgen.config import ConfigError, load_yaml, suite_runs, validate_config
from mechgen.sources import toy
from mechgen.sources.toy_tokenizer import train_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out, VOCAB)
    return out


def _train(tokenizer_dir: Path, out: Path, seed: int, **seeds: int) -> dict:
    torch.set_num_threads(1)
    return toy.train_run(
        tokenizer_dir,
        out,
        SIZE,
        seed,
        TRAINING,
        SCHEDULE,
        VOCAB,
        threads=1,
        progress=False,
        **seeds,
    )


def test_seeds_default_to_the_run_seed(tokenizer_dir: Path, tmp_path: Path) -> None:
    plain = _train(tokenizer_dir, tmp_path / "plain", 1)
    explicit = _train(tokenizer_dir, tmp_path / "explicit", 9, data_seed=1, weight_seed=1)
    assert (plain["data_seed"], plain["weight_seed"]) == (1, 1)
    for step in SCHEDULE:  # bit-identical: `seed` itself enters only through the two defaults
        assert _same_weights(
            _weights(tmp_path / "plain" / f"step{step}"),
            _weights(tmp_path / "explicit" / f"step{step}"),
        )
    assert plain["checkpoint_losses"] == explicit["checkpoint_losses"]
    # (tests/test_toy.py checks that step 0 is init_model's torch.manual_seed(seed) init.)


def test_weight_seed_sets_the_init_and_data_seed_the_batches(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    a = _train(tokenizer_dir, tmp_path / "a", 1, data_seed=1, weight_seed=2)
    b = _train(tokenizer_dir, tmp_path / "b", 1, data_seed=3, weight_seed=2)
    c = _train(tokenizer_dir, tmp_path / "c", 1, data_seed=1, weight_seed=4)
    w = {k: _weights(tmp_path / k / "step0") for k in "abc"}
    assert _same_weights(w["a"], w["b"]) and not _same_weights(w["a"], w["c"])
    # Same init, other batches: the step-0 loss (the init on the first batch) differs; the same
    # batches under another init give another loss too, and training diverges.
    assert a["checkpoint_losses"]["0"] != b["checkpoint_losses"]["0"]
    assert not _same_weights(_weights(tmp_path / "a" / "step6"), _weights(tmp_path / "b" / "step6"))
    # The batches are the data seed's: a run with data_seed 1 sees the first batch that a plain
    # seed-1 run sees (same loss under the same init).
    d = _train(tokenizer_dir, tmp_path / "d", 7, data_seed=1, weight_seed=4)
    assert d["checkpoint_losses"]["0"] == c["checkpoint_losses"]["0"]


def _config() -> dict:
    return load_yaml(REPO_ROOT / "config.yaml")


def test_decoupled_suites_expand_with_their_kinds() -> None:
    config = validate_config(_config(), check_files=False)
    runs = {r.run: r for r in suite_runs(config, "toy-decoupled")}
    assert sorted({r.kind for r in runs.values()}) == ["data", "full", "weight"]
    assert [r.run for r in runs.values() if r.kind == "data"] == [
        f"toy-tiny-data-seed{s}" for s in (11, 12, 13)
    ]
    d, w = runs["toy-tiny-data-seed12"], runs["toy-tiny-weight-seed21"]
    assert (d.data_seed, d.weight_seed, d.base_size) == (12, 0, "tiny")
    assert (w.data_seed, w.weight_seed) == (0, 21)
    assert len({r.init_group for r in runs.values()}) == 7  # 3 full + 1 shared + 3 weight
    pythia = suite_runs(config, "pythia160m-seeds")
    assert len(pythia) == 16
    assert {r.repo_id for r in pythia if r.kind == "weight"} == {
        f"EleutherAI/pythia-160m-weight-seed{s}" for s in (1, 2, 3)
    }
    assert len({r.init_group for r in pythia if r.kind == "data"}) == 1
    # The default suite: every run a full seed with both seeds = its seed.
    assert all(
        r.kind == "full" and r.data_seed == r.weight_seed == r.seed
        for r in suite_runs(config, "toy")
    )


@pytest.mark.parametrize(
    "mutate, key, allowed",
    [
        (
            lambda v: v["tiny-data"].update(kind="both"),
            "suites.toy-decoupled.variation.tiny-data.kind",
            "weight",
        ),
        (lambda v: v.pop("tiny"), "suites.toy-decoupled.variation", "full"),
        (
            lambda v: v["tiny-data"].pop("weight_seed"),
            "suites.toy-decoupled.variation.tiny-data.weight_seed",
            "",
        ),
        (
            lambda v: v["tiny-weight"].update(base="huge"),
            "suites.toy-decoupled.variation.tiny-weight.base",
            "tiny",
        ),
        (lambda v: v["tiny"].update(data_seed=3), "suites.toy-decoupled.variation.tiny", ""),
    ],
)
def test_bad_variation_fails_naming_the_key(mutate, key, allowed) -> None:
    config = _config()
    mutate(config["suites"]["toy-decoupled"]["variation"])
    with pytest.raises(ConfigError) as err:
        validate_config(config, check_files=False)
    assert key in str(err.value) and allowed in str(err.value)


def test_suite_training_override_is_checked() -> None:
    config = _config()
    config["suites"]["toy-decoupled"]["training"] = {"steps": 100}
    with pytest.raises(ConfigError, match=r"suites.toy-decoupled.schedule.*exceed"):
        validate_config(config, check_files=False)
    config = _config()
    config["suites"]["pythia"]["training"] = {"steps": 100}
    with pytest.raises(ConfigError, match="suites.pythia.training"):
        validate_config(config, check_files=False)
