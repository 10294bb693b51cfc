"""The toy suite's text: the training documents and the held-out evaluation sentences.

Torch-free (stdlib only), so that reading the toy suite's evaluation text
(:func:`mechgen.sources.evaltext.evaluation_sentences`, kind ``toy_heldout``) costs no torch
import; :mod:`mechgen.sources.toy` trains its tokenizer and models on :func:`training_documents`.

The text is the English documentation in the standard library's ``pydoc_data.topics``
(``topics``: 79 topics, ~465k characters in CPython 3.11), read at run time and never copied
into the repository. Its blank-line paragraphs are deduplicated; every :data:`HELDOUT_EVERY`-th
distinct prose paragraph is held out, every occurrence of a held-out paragraph is removed from
the training text, and held-out paragraphs are cut into sentence-like lines
(:func:`heldout_sentences`), the toy suite's evaluation text. The split is a pure function of
the text, so it is the same on every run of one Python version (the topics differ slightly
between Python versions).
"""

from __future__ import annotations

import functools
import re
import sys

HELDOUT_EVERY = 4
"""Every 4th distinct prose paragraph (0-based index 2, 6, 10, ...) is held out. On CPython
3.11: 263 paragraphs held out, the training text keeps ~87% of the characters (404k), and the
held-out pool has 337 sentences."""
HELDOUT_OFFSET = 2
SENTENCE_MIN_WORDS = 6
"""Held-out sentences have 6-40 whitespace-separated words (about 8-60 BPE tokens)."""
SENTENCE_MAX_WORDS = 40




def _normalise_space(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def _topic_paragraphs() -> list[tuple[str, list[str]]]:
    """``(topic, paragraphs)`` for every topic of ``pydoc_data.topics``, topics sorted by name.

    A paragraph is a block of text between blank lines, with trailing whitespace removed.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some slimmed-down Python builds drop the pydoc data
        raise RuntimeError(
            "the toy suite's text is the standard library's pydoc_data.topics, which this Python "
            f"({sys.executable}) lacks; install the full standard library"
        ) from exc

    out = []
    for name in sorted(topics):
        paragraphs = [p.rstrip() for p in re.split(r"\n[ \t]*\n", topics[name]) if p.strip()]
        out.append((name, paragraphs))
    return out


def _is_prose(paragraph: str) -> bool:
    """True for a paragraph of running English text.

    Code examples and grammar productions are indented; headings are underlined with a line
    of ``*``, ``=`` or ``-``; both are excluded, as are paragraphs with few letters (tables).
    """
    if paragraph[:1].isspace() or "::=" in paragraph or ">>>" in paragraph:
        return False
    if re.fullmatch(r"[*=\-~^]{3,}", paragraph.strip().splitlines()[-1].strip()):
        return False
    letters = sum(ch.isalpha() for ch in paragraph)
    return letters >= 0.6 * len(paragraph.replace(" ", "").replace("\n", ""))


@functools.lru_cache(maxsize=1)
def _split_corpus() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(training_documents, heldout_paragraphs)``.

    Distinct prose paragraphs (distinct after whitespace normalisation) are numbered in order
    of first occurrence; those with index % HELDOUT_EVERY == HELDOUT_OFFSET are held out. A
    training document is one topic with every occurrence of a held-out paragraph removed
    (paragraphs joined by a blank line). Held-out paragraphs are returned normalised.
    """
    topic_paragraphs = _topic_paragraphs()
    distinct_prose: dict[str, None] = {}
    for _, paragraphs in topic_paragraphs:
        for paragraph in paragraphs:
            if _is_prose(paragraph):
                distinct_prose.setdefault(_normalise_space(paragraph), None)
    heldout = tuple(
        p for index, p in enumerate(distinct_prose) if index % HELDOUT_EVERY == HELDOUT_OFFSET
    )
    heldout_set = set(heldout)
    documents = []
    for _, paragraphs in topic_paragraphs:
        kept = [p for p in paragraphs if _normalise_space(p) not in heldout_set]
        if kept:
            documents.append("\n\n".join(kept))
    return tuple(documents), heldout


def training_documents() -> list[str]:
    """The training text as one document per ``pydoc_data.topics`` topic (sorted by name).

    Held-out paragraphs are removed (see :func:`heldout_sentences`). In the training token
    stream each document is followed by ``<|endoftext|>``.
    """
    return list(_split_corpus()[0])


def read_training_text() -> str:
    """The whole training text: :func:`training_documents` joined by a blank line."""
    return "\n\n".join(training_documents())


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(*])")
_BULLET = re.compile(r"^(?:[*\-+]|\d+\.|\(\d+\)|[a-z]\)|\[\d+\])\s+")


@functools.lru_cache(maxsize=1)
def _heldout_sentence_pool() -> tuple[str, ...]:
    """Every usable held-out sentence, in corpus order, without duplicates.

    Each held-out paragraph loses a leading bullet, is split after ``.``, ``!`` or ``?``
    followed by whitespace and a capital/quote/parenthesis, and a piece is kept when it has
    SENTENCE_MIN_WORDS..SENTENCE_MAX_WORDS words, starts with a letter or quote and ends with
    ``.``, ``!`` or ``?``. A piece whose text also occurs anywhere in the (whitespace-normalised)
    training text is dropped, so the evaluation text is never trained on.
    """
    training_normalised = _normalise_space(read_training_text())
    pool: dict[str, None] = {}
    for paragraph in _split_corpus()[1]:
        paragraph = _BULLET.sub("", paragraph)
        for piece in _SENTENCE_END.split(paragraph):
            piece = piece.strip()
            n_words = len(piece.split())
            if not SENTENCE_MIN_WORDS <= n_words <= SENTENCE_MAX_WORDS:
                continue
            if not re.match(r"[A-Za-z\"]", piece) or piece[-1] not in ".!?":
                continue
            if piece in training_normalised:
                continue
            pool.setdefault(piece, None)
    return tuple(pool)


def heldout_sentences(n: int) -> list[str]:
    """``n`` held-out sentences of the toy suite's text, spread evenly over the held-out pool.

    The pool (see :func:`_heldout_sentence_pool`) has a few hundred sentences of 6-40 words; the
    i-th returned sentence is pool[floor(i * len(pool) / n)], so any ``n`` covers all topics,
    and the result is deterministic. Raises ``ValueError`` when ``n`` exceeds the pool.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"heldout_sentences: n must be a positive int, got {n!r}")
    pool = _heldout_sentence_pool()
    if n > len(pool):
        raise ValueError(
            f"heldout_sentences: asked for {n} sentences but the held-out pool has only {len(pool)}"
        )
    return [pool[(i * len(pool)) // n] for i in range(n)]


def heldout_pool_size() -> int:
    """The number of distinct held-out sentences available to :func:`heldout_sentences`."""
    return len(_heldout_sentence_pool())
