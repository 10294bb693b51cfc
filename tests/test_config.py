"""Config validation and suite expansion: every bad key fails at start, naming the key."""

from __future__ import annotations

import copy
import dataclasses
import json
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
    # A suite that lists no mechanisms runs the whole catalog.
    from mechgen.mechanisms import names

    assert "mechanisms" not in config["suites"]["toy"]
    assert validated["suites"]["toy"]["mechanisms"] == names()
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
        timeout=120, check=False,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "suites.toy.sizes" in out and "enormous" in out
    assert "Traceback" not in out


# ---- one source of truth: defaults filled from the schema, lists injected from the code


def _schema_default(*path: str):
    """A default as written in workflow/schemas/config.schema.yaml (not as injected)."""
    node = load_yaml(ROOT / "workflow" / "schemas" / "config.schema.yaml")
    for key in path:
        node = node["properties"][key]
    return node["default"]


@pytest.mark.parametrize(
    "section, key",
    [("analysis", "metric"), ("scoring", "batch_size"), ("scoring", "delete_weights"), ("analysis", "functional_multiple")],
)
def test_a_removed_key_gets_the_schema_default(config, section, key):
    del config[section][key]
    validated = validate_config(config)
    assert validated[section][key] == _schema_default(section, key)


def test_absent_sections_are_created_with_their_defaults(config):
    for section in ("scoring", "analysis", "relational", "hub", "results_dir"):
        del config[section]
    validated = validate_config(config)
    assert validated["results_dir"] == "results"
    assert validated["scoring"]["max_tokens"] == _schema_default("scoring", "max_tokens")
    assert validated["analysis"]["onset_thresholds"] == {"start": 0.01, "stop": 0.30, "step": 0.01}
    assert validated["analysis"]["positional"]["alignment_cost"] == "euclidean"
    assert validated["relational"]["analysis"]["n_null"] == 1000
    assert validated["relational"]["detail_steps"] == ["final"]
    # Defaults injected from the dataclasses that define the settings.
    from mechgen.scoring.circuit import CircuitSettings
    from mechgen.sources.checkpoints import HubSettings

    assert validated["relational"]["half_length"] == CircuitSettings().half_length
    assert validated["hub"]["max_retries"] == HubSettings().max_retries


def test_suite_overrides_get_no_defaults(config):
    """A suite's `relational:` keeps only its overrides, so the top-level values still apply."""
    config["relational"]["n_sequences"] = 7
    validated = validate_config(config)
    assert validated["suites"]["toy"]["relational"] == {"half_length": 32, "token_hi": 2048}
    from mechgen.config import relational_settings

    settings = relational_settings(validated, "toy")
    assert settings["n_sequences"] == 7 and settings["half_length"] == 32
    assert relational_settings(validated, "pythia")["half_length"] == validated["relational"]["half_length"]


def test_defaults_by_source(config):
    del config["suites"]["trott2025"]["format"]
    del config["suites"]["pythia"]["eval"]
    validated = validate_config(config)
    assert validated["suites"]["trott2025"]["format"] == "trott2025"
    assert "eval" not in validated["suites"]["trott2025"]
    assert "format" not in validated["suites"]["pythia"]
    assert validated["suites"]["pythia"]["eval"] == {"kind": "naturalstories"}
    assert validated["suites"]["toy"]["eval"] == {"kind": "toy_heldout", "n_sentences": 200}


def test_the_validated_config_is_a_fixed_point(config):
    validated = validate_config(config)
    assert validate_config(copy.deepcopy(validated)) == validated


@pytest.mark.parametrize(
    "mutate, key, allowed",
    [
        (lambda c: c["analysis"].update(metric="two_bak"), "analysis.metric", ["one_back", "clipped_distance"]),
        (lambda c: c["scoring"].update(batch_sise=8), "scoring.batch_sise", ["batch_size", "max_tokens"]),
        (lambda c: c["analysis"].update(metrik="one_back"), "analysis.metrik", ["metric", "bootstrap"]),
        (lambda c: c["relational"].update(n_sequence=3), "relational.n_sequence", ["n_sequences", "control_seed"]),
        (
            lambda c: c["suites"]["toy"]["relational"].update(enabled=False),
            "suites.toy.relational.enabled",
            ["half_length"],
        ),
        (lambda c: c["suites"]["toy"].update(sizez=["tiny"]), "suites.toy.sizez", ["sizes", "seeds"]),
        (lambda c: c.update(scorng={}), "scorng", ["scoring", "analysis"]),
        (lambda c: c["hub"].update(max_retrys=3), "hub.max_retrys", ["max_retries", "backoff_base_s"]),
        (
            lambda c: c["analysis"]["positional"].update(alignment_cost="cosine"),
            "analysis.positional.alignment_cost",
            ["euclidean", "correlation"],
        ),
        (lambda c: c["suites"]["pythia"].update(source="s3"), "suites.pythia.source", ["hf", "local", "table", "toy"]),
        (
            lambda c: c["suites"]["toy"].update(mechanisms=["previous_token", "inductoin"]),
            "suites.toy.mechanisms.1",
            ["previous_token", "induction"],
        ),
        (lambda c: c["relational"].update(token_lo=60000), "relational", ["token_lo < token_hi"]),
        (lambda c: c.pop("naturalstories"), "naturalstories.url", []),
        (lambda c: c["toy"]["training"].pop("steps"), "toy.training", ["steps"]),
    ],
)
def test_misspelt_key_or_value_names_key_and_allowed(config, mutate, key, allowed):
    mutate(config)
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    message = str(err.value)
    assert f"'{key}" in message, message
    for name in allowed:
        assert name in message, message
    assert message.count("config key") == 1


def test_schema_enums_are_the_codes_lists():
    from mechgen.config import config_schema, relational_scoring_keys
    from mechgen.schema import ATTENTION_METRICS
    from mechgen.scoring.circuit import CircuitSettings
    from mechgen.settings import REPEAT_SOURCES, TRAINING_KEYS_OPTIONAL, TRAINING_KEYS_REQUIRED
    from mechgen.sources.checkpoints import SUITE_SOURCES, HubSettings

    schema = config_schema()
    props = schema["properties"]
    assert props["analysis"]["properties"]["metric"]["enum"] == ATTENTION_METRICS
    assert schema["$defs"]["suite"]["properties"]["source"]["enum"] == list(SUITE_SOURCES)
    from mechgen.mechanisms import names

    mechanisms = schema["$defs"]["suite"]["properties"]["mechanisms"]
    assert mechanisms["items"]["enum"] == names() and mechanisms["default"] == names()
    fields = [f.name for f in dataclasses.fields(CircuitSettings) if f.name != "detail"]
    assert list(relational_scoring_keys()) == fields
    assert set(props["relational"]["properties"]) == {*fields, "enabled", "detail_steps", "analysis"}
    assert list(props["hub"]["properties"]) == [f.name for f in dataclasses.fields(HubSettings)]
    training = props["toy"]["properties"]["training"]
    assert training["required"] == list(TRAINING_KEYS_REQUIRED)
    assert set(training["properties"]) == {*TRAINING_KEYS_REQUIRED, *TRAINING_KEYS_OPTIONAL}
    assert training["properties"]["repeat_source"]["enum"] == list(REPEAT_SOURCES)
    # Every settings field has its constraints in the schema, and no constraint is orphaned.
    constraints = load_yaml(ROOT / "workflow" / "schemas" / "config.schema.yaml")["$defs"]["relational_scoring"]
    assert set(constraints) - {"description"} == set(fields)
    # No hand-kept copy of these lists is left in the schema file or the rules.
    text = (ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text()
    assert "propertyNames" not in text and "one_back, self_attention" not in text
    assert "RELATIONAL_SCORING_KEYS" not in (ROOT / "workflow" / "rules" / "common.smk").read_text()


def test_library_defaults_agree_with_the_schema():
    """Library functions keep keyword defaults for direct use; the config's are the schema's."""
    from mechgen.axes import functional, positional
    from mechgen.sources import evaltext
    from mechgen.stats import analysis as stats

    assert _schema_default("analysis", "functional_multiple") == functional.DEFAULT_FUNCTIONAL_MULTIPLE
    schema = load_yaml(ROOT / "workflow" / "schemas" / "config.schema.yaml")
    analysis = schema["properties"]["analysis"]["properties"]
    assert analysis["positional"]["properties"]["n_permutations"]["default"] == positional.DEFAULT_N_PERMUTATIONS
    boot = {k: v["default"] for k, v in analysis["bootstrap"]["properties"].items()}
    assert boot == stats.DEFAULT_BOOTSTRAP
    eval_rules = schema["$defs"]["suite"]["properties"]["eval"]["allOf"]
    assert eval_rules[0]["then"]["properties"]["column"]["default"] == evaltext.DEFAULT_COLUMN


def test_no_default_restated_in_rules_or_scripts():
    """`.get(key, default)` on the validated config would restate a default of the schema."""
    import re

    pattern = re.compile(r"\b(ANALYSIS|SCORING|RELATIONAL|TOY|SPEC|config|scoring|hub)\.get\(\s*\"[a-z_]+\"\s*,")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in [*(ROOT / "workflow" / "rules").glob("*.smk"), *(ROOT / "scripts").glob("*.py")]
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


# ---- 15.4: YAML errors with file, line and column; local run folders checked at start


def test_check_config_names_file_line_and_column(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("suite: toy\nscoring:\n  batch_size: 8\n   max_tokens: 100\n")
    good = tmp_path / "good.yaml"
    good.write_text("suite: toy\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mechgen", "check-config", str(ROOT / "config.yaml"),
         "--snakemake", "-n", "--configfile", str(good), str(broken), "--cores", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2
    # yaml reports the stray ':' of line 4 at column 14 (1-based).
    assert proc.stderr.strip().splitlines() == [
        f"mechgen: invalid config file: {broken}:4:14: YAML syntax error: mapping values are not allowed here"
    ]
    ok = subprocess.run(
        [sys.executable, "-m", "mechgen", "check-config", str(ROOT / "config.yaml"), str(good)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert ok.returncode == 0 and ok.stderr == ""


def test_yaml_problem_of_a_flow_mapping_and_a_list(tmp_path):
    from mechgen.config import yaml_problem

    bad = tmp_path / "bad.yaml"
    bad.write_text("suites:\n  toy: {source: toy\n  x: [\n")
    problem = yaml_problem(bad)
    assert problem.startswith(f"{bad}:3:4: YAML syntax error: ")
    assert "line 2, column 8" in problem  # where the unclosed `{` opened
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert yaml_problem(listing) == f"{listing}:1:1: a config file must be a mapping of keys, not a list"
    assert yaml_problem(tmp_path / "absent.yaml").endswith("absent.yaml: cannot read: No such file or directory")
    assert yaml_problem(ROOT / "config.yaml") is None


def _local_suite(config: dict, path: Path) -> dict:
    config["suites"]["mine"] = {
        "source": "local",
        "model_prefix": "mymodel-",
        "sizes": ["s", "m"],
        "seeds": [1, 2],
        "schedule": [0, 10],
        "path": str(path),
    }
    config["suite"] = "mine"
    return config


def test_local_suite_names_the_missing_run_folder(config, tmp_path):
    for run in ("mymodel-s-seed1", "mymodel-s-seed2", "mymodel-m-seed1"):
        (tmp_path / run).mkdir()
    (tmp_path / "mymodel-m-seed3").mkdir()
    with pytest.raises(ConfigError) as err:
        validate_config(_local_suite(config, tmp_path))
    message = str(err.value)
    assert message.startswith("config key 'suites.mine.path': 1 run folder(s) missing")
    assert repr(str(tmp_path / "mymodel-m-seed2")) in message
    assert "<model_prefix><size>-seed<seed>" in message and "mymodel-m-seed3" in message
    (tmp_path / "mymodel-m-seed2").mkdir()
    runs = suite_runs(validate_config(config))
    assert [r.repo_id for r in runs] == [
        str(tmp_path / f"mymodel-{size}-seed{seed}") for size in ("s", "m") for seed in (1, 2)
    ]
    # Without check_files (e.g. planning elsewhere) the folders are not looked at.
    validate_config(_local_suite(config, tmp_path / "nowhere"), check_files=False)


def test_corrupt_checkpoint_message_says_it_once(tmp_path):
    """The job's last line and the exception name the problem once, and a local file by its path."""
    import runpy

    from mechgen.config import Run
    from mechgen.sources.checkpoints import CorruptCheckpoint, fetch_checkpoint, load_model

    step = tmp_path / "run" / "step0"
    step.mkdir(parents=True)
    (step / "config.json").write_text('{"model_type": "gpt_neox"}')
    (step / "model.safetensors").write_bytes(b"not a safetensors file")
    run = Run("s", "run", "m", "x", 1, "local", str(tmp_path / "run"))
    with pytest.raises(CorruptCheckpoint) as err:
        load_model(fetch_checkpoint(run, 0))
    message = str(err.value)
    assert message.count("corrupt checkpoint") == 1
    assert message.startswith(f"corrupt checkpoint: {step / 'model.safetensors'}: ")
    assert (step / "model.safetensors").is_file()

    # The scoring script's exit line: "mechgen: corrupt checkpoint: <file>: ..." once.
    from types import SimpleNamespace

    sm = SimpleNamespace(
        params=SimpleNamespace(run=dataclasses.asdict(run), tokens_per_step=1, clipped_window=8, get=lambda k, d=None: d),
        wildcards=SimpleNamespace(step="0"),
        input=SimpleNamespace(tokens=str(tmp_path / "tokens.json")),
        output=SimpleNamespace(table=str(tmp_path / "t.parquet"), sidecar=str(tmp_path / "t.json"), get=lambda k, d=None: d),
        config={"scoring": {"batch_size": 2, "delete_weights": False}, "results_dir": str(tmp_path), "suite": "s", "hub": {}},
        threads=1,
        log=[str(tmp_path / "score.log")],
        rule="score",
    )
    from mechgen.mechanisms import successor

    # A token file as rule eval_tokens writes it (a tokenizer that splits every item: no task).
    tasks = successor.task_token_ids(lambda text: [ord(c) for c in text])
    (tmp_path / "tokens.json").write_text(
        json.dumps({"token_ids": [[1, 2, 3]], "successor_tasks": tasks})
    )
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "score_checkpoint.py"), init_globals={"snakemake": sm})
    line = str(exit_info.value.code)
    assert line.startswith(f"mechgen: corrupt checkpoint: {step / 'model.safetensors'}: ")
    assert line.count("corrupt checkpoint") == 1


def test_workflow_start_loads_no_model_or_statistics_stack(tmp_path) -> None:
    """Snakemake parses the workflow and validates the config at every start (on a cluster, in
    every job): that must not import torch, transformers, statsmodels or scipy (seconds per
    start). The definitions it reads live in mechgen.settings, mechgen.config, the mechanism
    catalog and mechgen.tables.baselines."""
    heavy = ("torch", "transformers", "statsmodels", "scipy")
    code = (
        "import atexit, sys\n"
        f"atexit.register(lambda: print('LOADED', sorted(set({heavy!r}) & set(sys.modules))))\n"
        "from snakemake.cli import main\n"
        "sys.argv = ['snakemake', '-n', '--quiet', 'all', '-d', sys.argv[1],"
        " '--configfile', sys.argv[2]]\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(ROOT / "config.yaml")],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = [line for line in result.stdout.splitlines() if line.startswith("LOADED")]
    assert loaded == ["LOADED []"], result.stdout[-2000:]
