"""One scoring job: get the weights of (run, step), score every head, release the weights.

The result is one tidy row per head (mechgen.schema.HEAD_COLUMNS) and a provenance record (the
JSON sidecar): which commit and weight blob were scored, how many sentences and tokens, the wall
time and the library versions. A checkpoint that does not exist on the hub is not an error of
the sweep: it yields zero rows and a sidecar with ``status: "missing"``.

Score cache. Several Pythia branches hold byte-identical weights (e.g. ``step0`` and ``step1``).
A checkpoint's per-head scores are a function of: the weight file's bytes (its sha256, known from
the hub's metadata *before* downloading), the architecture (``config.json``, minus bookkeeping
keys), the evaluation token ids (their sha256), ``clipped_window``, the dtype, the metric code
(:data:`SCORE_CACHE_VERSION`), the catalog versions of the mechanisms the entry holds
(:data:`CACHED_MECHANISMS`; bumping one's ``version`` makes every entry holding its scores a
miss), the torch/transformers versions and, when they are scored, the relational settings with
:data:`mechgen.scoring.circuit.CIRCUIT_VERSION` (:func:`mechgen.scoring.circuit.cache_record`) and the
weight-based mechanisms' task data (:meth:`mechgen.model.weight_scores.WeightTasks.record`). The sha256 of all of these
is the cache key; ``batch_size`` is left out because it does not change the value (padding is
masked; only float rounding differs, ~1e-7). With a cache directory (the pipeline uses
``results/<suite>/score_cache/``), each scored checkpoint leaves ``<key>.parquet`` there (per-head
metric columns + layer/head, the n_layers/n_heads/n_params/n_sentences/n_tokens and the origin
(run, revision) in the Parquet metadata). A later checkpoint with the same key costs no download
and no forward pass: its rows are the cached metrics with its own ids, and its sidecar says
``status: "ok"``, ``duplicate_of: "stepN"`` (the origin's revision; ``duplicate_of_run`` names
the origin's run). Entries are written to a temporary file and ``os.replace``d, so readers never
see a partial file; while one job scores a blob it holds an ``flock`` on
``score_cache/.locks/<weights sha256>.lock``, so a concurrent job with the same weights waits and
then reads the cache instead of downloading them again. The cache is not a Snakemake output:
``snakemake --delete-all-output`` leaves it; delete the folder to force rescoring.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

import mechgen
from mechgen.atomic import atomic_path
from mechgen.config import Run
from mechgen.mechanisms import get as get_mechanism
from mechgen.model import adapter as architectures
from mechgen.model import weight_scores
from mechgen.model.fingerprint import weight_fingerprint
from mechgen.schema import (
    ATTENTION_METRICS,
    FLAG_COLUMNS,
    HEAD_COLUMNS,
    ID_COLUMNS,
    WEIGHT_COLUMNS,
)
from mechgen.scoring import circuit, metrics
from mechgen.sources import checkpoints as sources
from mechgen.sources.hubcache import file_lock
from mechgen.tables.circuit_files import add_circuit_columns, empty_circuit, load_circuit

SCORE_CACHE_VERSION = 1
"""Bump when mechgen.scoring.metrics changes what a metric means: every cached score is then ignored."""

VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache", "_commit_hash"}
)
"""``config.json`` keys that do not change a checkpoint's attention in float32 (bookkeeping,
the saved dtype, the KV cache switch): left out of the cache key."""

CACHED_MECHANISMS: dict[str, tuple[str, ...]] = {
    # The evaluation-sentence pass (mechgen.scoring.metrics.score_heads): always scored.
    "scores": ("previous_token", "locality"),
    # The [random]x2 passes and their positional control (mechgen.scoring.circuit): relational on.
    "circuit": ("induction", "duplicate_token", "in_context_retrieval"),
    # From the weights alone (mechgen.model.weight_scores): when their task data is given.
    "weights": ("successor", "copy_suppression"),
}
"""Catalog mechanisms (:mod:`mechgen.mechanisms`) whose scores each part of a cache entry holds;
their versions are part of the key (:func:`score_cache_key`)."""

CACHE_COLUMNS = ["layer", "head", *ATTENTION_METRICS, *FLAG_COLUMNS]
"""Columns every score-cache entry holds; an entry keyed with weight tasks also holds
:data:`mechgen.schema.WEIGHT_COLUMNS` (:func:`cached_columns`)."""
_CACHE_METADATA_KEY = b"mechgen.score_cache"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that determine a score, for the sidecar."""
    # transformers and huggingface_hub (seconds of imports) only when a sidecar is written
    import huggingface_hub
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "mechgen": getattr(mechgen, "__version__", "0"),
    }


def empty_head_table() -> pd.DataFrame:
    """A zero-row per-head table with the right columns and dtypes (for a missing checkpoint)."""
    dtypes: dict[str, str] = {c: "float64" for c in ATTENTION_METRICS}
    dtypes.update({c: "bool" for c in FLAG_COLUMNS})
    dtypes.update({c: "int64" for c in ID_COLUMNS})
    for c in ("suite", "model", "size", "run"):
        dtypes[c] = "string"
    return pd.DataFrame({c: pd.Series(dtype=dtypes[c]) for c in HEAD_COLUMNS})


def identify(
    scores: pd.DataFrame,
    run: Run,
    step: int,
    tokens_per_step: int,
    n_layers: int,
    n_heads: int,
    n_params: int,
) -> pd.DataFrame:
    """Add the id columns of mechgen.schema to a per-head score table (layer, head, metrics)."""
    out = scores.copy()
    out["suite"] = run.suite
    out["model"] = run.model
    out["size"] = run.size
    out["seed"] = run.seed
    out["run"] = run.run
    out["step"] = step
    out["tokens_seen"] = step * tokens_per_step
    out["n_layers"] = n_layers
    out["n_heads"] = n_heads
    out["n_params"] = n_params
    extra = [c for c in out.columns if c not in HEAD_COLUMNS]
    return out[[c for c in HEAD_COLUMNS if c in out.columns] + extra]


# --------------------------------------------------------------------------- score cache


def cached_columns(scores: pd.DataFrame) -> list[str]:
    """:data:`CACHE_COLUMNS` and the weight-based columns ``scores`` has (all or none)."""
    return CACHE_COLUMNS + [c for c in WEIGHT_COLUMNS if c in scores.columns]


def token_ids_sha256(token_ids: list[list[int]]) -> str:
    """sha256 (64 hex) of the evaluation token ids: of ``json.dumps(ids, separators=(",", ":"))``,
    so the same sentences in the same order with the same ids hash alike, whatever produced them."""
    canonical = json.dumps(
        [[int(t) for t in sentence] for sentence in token_ids], separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def model_config_sha256(config_path: str | Path) -> str:
    """sha256 of a checkpoint's ``config.json`` as canonical JSON (sorted keys), without
    :data:`VOLATILE_CONFIG_KEYS`: two checkpoints with the same architecture hash alike even if
    saved by different transformers versions."""
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path}: cannot read the model config ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: the model config is not a JSON object")  # noqa: TRY004 - bad content
    kept = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(
        json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def mechanism_versions(circuit: bool, weights: bool = False) -> dict[str, int]:
    """{name: catalog version} of the mechanisms a cache entry holds: those of
    :data:`CACHED_MECHANISMS` ``"scores"``, plus ``"circuit"`` when the relational scores are on
    and ``"weights"`` when the weight-based ones are."""
    parts = ("scores",) + (("circuit",) if circuit else ()) + (("weights",) if weights else ())
    return {name: get_mechanism(name).version for part in parts for name in CACHED_MECHANISMS[part]}


def score_cache_key(
    weights_sha256: str,
    config_sha256: str,
    tokens_sha256: str,
    clipped_window: int,
    versions: Mapping[str, str] | None = None,
    circuit: Mapping[str, Any] | None = None,
    weights: Mapping[str, Any] | None = None,
    mechanisms: Mapping[str, int] | None = None,
) -> tuple[str, dict[str, Any]]:
    """(key, fields): the key is the sha256 of the canonical JSON of ``fields`` = everything
    that determines a checkpoint's per-head scores (see the module docstring). ``versions``
    defaults to the installed torch and transformers; ``mechanisms`` ({name: version}) to
    :func:`mechanism_versions` of the catalog (with the circuit and weights parts when
    ``circuit`` and ``weights`` are given)."""
    if versions is None:  # transformers (seconds of imports) only when the caller has no versions
        import torch
        import transformers

        versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    fields = {
        "version": SCORE_CACHE_VERSION,
        "weights_sha256": weights_sha256,
        "config_sha256": config_sha256,
        "tokens_sha256": tokens_sha256,
        "clipped_window": int(clipped_window),
        "dtype": "float32",
        "torch": versions["torch"],
        "transformers": versions["transformers"],
        "mechanisms": {
            str(name): int(version)
            for name, version in (
                mechanism_versions(circuit is not None, weights is not None)
                if mechanisms is None
                else mechanisms
            ).items()
        },
    }
    if circuit is not None:
        # The relational settings and mechgen.scoring.circuit.CIRCUIT_VERSION (circuit.cache_record):
        # their arrays are cached with the scores (<key>.circuit.npz), so other settings or
        # another version are another entry. Absent when relational is off, so those keys
        # are unchanged.
        fields["circuit"] = dict(circuit)
    if weights is not None:
        # The weight-based mechanisms' task data and convention (WeightTasks.record()): their
        # columns are cached with the scores. Absent when off, so those keys are unchanged.
        fields["weights"] = dict(weights)
    key = hashlib.sha256(
        json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    return key, fields


class ScoreCache:
    """Scores keyed by :func:`score_cache_key`: one Parquet file per key in ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        """``<directory>/<key>.parquet``."""
        return self.directory / f"{key}.parquet"

    def lock(self, weights_sha256: str) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock (across processes) on one weight blob, held while scoring it."""
        return file_lock(self.directory / ".locks" / f"{weights_sha256}.lock")

    def get(self, key: str) -> tuple[pd.DataFrame, dict[str, Any]] | None:
        """(scores with :data:`CACHE_COLUMNS`, metadata) or None if absent or unreadable."""
        import logging

        import pyarrow.parquet as pq

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            table = pq.read_table(path)
            meta = json.loads(table.schema.metadata[_CACHE_METADATA_KEY])
            frame = table.to_pandas()
            scores = frame[cached_columns(frame)]
        except Exception as err:  # noqa: BLE001 - a damaged entry is a miss, never a wrong score
            logging.getLogger(__name__).warning(
                "score cache entry %s unreadable (%s): ignored", path, err
            )
            return None
        if meta.get("key") != key:
            return None
        return scores, meta

    def put(self, key: str, scores: pd.DataFrame, meta: Mapping[str, Any]) -> Path:
        """Store ``scores`` (its :func:`cached_columns`) and ``meta`` under ``key`` atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.directory.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(
            scores[cached_columns(scores)].reset_index(drop=True), preserve_index=False
        )
        record = dict(meta, key=key)
        table = table.replace_schema_metadata(
            {
                **(table.schema.metadata or {}),
                _CACHE_METADATA_KEY: json.dumps(record, default=str).encode(),
            }
        )
        path = self.path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


# --------------------------------------------------------------------------- the job


@dataclass
class _Job:
    """What one scoring job knows besides the weights: its inputs, the cache and the sidecar
    being filled. ``circuit_result`` is set by a cache hit with circuit arrays or by scoring."""

    run: Run
    step: int
    revision: str
    token_ids: list[list[int]]
    tokens_per_step: int
    batch_size: int
    clipped_window: int
    progress: bool
    hub: Any
    versions: dict[str, str]
    sidecar: dict[str, Any]
    started: float
    cache: ScoreCache | None
    circuit_settings: Any
    circuit_path: str | Path | None
    weight_tasks: Any
    circuit_record: dict[str, Any] | None = None
    weight_record: dict[str, Any] | None = None
    circuit_result: Any = None
    one_back_seconds: float | None = None

    def cache_key(self, config_file: str | Path, weights_sha256: str) -> str:
        """:func:`score_cache_key` of this job's inputs and a weight blob."""
        return score_cache_key(
            weights_sha256,
            model_config_sha256(config_file),
            token_ids_sha256(self.token_ids),
            self.clipped_window,
            self.versions,
            self.circuit_record,
            self.weight_record,
        )[0]

    def circuit_cache_path(self, key: str) -> Path:
        return self.cache.path(key).with_suffix(".circuit.npz")

    def cached(self, key: str | None) -> tuple[pd.DataFrame, dict[str, Any]] | None:
        """The cache entry of ``key`` (None: a miss). With relational scores on, an entry is
        usable only with its circuit arrays (they are written before the scores, so a scores
        file without them is from an interrupted job); they are loaded into ``circuit_result``."""
        if key is None:
            return None
        entry = self.cache.get(key)
        if entry is None or self.circuit_settings is None:
            return entry
        try:
            self.circuit_result = load_circuit(self.circuit_cache_path(key))
        except (OSError, ValueError):
            return None
        return entry

    def missing(self, exc: Exception) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The result of a checkpoint the hub does not have: no rows, ``status: "missing"``."""
        self.sidecar.update(
            status="missing", reason=str(exc), wall_seconds=time.perf_counter() - self.started
        )
        if self.circuit_path is not None:
            empty_circuit(str(exc)).save(self.circuit_path)
        return empty_head_table(), self.sidecar


def _score_model(job: _Job, model: Any) -> tuple[pd.DataFrame, dict[str, int]]:
    """Every head of a loaded model: the 1-back pass (with the relational accumulators riding
    along), the relational scores and the weight-based columns. Returns the per-head table and
    the model's n_layers, n_heads and n_params (read through its architecture adapter)."""
    adapter = architectures.for_model(model)
    n_layers, n_heads, _, _ = adapter.shape(model)
    size = {"n_layers": n_layers, "n_heads": n_heads, "n_params": adapter.n_params(model)}
    ride = (
        circuit.ride_along(model, job.circuit_settings)
        if job.circuit_settings is not None
        else contextlib.nullcontext()
    )
    one_back_started = time.perf_counter()
    with ride as accumulators:
        result = metrics.score_heads(
            model,
            job.token_ids,
            batch_size=job.batch_size,
            clipped_window=job.clipped_window,
            progress=job.progress,
        )
    job.one_back_seconds = time.perf_counter() - one_back_started
    # Weight-based mechanisms (successor heads, copy suppression, copying): from the loaded
    # weights alone, no pass over text; before the circuit scores, whose detail step picks
    # every mechanism's strongest head from this table.
    if job.weight_tasks is not None:
        result = weight_scores.add_weight_columns(result, model, job.weight_tasks)
    if job.circuit_settings is not None:
        job.circuit_result = circuit.score_circuit(
            model, result, accumulators, job.circuit_settings, job.token_ids
        )
    return result, size


def _cache_metadata(
    job: _Job, files: Any, result: pd.DataFrame, size: dict[str, int], fingerprint: Any
) -> dict:
    """The metadata a cache entry (and this job's sidecar) keeps of a freshly scored blob,
    ``fingerprint`` the weights' (:func:`mechgen.model.fingerprint.weight_fingerprint`)."""
    token_ids = job.token_ids
    return {
        "origin": {
            "run": job.run.run,
            "repo_id": job.run.repo_id,
            "revision": job.revision,
            "commit": files.commit,
        },
        "weights_sha256": files.sha256,
        "n_layers": int(size["n_layers"]),
        "n_heads": int(size["n_heads"]),
        "n_params": int(size["n_params"]),
        "n_sentences": int(result.attrs.get("n_sentences", len(token_ids))),
        "n_tokens": int(result.attrs.get("n_tokens", sum(len(t) for t in token_ids))),
        "n_sentences_too_short": int(result.attrs.get("n_sentences_too_short", 0)),
        "weight_fingerprint": fingerprint,
    }


@dataclass
class _Scored:
    """A job's scores (fresh or from the cache) and what they came from."""

    scores: pd.DataFrame
    meta: dict[str, Any]
    key: str | None
    hit: bool
    files: Any
    freed: int


def _download_and_score(job: _Job, ref: Any, delete_weights: bool) -> _Scored:
    """The scores of ``ref``: from the cache when its key is there, else downloaded, loaded,
    scored (and cached), holding the blob's lock meanwhile. Raises
    :class:`mechgen.sources.checkpoints.MissingCheckpoint` when the hub has no such checkpoint after all."""
    cache = job.cache
    key = job.cache_key(ref.config_file, ref.sha256) if cache is not None and ref.sha256 else None
    files = None
    freed = 0
    result = size = None
    locked = cache.lock(ref.sha256) if key is not None else contextlib.nullcontext()
    with locked:
        hit = job.cached(key)
        if hit is None:
            files = sources.download_checkpoint(ref, hub=job.hub)
            try:
                if cache is not None and key is None:  # sha256 known only after the download
                    key = job.cache_key(ref.config_file, files.sha256)
                    hit = job.cached(key)
                if hit is None:
                    model = sources.load_model(files)
                    result, size = _score_model(job, model)
                    fingerprint = weight_fingerprint(model)  # for the lineage check
                    del model
            finally:
                freed = sources.release(files) if delete_weights else 0
        if hit is not None:
            scores, meta = hit
            return _Scored(scores, meta, key, True, files, freed)
        meta = _cache_metadata(job, files, result, size, fingerprint)
        if cache is not None and key is not None:
            if job.circuit_result is not None:
                job.circuit_result.save(job.circuit_cache_path(key))
            cache.put(key, result, meta)
        return _Scored(result, meta, key, False, files, freed)


def _finish_sidecar(job: _Job, ref: Any, scored: _Scored, table: pd.DataFrame) -> None:
    """Fill the sidecar of a scored checkpoint (status ok): provenance, sizes, cache use."""
    sidecar = job.sidecar
    meta = scored.meta
    if job.circuit_result is not None:
        sidecar["relational"] = {
            **job.circuit_result.record,
            # 1-back scoring with the ride-along hooks, for the cost ratio of the relational scores.
            "one_back_seconds": job.one_back_seconds,
        }
        layer_scores = job.circuit_result.layer_scores()
        if layer_scores:
            # Per layer-unit mechanism, its value per layer: the aggregate's layers.parquet.
            sidecar["layer_scores"] = layer_scores
    if job.weight_record is not None:
        sidecar["weight_mechanisms"] = job.weight_record
    sidecar.update(
        status="ok",
        commit=ref.commit,
        sha256=meta["weights_sha256"],
        weight_format=ref.weight_format,
        weight_bytes=ref.size_bytes,
        n_sentences=meta["n_sentences"],
        n_tokens=meta["n_tokens"],
        n_params=meta["n_params"],
        nonfinite_heads=int(table["nonfinite"].sum()),
        # None from a cache entry written before fingerprints existed.
        weight_fingerprint=meta.get("weight_fingerprint"),
    )
    files = scored.files
    if not scored.hit:
        checkpoint = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(files).items()}
        sidecar.update(
            weight_bytes=files.size_bytes,
            weights_downloaded=files.from_hub,
            weights_deleted_bytes=scored.freed,
            checkpoint=checkpoint,
        )
    else:
        origin = meta["origin"]
        if (origin["run"], origin["revision"]) != (job.run.run, job.revision):
            sidecar.update(duplicate_of=origin["revision"], duplicate_of_run=origin["run"])
        sidecar.update(
            weights_downloaded=bool(files is not None and files.from_hub),
            weights_deleted_bytes=scored.freed,
        )
    if job.cache is not None:
        sidecar["score_cache"] = {
            "key": scored.key,
            "hit": scored.hit,
            "path": str(job.cache.path(scored.key)) if scored.key else None,
        }
    sidecar["wall_seconds"] = time.perf_counter() - job.started


def score_checkpoint(
    run: Run,
    step: int,
    token_ids: list[list[int]],
    *,
    tokens_per_step: int,
    batch_size: int = 16,
    clipped_window: int = 8,
    delete_weights: bool = True,
    threads: int | None = None,
    progress: bool = False,
    score_cache_dir: str | Path | None = None,
    hub: Any = None,
    circuit_settings: Any = None,
    circuit_path: str | Path | None = None,
    weight_tasks: Any = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score every head of ``run`` at ``step`` on ``token_ids`` (one list of ids per sentence).

    Returns the per-head table and the sidecar record. Raises
    :class:`mechgen.sources.checkpoints.CorruptCheckpoint` for a corrupt weight file; a missing revision
    returns an empty table with ``status == "missing"``. ``score_cache_dir`` (None: no cache)
    enables the score cache of the module docstring; ``hub`` is a
    :class:`mechgen.sources.checkpoints.HubSettings` or the config's ``hub`` mapping (None: the defaults).
    The loaded model is read through its architecture adapter (:mod:`mechgen.model.adapter`,
    chosen by its ``config.model_type``).

    ``circuit_settings`` (a :class:`mechgen.scoring.circuit.CircuitSettings`; None: off) adds the
    relational/configurational scores of the same loaded model (:mod:`mechgen.scoring.circuit`): the
    table gets ``induction``, ``induction_control`` and ``copying_accuracy`` columns, the
    sidecar a ``relational`` record and ``layer_scores`` (per layer-unit mechanism, e.g.
    ``in_context_retrieval``, its value per layer, which the aggregate writes to layers.parquet),
    and the arrays are written to ``circuit_path`` (an empty
    file for a missing checkpoint). With the score cache they are cached next to the scores.

    ``weight_tasks`` (a :class:`mechgen.model.weight_scores.WeightTasks`; None: off) adds the
    weight-based mechanisms' columns (:data:`mechgen.schema.WEIGHT_COLUMNS`: successor heads,
    copy suppression, copying), computed from the loaded weights alone, and a
    ``weight_mechanisms`` record to the sidecar; they are cached with the scores.
    """
    import torch

    settings = (
        hub
        if isinstance(hub, sources.HubSettings) or hub is None
        else sources.HubSettings.from_config(hub)
    )
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    versions = library_versions()
    revision = sources.revision_name(step, run.architecture)
    job = _Job(
        run=run,
        step=step,
        revision=revision,
        token_ids=token_ids,
        tokens_per_step=tokens_per_step,
        batch_size=batch_size,
        clipped_window=clipped_window,
        progress=progress,
        hub=settings,
        versions=versions,
        sidecar={
            "suite": run.suite,
            "run": run.run,
            "repo_id": run.repo_id,
            "revision": revision,
            "step": step,
            "tokens_seen": step * tokens_per_step,
            "scoring": {"batch_size": batch_size, "clipped_window": clipped_window},
            "versions": versions,
            "mechanisms": mechanism_versions(circuit_settings is not None),
        },
        started=started,
        cache=ScoreCache(score_cache_dir) if score_cache_dir is not None else None,
        circuit_settings=circuit_settings,
        circuit_path=circuit_path,
        weight_tasks=weight_tasks,
        circuit_record=(
            circuit.cache_record(circuit_settings) if circuit_settings is not None else None
        ),
        weight_record=weight_tasks.record() if weight_tasks is not None else None,
    )
    try:
        ref = sources.resolve_checkpoint(run, step, hub=settings)
        scored = _download_and_score(job, ref, delete_weights)
    except sources.MissingCheckpoint as exc:
        return job.missing(exc)

    meta = scored.meta
    table = identify(
        scored.scores[cached_columns(scored.scores)],
        run,
        step,
        tokens_per_step,
        meta["n_layers"],
        meta["n_heads"],
        meta["n_params"],
    )
    if job.circuit_result is not None:
        table = add_circuit_columns(table, job.circuit_result)
        if circuit_path is not None:
            job.circuit_result.save(circuit_path)
    _finish_sidecar(job, ref, scored, table)
    return table, job.sidecar


def write_result(
    table: pd.DataFrame, sidecar: dict[str, Any], table_path: str | Path, sidecar_path: str | Path
) -> None:
    """Write the per-head Parquet file and the JSON sidecar of one scoring job, each atomically.

    The sidecar is written last: a sidecar next to a table means the table is complete.
    """
    with atomic_path(table_path) as tmp:
        table.to_parquet(tmp, index=False)
    with atomic_path(sidecar_path) as tmp, open(tmp, "w") as fh:
        json.dump(sidecar, fh, indent=2, sort_keys=True, default=str)
