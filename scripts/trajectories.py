"""Snakemake script of rule `trajectories`: the per-(run, step) max-over-heads table."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402
from _common import setup_logging  # noqa: E402

from mechgen.atomic import atomic_path  # noqa: E402
from mechgen.developmental import trajectories  # noqa: E402

sm = snakemake  # noqa: F821
log = setup_logging(sm)
heads = pd.read_parquet(sm.input.heads)
traj = trajectories(heads, sm.params.metric)
with atomic_path(sm.output[0]) as tmp:
    traj.to_csv(tmp, index=False)
log.info("%d (run, step) rows of max-over-heads %s", len(traj), sm.params.metric)
