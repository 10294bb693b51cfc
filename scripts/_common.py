"""Helpers shared by the Snakemake scripts: logging to the rule's log file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(snakemake) -> logging.Logger:  # noqa: ANN001 - Snakemake's injected object
    """Send log records (and warnings) to the rule's log file and to stderr."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if snakemake.log:
        Path(snakemake.log[0]).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(snakemake.log[0], mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=handlers, force=True)
    logging.captureWarnings(True)
    return logging.getLogger(f"mechgen.{snakemake.rule}")
