"""Model families: what mechgen knows about each architecture's published runs, without torch.

A suite's ``architecture`` (config key ``suites.<name>.architecture``, one of
:data:`ARCHITECTURES`, default :data:`DEFAULT_ARCHITECTURE`) picks a :class:`Family`. The family
says how a checkpoint's hub revision is named, which named checkpoint schedules exist, the
tokens per step of the published runs, the tokenizer and its BOS convention, the ``model_type``
of a checkpoint's ``config.json`` and which weight files its revisions hold. Everything that
turns a step into a revision name (:mod:`mechgen.sources.checkpoints`, :mod:`mechgen.sources.toy`, the offline cache
builder :mod:`mechgen.sources.hubcache` and the rules) asks here, so a third family is one more entry.

This module imports neither torch nor transformers: config validation reads it at every start.

- ``gpt_neox``: Pythia and PolyPythias (``EleutherAI/pythia-{size}[-seed{k}]``) and the toy
  suite. Branches ``step{N}``; 154 of them (:data:`mechgen.schedules.PYTHIA_SCHEDULES`).
  Tokenizer: GPT-NeoX's byte-level BPE (50,277 entries with padding), ``<|endoftext|>`` id 0 as
  BOS/EOS; encoding adds no BOS. The ``stepN`` branches hold ``pytorch_model.bin`` only (a
  ``torch.save`` zip archive whose output projection is named ``embed_out``).
- ``gpt2``: Stanford CRFM's GPT-2 runs of the Mistral project
  (``stanford-crfm/{name}-gpt2-{small,medium}-x{seed}``) and the toy GPT-2 suite. Branches
  ``checkpoint-{N}``; 609 of them (:data:`mechgen.schedules.CRFM_SCHEDULES`). Tokenizer: OpenAI's
  GPT-2 byte-level BPE (50,257 entries), ``<|endoftext|>`` id 50256 as BOS/EOS; encoding adds no
  BOS (``GPT2TokenizerFast`` has ``add_bos_token`` False). The runs were trained and uploaded
  in 2021 with transformers 4.x's Trainer, which saved ``pytorch_model.bin`` (safetensors became
  its default only in 4.35, 2023), so a ``checkpoint-N`` branch is expected to hold
  ``pytorch_model.bin``; mechgen asks for ``model.safetensors`` first and falls back to the
  ``.bin`` (loaded with ``weights_only=True``), so either works. (Not checked against the hub
  from the machine this was written on, which had no route to it.)

BOS: mechgen never prepends a BOS token, in either family: the evaluation text is tokenized
verbatim with the run's own tokenizer and its default ``add_special_tokens`` behaviour, which
adds nothing for both tokenizers. Attention to position 0 is therefore attention to the
sentence's first real token in both families (the reference study's convention for Pythia).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from mechgen.schedules import (
    CRFM_SCHEDULES,
    CRFM_TOKENS_PER_STEP,
    PYTHIA_SCHEDULES,
    PYTHIA_TOKENS_PER_STEP,
)

ARCHITECTURES = ("gpt_neox", "gpt2")
"""Every ``suites.<name>.architecture``."""
DEFAULT_ARCHITECTURE = "gpt_neox"
"""A suite without ``architecture`` is GPT-NeoX (every suite mechgen had before GPT-2)."""


@dataclass(frozen=True)
class Family:
    """One architecture's published-run conventions (see the module docstring).

    ``revision_prefix``: a checkpoint's branch is ``f"{revision_prefix}{step}"``.
    ``schedules``: the named checkpoint schedules of a hub suite; ``default_schedule`` the one
    to use when in doubt. ``tokens_per_step``: tokens per optimiser step of the published runs.
    ``model_type``: the ``model_type`` of a checkpoint's ``config.json``. ``weight_files``: the
    weight files mechgen looks for, in order of preference. ``hub_weight_file``: the one the
    published revisions hold. ``run_names``: for CRFM, the run name of each (size, seed), which
    a ``repo_template`` reaches as ``{name}``.
    """

    architecture: str
    model_type: str
    revision_prefix: str
    schedules: Mapping[str, list[int]]
    default_schedule: str
    tokens_per_step: int
    tokenizer: str
    bos: str
    hub_weight_file: str
    weight_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    run_names: Mapping[tuple[str, int], str] = field(default_factory=dict)

    def revision_name(self, step: int) -> str:
        """The branch of checkpoint ``step``: ``stepN`` (gpt_neox) or ``checkpoint-N`` (gpt2)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"checkpoint step must be a non-negative int, not {step!r}")
        return f"{self.revision_prefix}{step}"

    def step_of(self, revision: str) -> int | None:
        """The step of branch ``revision`` of this family, or None if it is not one."""
        match = re.fullmatch(re.escape(self.revision_prefix) + r"(\d+)", revision)
        return int(match.group(1)) if match else None

    def run_name(self, size: str, seed: int) -> str:
        """The CRFM run name of (size, seed) (``alias`` for small seed 21); KeyError naming
        the known pairs otherwise."""
        try:
            return self.run_names[(size, int(seed))]
        except KeyError:
            known = ", ".join(f"{s}/{k}" for s, k in self.run_names)
            raise KeyError(
                f"no {self.architecture} run of size {size!r} with seed {seed}; known: {known or '(none)'}"
            ) from None


CRFM_RUN_NAMES: dict[tuple[str, int], str] = {
    ("small", 21): "alias",
    ("small", 49): "battlestar",
    ("small", 81): "caprica",
    ("small", 343): "darkmatter",
    ("small", 777): "expanse",
    ("medium", 21): "arwen",
    ("medium", 49): "beren",
    ("medium", 81): "celebrimbor",
    ("medium", 343): "durin",
    ("medium", 777): "eowyn",
}
"""``stanford-crfm/{name}-gpt2-{size}-x{seed}``: each name goes with one size and one seed, as
TransformerLens lists them (``transformer_lens/loading_from_pretrained.py``, ``stanford-gpt2-
small-A`` = alias-...-x21 through ``stanford-gpt2-medium-E`` = eowyn-...-x777)."""

FAMILIES: dict[str, Family] = {
    "gpt_neox": Family(
        architecture="gpt_neox",
        model_type="gpt_neox",
        revision_prefix="step",
        schedules=PYTHIA_SCHEDULES,
        default_schedule="trott16",
        tokens_per_step=PYTHIA_TOKENS_PER_STEP,
        tokenizer="GPT-NeoX byte-level BPE (EleutherAI/gpt-neox-20b), 50,277 entries",
        bos="none added; <|endoftext|> (id 0) is BOS/EOS",
        hub_weight_file="pytorch_model.bin",
    ),
    "gpt2": Family(
        architecture="gpt2",
        model_type="gpt2",
        revision_prefix="checkpoint-",
        schedules=CRFM_SCHEDULES,
        default_schedule="log20",
        tokens_per_step=CRFM_TOKENS_PER_STEP,
        tokenizer="OpenAI GPT-2 byte-level BPE, 50,257 entries",
        bos="none added; <|endoftext|> (id 50256) is BOS/EOS",
        hub_weight_file="pytorch_model.bin",
        run_names=CRFM_RUN_NAMES,
    ),
}


def family(architecture: str | None = None) -> Family:
    """The :class:`Family` of ``architecture`` (None: :data:`DEFAULT_ARCHITECTURE`); ValueError
    naming the allowed values for an unknown one."""
    name = DEFAULT_ARCHITECTURE if architecture is None else architecture
    if name not in FAMILIES:
        raise ValueError(f"unknown architecture {name!r}; allowed: {', '.join(ARCHITECTURES)}")
    return FAMILIES[name]


def revision_name(step: int, architecture: str | None = None) -> str:
    """The hub branch of checkpoint ``step`` in ``architecture`` (default gpt_neox)."""
    return family(architecture).revision_name(step)


def step_of_revision(revision: str, architecture: str | None = None) -> int | None:
    """The step of branch ``revision`` in ``architecture``, or None if it names no checkpoint."""
    return family(architecture).step_of(revision)
