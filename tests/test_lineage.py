"""The lineage check on planted cases: a run whose later checkpoints are another run's (exactly it
is flagged), runs that share step 0 by design in a hub-layout cache (none flagged), and the
fingerprint against a brute-force concatenation of the weights."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from support.fakehub import save_random_checkpoint, tiny_gpt_neox_config
from support.offline_hub import build_offline_cache

from mechgen.model.fingerprint import N_SAMPLE, SAMPLE_SEED, weight_fingerprint
from mechgen.stats import lineage
from mechgen.stats.lineage import cosine

STEPS = (0, 1, 2, 4)


def _load(step_dir: Path):
    from transformers import GPTNeoXForCausalLM

    return GPTNeoXForCausalLM.from_pretrained(step_dir)


def _train_like(
    run_dir: Path, init_seed: int, noise_seed: int, init_dir: Path | None = None
) -> None:
    """step0 = a random init (or a copy of ``init_dir``); step k = step0 + k x 0.002 x noise,
    noise from ``noise_seed``: a run that drifts slowly from its own init, like early training."""
    config = tiny_gpt_neox_config()
    if init_dir is None:
        save_random_checkpoint(run_dir / "step0", config, seed=init_seed)
    else:
        shutil.copytree(init_dir, run_dir / "step0")
    model = _load(run_dir / "step0")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(noise_seed)
    noise = {k: torch.randn(v.shape, generator=gen) for k, v in base.items()}
    for step in STEPS[1:]:
        model.load_state_dict({k: base[k] + step * 0.002 * noise[k] for k in base})
        model.save_pretrained(run_dir / f"step{step}")


def _records(root: Path, runs: list[str]) -> pd.DataFrame:
    rows = []
    for run in runs:
        for step in STEPS:
            d = root / run / f"step{step}"
            rows.append(
                {
                    "run": run,
                    "step": step,
                    "sha256": hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest(),
                    "sample": weight_fingerprint(_load(d))["sample"],
                }
            )
    return pd.DataFrame(rows)


def test_fingerprint_matches_brute_force(tmp_path):
    a = _load(save_random_checkpoint(tmp_path / "a", tiny_gpt_neox_config(), seed=1))
    b = _load(save_random_checkpoint(tmp_path / "b", tiny_gpt_neox_config(), seed=2))
    fp = weight_fingerprint(a)
    flat = torch.cat(
        [p.detach().reshape(-1) for _, p in sorted(a.named_parameters()) if p.ndim >= 2]
    ).numpy()
    positions = np.sort(
        np.random.default_rng(SAMPLE_SEED).choice(len(flat), size=N_SAMPLE, replace=False)
    )
    np.testing.assert_allclose(fp["sample"], flat[positions], rtol=1e-6)
    assert fp["n_entries"] == len(flat)
    assert fp["norm"] == pytest.approx(float(np.linalg.norm(flat.astype(np.float64))), rel=1e-5)
    # Independent inits: near-orthogonal samples; the same init: cosine 1.
    assert abs(cosine(fp["sample"], weight_fingerprint(b)["sample"])) < 0.15
    assert cosine(fp["sample"], fp["sample"]) == pytest.approx(1.0)


def test_planted_copy_flags_exactly_that_run(tmp_path):
    runs = ["toy-tiny-seed1", "toy-tiny-seed2", "toy-tiny-seed3"]
    for i, run in enumerate(runs, start=1):
        _train_like(tmp_path / run, init_seed=i, noise_seed=100 + i)
    # The defect: seed1's later checkpoints are seed2's.
    for step in STEPS[1:]:
        shutil.rmtree(tmp_path / runs[0] / f"step{step}")
        shutil.copytree(tmp_path / runs[1] / f"step{step}", tmp_path / runs[0] / f"step{step}")
    info = pd.DataFrame({"run": runs, "kind": "full", "init_group": runs})
    table = lineage.lineage_table(_records(tmp_path, runs), info)
    assert lineage.flagged_runs(table) == {runs[0]: "not_own_init"}
    row = table[(table["run"] == runs[0]) & (table["step"] == 1)].iloc[0]
    assert row["best_init_run"] == runs[1] and row["best_init_cos"] > 0.9
    assert row["cos_own_init"] < 0.2
    assert row["identical_runs"] == runs[1]  # visible, but not the copied-from run's fault
    # Every genuine run descends from its own init; consecutive checkpoints stay close.
    ok = table[table["run"] != runs[0]]
    assert (ok.loc[ok["step"] > 0, "cos_own_init"] > 0.9).all()
    assert (ok.loc[ok["step"] > 0, "cos_prev"] > 0.9).all()


def _hub_records(tmp_path: Path, repos: dict[str, Path]) -> pd.DataFrame:
    """Lay the runs out in a huggingface_hub cache; sha256 as the hub gives it (the cache
    record's LFS sha256), fingerprints from the snapshot's weights."""
    rows = []
    for run, run_dir in repos.items():
        info = build_offline_cache(
            tmp_path / "cache",
            f"EleutherAI/{run}",
            {f"step{s}": run_dir / f"step{s}" for s in STEPS},
        )
        for s in STEPS:
            rev = info["revisions"][f"step{s}"]
            rows.append(
                {
                    "run": run,
                    "step": s,
                    "sha256": rev["files"]["model.safetensors"]["sha256"],
                    "sample": weight_fingerprint(_load(Path(rev["snapshot"])))["sample"],
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture
def decoupled_hub(tmp_path):
    """Two data variants sharing one step 0 by design, and a weight variant with its own."""
    runs = tmp_path / "runs"
    _train_like(runs / "pythia-160m-data-seed1", init_seed=7, noise_seed=1)
    _train_like(
        runs / "pythia-160m-data-seed2",
        0,
        noise_seed=2,
        init_dir=runs / "pythia-160m-data-seed1" / "step0",
    )
    _train_like(runs / "pythia-160m-weight-seed1", init_seed=8, noise_seed=3)
    repos = {p.name: p for p in sorted(runs.iterdir())}
    info = pd.DataFrame(
        {
            "run": list(repos),
            "kind": ["data", "data", "weight"],
            "init_group": ["160m:data-init", "160m:data-init", "pythia-160m-weight-seed1"],
        }
    )
    return _hub_records(tmp_path, repos), info


def test_shared_step0_by_design_is_not_flagged(decoupled_hub):
    records, info = decoupled_hub
    table = lineage.lineage_table(records, info)
    assert lineage.flagged_runs(table) == {}
    step0 = table[table["step"] == 0].set_index("run")
    assert step0.at["pythia-160m-data-seed1", "identical_runs"] == "pythia-160m-data-seed2"
    assert step0.at["pythia-160m-weight-seed1", "identical_runs"] == ""


def test_wrong_expectations_are_flagged(decoupled_hub):
    records, info = decoupled_hub
    # Declared as separate inits although they share one; declared as sharing although not.
    wrong = info.assign(init_group=["a", "b", "b"])
    flagged = lineage.flagged_runs(lineage.lineage_table(records, wrong))
    assert flagged == {
        "pythia-160m-data-seed1": "shares_init_unexpectedly",
        "pythia-160m-data-seed2": "init_differs_from_group;shares_init_unexpectedly",
        "pythia-160m-weight-seed1": "init_differs_from_group",
    }


def test_read_sidecars(tmp_path):
    import json

    folder = tmp_path / "scores" / "toy-tiny-seed1"
    folder.mkdir(parents=True)
    ok = {"run": "toy-tiny-seed1", "step": 32, "status": "ok", "sha256": "ab"}
    ok["weight_fingerprint"] = {"sample": [0.5, -0.25]}
    (folder / "step32.json").write_text(json.dumps(ok))
    (folder / "step64.json").write_text(json.dumps({"status": "missing"}))
    (folder / "step0.json").write_text(json.dumps({"status": "ok", "sha256": "cd"}))
    table = lineage.read_sidecars(sorted(folder.glob("*.json"))).sort_values("step")
    assert table["step"].tolist() == [0, 32]
    assert table["run"].tolist() == ["toy-tiny-seed1"] * 2
    assert table["sample"].iloc[0] is None and table["sample"].iloc[1] == [0.5, -0.25]
