"""In-context retrieval, a layer-level mechanism: at which depth does the token to copy become
readable from the residual stream?

On the induction score's sequences [A, A] (A: L distinct random token ids; N sequences), at
every second-half position p = L..2L-2 the next token is A[p - L + 1], one of the L first-half
ids (the last position, 2L-1, has no next token and is skipped). For each layer l, a "logit
lens" restricted to those in-context candidates: the residual stream after layer l,
``x^l[p]``, goes through the model's final layernorm and the unembedding rows of the L ids.

Score: ``in_context_retrieval``[l] = (1 / (N (L - 1))) #{(n, p): p in L..2L-2,
argmax_{a in A_n} W_U[a] . LN_f(x_n^l[p]) = A_n[p - L + 1]} (ties to the first candidate).
Unit: fraction of positions, per layer (a row of ``layers.parquet``). Read in the scoring job
by hooks on each block during the repeated sequences' second-half pass against the key/value
cache of their first halves (:func:`mechgen.scoring.relational.score_continuations`): no
extra forward pass. The last layer's block output is taken before the final layernorm, which
is applied once here as for every other layer.

Null: chance, 1/L (a readout that ranks the L candidates at random puts the right one on top
with probability 1/L). Ceiling 1. Criterion: in_context_retrieval >= 2 x null.
"""

from __future__ import annotations

import pandas as pd

from mechgen.mechanisms.base import Mechanism, NullContext


def chance_null(table: pd.DataFrame, context: NullContext) -> pd.Series:
    """Per run: 1/L, chance among the L in-context candidates (``context.settings
    ["half_length"]`` is L, the validated ``relational.half_length``)."""
    if "half_length" not in context.settings:
        raise KeyError(
            "the in-context retrieval null needs settings['half_length'] (relational.half_length)"
        )
    half = int(context.settings["half_length"])
    runs = sorted(table["run"].unique())
    return pd.Series(1.0 / half, index=runs, name="null")


MECHANISM = Mechanism(
    name="in_context_retrieval",
    version=1,
    unit="layer",
    score_column="in_context_retrieval",
    description="the layer after which a logit lens over the in-context candidates reads the "
    "token to copy on repeated random sequences",
    units="fraction of positions",
    null=chance_null,
    ceiling=1.0,
    criterion_multiple=2.0,
)
