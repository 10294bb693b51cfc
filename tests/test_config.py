"""Config validation and suite expansion: every bad key fails at start, naming the key."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest

from mechgen.config import (
    ConfigError,
    load_yaml,
    suite_runs,
    suite_steps,
    tokens_per_step,
    validate_config,
)
from mechgen.schedules import PYTHIA_SCHEDULES, PYTHIA_TOKENS_PER_STEP

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def config() -> dict:
    return load_yaml(ROOT / "config.yaml")


def test_default_config_is_valid_and_selects_toy(config):
    validated = validate_config(config)
    assert validated["suite"] == "toy"
    runs = suite_runs(validated)
    # 2 sizes x 3 seeds, sizes outer.
    assert [r.run for r in runs][:3] == ["toy-tiny-seed1", "toy-tiny-seed2", "toy-tiny-seed3"]
    assert len(runs) == len(config["suites"]["toy"]["sizes"]) * len(config["suites"]["toy"]["seeds"])
    assert suite_steps(validated) == sorted(config["toy"]["schedule"])


def test_pythia_schedules_by_hand():
    all_steps = PYTHIA_SCHEDULES["all"]
    assert len(all_steps) == 154
    expected = [0] + [2**k for k in range(10)] + [1000 * k for k in range(1, 144)]
    assert all_steps == expected
    assert PYTHIA_SCHEDULES["trott16"] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 10000, 50000, 100000, 143000]
    assert len(PYTHIA_SCHEDULES["polypythias27"]) == 27
    assert set(PYTHIA_SCHEDULES["polypythias27"]) <= set(all_steps)
    assert PYTHIA_TOKENS_PER_STEP == 1024 * 2048


def test_pythia_repos_seed0_is_the_original(config):
    config["suite"] = "pythia"
    validated = validate_config(config)
    runs = {r.run: r for r in suite_runs(validated)}
    assert len(runs) == 50
    assert runs["pythia-70m-seed0"].repo_id == "EleutherAI/pythia-70m"
    assert runs["pythia-70m-seed3"].repo_id == "EleutherAI/pythia-70m-seed3"
    assert tokens_per_step(validated) == 2_097_152
    dec = suite_runs(validated, "pythia160m-decoupled")
    assert sorted(r.repo_id for r in dec) == sorted(
        [f"EleutherAI/pythia-160m-{kind}-seed{s}" for kind in ("data", "weight") for s in (1, 2, 3)]
    )


@pytest.mark.parametrize(
    "mutate, key, allowed",
    [
        (lambda c: c.update(suite="nope"), "'suite'", "toy"),
        (lambda c: c["suites"]["pythia"].update(sizes=["14m", "99m"]), "suites.pythia.sizes", "410m"),
        (lambda c: c["suites"]["pythia"].update(schedule="weekly"), "suites.pythia.schedule", "trott16"),
        (lambda c: c["suites"]["toy"].update(sizes=["huge"]), "suites.toy.sizes", "tiny"),
        (lambda c: c["suites"]["toy"].update(seeds=[1, -2]), "suites.toy.seeds.1", ""),
        (lambda c: c["suites"]["toy"].update(source="ftp"), "suites.toy.source", "hf"),
        (lambda c: c["scoring"].update(batch_size=0), "scoring.batch_size", ""),
        (
            lambda c: c["toy"]["training"].update(repeat_source="loop"),
            "toy.training.repeat_source",
            "window",
        ),
        (
            lambda c: c["toy"]["training"].update(repeat_min_half=33),
            "toy.training.repeat_min_half",
            "1..32",
        ),
        (
            lambda c: c["toy"]["training"].pop("repeat_min_half"),
            "toy.training.repeat_min_half",
            "window",
        ),
        (lambda c: c["hub"].update(max_retrys=3), "hub.max_retrys", "max_retries"),
        (lambda c: c["hub"].update(max_retries=-3), "hub.max_retries", ""),
        (
            lambda c: c["suites"]["toy"].update(eval={"kind": "file", "path": "/no/such/corpus.txt"}),
            "suites.toy.eval.path",
            "",
        ),
        (
            lambda c: c["suites"]["toy"].update(eval={"kind": "file", "path": "corpus.pdf"}),
            "suites.toy.eval.path",
            ".xlsx",
        ),
    ],
)
def test_bad_config_names_the_key(config, mutate, key, allowed):
    bad = copy.deepcopy(config)
    mutate(bad)
    with pytest.raises(ConfigError) as err:
        validate_config(bad)
    assert key in str(err.value)
    assert allowed in str(err.value)


def test_snakemake_fails_at_start_naming_the_key(tmp_path):
    overlay = tmp_path / "bad.yaml"
    overlay.write_text("suites:\n  toy:\n    sizes: [tiny, enormous]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(ROOT / "config.yaml"), str(overlay)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "suites.toy.sizes" in out and "enormous" in out
    assert "Traceback" not in out
