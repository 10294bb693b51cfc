"""Build a Hugging Face hub cache on disk from local checkpoints, without any network (test and
benchmark support: nothing in mechgen imports it).

Tests and benchmarks must exercise the *real* download path (``hf_hub_download`` resolving a
branch such as ``step1000``, or ``checkpoint-1000`` for a GPT-2 family, to a commit and a blob),
but the hub cannot be reached. :func:`build_offline_cache` writes exactly the layout
``huggingface_hub`` itself leaves behind after a download (see ``huggingface_hub/file_download.py``:
``_hf_hub_download_to_cache_dir``, ``_cache_commit_hash_for_specific_revision``,
``_create_symlink``, ``repo_folder_name``; the layout and the etags are described in
:mod:`mechgen.sources.hubcache`, which holds the bookkeeping mechgen itself does in such a cache).
Commit hashes are made up (the hub's are git commit hashes over trees we do not have) but
deterministic: the sha1 of the repo id, the revision name and every (filename, etag) pair, so
rebuilding the same cache gives the same commits.

With ``HF_HUB_OFFLINE=1`` and ``cache_dir`` (or ``HF_HUB_CACHE``/``HF_HOME``) pointing here,
``hf_hub_download(repo_id, "config.json", revision="step1000")`` resolves from this cache.
:func:`run_revisions` lists a hub-layout run folder's revisions under the names of its family
(:mod:`mechgen.architectures`), ready for :func:`build_offline_cache`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Literal

from mechgen import architectures
from mechgen.sources.hubcache import (
    PYTORCH_WEIGHTS,
    SAFETENSORS_WEIGHTS,
    file_git_sha1,
    file_sha256,
    is_lfs_file,
    repo_cache_dir,
)

WeightFormat = Literal["safetensors", "pytorch"]

_REVISION_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _convert_safetensors_to_pytorch(
    safetensors_path: Path, out_path: Path, legacy_pythia_keys: bool
) -> None:
    """Write ``torch.save(state_dict)`` of a safetensors file (zip format, as Pythia's .bin are).

    ``legacy_pythia_keys`` renames ``lm_head.*`` to ``embed_out.*``: Pythia's published
    ``pytorch_model.bin`` files use the old GPT-NeoX name for the output projection, which
    transformers renames on load; writing it that way exercises that path.
    """
    import torch
    from safetensors.torch import load_file

    state_dict = load_file(str(safetensors_path))
    if legacy_pythia_keys:
        state_dict = {
            ("embed_out." + key[len("lm_head.") :] if key.startswith("lm_head.") else key): value
            for key, value in state_dict.items()
        }
    # Contiguous clones so every tensor owns its storage (no shared views in the pickle).
    torch.save({key: value.contiguous().clone() for key, value in state_dict.items()}, out_path)


def _add_blob(repo_dir: Path, source: Path, filename: str) -> dict[str, Any]:
    """Copy ``source`` into ``repo_dir/blobs/<etag>`` and return its metadata.

    Copied, never hard-linked: tests corrupt blobs on purpose and must not corrupt the source.
    """
    size = source.stat().st_size
    sha256 = file_sha256(source)
    lfs = is_lfs_file(filename, size)
    etag = sha256 if lfs else file_git_sha1(source)
    blob = repo_dir / "blobs" / etag
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists() or blob.stat().st_size != size:
        tmp = blob.with_name(blob.name + ".incomplete")
        shutil.copyfile(source, tmp)
        os.replace(tmp, blob)
    return {"etag": etag, "sha256": sha256, "size": size, "lfs": lfs, "blob": blob}


def _commit_hash(repo_id: str, revision: str, files: dict[str, dict[str, Any]]) -> str:
    """A deterministic stand-in for the hub's commit hash (40 hex)."""
    digest = hashlib.sha1(f"{repo_id}\n{revision}\n".encode())
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]['etag']}\n".encode())
    return digest.hexdigest()


def run_revisions(
    run_dir: str | Path, architecture: str | None = None, steps: list[int] | None = None
) -> dict[str, Path]:
    """``{revision name: folder}`` of a hub-layout run folder (``<run_dir>/step{N}/`` for
    gpt_neox, ``<run_dir>/checkpoint-{N}/`` for gpt2), in step order; only ``steps`` if given
    (a KeyError names a step without a folder). Folders of other names are ignored."""
    family = architectures.family(architecture)
    found = {
        step: p
        for p in Path(run_dir).iterdir()
        if p.is_dir() and (step := family.step_of(p.name)) is not None
    }
    wanted = sorted(found) if steps is None else sorted(steps)
    missing = [s for s in wanted if s not in found]
    if missing:
        raise KeyError(
            f"{run_dir}: no folder {family.revision_name(missing[0])} (steps present: {sorted(found)})"
        )
    return {family.revision_name(s): found[s] for s in wanted}


def build_offline_cache(
    cache_dir: Path,
    repo_id: str,
    revisions: dict[str, Path],
    *,
    weight_format: WeightFormat = "safetensors",
    tokenizer_dir: Path | None = None,
    mark_absent_safetensors: bool = True,
    legacy_pythia_keys: bool = True,
) -> dict[str, Any]:
    """Lay out ``repo_id`` with the given branches in a huggingface_hub cache at ``cache_dir``.

    ``revisions`` maps a branch name (``"step1000"``, ``"checkpoint-1000"``) to a hub-layout
    checkpoint directory
    (``config.json``, ``model.safetensors`` or ``pytorch_model.bin``, maybe tokenizer files);
    every regular file at its top level becomes a file of that branch. A revision left out of
    ``revisions`` is absent from the cache (the "missing checkpoint" case). Call it once per
    repo; several repos share one ``cache_dir``; identical files share one blob.

    ``weight_format="pytorch"`` replaces ``model.safetensors`` by a ``pytorch_model.bin``
    (``torch.save`` of its state dict; with ``legacy_pythia_keys`` the output projection is
    named ``embed_out`` as in Pythia's files; pass False for GPT-2, whose ``.bin`` keeps
    transformers' names), as Pythia's ``stepN`` branches, and CRFM's ``checkpoint-N``, hold only
    the .bin. With ``mark_absent_safetensors`` the cache also records that ``model.safetensors``
    does not exist at that commit (``.no_exist/<commit>/model.safetensors``), as
    huggingface_hub does after an online 404. ``tokenizer_dir``'s files are added to every
    branch.

    Returns ``{"cache_dir", "repo_id", "repo_dir", "revisions": {name: {"commit",
    "snapshot", "files": {filename: {"etag", "sha256", "size", "lfs", "blob"}}}}}``.
    """
    if weight_format not in ("safetensors", "pytorch"):
        raise ValueError(f"weight_format must be 'safetensors' or 'pytorch', not {weight_format!r}")
    if repo_id.count("/") != 1 or "--" in repo_id:
        raise ValueError(f"repo_id must look like 'org/name' without '--', not {repo_id!r}")
    cache_dir = Path(cache_dir)
    repo_dir = repo_cache_dir(cache_dir, repo_id)
    tokenizer_files = (
        {p.name: p for p in sorted(Path(tokenizer_dir).iterdir()) if p.is_file()}
        if tokenizer_dir
        else {}
    )
    if tokenizer_dir is not None and not tokenizer_files:
        raise FileNotFoundError(f"tokenizer_dir {str(tokenizer_dir)!r} holds no files")

    built: dict[str, Any] = {
        "cache_dir": cache_dir,
        "repo_id": repo_id,
        "repo_dir": repo_dir,
        "revisions": {},
    }
    for revision, checkpoint_dir in revisions.items():
        if not _REVISION_NAME.fullmatch(revision):
            raise ValueError(f"revision name {revision!r} is not a valid branch name")
        checkpoint_dir = Path(checkpoint_dir)
        if not (checkpoint_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{checkpoint_dir}/config.json not found (revision {revision} of {repo_id})"
            )
        sources = {p.name: p for p in sorted(checkpoint_dir.iterdir()) if p.is_file()}
        sources.update(tokenizer_files)

        tmp_bin: Path | None = None
        if weight_format == "pytorch" and SAFETENSORS_WEIGHTS in sources:
            # torch.save names the zip archive's root folder after the file's stem: the same
            # weights under two revisions must give the same bytes (one blob), as on the hub.
            tmp_bin = repo_dir / "blobs" / f".{revision}.tmp" / PYTORCH_WEIGHTS
            tmp_bin.parent.mkdir(parents=True, exist_ok=True)
            _convert_safetensors_to_pytorch(
                sources.pop(SAFETENSORS_WEIGHTS), tmp_bin, legacy_pythia_keys
            )
            sources[PYTORCH_WEIGHTS] = tmp_bin
        wanted = SAFETENSORS_WEIGHTS if weight_format == "safetensors" else PYTORCH_WEIGHTS
        if wanted not in sources:
            raise FileNotFoundError(
                f"{checkpoint_dir} has no {wanted} (revision {revision} of {repo_id}); files: {sorted(sources)}"
            )

        files = {name: _add_blob(repo_dir, path, name) for name, path in sources.items()}
        if tmp_bin is not None:
            tmp_bin.unlink()
            tmp_bin.parent.rmdir()
        commit = _commit_hash(repo_id, revision, files)

        snapshot = repo_dir / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for name, meta in files.items():
            pointer = snapshot / name
            if pointer.is_symlink() or pointer.exists():
                pointer.unlink()
            # Relative, as huggingface_hub's _create_symlink makes them: the cache stays movable.
            os.symlink(os.path.relpath(meta["blob"], snapshot), pointer)
        if weight_format == "pytorch" and mark_absent_safetensors:
            marker = repo_dir / ".no_exist" / commit / SAFETENSORS_WEIGHTS
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()

        ref = repo_dir / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)  # no trailing newline: huggingface_hub reads it verbatim

        built["revisions"][revision] = {"commit": commit, "snapshot": snapshot, "files": files}
    return built
