"""A killed run's jobs must not race the resume (mechgen.runguard, mechgen.sh run/resume).

The fast tests use a fake Snakemake head (a shell script with two children); the slow test kills
a real toy run (one run of the toy-test suite) mid-training, resumes it with ./mechgen.sh and
compares its checkpoints and score tables with the session's uninterrupted toy-test run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import (
    REPO_ROOT,
    TOY_TEST_CONFIGFILES,
    TOY_TEST_RUNS,
    TOY_TEST_STEPS,
    TOY_TEST_SUITE,
    copy_workflow,
    logged_jobs,
)

from mechgen import atomic, runguard
from mechgen.sources.toy import STEP_DELAY_ENV

PYTHON = sys.executable
VENV = sys.prefix  # the venv running the tests (not resolved: its python is a symlink)

FAKE_HEAD = """#!/bin/bash
sleep 300 &
sleep 301 &
wait
"""


def _guard(cwd: Path, *args: str, **kwargs: object) -> subprocess.Popen:
    """The run guard in a subprocess. A stub ``squeue`` that lists no job comes first on PATH,
    so the result does not depend on whether this machine has a SLURM (or a stopped one, whose
    ``squeue`` fails); the SLURM refusal is tested on its own with a stub that lists jobs."""
    code = "import sys; from mechgen.runguard import main; raise SystemExit(main(sys.argv[1:]))"
    stub = cwd / ".stub-bin"
    stub.mkdir(exist_ok=True)
    (stub / "squeue").write_text("#!/bin/sh\nexit 0\n")
    (stub / "squeue").chmod(0o755)
    env = dict(
        os.environ, PYTHONPATH=str(REPO_ROOT), PATH=f"{stub}{os.pathsep}{os.environ['PATH']}"
    )
    return subprocess.Popen([PYTHON, "-c", code, *args], cwd=cwd, env=env, **kwargs)


def _wait_for(predicate, timeout_s: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _state(cwd: Path) -> dict:
    return json.loads((cwd / runguard.STATE_FILE).read_text())


def _alive(pid: int) -> bool:
    return runguard._alive(pid)


@pytest.fixture
def fake_head(tmp_path: Path) -> Path:
    script = tmp_path / "head.sh"
    script.write_text(FAKE_HEAD)
    script.chmod(0o755)
    return script


def _start_fake_run(tmp_path: Path, fake_head: Path) -> tuple[subprocess.Popen, dict, list[int]]:
    sup = _guard(tmp_path, "exec", "--", str(fake_head), stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (tmp_path / runguard.STATE_FILE).exists(), what="the run-state file")
    state = _state(tmp_path)
    _wait_for(
        lambda: len(runguard.find_run_processes(state["run_id"], state["sid"])) == 3,
        what="the fake head's two children",
    )
    procs = runguard.find_run_processes(state["run_id"], state["sid"])
    # The head (setsid: its own session and group leader) and its children, all tagged.
    assert procs and procs[0].pid == state["head_pid"] == state["sid"]
    assert all(p.sid == state["sid"] and p.pgid == state["sid"] for p in procs)
    children = [p.pid for p in procs if p.pid != state["head_pid"]]
    assert sorted(p.args for p in procs if p.pid in children) == ["sleep 300", "sleep 301"]
    return sup, state, children


def test_supervisor_stops_the_jobs_of_a_killed_head(tmp_path: Path, fake_head: Path) -> None:
    sup, state, children = _start_fake_run(tmp_path, fake_head)
    os.kill(state["head_pid"], signal.SIGKILL)
    _, err = sup.communicate(timeout=30)
    assert sup.returncode == 128 + signal.SIGKILL
    assert "was ended by SIGKILL" in err
    for pid in children:
        assert f"pid {pid}: sleep 30" in err  # each survivor is named ...
        assert not _alive(pid)  # ... and stopped
    assert not (tmp_path / runguard.STATE_FILE).exists()


def test_stop_refuses_while_the_head_lives_then_stops_orphans(
    tmp_path: Path, fake_head: Path
) -> None:
    sup, state, children = _start_fake_run(tmp_path, fake_head)
    refused = _guard(tmp_path, "stop", stderr=subprocess.PIPE, text=True)
    _, err = refused.communicate(timeout=30)
    assert refused.returncode == runguard.EXIT_RUN_ALIVE
    assert f"still running: pid {state['head_pid']}" in err
    assert all(_alive(pid) for pid in children)  # a live run is never touched

    # The supervisor dies with its head (kill -9 of both): only `stop` can clean up now.
    os.kill(sup.pid, signal.SIGKILL)
    os.kill(state["head_pid"], signal.SIGKILL)
    sup.wait(10)
    time.sleep(0.2)
    assert all(_alive(pid) for pid in children)  # the orphans of the issue
    stopper = _guard(tmp_path, "stop", stderr=subprocess.PIPE, text=True)
    _, err = stopper.communicate(timeout=30)
    assert stopper.returncode == 0, err
    assert "ended without stopping its jobs" in err
    for pid in children:
        assert f"pid {pid}: sleep 30" in err
        assert not _alive(pid)
    assert not (tmp_path / runguard.STATE_FILE).exists()
    # Nothing recorded: nothing to do, silently.
    again = _guard(tmp_path, "stop", stderr=subprocess.PIPE, text=True)
    assert again.communicate(timeout=30)[1] == "" and again.returncode == 0


def test_a_reused_head_pid_is_not_taken_for_the_run(tmp_path: Path) -> None:
    """A live process with the recorded pid but without the run's tag is not the head."""
    other = subprocess.Popen(["sleep", "30"])
    try:
        state = {
            "run_id": "feedface",
            "head_pid": other.pid,
            "sid": other.pid,
            "head_start": 0,
            "started": "then",
            "command": ["snakemake"],
        }
        path = tmp_path / "state.json"
        path.write_text(json.dumps(state))
        # `sleep` is not a session leader, so it is in no session numbered other.pid: untouched.
        assert runguard.stop(path, grace_s=1) == 0
        assert _alive(other.pid)
        assert not path.exists()
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], True),
        (["--configfile", "config.yaml", "x.yaml", "-p"], True),
        (["-c4", "--forceall"], True),
        (["-n"], False),
        (["-np"], False),
        (["--dry-run"], False),
        (["--help"], False),
        (["-h"], False),
        (["--dag"], False),
        (["--list-rules"], False),
        (["--report=x.html"], False),
        (["--", "-n"], True),
    ],
)
def test_runs_jobs(args: list[str], expected: bool) -> None:
    assert runguard.runs_jobs(args) is expected


# ---------------------------------------------------------------------------------------------
# The real thing: kill the head of a toy run mid-training, resume at once.
#
# The run is one run of the toy-test suite (tests/configs/toy-test.yaml), trained and scored up to
# its score tables: the uninterrupted reference is then the session's ``toy_test_run`` (the same
# configuration in another work directory, built once for the tests that use it), not a second
# training of our own.

RUN = TOY_TEST_RUNS[0]
TRAINING_STEPS = yaml.safe_load((REPO_ROOT / TOY_TEST_CONFIGFILES[1]).read_text())["toy"][
    "training"
]["steps"]
TARGET = f"results/{TOY_TEST_SUITE}/scores/{RUN}/step{TOY_TEST_STEPS[-1]}.parquet"
"""One score table of the run: its `score_run` job (all its checkpoints) after its training."""
# Last: --configfile takes every following word, a target too.
CONFIG_ARGS = ["--configfile", *TOY_TEST_CONFIGFILES]


def _workdir(path: Path) -> Path:
    copy_workflow(path)
    shutil.copy2(REPO_ROOT / "mechgen.sh", path / "mechgen.sh")
    return path


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, MECHGEN_VENV=VENV, HF_HUB_OFFLINE="1", CORES="2", **extra)
    env.pop(runguard.RUN_ID_ENV, None)
    env.pop(STEP_DELAY_ENV, None)
    env.update(extra)
    return env


def _checkpoint_digests(workdir: Path) -> dict[str, str]:
    hub = workdir / "results" / TOY_TEST_SUITE / "hub" / RUN
    return {
        str(p.relative_to(hub)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(hub.rglob("*.safetensors"))
    }


KILLED_STEP_DELAY_S = "600"
"""Seconds of sleep after every training update of the run that gets killed (a test hook that
changes no checkpoint): its orphaned trainer cannot finish before resume looks for it, however
loaded the machine (with a delay of a fraction of a second it can). Resume stops it, so the delay
costs no test time; if the test fails first, it stops what is left of the run itself."""


@pytest.mark.slow
def test_kill_mid_training_then_resume(tmp_path: Path, toy_test_run_later) -> None:
    killed = _workdir(tmp_path / "killed")
    log = (tmp_path / "killed.log").open("w")
    first = subprocess.Popen(
        ["./mechgen.sh", "run", TARGET, *CONFIG_ARGS],
        cwd=killed,
        env=_env(**{STEP_DELAY_ENV: KILLED_STEP_DELAY_S}),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    state: dict = {}

    def run_processes() -> list[runguard.Proc]:
        return runguard.find_run_processes(state["run_id"], state["sid"], state["head_start"])

    def training_started() -> bool:
        state.update(runguard.read_state(killed / runguard.STATE_FILE) or {})
        return bool(state) and any("toy_train" in p.args for p in run_processes())

    try:
        # Kill as soon as the training job is alive: it is the orphan that resume must stop.
        _wait_for(training_started, timeout_s=300, what="the training job to start")
        procs = run_processes()
        trainers = [p.pid for p in procs if "toy_train" in p.args]
        # The head dies, and with it its supervisor (the harder case: nobody is left to clean up).
        os.kill(state["supervisor_pid"], signal.SIGKILL)
        os.kill(state["head_pid"], signal.SIGKILL)
        first.wait(30)
        assert all(_alive(pid) for pid in trainers)  # orphans, still running: the bug's setup

        resumed = subprocess.run(
            ["./mechgen.sh", "resume", TARGET, *CONFIG_ARGS],
            cwd=killed,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=900, check=False,
        )
        output = resumed.stdout + resumed.stderr
        assert resumed.returncode == 0, output[-4000:]
        # resume named and stopped the orphans before Snakemake started any job.
        stopped_at = output.index("ended without stopping its jobs")
        for pid in trainers:
            assert f"pid {pid}: " in output
        assert stopped_at < output.index("Building DAG of jobs")
        assert run_processes() == []
        assert not any(_alive(p.pid) for p in procs)
        # The resume trained the run again (the killed trainer finished nothing) and scored it;
        # the progress reached the main output.
        jobs = logged_jobs(output)
        assert f"toy_train[run={RUN}]" in jobs and f"score_run[run={RUN}]" in jobs, jobs
        assert f"train {RUN}: {TRAINING_STEPS}/{TRAINING_STEPS} steps (100%)" in output
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        if state:  # a failure left the killed run's jobs behind: stop them
            runguard.stop_processes(run_processes(), grace_s=1)
        log.close()
    leftovers = [p for p in (killed / "results").rglob("*") if atomic.is_temporary(p)]
    assert leftovers == []
    # The resume asked for score tables only: no summary, so no report, and it says why.
    assert not (killed / "results" / TOY_TEST_SUITE / "report.html").exists()
    assert f"report: not built, results/{TOY_TEST_SUITE}/summary.rst is missing" in output

    # The uninterrupted reference: the same run of the same configuration, trained and scored
    # from scratch (its own tokenizer too) in toy_test_run's work directory.
    reference = toy_test_run_later()
    digests = _checkpoint_digests(killed)
    assert sorted(digests) == sorted(f"step{s}/model.safetensors" for s in TOY_TEST_STEPS)
    assert digests == _checkpoint_digests(reference)
    for step in TOY_TEST_STEPS:
        table = f"results/{TOY_TEST_SUITE}/scores/{RUN}/step{step}.parquet"
        pd.testing.assert_frame_equal(
            pd.read_parquet(killed / table), pd.read_parquet(reference / table), check_exact=True
        )


def test_stop_refuses_while_slurm_jobs_of_this_checkout_remain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SLURM jobs are not local processes: with no head left, resume must not resubmit while
    jobs submitted from this working directory are still queued or running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    lines = [
        f"101|3f2a-uuid|rule_toy_train_wildcards_toy-small-seed1|{work}",
        "102|other|rule_x|/somewhere/else",
    ]
    listing = tmp_path / "squeue.out"
    listing.write_text("\n".join(lines) + "\n")
    squeue = bin_dir / "squeue"
    squeue.write_text(f"#!/bin/sh\ncat {listing}\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(work)
    assert runguard.slurm_jobs_here() == [
        ("101", "3f2a-uuid", "rule_toy_train_wildcards_toy-small-seed1")
    ]
    assert runguard.stop(work / "no-state.json") == runguard.EXIT_RUN_ALIVE
    err = capsys.readouterr().err
    assert "job 101 (3f2a-uuid, rule_toy_train_wildcards_toy-small-seed1)" in err
    assert "scancel 101`" in err and "102" not in err
    listing.write_text("")
    assert runguard.stop(work / "no-state.json") == 0
