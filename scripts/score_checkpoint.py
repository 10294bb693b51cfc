"""Snakemake script of rule `score`: score every head of one (run, step) checkpoint."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import setup_logging  # noqa: E402

from mechgen.circuit import CircuitSettings  # noqa: E402
from mechgen.config import Run  # noqa: E402
from mechgen.scoring import score_checkpoint, write_result  # noqa: E402
from mechgen.sources import CorruptCheckpoint, HubUnavailable  # noqa: E402

log = setup_logging(snakemake)  # noqa: F821
sm = snakemake  # noqa: F821
run = Run(**sm.params.run)
step = int(sm.wildcards.step)
with open(sm.input.tokens) as fh:
    token_ids = json.load(fh)["token_ids"]
scoring = sm.config["scoring"]  # validated: every key present

# Read from the config, not params: neither changes a score, so neither may trigger a rerun.
# The score cache (identical weight blobs scored once) lives in results/<suite>/score_cache/.
score_cache_dir = Path(sm.config["results_dir"]) / sm.config["suite"] / "score_cache"
hub = sm.config["hub"]

# The relational/configurational scores of the same loaded model (mechgen.circuit); an empty
# mapping when relational.enabled is false.
relational = dict(sm.params.get("relational") or {})
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
        progress=True,
        score_cache_dir=score_cache_dir,
        hub=hub,
        circuit_settings=circuit_settings,
        circuit_path=sm.output.get("circuit"),
    )
except CorruptCheckpoint as exc:
    # One clear line instead of a stack trace from deep inside safetensors/torch.
    log.error("cannot score %s step %d: %s", run.run, step, exc)
    sys.exit(f"mechgen: {exc}")  # the message starts "corrupt checkpoint: <file>: ..."
except HubUnavailable as exc:
    log.error("cannot score %s step %d: %s", run.run, step, exc)
    sys.exit(f"mechgen: hub unavailable: {exc}")
write_result(table, sidecar, sm.output.table, sm.output.sidecar)
log.info(
    "%s step %d: %s, %d heads, %.1f s",
    run.run,
    step,
    sidecar["status"],
    len(table),
    sidecar["wall_seconds"],
)
