"""Tests of mechgen.sources.evaltext: corpus readers, the hash-checked download, tokenization."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import

import pandas as pd
import pytest

from mechgen.sources import evaltext
from mechgen.sources.evaltext import (
    ChecksumMismatch,
    evaluation_sentences,
    fetch_natural_stories,
    read_sentence_file,
    read_sentences,
    tokenize_sentences,
    write_sentence_file,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_read_txt(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"The cat sat.\r\n\r\n   \nA dog ran. \nLast line without newline")
    assert read_sentences(path) == ["The cat sat.", "A dog ran. ", "Last line without newline"]


def test_read_csv_column_choice_and_missing_column(tmp_path):
    path = tmp_path / "corpus.csv"
    pd.DataFrame(
        {"id": [1, 2, 3], "Sentence": ["One.", "", "Three, with a comma."], "text": ["a", "b", "c"]}
    ).to_csv(path, index=False)
    assert read_sentences(path) == ["One.", "Three, with a comma."]
    assert read_sentences(path, column="text") == ["a", "b", "c"]
    with pytest.raises(
        KeyError, match=r"no column 'sentence'; columns are: 'id', 'Sentence', 'text'"
    ):
        read_sentences(path, column="sentence")


def test_read_xlsx_every_sheet_in_order(tmp_path):
    path = tmp_path / "stories.xlsx"
    sheets = {
        "Boar": pd.DataFrame(
            {"SentNum": [1, 2], "Sentence": ["If you were to journey.", "It is in this valley."]}
        ),
        "Aqua": pd.DataFrame(
            {
                "SentNum": [1, 2, 3],
                "Sentence": ["Tulip mania.", None, "Trailing space kept. "],
                "x": [1, 2, 3],
            }
        ),
        "Dundee Sentences": pd.DataFrame({"Sentence": ["Deciding huskies were excellent."]}),
    }
    with pd.ExcelWriter(path, engine="openpyxl") as writer:
        for name, frame in sheets.items():
            frame.to_excel(writer, sheet_name=name, index=False)
    # workbook order (not alphabetical), every non-empty row, verbatim
    assert read_sentences(path) == [
        "If you were to journey.",
        "It is in this valley.",
        "Tulip mania.",
        "Trailing space kept. ",
        "Deciding huskies were excellent.",
    ]
    with pytest.raises(
        KeyError, match=r"sheet 'Boar': no column 'x'; columns are: 'SentNum', 'Sentence'"
    ):
        read_sentences(path, column="x")


def test_read_unsupported_and_empty(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported corpus type '.json'"):
        read_sentences(tmp_path / "corpus.json")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no sentences"):
        read_sentences(tmp_path / "empty.txt")


def test_fetch_by_file_url_with_hash_check(tmp_path):
    source = tmp_path / "served" / "parsed-natural-stories.xlsx"
    source.parent.mkdir()
    payload = b"not really a workbook, but bytes are bytes" * 100
    source.write_bytes(payload)
    good = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "data" / "naturalstories.xlsx"

    assert fetch_natural_stories(dest, source.as_uri(), good) == dest
    assert dest.read_bytes() == payload
    source.unlink()  # a second call finds the verified file and downloads nothing
    assert fetch_natural_stories(dest, source.as_uri(), good) == dest

    source.write_bytes(payload + b"tampered")
    other = tmp_path / "data" / "other.xlsx"
    with pytest.raises(
        ChecksumMismatch,
        match=rf"sha256 {hashlib.sha256(payload + b'tampered').hexdigest()} != expected {good}",
    ):
        fetch_natural_stories(other, source.as_uri(), good)
    assert not other.exists() and not (tmp_path / "data" / "other.xlsx.part").exists()

    with pytest.raises(OSError, match="cannot download"):
        fetch_natural_stories(other, (tmp_path / "nowhere.xlsx").as_uri(), good)


@pytest.fixture(scope="module")
def bpe_tokenizers():
    """A tiny byte-level BPE as a transformers tokenizer, plus a copy whose post-processor adds a BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(["the cat sat on the mat", "a dog ran far away"] * 50, trainer)
    plain = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    with_bos = Tokenizer.from_str(bpe.to_str())
    bos_id = with_bos.token_to_id("<|endoftext|>")
    with_bos.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos_id)]
    )
    adding = PreTrainedTokenizerFast(
        tokenizer_object=with_bos, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    return bpe, plain, adding, bos_id


def test_tokenize_without_bos_and_truncation(bpe_tokenizers):
    raw, plain, adding, bos_id = bpe_tokenizers
    sentences = ["the cat sat", "a dog ran far away from the mat and the cat sat on the mat", "mat"]
    # independent reference: the raw tokenizers library, one sentence at a time, no special tokens
    expected = [raw.encode(s, add_special_tokens=False).ids for s in sentences]
    assert adding("the cat")["input_ids"][0] == bos_id  # this tokenizer WOULD add a BOS by default
    max_tokens = 5
    n_long = sum(len(ids) > max_tokens for ids in expected)
    assert n_long >= 1 and any(len(ids) <= max_tokens for ids in expected)
    for tokenizer in (plain, adding):
        ids, n_truncated = tokenize_sentences(tokenizer, sentences, max_tokens=max_tokens)
        assert ids == [e[:max_tokens] for e in expected]
        assert n_truncated == n_long
        assert all(i[0] != bos_id for i in ids)
        full, none_cut = tokenize_sentences(tokenizer, sentences, max_tokens=10_000)
        assert full == expected and none_cut == 0


def test_tokenize_errors(bpe_tokenizers):
    _, plain, _, _ = bpe_tokenizers
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        tokenize_sentences(plain, ["the cat"], max_tokens=0)
    with pytest.raises(ValueError, match=r"sentence 1 \(''\) has no tokens"):
        tokenize_sentences(plain, ["the cat", ""], max_tokens=8)
    assert tokenize_sentences(plain, [], max_tokens=8) == ([], 0)


# ---- The reference study's corpus, verbatim (the real, pinned workbook) ---------------------

NATURAL_STORIES = REPO_ROOT / "tests" / "data" / "naturalstories" / "parsed-natural-stories.xlsx"
NATURAL_STORIES_SHA256 = "74ad2638a1de078884f4595387f5d92a568015c8be5b7e61149c517dd6bd88eb"
PYTHIA_TOKENIZER = REPO_ROOT / "tests" / "data" / "pythia-tokenizer" / "tokenizer.json"


def workbook_cells() -> list[str]:
    """Every `Sentence` cell of every sheet, in workbook order, read with openpyxl alone
    (not pandas, which mechgen uses): the independent statement of what the study fed."""
    import openpyxl

    book = openpyxl.load_workbook(NATURAL_STORIES, read_only=True)
    cells = []
    for sheet in book.worksheets:
        rows = sheet.iter_rows(values_only=True)
        column = list(next(rows)).index("Sentence")
        cells.extend(row[column] for row in rows if row[column] is not None)
    return cells


def test_natural_stories_sentences_are_the_cells_verbatim(tmp_path):
    assert hashlib.sha256(NATURAL_STORIES.read_bytes()).hexdigest() == NATURAL_STORIES_SHA256
    cells = workbook_cells()
    assert len(cells) == 666 and all(isinstance(c, str) for c in cells)
    sentences, meta = evaluation_sentences(
        {"kind": "naturalstories"},
        {"url": NATURAL_STORIES.as_uri(), "sha256": NATURAL_STORIES_SHA256},
        tmp_path,
    )
    assert sentences == cells
    assert meta["n_sentences"] == 666 and meta["sha256"] == NATURAL_STORIES_SHA256
    # The cells a whitespace clean-up would change: 10 with an outer space, 1 double space,
    # 2 with newlines. All 13 must arrive unchanged.
    changed = [c for c in cells if " ".join(c.split()) != c]
    assert len(changed) == 13
    assert sum(c != c.strip() for c in changed) == 10
    assert sum("\n" in c for c in changed) == 2
    # ... and survive the file that carries them from rule to rule.
    path = tmp_path / "sentences.json"
    write_sentence_file(path, sentences, meta)
    assert read_sentence_file(path) == cells
    # The same workbook as a user's `file` corpus: the same 666 strings.
    file_sentences, _ = evaluation_sentences(
        {"kind": "file", "path": str(NATURAL_STORIES)}, {}, tmp_path
    )
    assert file_sentences == cells


def test_a_leading_space_changes_pythia_token_ids():
    """Why verbatim matters: with Pythia's tokenizer, ' It' and 'It' are different ids."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(PYTHIA_TOKENIZER))
    spaced = next(c for c in workbook_cells() if c.startswith(" It 's"))
    verbatim, _ = tokenize_sentences(tokenizer, [spaced], max_tokens=512)
    stripped, _ = tokenize_sentences(tokenizer, [spaced.strip()], max_tokens=512)
    assert verbatim[0] != stripped[0]
    assert tokenizer.decode(verbatim[0]) == spaced  # byte-level BPE: the ids spell the cell


def test_eval_rules_feed_the_tokenizer_every_cell_verbatim(tmp_path):
    """Snakemake runs rules eval_sentences and eval_tokens on the real workbook (served as a
    file:// URL); the token ids are those of each cell, as is, one at a time."""
    import json
    import shutil
    import subprocess
    import sys

    import yaml
    from conftest import copy_workflow

    work = copy_workflow(tmp_path / "w")
    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    shutil.copy2(PYTHIA_TOKENIZER, tok_dir / "tokenizer.json")
    overlay = {
        "suite": "ns",
        "suites": {
            "ns": {
                "source": "local",
                "path": str(tmp_path / "runs"),
                "model_prefix": "m-",
                "sizes": ["a"],
                "seeds": [1],
                "schedule": [0],
                "eval": {"kind": "naturalstories"},
            }
        },
        "naturalstories": {"url": NATURAL_STORIES.as_uri(), "sha256": NATURAL_STORIES_SHA256},
    }
    # A local run reads the tokenizer saved with its checkpoints: <path>/<run>/step<N>/.
    step_dir = tmp_path / "runs" / "m-a-seed1" / "step0"
    step_dir.mkdir(parents=True)
    shutil.copy2(PYTHIA_TOKENIZER, step_dir / "tokenizer.json")
    (step_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"})
    )
    (work / "ns.yaml").write_text(yaml.safe_dump(overlay))
    target = "results/ns/eval/tokens/m-a-seed1.json"
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", target, "--cores", "1",
         "--configfile", "config.yaml", "ns.yaml"],
        cwd=work, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(PYTHIA_TOKENIZER))
    expected = [raw.encode(c, add_special_tokens=False).ids[:512] for c in workbook_cells()]
    record = json.loads((work / target).read_text())
    assert record["n_sentences"] == 666
    assert record["token_ids"] == expected
    # The successor heads' task ids, from the same tokenizer (here through `tokenizers` itself).
    from mechgen.mechanisms import successor

    tasks = record["successor_tasks"]
    assert tasks == successor.task_token_ids(lambda t: raw.encode(t, add_special_tokens=False).ids)
    assert tasks["tasks"]["days"]["token_ids"][0] == raw.encode(" Monday").ids[0]


def test_load_tokenizer_gives_what_autotokenizer_gives(tmp_path):
    """The toy tokenizer (tokenizer_class PreTrainedTokenizerFast) loaded directly is what
    AutoTokenizer gives: the same class and the same ids on verbatim cells (leading, double and
    trailing spaces, a newline), and loading it does not import AutoTokenizer's mappings. A
    tokenizer of another class still goes through AutoTokenizer."""
    from transformers import AutoTokenizer

    from mechgen.sources.toy_tokenizer import train_tokenizer

    toy_dir = train_tokenizer(tmp_path / "toy", vocab_size=512).parent
    config = json.loads((toy_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == evaltext.FAST_TOKENIZER_CLASS
    direct, auto = evaltext.load_tokenizer(toy_dir), AutoTokenizer.from_pretrained(str(toy_dir))
    assert type(direct) is type(auto)
    cells = [" The cat sat.", "Two  spaces here", "a line\nbreak ", "plain text"]
    assert evaltext.tokenize_sentences(direct, cells, 512) == evaltext.tokenize_sentences(
        auto, cells, 512
    )
    code = (
        "import sys; from mechgen.sources.evaltext import load_tokenizer; "
        f"load_tokenizer({str(toy_dir)!r}); "
        "print('transformers.models.auto.tokenization_auto' in sys.modules)"
    )
    fresh = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert fresh.stdout.strip() == "False"

    other_dir = tmp_path / "gpt2"
    shutil.copytree(toy_dir, other_dir)
    config["tokenizer_class"] = "GPT2Tokenizer"
    (other_dir / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = evaltext.load_tokenizer(other_dir)
    assert type(loaded) is type(AutoTokenizer.from_pretrained(str(other_dir)))
    assert type(loaded).__name__ == "GPT2Tokenizer"
