"""Snakemake script of rules `score` and `score_run`: score every head of checkpoints of one run.

Rule `score` (hf and local suites) scores one (run, step) checkpoint, the step from its wildcard.
Rule `score_run` (toy suites) scores every scheduled checkpoint of one run in this one process,
one after another, with the same per-checkpoint outputs: its params carry the steps, its named
outputs are lists in the same order. Each checkpoint's scores go to the score cache as soon as
it is scored, so a rerun of a killed or failed `score_run` job reads the checkpoints it had
finished from the cache instead of scoring them again.
"""

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import setup_logging

# Before anything imports transformers: its "Loading weights" bar reads this at import time.
setup_logging(snakemake)  # noqa: F821

from mechgen.config import Run, suite_steps
from mechgen.model.weight_scores import WeightTasks
from mechgen.progress import format_duration
from mechgen.scoring.circuit import CircuitSettings
from mechgen.scoring.job import score_checkpoint, write_result
from mechgen.sources.checkpoints import CorruptCheckpoint, HubUnavailable

sm = snakemake  # noqa: F821
log = logging.getLogger(f"mechgen.{sm.rule}")
run = Run(**sm.params.run)
with open(sm.input.tokens) as fh:
    eval_tokens = json.load(fh)
token_ids = eval_tokens["token_ids"]
scoring = sm.config["scoring"]  # validated: every key present

# The checkpoints of this job: (step, table path, sidecar path, circuit path or None, the
# relational settings of that step - an empty mapping when relational.enabled is false).
if sm.rule == "score_run":
    steps = [int(s) for s in sm.params.steps]
    circuits = list(sm.output.get("circuit") or [None] * len(steps))
    checkpoints = list(
        zip(steps, sm.output.table, sm.output.sidecar, circuits, sm.params.relational, strict=True)
    )
else:
    checkpoints = [
        (
            int(sm.wildcards.step),
            sm.output.table,
            sm.output.sidecar,
            sm.output.get("circuit"),
            sm.params.get("relational"),
        )
    ]

# Read from the config, not params: neither changes a score, so neither may trigger a rerun.
# The score cache (identical weight blobs scored once) lives in results/<suite>/score_cache/.
score_cache_dir = Path(sm.config["results_dir"]) / sm.config["suite"] / "score_cache"
hub = sm.config["hub"]

# Weight-based mechanisms (successor heads, copy suppression): their task ids come from the
# run's tokenizer, written by rule eval_tokens next to the evaluation token ids.
weight_tasks = WeightTasks.from_eval_tokens(eval_tokens)


def _run_progress(sidecar_path: str) -> str:
    """``k/n checkpoints of <run> scored, about T left (S s per checkpoint, one at a time)``.

    Counted from the sidecars of this run's schedule that exist now (each checkpoint's sidecar
    is written last and atomically); T = (n - k) x the mean wall_seconds of those sidecars.
    """
    steps = suite_steps(sm.config)
    folder = Path(sidecar_path).parent
    seconds = []
    for s in steps:
        try:
            sidecar_s = json.loads((folder / f"step{s}.json").read_text())
            seconds.append(float(sidecar_s["wall_seconds"]))
        except (OSError, ValueError, KeyError):
            continue
    done, total = len(seconds), len(steps)
    text = f"{done}/{total} checkpoints of {run.run} scored"
    if seconds and done < total:
        mean = sum(seconds) / done
        text += (
            f", about {format_duration(mean * (total - done))} left "
            f"({mean:.1f} s per checkpoint, one at a time)"
        )
    return text


corrupt = []
for step, table_path, sidecar_path, circuit_path, relational in checkpoints:
    # The relational/configurational scores of the same loaded model (mechgen.scoring.circuit).
    relational = dict(relational or {})
    circuit_settings = CircuitSettings.from_mapping(relational) if relational else None
    try:
        table, sidecar = score_checkpoint(
            run,
            step,
            token_ids,
            tokens_per_step=int(sm.params.tokens_per_step),
            batch_size=int(scoring["batch_size"]),
            clipped_window=int(sm.params.clipped_window),
            delete_weights=bool(scoring["delete_weights"]),
            threads=sm.threads,
            # Per-batch bars of parallel jobs are noise; the run's progress is logged below.
            progress=False,
            score_cache_dir=score_cache_dir,
            hub=hub,
            circuit_settings=circuit_settings,
            circuit_path=circuit_path,
            weight_tasks=weight_tasks,
        )
    except CorruptCheckpoint as exc:
        # One clear line instead of a stack trace from deep inside safetensors/torch. The
        # other checkpoints of a `score_run` job are still scored (and cached) before it fails.
        log.error("cannot score %s step %d: %s", run.run, step, exc)
        corrupt.append(f"mechgen: {exc}")  # "mechgen: corrupt checkpoint: <file>: ..."
        continue
    except HubUnavailable as exc:
        log.error("cannot score %s step %d: %s", run.run, step, exc)
        sys.exit(f"mechgen: hub unavailable: {exc}")
    write_result(table, sidecar, table_path, sidecar_path)
    # One line per checkpoint: this checkpoint, then the run's progress.
    log.info(
        "%s step %d: %s, %d heads, %.1f s; %s",
        run.run,
        step,
        sidecar["status"],
        len(table),
        sidecar["wall_seconds"],
        _run_progress(sidecar_path),
    )
if corrupt:
    sys.exit("\n".join(corrupt))
