"""The evaluation sentences: reading a corpus, downloading Natural Stories, tokenizing.

The reference study (Trott 2025) read the Natural Stories corpus with
``pd.read_excel(path, sheet_name=None, engine="openpyxl")`` and ran every row of the
``Sentence`` column of every sheet (10 stories + "Dundee Sentences": 666 sentences), one
sentence per forward pass, with no BOS token. :func:`read_sentences` reproduces that reading,
and every sentence reaches the tokenizer verbatim, whatever the ``eval`` kind: 13 of the 666
Natural Stories cells carry a leading or trailing space (10), a double space (1) or embedded
newlines (2), and a leading space changes Pythia's token ids, so nothing is stripped or
re-spaced. Only empty cells (and cells of whitespace alone) are skipped: they hold no sentence
(the pinned workbook has none). The sentences travel between rules as a JSON list
(:func:`write_sentence_file`), never as lines of text, so an embedded newline survives.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mechgen import atomic
from mechgen.sources import toytext

DEFAULT_COLUMN = "Sentence"


class ChecksumMismatch(ValueError):
    """A downloaded file's sha256 differs from the expected one."""


def _cell_text(value: Any) -> str | None:
    """A cell's sentence, verbatim, or None for an empty cell (NaN/None, or whitespace alone)."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):  # an empty spreadsheet cell
        return None
    text = str(value)
    return text if text.strip() else None


def _column_sentences(frame: Any, column: str, where: str) -> list[str]:
    if column not in frame.columns:
        columns = ", ".join(repr(str(c)) for c in frame.columns)
        raise KeyError(f"{where}: no column {column!r}; columns are: {columns or 'none'}")
    return [text for text in map(_cell_text, frame[column].tolist()) if text is not None]


def read_sentences(path: str | Path, column: str = DEFAULT_COLUMN) -> list[str]:
    """The sentences of a corpus file, in file order.

    ``.txt``: one sentence per line, line ends removed, whitespace-only lines skipped.
    ``.csv``: the ``column`` column (default ``Sentence``). ``.xlsx``: the ``column`` column of
    every sheet, sheets in workbook order, every non-empty row (as the reference study read
    Natural Stories). Empty cells are skipped; other text is kept verbatim.
    Raises ``KeyError`` listing the columns when ``column`` is absent, ``ValueError`` for an
    unsupported suffix or a corpus without sentences.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        with open(path, encoding="utf-8") as fh:
            sentences = [line.rstrip("\r\n") for line in fh]
        sentences = [s for s in sentences if s.strip()]
    elif suffix == ".csv":
        import pandas as pd  # only for a .csv/.xlsx corpus: reading a .txt imports no pandas

        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        sentences = _column_sentences(frame, column, str(path))
    elif suffix == ".xlsx":
        import pandas as pd  # as above

        sheets = pd.read_excel(path, sheet_name=None, engine="openpyxl")  # dict, workbook order
        sentences = []
        for sheet_name, frame in sheets.items():
            sentences.extend(_column_sentences(frame, column, f"{path} sheet {sheet_name!r}"))
    else:
        raise ValueError(f"{path}: unsupported corpus type {suffix!r}; allowed: .txt, .csv, .xlsx")
    if not sentences:
        raise ValueError(f"{path}: no sentences found")
    return sentences


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_natural_stories(dest: Path, url: str, sha256: str, *, timeout_s: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (a file path) with urllib and check its sha256.

    If ``dest`` already exists with the right hash nothing is downloaded. The download goes
    to ``dest + ".part"`` and is renamed only after the hash matches; on a mismatch the
    file is deleted and :class:`ChecksumMismatch` names the url and both hashes. Any URL
    urllib opens works, ``file://`` included (how the tests serve a local copy).
    """
    dest = Path(dest)
    expected = sha256.lower()
    if dest.is_file() and _sha256_of(dest) == expected:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as err:
        partial.unlink(missing_ok=True)
        raise OSError(f"cannot download {url}: {err}") from None
    actual = _sha256_of(partial)
    if actual != expected:
        partial.unlink()
        raise ChecksumMismatch(
            f"{url}: sha256 {actual} != expected {expected}; the download was deleted"
        )
    os.replace(partial, dest)
    return dest


FAST_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
"""The generic fast-tokenizer class that mechgen's toy tokenizer names in its
``tokenizer_config.json`` (:func:`mechgen.sources.toy_tokenizer.train_tokenizer`)."""


def load_tokenizer(tokenizer_dir: str | Path) -> Any:
    """The tokenizer saved in ``tokenizer_dir``, as ``AutoTokenizer.from_pretrained`` gives it.

    AutoTokenizer reads ``tokenizer_class`` from ``tokenizer_config.json`` and calls that class's
    ``from_pretrained``. When the class is :data:`FAST_TOKENIZER_CLASS` (mechgen's toy
    tokenizer), this calls it directly: the same object, without importing AutoTokenizer's
    mappings of every model family, which costs about 3 CPU-s per process under transformers 5
    (once per ``eval_tokens`` job). Any other class (Pythia's, GPT-2's) is loaded through
    AutoTokenizer. Remote code is never run (AutoTokenizer's default, ``trust_remote_code=False``).
    """
    config_path = Path(tokenizer_dir) / "tokenizer_config.json"
    try:
        tokenizer_class = json.loads(config_path.read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        tokenizer_class = None
    # transformers (seconds of imports) only when a tokenizer is loaded, never on import
    if tokenizer_class == FAST_TOKENIZER_CLASS:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def tokenize_sentences(
    tokenizer: Any, sentences: Sequence[str], max_tokens: int
) -> tuple[list[list[int]], int]:
    """Token ids of each sentence, without special tokens, cut to at most ``max_tokens``.

    ``add_special_tokens=False``: no BOS/EOS is added, as in the reference study (Pythia's
    tokenizer adds none anyway). A sentence longer than ``max_tokens`` keeps its first
    ``max_tokens`` tokens. Returns ``(ids per sentence, number of sentences truncated)``.
    Raises ``ValueError`` if ``max_tokens < 1`` or a sentence has no tokens.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, not {max_tokens}")
    if isinstance(sentences, str):
        raise TypeError("sentences must be a sequence of strings, not one string")
    if not sentences:
        return [], 0
    encoded = tokenizer(list(sentences), add_special_tokens=False)["input_ids"]
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    token_ids: list[list[int]] = []
    n_truncated = 0
    for index, ids in enumerate(encoded):
        ids = list(ids)
        if not ids:
            raise ValueError(f"sentence {index} ({sentences[index]!r}) has no tokens")
        # A special token at the start means the tokenizer added one despite
        # add_special_tokens=False, unless the sentence itself spells it.
        if ids[0] in special_ids and not sentences[index].startswith(
            tokenizer.convert_ids_to_tokens(ids[0])
        ):
            raise ValueError(
                f"tokenizer added special token id {ids[0]} to sentence {index}: a BOS must not be added"
            )
        if len(ids) > max_tokens:
            ids = ids[:max_tokens]
            n_truncated += 1
        token_ids.append(ids)
    return token_ids, n_truncated


def evaluation_sentences(
    eval_spec: dict[str, Any], naturalstories: dict[str, Any], download_dir: str | Path
) -> tuple[list[str], dict[str, Any]]:
    """The evaluation sentences of a suite's ``eval`` spec, verbatim, and their provenance.

    ``kind`` ``naturalstories``: the pinned workbook (``naturalstories.url``/``sha256``),
    downloaded into ``download_dir`` and hash-checked, every ``Sentence`` cell of every sheet;
    ``file``: a user's ``.txt``/``.csv``/``.xlsx`` (``path``, ``column``); ``toy_heldout``:
    :func:`mechgen.sources.toytext.heldout_sentences`. ``n_sentences`` (if given) keeps the
    first n.
    No sentence is stripped, re-spaced or split: the strings are exactly the corpus cells (or
    lines of a ``.txt``). Returns ``(sentences, meta)``; meta records the kind, the source and
    its sha256, and ``n_sentences``. Raises ``ValueError`` for an unknown kind or no sentences.
    """
    kind = eval_spec["kind"]
    meta: dict[str, Any] = {"kind": kind}
    if kind == "naturalstories":
        dest = Path(download_dir) / "parsed-natural-stories.xlsx"
        corpus = fetch_natural_stories(dest, naturalstories["url"], naturalstories["sha256"])
        sentences = read_sentences(corpus)
        meta.update(url=naturalstories["url"], sha256=naturalstories["sha256"])
    elif kind == "file":
        corpus = Path(eval_spec["path"])
        sentences = read_sentences(corpus, column=eval_spec.get("column", DEFAULT_COLUMN))
        meta.update(path=str(corpus), sha256=_sha256_of(corpus))
    elif kind == "toy_heldout":
        sentences = toytext.heldout_sentences(int(eval_spec["n_sentences"]))
        meta.update(source="pydoc_data.topics (held out from toy training)")
    else:  # the schema rejects other kinds; this guards direct calls
        raise ValueError(f"unknown eval kind {kind!r}; allowed: naturalstories, file, toy_heldout")
    if eval_spec.get("n_sentences") and kind != "toy_heldout":
        sentences = sentences[: int(eval_spec["n_sentences"])]
    if not sentences:
        raise ValueError("the evaluation text has no sentences")
    meta["n_sentences"] = len(sentences)
    return sentences, meta


def write_sentence_file(path: str | Path, sentences: Sequence[str], meta: dict[str, Any]) -> None:
    """Write ``meta`` plus ``sentences`` (a JSON list of the verbatim strings) to ``path``.

    JSON, not one sentence per line: a sentence may hold a newline. Written to a temporary
    file and renamed, so a reader never sees half a file.
    """
    record = dict(meta)
    record["sentences"] = list(sentences)
    atomic.write_text(path, json.dumps(record, indent=1, ensure_ascii=False))


def read_sentence_file(path: str | Path) -> list[str]:
    """The sentences written by :func:`write_sentence_file`, exactly as they were written."""
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    sentences = record["sentences"]
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise ValueError(f"{path}: 'sentences' must be a list of strings")
    return sentences
