"""Snakemake script of rule `toy_tokenizer`: train the toy suite's byte-level BPE tokenizer.

Snakemake: output[0] = ``<dir>/tokenizer.json`` (its directory receives tokenizer.json,
tokenizer_config.json, special_tokens_map.json); params.vocab_size (int: config ``toy.vocab_size``);
log[0] optional.

Command line (for testing): ``python scripts/toy_tokenizer.py OUT_DIR [--vocab-size 2048]``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mechgen.sources.toy_tokenizer import train_tokenizer

if "snakemake" in globals():
    from _common import setup_logging

    sm = snakemake  # noqa: F821
    log = setup_logging(sm)
    tokenizer_json = Path(sm.output[0])
    if tokenizer_json.name != "tokenizer.json":
        sys.exit(
            f"mechgen: toy_tokenizer's output must be named tokenizer.json, got {tokenizer_json}"
        )
    vocab_size = int(sm.params.vocab_size)
    written = train_tokenizer(tokenizer_json.parent, vocab_size)
    log.info("toy tokenizer: %d entries, written to %s", vocab_size, written.parent)
else:
    import argparse

    parser = argparse.ArgumentParser(description="Train the toy suite's BPE tokenizer.")
    parser.add_argument(
        "out_dir", type=Path, help="directory for tokenizer.json and its companions"
    )
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args()
    print(train_tokenizer(args.out_dir, args.vocab_size))
