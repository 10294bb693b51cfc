"""Kill -9 at random moments during a scoring sweep; rerun; check nothing finished is redone.

A ``local`` suite (small random GPT-NeoX checkpoints with a tokenizer, an evaluation text file)
is scored once without interruption (the reference). Then, per trial, in a fresh work directory:

1. start ``snakemake --cores 2 results/<suite>/heads.parquet`` in its own process group
   (:func:`kill_trial` takes another number of cores);
2. at a random moment (once a random number k of the scoring jobs, 0 <= k < all, have
   written their sidecar, plus a random fraction of one job's duration), stop the whole group
   (Snakemake and its job subprocesses) with SIGSTOP, read its state, then ``kill -9`` it and
   check that no process survives (a caller may ask for a state, e.g. a job mid-run: if the
   stopped state is not one, the group continues and is stopped again 50 ms later);
3. record which outputs were finished at that moment (they exist and Snakemake has no
   ``.snakemake/incomplete`` marker for them) with their modification times;
4. rerun robustly (:data:`RESUME_STEPS`): ``snakemake --unlock`` (a kill -9 leaves
   ``.snakemake/locks`` behind, and Snakemake 9 refuses to start with "Directory cannot be
   locked"), then ``snakemake --rerun-incomplete`` (outputs of killed jobs carry incomplete
   markers; without the flag Snakemake stops with IncompleteFilesException);
5. check: the rerun succeeds, every finished output kept its mtime (not redone), every
   unfinished one was made, and heads.parquet equals the reference's.

Prints one line per trial (kill time, jobs finished at the kill, jobs redone, identical) and
a summary.

    python bench/faults.py                    # 10 trials, 2 runs x 4 steps
    python bench/faults.py --trials 3 --steps 4 --seed 7
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
# The fake hub and the offline cache builder are test support code (tests/support/).
sys.path.insert(0, str(REPO_ROOT / "tests"))

SUITE = "killtest"
EVAL_SENTENCES = (
    "the cat sat on the mat",
    "a dog ran far away from the cat",
    "the small bird sang in the old tree",
    "we walked to the river and back again",
    "the old dog sat in the sun",
)
RESUME_STEPS = (("--unlock",), ("--rerun-incomplete",))
"""How to resume after kill -9: unlock the directory, then rerun the incomplete jobs."""


def build_local_suite(root: Path, n_runs: int, steps: list[int]) -> Path:
    """Random tiny checkpoints ``root/ckpt/tiny-a-seed{k}/step{N}`` (tokenizer files in each),
    an evaluation text, and a config overlay for a ``local`` suite over them; returns the overlay."""
    from support.fakehub import save_random_checkpoint, tiny_gpt_neox_config, train_tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer(root / "tokenizer")
    config = tiny_gpt_neox_config()
    for seed in range(1, n_runs + 1):
        for step in steps:
            save_random_checkpoint(
                root / "ckpt" / f"tiny-a-seed{seed}" / f"step{step}",
                config,
                seed=1000 * seed + step,
                tokenizer_dir=tokenizer,
            )
    corpus = root / "eval.txt"
    corpus.write_text("\n".join(EVAL_SENTENCES) + "\n")
    overlay = {
        "suite": SUITE,
        "suites": {
            SUITE: {
                "source": "local",
                "path": str(root / "ckpt"),
                "model_prefix": "tiny-",
                "sizes": ["a"],
                "seeds": list(range(1, n_runs + 1)),
                "schedule": list(steps),
                "tokens_per_step": 1024,
                "eval": {"kind": "file", "path": str(corpus)},
            }
        },
    }
    path = root / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def snakemake_command(workdir: Path, overlay: Path, *extra: str, cores: int = 2) -> list[str]:
    """``python -m snakemake`` on the checkout's Snakefile, working in ``workdir``."""
    return [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO_ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(REPO_ROOT / "config.yaml"),
        str(overlay),
        "--cores",
        str(cores),
        f"results/{SUITE}/heads.parquet",
        *extra,
    ]


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))


def run_snakemake(
    workdir: Path, overlay: Path, *extra: str, timeout_s: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run Snakemake to completion (own process group, killed whole on timeout)."""
    proc = subprocess.Popen(
        snakemake_command(workdir, overlay, *extra),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise RuntimeError(f"snakemake timed out after {timeout_s} s:\n{out[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def resume(
    workdir: Path, overlay: Path, timeout_s: float = 600
) -> subprocess.CompletedProcess[str]:
    """The robust rerun after a kill: ``--unlock``, then ``--rerun-incomplete``."""
    result = None
    for extra in RESUME_STEPS:
        result = run_snakemake(workdir, overlay, *extra, timeout_s=timeout_s)
        if result.returncode != 0:
            return result
    assert result is not None
    return result


def job_outputs(workdir: Path) -> list[Path]:
    """Every output file of the sweep's jobs (relative to ``workdir``) that exists now."""
    results = workdir / "results" / SUITE
    found = [
        p
        for p in results.rglob("*")
        if p.is_file()
        and "logs" not in p.relative_to(results).parts
        and "score_cache" not in p.relative_to(results).parts
    ]
    return sorted(p.relative_to(workdir) for p in found)


def incomplete_outputs(workdir: Path) -> set[Path]:
    """Outputs Snakemake marked incomplete (``.snakemake/incomplete/<base64 of the path>``)."""
    marked = set()
    folder = workdir / ".snakemake" / "incomplete"
    for marker in folder.glob("*") if folder.is_dir() else []:
        try:
            marked.add(Path(base64.b64decode(marker.name.encode()).decode()))
        except (ValueError, UnicodeDecodeError):
            continue
    return marked


def _live_processes_in_group(pgid: int) -> list[int]:
    """Pids of non-zombie processes in process group ``pgid`` (read from /proc)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name "(...)": state, ppid, pgrp, ...
        rest = stat.rsplit(")", 1)[1].split()
        if int(rest[2]) == pgid and rest[0] != "Z":
            alive.append(int(entry.name))
    return alive


@dataclass(frozen=True)
class KillState:
    """What a stopped (SIGSTOP) sweep has on disk: ``finished`` outputs (relative paths, with
    their mtimes in ns) and ``incomplete`` ones (Snakemake's markers: the jobs running)."""

    finished: dict[Path, int]
    incomplete: set[Path]


def kill_state(workdir: Path) -> KillState:
    """The outputs finished and marked incomplete in ``workdir`` now (see :class:`KillState`)."""
    incomplete = incomplete_outputs(workdir)
    finished = {
        p: (workdir / p).stat().st_mtime_ns for p in job_outputs(workdir) if p not in incomplete
    }
    return KillState(finished, incomplete)


@dataclass
class Trial:
    """One trial's record."""

    kill_after_s: float
    finished_at_kill: int = 0
    unfinished_at_kill: int = 0
    running_at_kill: int = 0
    redone: int = 0
    finished_redone: list[str] = field(default_factory=list)
    unfinished_not_made: list[str] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)
    rerun_ok: bool = False
    identical: bool = False
    rerun_seconds: float = 0.0
    message: str = ""
    at_kill: KillState | None = None

    @property
    def ok(self) -> bool:
        """Rerun succeeded, nothing finished redone, nothing unfinished left, same table, no survivor."""
        return (
            self.rerun_ok
            and self.identical
            and not self.finished_redone
            and not self.unfinished_not_made
            and not self.survivors
        )


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:  # every process of the group has exited (and been reaped)
        pass


def kill_trial(
    workdir: Path,
    overlay: Path,
    reference: pd.DataFrame,
    all_outputs: set[Path],
    *,
    kill_after_s: float | None = None,
    kill_when: Callable[[Path], bool] | None = None,
    kill_in: Callable[[KillState], bool] | None = None,
    extra_delay_s: float = 0.0,
    timeout_s: float = 600.0,
    cores: int = 2,
) -> Trial:
    """One trial in ``workdir``: start, kill -9 the whole process group, resume, compare.

    The kill comes ``kill_after_s`` seconds after the start, or ``extra_delay_s`` after
    ``kill_when(workdir)`` first holds (polled every 50 ms), whichever is given. The group is
    stopped (SIGSTOP) first and its state read, so the record is the state at the kill; with
    ``kill_in``, the kill only lands in a state it accepts: otherwise the group continues
    (SIGCONT) and is stopped again 50 ms later. A sweep that ends before the kill has
    ``message`` "finished before the kill" (and nothing else is checked). ``cores`` is the
    killed sweep's ``--cores`` (the resume always uses 2). ``workdir`` is fresh in this script's
    trials; a caller may fill it first (the test starts from a reference's evaluation files).
    """
    if (kill_after_s is None) == (kill_when is None):
        raise ValueError("give exactly one of kill_after_s and kill_when")
    started = time.monotonic()
    deadline = started + timeout_s
    proc = subprocess.Popen(
        snakemake_command(workdir, overlay, cores=cores),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches every job subprocess
    )
    if kill_when is not None:
        while proc.poll() is None and not kill_when(workdir) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(extra_delay_s)
    else:
        try:
            proc.wait(timeout=kill_after_s)
        except subprocess.TimeoutExpired:
            pass
    state = None
    while proc.poll() is None:
        _signal_group(proc.pid, signal.SIGSTOP)
        state = kill_state(workdir)
        if kill_in is None or kill_in(state) or time.monotonic() >= deadline:
            _signal_group(proc.pid, signal.SIGKILL)  # kills stopped processes too
            proc.wait()
            break
        _signal_group(proc.pid, signal.SIGCONT)
        state = None
        time.sleep(0.05)
    trial = Trial(kill_after_s=time.monotonic() - started)
    if state is None:
        trial.message = "finished before the kill"
        return trial
    deadline = time.monotonic() + 10
    while (survivors := _live_processes_in_group(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    trial.survivors = survivors

    trial.at_kill = state
    finished = state.finished
    trial.finished_at_kill = len(finished)
    trial.running_at_kill = len(state.incomplete)
    unfinished = all_outputs - set(finished)
    trial.unfinished_at_kill = len(unfinished)

    started = time.monotonic()
    result = resume(workdir, overlay)
    trial.rerun_seconds = time.monotonic() - started
    (workdir / "resume.log").write_text(result.stdout)  # Snakemake's reasons for each rerun job
    trial.rerun_ok = result.returncode == 0
    if not trial.rerun_ok:
        trial.message = result.stdout[-2000:]
        return trial
    trial.finished_redone = sorted(
        str(p)
        for p, mtime in finished.items()
        if not (workdir / p).exists() or (workdir / p).stat().st_mtime_ns != mtime
    )
    trial.unfinished_not_made = sorted(str(p) for p in unfinished if not (workdir / p).exists())
    trial.redone = len(unfinished) - len(trial.unfinished_not_made)
    heads = pd.read_parquet(workdir / "results" / SUITE / "heads.parquet")
    try:
        pd.testing.assert_frame_equal(heads, reference)
        trial.identical = True
    except AssertionError as err:
        trial.message = str(err)[:500]
    return trial


def _sidecars(workdir: Path) -> int:
    """Sidecars written so far (the last file a scoring job writes)."""
    return len(list((workdir / "results" / SUITE / "scores").glob("*/*.json")))


def reference_run(root: Path, overlay: Path) -> tuple[pd.DataFrame, set[Path], float]:
    """The uninterrupted sweep: (heads table, every job output, wall seconds)."""
    workdir = root / "reference"
    started = time.monotonic()
    result = run_snakemake(workdir, overlay)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"the reference run failed:\n{result.stdout[-3000:]}")
    heads = pd.read_parquet(workdir / "results" / SUITE / "heads.parquet")
    return heads, set(job_outputs(workdir)), elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="checkpoints per run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="mechgen-faults-"))
    try:
        overlay = build_local_suite(root, args.runs, [10 * i for i in range(args.steps)])
        reference, outputs, elapsed = reference_run(root, overlay)
        print(
            f"reference run: {len(outputs)} job outputs, {len(reference)} head rows, {elapsed:.1f} s wall"
        )
        rng = random.Random(args.seed)
        n_scores = args.runs * args.steps
        trials = []
        print(
            f"{'trial':>5} {'kill at s':>9} {'finished':>8} {'redone':>6} {'finished redone':>15} {'identical':>9} {'rerun s':>7}"
        )
        for index in range(args.trials):
            # A random moment of the sweep, whatever the machine's speed: once a random number
            # of scoring jobs (0 .. all but one) have written their sidecar, plus a random
            # fraction of a job's duration.
            done_before_kill = rng.randrange(n_scores)
            trial = kill_trial(
                root / f"trial{index}",
                overlay,
                reference,
                outputs,
                kill_when=lambda workdir, k=done_before_kill: _sidecars(workdir) >= k,
                extra_delay_s=rng.uniform(0.0, 1.0) * elapsed / (n_scores + 4),
            )
            trials.append(trial)
            print(
                f"{index:>5} {trial.kill_after_s:>9.1f} {trial.finished_at_kill:>8} {trial.redone:>6} "
                f"{len(trial.finished_redone):>15} {'yes' if trial.identical else 'NO':>9} {trial.rerun_seconds:>7.1f}"
                + (f"  ({trial.message.splitlines()[0]})" if trial.message else "")
                + (f"  survivors: {trial.survivors}" if trial.survivors else "")
            )
            for path in trial.finished_redone:
                print(f"      finished at the kill but redone: {path}")
        good = sum(t.ok for t in trials)
        print(
            f"{good}/{len(trials)} trials resumed correctly (nothing finished redone, all unfinished made, identical heads)"
        )
        return 0 if good == len(trials) else 1
    finally:
        if args.keep:
            print(f"work directories kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
