"""Partial reruns: what a change of config.yaml makes Snakemake redo, with the default triggers.

A claim is shown by the plan (``snakemake -n``: the job blocks it prints, cross-checked against
its job-stats table), which must equal a job list written out here from the DAG's shape:
toy_tokenizer, eval_sentences -> eval_tokens (one for a toy suite, whose runs share the suite's
tokenizer; one per run in hf and local suites) and toy_train per run -> score_run per run (a toy
suite scores a run's checkpoints in one job; hf and local suites have one `score` job per
(run, step)) -> the suite-level jobs that read every score (aggregate, trajectories, the
statistics, the figures, ``all``). Then, for a change that makes Snakemake redo something, a
real run must start exactly the planned jobs (those its target needs) and leave every result it
was not meant to touch byte-for-byte and mtime-identical. The real runs stop at the per-head
table or, where a change replans several runs alike, at one of those runs' score tables; one
(test_changing_an_analysis_parameter_rescores_nothing, for functional_multiple) runs the
suite-level analyses, and the jobs it starts are the plan it checks; the other plans still
check them.

All tests start from one finished toy-test run (conftest.toy_test_run) and work in a copy; the
two that need a scored `local` suite share one, built once (the ``local_suite`` fixture).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import (
    TOY_TEST_CONFIGFILES,
    TOY_TEST_RUNS,
    TOY_TEST_SPEC,
    TOY_TEST_STEPS,
    TOY_TEST_SUITE,
    build_once,
    copy_run,
    job_stats,
    logged_jobs,
    run_snakemake,
)

from mechgen.sources.evaltext import read_sentence_file
from mechgen.tables.circuit_files import load_circuit

pytestmark = pytest.mark.slow

RES = f"results/{TOY_TEST_SUITE}"
RUNS = TOY_TEST_RUNS
STEPS = TOY_TEST_STEPS
PREFIX, SIZES, SEEDS = TOY_TEST_SPEC["model_prefix"], TOY_TEST_SPEC["sizes"], TOY_TEST_SPEC["seeds"]
TOY_EVAL_TOKENS = "eval_tokens[tokens=suite]"
"""A toy suite's one evaluation-token job: its runs share the suite's tokenizer."""
UPSTREAM = {"toy_tokenizer", "eval_sentences", TOY_EVAL_TOKENS}
"""The suite-level jobs before scoring (the tokenizer, the evaluation text and its token ids)."""
ANALYSES = {"analyze", "figures", "all"}
"""Jobs that every change of an analysis parameter must rerun (at least)."""


def score_jobs(runs: list[str], steps: list[int]) -> list[str]:
    """The per-checkpoint scoring jobs of an hf or local suite."""
    return [f"score[run={run},step={step}]" for run in runs for step in steps]


def per_run(rule: str, runs: list[str]) -> list[str]:
    return [f"{rule}[run={run}]" for run in runs]


def eval_token_jobs(runs: list[str]) -> list[str]:
    """The evaluation-token jobs of an hf or local suite: one per run (its own tokenizer)."""
    return [f"eval_tokens[tokens={run}]" for run in runs]


def score_run_jobs(runs: list[str]) -> list[str]:
    """The scoring jobs of a toy suite: one per run, all its checkpoints."""
    return per_run("score_run", runs)


def overlay(workdir: Path, name: str, content: dict) -> str:
    """Write a config overlay into ``workdir``; return its name for ``--configfile``."""
    (workdir / name).write_text(yaml.safe_dump(content))
    return name


def _checked_jobs(log: str) -> list[str]:
    jobs = logged_jobs(log)
    # The parsed job blocks must agree with Snakemake's own count per rule (guards the parser).
    assert Counter(job.split("[")[0] for job in jobs) == Counter(job_stats(log)), log[-3000:]
    return jobs


def planned(workdir: Path, *configfiles: str, targets: tuple[str, ...] = ()) -> list[str]:
    """The jobs ``snakemake -n`` plans, sorted."""
    result = run_snakemake(workdir, "-n", *targets, "--configfile", *configfiles)
    return _checked_jobs(result.stdout + result.stderr)


def run(workdir: Path, *configfiles: str, targets: tuple[str, ...] = ()) -> list[str]:
    """Run for real on 2 cores; return the jobs it started, sorted."""
    result = run_snakemake(workdir, "--cores", "2", *targets, "--configfile", *configfiles)
    return _checked_jobs(result.stdout + result.stderr)


def snapshot(workdir: Path, pattern: str) -> dict[str, tuple[int, str]]:
    """{path: (mtime in ns, sha256)} of the files matching ``pattern`` under ``workdir``."""
    return {
        str(p.relative_to(workdir)): (
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(workdir.glob(pattern))
    }


def score_tables(workdir: Path, res: str = RES) -> set[str]:
    """The per-(run, step) score tables present (other per-checkpoint files aside)."""
    return {str(p.relative_to(workdir)) for p in workdir.glob(f"{res}/scores/*/step*.parquet")}


def expected_tables(runs: list[str], steps: list[int], res: str = RES) -> set[str]:
    return {f"{res}/scores/{run}/step{step}.parquet" for run in runs for step in steps}


@pytest.fixture(scope="module")
def downstream(toy_test_run: Path) -> list[str]:
    """The suite-level jobs after scoring, from the log of the toy-test run: every job of that
    complete run without a run or step wildcard, except the tokenizer and the evaluation text."""
    logs = sorted((toy_test_run / ".snakemake" / "log").glob("*.snakemake.log"))
    jobs = logged_jobs(logs[-1].read_text())
    # Suite-level: no run or step wildcard (per-mechanism jobs such as
    # mechanism_figure[mechanism=...] are suite-level too).
    suite_level = sorted(
        job for job in jobs if "run=" not in job and "step=" not in job and job not in UPSTREAM
    )
    assert {"aggregate", "trajectories"} | ANALYSES <= set(suite_level)
    return suite_level


@pytest.fixture()
def workdir(toy_test_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished toy-test run."""
    return copy_run(toy_test_run, tmp_path / "work")


def test_a_finished_run_plans_nothing(workdir: Path) -> None:
    # The starting point of every test below: the copied run is complete and up to date.
    assert score_tables(workdir) == expected_tables(RUNS, STEPS)
    assert planned(workdir, *TOY_TEST_CONFIGFILES) == []


def test_adding_a_seed_scores_only_the_new_run(workdir: Path, downstream: list[str]) -> None:
    new_seed = max(SEEDS) + 1
    more = overlay(
        workdir, "seed.yaml", {"suites": {TOY_TEST_SUITE: {"seeds": [*SEEDS, new_seed]}}}
    )
    new = [f"{PREFIX}{size}-seed{new_seed}" for size in SIZES]
    # A new run tokenizes nothing: a toy suite's runs share one token file.
    new_run_jobs = per_run("toy_train", new) + score_run_jobs(new)
    assert planned(workdir, *TOY_TEST_CONFIGFILES, more) == sorted(new_run_jobs + downstream)

    # The real run stops at the per-head table (the analysis-parameter test runs the analyses).
    target = (f"{RES}/heads.parquet",)
    heads_before = pd.read_parquet(workdir / RES / "heads.parquet")
    scores_before = snapshot(workdir, f"{RES}/scores/*/*")
    expected_run = sorted(new_run_jobs + ["aggregate"])
    assert run(workdir, *TOY_TEST_CONFIGFILES, more, targets=target) == expected_run

    scores_after = snapshot(workdir, f"{RES}/scores/*/*")
    assert {p: scores_after[p] for p in scores_before} == scores_before  # nothing rescored
    assert score_tables(workdir) == expected_tables(RUNS + new, STEPS)
    heads = pd.read_parquet(workdir / RES / "heads.parquet")
    assert sorted(heads["seed"].unique()) == sorted([*SEEDS, new_seed])
    old_rows = heads[heads["seed"] != new_seed].reset_index(drop=True)
    pd.testing.assert_frame_equal(old_rows, heads_before, check_exact=True)


def test_adding_a_size_scores_only_the_new_runs(workdir: Path, downstream: list[str]) -> None:
    # A one-layer size keeps the extra training to seconds; it is a size like any other.
    more = overlay(
        workdir,
        "micro.yaml",
        {
            "toy": {"sizes": {"micro": {"n_layers": 1, "n_heads": 1, "d_model": 64}}},
            "suites": {TOY_TEST_SUITE: {"sizes": [*SIZES, "micro"]}},
        },
    )
    new = [f"{PREFIX}micro-seed{seed}" for seed in SEEDS]
    # A new run tokenizes nothing: a toy suite's runs share one token file.
    new_run_jobs = per_run("toy_train", new) + score_run_jobs(new)
    assert planned(workdir, *TOY_TEST_CONFIGFILES, more) == sorted(new_run_jobs + downstream)

    # The real run trains and scores one of the new runs (the plan above covers both; adding a
    # seed aggregates a new run into the per-head table): its checkpoints, no other job.
    one = new[0]
    target = tuple(f"{RES}/scores/{one}/step{step}.parquet" for step in STEPS)
    expected_run = sorted(
        per_run("toy_train", [one]) + score_run_jobs([one])
    )
    scores_before = snapshot(workdir, f"{RES}/scores/*/*")
    assert run(workdir, *TOY_TEST_CONFIGFILES, more, targets=target) == expected_run
    scores_after = snapshot(workdir, f"{RES}/scores/*/*")
    assert {p: scores_after[p] for p in scores_before} == scores_before
    assert score_tables(workdir) == expected_tables(RUNS + [one], STEPS)
    # The new run has the new size's shape: one layer of one head, at every checkpoint.
    heads = pd.concat([pd.read_parquet(workdir / t) for t in target], ignore_index=True)
    assert sorted(heads["step"].unique()) == STEPS
    assert set(heads["model"]) == {f"{PREFIX}micro"}
    assert set(zip(heads["layer"], heads["head"])) == {(0, 0)}


LOCAL_SUITE = "toy-local"
LOCAL_RES = f"results/{LOCAL_SUITE}"
LOCAL_RUNS = [f"{PREFIX}{size}-seed{SEEDS[0]}" for size in SIZES]
"""A `local` suite over the toy-test run's checkpoints: one seed is enough, and saves scoring."""
LOCAL_FIRST, LOCAL_ADDED = [STEPS[0], STEPS[-1]], STEPS[-2]
"""The local suite is scored at the first and the last saved step, then one step between them
is added (the last step stays last: it is the tokenizer revision and the detail step)."""
LOCAL_STEPS = sorted([*LOCAL_FIRST, LOCAL_ADDED])


def local_suite_overlay(workdir: Path, name: str, steps: list[int]) -> str:
    """An overlay for the toy-local suite with ``steps``: the toy-test suite's settings (prefix,
    sizes, tokens per step, scoring overrides) reading the toy hub, <path>/<run>/step<N>/, with
    the toy's evaluation text as a file (local-eval.txt)."""
    spec = {
        **TOY_TEST_SPEC,
        "source": "local",
        "path": f"{RES}/hub",
        "seeds": SEEDS[:1],
        "schedule": steps,
        "eval": {"kind": "file", "path": "local-eval.txt"},
    }
    return overlay(workdir, name, {"suite": LOCAL_SUITE, "suites": {LOCAL_SUITE: spec}})


def local_tables(steps: list[int]) -> tuple[str, ...]:
    return tuple(sorted(expected_tables(LOCAL_RUNS, steps, LOCAL_RES)))


@pytest.fixture(scope="module")
def local_suite(toy_test_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the toy-test run in which the toy-local suite was scored at LOCAL_FIRST, then,
    with LOCAL_ADDED added (local-all.yaml), planned to `all` and run up to its per-head table.

    Built once per session (conftest.build_once: under xdist the tests that use it may run on
    either worker); read-only for tests. Snakemake's output of the three invocations is kept in
    ``test-logs/{first,plan,more}.log``, and the snapshot of the suite's score files between the
    two runs in ``test-logs/scores_before.json``.
    """

    assert len(STEPS) > 2, "the toy-test schedule needs a step between the first and the last"

    def build(workdir: Path) -> None:
        copy_run(toy_test_run, workdir)
        logs = workdir / "test-logs"
        logs.mkdir()

        def snakemake(log: str, *args: str) -> None:
            result = run_snakemake(workdir, *args)
            (logs / f"{log}.log").write_text(result.stdout + result.stderr)

        (workdir / "local-eval.txt").write_text(
            "\n".join(read_sentence_file(workdir / RES / "eval" / "sentences.json")) + "\n"
        )
        heads = f"{LOCAL_RES}/heads.parquet"
        first = local_suite_overlay(workdir, "local-first.yaml", LOCAL_FIRST)
        snakemake("first", "--cores", "2", heads, "--configfile", "config.yaml", first)
        scores = snapshot(workdir, f"{LOCAL_RES}/scores/*/*")
        (logs / "scores_before.json").write_text(json.dumps(scores))
        more = local_suite_overlay(workdir, "local-all.yaml", LOCAL_STEPS)
        snakemake("plan", "-n", "--configfile", "config.yaml", more)
        snakemake("more", "--cores", "2", heads, "--configfile", "config.yaml", more)

    return build_once(tmp_path_factory, "reruns_local_suite", build)


def test_adding_checkpoints_scores_only_the_new_checkpoints(
    local_suite: Path, downstream: list[str]
) -> None:
    # The toy suite trains all its checkpoints in one job, so adding one means retraining. A
    # `local` suite reads checkpoints that already exist: the toy-test run's hub directory.
    # The first run only built the per-head table; the second planned the analyses too, and ran
    # up to the per-head table (the analysis-parameter test runs the analyses).
    workdir, runs = local_suite, LOCAL_RUNS
    logs = workdir / "test-logs"
    assert _checked_jobs((logs / "first.log").read_text()) == sorted(
        ["eval_sentences", "aggregate"]
        + eval_token_jobs(runs)
        + score_jobs(runs, LOCAL_FIRST)
    )
    scores_before = {
        path: tuple(value)
        for path, value in json.loads((logs / "scores_before.json").read_text()).items()
    }
    assert {p for p in scores_before if p.endswith(".parquet")} == set(local_tables(LOCAL_FIRST))
    added = score_jobs(runs, [LOCAL_ADDED])
    assert _checked_jobs((logs / "plan.log").read_text()) == sorted(added + downstream)
    assert _checked_jobs((logs / "more.log").read_text()) == sorted(added + ["aggregate"])
    scores_after = snapshot(workdir, f"{LOCAL_RES}/scores/*/*")
    assert {p: scores_after[p] for p in scores_before} == scores_before
    assert score_tables(workdir, LOCAL_RES) == expected_tables(runs, LOCAL_STEPS, LOCAL_RES)
    # The local suite scored the same weights with the same text as the toy suite did, one
    # `score` job per checkpoint where the toy suite's `score_run` scored each run in one job
    # (each suite has its own score cache, so neither read the other's scores): the tables and
    # the relational arrays are the same, exactly.
    local = pd.read_parquet(workdir / LOCAL_RES / "heads.parquet").drop(columns=["suite"])
    toy = pd.read_parquet(workdir / RES / "heads.parquet").drop(columns=["suite"])
    toy = toy[toy["run"].isin(runs) & toy["step"].isin(LOCAL_STEPS)].reset_index(drop=True)
    pd.testing.assert_frame_equal(local, toy, check_exact=True)
    for run_id in runs:
        for step in LOCAL_STEPS:
            name = f"scores/{run_id}/step{step}.circuit.npz"
            a = load_circuit(workdir / LOCAL_RES / name).arrays
            b = load_circuit(workdir / RES / name).arrays
            assert a.keys() == b.keys() and a, name
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")


def test_adding_a_detail_step_rescores_only_that_checkpoint(
    local_suite: Path, tmp_path: Path
) -> None:
    # Adding a detail step flips `detail` for that step only: in a suite with one `score` job
    # per checkpoint, only that checkpoint is planned again - not the final step (a detail step
    # before and after), not the first. (A toy suite's score_run jobs score every checkpoint of
    # a run, so there each run's job is planned again: tests/test_relational_pipeline.py.)
    workdir = copy_run(local_suite, tmp_path / "work")
    tables = local_tables(LOCAL_STEPS)
    assert planned(workdir, "config.yaml", "local-all.yaml", targets=tables) == []
    detail = overlay(
        workdir, "detail.yaml", {"relational": {"detail_steps": ["final", LOCAL_ADDED]}}
    )
    assert planned(workdir, "config.yaml", "local-all.yaml", detail, targets=tables) == sorted(
        score_jobs(LOCAL_RUNS, [LOCAL_ADDED])
    )


@pytest.mark.parametrize(
    ("change", "real_run"),
    [
        ({"analysis": {"onset_thresholds": {"start": 0.02, "stop": 0.30, "step": 0.01}}}, False),
        # The one real run of the suite-level analyses in this file.
        ({"analysis": {"functional_multiple": 3.0}}, True),
    ],
    ids=["onset_thresholds", "functional_multiple"],
)
def test_changing_an_analysis_parameter_rescores_nothing(
    workdir: Path, downstream: list[str], change: dict, real_run: bool
) -> None:
    changed = overlay(workdir, "analysis.yaml", change)

    def only_analyses(jobs: list[str]) -> None:
        # Only suite-level analysis jobs: no scoring, no aggregation, no per-run job.
        assert ANALYSES <= set(jobs) <= set(downstream) - {"aggregate", "trajectories"}, jobs

    if not real_run:
        only_analyses(planned(workdir, *TOY_TEST_CONFIGFILES, changed))
        return

    def scored() -> dict:
        # Scores and the tables aggregated from them (rules aggregate and trajectories); the
        # analysis rules' outputs (summary, relational_trajectories, stats) may be rewritten.
        aggregated = ("heads.parquet", "checkpoints.csv", "missing.csv", "trajectories.parquet",
                      "trajectories.csv")  # fmt: skip
        return snapshot(workdir, f"{RES}/scores/*/*") | {
            path: value
            for path, value in snapshot(workdir, f"{RES}/*.*").items()
            if Path(path).name in aggregated
        }

    kept = scored()
    assert {"heads.parquet", "trajectories.parquet"} <= {Path(p).name for p in kept}
    stats_before = snapshot(workdir, f"{RES}/stats/*.csv")
    # The jobs the real run starts are its plan (no dry run before it: it would plan the same).
    only_analyses(run(workdir, *TOY_TEST_CONFIGFILES, changed))
    assert scored() == kept
    stats_after = snapshot(workdir, f"{RES}/stats/*.csv")
    assert set(stats_after) == set(stats_before)
    per_seed = f"{RES}/stats/per_seed.csv"  # an output of analyze, which both changes rerun
    assert stats_after[per_seed][0] > stats_before[per_seed][0]


def test_changing_the_evaluation_text_rescores_everything(
    workdir: Path, downstream: list[str]
) -> None:
    n_sentences = 40
    changed = overlay(
        workdir,
        "eval.yaml",
        {"suites": {TOY_TEST_SUITE: {"eval": {"kind": "toy_heldout", "n_sentences": n_sentences}}}},
    )
    every_score = score_run_jobs(RUNS)
    upstream = ["eval_sentences", TOY_EVAL_TOKENS]
    assert planned(workdir, *TOY_TEST_CONFIGFILES, changed) == sorted(
        upstream + every_score + downstream
    )

    # The real run rescores one run's checkpoints (the plan above covers them all); the other
    # run, not asked for, must stay as it was.
    one, other = RUNS[0], RUNS[1:]
    target = tuple(f"{RES}/scores/{one}/step{step}.parquet" for step in STEPS)
    expected_run = sorted(["eval_sentences", TOY_EVAL_TOKENS] + score_run_jobs([one]))
    before = snapshot(workdir, f"{RES}/scores/*/*")
    assert run(workdir, *TOY_TEST_CONFIGFILES, changed, targets=target) == expected_run
    after = snapshot(workdir, f"{RES}/scores/*/*")
    assert set(after) == set(before)
    rescored = {p for p in before if f"/scores/{one}/" in p}
    assert all(after[p][0] > before[p][0] for p in rescored)
    assert all(after[p] == before[p] for p in set(before) - rescored)
    assert other and set(before) - rescored
    sentences = read_sentence_file(workdir / RES / "eval" / "sentences.json")
    assert len(sentences) == n_sentences
    for step in STEPS:  # every rescored checkpoint saw the new text
        sidecar = json.loads((workdir / RES / "scores" / one / f"step{step}.json").read_text())
        assert sidecar["n_sentences"] == n_sentences


def test_changing_a_scoring_parameter_rescores_everything(
    workdir: Path, downstream: list[str]
) -> None:
    window = 2
    changed = overlay(workdir, "scoring.yaml", {"scoring": {"clipped_window": window}})
    every_score = score_run_jobs(RUNS)
    assert planned(workdir, *TOY_TEST_CONFIGFILES, changed) == sorted(every_score + downstream)

    # The real run rescores one run's checkpoints (the plan for all of them is checked above).
    one = RUNS[-1]
    tables = tuple(f"{RES}/scores/{one}/step{step}.parquet" for step in STEPS)
    expected_run = score_run_jobs([one])

    def read_tables() -> pd.DataFrame:
        return pd.concat([pd.read_parquet(workdir / t) for t in tables], ignore_index=True)

    heads_before = read_tables()
    assert run(workdir, *TOY_TEST_CONFIGFILES, changed, targets=tables) == sorted(expected_run)
    heads = read_tables()
    # Only the metric that depends on the window changed; the rescoring is otherwise exact.
    unchanged = [c for c in heads.columns if c != "clipped_distance"]
    pd.testing.assert_frame_equal(heads[unchanged], heads_before[unchanged], check_exact=True)
    assert (heads["clipped_distance"] <= window + 1e-9).all()
    assert (heads["clipped_distance"] <= heads["mean_distance"] + 1e-9).all()
    assert (heads_before["clipped_distance"] > heads["clipped_distance"] + 1e-12).any()


@pytest.mark.parametrize("change", [{"threads": 2}, {"delete_weights": False}], ids=str)
def test_changing_how_scoring_runs_rescores_nothing(workdir: Path, change: dict) -> None:
    # Threads and whether weights are deleted afterwards do not change a score; on a cluster
    # one sets threads to match the nodes and must not lose every finished checkpoint to it.
    changed = overlay(workdir, "how.yaml", {"scoring": change})
    assert planned(workdir, *TOY_TEST_CONFIGFILES, changed) == []


def test_a_failed_score_run_rerun_rescores_only_the_unfinished_checkpoints(workdir: Path) -> None:
    # A toy run's checkpoints are scored in one score_run job; Snakemake deletes all its outputs
    # when it fails (or reruns it whole after a kill). What it had finished survives in the score
    # cache, entry by entry, so the rerun scores only the rest. Here the job fails on a corrupt
    # weight file in its second checkpoint; the others are scored (and cached) all the same.
    one = RUNS[0]
    broken = STEPS[1]
    tables = tuple(f"{RES}/scores/{one}/step{step}.parquet" for step in STEPS)
    heads_before = {t: pd.read_parquet(workdir / t) for t in tables}
    # This run's cache entries (named in its sidecars) go, so that only the failed job's count.
    entries = {}
    for step in STEPS:
        sidecar = json.loads((workdir / RES / "scores" / one / f"step{step}.json").read_text())
        entries[step] = workdir / sidecar["score_cache"]["path"]
        entries[step].unlink()
        entries[step].with_suffix(".circuit.npz").unlink()
    weights = workdir / RES / "hub" / one / f"step{broken}" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file")

    failed = run_snakemake(
        workdir, "--cores", "2", *tables, "--forcerun", "score_run",
        "--configfile", *TOY_TEST_CONFIGFILES, check=False,
    )  # fmt: skip
    log = failed.stdout + failed.stderr
    assert failed.returncode != 0, log[-3000:]
    assert logged_jobs(log) == [f"score_run[run={one}]"]
    assert any(
        line.startswith("mechgen: corrupt checkpoint: ")
        and f"{one}/step{broken}/model.safetensors" in line
        for line in log.splitlines()
    ), log[-3000:]
    assert not any((workdir / t).exists() for t in tables)  # Snakemake removed the outputs
    assert {s for s in STEPS if entries[s].is_file()} == set(STEPS) - {broken}

    weights.write_bytes(good)
    assert run(workdir, *TOY_TEST_CONFIGFILES, targets=tables) == [f"score_run[run={one}]"]
    for step in STEPS:
        sidecar = json.loads((workdir / RES / "scores" / one / f"step{step}.json").read_text())
        assert sidecar["status"] == "ok"
        # A hit is read from the cache: no forward pass (mechgen.scoring.job).
        assert sidecar["score_cache"] == {
            "key": entries[step].stem,
            "hit": step != broken,
            "path": str(entries[step].relative_to(workdir)),
        }
    for t in tables:
        pd.testing.assert_frame_equal(
            pd.read_parquet(workdir / t), heads_before[t], check_exact=True
        )
    # One log for the run's job, one progress line per checkpoint.
    score_log = (workdir / RES / "logs" / "score" / f"{one}.log").read_text()
    for step in STEPS:
        assert f"{one} step {step}: ok, " in score_log, score_log
    assert f"{len(STEPS)}/{len(STEPS)} checkpoints of {one} scored" in score_log
