"""Snakemake script of rule `eval_sentences`: the evaluation text, verbatim, as a JSON list."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import setup_logging

from mechgen.sources import evaltext

sm = snakemake  # noqa: F821
log = setup_logging(sm)
out = Path(sm.output.sentences)
try:
    sentences, meta = evaltext.evaluation_sentences(
        dict(sm.params.eval), dict(sm.params.naturalstories), out.parent
    )
except (ValueError, KeyError, OSError) as err:
    sys.exit(f"mechgen: evaluation text: {err}")
evaltext.write_sentence_file(out, sentences, meta)
log.info("%d evaluation sentences (%s)", len(sentences), meta["kind"])
