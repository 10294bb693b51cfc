"""The whole DAG, really run by Snakemake on the toy-test suite, checked against independent
computations: a brute-force scorer on the saved checkpoints, a pandas max over heads, and the
same checkpoints served as `EleutherAI/pythia-14m-seed1` from an offline Hugging Face cache."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import TOY_TEST_CONFIGFILES, copy_workflow, run_snakemake

from mechgen import mechanisms
from mechgen.sources.evaltext import read_sentence_file

SUITE = "toy-test"
pytestmark = pytest.mark.slow


def _results(workdir: Path) -> Path:
    return workdir / "results" / SUITE


def _brute_force_one_back(checkpoint: Path, token_ids: list[list[int]]) -> np.ndarray:
    """Per-head mean over sentences of mean_{i>=1} A[i, i-1]: one sentence at a time, the full
    causal LM with output_attentions, plain Python loops (the reference study's method)."""
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    totals = np.zeros((n_layers, n_heads))
    n = 0
    with torch.no_grad():
        for ids in token_ids:
            if len(ids) < 2:
                continue
            out = model(torch.tensor([ids]), output_attentions=True)
            for layer in range(n_layers):
                for head in range(n_heads):
                    attn = out.attentions[layer][0, head]
                    totals[layer, head] += float(torch.diagonal(attn, offset=-1).mean())
            n += 1
    return totals / n


def test_heads_table_matches_brute_force(toy_test_run):
    res = _results(toy_test_run)
    heads = pd.read_parquet(res / "heads.parquet")
    config = yaml.safe_load((toy_test_run / "tests/configs/toy-test.yaml").read_text())
    steps = config["toy"]["schedule"]
    size = config["toy"]["sizes"]["tiny"]
    runs = sorted(heads["run"].unique())
    assert runs == ["toy-tiny-seed1", "toy-tiny-seed2"]
    # Tidy: exactly one row per run x step x layer x head, 0-indexed.
    assert len(heads) == len(runs) * len(steps) * size["n_layers"] * size["n_heads"]
    assert not heads.duplicated(["run", "step", "layer", "head"]).any()
    assert sorted(heads["layer"].unique()) == list(range(size["n_layers"]))
    assert sorted(heads["head"].unique()) == list(range(size["n_heads"]))
    assert (heads["tokens_seen"] == heads["step"] * config["suites"][SUITE]["tokens_per_step"]).all()

    run, step = "toy-tiny-seed2", steps[-1]
    # A toy suite's runs share one token file (one tokenizer).
    token_ids = json.loads((res / "eval" / "tokens" / "suite.json").read_text())["token_ids"]
    expected = _brute_force_one_back(res / "hub" / run / f"step{step}", token_ids)
    got = heads[(heads["run"] == run) & (heads["step"] == step)].sort_values(["layer", "head"])
    np.testing.assert_allclose(
        got["one_back"].to_numpy().reshape(expected.shape), expected, atol=1e-5
    )

    # The sidecar records what was scored: the weight blob's sha256 and the sentence count.
    sidecar = json.loads((res / "scores" / run / f"step{step}.json").read_text())
    weights = res / "hub" / run / f"step{step}" / "model.safetensors"
    assert sidecar["status"] == "ok"
    assert sidecar["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert sidecar["n_sentences"] == len([t for t in token_ids if len(t) >= 2])


def test_trajectories_are_the_max_over_heads(toy_test_run):
    res = _results(toy_test_run)
    heads = pd.read_parquet(res / "heads.parquet")
    traj = pd.read_parquet(res / "trajectories.parquet")
    # The CSV for people is the same table to 6 significant digits.
    people = pd.read_csv(res / "trajectories.csv")
    assert list(people.columns) == list(traj.columns)
    np.testing.assert_allclose(people["value"], traj["value"], rtol=5e-6)
    for (run, step), group in heads.groupby(["run", "step"]):
        row = traj[(traj["run"] == run) & (traj["step"] == step)]
        assert len(row) == 1
        best = group.loc[group["one_back"].idxmax()]
        assert row["value"].iloc[0] == pytest.approx(best["one_back"], abs=1e-12)
        assert (row["argmax_layer"].iloc[0], row["argmax_head"].iloc[0]) == (best["layer"], best["head"])


def test_one_back_rises_during_training(toy_test_run):
    traj = pd.read_csv(_results(toy_test_run) / "trajectories.csv")
    for _, run in traj.groupby("run"):
        run = run.sort_values("step")
        assert run["value"].iloc[-1] > run["value"].iloc[0] + 0.02


def test_report_embeds_every_figure(toy_test_run, tmp_path):
    work = copy_workflow(tmp_path / "w")
    # Reuse the finished run: the report only needs the outputs and Snakemake's metadata.
    import shutil

    shutil.copytree(toy_test_run / "results", work / "results", symlinks=True)
    shutil.copytree(toy_test_run / ".snakemake", work / ".snakemake", symlinks=True)
    report = work / "results" / SUITE / "report.html"
    run_snakemake(work, "--configfile", *TOY_TEST_CONFIGFILES, "--report", str(report))
    assert "<title>Snakemake Report</title>" in report.read_text()
    retitle = subprocess.run(
        [sys.executable, "-m", "mechgen", "retitle-report", str(report)],
        cwd=work, capture_output=True, text=True, check=False,
    )
    assert retitle.returncode == 0, retitle.stderr
    html = report.read_text()
    assert f"<title>mechgen report, suite {SUITE}</title>" in html
    assert html.count("<title>") == 1 and "Snakemake Report</title>" not in html
    figures = sorted((work / "results" / SUITE / "figures").glob("*.png"))
    # 6 of the analyses, 4 of the relational axes, the mechanism profile
    assert len(figures) == 11
    # One figure per catalog mechanism, each in its own report section.
    per_mechanism = sorted((work / "results" / SUITE / "figures" / "mechanisms").glob("*.png"))
    assert sorted(p.stem for p in per_mechanism) == sorted(mechanisms.names())
    for name in mechanisms.names():
        assert f"Mechanism: {name}" in html, name
    # The layer-unit mechanism went through the run: layers.parquet (2 runs x 4 checkpoints x 2
    # layers, each value the sidecar's), and its tables take the layers as units (head 0).
    res = _results(toy_test_run)
    layers = pd.read_parquet(res / "layers.parquet")
    assert len(layers) == 2 * 4 * 2 and set(layers["layer"]) == {0, 1}
    for row in layers.itertuples():
        sidecar = json.loads((res / "scores" / row.run / f"step{row.step}.json").read_text())
        assert sidecar["layer_scores"]["in_context_retrieval"][row.layer] == pytest.approx(
            row.in_context_retrieval, abs=0
        )
    per_seed = pd.read_csv(res / "stats" / "in_context_retrieval" / "per_seed.csv")
    assert len(per_seed) == 2 and (per_seed["final_head"] == 0).all()
    for fig in figures + per_mechanism:
        # Snakemake embeds each registered result base64-encoded: the exact bytes must be there.
        encoded = base64.b64encode(fig.read_bytes()).decode()
        assert encoded[:2000] in html, f"{fig.name} is not embedded in the report"


def test_hf_source_resolves_toy_checkpoints_from_an_offline_cache(toy_test_run, tmp_path, monkeypatch):
    """The real download code (huggingface_hub, revision="stepN", HF_HUB_OFFLINE=1) on a cache
    built from the toy checkpoints gives the same scores as reading them from disk."""
    from support.offline_hub import build_offline_cache

    res = _results(toy_test_run)
    hub_run = res / "hub" / "toy-tiny-seed1"
    trained = sorted(int(p.name[4:]) for p in hub_run.glob("step*"))
    # The first and the last checkpoint scored, one between them absent from the cache: a
    # scoring job each is what this test pays for.
    steps = [trained[0], trained[1], trained[-1]]
    hf_home = tmp_path / "hf"
    build_offline_cache(
        hf_home / "hub",
        "EleutherAI/pythia-14m-seed1",
        {f"step{s}": hub_run / f"step{s}" for s in steps if s != steps[1]},  # one revision absent
        weight_format="pytorch",
    )
    work = copy_workflow(tmp_path / "w")
    sentences = work / "sentences.txt"  # the toy sentences hold no newline: one per line is exact
    sentences.write_text("\n".join(read_sentence_file(res / "eval" / "sentences.json")) + "\n")
    overlay = work / "hf.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "suite": "offline",
                "suites": {
                    "offline": {
                        "source": "hf",
                        "model_prefix": "pythia-",
                        "repo_template": "EleutherAI/pythia-{size}-seed{seed}",
                        "sizes": ["14m"],
                        "seeds": [1],
                        "schedule": steps,
                        "tokens_per_step": 1024,
                        "tokenizer_revision": f"step{steps[-1]}",
                        "eval": {"kind": "file", "path": str(sentences)},
                    }
                },
                "scoring": {"delete_weights": True},
            }
        )
    )
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    run_snakemake(
        work, "results/offline/heads.parquet", "--cores", "2", "--configfile", "config.yaml", str(overlay)
    )
    out = work / "results" / "offline"
    got = pd.read_parquet(out / "heads.parquet")
    want = pd.read_parquet(res / "heads.parquet")
    want = want[want["run"] == "toy-tiny-seed1"]
    missing = pd.read_csv(out / "missing.csv")
    assert missing["step"].tolist() == [steps[1]]
    assert sorted(got["step"].unique()) == [s for s in steps if s != steps[1]]
    merged = got.merge(want, on=["step", "layer", "head"], suffixes=("_hf", "_toy"))
    assert len(merged) == len(got)
    for metric in ("one_back", "self_attention", "entropy", "clipped_distance"):
        np.testing.assert_allclose(merged[f"{metric}_hf"], merged[f"{metric}_toy"], rtol=1e-6, atol=1e-7)
    sidecar = json.loads((out / "scores" / "pythia-14m-seed1" / f"step{steps[-1]}.json").read_text())
    assert sidecar["repo_id"] == "EleutherAI/pythia-14m-seed1"
    assert len(sidecar["commit"]) == 40 and sidecar["weight_format"] == "pytorch"
    # Streamed: the weight blob is gone from the cache after scoring; config.json stays.
    repo = hf_home / "hub" / "models--EleutherAI--pythia-14m-seed1"
    assert not list(repo.glob("snapshots/*/pytorch_model.bin"))
    assert list(repo.glob("snapshots/*/config.json"))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
