"""Settings of the scoring and training jobs that config validation checks at start.

They live apart from the jobs' code (:mod:`mechgen.circuit`, :mod:`mechgen.toy`), which loads
torch: validating a config, which Snakemake does at every start (and on a cluster in every
job), then costs no torch import. The jobs import these same definitions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

# ---- the relational scoring job (mechgen.circuit)

PYTHIA_TOKENIZER_SIZE = 50277
"""Pythia's tokenizer has 50,277 ids; its embedding matrix is padded to 50,304 untrained rows."""


@dataclass(frozen=True)
class CircuitSettings:
    """The ``relational:`` config of one scoring job (``detail``: this step is a detail step).

    Units: ``n_sequences`` sequences of ``half_length`` tokens (x2); token ids in
    ``[token_lo, min(token_hi, vocab_size))``; ``max_offset`` in tokens; ``cka_max_tokens``
    evaluation tokens; ``n_baseline`` rotation draws.
    """

    n_sequences: int = 100
    half_length: int = 50
    token_lo: int = 2
    token_hi: int = PYTHIA_TOKENIZER_SIZE
    seed: int = 0
    batch_size: int = 16
    copying: bool = True
    max_offset: int = 8
    qk_top_k: int = 3
    detail: bool = False
    n_baseline: int = 200
    n_random_heads: int = 4
    cka_max_tokens: int = 4096
    control_seed: int = 0

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> CircuitSettings:
        """Settings from a params mapping; unknown keys (e.g. ``enabled``) are ignored."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in mapping.items() if k in known}
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in (
            "n_sequences",
            "half_length",
            "batch_size",
            "qk_top_k",
            "n_baseline",
            "cka_max_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"relational.{name} must be a positive int; got {value!r}")
        if self.half_length < 2:
            raise ValueError(f"relational.half_length must be >= 2; got {self.half_length}")
        if not 0 <= self.token_lo < self.token_hi:
            raise ValueError(
                f"relational token range must satisfy 0 <= token_lo < token_hi; got "
                f"[{self.token_lo}, {self.token_hi})"
            )
        if self.max_offset < 1 or self.n_random_heads < 0:
            raise ValueError("relational.max_offset must be >= 1 and n_random_heads >= 0")

    def record(self) -> dict[str, Any]:
        """JSON-serialisable copy (for the sidecar and the cache key)."""
        return asdict(self)


# ---- the toy training job (mechgen.toy)

SIZE_KEYS_REQUIRED = ("n_layers", "n_heads", "d_model")
SIZE_KEYS_OPTIONAL = ("d_ff",)
TRAINING_KEYS_REQUIRED = (
    "steps",
    "batch_size",
    "seq_len",
    "learning_rate",
    "warmup_steps",
    "weight_decay",
)
TRAINING_KEYS_OPTIONAL = (
    "threads",
    "repeat_fraction",
    "repeat_source",
    "repeat_vocab",
    "repeat_min_half",
)
REPEAT_SOURCES = ("random", "corpus", "window")
"""Where the repeated content of a repeated-content row comes from (see :func:`train_run`):
``random`` ids or a ``corpus`` window placed twice as a whole row (:func:`repeated_rows`), or a
span of the row's own text ``window`` repeated in place (:func:`window_repeats`)."""
