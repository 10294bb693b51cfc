"""Time mechgen's head scorer against the reference study's method and a bare forward pass.

For each model (a toy GPT-NeoX, and randomly initialised models of Pythia-70m's shape and of
GPT-2 small's shape: 12 layers x 12 heads, d 768, vocab 50257, learned positions, sequential
residual) and the same sentences, this measures the wall time (and the process CPU time, which is much less
sensitive to other users' load with one thread) of

  (a) the reference study's method (Trott 2025): one sentence at a time through the full causal
      LM with ``output_attentions=True`` and ``output_hidden_states=True``, then Python loops
      over layers and heads computing each metric with ``.item()``, then a pandas mean over
      sentences;
  (b) ``mechgen.scoring.metrics.score_heads`` (length-sorted padded batches, body only, metrics in
      forward hooks, the pass stopped after the last layer's attention, so it can beat (c));
  (c) the floor: a bare forward pass of the transformer body (the architecture adapter's
      ``body``: ``model.gpt_neox`` or ``model.transformer``; no LM head,
      no metrics, no cache) over the same tokens in the same length-sorted padded batches,
      with the same eager attention; the sdpa floor (c') is printed for information.

and prints the medians over ``--repeats`` and the ratios (a)/(b) and (b)/(c). Targets on CPU:
(a)/(b) >= 5 and (b)/(c) <= 1.2. Sentences are random token ids whose lengths mimic the
Natural Stories corpus as tokenised for Pythia (666 sentences; words per sentence mean 22,
sd 10.4, max 67, about 1.15 tokens per word): gamma-distributed with mean 25 and sd 12,
clipped to 3..75 tokens.

    python bench/scoring.py                      # all three models, 666 sentences, 1 thread
    python bench/scoring.py --checkpoint DIR     # a trained toy checkpoint instead
    python bench/scoring.py --models pythia-70m-shape --n-sentences 200 --repeats 5
    python bench/scoring.py --models gpt2-small-shape --n-sentences 200 --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from mechgen.model import adapter as architectures
from mechgen.scoring.metrics import score_heads

MODEL_NAMES = ("toy", "pythia-70m-shape", "gpt2-small-shape")
TOY_SIZE = {"n_layers": 4, "n_heads": 4, "d_model": 256}  # config.yaml's toy "small"
TOY_VOCAB_SIZE = 2048


def natural_stories_like_sentences(n_sentences: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids; lengths ~ Gamma(mean 25, sd 12) rounded and clipped to [3, 75]."""
    generator = np.random.default_rng(seed)
    mean, sd = 25.0, 12.0
    shape = (mean / sd) ** 2
    lengths = np.clip(np.rint(generator.gamma(shape, mean / shape, n_sentences)), 3, 75)
    return [generator.integers(0, vocab_size, int(length)).tolist() for length in lengths]


def build_model(name: str, checkpoint: Path | None, seed: int) -> torch.nn.Module:
    """A GPTNeoXForCausalLM (toy, Pythia-70m shape) or GPT2LMHeadModel (GPT-2 small shape) in
    eval mode with eager attention."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    if name == "toy":
        if checkpoint is not None:
            model = GPTNeoXForCausalLM.from_pretrained(checkpoint, attn_implementation="eager")
        else:
            from mechgen.sources import toy

            model = toy.init_model(TOY_SIZE, TOY_VOCAB_SIZE, seq_len=128, seed=seed)
    elif name == "pythia-70m-shape":
        config = GPTNeoXConfig(
            vocab_size=50304,
            hidden_size=512,
            num_hidden_layers=6,
            num_attention_heads=8,
            intermediate_size=2048,
            rotary_pct=0.25,
            max_position_embeddings=2048,
            use_parallel_residual=True,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config)
    elif name == "gpt2-small-shape":
        config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")
    model.set_attn_implementation("eager")
    return model.eval()


def reference_method(model: torch.nn.Module, sentences: list[list[int]]) -> pd.DataFrame:
    """The reference study's scoring loop, written out as its code does it.

    Per sentence: the full causal LM with hidden states and attentions returned; per layer
    and head, each quantity read with its own ``.item()``; one dict per (sentence, layer,
    head); at the end the mean over sentences per head.
    """
    n_layers, n_heads, _, _ = architectures.for_model(model).shape(model)
    results = []
    for sentence_index, tokens in enumerate(sentences):
        input_ids = torch.tensor([tokens])
        with torch.no_grad():
            output = model(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                output_attentions=True,
                output_hidden_states=True,
            )
        for layer in range(n_layers):
            for head in range(n_heads):
                attn_weights = output.attentions[layer][0, head]
                prev_token_attention = torch.diagonal(attn_weights, offset=-1).mean().item()
                avg_self_attn = torch.diagonal(attn_weights, offset=0).mean().item()
                avg_attn = attn_weights.mean().item()
                first_token_attention = attn_weights[:, 0].mean().item()
                total_attention = attn_weights.sum().item()
                results.append(
                    {
                        "sentence": sentence_index,
                        "Layer": layer + 1,
                        "Head": head + 1,
                        "1-back attention": prev_token_attention,
                        "self-attention": avg_self_attn,
                        "prev_to_self_ratio": prev_token_attention / avg_self_attn,
                        "prev_to_all_ratio": prev_token_attention / avg_attn,
                        "first_token": first_token_attention,
                        "prev_token_fraction": prev_token_attention / total_attention,
                    }
                )
    return pd.DataFrame(results).drop(columns="sentence").groupby(["Layer", "Head"]).mean()


def length_sorted_batches(
    sentences: list[list[int]], batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) of right-padded, length-sorted batches, as score_heads runs."""
    ordered = sorted((tokens for tokens in sentences if len(tokens) >= 2), key=len)
    batches = []
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        padded_length = max(len(tokens) for tokens in batch)
        input_ids = torch.zeros(len(batch), padded_length, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), padded_length, dtype=torch.long)
        for row, tokens in enumerate(batch):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            attention_mask[row, : len(tokens)] = 1
        batches.append((input_ids, attention_mask))
    return batches


def body_forward(model: torch.nn.Module, sentences: list[list[int]], batch_size: int) -> None:
    """The floor: the transformer body alone over the same padded batches (built in the timing)."""
    body = architectures.for_model(model).body(model, need_attention=False)
    with torch.inference_mode():
        for input_ids, attention_mask in length_sorted_batches(sentences, batch_size):
            body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def check_agreement(reference: pd.DataFrame, scores: pd.DataFrame) -> float:
    """Largest |difference| of the shared metrics (1-back, self, prev/self, prev/all)."""
    pairs = {
        "1-back attention": "one_back",
        "self-attention": "self_attention",
        "prev_to_self_ratio": "prev_self_ratio",
        "prev_to_all_ratio": "prev_uniform_ratio",
    }
    ours = scores.set_index([scores["layer"] + 1, scores["head"] + 1])
    return max(
        float(np.max(np.abs(reference[theirs].to_numpy() - ours[mine].to_numpy())))
        for theirs, mine in pairs.items()
    )


def least_multiply_adds_per_token(model: torch.nn.Module) -> int:
    """A lower bound on the multiply-adds per token of any exact scorer of every head's pattern.

    The body's weight matrices (2-D parameters inside a layer: the fused QKV, the attention
    output, the MLP), but of the last layer only the query and key two thirds of its fused
    QKV: the attention patterns of the last layer need nothing else. Embeddings (no layer
    index), layernorms, biases, the attention scores and the softmax are left out, so the
    bound is low (generous to the scorer)."""
    body = architectures.for_model(model).body(model, need_attention=False)
    per_layer: dict[int, list[tuple[str, int]]] = {}
    for name, parameter in body.named_parameters():
        match = re.search(r"(?:^|\.)(\d+)\.", name)
        if parameter.ndim == 2 and match:
            per_layer.setdefault(int(match.group(1)), []).append((name, parameter.numel()))
    last = max(per_layer)
    total = sum(n for layer, weights in per_layer.items() if layer != last for _, n in weights)
    qkv = [n for name, n in per_layer[last] if "query_key_value" in name or "c_attn" in name]
    if len(qkv) != 1:
        raise ValueError(f"no single fused QKV weight in the last layer: {per_layer[last]}")
    return total + 2 * qkv[0] // 3


def gemm_peak_gflops(repeats: int = 5) -> float:
    """This core's float32 matrix-product speed (GFLOP per CPU second, the current torch
    threads): the best of three large products (a square 2048 one and GPT-2 small's QKV and MLP
    shapes at 1536 rows), each the median of ``repeats``. No fp32 scorer runs its products
    faster."""
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (1536, 768, 2304), (1536, 768, 3072)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            started = time.process_time()
            torch.mm(a, b)
            times.append(time.process_time() - started)
        best = max(best, 2 * m * k * n / statistics.median(times) / 1e9)
    return best


def bench_model(name: str, args: argparse.Namespace, checkpoint: Path | None) -> None:
    """Build the model and sentences, time (a), (b), (c), (c') and print the results."""
    model = build_model(name, checkpoint, args.seed)
    # Separate copies for the methods that change the model: output_attentions installs
    # transformers' output-capturing hooks, and the sdpa floor switches the attention.
    reference_model = copy.deepcopy(model)
    sdpa_model = copy.deepcopy(model)
    sdpa_model.set_attn_implementation("sdpa")
    adapter = architectures.for_model(model)
    vocab_size = adapter.vocab_size(model)
    sentences = natural_stories_like_sentences(args.n_sentences, vocab_size, args.seed)
    n_tokens = sum(map(len, sentences))
    n_layers, n_heads, _, d_model = adapter.shape(model)
    print(
        f"\n## {name} ({adapter.name}): {n_layers} layers x {n_heads} heads, d_model {d_model}, "
        f"vocab {vocab_size}, {adapter.n_params(model):,} parameters"
        + (f" (checkpoint {checkpoint})" if checkpoint else " (random init)")
    )
    print(
        f"{len(sentences)} sentences, {n_tokens} tokens (mean {n_tokens / len(sentences):.1f}, "
        f"max {max(map(len, sentences))}), batch size {args.batch_size}, "
        f"{torch.get_num_threads()} torch thread(s), median of {args.repeats}"
    )
    padded = sum(ids.numel() for ids, _ in length_sorted_batches(sentences, args.batch_size))
    print(
        f"padding: {padded} padded positions for {n_tokens} tokens (+{padded / n_tokens - 1:.1%})"
    )

    methods: dict[str, Callable[[], object]] = {
        "(a) reference": lambda: reference_method(reference_model, sentences),
        "(b) score_heads": lambda: score_heads(model, sentences, batch_size=args.batch_size),
        "(c) floor, eager": lambda: body_forward(model, sentences, args.batch_size),
        "(c') floor, sdpa": lambda: body_forward(sdpa_model, sentences, args.batch_size),
    }
    # Warm-up (allocator, transformers' lazy hook installation); keep two results to compare.
    warm_results = {label: function() for label, function in methods.items()}
    wall: dict[str, list[float]] = {label: [] for label in methods}
    cpu: dict[str, list[float]] = {label: [] for label in methods}
    # Interleave the methods so that load from other users of the machine hits all alike.
    # Process CPU time is printed too: with one thread it is much less sensitive to that load.
    for _ in range(args.repeats):
        for label, function in methods.items():
            wall_started, cpu_started = time.perf_counter(), time.process_time()
            function()
            wall[label].append(time.perf_counter() - wall_started)
            cpu[label].append(time.process_time() - cpu_started)
    for kind, times in (("wall", wall), ("cpu", cpu)):
        medians = {label: statistics.median(values) for label, values in times.items()}
        print(f"  {kind} time, median (all runs):")
        for label, values in times.items():
            spread = ", ".join(f"{value:.2f}" for value in values)
            print(f"    {label:18s} {medians[label]:8.2f} s   ({spread})")
        a, b = medians["(a) reference"], medians["(b) score_heads"]
        c, c_sdpa = medians["(c) floor, eager"], medians["(c') floor, sdpa"]
        print(
            f"    (a)/(b) = {a / b:.2f}x (target >= 5);  (b)/(c) = {b / c:.3f}x (target <= 1.2, "
            f"eager floor);  (b)/(c') = {b / c_sdpa:.3f}x (sdpa floor, for information)"
        )
    # How fast any exact float32 scorer could be here: the least work at the core's best
    # matrix-product speed, against the reference's CPU time.
    peak = gemm_peak_gflops()
    least_per_token = least_multiply_adds_per_token(model)
    least_gflop = 2 * least_per_token * n_tokens / 1e9
    least_s = least_gflop / peak
    print(
        f"  bound: the least work of any exact scorer is {least_gflop:.0f} GFLOP "
        f"({least_per_token:,} multiply-adds per token, no padding); at this "
        f"core's best float32 product speed ({peak:.0f} GFLOP/s) that takes {least_s:.2f} s, so "
        f"no such scorer is more than {medians['(a) reference'] / least_s:.2f}x faster than (a)"
    )
    difference = check_agreement(warm_results["(a) reference"], warm_results["(b) score_heads"])
    print(f"  max |(a) - (b)| over 1-back, self, prev/self, prev/all: {difference:.2e}")


def main(argv: list[str] | None = None) -> None:
    """Parse the options, set the torch threads and bench each model."""
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when redirected to a file
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated")
    parser.add_argument("--checkpoint", type=Path, help="a toy GPTNeoXForCausalLM directory")
    parser.add_argument("--n-sentences", type=int, default=666)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    for name in names:
        if name not in MODEL_NAMES:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        parser.error(f"--checkpoint {args.checkpoint} is not a directory")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name in names:
        bench_model(name, args, args.checkpoint if name == "toy" else None)


if __name__ == "__main__":
    main()
