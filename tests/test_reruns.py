"""Partial reruns: what a change of config.yaml makes Snakemake redo, with the default triggers.

Each claim is shown twice. The plan (``snakemake -n``: the job blocks it prints, cross-checked
against its job-stats table) must equal a job list written out here from the DAG's shape:
toy_tokenizer, eval_sentences -> eval_tokens and toy_train per run -> score_run per run (a toy
suite scores a run's checkpoints in one job; hf and local suites have one `score` job per
(run, step)) -> the suite-level jobs that read every score (aggregate, trajectories, the
statistics, the figures, ``all``). Then a real run must start exactly the planned jobs and leave
every result it was not meant to touch byte-for-byte and mtime-identical. The real runs stop at
the per-head table, except one (test_changing_an_analysis_parameter_rescores_nothing, for
functional_multiple) that runs the suite-level analyses; the other plans still check them.

All tests start from one finished toy-test run (conftest.toy_test_run) and work in a copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
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
    copy_run,
    job_stats,
    logged_jobs,
    run_snakemake,
)

from mechgen.circuit import load_circuit
from mechgen.evaltext import read_sentence_file

pytestmark = pytest.mark.slow

RES = f"results/{TOY_TEST_SUITE}"
RUNS = TOY_TEST_RUNS
STEPS = TOY_TEST_STEPS
PREFIX, SIZES, SEEDS = TOY_TEST_SPEC["model_prefix"], TOY_TEST_SPEC["sizes"], TOY_TEST_SPEC["seeds"]
UPSTREAM = {"toy_tokenizer", "eval_sentences"}
"""The suite-level jobs before scoring (the tokenizer, the evaluation text)."""
ANALYSES = {"analyze", "figures", "all"}
"""Jobs that every change of an analysis parameter must rerun (at least)."""


def score_jobs(runs: list[str], steps: list[int]) -> list[str]:
    """The per-checkpoint scoring jobs of an hf or local suite."""
    return [f"score[run={run},step={step}]" for run in runs for step in steps]


def per_run(rule: str, runs: list[str]) -> list[str]:
    return [f"{rule}[run={run}]" for run in runs]


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
    new_run_jobs = per_run("toy_train", new) + per_run("eval_tokens", new) + score_run_jobs(new)
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
    new_run_jobs = per_run("toy_train", new) + per_run("eval_tokens", new) + score_run_jobs(new)
    assert planned(workdir, *TOY_TEST_CONFIGFILES, more) == sorted(new_run_jobs + downstream)

    # The real run stops at the per-head table (the analysis-parameter test runs the analyses).
    target = (f"{RES}/heads.parquet",)
    expected_run = sorted(new_run_jobs + ["aggregate"])
    scores_before = snapshot(workdir, f"{RES}/scores/*/*")
    assert run(workdir, *TOY_TEST_CONFIGFILES, more, targets=target) == expected_run
    scores_after = snapshot(workdir, f"{RES}/scores/*/*")
    assert {p: scores_after[p] for p in scores_before} == scores_before
    assert score_tables(workdir) == expected_tables(RUNS + new, STEPS)
    heads = pd.read_parquet(workdir / RES / "heads.parquet")
    assert set(heads["model"]) == {f"{PREFIX}{size}" for size in [*SIZES, "micro"]}
    assert set(heads.loc[heads["model"] == f"{PREFIX}micro", "layer"]) == {0}


def test_adding_checkpoints_scores_only_the_new_checkpoints(
    workdir: Path, downstream: list[str]
) -> None:
    # The toy suite trains all its checkpoints in one job, so adding one means retraining. A
    # `local` suite reads checkpoints that already exist: the toy-test run's hub directory,
    # <path>/<run>/step<N>/. Start it with the first and the last saved step, then add the
    # others (the last step stays last: it is the tokenizer revision and the detail step).
    (workdir / "local-eval.txt").write_text(
        "\n".join(read_sentence_file(workdir / RES / "eval" / "sentences.json")) + "\n"
    )
    res = "results/toy-local"
    first_steps, added_steps = [STEPS[0], STEPS[-1]], STEPS[1:-1]
    assert added_steps, "the toy-test schedule needs more than 2 steps"
    runs = [f"{PREFIX}{size}-seed{SEEDS[0]}" for size in SIZES]

    def local_suite(name: str, steps: list[int]) -> str:
        # The toy-test suite's settings (prefix, sizes, tokens per step, scoring overrides),
        # read from the toy hub, with the toy's evaluation text as a file.
        spec = {
            **TOY_TEST_SPEC,
            "source": "local",
            "path": f"{RES}/hub",
            "seeds": SEEDS[:1],  # one seed is enough here, and saves scoring time
            "schedule": steps,
            "eval": {"kind": "file", "path": "local-eval.txt"},
        }
        return overlay(workdir, name, {"suite": "toy-local", "suites": {"toy-local": spec}})

    # The first run only builds the per-head table; the second then plans the analyses too.
    first = local_suite("local-first.yaml", first_steps)
    first_jobs = sorted(
        ["eval_sentences", "aggregate"]
        + per_run("eval_tokens", runs)
        + score_jobs(runs, first_steps)
    )
    assert run(workdir, "config.yaml", first, targets=(f"{res}/heads.parquet",)) == first_jobs
    scores_before = snapshot(workdir, f"{res}/scores/*/*")
    assert score_tables(workdir, res) == expected_tables(runs, first_steps, res)

    more = local_suite("local-all.yaml", STEPS)
    added = score_jobs(runs, added_steps)
    assert planned(workdir, "config.yaml", more) == sorted(added + downstream)
    # The real run stops at the per-head table (the analysis-parameter test runs the analyses).
    target = (f"{res}/heads.parquet",)
    assert run(workdir, "config.yaml", more, targets=target) == sorted(added + ["aggregate"])
    scores_after = snapshot(workdir, f"{res}/scores/*/*")
    assert {p: scores_after[p] for p in scores_before} == scores_before
    assert score_tables(workdir, res) == expected_tables(runs, STEPS, res)
    # The local suite scored the same weights with the same text as the toy suite did, one
    # `score` job per checkpoint where the toy suite's `score_run` scored each run in one job
    # (each suite has its own score cache, so neither read the other's scores): the tables and
    # the relational arrays are the same, exactly.
    local = pd.read_parquet(workdir / res / "heads.parquet").drop(columns=["suite"])
    toy = pd.read_parquet(workdir / RES / "heads.parquet").drop(columns=["suite"])
    toy = toy[toy["run"].isin(runs)].reset_index(drop=True)
    pd.testing.assert_frame_equal(local, toy, check_exact=True)
    for run_id in runs:
        for step in STEPS:
            name = f"scores/{run_id}/step{step}.circuit.npz"
            a = load_circuit(workdir / res / name).arrays
            b = load_circuit(workdir / RES / name).arrays
            assert a.keys() == b.keys() and a, name
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")


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
    jobs = planned(workdir, *TOY_TEST_CONFIGFILES, changed)
    # Only suite-level analysis jobs: no scoring, no aggregation, no per-run job.
    assert ANALYSES <= set(jobs) <= set(downstream) - {"aggregate", "trajectories"}, jobs
    if not real_run:
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
    assert run(workdir, *TOY_TEST_CONFIGFILES, changed) == jobs
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
    upstream = ["eval_sentences"] + per_run("eval_tokens", RUNS)
    assert planned(workdir, *TOY_TEST_CONFIGFILES, changed) == sorted(
        upstream + every_score + downstream
    )

    # The real run rescores one run's checkpoints (the scoring-parameter test below rescores
    # them all); the other run, not asked for, must stay as it was.
    one, other = RUNS[0], RUNS[1:]
    target = tuple(f"{RES}/scores/{one}/step{step}.parquet" for step in STEPS)
    expected_run = sorted(["eval_sentences", f"eval_tokens[run={one}]"] + score_run_jobs([one]))
    assert planned(workdir, *TOY_TEST_CONFIGFILES, changed, targets=target) == expected_run
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
    assert planned(workdir, *TOY_TEST_CONFIGFILES, changed, targets=tables) == sorted(expected_run)

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
        # A hit is read from the cache: no forward pass (mechgen.scoring).
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
