"""Mechanisms compared across model families: a study that combines suites.

Table-side (pandas, no torch). A *study* (config ``studies.<name>.combine``) combines suites
that have each run their own pipeline: it reads each member's per-mechanism tables under
``results/<member>/stats/`` (nothing is rescored) and writes its own under
``results/<study>/``. A member's *family* is its suite's ``architecture`` (gpt_neox, gpt2).

Common scales across families:

- *tokens seen*: ``tokens_seen = step x tokens_per_step`` of the run's suite
  (:func:`tokens_seen`); an onset in tokens is the onset step so converted, since the suites'
  steps hold different numbers of tokens;
- *relative depth*: ``(layer + 1) / n_layers`` of the run's strongest final head;
- *normalised score*: ``(score - null) / (ceiling - null)`` of the mechanism
  (:meth:`mechgen.mechanisms.Mechanism.normalised`), as the members computed it;
- *parameter count*: ``n_params`` as each member counted it, on a log10 scale.

Outputs (:func:`analyze_study`):

- ``stats/families.csv`` (:data:`FAMILIES_COLUMNS`), tidy: one row per mechanism x axis x
  family with the family's value (``kind`` = ``profile``), and one per mechanism x axis x
  family other than the reference (``kind`` = ``difference``: ``family - reference``). The
  profile axes are :func:`mechgen.stats.crossmech.profile`'s row over all sizes, computed over the
  family's runs pooled across its members, with onsets in tokens. Confidence intervals: the
  Wilson interval of a fraction; for the per-run axes (:data:`BOOTSTRAP_AXES`) a bootstrap
  (``scipy.stats.bootstrap``) resampling runs independently within each family (sizes and seeds
  pooled); none for the axes that summarise pairs of runs (depth agreement, trajectory r,
  configurational z) or links.
- ``stats/families_models.csv``: per mechanism, the mixed models
  ``log10(onset_tokens) ~ family + log10(n_params) + (1|seed)`` over the runs where the
  mechanism formed, and ``peak ~ family + log10(n_params) + (1|seed)`` over every run (REML,
  :func:`mechgen.stats.analysis.fit_mixed`; the regressions table's columns with ``mechanism``). The
  family term is ``family[<f> - <reference>]``. ``log10(n_params)`` is in the model only when
  some family has two or more sizes (otherwise it is a function of the family and the design
  would be rank deficient); the ``formula`` column says which model was fitted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from mechgen import mechanisms
from mechgen.stats import crossmech
from mechgen.stats.analysis import DEFAULT_BOOTSTRAP, REGRESSION_COLUMNS, fit_mixed, wilson_interval

log = logging.getLogger(__name__)

MEMBER_TABLES = ("per_seed", "functional_run_step", "convergence")
"""The tables of a member's ``stats/<mechanism>/`` that a study reads."""

FAMILIES_COLUMNS = [
    "mechanism",
    "axis",
    "kind",
    "family",
    "reference",
    "members",
    "estimate",
    "ci_low",
    "ci_high",
    "confidence",
    "ci_method",
    "n",
    "n_reference",
]
"""Columns of ``stats/families.csv``."""

PROFILE_AXES = [
    "fraction_qualifying",
    "layer_modal_share",
    "depth_mean_abs_diff",
    "onset_cv",
    "within_r",
    "between_r",
    "link_layer_order",
    "link_onset_order",
    "link_ablation",
    "configurational_z",
]
"""Axes taken from the family's profile row over all sizes (:func:`mechgen.stats.crossmech.profile`)."""

SCALE_AXES = ["relative_depth", "log10_onset_tokens", "peak", "log10_n_params"]
"""Axes on the common scales, each a mean over the family's runs (``log10_onset_tokens`` over
the runs where the mechanism formed, with an onset after step 0: log10 of 0 tokens is
undefined)."""

AXES = PROFILE_AXES + SCALE_AXES
"""Every axis of ``stats/families.csv``, in its row order."""

MODEL_COLUMNS = ["mechanism"] + REGRESSION_COLUMNS
"""Columns of ``stats/families_models.csv``."""


def tokens_seen(step: np.ndarray | pd.Series | int, tokens_per_step: int) -> np.ndarray:
    """Tokens seen after ``step`` optimiser steps: ``step x tokens_per_step`` (int64; a step
    is one batch of ``tokens_per_step`` tokens)."""
    return np.asarray(step, dtype=np.int64) * np.int64(tokens_per_step)


@dataclass(frozen=True)
class Member:
    """One suite of a study: its name, family (``architecture``), tokens per step and the
    directory of its statistics (``results/<suite>/stats``)."""

    suite: str
    family: str
    tokens_per_step: int
    stats_dir: Path


def member_files(member: Member, names: Sequence[str], relational: bool) -> list[Path]:
    """The files of ``member`` a study reads: :data:`MEMBER_TABLES` of each mechanism in
    ``names``, and ``relational.csv`` / ``configurational.csv`` when ``relational``."""
    files = [member.stats_dir / n / f"{t}.csv" for n in names for t in MEMBER_TABLES]
    if relational:
        files += [member.stats_dir / "relational.csv", member.stats_dir / "configurational.csv"]
    return files


def _read(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


@dataclass
class StudyTables:
    """The members' tables, concatenated with ``family`` and ``member`` columns: per mechanism
    ``per_seed`` (``onset_tokens`` recomputed, see :func:`tokens_seen`), ``trajectories``
    (``functional_run_step`` with ``tokens_seen`` recomputed) and ``convergence``; and the
    relational and configurational tables (None when no member has them)."""

    per_seed: dict[str, pd.DataFrame]
    trajectories: dict[str, pd.DataFrame]
    convergence: dict[str, pd.DataFrame]
    relational: pd.DataFrame | None
    configurational: pd.DataFrame | None
    families: list[str]


def load_members(
    members: Sequence[Member], names: Sequence[str], relational: Mapping[str, bool]
) -> StudyTables:
    """Read every member's tables (``relational[suite]``: whether it has the relational ones).

    Raises ``ValueError`` when two members share a model name (a table suite's models are
    known only here), naming the study key.
    """
    per_seed: dict[str, list[pd.DataFrame]] = {n: [] for n in names}
    traj: dict[str, list[pd.DataFrame]] = {n: [] for n in names}
    conv: dict[str, list[pd.DataFrame]] = {n: [] for n in names}
    rel, cfg = [], []
    owner: dict[str, str] = {}
    for m in members:
        tag = {"family": m.family, "member": m.suite}
        for name in names:
            seeds = _read(m.stats_dir / name / "per_seed.csv").assign(**tag)
            for model in seeds.get("model", pd.Series(dtype=str)).unique():
                if owner.setdefault(model, m.suite) != m.suite:
                    raise ValueError(
                        f"config key 'studies.<study>.combine': suites {owner[model]!r} and "
                        f"{m.suite!r} both have model {model!r}"
                    )
            if len(seeds):
                seeds["onset_tokens"] = np.where(
                    seeds["onset_step"].notna(),
                    seeds["onset_step"].fillna(0).to_numpy(dtype=float) * m.tokens_per_step,
                    np.nan,
                )
            per_seed[name].append(seeds)
            steps = _read(m.stats_dir / name / "functional_run_step.csv").assign(**tag)
            if len(steps):
                steps["tokens_seen"] = tokens_seen(steps["step"], m.tokens_per_step)
                steps["tokens_per_step"] = m.tokens_per_step
            traj[name].append(steps)
            conv[name].append(_read(m.stats_dir / name / "convergence.csv").assign(**tag))
        if relational.get(m.suite):
            rel.append(_read(m.stats_dir / "relational.csv").assign(**tag))
            cfg.append(_read(m.stats_dir / "configurational.csv").assign(**tag))
    families = list(dict.fromkeys(m.family for m in members))

    def cat(frames: list[pd.DataFrame]) -> pd.DataFrame:
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    return StudyTables(
        per_seed={n: cat(v) for n, v in per_seed.items()},
        trajectories={n: cat(v) for n, v in traj.items()},
        convergence={n: cat(v) for n, v in conv.items()},
        relational=cat(rel) if rel else None,
        configurational=cat(cfg) if cfg else None,
        families=families,
    )


# ---- the family profile ------------------------------------------------------------------


def family_profile(
    tables: StudyTables,
    family: str,
    names: Sequence[str],
    confidence: float,
    rng: np.random.Generator,
    n_permutations: int,
) -> pd.DataFrame:
    """:func:`mechgen.stats.crossmech.profile` over the runs of ``family`` (all its members pooled),
    with the onsets in tokens (``onset_step`` := ``onset_tokens``, so ``onset_cv`` is the CV of
    the onsets in tokens); a ``family`` column added."""
    results = {}
    for name in names:
        mechanism = mechanisms.get(name)
        seeds = tables.per_seed[name]
        seeds = seeds[seeds["family"] == family] if len(seeds) else seeds
        if seeds.empty:
            results[name] = crossmech.Scored(mechanism, note="no runs of this family scored it")
            continue
        seeds = seeds.assign(onset_step=seeds["onset_tokens"])
        conv = tables.convergence[name]
        conv = (
            conv[conv["family"] == family]
            if len(conv)
            else pd.DataFrame(columns=crossmech.TABLE_COLUMNS["convergence"])
        )
        results[name] = crossmech.Scored(
            mechanism, tables={"per_seed": seeds.reset_index(drop=True), "convergence": conv}
        )

    def own(table: pd.DataFrame | None) -> pd.DataFrame | None:
        return None if table is None or table.empty else table[table["family"] == family]

    profile = crossmech.profile(
        results,
        confidence,
        rng,
        n_permutations,
        own(tables.relational),
        own(tables.configurational),
    )
    return profile.assign(family=family)


# ---- bootstrap of the per-run axes -------------------------------------------------------


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x))


def _cv(x: np.ndarray) -> float:
    mean = float(np.mean(x))
    return float(np.std(x, ddof=1) / mean) if len(x) >= 2 and mean > 0 else float("nan")


BOOTSTRAP_AXES: dict[str, tuple[str, Callable[[np.ndarray], float], bool]] = {
    "fraction_qualifying": ("qualifying_final", _mean, False),
    "onset_cv": ("onset_tokens", _cv, True),
    "relative_depth": ("final_relative_depth", _mean, False),
    "log10_onset_tokens": ("log10_onset_tokens", _mean, True),
    "peak": ("peak", _mean, False),
    "log10_n_params": ("log10_n_params", _mean, False),
}
"""Axes with a bootstrap CI: the per-run column, the statistic over runs, and whether only the
runs where the mechanism formed count."""


def axis_values(per_seed: pd.DataFrame, axis: str) -> np.ndarray:
    """The per-run values of ``axis`` (:data:`BOOTSTRAP_AXES`) in ``per_seed``, finite only."""
    column, _, formed_only = BOOTSTRAP_AXES[axis]
    rows = per_seed[per_seed["formed"].astype(bool)] if formed_only else per_seed
    if column == "log10_onset_tokens":
        onset = rows["onset_tokens"].to_numpy(dtype=float)
        values = np.log10(onset, out=np.full_like(onset, np.nan), where=onset > 0)
    elif column == "log10_n_params":
        values = np.log10(rows["n_params"].to_numpy(dtype=float))
    else:
        values = rows[column].astype(float).to_numpy()
    return values[np.isfinite(values)]


def bootstrap_ci(
    samples: Sequence[np.ndarray],
    statistic: Callable[..., float],
    bootstrap_cfg: Mapping[str, object] | None = None,
) -> tuple[float, float]:
    """Bootstrap CI of ``statistic(*samples)`` (``scipy.stats.bootstrap``, each sample resampled
    independently, ``paired=False``), with the config's ``analysis.bootstrap`` settings. (NaN,
    NaN) when a sample has fewer than 2 values or the statistic is undefined on the data; (v, v)
    when every sample is constant (every resample then gives the statistic's value v)."""
    cfg = {**DEFAULT_BOOTSTRAP, **(bootstrap_cfg or {})}
    samples = [np.asarray(s, dtype=float) for s in samples]
    if any(len(s) < 2 for s in samples) or not np.isfinite(statistic(*samples)):
        return float("nan"), float("nan")
    if all(np.ptp(s) == 0 for s in samples):
        value = float(statistic(*samples))
        return value, value
    with np.errstate(invalid="ignore", divide="ignore"):
        result = scipy_stats.bootstrap(
            tuple(samples),
            statistic,
            n_resamples=int(cfg["n_resamples"]),
            confidence_level=float(cfg["confidence"]),
            method=str(cfg["method"]),
            paired=False,
            vectorized=False,
            rng=np.random.default_rng(int(cfg["seed"])),
        )
    low, high = result.confidence_interval
    return float(low), float(high)


# ---- families.csv --------------------------------------------------------------------------


def families_table(
    tables: StudyTables,
    names: Sequence[str],
    bootstrap_cfg: Mapping[str, object],
    rng: np.random.Generator,
    n_permutations: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``stats/families.csv`` (see the module docstring) and the families' profiles
    (:func:`family_profile`, every size row, with ``family``). The reference family is the
    first family of the study's members."""
    confidence = float(bootstrap_cfg.get("confidence", DEFAULT_BOOTSTRAP["confidence"]))
    method = f"bootstrap {bootstrap_cfg.get('method', DEFAULT_BOOTSTRAP['method'])}"
    families = tables.families
    reference = families[0]
    profiles = pd.concat(
        [family_profile(tables, f, names, confidence, rng, n_permutations) for f in families],
        ignore_index=True,
    )
    rows = []
    for name in names:
        seeds = tables.per_seed[name]
        by_family = {f: seeds[seeds["family"] == f] if len(seeds) else seeds for f in families}
        members = {
            f: ";".join(dict.fromkeys(by_family[f]["member"])) if len(by_family[f]) else ""
            for f in families
        }
        values: dict[str, dict[str, float]] = {}
        counts: dict[str, dict[str, int]] = {}
        for family in families:
            row = profiles[
                (profiles["mechanism"] == name)
                & (profiles["family"] == family)
                & (profiles["size"] == crossmech.ALL_SIZES)
            ].iloc[0]
            seeds_f = by_family[family]
            values[family] = {}
            counts[family] = {}
            for axis in AXES:
                low = high = np.nan
                ci = ""
                if not bool(row["scored"]) or seeds_f.empty:
                    estimate, n = np.nan, 0
                elif axis in PROFILE_AXES:
                    estimate, n = float(row[axis]), int(row["n_runs"])
                else:
                    x = axis_values(seeds_f, axis)
                    estimate = BOOTSTRAP_AXES[axis][1](x) if len(x) else np.nan
                    n = len(x)
                if axis == "fraction_qualifying" and bool(row["scored"]):
                    low, high = wilson_interval(int(row["n_runs_qualifying"]), n, confidence)
                    ci = "wilson"
                elif axis in BOOTSTRAP_AXES and not seeds_f.empty:
                    x = axis_values(seeds_f, axis)
                    low, high = bootstrap_ci([x], BOOTSTRAP_AXES[axis][1], bootstrap_cfg)
                    ci = method
                if axis == "onset_cv" and not seeds_f.empty:
                    n = len(axis_values(seeds_f, axis))
                values[family][axis] = estimate
                counts[family][axis] = n
                rows.append(
                    {
                        "mechanism": name,
                        "axis": axis,
                        "kind": "profile",
                        "family": family,
                        "reference": "",
                        "members": members[family],
                        "estimate": estimate,
                        "ci_low": low,
                        "ci_high": high,
                        "confidence": confidence if ci else np.nan,
                        "ci_method": ci,
                        "n": n,
                        "n_reference": pd.NA,
                    }
                )
        for family in families[1:]:
            for axis in AXES:
                estimate = values[family][axis] - values[reference][axis]
                low = high = np.nan
                ci = ""
                n, n_ref = counts[family][axis], counts[reference][axis]
                if (
                    axis in BOOTSTRAP_AXES
                    and not by_family[family].empty
                    and not by_family[reference].empty
                ):
                    x = axis_values(by_family[family], axis)
                    y = axis_values(by_family[reference], axis)
                    stat = BOOTSTRAP_AXES[axis][1]
                    low, high = bootstrap_ci(
                        [x, y], lambda a, b, s=stat: s(a) - s(b), bootstrap_cfg
                    )
                    ci = method
                rows.append(
                    {
                        "mechanism": name,
                        "axis": axis,
                        "kind": "difference",
                        "family": family,
                        "reference": reference,
                        "members": members[family],
                        "estimate": estimate,
                        "ci_low": low,
                        "ci_high": high,
                        "confidence": confidence if ci else np.nan,
                        "ci_method": ci,
                        "n": n,
                        "n_reference": n_ref,
                    }
                )
    table = pd.DataFrame(rows, columns=FAMILIES_COLUMNS)
    for col in ("n", "n_reference"):
        table[col] = pd.to_numeric(table[col]).astype("Int64")
    return table, profiles


# ---- the mixed models ----------------------------------------------------------------------


def family_design(
    per_seed: pd.DataFrame, families: Sequence[str]
) -> tuple[pd.DataFrame, list[str]]:
    """``per_seed`` with an indicator column ``family_<i>`` (1 for family ``families[i]``,
    i >= 1; the first family is the reference) and ``log10_n_params``; and the indicator names."""
    data = per_seed.assign(log10_n_params=np.log10(per_seed["n_params"].astype(float)))
    indicators = []
    for i, family in enumerate(families[1:], start=1):
        data[f"family_{i}"] = (data["family"] == family).astype(float)
        indicators.append(f"family_{i}")
    return data, indicators


def family_models(per_seed: pd.DataFrame, families: Sequence[str], mechanism: str = "") -> list:
    """The two mixed models of the module docstring for one mechanism's runs (``per_seed`` of
    every family, with ``onset_tokens``); a list of :class:`mechgen.stats.analysis.MixedFit`."""
    if per_seed.empty:
        return []
    data, indicators = family_design(per_seed, families)
    term_names = {"Intercept": "(Intercept)", "log10_n_params": "log10(n_params)"}
    term_names.update(
        {f"family_{i}": f"family[{f} - {families[0]}]" for i, f in enumerate(families[1:], 1)}
    )
    # log10(n_params) is identifiable only if some family has two sizes.
    with_size = bool((data.groupby("family")["n_params"].nunique() > 1).any())
    rhs = indicators + (["log10_n_params"] if with_size else [])
    shown = ["family"] * bool(indicators) + (["log10(n_params)"] if with_size else [])
    formed = data[data["formed"].astype(bool) & (data["onset_tokens"] > 0)]
    formed = formed.assign(log10_onset_tokens=np.log10(formed["onset_tokens"].astype(float)))
    specs = [
        ("family_onset", formed, "log10_onset_tokens", "log10(onset_tokens)"),
        ("family_peak", data, "peak", "peak"),
    ]
    fits = []
    for analysis, frame, response, shown_response in specs:
        formula = f"{response} ~ {' + '.join(rhs) if rhs else '1'}"
        display = f"{shown_response} ~ {' + '.join(shown) if shown else '1'} + (1|seed)"
        fits.append(
            fit_mixed(
                frame,
                formula,
                ["seed"],
                reml=True,
                analysis=f"{analysis}" + (f"_{mechanism}" if mechanism else ""),
                display_formula=display,
                term_names=term_names,
            )
        )
    return fits


def models_table(tables: StudyTables, names: Sequence[str]) -> pd.DataFrame:
    """``stats/families_models.csv``: :func:`family_models` of every mechanism."""
    parts = []
    for name in names:
        for fit in family_models(tables.per_seed[name], tables.families):
            parts.append(fit.table().assign(mechanism=name))
    if not parts:
        return pd.DataFrame(columns=MODEL_COLUMNS)
    return pd.concat(parts, ignore_index=True)[MODEL_COLUMNS]


def analyze_study(
    members: Sequence[Member],
    names: Sequence[str],
    relational: Mapping[str, bool],
    bootstrap_cfg: Mapping[str, object],
    n_permutations: int,
) -> tuple[StudyTables, dict[str, pd.DataFrame]]:
    """Read the members' tables and compute ``families`` (stats/families.csv), ``profiles``
    (the per-family profiles) and ``models`` (stats/families_models.csv)."""
    tables = load_members(members, names, relational)
    rng = np.random.default_rng(int(bootstrap_cfg.get("seed", 0)))
    families, profiles = families_table(tables, names, bootstrap_cfg, rng, n_permutations)
    log.info("study of %d members, families %s", len(members), ", ".join(tables.families))
    return tables, {
        "families": families,
        "profiles": profiles,
        "models": models_table(tables, names),
    }


def summary_rst(
    study: str, members: Sequence[Member], families: pd.DataFrame, models: pd.DataFrame
) -> str:
    """The report's opening section of a study: its members and families, and per mechanism the
    family differences (``families.csv``) in onset (log10 tokens) and peak, with their CIs, and
    the mixed models' family terms (``families_models.csv``)."""
    lines = [
        "Across model families",
        "---------------------",
        "",
        f"Study ``{study}`` combines "
        + ", ".join(f"``{m.suite}`` ({m.family}, {m.tokens_per_step} tokens/step)" for m in members)
        + ". Each member's tables are read from ``results/<member>/stats/``; nothing is "
        "rescored. Onsets are compared in tokens seen (step x tokens per step), depths as "
        "(layer + 1) / n_layers, scores on each mechanism's normalised scale, sizes as "
        "log10(n_params). Every number is in ``stats/families.csv`` and "
        "``stats/families_models.csv``; the figures under *Across families* draw them.",
        "",
    ]
    diff = families[
        (families["kind"] == "difference")
        & families["axis"].isin(
            ["log10_onset_tokens", "peak", "relative_depth", "fraction_qualifying"]
        )
    ]
    if diff.empty:
        lines.append("The study has one family: there is no difference between families.")
        return "\n".join(lines) + "\n"

    def cell(row: pd.Series) -> str:
        if not np.isfinite(row["estimate"]):
            return "–"
        ci = f" [{row['ci_low']:.3g}, {row['ci_high']:.3g}]" if np.isfinite(row["ci_low"]) else ""
        return f"{row['estimate']:.3g}{ci}"

    header = [
        "mechanism",
        "family - reference",
        "onset, log10 tokens",
        "peak",
        "relative depth",
        "fraction qualifying",
        "onset, mixed model",
    ]
    table = []
    for (name, family), group in diff.groupby(["mechanism", "family"], sort=False):
        by_axis = group.set_index("axis")
        reference = group["reference"].iloc[0]
        term = f"family[{family} - {reference}]"
        fit = models[
            (models["mechanism"] == name)
            & (models["analysis"] == "family_onset")
            & (models["term"] == term)
        ]
        mixed = (
            f"{fit['estimate'].iloc[0]:.3g} (SE {fit['se'].iloc[0]:.2g})"
            if len(fit) and np.isfinite(fit["estimate"].iloc[0])
            else "–"
        )
        table.append(
            [name, f"{family} - {reference}"]
            + [
                cell(by_axis.loc[a])
                for a in ("log10_onset_tokens", "peak", "relative_depth", "fraction_qualifying")
            ]
            + [mixed]
        )
    lines += [".. list-table::", "   :header-rows: 1", ""]
    for row in [header] + table:
        lines.append("   * - " + row[0])
        lines += [f"     - {c}" for c in row[1:]]
    confidence = families["confidence"].dropna()
    level = f"{confidence.iloc[0]:.0%}" if len(confidence) else ""
    lines += [
        "",
        (
            f"Brackets: {level} bootstrap intervals (runs resampled within each family). The "
            "mixed model's family term is on log10(onset tokens), with seed as a random intercept."
        ),
    ]
    return "\n".join(lines) + "\n"
