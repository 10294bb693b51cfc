"""The relational axis for every declared link (table-side, no torch).

A :class:`mechgen.mechanisms.Link` says that mechanism ``source`` feeds mechanism ``target``
(previous-token -> induction: the 1-back head writes the previous token, the induction head's
keys read it). Per link and run, :func:`link_table` checks the four relations of the issue's
relational axis on the heads each mechanism's own tables name:

- **earlier layer**: the source's strongest head at the run's final step (``per_seed.csv``,
  ``final_layer``) sits in an earlier layer than the target's;
- **composition**: at the run's last detail step, the ``Link.composition`` (K, Q or V) score
  of source head -> target head (those final strongest heads) from the scoring job's circuit
  file (``<kind>_composition``, ``<kind>_baseline_mean``, ``<kind>_baseline_sd``:
  :func:`mechgen.scoring.relational.composition_scores`, the random-rotation null), as
  ``z = (score - baseline mean) / baseline SD``; the relation holds when
  ``z > Phi^-1(confidence)`` (one-sided, the normal quantile of scipy). Undefined when the
  source is not in an earlier layer (a head cannot compose with a head of its own or a later
  layer) or no detail step has the kind;
- **mean-ablation drop**: the target's score drop when the source head is mean-ablated,
  against the drop when a random head of the source's layer is (``drop_minus_control`` > 0).
  The scoring job runs this test at detail steps for every declared link whose target can be
  re-measured under ablation (``Mechanism.ablation_pass``: induction and duplicate-token, on
  the repeated-sequence passes): it ablates the source's strongest head and re-measures the
  target's score at the target's strongest head in a later layer (the circuit record's
  ``link_ablations``, :func:`mechgen.scoring.circuit.link_ablations`). ``ablation_status`` says what
  became of the test: ``measured``; ``not applicable`` (the target's score cannot be
  re-measured under ablation: successor, copy suppression, ...; NA, never "failed");
  ``not measured`` (no detail step, or no source score there), with the reason in
  ``ablation_note``;
- **onset lag**: ``lag_steps`` = target onset - source onset on each mechanism's normalised
  scale (``per_seed.csv``, ``onset_step``); ``source_first`` = lag > 0.

Earlier layer, source first and the composition are only asked of runs where both mechanisms
formed (``formed`` in both ``per_seed.csv``): the strongest head of a mechanism that never
formed is noise, so the relation is NA there ("never formed" is not "late").

Outputs: ``stats/links.csv`` (:data:`LINK_COLUMNS`, one row per link x run) and
``stats/links_sizes.csv`` (:data:`LINK_SIZE_COLUMNS`, per link x size x relation the fraction
of runs where it holds, Wilson interval, :func:`mechgen.stats.analysis.wilson_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm

from mechgen.mechanisms import Link, get, names
from mechgen.schema import RUN_ID_COLUMNS
from mechgen.stats.analysis import wilson_interval
from mechgen.tables.circuit_files import CircuitResult

LEGACY_ABLATION_LINK = ("previous_token", "induction")
"""The link whose test a circuit file written before ``link_ablations`` existed holds in its
``ablation`` record (:func:`mechgen.scoring.relational.causal_dependence`)."""

RUN_COLUMNS = RUN_ID_COLUMNS

LINK_COLUMNS = [
    "link",
    "source",
    "target",
    "composition",
    *RUN_COLUMNS,
    "both_formed",
    "source_layer",
    "source_head",
    "target_layer",
    "target_head",
    "source_earlier_layer",
    "detail_step",
    "composition_score",
    "composition_baseline",
    "composition_z",
    "composition_above_null",
    "ablation_drop",
    "ablation_control_drop",
    "drop_minus_control",
    "drop_exceeds_control",
    "ablation_status",
    "ablation_note",
    "source_onset_step",
    "target_onset_step",
    "lag_steps",
    "source_first",
]
"""Columns of ``stats/links.csv``."""

RELATIONS = (
    "source_earlier_layer",
    "composition_above_null",
    "drop_exceeds_control",
    "source_first",
)
"""The boolean per-run relations whose per-size fractions ``stats/links_sizes.csv`` holds."""

LINK_SIZE_COLUMNS = [
    "link",
    "source",
    "target",
    "model",
    "size",
    "n_params",
    "relation",
    "n_runs",
    "n_defined",
    "n_holds",
    "fraction",
    "ci_low",
    "ci_high",
    "confidence",
]
"""Columns of ``stats/links_sizes.csv``; ``n_defined``: runs where the relation is not NA."""


def link_name(link: Link) -> str:
    """``<source>-><target>``, the ``link`` column."""
    return f"{link.source}->{link.target}"


def _last_detail(
    circuits: Mapping[tuple[str, int], CircuitResult], run: str, key: str
) -> tuple[int, CircuitResult] | None:
    found = [(s, r) for (r_id, s), r in circuits.items() if r_id == run and key in r.arrays]
    return max(found, key=lambda item: item[0]) if found else None


def _boolean(value: float | bool | None) -> Any:
    return pd.NA if value is None else bool(value)


def link_table(
    links: Sequence[Link],
    per_seed: Mapping[str, pd.DataFrame],
    circuits: Mapping[tuple[str, int], CircuitResult] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """``stats/links.csv``: per declared link (both ends in ``per_seed``, the mechanisms'
    ``per_seed`` tables) and run, the four relations of the module docstring. ``circuits``:
    ``{(run, step): CircuitResult}`` (:func:`mechgen.tables.circuit_files.read_circuits`); without them
    (a suite imported from tables) composition and ablation are NA."""
    circuits = circuits or {}
    critical = float(norm.ppf(confidence))
    rows = []
    for link in links:
        if link.source not in per_seed or link.target not in per_seed:
            continue
        source = per_seed[link.source].set_index("run")
        target = per_seed[link.target].set_index("run")
        key = f"{link.composition.lower()}_composition"
        for run in source.index.intersection(target.index):
            s, t = source.loc[run], target.loc[run]
            formed = bool(s["formed"]) and bool(t["formed"])
            s_layer, s_head = int(s["final_layer"]), int(s["final_head"])
            t_layer, t_head = int(t["final_layer"]), int(t["final_head"])
            earlier = s_layer < t_layer
            row: dict[str, Any] = {
                "link": link_name(link),
                "source": link.source,
                "target": link.target,
                "composition": link.composition,
                **{c: s.get(c, "") if c != "run" else run for c in RUN_COLUMNS},
                "both_formed": formed,
                "source_layer": s_layer,
                "source_head": s_head,
                "target_layer": t_layer,
                "target_head": t_head,
                "source_earlier_layer": _boolean(earlier if formed else None),
            }
            row.update(_composition(circuits, run, key, (t_layer, t_head, s_layer, s_head)))
            row["composition_above_null"] = _boolean(
                row["composition_z"] > critical
                if formed and earlier and math.isfinite(row["composition_z"])
                else None
            )
            row.update(_ablation(circuits, run, link))
            lag = float(t["onset_step"]) - float(s["onset_step"])
            row.update(
                source_onset_step=float(s["onset_step"]),
                target_onset_step=float(t["onset_step"]),
                lag_steps=lag,
                source_first=_boolean(lag > 0 if formed and math.isfinite(lag) else None),
            )
            rows.append(row)
    table = pd.DataFrame(rows, columns=LINK_COLUMNS)
    for column in RELATIONS:
        table[column] = table[column].astype("boolean")
    return table


def _composition(
    circuits: Mapping[tuple[str, int], CircuitResult], run: str, key: str, index: tuple
) -> dict[str, float]:
    latest = _last_detail(circuits, run, key)
    if latest is None:
        return {
            "detail_step": np.nan,
            "composition_score": np.nan,
            "composition_baseline": np.nan,
            "composition_z": np.nan,
        }
    step, result = latest
    prefix = key.split("_")[0]
    try:
        score = float(result.arrays[key][index])
        mean = float(result.arrays[f"{prefix}_baseline_mean"][index])
        sd = float(result.arrays[f"{prefix}_baseline_sd"][index])
    except IndexError:  # heads outside the saved arrays: a table/circuit mismatch
        score = mean = sd = math.nan
    return {
        "detail_step": step,
        "composition_score": score,
        "composition_baseline": mean,
        "composition_z": (score - mean) / sd if sd > 0 else math.nan,
    }


def _ablation(
    circuits: Mapping[tuple[str, int], CircuitResult], run: str, link: Link
) -> dict[str, Any]:
    empty: dict[str, Any] = {
        "ablation_drop": np.nan,
        "ablation_control_drop": np.nan,
        "drop_minus_control": np.nan,
        "drop_exceeds_control": pd.NA,
    }
    if link.target not in names():
        return {
            **empty,
            "ablation_status": "not measured",
            "ablation_note": f"{link.target} is not a mechanism of the catalog",
        }
    if get(link.target).ablation_pass is None:
        return {
            **empty,
            "ablation_status": "not applicable",
            "ablation_note": f"{link.target} declares no ablation pass: its score is not "
            "re-measured with a head mean-ablated",
        }
    name = link_name(link)
    found = [
        (step, result.record["link_ablations"][name])
        for (r_id, step), result in circuits.items()
        if r_id == run and name in result.record.get("link_ablations", {})
    ]
    if found:
        entry = max(found, key=lambda item: item[0])[1]
        drop, control = entry.get("drop"), entry.get("control_drop")
    else:
        legacy = _last_detail(circuits, run, "k_composition")
        ablation = legacy[1].record.get("ablation", {}) if legacy else {}
        is_legacy = (link.source, link.target) == LEGACY_ABLATION_LINK and ablation
        entry = {"status": "measured", "note": ""} if is_legacy else {}
        drop = ablation.get("induction_drop") if is_legacy else None
        control = ablation.get("control_induction_drop") if is_legacy else None
    status = entry.get("status", "not measured")
    note = entry.get("note") or ("" if entry else "no detail step with this link's ablation")
    if status != "measured" or drop is None or control is None:
        return {**empty, "ablation_status": status, "ablation_note": note}
    drop, control = float(drop), float(control)
    difference = drop - control
    return {
        "ablation_drop": drop,
        "ablation_control_drop": control,
        "drop_minus_control": difference,
        "drop_exceeds_control": _boolean(difference > 0 if math.isfinite(difference) else None),
        "ablation_status": status,
        "ablation_note": note,
    }


def link_sizes(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """``stats/links_sizes.csv``: per link x size (and ``all``) x relation of :data:`RELATIONS`,
    the fraction of the runs where the relation is defined that it holds, Wilson CI."""
    rows = []
    for link, by_link in table.groupby("link", sort=False):
        groups = list(by_link.groupby(["model", "size"], sort=False)) + [(("all", "all"), by_link)]
        for (model, size), group in groups:
            for relation in RELATIONS:
                values = group[relation].dropna().astype(bool)
                n, k = len(values), int(values.sum())
                low, high = wilson_interval(k, n, confidence) if n else (np.nan, np.nan)
                rows.append(
                    {
                        "link": link,
                        "source": group["source"].iloc[0],
                        "target": group["target"].iloc[0],
                        "model": model,
                        "size": size,
                        "n_params": group["n_params"].iloc[0] if size != "all" else np.nan,
                        "relation": relation,
                        "n_runs": len(group),
                        "n_defined": n,
                        "n_holds": k,
                        "fraction": k / n if n else np.nan,
                        "ci_low": low,
                        "ci_high": high,
                        "confidence": confidence,
                    }
                )
    return pd.DataFrame(rows, columns=LINK_SIZE_COLUMNS)
