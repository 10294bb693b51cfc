"""The relational and configurational axes, really run by Snakemake on the toy-test suite
(the session's ``toy_test_run``), checked against independent computations: induction scores
from ``output_attentions`` of the saved checkpoints on ids regenerated from the sidecar, onsets
and layer order from a pandas max over heads, the induction verdicts of the `relational` rule on
planted heads with a known answer, CKA from its HSIC formula, and Snakemake's plan when only
analysis parameters change."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import (
    TOY_TEST_CONFIGFILES,
    copy_run,
    logged_jobs,
    run_snakemake,
    sidecar_first_halves,
)

os.environ["HF_HUB_OFFLINE"] = "1"

SUITE = "toy-test"
pytestmark = pytest.mark.slow


def _results(workdir: Path) -> Path:
    return workdir / "results" / SUITE


def _final_step(workdir: Path) -> int:
    return int(pd.read_parquet(_results(workdir) / "heads.parquet")["step"].max())


def test_induction_column_matches_brute_force(toy_test_run: Path) -> None:
    from transformers import GPTNeoXForCausalLM

    torch.set_num_threads(1)
    results = _results(toy_test_run)
    heads = pd.read_parquet(results / "heads.parquet")
    run, step = "toy-tiny-seed1", _final_step(toy_test_run)
    sidecar = json.loads((results / "scores" / run / f"step{step}.json").read_text())
    sequences = sidecar["relational"]["sequences"]
    half = sequences["half_length"]
    first = sidecar_first_halves(sequences)
    model = GPTNeoXForCausalLM.from_pretrained(
        results / "hub" / run / f"step{step}", attn_implementation="eager"
    ).eval()
    ids = torch.from_numpy(np.concatenate([first, first], axis=1))
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    rows = heads[(heads["run"] == run) & (heads["step"] == step)].set_index(["layer", "head"])
    for layer, attention in enumerate(out.attentions):
        for head in range(attention.shape[1]):
            expected = np.mean(
                [attention[n, head, p, p - half + 1].item() for n in range(len(first)) for p in range(half, 2 * half)]
            )  # fmt: skip
            assert rows.at[(layer, head), "induction"] == pytest.approx(expected, abs=1e-5)
    predicted = out.logits[:, half : 2 * half - 1].argmax(-1)
    copying = (predicted == ids[:, half + 1 :]).float().mean().item()
    assert rows["copying_accuracy"].unique().tolist() == [pytest.approx(copying)]
    # Relational scores cost: recorded per job, next to the 1-back scoring time.
    assert (
        sidecar["relational"]["seconds_total"] > 0 and sidecar["relational"]["one_back_seconds"] > 0
    )


def test_relational_table_agrees_with_a_pandas_max_over_heads(toy_test_run: Path) -> None:
    from mechgen.axes.developmental import onset_thresholds, threshold_onset

    results = _results(toy_test_run)
    heads = pd.read_parquet(results / "heads.parquet")
    table = pd.read_csv(results / "stats" / "relational.csv").set_index("run")
    config = yaml.safe_load((toy_test_run / "config.yaml").read_text())
    thresholds = onset_thresholds(**config["analysis"]["onset_thresholds"])
    assert sorted(table.index) == sorted(heads["run"].unique())  # one row per seed
    for run, run_heads in heads.groupby("run"):
        onsets = {}
        best = {}
        for metric in ("one_back", "induction"):
            per_step = run_heads.sort_values(["step", "layer", "head"])
            maxima = per_step.groupby("step")[metric].max()
            onsets[metric] = threshold_onset(
                maxima.index.to_numpy(), maxima.to_numpy(), thresholds
            )[0]
            final = per_step[per_step["step"] == per_step["step"].max()]
            best[metric] = final.loc[final[metric].idxmax()]
        row = table.loc[run]
        # The CSV carries 6 significant digits (mechgen.tables.outputs.CSV_FLOAT_FORMAT).
        assert row["lag_steps"] == pytest.approx(
            onsets["induction"] - onsets["one_back"], rel=1e-5, nan_ok=True
        )
        assert row["induction_layer"] == best["induction"]["layer"]
        assert row["one_back_layer"] == best["one_back"]["layer"]
        earlier = best["one_back"]["layer"] < best["induction"]["layer"]
        assert bool(row["one_back_earlier_layer"]) == earlier
    sizes = pd.read_csv(results / "stats" / "relational_sizes.csv")
    holds = sizes[sizes["relation"] == "one_back_earlier_layer"]
    assert int(holds["n_holds"].sum()) == int(table["one_back_earlier_layer"].sum())


def test_relational_rule_classifies_planted_induction_heads(
    toy_test_run: Path, tmp_path: Path
) -> None:
    """The `relational` rule rerun on a per-head table whose final step holds planted heads.

    The documented verdicts (mechgen.scoring.circuit): an induction head is formed when the strongest
    head scores at least 2 x the uniform level and its non-repeating control stays below half
    its score; positional when the control reaches half. Planted close to both limits, on
    either side, so that another multiple or fraction changes a verdict:
    seed 1, layer 1 head 0: 2.2 x uniform, control 0.45 x score -> formed, not positional;
    seed 2, layer 0 head 1: 2.5 x uniform, control 0.55 x score -> positional, not formed.
    The strongest 1-back head: layer 0 (seed 1), layer 1 (seed 2).
    """
    workdir = copy_run(toy_test_run, tmp_path / "work")
    results = _results(workdir)
    heads = pd.read_parquet(results / "heads.parquet")
    final = _final_step(workdir)
    sidecar = json.loads((results / "scores" / "toy-tiny-seed1" / f"step{final}.json").read_text())
    half = sidecar["relational"]["sequences"]["half_length"]
    uniform = float(np.mean(1.0 / (np.arange(half, 2 * half) + 1)))  # 1/(p+1), p = L..2L-1
    planted = {
        # run: (induction head, score / uniform, control / score, 1-back head)
        "toy-tiny-seed1": ((1, 0), 2.2, 0.45, (0, 1)),
        "toy-tiny-seed2": ((0, 1), 2.5, 0.55, (1, 1)),
    }
    at_final = heads["step"] == final
    for run, (induction_head, multiple, fraction, one_back_head) in planted.items():
        rows = at_final & (heads["run"] == run)
        heads.loc[rows, ["induction", "induction_control"]] = uniform  # no head stands out
        heads.loc[rows, "one_back"] = 0.1
        layer, head = induction_head
        at = rows & (heads["layer"] == layer) & (heads["head"] == head)
        heads.loc[at, "induction"] = multiple * uniform
        heads.loc[at, "induction_control"] = fraction * multiple * uniform
        layer, head = one_back_head
        heads.loc[rows & (heads["layer"] == layer) & (heads["head"] == head), "one_back"] = 0.9
    heads.to_parquet(results / "heads.parquet")

    target = f"results/{SUITE}/stats/relational.csv"
    log = run_snakemake(workdir, "--cores", "1", target, "--configfile", *TOY_TEST_CONFIGFILES)
    assert logged_jobs(log.stdout + log.stderr) == ["relational"]
    table = pd.read_csv(results / "stats" / "relational.csv").set_index("run")
    formed, positional = table.loc["toy-tiny-seed1"], table.loc["toy-tiny-seed2"]
    assert (formed["induction_layer"], formed["induction_head"]) == (1, 0)
    assert formed["induction_uniform"] == pytest.approx(uniform)
    assert formed["induction_formed"] in (True, "True")
    assert formed["induction_positional"] in (False, "False")
    assert formed["one_back_earlier_layer"] in (True, "True")
    assert (positional["induction_layer"], positional["induction_head"]) == (0, 1)
    assert positional["induction_formed"] in (False, "False")
    assert positional["induction_positional"] in (True, "True")
    assert positional["one_back_earlier_layer"] in (False, "False")
    assert positional["expected_order"] in (False, "False")  # no induction head, no order


def test_detail_step_and_configurational_outputs(toy_test_run: Path) -> None:
    from mechgen.tables.circuit_files import load_circuit

    results = _results(toy_test_run)
    final = _final_step(toy_test_run)
    runs = sorted(p.name for p in (results / "scores").iterdir() if p.is_dir())
    for run in runs:
        for path in (results / "scores" / run).glob("step*.circuit.npz"):
            step = int(path.name[4:].split(".")[0])
            arrays = load_circuit(path).arrays
            # Composition, ablation and CKA outputs only at the detail (final) step.
            assert ("k_composition" in arrays) == (step == final), path
            assert ("cka_outputs" in arrays) == (step == final), path
    table = pd.read_csv(results / "stats" / "configurational.csv")
    assert len(table) == len(runs) * (len(runs) - 1)
    row = table.iloc[0]
    a = load_circuit(results / "scores" / row["run_a"] / f"step{final}.circuit.npz").arrays
    b = load_circuit(results / "scores" / row["run_b"] / f"step{final}.circuit.npz").arrays

    def hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
        # CKA through centred Gram matrices (Kornblith et al. 2019, eq. 3), not feature space.
        n = len(x)
        centring = np.eye(n) - np.ones((n, n)) / n
        k = centring @ (x @ x.T) @ centring
        l = centring @ (y @ y.T) @ centring
        return float(np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)))

    x, y = a["cka_outputs"][0].astype(float), b["cka_outputs"][0].astype(float)
    # The CSV carries 6 significant digits.
    assert row["cka"] == pytest.approx(hsic_cka(x, y), rel=1e-5)
    # The null: B's seeded random heads (``cka_random``), not the other mechanisms' heads.
    assert a["cka_random"][0] == False and a["cka_random"][1:].any()
    null = [hsic_cka(x, other.astype(float)) for other in b["cka_outputs"][b["cka_random"]]]
    assert row["cka_null_mean"] == pytest.approx(np.mean(null), rel=1e-5)
    # The p-value is counted on the full-precision CKA; the CSV's is rounded.
    assert row["cka_p"] == pytest.approx(
        (1 + sum(v >= hsic_cka(x, y) for v in null)) / (1 + len(null)), rel=1e-5
    )
    stability = pd.read_csv(results / "stats" / "configurational_stability.csv")
    assert set(stability["run"]) == set(runs)


def test_analysis_params_plan_no_scoring_and_a_detail_step_replans_the_toy_runs(
    toy_test_run: Path, tmp_path: Path
) -> None:
    workdir = copy_run(toy_test_run, tmp_path / "work")
    overlay = workdir / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"relational": {"analysis": {"n_null": 200}}}))
    dry = run_snakemake(
        workdir, "-n", "--cores", "1", "--configfile", *TOY_TEST_CONFIGFILES, str(overlay)
    )
    planned = logged_jobs(dry.stdout + dry.stderr)
    assert "relational" in planned and not any(job.startswith("score") for job in planned)

    # Adding a detail step flips `detail` for that step only. A toy suite scores a run's
    # checkpoints in one job (rule score_run), so each run's job is planned again. In a suite
    # with one `score` job per checkpoint only the flipped checkpoint is planned again:
    # tests/test_reruns.py::test_adding_a_detail_step_rescores_only_that_checkpoint.
    detail = {"relational": {"detail_steps": ["final", 128]}}
    overlay.write_text(yaml.safe_dump(detail))
    dry = run_snakemake(
        workdir, "-n", "--cores", "1", "--configfile", *TOY_TEST_CONFIGFILES, str(overlay)
    )
    scores = [job for job in logged_jobs(dry.stdout + dry.stderr) if job.startswith("score")]
    assert scores == ["score_run[run=toy-tiny-seed1]", "score_run[run=toy-tiny-seed2]"]
