"""Atomic outputs: a job writes a temporary path, then renames it onto the final one.

A reader (or Snakemake) sees either the previous content of ``dest`` or the complete new one,
never a half-written file. A writer that dies mid-way leaves only its temporary path behind,
named ``<dest name>.tmp-<pid>`` next to ``dest`` (same directory, so the same filesystem and
``os.replace`` is one atomic rename). Each process has its own temporary name, so two writers of
the same output (e.g. an orphan of a killed run and the resumed job) never write into one file;
the last rename wins with a complete file.

Usage::

    with atomic_path(out) as tmp:        # a file: write tmp, it becomes out on success
        table.to_parquet(tmp, index=False)

    with atomic_dir(step_dir) as tmp:    # a directory: fill tmp, it replaces step_dir
        model.save_pretrained(tmp)

On an exception the temporary path is removed and ``dest`` is left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"
"""Temporary names are ``<name>.tmp-<pid>``; :func:`is_temporary` recognises them."""


def temporary_name(dest: str | os.PathLike[str]) -> Path:
    """``dest`` with ``.tmp-<pid>`` appended to its name (same directory).

    The suffix keeps the original extension inside the name (``x.parquet.tmp-123``), so tools
    that pick a format by extension must be given the format explicitly if they need it.
    """
    dest = Path(dest)
    return dest.with_name(f"{dest.name}{TMP_MARK}{os.getpid()}")


def is_temporary(path: str | os.PathLike[str]) -> bool:
    """True for a name made by :func:`temporary_name` (``<name>.tmp-<digits>``)."""
    name = Path(path).name
    head, mark, pid = name.rpartition(TMP_MARK)
    return bool(head) and bool(mark) and pid.isdigit()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path; on success ``os.replace`` it onto ``dest``.

    The parent directory of ``dest`` is created. A leftover temporary file of this process (same
    pid) is removed first. ``dest`` is replaced only if the body finishes without an exception
    and wrote the temporary file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(dest)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not tmp.exists():
        raise FileNotFoundError(f"atomic_path: nothing was written to {tmp} for {dest}")
    os.replace(tmp, dest)


@contextmanager
def atomic_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces the directory ``dest``.

    ``os.replace`` cannot replace a non-empty directory, so an existing ``dest`` is first renamed
    aside (``<name>.old-<pid>``) and removed after the new one is in place: between the two
    renames ``dest`` is briefly absent, never partial.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(dest)
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    old = dest.with_name(f"{dest.name}.old-{os.getpid()}")
    if dest.exists():
        _remove(old)
        os.replace(dest, old)
    os.replace(tmp, dest)
    _remove(old)


def write_text(dest: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(dest: str | os.PathLike[str], obj: Any, **dump_kwargs: Any) -> None:
    """``json.dump(obj, indent=2, **dump_kwargs)`` plus a final newline into ``dest`` atomically."""
    dump_kwargs.setdefault("indent", 2)
    write_text(dest, json.dumps(obj, **dump_kwargs) + "\n")
