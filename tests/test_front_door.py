"""./mechgen.sh: usage without a command, --help, and dry runs that build nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, TOY_TEST_CONFIGFILES, copy_workflow

VENV = sys.prefix  # the venv running the tests (not resolved: its python is a symlink)
COMMANDS = ("run", "resume", "test", "setup")


def _front_door(workdir: Path, *args: str, venv: str = VENV) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MECHGEN_VENV=venv, HF_HUB_OFFLINE="1")
    return subprocess.run(
        ["./mechgen.sh", *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    work = copy_workflow(tmp_path / "checkout")
    shutil.copy2(REPO_ROOT / "mechgen.sh", work / "mechgen.sh")
    return work


def _usage_lines(text: str) -> dict[str, str]:
    lines = [line.strip() for line in text.splitlines()]
    return {c: next((ln for ln in lines if ln.startswith(c + " ")), "") for c in COMMANDS}


def test_no_command_prints_usage_and_runs_nothing(checkout: Path, tmp_path: Path) -> None:
    """A fresh clone's ./mechgen.sh: no venv is created, no Snakemake runs, exit status 2."""
    fresh_venv = tmp_path / "never-created"
    result = _front_door(checkout, venv=str(fresh_venv))
    assert result.returncode == 2
    assert result.stdout == ""
    usage = _usage_lines(result.stderr)
    assert all(usage.values()), result.stderr  # one line per command, with what it does
    assert "report.html" in result.stderr and "unfinished" in result.stderr
    assert not fresh_venv.exists()
    assert not (checkout / ".snakemake").exists() and not (checkout / "results").exists()

    helped = _front_door(checkout, "--help", venv=str(fresh_venv))
    assert helped.returncode == 0 and helped.stderr == ""
    assert _usage_lines(helped.stdout) == usage
    assert not fresh_venv.exists()

    unknown = _front_door(checkout, "bogus", venv=str(fresh_venv))
    assert unknown.returncode == 2 and "unknown command 'bogus'" in unknown.stderr
    assert not fresh_venv.exists()


def test_run_help_prints_snakemakes_help_once(checkout: Path) -> None:
    result = _front_door(checkout, "run", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("usage: snakemake") == 1
    assert not (checkout / "results").exists()


def test_dry_run_builds_no_report(checkout: Path) -> None:
    result = _front_door(checkout, "run", "-n", "--configfile", *TOY_TEST_CONFIGFILES)
    assert result.returncode == 0, result.stderr
    assert "This was a dry-run" in result.stdout + result.stderr
    assert "report:" not in result.stdout
    made = [p for p in (checkout / "results").rglob("*") if p.is_file()] if (
        checkout / "results"
    ).exists() else []
    assert made == []
    assert not (checkout / ".snakemake" / "mechgen-run.json").exists()
