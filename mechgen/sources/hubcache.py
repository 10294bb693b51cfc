"""The Hugging Face hub cache as mechgen uses it: its layout, etags, and the bookkeeping and locks
of mechgen's own downloads (stdlib only).

``huggingface_hub`` leaves this layout behind after a download (see
``huggingface_hub/file_download.py``: ``_hf_hub_download_to_cache_dir``,
``_cache_commit_hash_for_specific_revision``, ``_create_symlink``, ``repo_folder_name``)::

    <cache_dir>/models--EleutherAI--pythia-14m-seed1/
        blobs/<etag>                          the file contents, named by etag
        refs/step1000                         the 40-hex commit hash of the branch, no newline
        snapshots/<commit>/config.json     -> ../../blobs/<etag>  (relative symlink)
        snapshots/<commit>/model.safetensors -> ../../blobs/<etag>
        .no_exist/<commit>/model.safetensors  (optional: "this file is absent at this commit")

The etag of an LFS file is the sha256 of its content (64 hex); the etag of a small file kept in
git is its git blob sha1, ``sha1(b"blob <size>\\0" + content)`` (40 hex), as the hub's ``ETag``
/ ``X-Linked-Etag`` headers give them (:func:`is_lfs_file`, :func:`file_sha256`,
:func:`file_git_sha1`).

Here: the cache bookkeeping that mechgen.sources.checkpoints does itself when it pins a download to a commit
(:func:`write_ref`, :func:`mark_absent`), a ``du``-like size (:func:`directory_bytes`), and locks
shared by all processes of a machine: :func:`file_lock` (one holder) and :class:`DownloadSlots`
(at most N holders: the limit on concurrent downloads). The tests and benchmarks build such a
cache from local checkpoints with ``tests/support/offline_hub.py``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import random
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SAFETENSORS_WEIGHTS = "model.safetensors"
PYTORCH_WEIGHTS = "pytorch_model.bin"

LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".pkl",
    ".pickle",
    ".npy",
    ".npz",
    ".parquet",
    ".arrow",
    ".zip",
    ".gz",
    ".tar",
    ".model",
)
"""Suffixes that the hub's default ``.gitattributes`` stores in LFS (a subset of its list)."""

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
"""Files above 10 MiB must be LFS on the hub whatever their suffix."""

def git_blob_sha1(data: bytes) -> str:
    """Git's object id of a blob: ``sha1(b"blob " + str(len(data)) + b"\\0" + data)``, 40 hex."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def file_sha256(path: str | Path, chunk_bytes: int = 8 * 1024 * 1024) -> str:
    """sha256 of a file's bytes, 64 hex, read in ``chunk_bytes`` chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_git_sha1(path: str | Path, chunk_bytes: int = 8 * 1024 * 1024) -> str:
    """Git blob sha1 of a file (see :func:`git_blob_sha1`), computed in chunks."""
    size = os.path.getsize(path)
    digest = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def is_lfs_file(filename: str, size_bytes: int) -> bool:
    """Whether the hub stores ``filename`` in LFS (etag = sha256) rather than git (etag = sha1)."""
    return filename.endswith(LFS_SUFFIXES) or size_bytes > LFS_SIZE_THRESHOLD


def repo_cache_dir(cache_dir: str | Path, repo_id: str) -> Path:
    """``<cache_dir>/models--<org>--<name>``: huggingface_hub's folder for a model repo."""
    return Path(cache_dir) / "--".join(["models", *repo_id.split("/")])


# --------------------------------------------------------------------------- cache bookkeeping


def write_ref(cache_dir: str | Path, repo_id: str, revision: str, commit: str) -> None:
    """Record that branch ``revision`` of ``repo_id`` points at ``commit`` (``refs/<revision>``).

    What huggingface_hub writes after resolving a branch
    (``_cache_commit_hash_for_specific_revision``):
    the 40-hex commit, no newline, written atomically (tmp file + ``os.replace``) so a concurrent
    reader never sees half a hash. Needed when a download is pinned to the commit hash, because
    the library then writes no ref, and offline reruns resolve branches through the refs.
    """
    if revision == commit:
        return
    ref = repo_cache_dir(cache_dir, repo_id) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if ref.is_file() and ref.read_text() == commit:
        return
    tmp = ref.with_name(f"{ref.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


def mark_absent(cache_dir: str | Path, repo_id: str, commit: str, filename: str) -> None:
    """Record that ``filename`` does not exist at ``commit`` (``.no_exist/<commit>/<filename>``).

    The marker huggingface_hub leaves after a 404 on a file, which ``try_to_load_from_cache``
    reports as ``_CACHED_NO_EXIST``: later fetches (and offline runs) skip the file without a
    request.
    """
    marker = repo_cache_dir(cache_dir, repo_id) / ".no_exist" / commit / filename
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def directory_bytes(path: str | Path) -> int:
    """Bytes on disk under ``path``: the sum of ``st_blocks x 512`` of every regular file, each
    inode counted once (hard links), symlinks not followed (``du``'s count). 0 if absent.

    Files may vanish while walking (a job deleting its weights): those are skipped.
    """
    total = 0
    seen: set[tuple[int, int]] = set()
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                info = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
    return total


# --------------------------------------------------------------------------- locks across processes

_UNSUPPORTED_LOCK_ERRNOS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the ``with`` block.

    Blocks until the lock is free. The kernel drops the lock when the holder's file descriptor
    closes, including when the process is killed (``kill -9``), so a crashed job never leaves a
    stale lock behind; the lock file itself stays (it is empty and harmless). Where the file
    system does not support ``flock`` the block runs unlocked, with a warning.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in _UNSUPPORTED_LOCK_ERRNOS:
                raise
            logger.warning("flock not supported on %s (%s): running unlocked", path, err)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class DownloadSlots:
    """A counting semaphore shared by every process on a machine: ``n_slots`` lock files.

    ``acquire()`` takes an exclusive non-blocking ``flock`` on one of ``slot-0.lock`` ..
    ``slot-{n-1}.lock`` in ``directory``; if all are held it sleeps and tries again (waits
    ``poll_s``, growing x1.5 per round up to ``max_poll_s``). So at most ``n_slots`` holders
    exist at any time among all processes (and threads: each acquisition opens its own file
    description) that use the same directory, whatever launched them: concurrent Snakemake
    jobs on one machine share the limit. The kernel releases a slot when its holder exits or
    is killed, so no slot is ever lost.

    On a cluster the limit holds among the processes that see the same ``directory`` through a
    file system that honours ``flock`` across nodes (NFSv4, Lustre mounted with ``flock``,
    GPFS): a node-local directory gives a per-node limit. Where ``flock`` is not supported the
    limit is not enforced (a warning is logged), never a deadlock.
    ``n_slots=None`` means no limit.
    """

    def __init__(
        self,
        directory: str | Path,
        n_slots: int | None,
        *,
        poll_s: float = 0.05,
        max_poll_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> None:
        if n_slots is not None and (
            isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1
        ):
            raise ValueError(f"n_slots must be a positive int or None (no limit), not {n_slots!r}")
        if poll_s <= 0 or max_poll_s < poll_s:
            raise ValueError(
                f"need 0 < poll_s <= max_poll_s, got poll_s={poll_s}, max_poll_s={max_poll_s}"
            )
        self.directory = Path(directory)
        self.n_slots = n_slots
        self.poll_s = poll_s
        self.max_poll_s = max_poll_s
        self.timeout_s = timeout_s

    def _try_slot(self, index: int) -> Any | None:
        # Not a `with`: on success the open handle IS the held slot, closed by acquire().
        handle = open(self.directory / f"slot-{index}.lock", "a+b")  # noqa: SIM115
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        except OSError:
            handle.close()
            raise
        return handle

    @contextlib.contextmanager
    def acquire(self, what: str = "a download") -> Iterator[int | None]:
        """Hold one slot for the ``with`` block; yields its index (None when unlimited/unlockable).

        Raises ``TimeoutError`` after ``timeout_s`` seconds of waiting (None: wait as long as it
        takes; a waiting job logs every minute that it is waiting, naming ``what``).
        """
        if self.n_slots is None:
            yield None
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        last_report = started
        wait_s = self.poll_s
        handle = None
        index: int | None = None
        while handle is None:
            # Start at a random slot so that waiters do not all hammer slot 0 first.
            first = random.randrange(self.n_slots)
            for offset in range(self.n_slots):
                candidate = (first + offset) % self.n_slots
                try:
                    handle = self._try_slot(candidate)
                except OSError as err:
                    if err.errno not in _UNSUPPORTED_LOCK_ERRNOS:
                        raise
                    logger.warning(
                        "flock not supported in %s (%s): download limit not enforced",
                        self.directory,
                        err,
                    )
                    yield None
                    return
                if handle is not None:
                    index = candidate
                    break
            if handle is not None:
                break
            now = time.monotonic()
            if self.timeout_s is not None and now - started > self.timeout_s:
                raise TimeoutError(
                    f"waited {now - started:.0f} s for one of {self.n_slots} download slots in "
                    f"{self.directory} (for {what}); all are held by other processes"
                )
            if now - last_report >= 60:
                logger.info(
                    "still waiting for a download slot in %s (for %s)", self.directory, what
                )
                last_report = now
            time.sleep(wait_s)
            wait_s = min(self.max_poll_s, wait_s * 1.5)
        try:
            yield index
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()
