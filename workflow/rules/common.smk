# Shared set-up: validate the config at start, expand the selected suite into runs and steps.
import sys
from pathlib import Path

# The rules call scripts that import mechgen; make the checkout importable even without install.
sys.path.insert(0, str(Path(workflow.basedir)))

from snakemake.exceptions import WorkflowError

from mechgen import mechanisms as mechanisms_catalog
from mechgen.architectures import DEFAULT_ARCHITECTURE, revision_name
from mechgen.config import (
    ConfigError,
    relational_settings,
    suite_runs,
    suite_steps,
    tokens_per_step,
    toy_training,
    validate_config,
)

try:
    _validated = validate_config(config)
except ConfigError as exc:
    raise WorkflowError(f"invalid configuration: {exc}") from None
config.update(_validated)

SUITE = config["suite"]
SPEC = config["suites"][SUITE]
SOURCE = SPEC["source"]
RES = f"{config['results_dir']}/{SUITE}"
RUNS = {r.run: r for r in suite_runs(config)}
STEPS = suite_steps(config) if SOURCE != "table" else []
TOKENS_PER_STEP = tokens_per_step(config)  # a table suite: Pythia's
# Validated: every key of these carries its value or the schema's default.
SCORING = config["scoring"]
ANALYSIS = config["analysis"]


wildcard_constraints:
    run="[A-Za-z0-9._-]+",
    tokens="[A-Za-z0-9._-]+",
    step="[0-9]+",


def run_info(run):
    """The Run record of a wildcard value, as a plain dict for script params. `architecture` only
    when it is not the default, so that the params (a rerun trigger) of GPT-NeoX suites are
    what they were before families existed."""
    r = RUNS[run]
    info = {
        "suite": r.suite,
        "run": r.run,
        "model": r.model,
        "size": r.size,
        "seed": r.seed,
        "source": r.source,
        "repo_id": r.repo_id,
    }
    if r.architecture != DEFAULT_ARCHITECTURE:
        info["architecture"] = r.architecture
    return info


def score_files():
    return [f"{RES}/scores/{run}/step{step}.parquet" for run in RUNS for step in STEPS]


def final_targets():
    """What `snakemake` builds by default: the per-head tables, statistics and figures.
    (The HTML report is built by `snakemake --report`, which `mechgen.sh run` calls.)"""
    return [f"{RES}/heads.parquet", f"{RES}/trajectories.csv"] + analysis_targets()


# Resources of a scoring job by model size (MB of memory, minutes of wall time). Pythia-410m in
# float32 is 1.6 GB of weights; the attention of a 70-token sentence is small beside it.
_SCORE_RESOURCES = {
    "14m": (2000, 10),
    "31m": (2500, 10),
    "70m": (3000, 15),
    "160m": (4000, 20),
    "160m-data": (4000, 20),
    "160m-weight": (4000, 20),
    "410m": (8000, 40),
    # CRFM GPT-2 medium (355M; small, 124M, fits the default).
    "medium": (5000, 30),
}


def score_mem_mb(size):
    return _SCORE_RESOURCES.get(size, (2000, 10))[0]


def score_runtime_min(size):
    return _SCORE_RESOURCES.get(size, (2000, 10))[1]


# ---- inputs and targets of the rules (Snakemake lint wants functions here, not beside rules)

EVAL = SPEC.get("eval")  # the schema's default for every source but `table` (which has none)


STATS = [
    "per_seed",
    "per_model",
    "regressions",
    "convergence",
    "mds",
    "functional_run_step",
    "functional_run",
    "functional_size",
    "positional_run_step",
    "positional_size_step",
]
FIGURES = [
    "trajectories",
    "layer_heatmap",
    "size_effects",
    "correlation_matrix",
    "mds",
    "functional_heads",
]


def eval_corpus_input(wildcards):
    # A user's corpus file is an input, so editing it rescores everything downstream.
    return [EVAL["path"]] if EVAL["kind"] == "file" else []


def tokenizer_input(wildcards):
    # The toy suite's tokenizer is built by the pipeline; other sources fetch their own.
    return [f"{RES}/tokenizer/tokenizer.json"] if SOURCE == "toy" else []


TOY_SUITE_TOKENS = "suite"
"""The key of a toy suite's one evaluation token file (no run id has this form: ids end in
-seed<N>)."""


def eval_tokens_key(run):
    """Whose tokenizer a run's evaluation token ids come from, as the key of their file: a toy
    suite's runs all use the tokenizer the pipeline trains for the suite (one file for all of
    them, so adding a run tokenizes nothing); any other run reads its own tokenizer."""
    return TOY_SUITE_TOKENS if SOURCE == "toy" else run


def eval_token_file(run):
    return f"{RES}/eval/tokens/{eval_tokens_key(run)}.json"


def run_token_files():
    """{run: its evaluation token file}, for the rules whose nulls need each run's sentence
    lengths (a param: the files themselves are inputs through eval_token_files)."""
    return {} if SOURCE == "table" else {run: eval_token_file(run) for run in RUNS}


def score_inputs(wildcards):
    inputs = {"tokens": eval_token_file(wildcards.run)}
    if SOURCE == "toy":
        inputs["manifest"] = f"{RES}/hub/{wildcards.run}/manifest.json"
    return inputs


def analysis_targets():
    return [f"{RES}/stats/{name}.csv" for name in STATS] + [
        f"{RES}/figures/{name}.png" for name in FIGURES
    ]


def eval_token_files(wildcards):
    # The uniform-attention baseline depends on the evaluation sentences' lengths.
    return sorted(set(run_token_files().values()))


def tokenizer_revision():
    """The revision whose tokenizer files a run uses: the suite's `tokenizer_revision`, else for
    the hub the last scheduled step (named as the suite's family names it: stepN, checkpoint-N);
    local and toy runs read the tokenizer saved with the run
    (None), so extending their schedule never changes it."""
    if "tokenizer_revision" in SPEC:
        return SPEC["tokenizer_revision"]
    if SOURCE == "hf":
        return revision_name(STEPS[-1], SPEC["architecture"]) if STEPS else "main"
    return None


# ---- the relational and configurational axes (rules in relational.smk)

RELATIONAL = config["relational"]
RELATIONAL_ENABLED = SOURCE != "table" and bool(RELATIONAL["enabled"])
RELATIONAL_STATS = [
    "relational",
    "relational_sizes",
    "relational_regressions",
    "configurational",
    "configurational_stability",
]
RELATIONAL_FIGURES = [
    "relational_trajectories",
    "onset_lag",
    "ablation",
    "configurational",
]


def relational_detail_steps():
    """The resolved `relational.detail_steps` ("final" = the schedule's last step)."""
    wanted = RELATIONAL["detail_steps"]
    last = max(STEPS) if STEPS else None
    return sorted({last if s == "final" else int(s) for s in wanted if s != "final" or STEPS})


def relational_job_params(step):
    """The relational settings of one checkpoint's scoring: the suite's overrides over
    `relational:`, and `detail` for this step only, so changing detail_steps reruns only the
    `score` jobs of the steps whose `detail` flips (Snakemake's params trigger), not every
    checkpoint. A toy suite's `score_run` job carries the list of its steps' settings: it reruns
    when any of them flips, and reads its other checkpoints back from the score cache."""
    if not RELATIONAL_ENABLED:
        return {}
    settings = relational_settings(config)
    settings["detail"] = int(step) in relational_detail_steps()
    return settings


def circuit_files():
    return [f"{RES}/scores/{run}/step{step}.circuit.npz" for run in RUNS for step in STEPS]


def relational_targets():
    if not RELATIONAL_ENABLED:
        return []
    return [f"{RES}/stats/{name}.csv" for name in RELATIONAL_STATS] + [
        f"{RES}/figures/{name}.png" for name in RELATIONAL_FIGURES
    ]


# ---- the mechanism catalog on the table side (rules in mechanisms.smk)

MECHANISMS = list(SPEC["mechanisms"])  # validated: the schema's default is the whole catalog
MECHANISM_TABLES = [
    "functional_run_step",
    "functional_size",
    "per_seed",
    "positional_size",
    "convergence",
    "configurational",
]
CROSS_STATS = [
    "profile",
    "mechanism_order",
    "mechanism_lags",
    "links",
    "links_sizes",
]


def mechanism_inputs(wildcards):
    inputs = {"heads": f"{RES}/heads.parquet", "tokens": eval_token_files(wildcards)}
    if SOURCE != "table":  # the layer-unit mechanisms' scores (a table suite imports heads only)
        inputs["layers"] = f"{RES}/layers.parquet"
    if RELATIONAL_ENABLED:
        inputs["relational"] = f"{RES}/stats/relational.csv"
        inputs["configurational"] = f"{RES}/stats/configurational.csv"
        inputs["circuits"] = circuit_files()  # composition and ablation of every declared link
    return inputs


def mechanism_null_settings():
    """The suite's resolved relational scoring settings, on which some nulls depend (the
    induction null on half_length); none for a table suite."""
    return {} if SOURCE == "table" else relational_settings(config)


def mechanism_caption_params(wildcards):
    """What the per-mechanism caption states about the mechanism (its definition)."""
    mechanism = mechanisms_catalog.get(wildcards.mechanism)
    return {
        "description": mechanism.description,
        "unit": mechanism.unit,
        "table": f"{mechanism.unit}s.parquet",
        "score_column": mechanism.score_column,
        "units": mechanism.units,
        "criterion": mechanism.criterion_text(),
        "ceiling": mechanism.ceiling,
    }


def mechanism_configurational_settings():
    """The random-head null of every mechanism's configurational table (relational.analysis;
    used only when the relational axis runs)."""
    return {key: RELATIONAL["analysis"][key] for key in ("n_null", "seed")}


def mechanism_targets():
    return [
        f"{RES}/stats/{name}/{table}.csv" for name in MECHANISMS for table in MECHANISM_TABLES
    ] + [f"{RES}/stats/{name}.csv" for name in CROSS_STATS] + [f"{RES}/figures/profile.png"] + [
        f"{RES}/figures/mechanisms/{name}.png" for name in MECHANISMS
    ]


# ---- the report's opening summary (rule in report.smk)


def summary_inputs(wildcards):
    inputs = {
        "per_model": f"{RES}/stats/per_model.csv",
        "functional": f"{RES}/stats/functional_size.csv",
        "positional": f"{RES}/stats/positional_size_step.csv",
    }
    if RELATIONAL_ENABLED:
        inputs["relational_sizes"] = f"{RES}/stats/relational_sizes.csv"
    return inputs


# ---- data order or initialisation (rules in seeds.smk)

SEEDS_ENABLED = SOURCE != "table" and bool(SPEC.get("variation"))


def seed_runs(fields):
    """Per run its id and the Run fields ``fields`` (kind, init_group, base_size), for params."""
    return [{f: getattr(r, f) for f in ("run", *fields)} for r in RUNS.values()]


def seed_sources_inputs(wildcards):
    inputs = {
        "heads": f"{RES}/heads.parquet",
        "layers": f"{RES}/layers.parquet",  # the layer-unit mechanisms' trajectories
        "tokens": eval_token_files(wildcards),
        "per_seed": [f"{RES}/stats/{name}/per_seed.csv" for name in MECHANISMS],
        "lineage": f"{RES}/stats/lineage.csv",
    }
    if RELATIONAL_ENABLED:
        inputs["relational"] = f"{RES}/stats/relational.csv"
    return inputs


def seeds_targets():
    if not SEEDS_ENABLED:
        return []
    return [
        f"{RES}/stats/seed_sources.csv",
        f"{RES}/stats/lineage.csv",
        f"{RES}/figures/seed_sources.png",
    ]
