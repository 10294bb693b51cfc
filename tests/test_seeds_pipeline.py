"""The decoupled toy suite end to end (Snakemake, 6 tiny runs: 2 of each kind): the trainer's
two seeds, the lineage check of genuine runs, and stats/seed_sources.csv against a pandas
recomputation from the per-run tables; the report gets the section."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import build_once, copy_workflow, run_snakemake

from mechgen.config import suite_runs

pytestmark = pytest.mark.slow
SUITE = "toy-decoupled-test"
CONFIGFILES = ("config.yaml", "tests/configs/toy-decoupled-test.yaml")
TARGETS = (
    f"results/{SUITE}/figures/seed_sources.png",
    f"results/{SUITE}/summary.rst",
)
"""What the tests read (seed_sources.png's job writes seed_sources.csv; it needs lineage.csv,
per_seed.csv and relational.csv) and the summary the report opens with: not the suite's other
figures, which the toy-test run covers."""


@pytest.fixture(scope="module")
def decoupled_run(tmp_path_factory) -> Path:
    """The cut-down decoupled suite run once per session (xdist workers share it, read-only),
    its report.html built by the same Snakemake invocation (``--report-after-run``: no second
    start, workflow parse and DAG)."""

    def build(path: Path) -> None:
        workdir = copy_workflow(path)
        run_snakemake(
            workdir,
            *TARGETS,
            "--cores",
            "2",
            "--configfile",
            *CONFIGFILES,
            "--report",
            "report.html",
            "--report-after-run",
            timeout_s=2400,
        )

    return build_once(tmp_path_factory, "decoupled", build)


def _mechanisms(workdir: Path) -> list[str]:
    overlay = yaml.safe_load((workdir / CONFIGFILES[1]).read_text())
    return overlay["suites"][SUITE]["mechanisms"]


def _kinds(workdir: Path) -> dict[str, str]:
    """Run -> kind as the suite declares it (suite_runs on the overlay's suite; no validation, since
    the overlay's toy sizes replace config.yaml's only in this dict, not as Snakemake merges)."""
    overlay = yaml.safe_load((workdir / CONFIGFILES[1]).read_text())
    config = {"suite": SUITE, "suites": overlay["suites"], "results_dir": "results"}
    return {r.run: r.kind for r in suite_runs(config, SUITE)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_seeds_and_lineage(decoupled_run):
    res = decoupled_run / "results" / SUITE
    kinds = _kinds(decoupled_run)
    hub = res / "hub"
    step0 = {run: _sha(hub / run / "step0" / "model.safetensors") for run in kinds}
    data_runs = [r for r, k in kinds.items() if k == "data"]
    others = [r for r, k in kinds.items() if k != "data"]
    # Data variants share one init (weight_seed 0); every other run has its own.
    assert len({step0[r] for r in data_runs}) == 1
    assert len({step0[r] for r in others} | {step0[data_runs[0]]}) == len(others) + 1
    manifest = json.loads((hub / "toy-tiny-weight-seed22" / "manifest.json").read_text())
    assert (manifest["data_seed"], manifest["weight_seed"]) == (0, 22)

    lineage = pd.read_csv(res / "stats" / "lineage.csv", keep_default_na=False)
    assert not lineage["flagged"].astype(str).eq("True").any(), lineage[["run", "step", "flags"]]
    first = lineage[lineage["step"] == 0].set_index("run")
    # Each data variant's step 0 is identical to those of the other data variants, and only them.
    for run in data_runs:
        assert first.at[run, "identical_runs"] == ";".join(sorted(set(data_runs) - {run}))
    # Every checkpoint is closer to its own init than to any init of another group.
    later = lineage[lineage["step"] > 0]
    assert (later["cos_own_init"].astype(float) > later["best_init_cos"].astype(float)).all()


def test_seed_sources_matches_pandas(decoupled_run):
    res = decoupled_run / "results" / SUITE
    kinds = _kinds(decoupled_run)
    table = pd.read_csv(res / "stats" / "seed_sources.csv")
    assert table["excluded_runs"].isna().all()
    mechanisms = _mechanisms(decoupled_run)
    assert set(table["mechanism"]) == {*mechanisms, "relational"}
    n_runs = {kind: list(kinds.values()).count(kind) for kind in ("data", "weight", "full")}
    # 2 runs of each kind: a sample variance each, and C(4, 2) = 6 splits of data vs weight.
    assert n_runs == {"data": 2, "weight": 2, "full": 2}, n_runs
    n_splits = math.comb(n_runs["data"] + n_runs["weight"], n_runs["data"])
    for mechanism in mechanisms:
        per_seed = pd.read_csv(res / "stats" / mechanism / "per_seed.csv")
        per_seed["kind"] = per_seed["run"].map(kinds)
        for quantity in ("peak", "slope", "final_relative_depth"):
            row = table[(table["mechanism"] == mechanism) & (table["quantity"] == quantity)].iloc[0]
            by_kind = per_seed.groupby("kind")[quantity].var(ddof=1)
            for kind in ("data", "weight", "full"):
                assert row[f"{kind}_value"] == pytest.approx(by_kind[kind], abs=1e-6)
                assert row[f"{kind}_n"] == n_runs[kind]
            full, data, weight = by_kind["full"], by_kind["data"], by_kind["weight"]
            if full > 0:
                assert row["share_data"] == pytest.approx(
                    (full - weight) / full, rel=1e-4, abs=1e-6
                )
                assert row["share_weight"] == pytest.approx(
                    (full - data) / full, rel=1e-4, abs=1e-6
                )
            assert row["perm_n_splits"] == n_splits
    relational = table[table["mechanism"] == "relational"]
    assert set(relational["quantity"]) == {"lag_steps", "induction_drop"}
    # Pairs of runs: within a kind, and of different kinds.
    conv = table[table["quantity"] == "convergence_r"]
    pairs = {kind: math.comb(n, 2) for kind, n in n_runs.items()}
    across = math.comb(len(kinds), 2) - sum(pairs.values())
    assert (conv["data_n"] <= pairs["data"]).all() and (conv["across_n"] <= across).all()


def test_figure_and_report_section(decoupled_run):
    res = decoupled_run / "results" / SUITE
    import matplotlib.image

    image = matplotlib.image.imread(res / "figures" / "seed_sources.png")
    assert image.shape[0] > 300 and image.shape[1] > 600 and np.ptp(image[..., :3]) > 0
    report = (decoupled_run / "report.html").read_text(errors="replace")
    assert "Seed sources" in report
    assert "seed_sources.png" in report and "lineage.csv" in report
