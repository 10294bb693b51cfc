"""The induction head: on [x_1 .. x_L] x 2 (L random token ids, repeated), a query at position p
of the second copy attends to the token after p's earlier occurrence, p - L + 1.

Score: ``induction``, the mean over sequences and second-half positions p = L..2L-1 of
A[p, p-L+1] (:mod:`mechgen.scoring.relational`; attention probability). Control:
``induction_control``, the same positions on sequences whose halves differ, so a head that
attends to the fixed offset L-1 whatever the content scores as high there (a positional head,
not an induction head). Null: uniform causal attention at those positions,
(1/L) sum_{p=L}^{2L-1} 1/(p+1) (:func:`mechgen.tables.baselines.uniform_induction_baseline`).
Criterion: induction >= 2 x null and control < 0.5 x induction.
"""

from __future__ import annotations

import pandas as pd

from mechgen.mechanisms.base import Mechanism, NullContext
from mechgen.tables.baselines import uniform_induction_baseline


def uniform_induction_null(table: pd.DataFrame, context: NullContext) -> pd.Series:
    """Per run: the induction score of uniform causal attention at the scored positions
    (``context.settings["half_length"]`` is L, the validated ``relational.half_length``)."""
    if "half_length" not in context.settings:
        raise KeyError("the induction null needs settings['half_length'] (relational.half_length)")
    half = int(context.settings["half_length"])
    runs = sorted(table["run"].unique())
    return pd.Series(uniform_induction_baseline(half), index=runs, name="null")


MECHANISM = Mechanism(
    name="induction",
    version=1,
    unit="head",
    score_column="induction",
    description="attention from a repeated token to the token after its earlier occurrence",
    units="attention probability",
    null=uniform_induction_null,
    ceiling=1.0,
    criterion_multiple=2.0,
    control_column="induction_control",
    control_max_fraction=0.5,
    ablation_pass="repeated_sequences",
)
