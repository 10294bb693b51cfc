"""Writing and reading the pipeline's tables: CSV for people, Parquet for machines.

Every column of every output table is documented in ``docs/outputs.md`` (name, unit,
definition); ``tests/test_outputs.py`` fails when an output has a column that file does not list.

CSVs carry :data:`CSV_FLOAT_FORMAT` (6 significant digits): enough to read and compare, without
the 17-digit noise of a float's full repr. Integer columns (pandas ``int`` or nullable ``Int64``)
are written exactly whatever the format. A rule whose output another rule computes with writes
Parquet, which keeps every float bit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from mechgen.atomic import atomic_path

CSV_FLOAT_FORMAT = "%.6g"
"""printf format of every float in a CSV the pipeline writes (6 significant digits)."""


def write_csv(table: pd.DataFrame, path: str | Path) -> None:
    """``table`` to ``path`` as CSV without the index, floats as :data:`CSV_FLOAT_FORMAT`.

    A table with no rows still writes its header, so a reader sees the schema. Written
    atomically (a temporary file, then a rename: :mod:`mechgen.atomic`).
    """
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format=CSV_FLOAT_FORMAT)


def write_parquet(table: pd.DataFrame, path: str | Path) -> None:
    """``table`` to ``path`` as Parquet without the index, full precision, atomically."""
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)


def read_csv(path: str | Path) -> pd.DataFrame:
    """A CSV written by :func:`write_csv`; an empty file (no rows, no columns) is an empty
    DataFrame."""
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def write_declared_csvs(
    outputs: Mapping[str, str], tables: Mapping[str, pd.DataFrame], log: logging.Logger
) -> None:
    """Write ``tables[name]`` to ``outputs[name]`` for every output a rule declares.

    Raises ``ValueError`` naming the outputs no table was computed for, before writing any.
    """
    unknown = sorted(set(outputs) - set(tables))
    if unknown:
        raise ValueError(f"rule outputs no analysis computes: {', '.join(unknown)}")
    for name, path in outputs.items():
        write_csv(tables[name], path)
        log.info("%s: %d rows -> %s", name, len(tables[name]), path)
