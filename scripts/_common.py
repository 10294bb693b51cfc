"""Helpers shared by the Snakemake scripts: logging to the rule's log file, quiet libraries."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def setup_logging(snakemake) -> logging.Logger:
    """Send log records (and warnings) to the rule's log file and to stderr; silence bars.

    Snakemake shows a local job's stderr in its own output, interleaved with every other job's:
    progress is logged as plain lines (mechgen.progress), and the libraries' own bars are off
    (the transformers "Loading weights" bar of every scoring job, the hub's download bars).
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if snakemake.log:
        Path(snakemake.log[0]).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(snakemake.log[0], mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=handlers, force=True)
    logging.captureWarnings(True)
    quiet_libraries()
    return logging.getLogger(f"mechgen.{snakemake.rule}")


def quiet_libraries() -> None:
    """Turn off the progress bars of huggingface_hub and transformers in this process.

    Both read ``HF_HUB_DISABLE_PROGRESS_BARS`` when imported; a library imported already is
    switched off directly (importing transformers here would slow every light script down).
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.disable_progress_bar()
