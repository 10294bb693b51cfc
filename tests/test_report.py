"""The built report's browser title names the suite (mechgen.report, `python -m mechgen`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mechgen.report import retitle

SNAKEMAKE_HEAD = '<head><meta charset="utf-8">\n    <title>Snakemake Report</title>\n</head>'


def test_retitle_replaces_only_the_head_title(tmp_path: Path) -> None:
    path = tmp_path / "results" / "toy" / "report.html"
    path.parent.mkdir(parents=True)
    body = "<body><svg><title>a figure's own title</title></svg></body>"
    path.write_text(f"<html>{SNAKEMAKE_HEAD}{body}</html>")
    result = subprocess.run(
        [sys.executable, "-m", "mechgen", "retitle-report", str(path)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, check=False,
    )
    assert result.returncode == 0, result.stderr
    text = path.read_text()
    assert "<title>mechgen report, suite toy</title>" in text
    assert "Snakemake Report" not in text and body in text


def test_retitle_escapes_and_refuses_a_file_without_title(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    path.write_text(f"<html>{SNAKEMAKE_HEAD}</html>")
    assert retitle(path, "a<b") == "mechgen report, suite a<b"
    assert "<title>mechgen report, suite a&lt;b</title>" in path.read_text()
    path.write_text("<html></html>")
    with pytest.raises(ValueError, match="no <title>"):
        retitle(path, "toy")
