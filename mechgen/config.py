"""Configuration: validation of config.yaml and expansion of a suite into runs and steps.

A *suite* is a set of runs (model size x seed) and a checkpoint schedule. A *run* is one
training run, identified inside mechgen by a filesystem-safe id such as ``pythia-70m-seed3``
or ``toy-small-seed1``; every per-head table carries ``suite, model, seed, run``.

Every validation error is a :class:`ConfigError` whose message starts with the dotted key at
fault and lists the allowed values, so a bad config fails before any job starts.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mechgen.schedules import PYTHIA_SCHEDULES, PYTHIA_TOKENS_PER_STEP, resolve_schedule

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"

POLYPYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m")
"""Sizes with PolyPythias seeds 1..9 (seed 0 is the original Pythia run)."""
PYTHIA_DECOUPLED_SIZES = ("160m-data", "160m-weight")
"""The decoupled 160m runs: ``pythia-160m-data-seed{1,2,3}`` and ``-weight-seed{1,2,3}``."""


class ConfigError(ValueError):
    """An invalid configuration. The message names the key and the allowed values."""


@dataclass(frozen=True)
class Run:
    """One training run of a suite.

    ``model`` is the size label with the suite's prefix (``pythia-70m``, ``toy-small``);
    ``size`` is the bare label (``70m``, ``small``); ``repo_id`` is where the checkpoints live
    (a hub repo id for ``hf``, a directory for ``toy``/``local``, empty for ``table``).
    """

    suite: str
    run: str
    model: str
    size: str
    seed: int
    source: str
    repo_id: str


def load_yaml(path: str | Path) -> dict[str, Any]:
    with open(path) as fh:
        return yaml.safe_load(fh) or {}


def _schema_error_key(err: Any) -> str:
    path = ".".join(str(p) for p in err.absolute_path)
    return path or "<top level>"


def validate_config(config: dict[str, Any], check_files: bool = True) -> dict[str, Any]:
    """Validate ``config`` against the JSON schema and mechgen's semantic rules.

    Returns a copy with defaults filled in. Raises :class:`ConfigError` naming the key.
    ``check_files`` also checks that files the config names (corpus, table directory) exist.
    """
    import jsonschema

    config = copy.deepcopy(config)
    schema = load_yaml(SCHEMA_PATH)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        allowed = ""
        if err.validator == "enum":
            allowed = f" (allowed: {', '.join(map(str, err.validator_value))})"
        raise ConfigError(f"config key '{_schema_error_key(err)}': {err.message}{allowed}")

    suites = config["suites"]
    if config["suite"] not in suites:
        raise ConfigError(
            f"config key 'suite': unknown suite {config['suite']!r}; allowed: {', '.join(suites)}"
        )
    config.setdefault("results_dir", "results")
    if config.get("hub") is not None:
        from mechgen.sources import HubSettings

        try:
            HubSettings.from_config(config["hub"])
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc) if "hub." in str(exc) else f"config key 'hub': {exc}") from None
    for name, spec in suites.items():
        _validate_suite(config, name, spec, check_files=check_files and name == config["suite"])
    if "training" in config.get("toy", {}):
        _validate_toy_training(config["toy"]["training"])
    return config


def _validate_toy_training(training: dict[str, Any]) -> None:
    """The cross-key rules of ``toy.training`` the schema cannot state, at start (not only when
    :func:`mechgen.toy.train_run` checks them again, minutes into a run)."""
    problem = repeat_min_half_problem(training)
    if problem:
        raise ConfigError(f"config key 'toy.training.repeat_min_half': {problem}")


def repeat_min_half_problem(training: Mapping[str, Any]) -> str | None:
    """What is wrong with ``training.repeat_min_half`` given the other training keys, or None.

    It must lie in 1..seq_len // 2 (a span and its copy fit in a row), and repeat_source
    ``window`` with repeat_fraction > 0 needs it. The one statement of these rules, shared by
    config validation and :mod:`mechgen.toy` (which cannot be imported here: it loads torch).
    """
    seq_len = training.get("seq_len")
    min_half = training.get("repeat_min_half")
    if min_half is not None and seq_len is not None and not 1 <= min_half <= seq_len // 2:
        return (
            f"training.repeat_min_half must be in 1..{seq_len // 2} (seq_len // 2: a span and "
            f"its copy fit in a row); got {min_half}"
        )
    if (
        training.get("repeat_source") == "window"
        and training.get("repeat_fraction", 0) > 0
        and min_half is None
    ):
        return (
            "training.repeat_source 'window' needs training.repeat_min_half (the shortest "
            "repeated span, in tokens)"
        )
    return None


def resolve_path(path: str) -> str:
    """A config path as given if it exists from the working directory, else from the repo root.

    Paths to data shipped with mechgen (``tests/data/...``) then work whatever
    ``snakemake --directory`` is; a user's paths resolve from where they run Snakemake.
    """
    p = Path(path)
    if p.is_absolute() or p.exists() or not (REPO_ROOT / p).exists():
        return path
    return str(REPO_ROOT / p)


def _validate_suite(config: dict[str, Any], name: str, spec: dict[str, Any], check_files: bool) -> None:
    key = f"suites.{name}"
    source = spec["source"]
    if "path" in spec:
        spec["path"] = resolve_path(spec["path"])
    if "path" in spec.get("eval", {}):
        spec["eval"]["path"] = resolve_path(spec["eval"]["path"])
    if source == "table":
        if "path" not in spec:
            raise ConfigError(f"config key '{key}.path': a table suite needs the directory of its tables")
        if spec.get("format", "trott2025") == "mechgen":
            if check_files and not Path(spec["path"]).is_file():
                raise ConfigError(f"config key '{key}.path': heads table {spec['path']!r} does not exist")
        elif check_files and not Path(spec["path"]).is_dir():
            raise ConfigError(f"config key '{key}.path': directory {spec['path']!r} does not exist")
        return
    for required in ("sizes", "seeds", "schedule"):
        if required not in spec:
            raise ConfigError(f"config key '{key}.{required}' is required for source {source!r}")
    if source == "toy":
        toy_sizes = config.get("toy", {}).get("sizes", {})
        for size in spec["sizes"]:
            if size not in toy_sizes:
                raise ConfigError(
                    f"config key '{key}.sizes': unknown toy size {size!r}; allowed: {', '.join(toy_sizes)}"
                )
        named = {"toy": config.get("toy", {}).get("schedule", [0])}
    else:
        named = PYTHIA_SCHEDULES
    if source == "hf":
        template = spec.get("repo_template", "")
        if "{size}" not in template or "{seed}" not in template:
            raise ConfigError(f"config key '{key}.repo_template' must contain {{size}} and {{seed}}")
        if template.startswith("EleutherAI/pythia-"):
            allowed = POLYPYTHIA_SIZES + PYTHIA_DECOUPLED_SIZES
            for size in spec["sizes"]:
                if size not in allowed:
                    raise ConfigError(
                        f"config key '{key}.sizes': unknown Pythia size {size!r}; allowed: {', '.join(allowed)}"
                    )
        if 0 in spec["seeds"] and "seed0_repo_template" not in spec:
            raise ConfigError(
                f"config key '{key}.seeds': seed 0 needs '{key}.seed0_repo_template' (the original run's repo)"
            )
    if source == "local":
        if "path" not in spec:
            raise ConfigError(f"config key '{key}.path': a local suite needs its checkpoint directory")
        if check_files and not Path(spec["path"]).is_dir():
            raise ConfigError(f"config key '{key}.path': directory {spec['path']!r} does not exist")
    try:
        resolve_schedule(spec["schedule"], named)
    except KeyError as exc:
        raise ConfigError(f"config key '{key}.schedule': {exc.args[0]}") from None
    ev = spec.get("eval", {"kind": "naturalstories"})
    if ev["kind"] == "file":
        if "path" not in ev:
            raise ConfigError(f"config key '{key}.eval.path': eval kind 'file' needs a corpus path")
        suffix = Path(ev["path"]).suffix.lower()
        if suffix not in (".txt", ".csv", ".xlsx"):
            raise ConfigError(
                f"config key '{key}.eval.path': unsupported corpus type {suffix!r}; allowed: .txt, .csv, .xlsx"
            )
        if check_files and not Path(ev["path"]).is_file():
            raise ConfigError(f"config key '{key}.eval.path': corpus file {ev['path']!r} does not exist")
    if ev["kind"] == "toy_heldout" and source != "toy":
        raise ConfigError(f"config key '{key}.eval.kind': toy_heldout is only for source 'toy'")


def suite_spec(config: dict[str, Any], suite: str | None = None) -> dict[str, Any]:
    """The spec of ``suite`` (default: the selected one)."""
    return config["suites"][suite or config["suite"]]


def suite_steps(config: dict[str, Any], suite: str | None = None) -> list[int]:
    """Sorted checkpoint steps of ``suite`` (default: the selected one)."""
    spec = suite_spec(config, suite)
    named = {"toy": config.get("toy", {}).get("schedule", [0])} if spec["source"] == "toy" else PYTHIA_SCHEDULES
    return resolve_schedule(spec["schedule"], named)


def tokens_per_step(config: dict[str, Any], suite: str | None = None) -> int:
    """Tokens seen per optimiser step in ``suite``."""
    spec = suite_spec(config, suite)
    if "tokens_per_step" in spec:
        return int(spec["tokens_per_step"])
    if spec["source"] == "toy":
        tr = config.get("toy", {}).get("training", {})
        return int(tr.get("batch_size", 16)) * int(tr.get("seq_len", 128))
    return PYTHIA_TOKENS_PER_STEP


def run_id(model: str, seed: int) -> str:
    return f"{model}-seed{seed}"


def suite_runs(config: dict[str, Any], suite: str | None = None) -> list[Run]:
    """Every run of ``suite`` (default: the selected one), sizes outer, seeds inner."""
    name = suite or config["suite"]
    spec = config["suites"][name]
    source = spec["source"]
    runs = []
    for size in spec.get("sizes", []):
        model = f"{spec.get('model_prefix', '')}{size}"
        for seed in spec.get("seeds", []):
            rid = run_id(model, seed)
            if source == "hf":
                template = spec["seed0_repo_template"] if seed == 0 else spec["repo_template"]
                repo = template.format(size=size, seed=seed)
            elif source == "toy":
                repo = str(Path(config.get("results_dir", "results")) / name / "hub" / rid)
            elif source == "local":
                repo = str(Path(spec["path"]) / rid)
            else:
                repo = ""
            runs.append(Run(name, rid, model, size, int(seed), source, repo))
    return runs


def find_run(config: dict[str, Any], run: str, suite: str | None = None) -> Run:
    for r in suite_runs(config, suite):
        if r.run == run:
            return r
    raise ConfigError(f"run {run!r} is not in suite {suite or config['suite']!r}")
