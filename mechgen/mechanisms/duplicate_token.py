"""The duplicate-token head: on [x_1 .. x_L] x 2 (L random token ids, repeated), a query at
position p of the second copy attends to the same token's earlier occurrence, p - L.

Score: ``duplicate_token``, the mean over sequences and second-half positions p = L..2L-1 of
A[p, p-L] (attention probability), read in the induction score's forward passes
(:func:`mechgen.scoring.relational.score_induction`, :func:`mechgen.scoring.relational.repeat_offset_attention`).
Control: ``duplicate_token_control``, the same positions on the induction control's sequences,
whose halves differ (:func:`mechgen.scoring.circuit.positional_controls`), so a head that attends to the
fixed offset L whatever the content scores as high there. Null: uniform causal attention at
those positions, (1/L) sum_{p=L}^{2L-1} 1/(p+1), the induction null (uniform attention puts
1/(p+1) on every key, p - L as much as p - L + 1). Criterion: duplicate_token >= 2 x null,
control < 0.5 x duplicate_token, and the head is not the (run, step)'s strongest induction head
(``exclude_strongest_of``): an induction head's attention spills one position back, onto p - L.
"""

from __future__ import annotations

from mechgen.mechanisms.base import Mechanism
from mechgen.mechanisms.induction import uniform_induction_null

MECHANISM = Mechanism(
    name="duplicate_token",
    version=1,
    unit="head",
    score_column="duplicate_token",
    description="attention from a repeated token to its own earlier occurrence",
    units="attention probability",
    null=uniform_induction_null,
    ceiling=1.0,
    criterion_multiple=2.0,
    control_column="duplicate_token_control",
    control_max_fraction=0.5,
    ablation_pass="repeated_sequences",
    exclude_strongest_of="induction",
)
