"""Shared test helpers: run Snakemake in a private copy of the workflow, and the two trained runs.

The workflow tests never write into the checkout: each works in a copy under pytest's tmp dir.
``toy_test_run`` runs the small toy-test suite (tests/configs/toy-test.yaml) once per session;
tests that change something copy it first with :func:`copy_run`. ``induction_run`` trains and
scores the default toy suite's ``small`` size, seed 1 (tests/test_toy_induction.py).

Both runs start in the background as soon as the tests are collected, if a selected test uses
them (:func:`pytest_collection_finish`), and their fixtures wait for them: the training runs on
the cores the tests before their first user leave idle (most tests use one core), and the tests
run at a lower CPU priority than these runs (the induction run's training is the longest serial
chain of the session).
``toy_test_run_later`` starts the same run but hands out a function that waits for it, so that
a test can do its own work first and wait only where it compares with the run.

Under pytest-xdist (``./mechgen.sh test`` runs two workers) each run is built once for the
whole session, in :func:`shared_tmp_root`: the first worker to claim it starts it, every worker
waits for the same result. :func:`build_once` does the same for a fixture built in-process.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from filelock import FileLock

# No hub access in tests: every HF load must come from local files (and fail fast otherwise).
os.environ["HF_HUB_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parent.parent

WORKFLOW_PATHS = (
    "Snakefile",
    "config.yaml",
    "workflow",
    "scripts",
    "mechgen",
    "profiles",
    "tests/configs",
)
"""What a Snakemake run needs from the checkout (mechgen is copied so the scripts import it)."""

TOY_TEST_CONFIGFILES = ("config.yaml", "tests/configs/toy-test.yaml")
"""``--configfile`` replaces the Snakefile's configfile, so the overlay comes with the base."""


def _toy_test_suite() -> tuple[str, dict, list[str], list[int]]:
    """Suite name, suite spec, run ids and checkpoint steps of tests/configs/toy-test.yaml, read
    by hand (run id = <model_prefix><size>-seed<seed>; steps = toy.schedule), not by mechgen."""
    overlay = yaml.safe_load((REPO_ROOT / TOY_TEST_CONFIGFILES[1]).read_text())
    suite = overlay["suite"]
    spec = overlay["suites"][suite]
    assert spec["source"] == "toy" and spec["schedule"] == "toy", "toy-test must train a toy suite"
    runs = [
        f"{spec['model_prefix']}{size}-seed{seed}"
        for size in spec["sizes"]
        for seed in spec["seeds"]
    ]
    return suite, spec, runs, sorted(overlay["toy"]["schedule"])


TOY_TEST_SUITE, TOY_TEST_SPEC, TOY_TEST_RUNS, TOY_TEST_STEPS = _toy_test_suite()
"""The toy-test suite's name, its spec (sizes, seeds, ...), run ids and checkpoint steps."""

_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".snakemake", "results")


def copy_workflow(dest: Path) -> Path:
    """Copy the workflow's files (not results, not .snakemake) from the checkout into ``dest``.

    File modification times are kept (shutil.copy2), so Snakemake's mtime-based triggers see the
    copy exactly as the checkout.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for rel in WORKFLOW_PATHS:
        src = REPO_ROOT / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, ignore=_IGNORE, dirs_exist_ok=True)
        elif src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def copy_run(src: Path, dest: Path) -> Path:
    """Copy a finished work directory - results and .snakemake metadata included - to ``dest``.

    Modification times are kept, so Snakemake sees the same up-to-date state in the copy.
    """
    shutil.copytree(src, dest, symlinks=True)
    return dest


def run_snakemake(
    workdir: Path,
    *args: str,
    timeout_s: int = 600,
    check: bool = True,
    wrapper: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m snakemake *args`` in ``workdir`` with this interpreter; return the result.

    ``wrapper`` prefixes the command (e.g. ``("timeout", "-k", "30", "300")``). With ``check``, a
    non-zero exit raises AssertionError carrying the end of Snakemake's output.
    """
    cmd = [*wrapper, sys.executable, "-m", "snakemake", *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        cmd,
        check=False,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s + 60,
    )
    if check and result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-60:])
        raise AssertionError(f"snakemake {' '.join(args)} exited {result.returncode}:\n{tail}")
    return result


_JOB_HEADER = re.compile(r"^\s*(?P<local>local)?(?:rule|checkpoint) (?P<rule>\w+):\s*$")
_WILDCARDS = re.compile(r"^\s*wildcards: (?P<wildcards>.+?)\s*$")


def logged_jobs(log: str, executed_here: bool = False) -> list[str]:
    """The jobs a Snakemake log announces, sorted, as ``rule`` or ``rule[k=v,...]`` strings.

    For ``snakemake -n`` these are the planned jobs; for a run, the jobs it started (for a
    cluster run, the jobs it submitted, inside group jobs too). Each job block starts with a
    ``rule NAME:`` / ``localrule NAME:`` line; its ``wildcards: k=v, ...`` line, if any, follows.
    ``executed_here`` keeps only ``localrule`` blocks: in a SLURM job's log, the job step that
    really ran the rule announces it so, after the job-level Snakemake's ``rule`` block.
    """
    jobs: list[tuple[str, bool, list[str]]] = []
    for line in log.splitlines():
        header = _JOB_HEADER.match(line)
        if header:
            jobs.append((header["rule"], bool(header["local"]), []))
            continue
        wildcards = _WILDCARDS.match(line)
        if wildcards and jobs and not jobs[-1][2]:
            jobs[-1][2].extend(sorted(pair.strip() for pair in wildcards["wildcards"].split(",")))
    return sorted(
        rule + (f"[{','.join(pairs)}]" if pairs else "")
        for rule, local, pairs in jobs
        if local or not executed_here
    )


def job_stats(log: str) -> dict[str, int]:
    """The last "Job stats" table of a Snakemake log as {rule: count} (without the total)."""
    tables = log.split("Job stats:")
    if len(tables) < 2:
        return {}
    counts: dict[str, int] = {}
    lines = tables[-1].splitlines()
    rows = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    for line in lines[rows:]:
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            break
        if fields[0] != "total":
            counts[fields[0]] = int(fields[1])
    return counts


def shared_tmp_root(factory: pytest.TempPathFactory) -> Path:
    """A temporary directory shared by all pytest-xdist workers of this session (without xdist,
    the session's own base temp dir): each worker's base temp dir is a child of it."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``<shared_tmp_root>/<name>``, made by ``build(path)`` exactly once per session however
    many xdist workers ask (a file lock; later callers wait, then reuse it). A failed build is
    retried by the next caller. Callers must treat the directory as read-only."""
    root = shared_tmp_root(factory)
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            build(path)
            done.touch()
    return path


# Runs the command, then writes its exit status to the file named by $0 (atomically: the
# waiters poll for the file).
_RECORD_EXIT = '"$@"; echo $? > "$0.tmp" && mv "$0.tmp" "$0"'


class BackgroundSnakemake:
    """``python -m snakemake *args`` in ``<shared_tmp_root>/<name>``, started now (its own
    process group; output to ``<name>.log``) by the first xdist worker to claim ``name``, to be
    waited for later by any worker (its exit status lands in ``<name>.rc``). ``prepare(workdir)``
    fills the work directory before the start and returns Snakemake's arguments. The
    ``timeout_s`` counts from the start."""

    def __init__(
        self,
        root: Path,
        name: str,
        prepare: Callable[[Path], tuple[str, ...]],
        timeout_s: float,
    ) -> None:
        self.workdir = root / name
        self.log = root / f"{name}.log"
        self.rc = root / f"{name}.rc"
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.proc: subprocess.Popen | None = None
        self.args: tuple[str, ...] = ()
        try:
            os.close(os.open(root / f"{name}.owner", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another worker has started it
        self.args = prepare(self.workdir)
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                ["sh", "-c", _RECORD_EXIT, str(self.rc), sys.executable, "-m", "snakemake",
                 *self.args],
                cwd=self.workdir,
                env=dict(os.environ, HF_HUB_OFFLINE="1"),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # stop() reaches the job subprocesses too
            )  # fmt: skip

    def wait(self) -> Path:
        """Wait for the run; return ``workdir``, or raise AssertionError with its log's end."""
        while not self.rc.exists() and time.monotonic() < self.deadline:
            time.sleep(0.5)
        if not self.rc.exists():
            self.stop(f"timed out after {self.timeout_s:.0f} s")
        status = self.rc.read_text().strip() if self.rc.exists() else "timed out"
        if status == "0":
            return self.workdir
        if status.isdigit():
            status = f"exited {status}"
        tail = "\n".join(self.log.read_text().splitlines()[-60:]) if self.log.exists() else ""
        raise AssertionError(f"snakemake in {self.workdir} {status}:\n{tail}")

    def stop(self, reason: str = "stopped: no test waited for it") -> None:
        """Kill the run's whole process group if this worker started it and it still runs; the
        waiters read ``reason`` instead of an exit status."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.rc.write_text(reason)


INDUCTION_SUITE = "toy-induction"
INDUCTION_SIZE, INDUCTION_SEED = "small", 1
INDUCTION_RUN = f"toy-{INDUCTION_SIZE}-seed{INDUCTION_SEED}"
"""The suite, size, seed and run id of ``induction_run``."""


def _induction_overlay() -> dict:
    """config.yaml's `toy` suite (same models, training, relational settings) with only the
    larger size and one seed, under its own suite name, saving and scoring (a job each) only
    some checkpoints of the default schedule: the first and the last, and enough between them to
    place the 1-back rise (done by about step 500 in toy-small) before the induction rise (after
    step 1000). The schedule only picks which steps are saved: the training is the same."""
    base = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())
    spec = dict(base["suites"]["toy"])
    assert INDUCTION_SIZE in spec["sizes"], "the test follows the default suite's larger size"
    steps = [0, 256, 512, 1000, 2000, 2500]
    assert spec["schedule"] == "toy" and set(steps) <= set(base["toy"]["schedule"])
    assert steps[-1] == base["toy"]["training"]["steps"], "the checkpoints span the whole training"
    spec.update(sizes=[INDUCTION_SIZE], seeds=[INDUCTION_SEED], schedule=steps)
    return {"suite": INDUCTION_SUITE, "suites": {INDUCTION_SUITE: spec}}


def _prepare_toy_test_run(workdir: Path) -> tuple[str, ...]:
    copy_workflow(workdir)
    return ("--cores", "2", "--configfile", *TOY_TEST_CONFIGFILES)


def _prepare_induction_run(workdir: Path) -> tuple[str, ...]:
    copy_workflow(workdir)
    overlay = workdir / "toy-induction.yaml"
    overlay.write_text(yaml.safe_dump(_induction_overlay()))
    target = f"results/{INDUCTION_SUITE}/stats/relational.csv"
    return ("--cores", "2", target, "--configfile", "config.yaml", overlay.name)


_BACKGROUND_RUNS = {
    "toy_test_run": (_prepare_toy_test_run, 1200),
    "induction_run": (_prepare_induction_run, 2400),
}
"""name: (prepare, timeout in s) of each background run."""
TEST_NICENESS = 5
"""How much nicer than the background runs the tests run (a CPU share about 3 times smaller
each)."""
_FIXTURE_RUNS = {"toy_test_run": "toy_test_run", "toy_test_run_later": "toy_test_run",
                 "induction_run": "induction_run"}  # fmt: skip
"""Which background run each fixture waits for."""
_background: dict[str, BackgroundSnakemake] = {}


def _start(name: str, factory: pytest.TempPathFactory) -> BackgroundSnakemake:
    if name not in _background:
        prepare, timeout_s = _BACKGROUND_RUNS[name]
        _background[name] = BackgroundSnakemake(shared_tmp_root(factory), name, prepare, timeout_s)
    return _background[name]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the trained runs that the selected tests use (see the module docstring)."""
    used = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    factory = session.config._tmp_path_factory  # the factory behind tmp_path_factory
    runs = {name for fixture, name in _FIXTURE_RUNS.items() if fixture in used}
    for name in runs:
        _start(name, factory)
    if runs:
        # Tests wait for these runs, and the induction run's one-thread training is the
        # session's longest serial chain: from here on, this process and all it starts yield
        # the CPU to them.
        os.nice(TEST_NICENESS)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop a run that this process started and no test waited for (e.g. after -x stopped the
    session). Under xdist another worker may still need it: wait for it instead, unless the
    session is being cut short (-x, --maxfail, Ctrl-C)."""
    others_may_need = bool(os.environ.get("PYTEST_XDIST_WORKER")) and not (
        session.shouldstop or session.shouldfail or exitstatus == pytest.ExitCode.INTERRUPTED
    )
    for run in _background.values():
        if run.proc is None:
            continue  # another worker's
        if others_may_need:
            try:
                run.wait()
            except AssertionError:
                pass  # the tests that use it report the failure
        run.stop()


@pytest.fixture(scope="session")
def toy_test_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work directory in which the toy-test suite has run end to end (local, 2 cores).

    Read-only for tests: copy it with :func:`copy_run` before running anything in it.
    """
    return _start("toy_test_run", tmp_path_factory).wait()


@pytest.fixture(scope="session")
def toy_test_run_later(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """A function that waits for ``toy_test_run`` and returns it: the test runs alongside the
    training until it calls it."""
    return _start("toy_test_run", tmp_path_factory).wait


@pytest.fixture(scope="session")
def induction_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``results/toy-induction`` of a work directory in which the default toy suite, cut to
    ``small`` seed 1, has trained and been scored up to its relational statistics (2 cores)."""
    return _start("induction_run", tmp_path_factory).wait() / "results" / INDUCTION_SUITE


def sidecar_first_halves(sequences: dict) -> np.ndarray:
    """The first halves ``[N, L]`` of the repeated random sequences a sidecar's
    ``relational.sequences`` record pins, regenerated without mechgen (numpy's seeded
    ``choice`` of L distinct ids from [lo, hi) per sequence) and checked against its sha256."""
    rng = np.random.default_rng(sequences["seed"])
    lo, hi, half = sequences["lo"], sequences["hi"], sequences["half_length"]
    first = np.stack(
        [rng.choice(hi - lo, size=half, replace=False) + lo for _ in range(sequences["n_sequences"])]
    )
    # The sidecar pins the ids: the same seed and range regenerate the same bytes.
    assert hashlib.sha256(first.astype("<i8").tobytes()).hexdigest() == sequences["sha256"]
    return first


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the session so that no worker waits while there is work (within each group the
    `slow` tests first; the sort is stable):

    1. tests that need no background run, the slow ones (own Snakemake runs, trainings) first;
    2. the SLURM tests: most of their time is waiting for the cluster's scheduling, which then
       overlaps the other tests instead of ending the session;
    3. the users of ``toy_test_run``, which by then has been built beside groups 1 and 2;
    4. the users of ``induction_run``, whose one-thread training is the session's longest chain.
    """

    def group(item: pytest.Item) -> tuple[int, bool]:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "induction_run" in fixtures:
            rank = 3
        elif item.get_closest_marker("slurm") is not None:
            rank = 1
        elif fixtures & {"toy_test_run", "toy_test_run_later"}:
            rank = 2
        else:
            rank = 0
        return rank, item.get_closest_marker("slow") is None

    items.sort(key=group)
