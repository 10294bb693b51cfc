"""The toy GPT-2 suite through Snakemake: rule toy_train builds GPT-2 runs with ``checkpoint-N``
revisions (checked bitwise against mechgen.sources.toy called directly), and, once the GPT-2 adapter is
merged, the whole DAG scores them through the ``hf`` path (offline cache, revision="checkpoint-N")
against a brute-force GPT2LMHeadModel forward."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import copy_workflow, run_snakemake
from safetensors.torch import load_file

from mechgen.sources import toy, toytext

pytestmark = pytest.mark.slow

SUITE = "toy-gpt2-test"
RUN = "toy-gpt2-tiny-seed1"


def _overlay() -> dict:
    """tests/configs/toy-test.yaml's toy settings, one GPT-2 run, trained 40 steps with 3
    checkpoints: the tests compare the rule's training with a direct one bit for bit and the
    scores of a checkpoint with a brute-force forward, neither of which needs a trained model;
    the middle checkpoint is the one left out of the hub cache."""
    base = yaml.safe_load((Path(__file__).parent / "configs" / "toy-test.yaml").read_text())
    spec = dict(base["suites"]["toy-test"])
    spec.update(architecture="gpt2", model_prefix="toy-gpt2-", seeds=[1])
    toy_settings = dict(base["toy"], schedule=[0, 10, 40])
    toy_settings["training"] = dict(base["toy"]["training"], steps=40, warmup_steps=4)
    return {"suite": SUITE, "suites": {SUITE: spec}, "toy": toy_settings}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    work = copy_workflow(tmp_path_factory.mktemp("toy-gpt2") / "w")
    overlay = _overlay()
    (work / "gpt2.yaml").write_text(yaml.safe_dump(overlay))
    run_snakemake(
        work,
        f"results/{SUITE}/hub/{RUN}/manifest.json",
        "--cores", "1", "--configfile", "config.yaml", "gpt2.yaml",
    )
    return work, overlay


def test_toy_train_rule_saves_gpt2_checkpoint_revisions(trained, tmp_path) -> None:
    work, overlay = trained
    hub_run = work / "results" / SUITE / "hub" / RUN
    steps = sorted(overlay["toy"]["schedule"])
    assert sorted(p.name for p in hub_run.iterdir() if p.is_dir()) == sorted(
        f"checkpoint-{s}" for s in steps
    )
    manifest = json.loads((hub_run / "manifest.json").read_text())
    assert manifest["architecture"] == "gpt2"
    config = json.loads((hub_run / f"checkpoint-{steps[-1]}" / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    # The overlay's training keys reached the rule (the others come from config.yaml's toy:).
    assert {k: manifest["training"][k] for k in overlay["toy"]["training"]} == overlay["toy"]["training"]
    # The same training called directly (same tokenizer, seed, settings, one thread): the
    # rule passed the architecture and everything else through unchanged, bit for bit.
    tokenizer_dir = work / "results" / SUITE / "tokenizer"
    direct = tmp_path / "direct"
    toy.train_run(
        tokenizer_dir, direct, manifest["size_spec"], 1, manifest["training"],
        steps, manifest["vocab_size"], threads=1, progress=False, architecture="gpt2",
    )
    for step in (steps[0], steps[-1]):
        a = load_file(str(hub_run / f"checkpoint-{step}" / "model.safetensors"))
        b = load_file(str(direct / f"checkpoint-{step}" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dry_run_plans_one_scoring_job_per_run(trained) -> None:
    # A toy suite (GPT-2 too) scores all the checkpoints of a run in one score_run job.
    work, overlay = trained
    result = run_snakemake(work, "-n", "--configfile", "config.yaml", "gpt2.yaml")
    log = result.stdout + result.stderr
    table = log.split("Job stats:")[-1]
    counts = {
        fields[0]: int(fields[1])
        for fields in (line.split() for line in table.splitlines())
        if len(fields) == 2 and fields[1].isdigit()
    }
    spec = overlay["suites"][SUITE]
    assert counts["score_run"] == len(spec["sizes"]) * len(spec["seeds"]) == 1
    assert "score" not in counts
    scored = [p for p in log.splitlines() if p.strip().startswith("output:") and ".parquet" in p]
    run_outputs = [line for line in scored if f"scores/{RUN}/step" in line]
    assert len(run_outputs) == 1  # one job's output line names every checkpoint's table
    assert sorted(
        int(part.split("/step")[1].split(".")[0])
        for part in run_outputs[0].split(": ", 1)[1].split(", ")
        if part.endswith(".parquet")
    ) == sorted(overlay["toy"]["schedule"])


def _brute_force_one_back(checkpoint: Path, token_ids: list[list[int]]) -> np.ndarray:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(checkpoint, attn_implementation="eager").eval()
    layers, heads = model.config.n_layer, model.config.n_head
    totals, n = np.zeros((layers, heads)), 0
    with torch.no_grad():
        for ids in token_ids:
            if len(ids) < 2:
                continue
            out = model(torch.tensor([ids]), output_attentions=True)
            for layer in range(layers):
                for head in range(heads):
                    totals[layer, head] += float(
                        torch.diagonal(out.attentions[layer][0, head].double(), offset=-1).mean()
                    )
            n += 1
    return totals / n


def test_toy_gpt2_end_to_end_through_the_hf_path(trained, tmp_path, monkeypatch) -> None:
    """The toy GPT-2 run scored by the whole DAG through the hf path."""
    work, overlay = trained
    hub_run = work / "results" / SUITE / "hub" / RUN
    steps = sorted(overlay["toy"]["schedule"])

    from support.offline_hub import build_offline_cache, run_revisions

    hf_home = tmp_path / "hf"
    absent = steps[1]
    build_offline_cache(
        hf_home / "hub", "toy-org/toy-gpt2-tiny-seed1",
        run_revisions(hub_run, "gpt2", steps=[s for s in steps if s != absent]),
        weight_format="pytorch", legacy_pythia_keys=False,
    )
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(toytext.heldout_sentences(24)) + "\n")
    hf_overlay = tmp_path / "hf.yaml"
    hf_overlay.write_text(yaml.safe_dump({
        "suite": "offline-gpt2",
        "suites": {"offline-gpt2": {
            "source": "hf",
            "architecture": "gpt2",
            "model_prefix": "toy-gpt2-",
            "repo_template": "toy-org/toy-gpt2-{size}-seed{seed}",
            "sizes": ["tiny"],
            "seeds": [1],
            "schedule": [absent, steps[-1]],  # the checked step and the absent one
            "tokens_per_step": 512,
            "eval": {"kind": "file", "path": str(sentences)},
            "relational": {"half_length": 32, "token_hi": 66, "n_sequences": 8},
        }},
    }))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    run_snakemake(work, "results/offline-gpt2/heads.parquet", "--cores", "2",
                  "--configfile", "config.yaml", str(hf_overlay))
    out = work / "results" / "offline-gpt2"
    assert pd.read_csv(out / "missing.csv")["step"].tolist() == [absent]
    heads = pd.read_parquet(out / "heads.parquet")
    token_ids = json.loads((out / "eval" / "tokens" / f"{RUN}.json").read_text())["token_ids"]
    expected = _brute_force_one_back(hub_run / f"checkpoint-{steps[-1]}", token_ids)
    got = heads[heads["step"] == steps[-1]].sort_values(["layer", "head"])["one_back"]
    np.testing.assert_allclose(got.to_numpy().reshape(expected.shape), expected, rtol=1e-6, atol=1e-6)
    sidecar = json.loads((out / "scores" / RUN / f"step{steps[-1]}.json").read_text())
    assert sidecar["revision"] == f"checkpoint-{steps[-1]}" and sidecar["weight_format"] == "pytorch"
    assert os.environ.get("HF_HUB_OFFLINE") in (None, "1")
