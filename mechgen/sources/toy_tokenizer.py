"""The toy suite's tokenizer: a byte-level BPE trained on the toy training text.

Torch-free (tokenizers, and transformers' ``PreTrainedTokenizerFast`` inside
:func:`train_tokenizer`), so that the `toy_tokenizer` job costs no torch import;
:mod:`mechgen.sources.toy` trains the models with it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mechgen.sources.toytext import training_documents

EOS_TOKEN = "<|endoftext|>"
"""Pythia's end-of-text token: BOS, EOS and UNK; id 0."""
PAD_TOKEN = "<|padding|>"
"""Pythia's padding token; id 1."""
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
"""Special tokens in id order (Pythia's ids 0 and 1)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
"""The files of a toy tokenizer directory, as the hub lays them out."""


def train_tokenizer(out_dir: str | Path, vocab_size: int = 2048) -> Path:
    """Train a byte-level BPE with ``vocab_size`` entries on :func:`training_documents`.

    The vocabulary is the 256 byte symbols, the special tokens ``<|endoftext|>`` (id 0) and
    ``<|padding|>`` (id 1), and BPE merges up to ``vocab_size`` entries. No whitespace prefix
    is added and encoding adds no BOS/EOS (as Pythia's tokenizer). Writes ``tokenizer.json``,
    ``tokenizer_config.json`` (``tokenizer_class: PreTrainedTokenizerFast`` so transformers 4
    loads it too) and ``special_tokens_map.json`` into ``out_dir``; returns the path of
    ``tokenizer.json``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    min_vocab = 256 + len(SPECIAL_TOKENS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= min_vocab:
        raise ValueError(
            f"train_tokenizer: vocab_size must be an int > {min_vocab} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # The ByteLevel post-processor only fixes offsets; it adds no tokens (unlike a template).
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_documents(), trainer=trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"train_tokenizer: special token {token} did not get id {token_id}")

    special = {
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
    }
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
    # Written into a temporary directory, then renamed into out_dir file by file with
    # tokenizer.json (the rule's output) last, so a present tokenizer.json has its companions.
    staging = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_tokenizer_files(wrapped, special, staging)
        for name in sorted(os.listdir(staging), key=lambda n: n == "tokenizer.json"):
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / "tokenizer.json"


def _write_tokenizer_files(wrapped: Any, special: dict[str, str], out_dir: Path) -> None:
    """``save_pretrained`` plus the hub-layout fixes of :func:`train_tokenizer`."""
    wrapped.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    # transformers 5 records its own class name (TokenizersBackend), which transformers 4 lacks.
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config["add_bos_token"] = False
    tokenizer_config["add_eos_token"] = False
    config_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
    # transformers 5 no longer writes this file; the hub layout (and transformers 4) has it.
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2, sort_keys=True) + "\n"
    )


def tokenizer_json(tokenizer_dir: str | Path) -> Path:
    """The ``tokenizer.json`` of a toy tokenizer directory (or the file itself), after checking
    that the directory holds every file of :data:`TOKENIZER_FILES`."""
    path = Path(tokenizer_dir)
    if path.is_file():
        path = path.parent
    missing = [name for name in TOKENIZER_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} lacks {', '.join(missing)}")
    return path / "tokenizer.json"
