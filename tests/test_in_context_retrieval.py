"""The in-context retrieval score (mechgen.mechanisms.in_context_retrieval), a layer-unit
mechanism, from the model to layers.parquet and through the analysis.

- the per-layer accuracy the scoring passes read with block hooks (KV-cached second halves)
  equals a brute-force logit lens on transformers' own ``output_hidden_states`` of the full
  [A, A] sequences, on a random GPT-NeoX and a random GPT-2 (exactly: it is a count), and on
  the hand-built induction model of test_relational, whose last layer copies every token;
- the aggregate turns the sidecars' ``layer_scores`` into the layers.parquet rows worked out by
  hand;
- a hand-built layer table through the analysis gives the qualifying layers, the strongest
  layer and the onset worked out by hand, and the head-only analyses say "not applicable".
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from mechgen import mechanisms
from mechgen.mechanisms import NullContext
from mechgen.schema import LAYER_COLUMNS
from mechgen.scoring.circuit import control_half
from mechgen.scoring.relational import make_repeated_sequences, score_induction_with_control
from mechgen.stats import crossmech
from mechgen.tables.aggregate import layer_table

VOCAB = 40
HALF = 10
N_SEQUENCES = 12


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (layernorm gains around 1), float32-representable values in a
    float64 model: the cached and the full passes then agree to float64 rounding."""
    torch.manual_seed(seed)
    model = model.to(torch.float64)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            values = torch.randn_like(parameter) * 0.5
            if parameter.ndim == 1 and ("ln" in name or "norm" in name) and "weight" in name:
                values = values + 1.0
            parameter.copy_(values.float())
    return model.eval()


def random_neox() -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return _randomise(GPTNeoXForCausalLM(config), seed=1)


def random_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_inner=48,
        attn_implementation="eager",
    )
    return _randomise(GPT2LMHeadModel(config), seed=2)


def brute_force_retrieval(model: torch.nn.Module, first_half: np.ndarray) -> np.ndarray:
    """Per layer, from one uncached pass over the whole [A, A] sequences with
    ``output_hidden_states``: hidden_states[l + 1] is the residual stream after layer l, except
    the last entry, which transformers returns with the final layernorm already applied; the
    other entries go through the final layernorm here. Then the LM head, the logits of the L
    first-half ids, and a hit where the argmax id is the next token, at p = L..2L-2."""
    ids = torch.from_numpy(np.concatenate([first_half, first_half], axis=1))
    n, half = first_half.shape
    final_norm = model.base_model.get_submodule(
        "ln_f" if isinstance(model, GPT2LMHeadModel) else "final_layer_norm"
    )
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        n_layers = len(hidden) - 1
        out = np.zeros(n_layers)
        for layer in range(n_layers):
            x = hidden[layer + 1]
            if layer < n_layers - 1:
                x = final_norm(x)
            logits = model.get_output_embeddings()(x)  # [N, 2L, vocab]
            hits = 0
            for row in range(n):
                candidates = ids[row, :half]
                for p in range(half, 2 * half - 1):
                    best = candidates[int(logits[row, p, candidates].argmax())]
                    hits += int(best == ids[row, p + 1])
            out[layer] = hits / (n * (half - 1))
    return out


def _retrieval(model: torch.nn.Module, batch_size: int | None = 2) -> tuple[np.ndarray, np.ndarray]:
    sequences = make_repeated_sequences(0, VOCAB, N_SEQUENCES, HALF, seed=3)
    induction, control = score_induction_with_control(
        model, sequences, control_half(sequences), batch_size, copying=False
    )
    assert control.retrieval is None  # the non-repeating control is not a retrieval task
    return induction.retrieval, brute_force_retrieval(model, sequences.first_half)


@pytest.mark.parametrize("build", [random_neox, random_gpt2], ids=["gpt_neox", "gpt2"])
def test_retrieval_equals_a_brute_force_logit_lens(build) -> None:
    model = build()
    scored, expected = _retrieval(model)
    assert scored.shape == (3,)
    np.testing.assert_array_equal(scored, expected)
    # Not every layer at the same value: the comparison can tell layers apart. (With N = 12,
    # L = 10 both families' counts change when the last layer's block output is taken as
    # already normalised, i.e. without the final layernorm.)
    assert len(set(expected.tolist())) > 1


def test_retrieval_of_the_hand_built_induction_model() -> None:
    """Its last layer copies every repeated token (copying accuracy 1), so the logit lens after
    it reads every next token; layer 0 has not copied yet."""
    from test_relational import VOCAB as HAND_VOCAB
    from test_relational import build_induction_model

    model = build_induction_model()
    sequences = make_repeated_sequences(0, HAND_VOCAB, 4, 8, seed=0)
    induction, _ = score_induction_with_control(
        model, sequences, control_half(sequences), None, copying=True
    )
    expected = brute_force_retrieval(model, sequences.first_half)
    np.testing.assert_array_equal(induction.retrieval, expected)
    assert induction.copying_accuracy == 1.0
    assert induction.retrieval[-1] == 1.0
    assert induction.retrieval[0] < 1.0


# ---- the aggregate: sidecars -> layers.parquet ------------------------------------------


def _sidecar(path, run: str, seed: int, step: int, values: list[float] | None) -> str:
    record = {
        "suite": "toy",
        "run": run,
        "step": step,
        "tokens_seen": step * 100,
        "status": "ok" if values is not None else "missing",
    }
    if values is not None:
        record["layer_scores"] = {"in_context_retrieval": values}
    file = path / f"{run}-step{step}.json"
    file.write_text(json.dumps(record))
    return str(file)


def test_layer_table_from_sidecars(tmp_path) -> None:
    heads = pd.DataFrame(
        {
            "suite": "toy",
            "model": "toy-small",
            "size": "small",
            "seed": [0, 1],
            "run": ["toy-small-seed0", "toy-small-seed1"],
            "n_params": 1234,
            "n_layers": 2,
            "n_heads": 4,
        }
    )
    sidecars = [
        _sidecar(tmp_path, "toy-small-seed1", 1, 10, [0.5, 0.75]),
        _sidecar(tmp_path, "toy-small-seed0", 0, 10, [0.25, 1.0]),
        _sidecar(tmp_path, "toy-small-seed0", 0, 0, [0.0, 0.125]),
        _sidecar(tmp_path, "toy-small-seed1", 1, 0, None),  # missing: no rows
    ]
    table = layer_table(sidecars, heads)
    assert list(table.columns) == [*LAYER_COLUMNS, "in_context_retrieval"]
    expected = pd.DataFrame(
        {
            "suite": "toy",
            "model": "toy-small",
            "size": "small",
            "seed": [0, 0, 0, 0, 1, 1],
            "run": ["toy-small-seed0"] * 4 + ["toy-small-seed1"] * 2,
            "n_params": 1234,
            "n_layers": 2,
            "n_heads": 4,
            "step": [0, 0, 10, 10, 10, 10],
            "tokens_seen": [0, 0, 1000, 1000, 1000, 1000],
            "layer": [0, 1, 0, 1, 0, 1],
            "in_context_retrieval": [0.0, 0.125, 0.25, 1.0, 0.5, 0.75],
        }
    )
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)
    # No sidecar with layer scores: the header alone.
    empty = layer_table([sidecars[-1]], heads)
    assert empty.empty and list(empty.columns) == LAYER_COLUMNS


# ---- the analysis on layer units --------------------------------------------------------


def _layer_rows() -> pd.DataFrame:
    """Two seeds of one 3-layer size, L = 10 (null 0.1, criterion 0.2), steps 0, 10, 100.

    seed 0: layer 2 rises 0.1 -> 0.3 -> 0.9 (strongest, qualifies at 10 and 100), layer 1 at
    0.25 at the final step (qualifies), layer 0 at chance;
    seed 1: everything at or below 0.15 (never qualifies)."""
    rows = []
    values = {
        0: {0: [0.1, 0.1, 0.1], 10: [0.1, 0.1, 0.3], 100: [0.1, 0.25, 0.9]},
        1: {0: [0.1, 0.1, 0.1], 10: [0.1, 0.1, 0.15], 100: [0.05, 0.1, 0.15]},
    }
    for seed, steps in values.items():
        for step, per_layer in steps.items():
            for layer, value in enumerate(per_layer):
                rows.append(
                    {
                        "suite": "toy",
                        "model": "toy-small",
                        "size": "small",
                        "seed": seed,
                        "run": f"toy-small-seed{seed}",
                        "n_params": 1000,
                        "n_layers": 3,
                        "n_heads": 4,
                        "step": step,
                        "tokens_seen": step * 10,
                        "layer": layer,
                        "in_context_retrieval": value,
                    }
                )
    return pd.DataFrame(rows)


def test_layer_unit_through_the_analysis(tmp_path) -> None:
    mechanism = mechanisms.get("in_context_retrieval")
    assert mechanism.unit == "layer"
    context = NullContext(settings={"half_length": 10})
    heads = pd.DataFrame(columns=["run", "step", "layer", "head", "one_back"])
    results, cross = crossmech.analyze_mechanisms(
        heads,
        [mechanism],
        context,
        thresholds=np.array([0.5]),
        n_permutations=9,
        layers=_layer_rows(),
    )
    result = results["in_context_retrieval"]
    assert result.note == ""
    units = result.heads
    assert (units["head"] == 0).all()  # the layer itself
    assert units["null"].eq(0.1).all()
    qualifying = units[units["qualifies"]]
    assert sorted(zip(qualifying["run"], qualifying["step"], qualifying["layer"])) == [
        ("toy-small-seed0", 10, 2),
        ("toy-small-seed0", 100, 1),
        ("toy-small-seed0", 100, 2),
    ]
    run_step = result.tables["functional_run_step"].set_index(["run", "step"])
    assert run_step.loc[("toy-small-seed0", 100), "n_qualifying"] == 2
    assert run_step.loc[("toy-small-seed0", 100), "n_heads_scored"] == 3
    assert not run_step.loc[("toy-small-seed1", 100), "has_qualifying"]
    per_seed = result.tables["per_seed"].set_index("run")
    seed0 = per_seed.loc["toy-small-seed0"]
    assert (seed0["final_layer"], seed0["final_head"]) == (2, 0)
    assert seed0["final_relative_depth"] == 1.0
    assert seed0["final_score"] == 0.9
    # normalised max: 0 at step 0, (0.3 - 0.1)/0.9 = 0.22 at 10, (0.9 - 0.1)/0.9 = 0.89 at 100:
    # the 0.5 threshold is first crossed at step 100.
    assert seed0["onset_step"] == 100
    assert bool(seed0["formed"])
    assert not bool(per_seed.loc["toy-small-seed1", "formed"])
    sizes = result.tables["functional_size"]
    assert sizes["fraction_qualifying"].tolist() == [0.5]
    profile = cross["profile"].set_index("size")
    assert bool(profile.loc["all", "scored"])
    assert "not applicable: layer unit" in profile.loc["all", "note"]
    assert profile.loc["small", "fraction_qualifying"] == 0.5
    # Its figure (the rule's plot_mechanism) draws the layer rows and names the unit.
    from mechgen.figures.mechanism_figures import plot_mechanism

    tables = result.tables
    figure = plot_mechanism(
        "in_context_retrieval",
        tables["functional_run_step"],
        tables["functional_size"],
        tables["per_seed"],
        tmp_path / "in_context_retrieval.png",
        unit="layer",
    )
    labels = [ax.get_ylabel() for ax in figure.axes if ax.get_ylabel()]
    assert len(labels) == 3 and all("layer" in label and "head" not in label for label in labels)
    assert (tmp_path / "in_context_retrieval.png").stat().st_size > 0


def test_head_sharing_with_a_layer_unit_is_not_applicable() -> None:
    layer_rows = _layer_rows()
    heads = layer_rows.drop(columns="in_context_retrieval").assign(
        head=0, n_heads=1, induction=0.05 + layer_rows["step"] / 200, induction_control=0.0
    )
    results, cross = crossmech.analyze_mechanisms(
        heads,
        [mechanisms.get("induction"), mechanisms.get("in_context_retrieval")],
        NullContext(settings={"half_length": 10}),
        thresholds=np.array([0.5]),
        n_permutations=9,
        layers=layer_rows,
    )
    assert not results["induction"].note and not results["in_context_retrieval"].note
    order = cross["mechanism_order"]
    sharing = order[order["analysis"] == "head_sharing"]
    assert len(sharing) and sharing["detail"].eq("not applicable: layer unit").all()
    assert sharing["estimate"].isna().all()
    before = order[(order["analysis"] == "before") & (order["mechanism_a"] == "induction")]
    assert len(before)  # the onset order includes the layer-unit mechanism


def test_layer_unit_without_layer_scores_is_not_scored() -> None:
    heads = pd.DataFrame(columns=["run", "step", "layer", "head", "one_back"])
    results, cross = crossmech.analyze_mechanisms(
        heads,
        [mechanisms.get("in_context_retrieval")],
        NullContext(settings={"half_length": 10}),
        n_permutations=9,
        layers=None,
    )
    assert "layers.parquet" in results["in_context_retrieval"].note
    assert not bool(cross["profile"]["scored"].iloc[0])
