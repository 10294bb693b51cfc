"""Getting one checkpoint: find it, download it, verify, load, and free it again.

A run's checkpoints live either on the Hugging Face hub (``source: hf``; one branch per
checkpoint, named by the run's family (:mod:`mechgen.architectures`): ``stepN`` for GPT-NeoX, e.g.
``EleutherAI/pythia-14m-seed1@step1000``, ``checkpoint-N`` for GPT-2, e.g.
``stanford-crfm/alias-gpt2-small-x21@checkpoint-400000``) or in a local directory
``<run>/<revision>/`` in the hub's file layout (``source: toy`` or ``local``).

Hub downloads go through ``huggingface_hub`` only (``get_hf_file_metadata`` for a file's
metadata, ``hf_hub_download`` for its bytes), so its own handling of ``HF_HOME``/``HF_HUB_CACHE``,
``HF_TOKEN``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` applies unchanged. Note that huggingface_hub
reads those variables once, when it is first imported (``huggingface_hub.constants``): set them
in the environment of the process, or pass ``cache_dir``/``token`` explicitly.

Only ``config.json`` and ONE weight file are fetched per checkpoint (``model.safetensors`` if the
revision has it, else ``pytorch_model.bin``: Pythia's ``stepN`` branches hold only the .bin, and
so, by its 2021 upload, should CRFM's ``checkpoint-N``).
Fetching is two steps: :func:`resolve_checkpoint` gets ``config.json`` and the weight file's
*metadata* (commit, size, and sha256 = the LFS etag) without downloading it, so a caller can
skip a revision whose weights it has already scored (mechgen.scoring.job's score cache);
:func:`download_checkpoint` then downloads the weight file and checks its sha256 against the
etag (for LFS files the etag *is* the sha256 of the content, and names the blob in the cache).
:func:`release` deletes the weight blob once the checkpoint is scored, so disk use stays at one
checkpoint per running job.

Hub etiquette (:class:`HubSettings`, config key ``hub``). What huggingface_hub 2.4 retries by
itself (``utils/_http.py``, ``file_download.py``): the HEAD inside ``hf_hub_download`` is retried
on 408/429/5xx and network errors only when no cached copy exists (5 retries, 1-8 s,
``Retry-After`` obeyed); the GET (``http_get``) is retried on 408/429 only (5 retries) and
resumed after network errors (5 times); a 5xx on the GET, and a short body, are not retried.
``get_hf_file_metadata`` retries nothing unless asked. So mechgen (1) makes every HEAD itself
with the library's retries off and retries it (429/408/5xx, network errors) with exponential,
capped, jittered backoff; (2) wraps ``hf_hub_download`` and retries only what escapes it
unretried (a 5xx on the GET, a short body), never a second round on top of the library's own
(:func:`_retryable_download_error`); (3) limits concurrent weight downloads per machine with
a lock-file semaphore (:class:`mechgen.sources.hubcache.DownloadSlots`). A HEAD therefore precedes the
library's own HEAD for each file (one extra small request per file) so that the retries of
that first contact are ours and configurable.

Errors a sweep must survive are :class:`MissingCheckpoint` (record "missing", go on) and
:class:`CorruptCheckpoint`; both carry one-line messages naming repo, revision and file.
:class:`HubUnavailable` (network down, hub failing after the retries) fails the job.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechgen import architectures
from mechgen.config import Run
from mechgen.settings import (  # noqa: F401 - re-exported: where sources and hub settings are used
    CHECKPOINT_SOURCES,
    SUITE_SOURCES,
    HubSettings,
)
from mechgen.sources.hubcache import (
    PYTORCH_WEIGHTS,
    SAFETENSORS_WEIGHTS,
    DownloadSlots,
    file_git_sha1,
    file_sha256,
    mark_absent,
    write_ref,
)

# torch, transformers, huggingface_hub and safetensors (seconds of imports) are imported in the
# functions that use them: resolving a local checkpoint or fetching a tokenizer pays for none.
if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHT_FILES = ((SAFETENSORS_WEIGHTS, "safetensors"), (PYTORCH_WEIGHTS, "pytorch"))
"""Weight files in order of preference, with their format."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
"""The files ``AutoTokenizer`` needs for Pythia's (fast, byte-level BPE) tokenizer."""

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_SHA1_HEX = re.compile(r"[0-9a-f]{40}")





class MissingCheckpoint(Exception):
    """The repo, revision or weight file does not exist (or, offline, is not in the cache)."""


class CorruptCheckpoint(Exception):
    """The weight file is truncated or corrupt, fails its hash check, or is an unsafe pickle."""


class UnsupportedCheckpoint(ValueError):
    """The checkpoint is not a GPT-NeoX causal LM."""


class HubUnavailable(RuntimeError):
    """The hub could not be reached (not offline mode) and the file is not cached.

    Kept apart from :class:`MissingCheckpoint` on purpose: a network failure must fail the job
    (to be retried), not be recorded as a checkpoint that does not exist.
    """


@dataclass
class CheckpointFiles:
    """Where one checkpoint's files are on disk, and what they are.

    ``directory`` holds ``config.json`` and ``weight_file`` (for hub downloads: the cache's
    ``snapshots/<commit>/`` folder, whose entries are symlinks into ``blobs/``). ``commit`` is
    the revision's commit hash (None for local sources); ``sha256`` is the weight file's
    sha256 (hub: verified equal to the hub's LFS etag); ``size_bytes`` its size in bytes.
    """

    repo_id: str
    revision: str
    directory: Path
    weight_file: Path
    weight_format: str
    commit: str | None
    sha256: str
    size_bytes: int
    from_hub: bool

    @property
    def where(self) -> str:
        """For messages: ``repo@revision/file`` from the hub, else the weight file's path."""
        if not self.from_hub:
            return str(self.weight_file)
        return f"{self.repo_id}@{self.revision}/{self.weight_file.name}"


def _missing(where: str, err: Exception) -> MissingCheckpoint:
    """The "missing" record of a hub answer that the repo or revision is not there (GatedRepoError
    is a RepositoryNotFoundError, so it is tested first)."""
    from huggingface_hub.errors import GatedRepoError, RevisionNotFoundError

    if isinstance(err, RevisionNotFoundError):
        reason = "revision does not exist"
    elif isinstance(err, GatedRepoError):
        reason = "repo is gated, check HF_TOKEN"
    else:
        reason = "repo does not exist or is private"
    return MissingCheckpoint(f"missing checkpoint {where}: {reason} ({_first_line(err)})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def revision_name(step: int, architecture: str | None = None) -> str:
    """The branch name of checkpoint ``step`` in ``architecture`` (default gpt_neox):
    ``step{step}`` or, for gpt2, ``checkpoint-{step}`` (:func:`mechgen.architectures.revision_name`)."""
    return architectures.revision_name(step, architecture)


# --------------------------------------------------------------------------- hub etiquette

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses worth retrying: timeouts, rate limits, transient server errors."""


_hub_settings = HubSettings()


def configure_hub(settings: HubSettings | Mapping[str, Any] | None) -> HubSettings:
    """Set the process-wide default :class:`HubSettings` (a mapping is the config's ``hub``)."""
    global _hub_settings
    _hub_settings = (
        settings if isinstance(settings, HubSettings) else HubSettings.from_config(settings)
    )
    return _hub_settings


def hub_settings() -> HubSettings:
    """The process-wide default :class:`HubSettings`."""
    return _hub_settings


def retry_wait_s(retry: int, settings: HubSettings, uniform: float | None = None) -> float:
    """Seconds to wait before retry number ``retry`` (1 = the first retry).

    ``w = min(backoff_max_s, backoff_base_s * 2**(retry - 1)) * (1 - backoff_jitter * u)`` with
    ``u ~ Uniform[0, 1)`` (``uniform`` fixes u, for tests): exponential, capped, and spread
    over ``[(1 - jitter) w, w]`` so that jobs failing together do not retry together.
    """
    if retry < 1:
        raise ValueError(f"retry counts from 1, got {retry}")
    u = random.random() if uniform is None else uniform
    exponential = min(settings.backoff_max_s, settings.backoff_base_s * 2.0 ** min(retry - 1, 60))
    return exponential * (1.0 - settings.backoff_jitter * u)


def _status_and_method(err: BaseException) -> tuple[int | None, str | None]:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    method = None
    for owner in (response, err):
        try:  # httpx's `.request` properties raise RuntimeError when no request is attached
            request = getattr(owner, "request", None)
        except RuntimeError:
            continue
        if request is not None:
            method = getattr(request, "method", None)
            break
    return status, method


def _retry_after_s(err: BaseException) -> float | None:
    response = getattr(err, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:  # an HTTP date: not worth parsing, the backoff applies
        return None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures huggingface_hub retries by default (``_DEFAULT_RETRY_ON_EXCEPTIONS``)."""
    try:
        import httpx2 as httpx  # huggingface_hub >= 2 ships its own httpx fork
    except ImportError:  # pragma: no cover - older huggingface_hub
        import httpx
    return (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def _with_retries(
    call: Callable[[], Any],
    where: str,
    settings: HubSettings,
    retryable: Callable[[BaseException], bool],
) -> Any:
    """``call()``, retried on errors ``retryable`` accepts, waiting :func:`retry_wait_s` between.

    After ``settings.max_retries`` retries the last error becomes :class:`HubUnavailable`.
    Errors ``retryable`` rejects propagate unchanged.
    """
    attempt = 0
    while True:
        try:
            return call()
        except Exception as err:
            if not retryable(err):
                raise
            attempt += 1
            status, method = _status_and_method(err)
            what = f"HTTP {status} on {method}" if status else _first_line(err)
            if attempt > settings.max_retries:
                raise HubUnavailable(
                    f"cannot fetch {where}: hub unreachable or failing after {attempt} attempts "
                    f"(last: {what})"
                ) from None
            wait = retry_wait_s(attempt, settings)
            retry_after = _retry_after_s(err)
            if retry_after is not None:
                if retry_after > settings.retry_after_max_s:
                    raise HubUnavailable(
                        f"cannot fetch {where}: the hub asks to wait {retry_after:.0f} s "
                        "(Retry-After), "
                        f"more than hub.retry_after_max_s = {settings.retry_after_max_s:.0f} s"
                    ) from None
                wait = max(wait, retry_after)
            logger.warning(
                "%s: %s; retry %d/%d in %.2f s", where, what, attempt, settings.max_retries, wait
            )
            time.sleep(wait)


def _retryable_head_error(err: BaseException) -> bool:
    """Errors of a HEAD made with ``retry_on_errors=False``: nothing was retried yet."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError):
        return _status_and_method(err)[0] in _RETRY_STATUS
    return isinstance(err, _transport_errors())


def _retryable_download_error(err: BaseException) -> bool:
    """Errors escaping ``hf_hub_download`` that huggingface_hub did NOT already retry.

    Its GET (``http_get``) retries only 408/429 (``http_stream_backoff``, 5 times) and resumes
    after network errors (5 times), so those are final when they escape; a 5xx on the GET is
    not retried by it at all, and a short body ("Consistency check failed") neither. A HEAD
    failure escapes as ``LocalEntryNotFoundError`` after its own retries: final too.
    """
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError):
        status, method = _status_and_method(err)
        return method == "GET" and status is not None and status >= 500 and status in _RETRY_STATUS
    return isinstance(err, OSError) and "Consistency check failed" in str(err)


# --------------------------------------------------------------------------- fetching


@dataclass
class CheckpointRef:
    """A resolved checkpoint whose weights may not be on disk yet.

    ``directory`` holds ``config.json`` (hub: the cache snapshot folder of ``commit``).
    ``sha256`` is the weight file's sha256 when known before downloading (hub: the LFS etag
    from the file's metadata or the cache's blob name; local: hashed) else None; ``size_bytes``
    likewise. ``weight_file`` is set when the weight file is already on disk.
    """

    repo_id: str
    revision: str
    directory: Path
    weight_filename: str
    weight_format: str
    commit: str | None
    sha256: str | None
    size_bytes: int | None
    from_hub: bool
    weight_file: Path | None = None
    cache_dir: Path | None = None

    @property
    def where(self) -> str:
        """For messages: ``repo@revision/file`` from the hub, else the weight file's path."""
        if not self.from_hub:
            return str(self.directory / self.weight_filename)
        return f"{self.repo_id}@{self.revision}/{self.weight_filename}"

    @property
    def config_file(self) -> Path:
        """The checkpoint's ``config.json``."""
        return self.directory / CONFIG_FILE


def fetch_checkpoint(
    run: Run,
    step: int,
    *,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    hub: HubSettings | None = None,
) -> CheckpointFiles:
    """Make checkpoint ``step`` of ``run`` available on disk and verify its weight file.

    :func:`resolve_checkpoint` then :func:`download_checkpoint`. hf: downloads ``config.json``
    and one weight file of branch ``revision_name(step, run.architecture)`` into the hub cache (``cache_dir``, default
    huggingface_hub's ``HF_HUB_CACHE``); ``token`` None means huggingface_hub's own lookup
    (``HF_TOKEN``, stored login); ``hub`` None means :func:`hub_settings`. toy/local: finds
    ``<run.repo_id>/<revision>/``. Raises :class:`MissingCheckpoint`,
    :class:`CorruptCheckpoint`, or :class:`HubUnavailable` (network down or hub failing after
    the retries, not offline mode).
    """
    ref = resolve_checkpoint(run, step, cache_dir=cache_dir, token=token, hub=hub)
    return download_checkpoint(ref, token=token, hub=hub)


def resolve_checkpoint(
    run: Run,
    step: int,
    *,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    hub: HubSettings | None = None,
) -> CheckpointRef:
    """Find checkpoint ``step`` of ``run`` and its weight file's identity, without the weights.

    hf: fetches ``config.json`` (small) and the metadata of the weight file (``model.safetensors``
    if the revision has it, else ``pytorch_model.bin``): its commit, size and sha256 (the LFS
    etag), from the cache when present, else with one HEAD request. So a caller can tell that
    two revisions hold the same weights before downloading either. toy/local: finds the folder
    and hashes the weight file. Raises like :func:`fetch_checkpoint`.
    """
    revision = revision_name(step, run.architecture)
    settings = hub or _hub_settings
    if run.source == "hf":
        return _resolve_on_hub(
            run.repo_id, revision, cache_dir=cache_dir, token=token, settings=settings
        )
    if run.source in ("toy", "local"):
        files = _fetch_local(Path(run.repo_id), revision)
        return CheckpointRef(
            repo_id=files.repo_id,
            revision=revision,
            directory=files.directory,
            weight_filename=files.weight_file.name,
            weight_format=files.weight_format,
            commit=None,
            sha256=files.sha256,
            size_bytes=files.size_bytes,
            from_hub=False,
            weight_file=files.weight_file,
        )
    raise ValueError(
        f"run {run.run!r}: source {run.source!r} has no checkpoints (allowed: hf, toy, local)"
    )


def _fetch_local(run_dir: Path, revision: str) -> CheckpointFiles:
    step_dir = run_dir / revision
    if not step_dir.is_dir():
        raise MissingCheckpoint(
            f"missing checkpoint {run_dir}@{revision}: directory {step_dir} does not exist"
        )
    if not (step_dir / CONFIG_FILE).is_file():
        raise MissingCheckpoint(
            f"missing checkpoint {run_dir}@{revision}: {step_dir / CONFIG_FILE} does not exist"
        )
    for filename, weight_format in WEIGHT_FILES:
        weight_file = step_dir / filename
        if weight_file.is_file():
            return CheckpointFiles(
                repo_id=str(run_dir),
                revision=revision,
                directory=step_dir,
                weight_file=weight_file,
                weight_format=weight_format,
                commit=None,
                sha256=file_sha256(weight_file),
                size_bytes=weight_file.stat().st_size,
                from_hub=False,
            )
    present = sorted(p.name for p in step_dir.iterdir())
    raise MissingCheckpoint(
        f"missing checkpoint {run_dir}@{revision}: no {SAFETENSORS_WEIGHTS} or {PYTORCH_WEIGHTS} "
        f"in {step_dir} (files: {', '.join(present) or 'none'})"
    )


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _cache_root(cache_dir: str | Path | None) -> Path:
    """The hub cache in use: ``cache_dir`` or huggingface_hub's ``HF_HUB_CACHE`` (read now)."""
    from huggingface_hub import constants

    return Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)


def _head_file(
    repo_id: str,
    filename: str,
    revision: str,
    *,
    cache_dir: str | Path | None,
    token: str | bool | None,
    settings: HubSettings,
    shown_revision: str | None = None,
) -> Any | None:
    """The hub's metadata (``HfFileMetadata``: commit, etag, size) of one file, or None if the
    file does not exist at that revision (which is then remembered in the cache's ``.no_exist``).

    One HEAD per attempt, made with huggingface_hub's own retries off, so the retries are
    ours alone (:func:`_with_retries`). Raises :class:`MissingCheckpoint` for a missing
    repo/revision, :class:`HubUnavailable` when the hub cannot be reached.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        FileMetadataError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{shown_revision or revision}/{filename}"
    url = hf_hub_url(repo_id, filename, revision=revision)
    try:
        metadata = _with_retries(
            lambda: get_hf_file_metadata(url, token=token, retry_on_errors=False),
            where,
            settings,
            _retryable_head_error,
        )
    except RemoteEntryNotFoundError as err:
        commit = err.response.headers.get("X-Repo-Commit") if err.response is not None else None
        if commit and _SHA1_HEX.fullmatch(commit):
            mark_absent(_cache_root(cache_dir), repo_id, commit, filename)
        return None
    except (RevisionNotFoundError, RepositoryNotFoundError) as err:
        raise _missing(where, err) from None
    except FileMetadataError as err:
        raise HubUnavailable(
            f"cannot fetch {where}: the endpoint did not answer like the hub ({_first_line(err)}); "
            "check HF_ENDPOINT and proxies"
        ) from None
    if not metadata.commit_hash or not _SHA1_HEX.fullmatch(metadata.commit_hash):
        raise HubUnavailable(f"cannot fetch {where}: the hub sent no commit hash (X-Repo-Commit)")
    return metadata


def _download_pinned(
    repo_id: str,
    filename: str,
    commit: str,
    *,
    cache_dir: str | Path | None,
    token: str | bool | None,
    settings: HubSettings,
    force_download: bool = False,
    shown_revision: str | None = None,
    limit_concurrency: bool = False,
) -> Path:
    """``hf_hub_download`` of ``filename`` at ``commit`` (returns at once if cached), retried on
    the failures huggingface_hub does not retry itself (:func:`_retryable_download_error`).

    With ``limit_concurrency`` it first takes one of the machine's download slots
    (``settings.max_concurrent_downloads``), held for the download and its retries.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{shown_revision or commit}/{filename}"
    cache = _cache_root(cache_dir)

    def download() -> Path:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=commit,
                cache_dir=cache_dir,
                token=token,
                force_download=force_download,
            )
        )

    slots = DownloadSlots(
        settings.slots_dir(cache),
        settings.max_concurrent_downloads if limit_concurrency else None,
        timeout_s=settings.download_slot_timeout_s,
    )
    try:
        with slots.acquire(where):
            return _with_retries(download, where, settings, _retryable_download_error)
    except TimeoutError as err:
        raise HubUnavailable(f"cannot fetch {where}: {err}") from None
    except LocalEntryNotFoundError as err:  # (an EntryNotFoundError too: caught first)
        # The library's own HEAD failed (after its own retries) and nothing is cached.
        cause = err.__cause__ or err
        raise HubUnavailable(
            f"cannot fetch {where}: hub unreachable and file not cached ({_first_line(cause)}); "
            "set HF_HUB_OFFLINE=1 to use the cache only"
        ) from None
    except (RevisionNotFoundError, RepositoryNotFoundError, RemoteEntryNotFoundError) as err:
        raise MissingCheckpoint(
            f"missing checkpoint {where}: vanished from the hub during the fetch ({_first_line(err)})"
        ) from None
    except OSError as err:
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(err, HfHubHTTPError) or "Consistency check failed" in str(err):
            raise HubUnavailable(f"cannot fetch {where}: {_first_line(err)}") from None
        raise


def _hub_download(
    repo_id: str,
    filename: str,
    revision: str,
    *,
    cache_dir: str | Path | None,
    token: str | bool | None,
    force_download: bool = False,
    shown_revision: str | None = None,
    settings: HubSettings | None = None,
) -> Path | None:
    """One small file of ``repo_id@revision`` into the cache; its path (a snapshot entry).

    Online: a HEAD (ours, retried) resolves the revision to a commit; the download is pinned
    to that commit and ``refs/<revision>`` is recorded. Offline: the cache only. Returns None
    when the file does not exist at that revision (hub 404 on the file) or, offline, is not
    in the cache; raises :class:`MissingCheckpoint` when the repo or revision does not exist,
    :class:`HubUnavailable` when online but unreachable.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    settings = settings or _hub_settings
    where = f"{repo_id}@{shown_revision or revision}/{filename}"
    if not _offline():
        metadata = _head_file(
            repo_id,
            filename,
            revision,
            cache_dir=cache_dir,
            token=token,
            settings=settings,
            shown_revision=shown_revision,
        )
        if metadata is None:
            return None
        path = _download_pinned(
            repo_id,
            filename,
            metadata.commit_hash,
            cache_dir=cache_dir,
            token=token,
            settings=settings,
            force_download=force_download,
            shown_revision=shown_revision or revision,
        )
        write_ref(_cache_root(cache_dir), repo_id, revision, metadata.commit_hash)
        return path
    try:
        return Path(
            hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, token=token)
        )
    except RemoteEntryNotFoundError:
        return None
    except (RevisionNotFoundError, RepositoryNotFoundError) as err:
        raise _missing(where, err) from None
    except LocalEntryNotFoundError:
        return None


def _blob_name(pointer: Path) -> str | None:
    """The etag naming the blob that a snapshot entry links to (None if not a symlink).

    Only ONE level of link is read: with huggingface_hub's shared blob store, ``blobs/<etag>``
    may itself link on to ``blobs/<2 hex>/<xet hash>``, which is not the sha256.
    """
    if not pointer.is_symlink():
        return None
    return os.path.basename(os.readlink(pointer))


def _expected_etag(
    repo_id: str,
    filename: str,
    commit: str,
    pointer: Path,
    token: str | bool | None,
    known: str | None = None,
) -> str | None:
    """The hub's etag of the file: the blob's name in the cache, else ``known`` (from an
    earlier HEAD), else (online) the HEAD metadata."""
    etag = _blob_name(pointer) or known
    if etag is not None or _offline():
        return etag
    # Symlinks disabled in this cache (copies instead): ask the hub for the metadata.
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    return get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=commit), token=token).etag


def _hash_matches(path: Path, etag: str | None) -> tuple[bool, str]:
    """(does ``path`` match ``etag``, its sha256). A 64-hex etag is an LFS sha256; a 40-hex
    etag is a git blob sha1; with no etag there is nothing to check against (True)."""
    sha256 = file_sha256(path)
    if etag is None:
        return True, sha256
    if _SHA256_HEX.fullmatch(etag):
        return sha256 == etag, sha256
    if _SHA1_HEX.fullmatch(etag):
        return file_git_sha1(path) == etag, sha256
    logger.warning("etag %r of %s is neither a sha256 nor a git sha1: not verified", etag, path)
    return True, sha256


def _resolve_on_hub(
    repo_id: str,
    revision: str,
    *,
    cache_dir: str | Path | None,
    token: str | bool | None,
    settings: HubSettings,
) -> CheckpointRef:
    from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache

    config_path = _hub_download(
        repo_id, CONFIG_FILE, revision, cache_dir=cache_dir, token=token, settings=settings
    )
    if config_path is None:
        state = "not in the offline cache" if _offline() else "not in the revision"
        raise MissingCheckpoint(f"missing checkpoint {repo_id}@{revision}/{CONFIG_FILE}: {state}")
    commit = config_path.parent.name
    if not _SHA1_HEX.fullmatch(commit):
        raise RuntimeError(
            f"{config_path}: not inside a hub cache snapshot folder (expected snapshots/<commit>/)"
        )

    # Every later request is pinned to this commit, so config and weights come from the same
    # commit even if the branch moved in between.
    for filename, weight_format in WEIGHT_FILES:
        # The cache remembers 404s (.no_exist/<commit>/<file>): skip a known-absent file
        # without a request; this is also how offline mode knows safetensors does not exist.
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=commit)
        if cached is _CACHED_NO_EXIST:
            continue
        pointer = config_path.parent / filename
        if isinstance(cached, str) and (pointer.is_symlink() or pointer.exists()):
            etag = _blob_name(pointer)
            return CheckpointRef(
                repo_id=repo_id,
                revision=revision,
                directory=config_path.parent,
                weight_filename=filename,
                weight_format=weight_format,
                commit=commit,
                sha256=etag if etag and _SHA256_HEX.fullmatch(etag) else None,
                size_bytes=pointer.stat().st_size if pointer.exists() else None,
                from_hub=True,
                weight_file=pointer,
                cache_dir=_cache_root(cache_dir),
            )
        if _offline():
            continue
        metadata = _head_file(
            repo_id,
            filename,
            commit,
            cache_dir=cache_dir,
            token=token,
            settings=settings,
            shown_revision=revision,
        )
        if metadata is None:
            continue
        etag = metadata.etag
        return CheckpointRef(
            repo_id=repo_id,
            revision=revision,
            directory=config_path.parent,
            weight_filename=filename,
            weight_format=weight_format,
            commit=commit,
            sha256=etag if etag and _SHA256_HEX.fullmatch(etag) else None,
            size_bytes=metadata.size,
            from_hub=True,
            weight_file=None,
            cache_dir=_cache_root(cache_dir),
        )
    state = "in the offline cache" if _offline() else "in the revision"
    raise MissingCheckpoint(
        f"missing checkpoint {repo_id}@{revision}: no {SAFETENSORS_WEIGHTS} or {PYTORCH_WEIGHTS} {state}"
    )


def download_checkpoint(
    ref: CheckpointRef, *, token: str | bool | None = None, hub: HubSettings | None = None
) -> CheckpointFiles:
    """The weight file of a resolved checkpoint on disk, its hash verified.

    hf: downloads it (pinned to ``ref.commit``) unless already cached, holding one of the
    machine's download slots (``hub.max_concurrent_downloads``); checks its sha256 against
    the hub's etag; on a mismatch deletes it and downloads it once more, then gives up with
    :class:`CorruptCheckpoint`. toy/local: nothing to do.
    """
    settings = hub or _hub_settings
    if not ref.from_hub:
        assert ref.weight_file is not None and ref.sha256 is not None and ref.size_bytes is not None
        return CheckpointFiles(
            repo_id=ref.repo_id,
            revision=ref.revision,
            directory=ref.directory,
            weight_file=ref.weight_file,
            weight_format=ref.weight_format,
            commit=None,
            sha256=ref.sha256,
            size_bytes=ref.size_bytes,
            from_hub=False,
        )
    assert ref.commit is not None
    repo_id, revision, commit, filename = ref.repo_id, ref.revision, ref.commit, ref.weight_filename
    cache_dir = ref.cache_dir
    where = ref.where

    def fetch(force_download: bool) -> Path:
        if _offline():
            raise MissingCheckpoint(f"missing checkpoint {where}: not in the offline cache")
        return _download_pinned(
            repo_id,
            filename,
            commit,
            cache_dir=cache_dir,
            token=token,
            settings=settings,
            force_download=force_download,
            shown_revision=revision,
            limit_concurrency=True,
        )

    pointer = ref.weight_file
    if pointer is None or not pointer.exists():
        pointer = fetch(force_download=False)
    known_etag = ref.sha256
    etag = _expected_etag(repo_id, filename, commit, pointer, token, known_etag)
    matches, sha256 = _hash_matches(pointer, etag)
    if not matches:
        logger.warning(
            "%s: sha256 %s does not match the hub's etag %s; deleting and re-fetching",
            where,
            sha256,
            etag,
        )
        _delete_snapshot_entry(pointer, delete_blob_if_shared=True)
        if _offline():
            raise CorruptCheckpoint(
                f"corrupt checkpoint: {where}: cached file's hash {sha256} != hub etag {etag}; "
                "deleted it, cannot re-fetch in offline mode"
            )
        pointer = fetch(force_download=True)
        etag = _expected_etag(repo_id, filename, commit, pointer, token, known_etag)
        matches, sha256 = _hash_matches(pointer, etag)
        if not matches:
            _delete_snapshot_entry(pointer, delete_blob_if_shared=True)
            raise CorruptCheckpoint(
                f"corrupt checkpoint: {where}: hash {sha256} != hub etag {etag} after re-fetching; deleted it"
            )
    elif etag is None:
        logger.warning(
            "%s: no etag available (cache without symlinks, offline): hash not verified", where
        )

    return CheckpointFiles(
        repo_id=repo_id,
        revision=revision,
        directory=pointer.parent,
        weight_file=pointer,
        weight_format=ref.weight_format,
        commit=commit,
        sha256=sha256,
        size_bytes=pointer.stat().st_size,
        from_hub=True,
    )


_tokenizer_dirs: dict[tuple[str, str, str, str], Path] = {}


def fetch_tokenizer(
    run: Run,
    revision: str | None,
    *,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    hub: HubSettings | None = None,
) -> Path:
    """A directory from which ``AutoTokenizer.from_pretrained(dir)`` loads ``run``'s tokenizer.

    hf: downloads whichever of ``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json`` exist at ``revision`` (None = ``main``), once per process and
    (repo, revision); returns the cache snapshot folder. toy/local: ``<run>/<revision>`` if
    given, else ``<run>`` itself if it holds tokenizer files, else the highest-step revision
    folder of the run's family (``step{N}`` or ``checkpoint-{N}``) that does. Raises :class:`MissingCheckpoint` if no tokenizer file is found.
    """
    if run.source in ("toy", "local"):
        return _local_tokenizer_dir(Path(run.repo_id), revision, run.architecture)
    if run.source != "hf":
        raise ValueError(
            f"run {run.run!r}: source {run.source!r} has no tokenizer (allowed: hf, toy, local)"
        )
    rev = revision or "main"
    key = (run.repo_id, rev, str(cache_dir), str(_offline()))
    if key in _tokenizer_dirs and _tokenizer_dirs[key].is_dir():
        return _tokenizer_dirs[key]
    directories = set()
    for filename in TOKENIZER_FILES:
        path = _hub_download(
            run.repo_id, filename, rev, cache_dir=cache_dir, token=token, settings=hub
        )
        if path is not None:
            directories.add(path.parent)
    if not directories:
        state = "in the offline cache" if _offline() else "in the revision"
        raise MissingCheckpoint(
            f"missing tokenizer {run.repo_id}@{rev}: none of {', '.join(TOKENIZER_FILES)} {state}"
        )
    if len(directories) > 1:  # the branch moved between two downloads
        raise RuntimeError(
            f"tokenizer files of {run.repo_id}@{rev} came from different commits: {sorted(directories)}"
        )
    _tokenizer_dirs[key] = directories.pop()
    return _tokenizer_dirs[key]


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def _local_tokenizer_dir(
    run_dir: Path, revision: str | None, architecture: str | None = None
) -> Path:
    if revision is not None:
        candidates = [run_dir / revision]
    else:
        family = architectures.family(architecture)
        steps = sorted(
            (step, p)
            for p in run_dir.iterdir()
            if p.is_dir() and (step := family.step_of(p.name)) is not None
        ) if run_dir.is_dir() else []
        candidates = [run_dir] + [p for _, p in reversed(steps)]
    for directory in candidates:
        if _has_tokenizer(directory):
            return directory
    raise MissingCheckpoint(
        f"missing tokenizer for {run_dir}@{revision or 'latest'}: none of {', '.join(TOKENIZER_FILES)} "
        f"in {', '.join(str(c) for c in candidates[:3])}{' ...' if len(candidates) > 3 else ''}"
    )


# --------------------------------------------------------------------------- loading


def read_model_config(files: CheckpointFiles) -> dict[str, Any]:
    """``config.json`` of the checkpoint as a dict; :class:`UnsupportedCheckpoint` unless its
    ``model_type`` is one of a known family's (:data:`mechgen.architectures.FAMILIES`)."""
    path = files.directory / CONFIG_FILE
    where = f"{files.repo_id}@{files.revision}/{CONFIG_FILE}" if files.from_hub else str(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpoint(f"corrupt checkpoint: {where}: {_first_line(err)}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    known = [family.model_type for family in architectures.FAMILIES.values()]
    if model_type not in known:
        raise UnsupportedCheckpoint(
            f"{where}: model_type is {model_type!r}; "
            f"mechgen scores these model types only: {', '.join(known)}"
        )
    return config


def _is_out_of_memory(err: BaseException) -> bool:
    """Out of memory is the machine's problem, not the file's: never report it as corrupt."""
    return isinstance(err, MemoryError) or "memory" in str(err).lower()


def check_weight_file(files: CheckpointFiles) -> None:
    """Open the weight file safely without loading it, or raise :class:`CorruptCheckpoint`.

    safetensors: the header is parsed and must cover the whole file (catches truncation).
    pytorch: ``torch.load(weights_only=True)``, memory-mapped when the file is a zip archive
    (then only the pickle is read): the restricted unpickler refuses any object that is not a
    tensor/plain container, so a pickle that would run code is refused, never executed.
    """
    path = files.weight_file
    if files.weight_format == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                n_tensors = len(list(handle.keys()))
        except (SafetensorError, OSError) as err:
            raise CorruptCheckpoint(
                f"corrupt checkpoint: {files.where}: {_first_line(err)}"
            ) from None
        if n_tensors == 0:
            raise CorruptCheckpoint(
                f"corrupt checkpoint: {files.where}: safetensors file holds no tensors"
            )
        return
    if files.weight_format != "pytorch":
        raise ValueError(
            f"{files.where}: unknown weight_format {files.weight_format!r} (allowed: safetensors, pytorch)"
        )

    import torch

    is_zip = zipfile.is_zipfile(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as err:
        # torch's message is a paragraph; its "WeightsUnpickler error:" line names the culprit.
        reason = next(
            (
                line.split("error:", 1)[1].split(" was not", 1)[0].strip()
                for line in str(err).splitlines()
                if "WeightsUnpickler error:" in line
            ),
            _first_line(err),
        )
        raise CorruptCheckpoint(
            f"corrupt checkpoint: {files.where}: refused, the pickle holds more than tensors ({reason})"
        ) from None
    except Exception as err:  # truncated zip, bad magic, EOF...: torch raises many types
        if _is_out_of_memory(err):
            raise
        raise CorruptCheckpoint(
            f"corrupt checkpoint: {files.where}: cannot be read ({_first_line(err)})"
        ) from None
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise CorruptCheckpoint(f"corrupt checkpoint: {files.where}: not a state dict of tensors")
    del state_dict


def load_model(files: CheckpointFiles, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load the checkpoint as its family's causal LM (the full model, LM head included):
    ``GPTNeoXForCausalLM`` or ``GPT2LMHeadModel``, the class its architecture adapter names.

    Eager attention (so attention probabilities can be returned), ``dtype`` (default
    float32), no remote code, weights read only through :func:`check_weight_file`'s safe
    checks and transformers' ``weights_only=True`` loader, in eval mode. Every weight the
    model needs must come from the file: a missing or shape-mismatched tensor (which
    transformers would silently initialise at random) is a :class:`CorruptCheckpoint`.
    """
    # torch and the adapters (which import torch) only when a model is loaded: the jobs that
    # fetch a tokenizer or resolve a checkpoint through this module never pay for them.
    import torch

    from mechgen.model import adapter

    config = read_model_config(files)
    causal_lm = adapter.for_model_type(config["model_type"]).causal_lm_class()
    check_weight_file(files)
    try:
        model, info = causal_lm.from_pretrained(
            str(files.directory),
            dtype=dtype or torch.float32,
            attn_implementation="eager",
            trust_remote_code=False,
            local_files_only=True,
            use_safetensors=files.weight_format == "safetensors",
            weights_only=True,
            output_loading_info=True,
        )
    except Exception as err:  # any failure to read the file means it is bad
        if _is_out_of_memory(err):
            raise
        raise CorruptCheckpoint(
            f"corrupt checkpoint: {files.where}: transformers cannot load it ({_first_line(err)})"
        ) from None
    bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        raise CorruptCheckpoint(f"corrupt checkpoint: {files.where}: weights not in the file: {bad}")
    if info.get("unexpected_keys"):
        logger.info(
            "%s: ignored tensors not used by the model: %s",
            files.where,
            sorted(info["unexpected_keys"]),
        )
    model.eval()
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters of ``model``, every one counted once (embeddings, LM head included).

    ``sum(p.numel() for p in model.parameters())``; tied tensors are yielded once by
    ``parameters()``. Pythia does not tie embed_in/embed_out: 14,067,712 for pythia-14m.
    """
    return int(sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------- freeing disk


def _snapshot_storage(pointer: Path) -> Path:
    """``<cache>/models--org--name`` for ``<...>/snapshots/<commit>/<file>``."""
    if pointer.parent.parent.name != "snapshots":
        raise ValueError(f"{pointer} is not a file at the top of a hub cache snapshot folder")
    return pointer.parent.parent.parent


def _other_links_to(storage: Path, blob_name: str, exclude: Path) -> list[Path]:
    """Snapshot entries (other than ``exclude``) that link to ``blobs/<blob_name>``."""
    links = []
    for entry in (storage / "snapshots").rglob("*"):
        if (
            entry.is_symlink()
            and entry != exclude
            and os.path.basename(os.readlink(entry)) == blob_name
        ):
            links.append(entry)
    return links


def _delete_snapshot_entry(pointer: Path, *, delete_blob_if_shared: bool) -> int:
    """Unlink a snapshot entry and (unless another snapshot still links to it) its blob.

    Returns the bytes freed on disk. A blob that is itself a link into huggingface_hub's
    shared blob store is freed by that store's own garbage collection, which deletes the
    payload only once no repo references it.
    """
    storage = _snapshot_storage(pointer)
    blob_name = _blob_name(pointer)
    if blob_name is None:  # a plain copy (cache without symlinks)
        size = pointer.stat().st_size if pointer.exists() else 0
        pointer.unlink(missing_ok=True)
        return size
    blob = storage / "blobs" / blob_name
    pointer.unlink()
    if _other_links_to(storage, blob_name, exclude=pointer) and not delete_blob_if_shared:
        return 0
    if not (blob.exists() or blob.is_symlink()):
        return 0
    store_target = None
    cache_dir = storage.parent
    try:
        from huggingface_hub.utils import _shared_blobs

        store_target = _shared_blobs.shared_blob_target(blob, cache_dir)
    except (ImportError, AttributeError):  # older huggingface_hub: no shared store
        store_target = None
    if store_target is None:
        size = blob.stat().st_size
        blob.unlink()
        return size
    blob.unlink()
    return _shared_blobs.sweep_shared_blob(store_target, cache_dir=cache_dir)


def release(files: CheckpointFiles) -> int:
    """Delete a hub checkpoint's weight file from the cache; returns the bytes freed.

    The snapshot symlink and its blob go; ``config.json`` and tokenizer files stay; a blob
    that another snapshot still links to is kept (0 bytes freed). No-op (0) for local
    sources, whose files are the run's own.
    """
    if not files.from_hub:
        return 0
    pointer = files.weight_file
    if not pointer.is_symlink() and not pointer.exists():
        return 0
    return _delete_snapshot_entry(pointer, delete_blob_if_shared=False)
