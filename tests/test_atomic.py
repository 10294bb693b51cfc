"""mechgen.atomic (temporary path, then rename) and mechgen.progress (throttled ETA lines)."""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
from pathlib import Path

import pytest

from mechgen import atomic
from mechgen.progress import Progress, format_duration
from mechgen.sources import toy
from mechgen.sources.toy_tokenizer import train_tokenizer


def test_atomic_path_replaces_only_on_success(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "table.csv"
    with atomic.atomic_path(dest) as tmp:
        assert tmp.parent == dest.parent and atomic.is_temporary(tmp)
        tmp.write_text("a,b\n1,2\n")
        # Until the body ends the destination does not exist: a reader never sees a partial file.
        assert not dest.exists()
    assert dest.read_text() == "a,b\n1,2\n"

    with pytest.raises(RuntimeError), atomic.atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert dest.read_text() == "a,b\n1,2\n"  # the finished output is untouched
    assert sorted(p.name for p in dest.parent.iterdir()) == ["table.csv"]  # no temp left


def test_atomic_path_requires_a_write(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), atomic.atomic_path(tmp_path / "x.json"):
        pass
    assert not (tmp_path / "x.json").exists()


def test_temporary_names_are_per_process(tmp_path: Path) -> None:
    dest = tmp_path / "manifest.json"
    assert atomic.temporary_name(dest).name == f"manifest.json.tmp-{os.getpid()}"
    assert atomic.is_temporary(tmp_path / "step8.tmp-123")
    assert not atomic.is_temporary(tmp_path / "step8.tmp")
    assert not atomic.is_temporary(tmp_path / "manifest.json")


def _slow_writer(dest: str, started: multiprocessing.synchronize.Event, go: object) -> None:
    """A 'late writer': opens its temporary file, waits, then writes a different payload."""
    with atomic.atomic_path(dest) as tmp, open(tmp, "w") as fh:
        fh.write('{"writer": "late", ')
        fh.flush()
        started.set()
        go.wait(10)  # type: ignore[attr-defined]
        fh.write('"done": true}\n')


def test_a_late_writer_never_corrupts_a_finished_output(tmp_path: Path) -> None:
    """Two processes write one output; the reader always sees one complete JSON document."""
    dest = tmp_path / "out.json"
    ctx = multiprocessing.get_context("fork")
    started, go = ctx.Event(), ctx.Event()
    late = ctx.Process(target=_slow_writer, args=(str(dest), started, go))
    late.start()
    assert started.wait(10)
    atomic.write_json(dest, {"writer": "resumed", "done": True})
    # The late writer is mid-way through its own temporary file; the finished output is whole.
    assert json.loads(dest.read_text()) == {"writer": "resumed", "done": True}
    late_tmps = [p for p in tmp_path.iterdir() if atomic.is_temporary(p)]
    assert [p.name for p in late_tmps] == [f"out.json.tmp-{late.pid}"]
    late.kill()  # killed mid-write (as resume stops an orphan): the output stays whole
    late.join(10)
    assert json.loads(dest.read_text()) == {"writer": "resumed", "done": True}


def test_atomic_dir_swaps_whole_directories(tmp_path: Path) -> None:
    dest = tmp_path / "step8"
    with atomic.atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
    with atomic.atomic_dir(dest) as tmp:
        (tmp / "b").write_text("2")
        assert (dest / "a").read_text() == "1"  # the old revision stays whole until the swap
    assert sorted(p.name for p in dest.iterdir()) == ["b"]
    with pytest.raises(ValueError), atomic.atomic_dir(dest) as tmp:
        (tmp / "c").write_text("3")
        raise ValueError
    assert sorted(p.name for p in dest.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step8"]


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_lines_are_throttled_and_estimate_linearly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = _Clock()
    progress = Progress("train toy-run", 1000, logging.getLogger("t"), clock=clock)
    logged = []
    with caplog.at_level(logging.INFO, logger="t"):
        for step in range(1, 1001):
            clock.t = step * 0.5  # 0.5 s per step: 500 s in all
            if progress.update(step):
                logged.append(step)
    # First step, then every 10% (100 steps = 50 s, more than the 10 s floor and above the
    # 30 s ceiling, so the ceiling rules: every 60 steps), and the last step.
    assert logged[0] == 1 and logged[-1] == 1000
    gaps = {b - a for a, b in itertools.pairwise(logged[1:-1])}
    assert gaps == {60}
    lines = [r.getMessage() for r in caplog.records]
    # At step 121 (t = 60.5 s): left = 60.5 x 879 / 121 = 439.5 s = 7 min 19 s.
    assert "train toy-run: 121/1000 steps (12%), 1 min 0 s elapsed, about 7 min 19 s left" in lines
    assert lines[-1] == "train toy-run: 1000/1000 steps (100%), 8 min 20 s elapsed"


def test_progress_fast_work_logs_little() -> None:
    clock = _Clock()
    progress = Progress("x", 300, logging.getLogger("t"), clock=clock)
    for step in range(1, 301):
        clock.t = step * 0.01  # 3 s in all: under the 10 s floor
        progress.update(step)
    assert progress.lines == 2  # the first and the last step


def test_format_duration() -> None:
    assert format_duration(42.9) == "42 s"
    assert format_duration(256) == "4 min 16 s"
    assert format_duration(3900) == "1 h 05 min"


def test_toy_training_writes_atomically_and_manifest_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every checkpoint directory and the manifest pass through a temporary name; the manifest
    is the last rename, and nothing temporary is left."""
    tokenizer_dir = tmp_path / "tok"
    train_tokenizer(tokenizer_dir, 300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no staging left behind
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: str | Path, dst: str | Path) -> None:
        renames.append((Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", spy)
    out = tmp_path / "run"
    training = {
        "steps": 4,
        "batch_size": 2,
        "seq_len": 16,
        "learning_rate": 0.001,
        "warmup_steps": 1,
        "weight_decay": 0.0,
    }
    size = {"n_layers": 1, "n_heads": 2, "d_model": 16}
    toy.train_run(tokenizer_dir, out, size, 1, training, [0, 2, 4], 300, progress=False)
    pid = os.getpid()
    assert [dst for _, dst in renames] == ["step0", "step2", "step4", "manifest.json"]
    assert all(src == f"{dst}.tmp-{pid}" for src, dst in renames)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "step0", "step2", "step4"]
