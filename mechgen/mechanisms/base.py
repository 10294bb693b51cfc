"""What a mechanism is: its definition, once, for every axis (table-side, no torch).

A *mechanism* is a behaviour of an attention head (or a layer) that mechgen scores at every
checkpoint and follows across seeds, sizes and training: the previous-token head, the induction
head, ... Each one is a module of :mod:`mechgen.mechanisms` that defines ``MECHANISM``, a
:class:`Mechanism`. Everything after scoring reads the definition from the registry
(:func:`mechgen.mechanisms.catalog`), so a new mechanism is one module, its test and one config
line (``suites.<name>.mechanisms``).

Scale. Scores of different mechanisms live on different scales (an attention probability, a
fraction of correct successors, a rank). Onsets, slopes and peaks are compared on the
*normalised* scale ``(score - null) / (ceiling - null)``: 0 is what the null (uniform attention,
chance) scores and 1 a perfect mechanism, so one set of relative onset thresholds means the
same for every mechanism (:meth:`Mechanism.normalised`).

Criterion (the functional axis). A head meets the mechanism's criterion when its score is at
least ``criterion_multiple`` x the null and, when the mechanism has a control score, the control
is below ``control_max_fraction`` x the score (:meth:`Mechanism.meets_criterion`). A mechanism
may also exclude, per (run, step), the strongest head of another mechanism
(``exclude_strongest_of``: duplicate-token excludes the step's strongest induction head, whose
attention spills one position back onto the duplicate-token key); the per-head table's
criterion with that exclusion is :func:`mechgen.mechanisms.meets_criterion_in_table`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

Unit = Literal["head", "layer"]

ABLATION_PASSES = ("repeated_sequences",)
"""The passes the scoring job reruns with a head mean-ablated, at detail steps
(``Mechanism.ablation_pass``): ``repeated_sequences``, the [x_1 .. x_L] x 2 passes of the
induction score (:func:`mechgen.scoring.relational.score_induction`), whose per-head scores are the
mechanism's ``score_column``."""


@dataclass(frozen=True)
class Link:
    """A relation the mechanism declares to another one, for the relational axis.

    ``source`` feeds ``target``: the source's head should sit in an earlier layer, compose with
    the target (``composition``: "K", "Q" or "V", scored against a random-rotation null),
    its mean-ablation should lower the target's score more than a same-layer control head's,
    and it should form first (the onset lag target - source > 0).
    """

    source: str
    target: str
    composition: Literal["K", "Q", "V"] = "K"


@dataclass(frozen=True)
class NullContext:
    """What a mechanism's null may depend on besides the scores themselves.

    ``eval_lengths``: per run, the token lengths of the evaluation sentences (empty for a suite
    imported from published tables); ``settings``: the resolved scoring settings of the suite
    (the ``relational`` block: half_length, ...).
    """

    eval_lengths: Mapping[str, Sequence[int]] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)


NullFunction = Callable[[pd.DataFrame, NullContext], pd.Series]
"""``null(table, context)``: the null level per run (a Series indexed by run id), from the
per-head (or per-layer) table and the context."""


@dataclass(frozen=True)
class Mechanism:
    """One mechanism of the catalog.

    - ``name``: registry key and the folder of its statistics (``stats/<name>/``);
    - ``version``: bump when the score's definition changes; only this mechanism's cached
      scores are then recomputed;
    - ``unit``: ``head`` (a column of heads.parquet) or ``layer`` (of layers.parquet);
    - ``score_column``: the column holding the score; ``units``: its unit, in words;
    - ``null``: the null level per run (:data:`NullFunction`), ``ceiling``: a perfect score;
    - ``criterion_multiple``, ``control_column``, ``control_max_fraction``: the criterion;
    - ``exclude_strongest_of``: a mechanism name; a head that is that mechanism's strongest
      head at the same (run, step) never meets this criterion (:func:`strongest_rows`);
    - ``links``: the relations it declares (it is the ``source`` or the ``target``);
    - ``absolute_thresholds``: onsets may use the raw-score thresholds of the reference study
      (only the previous-token mechanism, for the Trott reproduction);
    - ``ablation_pass``: one of :data:`ABLATION_PASSES` when the score can be re-measured with
      another head mean-ablated (a link into this mechanism then gets the mean-ablation test
      at detail steps); None when it cannot (a score from the weights alone, or from a pass
      the test does not rerun): a link into it records that test as "not applicable".
    """

    name: str
    version: int
    unit: Unit
    score_column: str
    description: str
    units: str
    null: NullFunction
    ceiling: float = 1.0
    criterion_multiple: float = 2.0
    control_column: str | None = None
    control_max_fraction: float | None = None
    links: tuple[Link, ...] = ()
    absolute_thresholds: bool = False
    exclude_strongest_of: str | None = None
    ablation_pass: str | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"mechanism name must be an identifier, got {self.name!r}")
        if self.version < 1:
            raise ValueError(f"{self.name}: version must be >= 1, got {self.version}")
        if self.unit not in ("head", "layer"):
            raise ValueError(f"{self.name}: unit must be 'head' or 'layer', got {self.unit!r}")
        if self.exclude_strongest_of is not None and (
            not self.exclude_strongest_of.isidentifier() or self.exclude_strongest_of == self.name
        ):
            raise ValueError(
                f"{self.name}: exclude_strongest_of must name another mechanism, got "
                f"{self.exclude_strongest_of!r}"
            )
        if self.ablation_pass is not None and self.ablation_pass not in ABLATION_PASSES:
            raise ValueError(
                f"{self.name}: ablation_pass must be one of {', '.join(ABLATION_PASSES)} or "
                f"None, got {self.ablation_pass!r}"
            )
        if (self.control_column is None) != (self.control_max_fraction is None):
            raise ValueError(
                f"{self.name}: control_column and control_max_fraction go together"
            )

    def criterion_text(self) -> str:
        """The criterion in words, as the report's captions state it (the same terms as
        :meth:`meets_criterion` and ``exclude_strongest_of``)."""
        text = f"{self.score_column} >= {self.criterion_multiple:g} x the null"
        if self.control_column is not None:
            text += f", and {self.control_column} < {self.control_max_fraction:g} x the score"
        if self.exclude_strongest_of is not None:
            text += f", and not the step's strongest {self.exclude_strongest_of} head"
        return text

    def normalised(self, score: Any, null: Any) -> np.ndarray:
        """``(score - null) / (ceiling - null)``: 0 at the null, 1 for a perfect mechanism.

        Undefined (NaN) where the null reaches the ceiling.
        """
        score = np.asarray(score, dtype=float)
        null = np.asarray(null, dtype=float)
        span = self.ceiling - null
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(span > 0, (score - null) / span, np.nan)

    def meets_criterion(self, score: Any, null: Any, control: Any = None) -> np.ndarray:
        """True where ``score >= criterion_multiple * null`` and, with a control score,
        ``control < control_max_fraction * score``. NaN scores never meet it."""
        score = np.asarray(score, dtype=float)
        meets = np.isfinite(score) & (score >= self.criterion_multiple * np.asarray(null, float))
        if self.control_column is not None:
            if control is None:
                raise ValueError(f"{self.name}: the criterion needs {self.control_column}")
            control = np.asarray(control, dtype=float)
            meets &= np.isfinite(control) & (control < self.control_max_fraction * score)
        return meets


def strongest_rows(table: pd.DataFrame, column: str) -> pd.Series:
    """Per row of a per-head table: True on the head with the largest ``column`` of its
    (run, step).

    Non-finite scores and flagged heads (``nonfinite``) are left out; ties go to the lowest
    layer, then head (as :func:`mechgen.axes.developmental.trajectories` picks its argmax). A
    (run, step) with no finite score has no strongest head.
    """
    missing = [c for c in ("run", "step", "layer", "head", column) if c not in table.columns]
    if missing:
        raise ValueError(f"per-head table is missing column(s): {', '.join(missing)}")
    values = pd.to_numeric(table[column], errors="coerce").astype(float)
    usable = np.isfinite(values.to_numpy())
    if "nonfinite" in table.columns:
        usable &= ~table["nonfinite"].fillna(False).astype(bool).to_numpy()
    ordered = table.loc[usable, ["run", "step", "layer", "head"]].assign(value=values[usable])
    ordered = ordered.sort_values(["run", "step", "layer", "head"], kind="stable")
    strongest = pd.Series(False, index=table.index)
    if not ordered.empty:
        strongest.loc[ordered.groupby(["run", "step"], sort=False)["value"].idxmax()] = True
    return strongest
