"""bench/scoring.py's bound on any exact scorer's speed counts the right multiply-adds: hand-worked
counts for a tiny GPT-2 and a tiny GPT-NeoX, and GPT-2 small's published shape."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_scoring", REPO_ROOT / "bench" / "scoring.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_gpt2_count_is_every_layer_but_the_last_layers_value_output_and_mlp(bench) -> None:
    # d = 8, 2 layers, MLP 4d = 32. Per layer: c_attn 8 x 24 = 192, attention c_proj 8 x 8 = 64,
    # c_fc 8 x 32 = 256, MLP c_proj 32 x 8 = 256: 768. The last layer: Q and K, 2/3 of 192 = 128.
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=50, n_positions=16)
    )
    assert bench.least_multiply_adds_per_token(model) == 768 + 128


def test_gpt_neox_count(bench) -> None:
    # d = 8, 3 layers, d_ff 16. Per layer: query_key_value 8 x 24 = 192, dense 64, MLP 8 x 16 and
    # 16 x 8 = 256: 512. The last layer: 128.
    config = GPTNeoXConfig(
        num_hidden_layers=3, num_attention_heads=2, hidden_size=8, intermediate_size=16,
        vocab_size=50, max_position_embeddings=16,
    )  # fmt: skip
    model = GPTNeoXForCausalLM(config)
    assert bench.least_multiply_adds_per_token(model) == 2 * 512 + 128


def test_gpt2_small_shape(bench) -> None:
    # GPT2Config's defaults are GPT-2 small's shape (no weights needed: meta tensors).
    # 11 layers x (768 x 2304 + 768 x 768 + 2 x 768 x 3072) + 768 x 1536 = 79,036,416.
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    assert bench.least_multiply_adds_per_token(model) == 11 * 7_077_888 + 1_179_648
