"""Snakemake script of rule `eval_sentences`: the evaluation text, one sentence per line."""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import setup_logging  # noqa: E402

from mechgen import evaltext  # noqa: E402

sm = snakemake  # noqa: F821
log = setup_logging(sm)
ev = dict(sm.params.eval)
kind = ev["kind"]
meta = {"kind": kind}
if kind == "naturalstories":
    ns = sm.params.naturalstories
    dest = Path(sm.output.sentences).parent / "parsed-natural-stories.xlsx"
    corpus = evaltext.fetch_natural_stories(dest, ns["url"], ns["sha256"])
    sentences = evaltext.read_sentences(corpus)
    meta.update(url=ns["url"], sha256=ns["sha256"])
elif kind == "file":
    corpus = Path(ev["path"])
    sentences = evaltext.read_sentences(corpus, column=ev["column"])
    meta.update(path=str(corpus), sha256=hashlib.sha256(corpus.read_bytes()).hexdigest())
elif kind == "toy_heldout":
    from mechgen import toy

    sentences = toy.heldout_sentences(int(ev["n_sentences"]))
    meta.update(source="pydoc_data.topics (held out from toy training)")
else:  # the schema rejects other kinds; this guards direct calls
    sys.exit(f"mechgen: unknown eval kind {kind!r}")
if ev.get("n_sentences") and kind != "toy_heldout":
    sentences = sentences[: int(ev["n_sentences"])]
# One sentence per line: a line break inside a sentence would split it in two.
sentences = [" ".join(s.split()) for s in sentences if s and s.strip()]
if not sentences:
    sys.exit("mechgen: the evaluation text has no sentences")
Path(sm.output.sentences).write_text("\n".join(sentences) + "\n")
meta["n_sentences"] = len(sentences)
Path(sm.output.meta).write_text(json.dumps(meta, indent=2))
log.info("%d evaluation sentences (%s)", len(sentences), kind)
