"""Snakemake script of rule `eval_tokens`: token ids of the evaluation text for one tokenizer:
a toy suite's (``params.run`` is None; the tokenizer is the input) or one run's own."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import setup_logging

from mechgen import atomic
from mechgen.config import Run
from mechgen.mechanisms import successor
from mechgen.sources import checkpoints as sources
from mechgen.sources import evaltext

sm = snakemake  # noqa: F821
log = setup_logging(sm)
run = Run(**sm.params.run) if sm.params.run is not None else None
label = run.run if run is not None else "the suite's tokenizer"
sentences = evaltext.read_sentence_file(sm.input.sentences)
sources.configure_hub(sm.config["hub"])
if run is None:
    tokenizer_dir = Path(sm.input.tokenizer[0]).parent
else:
    tokenizer_dir = sources.fetch_tokenizer(run, sm.params.tokenizer_revision)

tokenizer = evaltext.load_tokenizer(tokenizer_dir)
token_ids, n_truncated = evaltext.tokenize_sentences(tokenizer, sentences, int(sm.params.max_tokens))
if n_truncated:
    log.warning("%d sentences truncated to %d tokens", n_truncated, sm.params.max_tokens)
record = {
    "run": run.run if run is not None else None,
    "tokenizer": str(tokenizer_dir),
    "tokenizer_revision": sm.params.tokenizer_revision,
    "n_sentences": len(token_ids),
    "n_tokens": int(sum(len(t) for t in token_ids)),
    "n_truncated": int(n_truncated),
    "token_ids": token_ids,
    # The successor heads' task ids for this tokenizer (single-token items; drops listed).
    "successor_tasks": successor.task_token_ids(
        lambda text: tokenizer.encode(text, add_special_tokens=False)
    ),
}
atomic.write_text(sm.output[0], json.dumps(record))
log.info("%s: %d sentences, %d tokens", label, record["n_sentences"], record["n_tokens"])
tasks = record["successor_tasks"]
log.info(
    "%s: successor tasks kept %s (items per task); dropped tasks %s",
    label,
    {name: len(task["items"]) for name, task in tasks["tasks"].items()},
    tasks["dropped_tasks"] or "none",
)
