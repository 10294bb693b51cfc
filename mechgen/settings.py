"""Settings of the scoring and training jobs that config validation checks at start.

They live apart from the jobs' code (:mod:`mechgen.scoring.circuit`, :mod:`mechgen.sources.toy`), which loads
torch: validating a config, which Snakemake does at every start (and on a cluster in every
job), then costs no torch import. The jobs import these same definitions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# ---- the relational scoring job (mechgen.scoring.circuit)

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


# ---- the toy training job (mechgen.sources.toy)

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


# ---- where checkpoints come from, and the hub etiquette (mechgen.sources.checkpoints)

CHECKPOINT_SOURCES = ("toy", "hf", "local")
"""Suite sources whose checkpoints this module finds: trained by the pipeline (``toy``), the
Hugging Face hub (``hf``), a directory of run folders (``local``)."""
SUITE_SOURCES = (*CHECKPOINT_SOURCES, "table")
"""Every ``suites.<name>.source`` (``table``: published per-head tables, no checkpoints)."""


@dataclass(frozen=True)
class HubSettings:
    """How mechgen talks to the hub (config key ``hub``): download concurrency and retries.

    ``max_concurrent_downloads``: weight-file downloads running at once among all processes
    sharing ``download_slots_dir`` (default ``<HF hub cache>/.locks/mechgen-download-slots``);
    None = no limit. See :class:`mechgen.sources.hubcache.DownloadSlots` for how this holds across
    Snakemake jobs and on a cluster.

    Retries (only of what huggingface_hub itself does not retry, see :func:`retry_wait_s` and
    the module docstring): up to ``max_retries`` retries after the first attempt, waiting
    ``retry_wait_s`` seconds (exponential from ``backoff_base_s``, capped at ``backoff_max_s``,
    with ``backoff_jitter`` randomisation); a ``Retry-After`` header, when longer, is obeyed,
    unless it exceeds ``retry_after_max_s`` (then the fetch fails at once).
    """

    max_concurrent_downloads: int | None = 2
    max_retries: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    backoff_jitter: float = 0.5
    retry_after_max_s: float = 600.0
    download_slots_dir: str | None = None
    download_slot_timeout_s: float | None = None

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, rule: str) -> ValueError:
            return ValueError(f"config key 'hub.{key}': {value!r} is not {rule}")

        limit = self.max_concurrent_downloads
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise bad("max_concurrent_downloads", limit, "a positive int or null (no limit)")
        if (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or self.max_retries < 0
        ):
            raise bad("max_retries", self.max_retries, "an int >= 0")
        for key in ("backoff_base_s", "backoff_max_s", "retry_after_max_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise bad(key, value, "a number of seconds >= 0")
        if self.backoff_max_s < self.backoff_base_s:
            raise bad(
                "backoff_max_s",
                self.backoff_max_s,
                f">= hub.backoff_base_s ({self.backoff_base_s})",
            )
        jitter = self.backoff_jitter
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter <= 1:
            raise bad("backoff_jitter", jitter, "a fraction in [0, 1]")
        timeout = self.download_slot_timeout_s
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
        ):
            raise bad("download_slot_timeout_s", timeout, "a positive number of seconds or null")

    @classmethod
    def from_config(cls, hub: Mapping[str, Any] | None) -> HubSettings:
        """Settings from the config's ``hub`` mapping (missing keys take the defaults above).

        Raises ``ValueError`` naming ``hub.<key>`` for an unknown key or a bad value.
        """
        hub = dict(hub or {})
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(hub) - set(allowed))
        if unknown:
            raise ValueError(
                f"config key 'hub.{unknown[0]}' is unknown; allowed: {', '.join(allowed)}"
            )
        return cls(**hub)

    def slots_dir(self, cache_dir: str | Path) -> Path:
        """The slots' folder: ``download_slots_dir`` or ``<cache_dir>/.locks/mechgen-download-slots``."""
        if self.download_slots_dir:
            return Path(self.download_slots_dir)
        return Path(cache_dir) / ".locks" / "mechgen-download-slots"
