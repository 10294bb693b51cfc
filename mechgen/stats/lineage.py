"""Lineage: is each run what its name says? (``stats/lineage.csv``)

Known hub defect: at step >= 1, ``pythia-160m-weight-seed{1,2}`` do not descend from their own
``step0``, and at ``step1`` the decoupled repos equal the shared data-seed init. This module makes
such things visible from what every scoring job records per checkpoint: the weight blob's sha256
and a weight fingerprint (:mod:`mechgen.model.fingerprint`, a fixed sample of the matrix entries).

Per checkpoint (one row per run x step):

* ``cos_prev``: cosine of the fingerprint with the run's previous checkpoint; ``identical_prev``
  whether the two are identical (same sha256, or the same fingerprint when a sha256 is missing);
* ``cos_own_init``: cosine with the run's own step 0;
* ``best_init_run``/``best_init_cos``: the run of another init group whose step 0 is closest;
* ``identical_runs``/``near_runs``: the other runs whose checkpoint at this step is identical /
  has cosine >= :data:`NEAR_COS` (near-identical, not identical).

Flags (``flags``, ``;``-separated; ``flagged`` = any):

* ``not_own_init``: one of the first :data:`EARLY_CHECKPOINTS` checkpoints after step 0 is
  closer to the step 0 of a run of another init group than to its own, or the first one has
  ``cos_own_init`` < :data:`DESCENT_MIN_COS` (only the first: on the toy suite the cosine with
  the own init falls to ~0.66 by step 50 and ~0.2 by step 600, while staying well above the
  ~0.05 with any other init);
* ``shares_init_unexpectedly`` (step 0): identical or near-identical to the step 0 of a run of
  another init group (runs that should differ);
* ``init_differs_from_group`` (step 0): not near-identical to the step 0 of a run of its own
  init group (runs that should share it: the data variants).

Init groups come from the suite (:class:`mechgen.variation.Variation`); runs without a step 0
checkpoint or a fingerprint are compared by sha256 only and never get ``not_own_init``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

NEAR_COS = 0.999
"""Two fingerprints with at least this cosine count as near-identical."""
DESCENT_MIN_COS = 0.5
"""The first checkpoint after step 0 below this cosine with its own step 0 does not descend from
it (two independent random inits: cosine ~ 0 +- 0.03; the toy suite's step 25: ~0.93)."""
EARLY_CHECKPOINTS = 2
"""How many checkpoints after step 0 the descent check reads (later ones drift far from any
init, so the nearest init says little)."""

COLUMNS = [
    "run",
    "kind",
    "init_group",
    "step",
    "sha256",
    "has_fingerprint",
    "prev_step",
    "cos_prev",
    "identical_prev",
    "cos_own_init",
    "best_init_run",
    "best_init_cos",
    "identical_runs",
    "near_runs",
    "flags",
    "flagged",
]
"""Columns of ``stats/lineage.csv`` (docs/outputs.md)."""


def cosine(a: Any, b: Any) -> float:
    """Cosine similarity of two fingerprint samples (NaN if either is all zero or they differ
    in length, e.g. two architectures)."""
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.shape != y.shape:
        return float("nan")
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 or ny == 0:
        return float("nan")
    return float(x @ y / (nx * ny))


def relative_distance(a: Any, b: Any) -> float:
    """||a - b|| / ||b|| of two fingerprint samples (NaN as :func:`cosine`)."""
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.shape != y.shape or np.linalg.norm(y) == 0:
        return float("nan")
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def read_sidecars(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Checkpoint records from scoring sidecars ``scores/<run>/step<N>.json``: run, step, sha256
    and fingerprint sample (None where absent); sidecars with status other than ``ok`` skipped."""
    rows = []
    for path in paths:
        path = Path(path)
        record = json.loads(path.read_text())
        if record.get("status") != "ok":
            continue
        fp = record.get("weight_fingerprint") or {}
        rows.append(
            {
                "run": record.get("run") or path.parent.name,
                "step": int(record.get("step", path.stem.removeprefix("step"))),
                "sha256": record.get("sha256") or "",
                "sample": fp.get("sample"),
            }
        )
    return pd.DataFrame(rows, columns=["run", "step", "sha256", "sample"])


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Identical weights: equal sha256 when both have one, else equal fingerprints."""
    if a["sha256"] and b["sha256"]:
        return bool(a["sha256"] == b["sha256"])
    return (
        a["sample"] is not None
        and b["sample"] is not None
        and list(a["sample"]) == list(b["sample"])
    )


def _cos(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    if _same(a, b):
        return 1.0
    if a["sample"] is None or b["sample"] is None:
        return math.nan
    return cosine(a["sample"], b["sample"])


def lineage_table(checkpoints: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The lineage table (:data:`COLUMNS`) of ``checkpoints`` (run, step, sha256, sample) given
    ``runs`` (run, kind, init_group). Runs absent from ``runs`` are ignored."""
    info = runs.set_index("run")
    cps = checkpoints[checkpoints["run"].isin(info.index)]
    by_run: dict[str, dict[int, dict[str, Any]]] = {}
    for rec in cps.to_dict("records"):
        by_run.setdefault(rec["run"], {})[int(rec["step"])] = rec
    init_of = {run: steps[0] for run, steps in by_run.items() if 0 in steps}
    group = info["init_group"].to_dict()
    rows = []
    for run in sorted(by_run):
        steps = sorted(by_run[run])
        later = [s for s in steps if s > 0][:EARLY_CHECKPOINTS]
        for i, step in enumerate(steps):
            rec = by_run[run][step]
            flags = []
            row: dict[str, Any] = {
                "run": run,
                "kind": info.at[run, "kind"],
                "init_group": group[run],
                "step": step,
                "sha256": rec["sha256"],
                "has_fingerprint": rec["sample"] is not None,
                "prev_step": steps[i - 1] if i else math.nan,
                "cos_prev": _cos(rec, by_run[run][steps[i - 1]]) if i else math.nan,
                "identical_prev": _same(rec, by_run[run][steps[i - 1]]) if i else math.nan,
                "cos_own_init": _cos(rec, init_of[run]) if run in init_of else math.nan,
            }
            others = {o: init_of[o] for o in init_of if group[o] != group[run]}
            cos_others = {o: _cos(rec, r) for o, r in others.items()}
            finite = {o: c for o, c in cos_others.items() if np.isfinite(c)}
            best = max(finite, key=lambda o: finite[o]) if finite else ""
            row["best_init_run"] = best
            row["best_init_cos"] = finite[best] if best else math.nan
            peers = {o: by_run[o][step] for o in by_run if o != run and step in by_run[o]}
            identical = sorted(o for o, r in peers.items() if _same(rec, r))
            near = sorted(
                o for o, r in peers.items() if o not in identical and _cos(rec, r) >= NEAR_COS
            )
            row["identical_runs"] = ";".join(identical)
            row["near_runs"] = ";".join(near)
            if step in later and run in init_of and rec["sample"] is not None:
                own = row["cos_own_init"]
                first = step == later[0]
                if (first and own < DESCENT_MIN_COS) or (best and row["best_init_cos"] > own):
                    flags.append("not_own_init")
            if step == 0:
                close = set(identical) | set(near)
                if any(group[o] != group[run] for o in close):
                    flags.append("shares_init_unexpectedly")
                siblings = [o for o in peers if group[o] == group[run]]
                if any(o not in close for o in siblings):
                    flags.append("init_differs_from_group")
            row["flags"] = ";".join(flags)
            row["flagged"] = bool(flags)
            rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def flagged_runs(lineage: pd.DataFrame) -> dict[str, str]:
    """Run -> its flags (``;``-joined, sorted) for every run with a flagged checkpoint."""
    out: dict[str, str] = {}
    for run, g in lineage[lineage["flagged"].astype(bool)].groupby("run"):
        flags = sorted({f for fl in g["flags"].astype(str) for f in fl.split(";") if f})
        out[str(run)] = ";".join(flags)
    return out
