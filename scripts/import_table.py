"""Snakemake script of rule `import_table`: published per-head tables into heads.parquet."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd
from _common import setup_logging

from mechgen.atomic import atomic_path
from mechgen.tables.heads import read_trott2025

sm = snakemake  # noqa: F821
log = setup_logging(sm)
fmt = sm.params.format
if fmt == "trott2025":
    heads = read_trott2025(sm.params.path, suite=sm.params.suite)
elif fmt == "mechgen":
    # A heads.parquet written by another mechgen run (e.g. scored elsewhere).
    heads = pd.read_parquet(sm.params.path)
else:
    sys.exit(f"mechgen: unknown table format {fmt!r}; allowed: trott2025, mechgen")
with atomic_path(sm.output.heads) as tmp:
    heads.to_parquet(tmp, index=False)
log.info("imported %d head rows (%d runs) from %s", len(heads), heads["run"].nunique(), sm.params.path)
