"""Model families (mechgen.architectures): revision names, checkpoint schedules, the CRFM GPT-2 suite's
runs, and the `architecture` key of a suite, each checked against an independent statement of
the fact (the Mistral config's checkpoint_frequency, TransformerLens' list of repos)."""

from __future__ import annotations

import copy
import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mechgen import architectures
from mechgen.config import (
    ConfigError,
    load_yaml,
    suite_runs,
    suite_steps,
    tokens_per_step,
    validate_config,
)
from mechgen.schedules import CRFM_SCHEDULES

REPO_ROOT = Path(__file__).resolve().parent.parent

# stanford-crfm/mistral conf/gpt2-mistral-{small,medium}-config.yaml: checkpoint every `freq`
# steps until global step `until`.
MISTRAL_CHECKPOINT_FREQUENCY = [(10, 100), (50, 2000), (100, 20000), (1000, 400000)]

# TransformerLens transformer_lens/loading_from_pretrained.py, stanford-gpt2-small-A .. medium-E.
CRFM_REPOS = [
    "stanford-crfm/alias-gpt2-small-x21",
    "stanford-crfm/battlestar-gpt2-small-x49",
    "stanford-crfm/caprica-gpt2-small-x81",
    "stanford-crfm/darkmatter-gpt2-small-x343",
    "stanford-crfm/expanse-gpt2-small-x777",
    "stanford-crfm/arwen-gpt2-medium-x21",
    "stanford-crfm/beren-gpt2-medium-x49",
    "stanford-crfm/celebrimbor-gpt2-medium-x81",
    "stanford-crfm/durin-gpt2-medium-x343",
    "stanford-crfm/eowyn-gpt2-medium-x777",
]


def _config() -> dict:
    return load_yaml(REPO_ROOT / "config.yaml")


def test_crfm_all_is_the_mistral_checkpoint_frequency_609_steps() -> None:
    expected, start = set(), 0
    for freq, until in MISTRAL_CHECKPOINT_FREQUENCY:
        last = until if until == 400000 else until - 1  # the final bound is saved itself
        expected |= {s for s in range(start, last + 1) if s % freq == 0}
        start = until
    steps = CRFM_SCHEDULES["all"]
    assert len(steps) == 609 == len(expected)
    assert steps == sorted(expected)
    assert steps[:11] == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert {1950, 2000, 19900, 20000, 21000, 400000} <= set(steps)
    assert not {95, 1975, 19950, 20500} & set(steps)


def test_crfm_log20_is_about_20_log_spaced_checkpoints() -> None:
    steps = CRFM_SCHEDULES["log20"]
    assert set(steps) <= set(CRFM_SCHEDULES["all"])
    assert steps[0] == 0 and steps[1] == 10 and steps[-1] == 400000
    assert 18 <= len(steps) <= 22
    # log-spaced: consecutive positive steps are about (400000/10)^(1/19) = 1.75x apart
    ratios = [b / a for a, b in itertools.pairwise(steps[1:])]
    assert all(1.3 < r < 2.5 for r in ratios), ratios
    assert math.isclose(
        math.exp(sum(map(math.log, ratios)) / len(ratios)), 40000 ** (1 / 19), rel_tol=1e-9
    )


def test_revision_names_per_family() -> None:
    assert architectures.revision_name(1000) == "step1000"
    assert architectures.revision_name(1000, "gpt_neox") == "step1000"
    assert architectures.revision_name(1000, "gpt2") == "checkpoint-1000"
    assert architectures.step_of_revision("checkpoint-400000", "gpt2") == 400000
    assert architectures.step_of_revision("step400000", "gpt2") is None
    assert architectures.step_of_revision("checkpoint-5", "gpt_neox") is None
    with pytest.raises(ValueError, match="allowed: gpt_neox, gpt2"):
        architectures.revision_name(1, "gpt3")
    with pytest.raises(ValueError):
        architectures.revision_name(-1, "gpt2")


def test_crfm_suite_runs_are_the_ten_published_repos() -> None:
    config = validate_config(_config(), check_files=False)
    runs = suite_runs(config, "crfm-gpt2")
    assert [r.repo_id for r in runs] == CRFM_REPOS
    assert {r.architecture for r in runs} == {"gpt2"}
    assert [r.run for r in runs][:2] == ["crfm-gpt2-small-seed21", "crfm-gpt2-small-seed49"]
    assert suite_steps(config, "crfm-gpt2") == CRFM_SCHEDULES["log20"]
    assert tokens_per_step(config, "crfm-gpt2") == 512 * 1024


def test_crfm_schedule_all_and_tokens_per_step_from_the_family() -> None:
    raw = _config()
    spec = raw["suites"]["crfm-gpt2"]
    spec["schedule"] = "all"
    del spec["tokens_per_step"]
    config = validate_config(raw, check_files=False)
    assert len(suite_steps(config, "crfm-gpt2")) == 609
    assert tokens_per_step(config, "crfm-gpt2") == 524_288
    # A GPT-NeoX suite keeps Pythia's schedules: `log20` is not one of them.
    raw = _config()
    raw["suites"]["pythia"]["schedule"] = "log20"
    with pytest.raises(ConfigError, match=r"suites\.pythia\.schedule.*allowed: all, polypythias27, trott16"):
        validate_config(raw, check_files=False)


def test_architecture_key_is_validated_and_defaults_to_gpt_neox() -> None:
    raw = _config()
    config = validate_config(raw, check_files=False)
    assert config["suites"]["pythia"]["architecture"] == "gpt_neox"
    assert config["suites"]["toy-gpt2"]["architecture"] == "gpt2"
    assert {r.architecture for r in suite_runs(config, "toy")} == {"gpt_neox"}
    bad = copy.deepcopy(raw)
    bad["suites"]["crfm-gpt2"]["architecture"] = "gpt-2"
    with pytest.raises(
        ConfigError, match=r"suites\.crfm-gpt2\.architecture': 'gpt-2' is not allowed; allowed: gpt_neox, gpt2"
    ):
        validate_config(bad, check_files=False)


def test_name_placeholder_needs_a_known_size_and_seed() -> None:
    raw = _config()
    raw["suites"]["crfm-gpt2"]["seeds"] = [21, 22]
    with pytest.raises(
        ConfigError, match=r"suites\.crfm-gpt2\.repo_template' uses \{name\}, but no gpt2 run of size 'small' with seed 22"
    ):
        validate_config(raw, check_files=False)


def test_families_and_hubcache_import_no_torch() -> None:
    code = (
        "import sys; import mechgen.architectures, mechgen.sources.hubcache, mechgen.schedules; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
