"""The duplicate-token mechanism: its score on planted heads with known answers (a hand-set
attention tensor, and a GPT-NeoX model whose attention is forced inside the scoring passes),
against transformers' ``output_attentions`` on an unforced model, and its criterion with the
strongest-induction-head exclusion on a hand-worked table."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest
import torch

from mechgen import mechanisms
from mechgen.mechanisms import NullContext, meets_criterion_in_table
from mechgen.mechanisms.base import strongest_rows
from mechgen.scoring import circuit
from mechgen.scoring.relational import (
    make_repeated_sequences,
    repeat_offset_attention,
    score_induction,
)
from mechgen.tables.baselines import uniform_induction_baseline

VOCAB = 40
HALF = 5


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def uniform_causal(length: int) -> torch.Tensor:
    rows = torch.arange(length)[:, None]
    return ((torch.arange(length)[None, :] <= rows).double() / (rows + 1)).double()


def offset_head(length: int, half: int, offset: int) -> torch.Tensor:
    """Uniform causal rows, except second-half queries p, which put everything on p - offset."""
    pattern = uniform_causal(length)
    for p in range(half, 2 * half):
        pattern[p] = 0.0
        pattern[p, p - offset] = 1.0
    return pattern


def test_repeat_offset_attention_on_planted_heads() -> None:
    length = 2 * HALF
    heads = [offset_head(length, HALF, HALF), offset_head(length, HALF, HALF - 1)]
    attention = torch.stack([*heads, uniform_causal(length)])[None].expand(3, 3, -1, -1)
    duplicate = repeat_offset_attention(attention, HALF, HALF) / (3 * HALF)
    induction = repeat_offset_attention(attention, HALF, HALF - 1) / (3 * HALF)
    uniform = uniform_induction_baseline(HALF)  # 1/(p+1) on every key of row p
    np.testing.assert_allclose(duplicate.numpy(), [1.0, 0.0, uniform], rtol=1e-12)
    np.testing.assert_allclose(induction.numpy(), [0.0, 1.0, uniform], rtol=1e-12)
    assert duplicate.dtype == torch.float64
    with pytest.raises(ValueError, match="offset"):
        repeat_offset_attention(attention, HALF, HALF + 1)
    with pytest.raises(ValueError, match="2L"):
        repeat_offset_attention(attention, HALF + 1, HALF)


# ---------------------------------------------------------------------------------------------
# A GPT-NeoX model whose attention is forced inside the scoring passes


def tiny_model() -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(config).eval()


def content_duplicate(ids: torch.Tensor) -> torch.Tensor:
    """[B, T, T]: query p attends to the latest earlier position holding its token, else to
    itself (a duplicate-token head that reads content)."""
    batch, length = ids.shape
    pattern = torch.zeros(batch, length, length)
    for b in range(batch):
        for p in range(length):
            earlier = [j for j in range(p) if ids[b, j] == ids[b, p]]
            pattern[b, p, earlier[-1] if earlier else p] = 1.0
    return pattern


@pytest.fixture()
def forced_model():
    """Layer 1: head 0 a content duplicate-token head, head 1 a positional head attending to
    p - L (any content) at second-half queries p; layer 0 untouched. Forced on a pass over
    whole sequences and on a pass over second halves against a cache of the first halves
    (its attention has fewer query rows than keys: the last rows of the whole pattern)."""
    model = tiny_model()
    seen: dict[str, torch.Tensor] = {}

    def grab_ids(module, args, kwargs):
        seen["ids"] = kwargs.get("input_ids", args[0] if args else None)

    def force(module, inputs, output):
        ids = seen["ids"]
        queries, keys = output[1].shape[-2:]
        if queries == keys:  # a pass from position 0: the prefix of a later continuation
            seen["prefix"] = ids
        else:  # a continuation of the cached prefix: its whole sequences
            ids = torch.cat([seen["prefix"][:, : keys - queries], ids], dim=1)
        length = ids.shape[1]
        positional = offset_head(length, length // 2, length // 2).float()
        forced = torch.stack(
            [content_duplicate(ids), positional.expand(ids.shape[0], -1, -1)], dim=1
        )
        return (output[0], forced[:, :, keys - queries :].to(output[1]))

    handles = [
        model.gpt_neox.register_forward_pre_hook(grab_ids, with_kwargs=True),
        model.gpt_neox.layers[1].attention.register_forward_hook(force),
    ]
    yield model
    for handle in handles:
        handle.remove()


def test_forced_heads_score_their_known_values(forced_model) -> None:
    sequences = make_repeated_sequences(2, VOCAB, n_sequences=4, half_length=HALF, seed=3)
    result = score_induction(forced_model, sequences, batch_size=3, copying=False)
    controls = circuit.positional_controls(forced_model, sequences, batch_size=3)
    # Both heads hit p - L at every second-half query of the repeated sequences.
    np.testing.assert_allclose(result.duplicate_token[1], [1.0, 1.0], rtol=1e-12)
    np.testing.assert_allclose(result.induction[1], [0.0, 0.0], atol=1e-12)
    # Control: the positional head still hits p - L; the content head only where the
    # independently drawn second half repeats the first half's token at the same position.
    other = make_repeated_sequences(2, VOCAB, n_sequences=4, half_length=HALF, seed=4)
    chance = float(np.mean(sequences.first_half == other.first_half))
    control = controls["duplicate_token_control"]
    assert control[1, 1] == pytest.approx(1.0)
    assert control[1, 0] == pytest.approx(chance)
    # The induction control is unchanged by the refactor into positional_controls.
    np.testing.assert_array_equal(
        controls["induction_control"],
        circuit.positional_control(forced_model, sequences, batch_size=3),
    )
    # The criterion: the content head qualifies; the positional one fails its control.
    table = pd.DataFrame(
        {
            "run": "r",
            "step": 0,
            "layer": [1, 1],
            "head": [0, 1],
            "duplicate_token": result.duplicate_token[1],
            "duplicate_token_control": control[1],
            # Neither forced head is an induction head (both 0 above); the positional head is
            # made the step's strongest so the content head's criterion rests on its scores.
            "induction": [0.0, 0.5],
        }
    )
    mechanism = mechanisms.get("duplicate_token")
    null = mechanism.null(table, NullContext(settings={"half_length": HALF}))
    assert chance < 0.5
    assert meets_criterion_in_table(mechanism, table, null).tolist() == [True, False]


# ---------------------------------------------------------------------------------------------
# An unforced model: the scoring passes against output_attentions


def test_duplicate_token_matches_output_attentions() -> None:
    model = tiny_model()
    with torch.no_grad():  # sharper attention than the default init's near-uniform
        for layer in model.gpt_neox.layers:
            layer.attention.query_key_value.weight.mul_(10.0)
    sequences = make_repeated_sequences(2, VOCAB, n_sequences=5, half_length=HALF, seed=0)
    result = score_induction(model, sequences, batch_size=2, copying=False)
    controls = circuit.positional_controls(model, sequences, batch_size=2)
    other = make_repeated_sequences(2, VOCAB, n_sequences=5, half_length=HALF, seed=1)
    for ids, expected_array in (
        (sequences.input_ids, result.duplicate_token),
        (
            torch.from_numpy(np.concatenate([sequences.first_half, other.first_half], axis=1)),
            controls["duplicate_token_control"],
        ),
    ):
        with torch.no_grad():
            attentions = model(input_ids=ids, output_attentions=True).attentions
        expected = np.array(
            [
                [
                    np.mean(
                        [
                            a[n, h, p, p - HALF].item()
                            for n in range(5)
                            for p in range(HALF, 2 * HALF)
                        ]
                    )
                    for h in range(2)
                ]
                for a in attentions
            ]
        )
        np.testing.assert_allclose(expected_array, expected, atol=1e-6)
    assert np.ptp(result.duplicate_token) > 0.01  # the heads differ: not a degenerate check


# ---------------------------------------------------------------------------------------------
# The criterion on the per-head table


def test_criterion_excludes_the_strongest_induction_head_per_step() -> None:
    mechanism = mechanisms.get("duplicate_token")
    assert mechanism.exclude_strongest_of == "induction"
    assert mechanism.score_column == "duplicate_token"
    assert mechanism.control_column == "duplicate_token_control"
    # Two runs; run a at steps 0 and 1, run b at step 0. null = 0.1 (a), 0.2 (b).
    table = pd.DataFrame(
        {
            "run": ["a"] * 6 + ["b"] * 3,
            "step": [0, 0, 0, 1, 1, 1, 0, 0, 0],
            "layer": [0, 1, 1, 0, 1, 1, 0, 0, 1],
            "head": [0, 0, 1, 0, 0, 1, 0, 1, 0],
            "duplicate_token": [0.5, 0.5, 0.19, 0.5, 0.5, 0.5, 0.5, 0.39, np.nan],
            "duplicate_token_control": [0.1, 0.1, 0.0, 0.25, 0.1, 0.1, 0.0, 0.0, 0.0],
            "induction": [0.1, 0.9, 0.2, 0.7, 0.7, np.nan, 0.3, 0.2, 0.9],
            "nonfinite": [False] * 8 + [True],
        }
    )
    null = pd.Series({"a": 0.1, "b": 0.2})
    meets = meets_criterion_in_table(mechanism, table, null)
    # a/0: row 1 is the strongest induction head (excluded), row 2 is below 2 x null.
    # a/1: row 3's control is not below half its score; rows 3, 4 tie on induction: the lower
    #      layer (row 3) is the strongest, so row 4 is not excluded; row 5's NaN induction
    #      does not matter.
    # b/0: row 8 is flagged, so row 6 is the strongest induction head; row 7 is below 2 x 0.2.
    assert meets.tolist() == [True, False, False, False, True, True, False, False, False]
    assert strongest_rows(table, "induction").tolist() == [
        False, True, False, True, False, False, True, False, False,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no null for run"):
        meets_criterion_in_table("duplicate_token", table, null.drop("b"))


def test_duplicate_token_null_is_the_uniform_induction_level() -> None:
    table = pd.DataFrame({"run": ["a", "b"], "duplicate_token": [0.1, 0.2]})
    null = mechanisms.get("duplicate_token").null(table, NullContext(settings={"half_length": 3}))
    # Uniform attention puts 1/(p+1) on key p - L at positions p = 3, 4, 5.
    expected = (1 / 4 + 1 / 5 + 1 / 6) / 3
    assert null.to_dict() == pytest.approx({"a": expected, "b": expected})
    with pytest.raises(ValueError, match="another mechanism"):
        mechanisms.Mechanism(
            name="x", version=1, unit="head", score_column="x", description="", units="p",
            null=mechanism_null, exclude_strongest_of="x",
        )  # fmt: skip


def mechanism_null(table: pd.DataFrame, context: NullContext) -> pd.Series:
    return pd.Series(0.0, index=sorted(table["run"].unique()))
