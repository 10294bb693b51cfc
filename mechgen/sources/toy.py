"""The embedded toy suite: small GPT-NeoX models that mechgen trains itself on CPU.

Everything here works offline on any machine with Python:

* **Text.** The training documents and the held-out evaluation sentences of
  :mod:`mechgen.sources.toytext` (the standard library's ``pydoc_data.topics``).
* **Tokenizer.** A byte-level BPE (the ``tokenizers`` library) trained on the training text,
  saved in the hub's layout (``tokenizer.json``, ``tokenizer_config.json``,
  ``special_tokens_map.json``). Like Pythia's tokenizer it adds no BOS/EOS when encoding;
  ``<|endoftext|>`` (id 0) is BOS/EOS/UNK and separates documents in the training stream,
  ``<|padding|>`` (id 1) pads.
* **Model.** ``GPTNeoXForCausalLM`` (the Pythia architecture): full rotary, untied input and
  output embeddings, parallel residual, no dropout. With ``architecture="gpt2"``:
  ``GPT2LMHeadModel`` of the same size (learned absolute positions, sequential residual, tied
  input and output embeddings as in GPT-2, no dropout), trained on the same data with the same
  tokenizer and optimiser.
* **Training.** AdamW (betas 0.9/0.95, weight decay on matrices and embeddings only, gradient
  clipping at norm 1.0), learning rate warmed up linearly then decayed by a cosine to
  :data:`MIN_LR_FRACTION` of the peak at the last step (Pythia's schedule shape). A batch is
  ``batch_size`` windows of ``seq_len`` tokens at uniformly random offsets of the token stream,
  drawn from a ``torch.Generator`` seeded with the run's data seed; optionally a fraction of each
  batch's rows (``repeat_fraction``) holds repeated content so that in-context copying (an
  induction circuit) pays off: a random or corpus half placed twice (``repeat_source``
  ``random``/``corpus``, :func:`repeated_rows`), or a span of varying length and position of
  the row's own text repeated in place (``window``, :func:`window_repeats`; the default toy
  suite's choice, the only one with which content-based induction heads formed). The
  initialisation uses the global torch RNG seeded with the weight seed. The data seed (batch
  order, window positions, repeated spans) and the weight seed both default to the run's seed;
  a decoupled suite sets one of them apart (``variation`` in config.yaml). Same seeds and same
  thread count on one machine give bitwise-identical checkpoints.
* **Checkpoints.** ``out_dir/<revision>/`` holds ``config.json``, ``model.safetensors``,
  ``generation_config.json`` and the tokenizer files, i.e. one hub revision named as the family
  names it (``step{N}`` for gpt_neox, ``checkpoint-{N}`` for gpt2); step 0 is the
  initialisation before any update. ``out_dir/manifest.json`` is written last. Each checkpoint
  directory and the manifest are written under a temporary name and renamed into place
  (:mod:`mechgen.atomic`), so none is ever seen half-written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# tokenizers and transformers (seconds of imports) are imported in the functions that use them:
# the tokenizer job needs no transformers model module, the training job no tokenizer trainer.
from mechgen.architectures import ARCHITECTURES, DEFAULT_ARCHITECTURE, family
from mechgen.atomic import atomic_dir, write_json
from mechgen.config import repeat_min_half_problem
from mechgen.progress import Progress
from mechgen.settings import (
    REPEAT_SOURCES,
    SIZE_KEYS_OPTIONAL,
    SIZE_KEYS_REQUIRED,
    TRAINING_KEYS_OPTIONAL,
    TRAINING_KEYS_REQUIRED,
)
from mechgen.sources.toy_tokenizer import (
    EOS_TOKEN,
    SPECIAL_TOKENS,
    TOKENIZER_FILES,
    tokenizer_json,
)
from mechgen.sources.toytext import training_documents

log = logging.getLogger(__name__)

MIN_LR_FRACTION = 0.1
"""The cosine decays the learning rate to this fraction of the peak at the last step."""
ADAM_BETAS = (0.9, 0.95)
"""Pythia's AdamW betas."""
GRAD_CLIP_NORM = 1.0
"""Global gradient-norm clip (Pythia's value); keeps a 3e-3 learning rate stable."""
FINAL_LOSS_WINDOW = 50
"""``final_loss`` in the manifest is the mean training loss of the last 50 steps."""
MIN_POSITIONS = 512
"""max_position_embeddings is at least this, since the scorer sees sentences up to 512 tokens."""

STEP_DELAY_ENV = "MECHGEN_TEST_STEP_DELAY_S"
"""Test hook: seconds to sleep after every training update (unset or 0 in real runs). It slows a
tiny toy run down so that tests/test_orphans.py can kill the workflow mid-training; it changes
no checkpoint."""
REPEAT_ID_LO = len(SPECIAL_TOKENS)
"""Random repeated content uses ids from here up (the special tokens are never drawn)."""


# ---------------------------------------------------------------------------------------------
# Tokenizer


def token_stream(tokenizer_dir: str | Path) -> torch.Tensor:
    """The training token stream: every training document's ids followed by ``<|endoftext|>``.

    Returns a 1-D int64 tensor (~111k tokens with the default 2,048-entry vocabulary
    on CPython 3.11).
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json(tokenizer_dir)))
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    ids: list[int] = []
    for document in training_documents():
        ids.extend(tokenizer.encode(document, add_special_tokens=False).ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Model


def _check_keys(
    name: str, spec: Mapping[str, Any], required: Sequence[str], optional: Sequence[str]
) -> None:
    if not isinstance(spec, Mapping):
        raise TypeError(f"{name} must be a mapping, got {type(spec).__name__}")
    missing = [k for k in required if k not in spec]
    unknown = [k for k in spec if k not in required and k not in optional]
    if missing:
        raise ValueError(
            f"{name} lacks key(s) {', '.join(missing)}; required: {', '.join(required)}"
        )
    if unknown:
        raise ValueError(
            f"{name} has unknown key(s) {', '.join(map(str, unknown))}; "
            f"allowed: {', '.join(list(required) + list(optional))}"
        )


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _checked_size(
    size_spec: Mapping[str, int], vocab_size: int, seq_len: int
) -> tuple[int, int, int, int]:
    """(n_layers, n_heads, d_model, d_ff) of a size spec, checked for both families: positive
    ints, known keys, d_model a multiple of n_heads; d_ff defaults to 4 x d_model."""
    _check_keys("size_spec", size_spec, SIZE_KEYS_REQUIRED, SIZE_KEYS_OPTIONAL)
    n_layers = _positive_int("size_spec.n_layers", size_spec["n_layers"])
    n_heads = _positive_int("size_spec.n_heads", size_spec["n_heads"])
    d_model = _positive_int("size_spec.d_model", size_spec["d_model"])
    d_ff = _positive_int("size_spec.d_ff", size_spec.get("d_ff", 4 * d_model))
    _positive_int("vocab_size", vocab_size)
    _positive_int("seq_len", seq_len)
    if d_model % n_heads:
        raise ValueError(
            f"size_spec.d_model ({d_model}) must be a multiple of size_spec.n_heads ({n_heads})"
        )
    return n_layers, n_heads, d_model, d_ff


def model_config(size_spec: Mapping[str, int], vocab_size: int, seq_len: int) -> Any:
    """A ``GPTNeoXConfig`` for the size ``{n_layers, n_heads, d_model[, d_ff]}``.

    Head dimension = d_model / n_heads (must divide); d_ff defaults to 4 x d_model;
    max_position_embeddings = max(seq_len, 512); rotary on every head dimension
    (partial_rotary_factor 1.0, base 10,000); untied embeddings, parallel residual and no
    dropout as in Pythia; initializer_range 0.02; ``<|endoftext|>`` (0) is BOS/EOS and
    ``<|padding|>`` (1) pads.
    """
    from transformers import GPTNeoXConfig

    n_layers, n_heads, d_model, d_ff = _checked_size(size_spec, vocab_size, seq_len)
    if (d_model // n_heads) % 2:
        raise ValueError(
            f"head dimension d_model/n_heads = {d_model // n_heads} must be even for rotary"
        )
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=d_ff,
        hidden_act="gelu",
        max_position_embeddings=max(seq_len, MIN_POSITIONS),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 1.0,
        },
        tie_word_embeddings=False,
        use_parallel_residual=True,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )


def gpt2_model_config(size_spec: Mapping[str, int], vocab_size: int, seq_len: int) -> Any:
    """A ``GPT2Config`` for the size ``{n_layers, n_heads, d_model[, d_ff]}``.

    GPT-2's layout: learned absolute position embeddings (n_positions = max(seq_len, 512)),
    pre-LayerNorm sequential residual, tied input and output embeddings, ``gelu_new``; no
    dropout (resid, embd and attn pdrop 0) so training is deterministic like the GPT-NeoX toy;
    d_ff defaults to 4 x d_model; initializer_range 0.02; ``<|endoftext|>`` (0) is BOS/EOS and
    ``<|padding|>`` (1) pads.
    """
    from transformers import GPT2Config

    n_layers, n_heads, d_model, d_ff = _checked_size(size_spec, vocab_size, seq_len)
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=max(seq_len, MIN_POSITIONS),
        n_embd=d_model,
        n_layer=n_layers,
        n_head=n_heads,
        n_inner=d_ff,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )


def _check_architecture(architecture: str) -> str:
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}"
        )
    return architecture


def init_model(
    size_spec: Mapping[str, int],
    vocab_size: int,
    seq_len: int,
    seed: int,
    architecture: str = DEFAULT_ARCHITECTURE,
) -> Any:
    """A freshly initialised causal LM: ``torch.manual_seed(seed)`` then construction of a
    ``GPTNeoXForCausalLM`` (:func:`model_config`) or, for ``architecture="gpt2"``, a
    ``GPT2LMHeadModel`` (:func:`gpt2_model_config`).

    This is exactly the step-0 checkpoint of :func:`train_run` with the same arguments.
    """
    if _check_architecture(architecture) == "gpt2":
        from transformers import GPT2LMHeadModel

        config = gpt2_model_config(size_spec, vocab_size, seq_len)
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)
    from transformers import GPTNeoXForCausalLM

    config = model_config(size_spec, vocab_size, seq_len)
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config)


def n_parameters(model: torch.nn.Module) -> int:
    """All parameters of the causal LM (embeddings and the LM head included; GPT-2's LM head is
    tied to the input embedding and counted once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Training


def lr_at_step(step: int, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of update number ``step`` (1-based).

    Linear warmup lr = peak x step / warmup_steps for step <= warmup_steps, then a cosine
    from peak down to MIN_LR_FRACTION x peak at ``total_steps``:
    lr = peak x (m + (1 - m)(1 + cos(pi t)) / 2), t = (step - warmup) / (total - warmup).
    """
    if warmup_steps > 0 and step <= warmup_steps:
        return peak_lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return peak_lr * (
        MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))
    )


def _validate_training(training: Mapping[str, Any]) -> dict[str, Any]:
    _check_keys("training", training, TRAINING_KEYS_REQUIRED, TRAINING_KEYS_OPTIONAL)
    out = dict(training)
    for key in ("steps", "batch_size", "seq_len"):
        _positive_int(f"training.{key}", out[key])
    if (
        isinstance(out["warmup_steps"], bool)
        or not isinstance(out["warmup_steps"], int)
        or out["warmup_steps"] < 0
    ):
        raise ValueError(f"training.warmup_steps must be an int >= 0, got {out['warmup_steps']!r}")
    lr = out["learning_rate"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"training.learning_rate must be a number > 0, got {lr!r}")
    wd = out["weight_decay"]
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not wd >= 0:
        raise ValueError(f"training.weight_decay must be a number >= 0, got {wd!r}")
    # Read with defaults but not written back: the manifest records the training config as given.
    fraction = out.get("repeat_fraction", 0.0)
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 <= fraction <= 1
    ):
        raise ValueError(f"training.repeat_fraction must be a number in [0, 1], got {fraction!r}")
    source = out.get("repeat_source", "random")
    if source not in REPEAT_SOURCES:
        raise ValueError(
            f"training.repeat_source must be one of {', '.join(REPEAT_SOURCES)}, got {source!r}"
        )
    repeat_vocab = out.get("repeat_vocab")
    if repeat_vocab is not None:
        _positive_int("training.repeat_vocab", repeat_vocab)
    if out.get("repeat_min_half") is not None:
        _positive_int("training.repeat_min_half", out["repeat_min_half"])
    problem = repeat_min_half_problem(out)
    if problem:
        raise ValueError(problem)
    if fraction > 0 and out["seq_len"] < 4:
        raise ValueError(
            f"training.seq_len ({out['seq_len']}) must be >= 4 for repeated-content rows"
        )
    return out


def n_repeated_rows(batch_size: int, repeat_fraction: float) -> int:
    """Rows of each batch that hold repeated content: round(batch_size x repeat_fraction).

    Python's round (half to even), e.g. 12 x 0.25 = 3 rows, 8 x 0.25 = 2 rows.
    """
    return round(batch_size * repeat_fraction)


def _varied_repeats(
    n_rows: int,
    seq_len: int,
    source: str,
    generator: torch.Generator,
    stream: torch.Tensor | None,
    vocab_size: int | None,
    repeat_vocab: int | None,
    min_half: int,
) -> torch.Tensor:
    """Rows of random ids in which a span of random length H ~ U{min_half..seq_len // 2}
    starting at a random position is followed by itself (``repeat_min_half``), so no fixed
    offset finds the earlier copy: only content matching (a real induction head) does."""
    if source != "random" or vocab_size is None:
        raise ValueError("training.repeat_min_half needs repeat_source 'random'")
    if not 1 <= min_half <= seq_len // 2:
        raise ValueError(f"training.repeat_min_half must be in 1..{seq_len // 2}; got {min_half}")
    hi = vocab_size if repeat_vocab is None else min(vocab_size, REPEAT_ID_LO + repeat_vocab)
    rows = []
    for _ in range(n_rows):
        half = int(torch.randint(min_half, seq_len // 2 + 1, (1,), generator=generator))
        fill = torch.randint(REPEAT_ID_LO, hi, (seq_len,), generator=generator)
        start = int(torch.randint(0, seq_len - 2 * half + 1, (1,), generator=generator))
        fill[start + half : start + 2 * half] = fill[start : start + half]
        rows.append(fill)
    return torch.stack(rows).long()


def window_repeats(
    rows: torch.Tensor, generator: torch.Generator, min_half: int
) -> torch.Tensor:
    """``rows`` (text windows ``[n_rows, seq_len]``) with a span of each repeated in place.

    Per row, in order: span length H ~ U{min_half..seq_len // 2}, start s ~ U{0..seq_len - 2H},
    then row[s + H : s + 2H] = row[s : s + H] (the text after the span is overwritten by its
    copy). Both occurrences are ordinary text, so the previous-token heads that text training
    forms read them as they read any text; and since H and s vary, no fixed offset finds the
    earlier copy: only matching by content (an induction head) predicts the copy. The toy
    corpus itself is memorised within a few thousand steps, so without such rows copying from
    context never pays off. Returns a new tensor; draws come from ``generator``.
    """
    out = rows.clone()
    n_rows, seq_len = out.shape
    if not 1 <= min_half <= seq_len // 2:
        raise ValueError(f"min_half must be in 1..{seq_len // 2}; got {min_half}")
    for row in range(n_rows):
        half = int(torch.randint(min_half, seq_len // 2 + 1, (1,), generator=generator))
        start = int(torch.randint(0, seq_len - 2 * half + 1, (1,), generator=generator))
        out[row, start + half : start + 2 * half] = out[row, start : start + half]
    return out


def repeated_rows(
    n_rows: int,
    seq_len: int,
    source: str,
    generator: torch.Generator,
    stream: torch.Tensor | None = None,
    vocab_size: int | None = None,
    repeat_vocab: int | None = None,
    min_half: int | None = None,
) -> torch.Tensor:
    """``[n_rows, seq_len]`` rows made of a half of length H = seq_len // 2 placed twice.

    Row = [x_0..x_{H-1}, x_0..x_{H-1}] (plus, for odd seq_len, x_0 once more at the end).
    ``source="random"``: x = H ids drawn uniformly with replacement from
    ``[REPEAT_ID_LO, min(vocab_size, REPEAT_ID_LO + repeat_vocab))`` (``repeat_vocab`` None:
    up to ``vocab_size``); ``"corpus"``: x = a window of H tokens of ``stream`` at a
    uniformly random offset. Draws come from ``generator`` (the run's data generator), so
    training stays a function of the seed. Predicting the second half needs in-context copying,
    which is what makes an induction circuit useful on such rows; plain pydoc text is
    memorised instead (a 111k-token corpus, seen ~7 times in 1,000 steps of 768 tokens).
    ``repeat_vocab`` narrows random ids to ``[REPEAT_ID_LO, REPEAT_ID_LO + repeat_vocab)``;
    ``min_half`` switches to :func:`_varied_repeats` (variable span length and position).

    Caveat, measured on the default toy-small run: with the fixed half seq_len // 2 the model
    learns a head that attends to the fixed offset H - 1 (not an induction head) and copies
    through it; ``mechgen.scoring.circuit.positional_control`` exposes this.
    """
    half = seq_len // 2
    if min_half is not None:
        return _varied_repeats(
            n_rows, seq_len, source, generator, stream, vocab_size, repeat_vocab, min_half
        )
    if source == "random":
        if vocab_size is None or vocab_size <= REPEAT_ID_LO:
            raise ValueError(f"random repeated rows need vocab_size > {REPEAT_ID_LO}")
        hi = vocab_size if repeat_vocab is None else min(vocab_size, REPEAT_ID_LO + repeat_vocab)
        first = torch.randint(REPEAT_ID_LO, hi, (n_rows, half), generator=generator)
    elif source == "corpus":
        if stream is None or len(stream) < half:
            raise ValueError("corpus repeated rows need a token stream of at least seq_len / 2")
        offsets = torch.randint(0, len(stream) - half + 1, (n_rows,), generator=generator)
        first = stream[offsets[:, None] + torch.arange(half)]
    else:
        raise ValueError(f"source must be one of {', '.join(REPEAT_SOURCES)}, got {source!r}")
    rows = torch.cat([first, first, first[:, : seq_len - 2 * half]], dim=1)
    return rows.long()


def _validate_schedule(schedule: Iterable[int], steps: int) -> list[int]:
    values = list(schedule)
    bad = [s for s in values if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad or not values:
        raise ValueError(f"schedule must be a non-empty list of ints >= 0; bad entries: {bad}")
    too_late = [s for s in values if s > steps]
    if too_late:
        raise ValueError(f"schedule steps {too_late} exceed training.steps = {steps}")
    return sorted(set(values))


def _save_checkpoint(model: Any, tokenizer_dir: Path, step_dir: Path) -> None:
    """Write one hub-style revision atomically (:func:`mechgen.atomic.atomic_dir`)."""
    with atomic_dir(step_dir) as tmp_dir:
        model.save_pretrained(str(tmp_dir))
        config_path = tmp_dir / "config.json"
        config = json.loads(config_path.read_text())
        if "rope_parameters" in config:  # GPT-NeoX; GPT-2 has learned positions, no rotary
            # transformers 4 reads the rotary fraction from these legacy keys (Pythia's
            # config.json has them); transformers 5 reads rope_parameters and drops them on load.
            config["rotary_pct"] = config["rope_parameters"]["partial_rotary_factor"]
            config["rotary_emb_base"] = config["rope_parameters"]["rope_theta"]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir / name, tmp_dir / name)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings (ndim >= 2) only, not on biases or LayerNorms."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def train_run(
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    size_spec: Mapping[str, int],
    seed: int,
    training: Mapping[str, Any],
    schedule: Iterable[int],
    vocab_size: int,
    threads: int = 1,
    progress: bool = True,
    progress_label: str | None = None,
    architecture: str = DEFAULT_ARCHITECTURE,
    data_seed: int | None = None,
    weight_seed: int | None = None,
) -> dict[str, Any]:
    """Train one toy run and save ``out_dir/<revision>/`` for every N in ``schedule``, the
    revision named by ``architecture``'s family (``step{N}``, or ``checkpoint-{N}`` for gpt2;
    :func:`init_model` builds the model of that architecture).

    ``training`` has steps, batch_size, seq_len, learning_rate, warmup_steps, weight_decay
    (and optionally threads, ignored here: ``threads`` wins; ``repeat_fraction``, default 0,
    ``repeat_source``, default ``"random"``, ``repeat_vocab`` and ``repeat_min_half``). Each
    update: a batch of
    ``batch_size`` windows of ``seq_len`` tokens at offsets ~ Uniform{0..len(stream)-seq_len}
    (a ``torch.Generator`` seeded with ``data_seed``, default ``seed``; the initialisation uses
    ``weight_seed``, default ``seed``), of which the first ``round(batch_size x repeat_fraction)``
    rows get repeated content (:func:`repeated_rows`, or :func:`window_repeats` for
    ``window``), mean next-token cross-entropy in nats, backward, gradient
    clip at norm 1.0, AdamW step with :func:`lr_at_step`'s rate. Writes ``manifest.json`` last
    and returns it: steps, seed, data_seed, weight_seed, size_spec, n_params, training, tokens_per_step,
    vocab_size, wall_seconds, cpu_seconds, final_loss (mean loss of the last 50 updates, nats/token),
    checkpoint_losses (the loss of the update at each saved step, step 0 = loss of the
    initialisation on the first batch), and the torch/transformers/tokenizers versions.
    ``threads`` sets ``torch.set_num_threads``; checkpoints are bitwise reproducible for the
    same seed and thread count on one machine. ``progress`` logs plain progress lines (steps done,
    time left; :class:`mechgen.progress.Progress`) to this module's logger, each starting with
    ``progress_label`` (default ``"train seed <seed>"``). The environment
    variable :data:`STEP_DELAY_ENV` (a test hook) adds a sleep after every update.
    Existing revision directories (of either family) and ``manifest.json`` in ``out_dir`` are
    removed first.
    """
    import tokenizers
    import transformers

    started = time.perf_counter()
    cpu_started = time.process_time()
    training = _validate_training(training)
    steps_total = training["steps"]
    schedule_steps = _validate_schedule(schedule, steps_total)
    data_seed = seed if data_seed is None else data_seed
    weight_seed = seed if weight_seed is None else weight_seed
    for name, value in (("seed", seed), ("data_seed", data_seed), ("weight_seed", weight_seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    _positive_int("threads", threads)
    revision = family(_check_architecture(architecture)).revision_name
    tokenizer_file = tokenizer_json(tokenizer_dir)
    tokenizer_dir = tokenizer_file.parent
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        manifest_path.unlink()  # a stale manifest would mark a half-written run as done
    # Checkpoints of an earlier run (maybe with another schedule) must not mix with this one's;
    # Snakemake only knows the manifest, so it cannot remove them itself.
    for stale in out_dir.iterdir():
        if stale.is_dir() and re.fullmatch(
            r"(step|checkpoint-)\d+(\.tmp|\.(tmp|old)-\d+)?", stale.name
        ):
            shutil.rmtree(stale)

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()  # one bar per checkpoint save is noise

    stream = token_stream(tokenizer_dir)
    tokenizer_vocab = max(json.loads(tokenizer_file.read_text())["model"]["vocab"].values()) + 1
    if tokenizer_vocab > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer_vocab} ids but vocab_size is {vocab_size}")
    batch_size, seq_len = training["batch_size"], training["seq_len"]
    if len(stream) <= seq_len:
        raise ValueError(
            f"training.seq_len ({seq_len}) must be shorter than the token stream ({len(stream)})"
        )

    model = init_model(size_spec, vocab_size, seq_len, weight_seed, architecture)
    model.train()
    data_generator = torch.Generator().manual_seed(data_seed)
    optimizer = torch.optim.AdamW(
        _param_groups(model, float(training["weight_decay"])),
        lr=float(training["learning_rate"]),
        betas=ADAM_BETAS,
        eps=1e-8,
    )
    window = torch.arange(seq_len)

    n_repeated = n_repeated_rows(batch_size, float(training.get("repeat_fraction", 0.0)))
    repeat_source = str(training.get("repeat_source", "random"))

    def next_batch() -> torch.Tensor:
        offsets = torch.randint(
            0, len(stream) - seq_len + 1, (batch_size,), generator=data_generator
        )
        batch = stream[offsets[:, None] + window]
        if n_repeated and repeat_source == "window":
            batch[:n_repeated] = window_repeats(
                batch[:n_repeated], data_generator, int(training["repeat_min_half"])
            )
        elif n_repeated:
            # Drawn after the windows, and only when enabled: with repeat_fraction 0 the
            # generator's sequence (and so every checkpoint) is what it was without the option.
            batch[:n_repeated] = repeated_rows(
                n_repeated,
                seq_len,
                repeat_source,
                data_generator,
                stream=stream,
                vocab_size=vocab_size,
                repeat_vocab=training.get("repeat_vocab"),
                min_half=training.get("repeat_min_half"),
            )
        return batch

    losses: list[float] = []
    checkpoint_losses: dict[str, float] = {}
    batch = next_batch()
    if 0 in schedule_steps:
        with torch.no_grad():
            checkpoint_losses["0"] = float(model(input_ids=batch, labels=batch).loss)
        _save_checkpoint(model, tokenizer_dir, out_dir / revision(0))
        log.info("seed %d step 0: loss %.4f, checkpoint saved", seed, checkpoint_losses["0"])

    label = progress_label or f"train seed {seed}"
    progress_log = Progress(label, steps_total, log) if progress else None
    step_delay_s = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    for step in range(1, steps_total + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at_step(
                step, float(training["learning_rate"]), training["warmup_steps"], steps_total
            )
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress_log is not None:
            progress_log.update(step, f"loss {losses[-1]:.3f}")
        if step_delay_s:
            time.sleep(step_delay_s)
        if step in schedule_steps:
            checkpoint_losses[str(step)] = losses[-1]
            _save_checkpoint(model, tokenizer_dir, out_dir / revision(step))
            log.info("seed %d step %d: loss %.4f, checkpoint saved", seed, step, losses[-1])
        if step < steps_total:
            batch = next_batch()

    manifest = {
        "architecture": architecture,
        "steps": schedule_steps,
        "seed": seed,
        "data_seed": data_seed,
        "weight_seed": weight_seed,
        "size_spec": dict(size_spec),
        "n_params": n_parameters(model),
        "vocab_size": vocab_size,
        "training": dict(training),
        "lr_schedule": f"linear warmup, cosine to {MIN_LR_FRACTION} x peak",
        "tokens_per_step": batch_size * seq_len,
        "threads": threads,
        "wall_seconds": round(time.perf_counter() - started, 3),
        # CPU time of this process: on a shared machine it tracks the uncontended wall time of a
        # 1-thread run better than wall_seconds does.
        "cpu_seconds": round(time.process_time() - cpu_started, 3),
        "final_loss": sum(losses[-FINAL_LOSS_WINDOW:]) / len(losses[-FINAL_LOSS_WINDOW:]),
        "checkpoint_losses": checkpoint_losses,
        "n_stream_tokens": len(stream),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    write_json(manifest_path, manifest)
    return manifest
