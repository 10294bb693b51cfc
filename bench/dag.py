"""How long Snakemake takes to plan mechgen's largest DAG, and how much memory that needs.

Plans (``snakemake -n``) the full PolyPythias grid - 5 sizes x seeds 0..9 x the ``all`` schedule
(154 checkpoints) = 7,700 scoring jobs - and the decoupled 160m suite - 2 variants x seeds 1..3
x 154 = 924 scoring jobs - and the Stanford CRFM GPT-2 suite - small and medium x 5 seeds x
the ``all`` schedule (609 ``checkpoint-N`` revisions) = 6,090 scoring jobs - each in a scratch
directory, and prints for each plan the wall time,
the CPU time and the peak memory (maximum resident set size) of the Snakemake process, taken
from ``os.wait4``. Targets: <= 60 s and <= 2 GB per plan on 2 cores.

The two suites are separate entries of config.yaml and Snakemake runs one suite per
invocation, so they are planned separately (that is what a user runs). ``--combined`` also plans
one superset suite - all 7 size labels x seeds 0..9 x 154 = 10,780 scoring jobs - as an upper
bound for a single DAG (its decoupled seed-0 and seeds 4..9 runs do not exist on the hub; a dry
run never asks).

States (``--states``):
  fresh   nothing computed yet: every job is planned.
  scored  every per-checkpoint output and the evaluation text exist (empty files, newer than
          their inputs): the plan has to stat ~17k files and plans only the tables, statistics
          and figures - the situation of adding a seed to a finished grid.

Usage (from the checkout, venv active):
    python bench/dag.py                                   # fresh + scored, pythia and decoupled
    python bench/dag.py --suites crfm                     # the CRFM GPT-2 grid (10 x 609)
    python bench/dag.py --profile slurm                   # plan with profiles/slurm (groups)
    python bench/dag.py --combined --states fresh
    python bench/dag.py --cprofile 20 --states fresh      # where the time goes (top 20 functions)
"""

from __future__ import annotations

import argparse
import os
import pstats
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from mechgen import mechanisms
from mechgen.config import load_yaml, suite_runs, suite_steps, validate_config

SECONDS_TARGET = 60.0
MEMORY_TARGET_MB = 2048.0

HF_SUITE_COMMON = {
    "source": "hf",
    "model_prefix": "pythia-",
    "repo_template": "EleutherAI/pythia-{size}-seed{seed}",
    "seed0_repo_template": "EleutherAI/pythia-{size}",
    "schedule": "all",
    "tokens_per_step": 2097152,
    "tokenizer_revision": "step143000",
    "eval": {"kind": "naturalstories"},
}
CRFM_SUITE_COMMON = {
    "source": "hf",
    "architecture": "gpt2",
    "model_prefix": "crfm-gpt2-",
    "repo_template": "stanford-crfm/{name}-gpt2-{size}-x{seed}",
    "schedule": "all",
    "tokens_per_step": 524288,
    "tokenizer_revision": "checkpoint-400000",
    "eval": {"kind": "naturalstories"},
    "relational": {"token_hi": 50257},
}
SUITE_COMMON = {"crfm": CRFM_SUITE_COMMON}
"""Suites whose common keys are not Pythia's (HF_SUITE_COMMON)."""
SUITES = {
    "pythia": {"sizes": ["14m", "31m", "70m", "160m", "410m"], "seeds": list(range(10))},
    "decoupled": {"sizes": ["160m-data", "160m-weight"], "seeds": [1, 2, 3]},
    "combined": {
        "sizes": ["14m", "31m", "70m", "160m", "410m", "160m-data", "160m-weight"],
        "seeds": list(range(10)),
    },
    "crfm": {"sizes": ["small", "medium"], "seeds": [21, 49, 81, 343, 777]},
}


@dataclass
class Plan:
    """One ``snakemake -n``: what it planned and what it cost."""

    suite: str
    state: str
    n_runs: int
    n_steps: int
    planned: dict[str, int]
    wall_s: float
    cpu_s: float
    max_rss_mb: float

    @property
    def ok(self) -> bool:
        return self.wall_s <= SECONDS_TARGET and self.max_rss_mb <= MEMORY_TARGET_MB


def suite_config(name: str) -> dict:
    """The overlay config that selects bench suite ``name`` (sizes x seeds, schedule ``all``)."""
    return {
        "suite": f"bench-{name}",
        "suites": {f"bench-{name}": {**SUITE_COMMON.get(name, HF_SUITE_COMMON), **SUITES[name]}},
    }


def expanded(overlay: dict) -> tuple[list[str], list[int]]:
    """Run ids and steps of the overlay's suite, by mechgen's own expansion."""
    config = load_yaml(REPO_ROOT / "config.yaml")
    config["suite"] = overlay["suite"]
    config["suites"].update(overlay["suites"])
    config = validate_config(config, check_files=False)
    return [r.run for r in suite_runs(config)], suite_steps(config)


UPSTREAM_RULES = ("eval_sentences", "eval_tokens", "score")
"""The rules whose outputs exist in the "scored" state, in DAG order."""


def snakemake_cmd(workdir: Path, profile: str | None, *extra: str) -> list[str]:
    """``python -m snakemake -n`` on the checkout's Snakefile in ``workdir`` with its overlay."""
    cmd = [*extra, "-m", "snakemake", "-n", "--snakefile", str(REPO_ROOT / "Snakefile")]
    cmd += ["--directory", str(workdir)]
    if profile:
        cmd += ["--profile", str(REPO_ROOT / "profiles" / profile)]
    return cmd + ["--configfile", str(REPO_ROOT / "config.yaml"), str(workdir / "overlay.yaml")]


def output_templates(name: str) -> dict[str, list[str]]:
    """{rule: output paths with {run} and {step} placeholders} of the UPSTREAM_RULES, as the
    workflow declares them today: read from a dry run of a one-run, one-step version of the
    suite, so the "scored" state follows the rules (e.g. a new per-checkpoint output)."""
    overlay = suite_config(name)
    spec = overlay["suites"][overlay["suite"]]
    spec.update(sizes=spec["sizes"][:1], seeds=spec["seeds"][:1], schedule=[1000])
    (run,), _ = expanded(overlay)
    with tempfile.TemporaryDirectory(prefix="mechgen-dag-probe-") as tmp:
        workdir = Path(tmp)
        (workdir / "overlay.yaml").write_text(yaml.safe_dump(overlay))
        cmd = snakemake_cmd(workdir, None, sys.executable)
        probe = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, check=True)
        log = probe.stdout + probe.stderr
    templates: dict[str, list[str]] = {}
    rule = None
    for line in log.splitlines():
        if line.strip().endswith(":") and line.strip().split()[0] in ("rule", "localrule"):
            rule = line.strip().split()[1].rstrip(":")
        elif rule in UPSTREAM_RULES and line.strip().startswith("output: "):
            outputs = line.strip().removeprefix("output: ").split(", ")
            templates[rule] = [
                o.replace(run, "{run}").replace("step1000", "step{step}") for o in outputs
            ]
    if set(templates) != set(UPSTREAM_RULES):
        raise SystemExit(
            f"could not read the outputs of {UPSTREAM_RULES} from a dry run:\n{log[-2000:]}"
        )
    return templates


def make_scored(
    workdir: Path, templates: dict[str, list[str]], runs: list[str], steps: list[int]
) -> int:
    """Create empty outputs of eval_sentences, eval_tokens and every score job, inputs first
    (so each output is newer than its inputs). Returns the number of files created."""
    paths = list(templates["eval_sentences"])
    paths += [t.format(run=run) for t in templates["eval_tokens"] for run in runs]
    paths += [t.format(run=run, step=s) for t in templates["score"] for run in runs for s in steps]
    for path in paths:
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        (workdir / path).touch()
    return len(paths)


def job_stats(log: str) -> dict[str, int]:
    """Snakemake's "Job stats" table as {rule: count}, without the total."""
    if "Job stats:" not in log:
        return {}
    lines = log.split("Job stats:")[-1].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    counts = {}
    for line in lines[first:]:
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            break
        if fields[0] != "total":
            counts[fields[0]] = int(fields[1])
    return counts


def plan(name: str, state: str, profile: str | None, cprofile_top: int) -> Plan:
    """Run one ``snakemake -n`` of bench suite ``name`` in ``state``; measure it."""
    overlay = suite_config(name)
    runs, steps = expanded(overlay)
    with tempfile.TemporaryDirectory(prefix=f"mechgen-dag-{name}-") as tmp:
        workdir = Path(tmp)
        (workdir / "overlay.yaml").write_text(yaml.safe_dump(overlay))
        if state == "scored":
            make_scored(workdir, output_templates(name), runs, steps)
        profile_out = workdir / "snakemake.prof"
        profiler = ["-m", "cProfile", "-o", str(profile_out)] if cprofile_top else []
        cmd = snakemake_cmd(workdir, profile, sys.executable, *profiler) + ["--quiet", "rules"]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        started = time.perf_counter()
        with subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            log = proc.stdout.read()  # drain the pipe while Snakemake runs
            # wait4 gives this child's own rusage (RUSAGE_CHILDREN would mix all children).
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall_s = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(
                f"snakemake -n failed for {name}/{state}:\n" + "\n".join(log.splitlines()[-40:])
            )
        if cprofile_top:
            print(
                f"--- cProfile of {name}/{state}, top {cprofile_top} by cumulative time (slowed by profiling)"
            )
            pstats.Stats(str(profile_out)).sort_stats("cumulative").print_stats(cprofile_top)
    return Plan(
        suite=name,
        state=state,
        n_runs=len(runs),
        n_steps=len(steps),
        planned=job_stats(log),
        wall_s=wall_s,
        cpu_s=usage.ru_utime + usage.ru_stime,
        max_rss_mb=usage.ru_maxrss / 1024,  # Linux reports KiB
    )


def check_planned(p: Plan) -> None:
    """The plan must hold the jobs the grid implies (else the timing means nothing): fresh, one
    scoring job per (run, step) and one eval_tokens per run; scored, none of those. Either way
    one of each suite-level job after scoring (aggregate, statistics, figures, all)."""
    per_checkpoint = {"score": p.n_runs * p.n_steps, "eval_tokens": p.n_runs, "eval_sentences": 1}
    for rule, count in per_checkpoint.items():
        expected = count if p.state == "fresh" else 0
        if p.planned.get(rule, 0) != expected:
            raise SystemExit(
                f"{p.suite}/{p.state}: {p.planned.get(rule, 0)} {rule} jobs, expected {expected}"
            )
    suite_level = {rule: n for rule, n in p.planned.items() if rule not in per_checkpoint}
    # One figure per mechanism of the catalog: the only suite-level rule with a wildcard.
    per_mechanism = suite_level.pop("mechanism_figure", None)
    if per_mechanism not in (None, len(mechanisms.catalog())):
        raise SystemExit(f"{p.suite}/{p.state}: {per_mechanism} mechanism_figure jobs")
    if set(suite_level.values()) != {1} or not {"aggregate", "analyze", "all"} <= set(suite_level):
        raise SystemExit(f"{p.suite}/{p.state}: unexpected suite-level jobs {suite_level}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--states", nargs="+", choices=["fresh", "scored"], default=["fresh", "scored"]
    )
    parser.add_argument(
        "--suites",
        nargs="+",
        choices=["pythia", "decoupled", "crfm"],
        default=["pythia", "decoupled"],
    )
    parser.add_argument(
        "--combined", action="store_true", help="also plan the 7-size x 10-seed superset"
    )
    parser.add_argument("--profile", choices=["local", "slurm"], help="plan with profiles/<name>")
    parser.add_argument(
        "--cprofile", type=int, default=0, metavar="N", help="print the top N functions"
    )
    args = parser.parse_args(argv)

    suites = list(args.suites) + (["combined"] if args.combined else [])
    print(
        f"snakemake -n, {os.cpu_count()} CPUs, profile {args.profile or 'none'}; targets <= {SECONDS_TARGET:.0f} s, <= {MEMORY_TARGET_MB:.0f} MB"
    )
    print(
        f"{'suite':<10} {'state':<7} {'runs':>5} {'steps':>5} {'jobs':>6} {'scoring':>7} {'wall s':>7} {'cpu s':>6} {'max RSS MB':>10}  ok"
    )
    results = []
    for name in suites:
        for state in args.states:
            p = plan(name, state, args.profile, args.cprofile)
            check_planned(p)
            results.append(p)
            print(
                f"{p.suite:<10} {p.state:<7} {p.n_runs:>5} {p.n_steps:>5} {sum(p.planned.values()):>6} "
                f"{p.planned.get('score', 0):>7} {p.wall_s:>7.1f} {p.cpu_s:>6.1f} {p.max_rss_mb:>10.0f}  "
                f"{'yes' if p.ok else 'NO'}",
                flush=True,
            )
    return 0 if all(p.ok for p in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
