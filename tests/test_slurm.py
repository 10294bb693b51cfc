"""What a cluster runs for users, on a real SLURM (profiles/slurm), gives exactly the local results.

On a cluster the SLURM jobs are the scoring of checkpoints, in groups of up to N checkpoints of
one run (`groups: score=score_{run}`, `group-components`), and the analysis group (`analyze` and
`figures` in one job); the light rules run on the submitting host. The test scores the last 2
checkpoints of each of the 2 runs of the finished local toy-test run (conftest.toy_test_run) on
the cluster, in one group job per run, through a `local` suite that reads a copy of its hub directory with its evaluation text
as a file, and builds the analysis. Then each SLURM job's own log must show what it ran, SLURM
must report every job COMPLETED, and the per-head table and the trajectories must equal the
local run's at those steps exactly (but for the suite's name).

Needs the single-node cluster of .ci/slurm_up.sh and MECHGEN_SLURM=1 (.ci/run does both).
Without MECHGEN_SLURM=1 the test is skipped; with it but no answering cluster, it fails, since
then CI promised a cluster that is not there.

The run uses the profile as a user would, plus the test-only flags: squeue for job state (this
cluster has no accounting database, so sacct fails), 2 s polling, scoring groups of 2
checkpoints, and kept SLURM logs so that the test can read what each SLURM job ran.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import (
    TOY_TEST_RUNS,
    TOY_TEST_SPEC,
    TOY_TEST_STEPS,
    TOY_TEST_SUITE,
    copy_workflow,
    logged_jobs,
    run_snakemake,
)

from mechgen.sources.evaltext import read_sentence_file

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("MECHGEN_SLURM") != "1",
        reason="no SLURM cluster: start one with .ci/slurm_up.sh and set MECHGEN_SLURM=1",
    ),
]

TOY_RES = f"results/{TOY_TEST_SUITE}"
SUITE = "toy-test-on-slurm"
RES = f"results/{SUITE}"
RUNS = TOY_TEST_RUNS
CHECKPOINTS_PER_JOB = 2
STEPS = TOY_TEST_STEPS[-CHECKPOINTS_PER_JOB:]
"""The checkpoints scored: per run one group of 2 (a SLURM job each). Two runs, so a grouping
that mixed runs would show; one group per run, since each SLURM job starts Snakemake twice and
each checkpoint pays a model-library import (~10 CPU-s on the 2-core CI machine)."""
TARGETS = (f"{RES}/trajectories.csv", f"{RES}/figures/trajectories.png")
"""The per-head table, the trajectories and the analysis group (`figures` needs `analyze`);
the mechanism catalog, the relational analysis and the summary add only local jobs."""
TIMEOUT_S = 600
"""Hard limit of the SLURM run (timeout -k 30): a status query that never sees jobs end hangs."""
TEST_FLAGS = (  # after the targets: --group-components takes every following word
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


def local_suite(workdir: Path, toy_test_run: Path) -> str:
    """Write into ``workdir`` a `local` suite over a copy of the toy-test run's checkpoints
    (``hub/<run>/step<N>/``, the tokenizer saved with each run) and its evaluation text as a
    file, with the toy-test suite's other settings; return the overlay's name."""
    shutil.copytree(toy_test_run / TOY_RES / "hub", workdir / "hub")
    sentences = read_sentence_file(toy_test_run / TOY_RES / "eval" / "sentences.json")
    (workdir / "eval.txt").write_text("\n".join(sentences) + "\n")
    spec = {
        **TOY_TEST_SPEC,
        "source": "local",
        "path": "hub",
        "schedule": STEPS,
        "eval": {"kind": "file", "path": "eval.txt"},
    }
    (workdir / "slurm-suite.yaml").write_text(
        yaml.safe_dump({"suite": SUITE, "suites": {SUITE: spec}})
    )
    return "slurm-suite.yaml"


def test_scoring_and_analysis_on_slurm_equal_the_local_run(
    slurm_cluster: None, toy_test_run: Path, tmp_path: Path
) -> None:
    workdir = copy_workflow(tmp_path / "slurm-run")
    suite = local_suite(workdir, toy_test_run)
    started = time.monotonic()
    result = run_snakemake(
        workdir,
        *TARGETS, "--profile", "profiles/slurm", *TEST_FLAGS,
        "--configfile", "config.yaml", suite,
        wrapper=("timeout", "-k", "30", str(TIMEOUT_S)),
        timeout_s=TIMEOUT_S,
        check=False,
    )  # fmt: skip
    wall_s = time.monotonic() - started
    log = result.stdout + result.stderr
    submitted = {m["jobid"]: Path(m["log"]) for m in _SUBMITTED.finditer(log)}
    print(f"SLURM run: {wall_s:.0f} s wall, {len(submitted)} SLURM jobs")
    if result.returncode != 0:
        if submitted:  # leave nothing of ours queued on the cluster
            subprocess.run(["scancel", *submitted], check=False, capture_output=True, timeout=30)
        reason = "timed out" if result.returncode in (124, 137) else f"exited {result.returncode}"
        pytest.fail(
            f"snakemake on SLURM {reason} after {wall_s:.0f} s:\n"
            + "\n".join(log.splitlines()[-60:])
        )

    # What each SLURM job ran, from its own log (the inner Snakemake announces its jobs). The
    # light rules (eval text, tokens, aggregation) run on the submitting host by design.
    ran_by_slurm_job = {
        jobid: logged_jobs(path.read_text(), executed_here=True)
        for jobid, path in submitted.items()
    }
    assert all(ran_by_slurm_job.values()), f"a SLURM job ran no rule: {ran_by_slurm_job}"
    score_groups = [jobs for jobs in ran_by_slurm_job.values() if jobs[0].startswith("score")]
    analysis_groups = [jobs for jobs in ran_by_slurm_job.values() if jobs[0].startswith("analyze")]
    assert analysis_groups == [["analyze", "figures"]]
    assert len(ran_by_slurm_job) == len(score_groups) + len(analysis_groups), ran_by_slurm_job
    # Scoring: every (run, step) exactly once, and each SLURM job scores the checkpoints of one
    # run (the profile's `groups: score=score_{run}`), CHECKPOINTS_PER_JOB at a time.
    assert sorted(j for jobs in score_groups for j in jobs) == sorted(
        f"score[run={r},step={s}]" for r in RUNS for s in STEPS
    )
    runs_by_group = [{re.search(r"run=([^,\]]+)", j)[1] for j in jobs} for jobs in score_groups]
    assert all(len(runs) == 1 for runs in runs_by_group), score_groups
    assert sorted(len(jobs) for jobs in score_groups) == [CHECKPOINTS_PER_JOB] * len(RUNS)
    # SLURM itself knows these jobs as completed (squeue keeps finished jobs MinJobAge seconds).
    states = squeue_states(list(submitted))
    assert states, "squeue no longer lists any of the submitted jobs"
    assert set(states.values()) == {"COMPLETED"}, states

    # The cluster scored exactly what the local run did at these steps: same weights, same text,
    # same code (rows are per run and step, so the other steps' rows do not enter).
    for table in ("heads.parquet", "trajectories.csv"):
        read = pd.read_parquet if table.endswith(".parquet") else pd.read_csv
        ours, local = read(workdir / RES / table), read(toy_test_run / TOY_RES / table)
        local = local[local["step"].isin(STEPS)].reset_index(drop=True)
        assert set(ours["suite"]) == {SUITE} and set(local["suite"]) == {TOY_TEST_SUITE}
        pd.testing.assert_frame_equal(
            ours.drop(columns="suite"), local.drop(columns="suite"), check_exact=True
        )
