"""The locality mechanism (``received_concentration``): planted heads forced inside the
evaluation-sentence pass give their known scores, and the null and criterion per run.
(The scorer against ``output_attentions`` and hand-worked patterns: tests/test_metrics.py.)"""

from __future__ import annotations

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest
import torch

from mechgen import mechanisms
from mechgen.mechanisms import NullContext, meets_criterion_in_table
from mechgen.mechanisms.locality import (
    received_concentration_of_uniform,
    uniform_received_concentration,
)
from mechgen.scoring.metrics import score_heads

VOCAB = 32


def planted(length: int, kind: str) -> torch.Tensor:
    """[T, T] attention of one planted head on a sentence of ``length`` tokens."""
    pattern = torch.zeros(length, length)
    if kind == "focused":  # every query from 1 on attends to key 1
        pattern[0, 0] = 1.0
        pattern[1:, 1] = 1.0
    elif kind == "previous":
        pattern[0, 0] = 1.0
        for i in range(1, length):
            pattern[i, i - 1] = 1.0
    else:  # uniform causal
        rows = torch.arange(length)[:, None]
        pattern = (torch.arange(length)[None, :] <= rows).float() / (rows + 1)
    return pattern


def previous_token_value(length: int) -> float:
    """By hand: r_j = 1/(L-1-j), j = 1..L-2, i.e. r proportional to 1/k for k = 1..L-2."""
    received = np.array([1.0 / k for k in range(1, length - 1)])
    share = received / received.sum()
    return 1.0 + float(np.sum(share * np.log(share))) / math.log(length - 2)


def test_forced_heads_in_the_sentence_pass() -> None:
    """A GPT-NeoX model whose layer-0 attention is replaced by planted patterns inside
    score_heads' own forward passes (right-padded batches of mixed lengths)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.set_num_threads(1)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).eval()

    def force(module, inputs, output):
        batch, _, length, _ = output[1].shape
        forced = torch.stack([planted(length, k) for k in ("focused", "previous", "uniform")])
        # Padded rows and keys are ignored by the scorer, so one pattern per padded length
        # serves every sentence of the batch: its causal block of a shorter sentence is the
        # same pattern at that length for the focused and previous heads; the uniform head's
        # rows only see keys <= i, which padding does not change.
        return (output[0], forced[None].expand(batch, -1, -1, -1).to(output[1]))

    handle = model.gpt_neox.layers[0].attention.register_forward_hook(force)
    lengths = [3, 4, 7, 12, 12, 25]
    rng = np.random.default_rng(0)
    sentences = [rng.integers(0, VOCAB, size=n).tolist() for n in lengths]
    try:
        scores = score_heads(model, sentences, batch_size=4)
    finally:
        handle.remove()
    layer0 = scores[scores["layer"] == 0].set_index("head")["received_concentration"]
    scored = [n for n in lengths if n >= 4]
    assert scores.attrs["n_sentences_received"] == len(scored)
    assert layer0[0] == pytest.approx(1.0)
    assert layer0[1] == pytest.approx(np.mean([previous_token_value(n) for n in scored]))
    assert layer0[2] == pytest.approx(uniform_received_concentration(lengths))
    # The mechanism's criterion against the uniform null of these sentences.
    table = scores.assign(run="r", step=0)
    mechanism = mechanisms.get("locality")
    null = mechanism.null(table, NullContext(eval_lengths={"r": lengths}))
    assert null["r"] == pytest.approx(layer0[2])
    meets = meets_criterion_in_table(mechanism, table, null)
    assert meets[(table["layer"] == 0).to_numpy()].tolist() == [True, True, False]


def test_locality_null_per_run_and_its_fallback() -> None:
    mechanism = mechanisms.get("locality")
    assert mechanism.score_column == "received_concentration"
    table = pd.DataFrame(
        {
            "suite": "s", "model": "m", "size": "x", "seed": [1, 1, 2, 2], "run": ["a", "a", "b", "b"],
            "step": 0, "tokens_seen": 0, "layer": 0, "head": [0, 1, 0, 1], "n_layers": 1,
            "n_heads": 2, "n_params": 10, "received_concentration": [0.01, 0.03, 0.02, 0.5],
        }
    )  # fmt: skip
    null = mechanism.null(table, NullContext(eval_lengths={"a": [4, 25], "b": [3, 9]}))
    expected_a = (received_concentration_of_uniform(4) + received_concentration_of_uniform(25)) / 2
    assert null["a"] == pytest.approx(expected_a)
    assert null["b"] == pytest.approx(received_concentration_of_uniform(9))  # 3 tokens: left out
    # Without sentence lengths (an imported table): the median step-0 head, one value.
    fallback = mechanism.null(table, NullContext())
    assert fallback.tolist() == pytest.approx([0.025, 0.025])
