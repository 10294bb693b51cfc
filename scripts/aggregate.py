"""Snakemake script of rule `aggregate`: all per-(run, step) tables into heads.parquet, and
the sidecars' per-layer scores (``layer_scores``) into layers.parquet."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import setup_logging

from mechgen.tables.aggregate import concat_head_tables, layer_table, read_sidecars
from mechgen.tables.outputs import write_csv, write_parquet

sm = snakemake  # noqa: F821
log = setup_logging(sm)
tables = list(sm.input)
heads = concat_head_tables(tables)
write_parquet(heads, sm.output.heads)
sidecars = [str(Path(t).with_suffix(".json")) for t in tables]
layers = layer_table(sidecars, heads)
write_parquet(layers, sm.output.layers)
jobs = read_sidecars(sidecars)
write_csv(jobs, sm.output.checkpoints)
missing = jobs[jobs["status"] == "missing"][["run", "step", "repo_id", "revision", "reason"]]
write_csv(missing, sm.output.missing)
if len(missing):
    log.warning("%d checkpoints are missing on the hub; see %s", len(missing), sm.output.missing)
nonfinite = int(heads["nonfinite"].sum()) if "nonfinite" in heads else 0
if nonfinite:
    log.warning("%d head rows have non-finite attention; they are flagged and excluded from statistics", nonfinite)
log.info("%d head rows, %d layer rows from %d checkpoints", len(heads), len(layers), len(tables))
