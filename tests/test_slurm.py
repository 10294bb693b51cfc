"""The toy-test suite on a real SLURM cluster (profiles/slurm) gives exactly the local results.

Needs the single-node cluster of .ci/slurm_up.sh and MECHGEN_SLURM=1 (.ci/run does both).
Without MECHGEN_SLURM=1 the test is skipped; with it but no answering cluster, it fails, since
then CI promised a cluster that is not there.

The run uses the profile as a user would, plus the test-only flags: squeue for job state (this
cluster has no accounting database, so sacct fails), 2 s polling, scoring groups of 2
checkpoints, and kept SLURM logs so that the test can read what each SLURM job ran.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from conftest import (
    TOY_TEST_CONFIGFILES,
    TOY_TEST_RUNS,
    TOY_TEST_STEPS,
    TOY_TEST_SUITE,
    copy_workflow,
    logged_jobs,
    run_snakemake,
)

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("MECHGEN_SLURM") != "1",
        reason="no SLURM cluster: start one with .ci/slurm_up.sh and set MECHGEN_SLURM=1",
    ),
]

RES = f"results/{TOY_TEST_SUITE}"
RUNS = TOY_TEST_RUNS
STEPS = TOY_TEST_STEPS
CHECKPOINTS_PER_JOB = 2
TIMEOUT_S = 900
"""Hard limit of the SLURM run (timeout -k 30): a status query that never sees jobs end hangs.
(The run shares the cores with the local toy-test run and the other tests.)"""
TEST_FLAGS = (
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "2",
    "--seconds-between-status-checks", "2",
    "--slurm-keep-successful-logs",
    "--group-components", f"score_{{run}}={CHECKPOINTS_PER_JOB}",
)  # fmt: skip
_SUBMITTED = re.compile(
    r"has been submitted with SLURM jobid (?P<jobid>\d+) \(log: (?P<log>[^)]+)\)"
)


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Fail if MECHGEN_SLURM=1 but no SLURM node answers (session scope: checked before the
    local toy-test run is built)."""
    if shutil.which("sinfo") is None:
        pytest.fail("MECHGEN_SLURM=1 but `sinfo` is not installed (did .ci/slurm_up.sh run?)")
    try:
        sinfo = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], check=False, capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        pytest.fail("MECHGEN_SLURM=1 but `sinfo` got no answer from slurmctld within 20 s")
    states = set(sinfo.stdout.split())
    if sinfo.returncode != 0 or not states & {"idle", "mixed", "allocated"}:
        pytest.fail(
            f"MECHGEN_SLURM=1 but no SLURM node is up: sinfo said {sinfo.stdout!r} {sinfo.stderr!r}"
        )


def squeue_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: state} of the jobs SLURM still remembers (finished ones for MinJobAge seconds)."""
    out = subprocess.run(
        ["squeue", "-h", "--states=all", "-o", "%i %T", "-j", ",".join(job_ids)],
        check=False, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return dict(line.split() for line in out.stdout.splitlines() if line.strip())


def test_toy_suite_on_slurm_equals_the_local_run(
    slurm_cluster: None, toy_test_run_later: Callable[[], Path], tmp_path: Path
) -> None:
    # The SLURM run does not need the local one until the comparison: they run side by side.
    workdir = copy_workflow(tmp_path / "slurm-run")
    started = time.monotonic()
    result = run_snakemake(
        workdir,
        "--profile", "profiles/slurm", *TEST_FLAGS,
        "--configfile", *TOY_TEST_CONFIGFILES,
        wrapper=("timeout", "-k", "30", str(TIMEOUT_S)),
        timeout_s=TIMEOUT_S,
        check=False,
    )  # fmt: skip
    wall_s = time.monotonic() - started
    log = result.stdout + result.stderr
    submitted = {m["jobid"]: Path(m["log"]) for m in _SUBMITTED.finditer(log)}
    print(f"SLURM run of the toy-test suite: {wall_s:.0f} s wall, {len(submitted)} SLURM jobs")
    if result.returncode != 0:
        if submitted:  # leave nothing of ours queued on the cluster
            subprocess.run(["scancel", *submitted], check=False, capture_output=True, timeout=30)
        reason = "timed out" if result.returncode in (124, 137) else f"exited {result.returncode}"
        pytest.fail(
            f"snakemake on SLURM {reason} after {wall_s:.0f} s:\n"
            + "\n".join(log.splitlines()[-60:])
        )

    # What each SLURM job ran, from its own log (the inner Snakemake announces its jobs). The
    # light rules (tokenizer, eval text, aggregation) run on the submitting host by design.
    ran_by_slurm_job = {
        jobid: logged_jobs(path.read_text(), executed_here=True)
        for jobid, path in submitted.items()
    }
    assert all(ran_by_slurm_job.values()), f"a SLURM job ran no rule: {ran_by_slurm_job}"
    toy_train_jobs = [jobs for jobs in ran_by_slurm_job.values() if jobs[0].startswith("toy_train")]
    score_groups = [jobs for jobs in ran_by_slurm_job.values() if jobs[0].startswith("score")]
    analysis_groups = [jobs for jobs in ran_by_slurm_job.values() if jobs[0].startswith("analyze")]
    assert sorted(j for jobs in toy_train_jobs for j in jobs) == [
        f"toy_train[run={r}]" for r in RUNS
    ]
    assert analysis_groups == [["analyze", "figures"]]
    assert len(ran_by_slurm_job) == len(toy_train_jobs) + len(score_groups) + len(analysis_groups)
    # Scoring: every (run, step) exactly once; each SLURM job <= CHECKPOINTS_PER_JOB steps of one run.
    assert len(score_groups) == len(RUNS) * math.ceil(len(STEPS) / CHECKPOINTS_PER_JOB)
    assert sorted(j for jobs in score_groups for j in jobs) == sorted(
        f"score[run={r},step={s}]" for r in RUNS for s in STEPS
    )
    # (With at most N per job, that many jobs in all can only be ceil(steps / N) per run.)
    for jobs in score_groups:
        assert 1 <= len(jobs) <= CHECKPOINTS_PER_JOB, jobs
        assert len({re.search(r"run=([^,\]]+)", j)[1] for j in jobs}) == 1, jobs
    # SLURM itself knows these jobs as completed (squeue keeps finished jobs MinJobAge seconds).
    states = squeue_states(list(submitted))
    assert states, "squeue no longer lists any of the submitted jobs"
    assert set(states.values()) == {"COMPLETED"}, states

    # The cluster run computed exactly what the local run did.
    toy_test_run = toy_test_run_later()
    for table in ("heads.parquet", "trajectories.csv"):
        read = pd.read_parquet if table.endswith(".parquet") else pd.read_csv
        pd.testing.assert_frame_equal(
            read(workdir / RES / table), read(toy_test_run / RES / table), check_exact=True
        )
