"""Configuration: validation of config.yaml and expansion of a suite into runs and steps.

A *suite* is a set of runs (model size x seed) and a checkpoint schedule. A *run* is one
training run, identified inside mechgen by a filesystem-safe id such as ``pythia-70m-seed3``
or ``toy-small-seed1``; every per-head table carries ``suite, model, seed, run``.

Every validation error is a :class:`ConfigError` whose message starts with the dotted key at
fault and lists the allowed values, so a bad config fails before any job starts.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mechgen.architectures import ARCHITECTURES, DEFAULT_ARCHITECTURE, family
from mechgen.mechanisms import names as mechanism_names
from mechgen.schedules import resolve_schedule
from mechgen.schema import ATTENTION_METRICS
from mechgen.settings import (
    REPEAT_SOURCES,
    SIZE_KEYS_REQUIRED,
    SUITE_SOURCES,
    TRAINING_KEYS_REQUIRED,
    CircuitSettings,
    HubSettings,
)
from mechgen.variation import VARIATION_KINDS, run_variation, size_seeds, variation_problem

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
    architecture: str = DEFAULT_ARCHITECTURE
    # What varies against the other runs of its base size (mechgen.variation): full, data or
    # weight; the toy trainer's two seeds; runs with one init_group share their initialisation.
    kind: str = "full"
    base_size: str = ""
    data_seed: int | None = None
    weight_seed: int | None = None
    init_group: str = ""


def load_yaml(path: str | Path) -> dict[str, Any]:
    with open(path) as fh:
        return yaml.safe_load(fh) or {}


def yaml_problem(path: str | Path) -> str | None:
    """What keeps ``path`` from being a config file, as ``FILE:LINE:COLUMN: message`` (line
    and column 1-based, from YAML's mark of the problem), or None if it parses as a mapping."""
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        return f"{path}: cannot read: {exc.strerror or exc}"
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = exc.problem or str(exc)
        if exc.context and exc.context_mark is not None:
            cm = exc.context_mark
            what += f" ({exc.context} started at line {cm.line + 1}, column {cm.column + 1})"
        return f"{where}: YAML syntax error: {what}"
    except yaml.YAMLError as exc:
        return f"{path}: YAML error: {exc}"
    if data is not None and not isinstance(data, dict):
        return f"{path}:1:1: a config file must be a mapping of keys, not a {type(data).__name__}"
    return None


def _schema_error_key(err: Any) -> str:
    path = ".".join(str(p) for p in err.absolute_path)
    return path or "<top level>"


def _dataclass_properties(
    cls: type, constraints: Mapping[str, Any] | None = None, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """JSON-schema ``properties`` of a settings dataclass: one entry per field, in field order,
    with ``constraints[field]`` (if any) and the field's default."""
    properties = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        entry = dict((constraints or {}).get(f.name, {}))
        if f.default is not dataclasses.MISSING:
            entry["default"] = f.default
        properties[f.name] = entry
    return properties


@functools.lru_cache(maxsize=1)
def _config_schema() -> dict[str, Any]:
    schema = load_yaml(SCHEMA_PATH)
    # Lists the code defines, injected so that no copy of them is kept by hand in the schema.
    # mechgen.scoring.circuit loads torch (about 2 s); mechgen.settings holds the definitions.
    props = schema["properties"]
    toy = props["toy"]["properties"]
    toy["sizes"]["additionalProperties"]["required"] = list(SIZE_KEYS_REQUIRED)
    toy["training"]["required"] = list(TRAINING_KEYS_REQUIRED)
    toy["training"]["properties"]["repeat_source"]["enum"] = list(REPEAT_SOURCES)
    props["analysis"]["properties"]["metric"]["enum"] = list(ATTENTION_METRICS)
    schema["$defs"]["suite"]["properties"]["source"]["enum"] = list(SUITE_SOURCES)
    architecture = schema["$defs"]["suite"]["properties"]["architecture"]
    architecture["enum"] = list(ARCHITECTURES)
    architecture["default"] = DEFAULT_ARCHITECTURE
    mechanisms = schema["$defs"]["suite"]["properties"]["mechanisms"]
    mechanisms["items"] = {"enum": mechanism_names()}
    mechanisms["default"] = mechanism_names()
    schema["$defs"]["suite"]["properties"]["training"]["properties"] = {
        k: {c: v for c, v in entry.items() if c != "default"}
        for k, entry in toy["training"]["properties"].items()
    }
    variation = schema["$defs"]["suite"]["properties"]["variation"]
    variation["additionalProperties"]["properties"]["kind"]["enum"] = list(VARIATION_KINDS)
    props["hub"]["properties"] = _dataclass_properties(HubSettings)
    constraints = schema["$defs"]["relational_scoring"]
    # `detail` is decided per scoring job from `detail_steps`, not a config key.
    scoring_keys = _dataclass_properties(CircuitSettings, constraints, skip=("detail",))
    props["relational"]["properties"].update(scoring_keys)
    # A suite's overrides carry no defaults: an absent key keeps the top-level `relational:` value.
    schema["$defs"]["suite"]["properties"]["relational"]["properties"] = {
        k: {c: v for c, v in entry.items() if c != "default"} for k, entry in scoring_keys.items()
    }
    return schema


def config_schema() -> dict[str, Any]:
    """The JSON schema of config.yaml (workflow/schemas/config.schema.yaml) with the lists the
    code defines injected: the metric, source and mechanism enums, the keys of ``hub`` and of the
    relational scoring settings (with their defaults). A fresh copy on each call."""
    return copy.deepcopy(_config_schema())


def relational_scoring_keys() -> tuple[str, ...]:
    """The relational scoring keys a suite may override (fields of
    :class:`mechgen.scoring.circuit.CircuitSettings` except the per-job ``detail``), in field order."""
    return tuple(config_schema()["$defs"]["suite"]["properties"]["relational"]["properties"])


def relational_settings(config: Mapping[str, Any], suite: str | None = None) -> dict[str, Any]:
    """The relational scoring settings of ``suite`` (default: the selected one) in a validated
    config: ``relational:``'s scoring keys, overridden by ``suites.<suite>.relational``."""
    name = suite or config["suite"]
    settings = {k: config["relational"][k] for k in relational_scoring_keys()}
    settings.update(config["suites"][name].get("relational") or {})
    return settings


def _has_defaults(schema: Any) -> bool:
    """Whether an absent object with this subschema is to be created for its children's
    defaults (not when it has required keys: only the user can give those)."""
    if not isinstance(schema, Mapping) or schema.get("required"):
        return False
    return any(
        "default" in sub or _has_defaults(sub) for sub in (schema.get("properties") or {}).values()
    )


def _filling_validator(schema: dict[str, Any]) -> Any:
    """A Draft 2020-12 validator whose ``properties`` check first fills in each property's
    ``default`` (and creates an absent object whose children have defaults), as in the
    jsonschema FAQ. Filling happens in every subschema the validator descends into, so
    defaults under ``then``/``else`` apply only when their condition holds."""
    import jsonschema  # on first validation only: importing mechgen.config stays cheap

    base = jsonschema.Draft202012Validator
    check_properties = base.VALIDATORS["properties"]

    def properties(
        validator: Any, properties: Mapping[str, Any], instance: Any, schema: Any
    ) -> Iterator[Any]:
        if validator.is_type(instance, "object"):
            for name, subschema in properties.items():
                if name in instance or not isinstance(subschema, Mapping):
                    continue
                if "default" in subschema:
                    instance[name] = copy.deepcopy(subschema["default"])
                elif _has_defaults(subschema):
                    instance[name] = {}
        yield from check_properties(validator, properties, instance, schema)

    filling = jsonschema.validators.extend(base, {"properties": properties})
    return filling(schema)


def _schema_error_message(err: Any) -> str:
    key = _schema_error_key(err)
    if err.validator == "enum":
        allowed = ", ".join(map(str, err.validator_value))
        return f"config key '{key}': {err.instance!r} is not allowed; allowed: {allowed}"
    if err.validator == "additionalProperties" and err.validator_value is False:
        allowed = list(err.schema.get("properties") or {})
        unknown = sorted(set(err.instance) - set(allowed))
        prefix = f"{key}." if err.absolute_path else ""
        return (
            f"config key '{prefix}{unknown[0]}' is unknown; allowed: "
            f"{', '.join(allowed) if allowed else '(none)'}"
        )
    return f"config key '{key}': {err.message}"


def validate_config(config: dict[str, Any], check_files: bool = True) -> dict[str, Any]:
    """Validate ``config`` against the JSON schema and mechgen's semantic rules.

    Returns a copy with every default of the schema filled in (the schema, with the lists
    injected by :func:`config_schema`, is the one place a config default is stated). Raises
    :class:`ConfigError` naming the key and, for a misspelt key or value, the allowed ones.
    ``check_files`` also checks that files the config names (corpus, table directory, the run
    folders of a ``local`` suite) exist.
    """
    config = copy.deepcopy(config)
    validator = _filling_validator(config_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError(_schema_error_message(errors[0]))

    suites = config["suites"]
    studies = config["studies"]
    if config["suite"] not in suites and config["suite"] not in studies:
        raise ConfigError(
            f"config key 'suite': unknown suite {config['suite']!r}; allowed: "
            f"{', '.join(list(suites) + list(studies))}"
        )
    # A study reads its members' tables (checked when the workflow starts), not their inputs.
    selected = set() if config["suite"] in studies else {config["suite"]}
    try:
        HubSettings.from_config(config["hub"])
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc) if "hub." in str(exc) else f"config key 'hub': {exc}") from None

    for name, spec in suites.items():
        _validate_suite(config, name, spec, check_files=check_files and name in selected)
        if spec["source"] != "table":
            try:
                CircuitSettings.from_mapping(relational_settings(config, name))
            except ValueError as exc:
                raise ConfigError(f"config key 'relational' (suite {name!r}): {exc}") from None
    if "training" in config["toy"]:
        _validate_toy_training(config["toy"]["training"])
    for name, spec in suites.items():
        if "training" in spec and spec["source"] != "toy":
            raise ConfigError(
                f"config key 'suites.{name}.training': only a toy suite trains (source 'toy')"
            )
        if "training" in spec:
            problem = repeat_min_half_problem(toy_training(config, name))
            if problem:
                raise ConfigError(f"config key 'suites.{name}.training': {problem}")
            steps = toy_training(config, name)["steps"]
            late = [s for s in suite_steps(config, name) if s > steps]
            if late:
                raise ConfigError(
                    f"config key 'suites.{name}.schedule': steps {late} exceed its training "
                    f"steps ({steps})"
                )
    for name in studies:
        _validate_study(config, name)
    return config


def _validate_study(config: dict[str, Any], name: str) -> None:
    """Study ``name`` combines known suites whose runs have distinct model names (so that the
    combined tables keep one row per model), under a name no suite has."""
    key = f"studies.{name}"
    suites = config["suites"]
    if name in suites:
        raise ConfigError(f"config key '{key}': a study cannot have the name of a suite")
    owner: dict[str, str] = {}
    for member in config["studies"][name]["combine"]:
        if member not in suites:
            raise ConfigError(
                f"config key '{key}.combine': unknown suite {member!r}; allowed: {', '.join(suites)}"
            )
        # A table suite's models are known only from its table (checked when it is read).
        for model in sorted({r.model for r in suite_runs(config, member)}):
            if model in owner:
                raise ConfigError(
                    f"config key '{key}.combine': suites {owner[model]!r} and {member!r} both "
                    f"have model {model!r}; the members of a study need distinct model names "
                    "(set a different model_prefix)"
                )
            owner[model] = member


def is_study(config: Mapping[str, Any], name: str | None = None) -> bool:
    """Whether ``name`` (default: the selected ``suite``) is an entry of ``studies``."""
    return (name or config["suite"]) in (config.get("studies") or {})


def study_members(config: Mapping[str, Any], name: str | None = None) -> list[str]:
    """The suites study ``name`` (default: the selected one) combines, in the config's order."""
    return list(config["studies"][name or config["suite"]]["combine"])


def suite_family(config: Mapping[str, Any], suite: str) -> str:
    """The model family of ``suite`` in a validated config (its ``architecture``; the
    schema states the default)."""
    return str(config["suites"][suite]["architecture"])


def _validate_toy_training(training: dict[str, Any]) -> None:
    """The cross-key rules of ``toy.training`` the schema cannot state, at start (not only when
    :func:`mechgen.sources.toy.train_run` checks them again, minutes into a run)."""
    problem = repeat_min_half_problem(training)
    if problem:
        raise ConfigError(f"config key 'toy.training.repeat_min_half': {problem}")


def repeat_min_half_problem(training: Mapping[str, Any]) -> str | None:
    """What is wrong with ``training.repeat_min_half`` given the other training keys, or None.

    It must lie in 1..seq_len // 2 (a span and its copy fit in a row), and repeat_source
    ``window`` with repeat_fraction > 0 needs it. The one statement of these rules, shared by
    config validation and :mod:`mechgen.sources.toy`.
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
        if spec["format"] == "mechgen":
            if check_files and not Path(spec["path"]).is_file():
                raise ConfigError(f"config key '{key}.path': heads table {spec['path']!r} does not exist")
        elif check_files and not Path(spec["path"]).is_dir():
            raise ConfigError(f"config key '{key}.path': directory {spec['path']!r} does not exist")
        return
    for required in ("sizes", "seeds", "schedule"):
        if required not in spec:
            raise ConfigError(f"config key '{key}.{required}' is required for source {source!r}")
    if source == "toy":
        if "training" not in config["toy"]:
            raise ConfigError(f"config key 'toy.training' is required by suite {name!r} (source 'toy')")
        toy_sizes = config["toy"].get("sizes", {})
        for size in spec["sizes"]:
            if size not in toy_sizes and size not in (spec.get("variation") or {}):
                raise ConfigError(
                    f"config key '{key}.sizes': unknown toy size {size!r}; allowed: {', '.join(toy_sizes)}"
                )
        named = _toy_schedules(config)
    else:
        named = dict(family(spec["architecture"]).schedules)
    if source == "hf":
        template = spec.get("repo_template", "")
        if "{size}" not in template or "{seed}" not in template:
            raise ConfigError(f"config key '{key}.repo_template' must contain {{size}} and {{seed}}")
        if "{name}" in template:
            fam = family(spec["architecture"])
            for size in spec["sizes"]:
                for seed in spec["seeds"]:
                    try:
                        fam.run_name(size, seed)
                    except KeyError as exc:
                        raise ConfigError(
                            f"config key '{key}.repo_template' uses {{name}}, but {exc.args[0]}"
                        ) from None
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
        if check_files:
            _check_local_runs(config, name, key)
    problem = variation_problem(spec, key, config.get("toy", {}).get("sizes", {}))
    if problem:
        raise ConfigError(problem)
    try:
        resolve_schedule(spec["schedule"], named)
    except KeyError as exc:
        raise ConfigError(f"config key '{key}.schedule': {exc.args[0]}") from None
    ev = spec["eval"]
    if ev["kind"] == "naturalstories":
        corpus = config.get("naturalstories") or {}
        for needed in ("url", "sha256"):
            if needed not in corpus:
                raise ConfigError(
                    f"config key 'naturalstories.{needed}' is required by suite {name!r} "
                    "(eval kind 'naturalstories'; config.yaml has the pinned values)"
                )
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


def _check_local_runs(config: dict[str, Any], name: str, key: str) -> None:
    """Every run folder of local suite ``name`` exists: ``<path>/<model_prefix><size>-seed<seed>``."""
    path = Path(config["suites"][name]["path"])
    if not path.is_dir():
        raise ConfigError(f"config key '{key}.path': directory {str(path)!r} does not exist")
    missing = [r for r in suite_runs(config, name) if not Path(r.repo_id).is_dir()]
    if missing:
        present = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise ConfigError(
            f"config key '{key}.path': {len(missing)} run folder(s) missing, e.g. "
            f"{missing[0].repo_id!r} (expected one folder <model_prefix><size>-seed<seed> per "
            f"run, holding step<N>/ checkpoints); folders present: {', '.join(present) or '(none)'}"
        )


def suite_spec(config: dict[str, Any], suite: str | None = None) -> dict[str, Any]:
    """The spec of ``suite`` (default: the selected one)."""
    return config["suites"][suite or config["suite"]]


def _toy_schedules(config: Mapping[str, Any]) -> dict[str, list[int]]:
    """The named schedules of a toy suite: ``toy`` = ``toy.schedule``, if the config has one."""
    return {"toy": config["toy"]["schedule"]} if "schedule" in config["toy"] else {}


def suite_steps(config: dict[str, Any], suite: str | None = None) -> list[int]:
    """Sorted checkpoint steps of ``suite`` (default: the selected one)."""
    spec = suite_spec(config, suite)
    if spec["source"] == "toy":
        named = _toy_schedules(config)
    else:
        named = dict(family(spec.get("architecture")).schedules)
    return resolve_schedule(spec["schedule"], named)


def tokens_per_step(config: dict[str, Any], suite: str | None = None) -> int:
    """Tokens seen per optimiser step in ``suite``: its ``tokens_per_step``, else for a toy
    suite ``toy.training.batch_size x seq_len``, else that of its family's published runs
    (:mod:`mechgen.architectures`; Pythia's for a table suite)."""
    spec = suite_spec(config, suite)
    if "tokens_per_step" in spec:
        return int(spec["tokens_per_step"])
    if spec["source"] == "toy":
        tr = toy_training(config, suite)
        return int(tr["batch_size"]) * int(tr["seq_len"])
    return family(spec.get("architecture")).tokens_per_step


def toy_training(config: Mapping[str, Any], suite: str | None = None) -> dict[str, Any]:
    """The toy training settings of ``suite``: ``toy.training`` with the suite's ``training``
    overrides on top."""
    spec = config["suites"][suite or config["suite"]]
    return {**config["toy"].get("training", {}), **spec.get("training", {})}


def run_id(model: str, seed: int) -> str:
    return f"{model}-seed{seed}"


def suite_runs(config: dict[str, Any], suite: str | None = None) -> list[Run]:
    """Every run of ``suite`` (default: the selected one) of a validated config, sizes outer,
    seeds inner (a size's ``variation`` entry may give its own seeds). A run's id is
    ``<model_prefix><size>-seed<seed>``. An hf ``repo_template`` may use ``{name}``, the family's
    run name of (size, seed) (the CRFM GPT-2 runs)."""
    name = suite or config["suite"]
    spec = config["suites"][name]
    source = spec["source"]
    architecture = spec.get("architecture", DEFAULT_ARCHITECTURE)
    runs = []
    for size in spec.get("sizes", []):
        model = f"{spec['model_prefix']}{size}"
        for seed in size_seeds(spec, size):
            rid = run_id(model, seed)
            if source == "hf":
                template = spec["seed0_repo_template"] if seed == 0 else spec["repo_template"]
                name_of = family(architecture).run_name if "{name}" in template else None
                repo = template.format(
                    size=size, seed=seed, name=name_of(size, seed) if name_of else ""
                )
            elif source == "toy":
                repo = str(Path(config["results_dir"]) / name / "hub" / rid)
            elif source == "local":
                repo = str(Path(spec["path"]) / rid)
            else:
                repo = ""
            v = run_variation(spec, size, int(seed), rid)
            runs.append(
                Run(name, rid, model, size, int(seed), source, repo, architecture,
                    v.kind, v.base_size, v.data_seed, v.weight_seed, v.init_group)
            )
    return runs


def find_run(config: dict[str, Any], run: str, suite: str | None = None) -> Run:
    for r in suite_runs(config, suite):
        if r.run == run:
            return r
    raise ConfigError(f"run {run!r} is not in suite {suite or config['suite']!r}")
