"""Cost of the relational/configurational scores per checkpoint vs 1-back scoring alone.

For each model shape (random weights: wall time does not depend on the values), this times,
on one thread (``scoring.threads: 1``):

- ``one_back``: :func:`mechgen.scoring.metrics.score_heads` over ``--n-sentences`` token lists
  (lengths drawn uniformly from ``--min-len..--max-len``, batch 16), the 1-back scorer alone;
- ``ride-along``: the extra time of the same call wrapped in
  :func:`mechgen.scoring.configurational.offset_profile_hooks` and
  :func:`mechgen.scoring.relational.mean_head_output_hooks` (offset profiles and the per-head mean
  outputs for ablation ride along the 1-back passes);
- ``induction``: :func:`mechgen.scoring.relational.score_induction` on N x [L random ids] x 2
  (forward passes in batches of 16 + the LM head on the second half for copying accuracy;
  ``--no-copying`` skips the LM head);
- ``control``: the positional controls (the induction positions on non-repeating sequences
  that share the repeated sequences' first halves), as the scoring job runs them: the extra
  time of :func:`mechgen.scoring.relational.score_induction_with_control` over ``induction`` (one
  more pass over the N x L second halves against the first halves' key/value cache, no LM
  head);
- ``composition``: :func:`mechgen.scoring.relational.composition_scores` (``--kinds``, default K, Q
  and V; 200 baseline draws);
- ``spectra``: :func:`mechgen.scoring.configurational.head_spectra`;
- ``ablation``: :func:`mechgen.scoring.relational.causal_dependence` of one source head with its
  control (two more forward passes over the repeated sequences), reusing the unablated
  induction pass and the ride-along mean outputs.

Each time is the median of ``--repeats`` runs, in wall seconds (``--cpu-time``: this process's
CPU seconds). Printed: seconds per part and the ratio of the per-checkpoint extra (ride-along
+ induction + control + composition + spectra, and with ablation) to the 1-back time.

    python bench/relational.py --shapes toy-small pythia-70m --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from mechgen.scoring.circuit import control_half
from mechgen.scoring.configurational import head_spectra, offset_profile_hooks
from mechgen.scoring.metrics import score_heads
from mechgen.scoring.relational import (
    causal_dependence,
    composition_scores,
    make_repeated_sequences,
    mean_head_output_hooks,
    score_induction,
    score_induction_with_control,
)

# Pythia shapes (config.json of EleutherAI/pythia-*: rotary_pct 0.25, vocab 50304, d_ff 4d);
# the toy sizes of config.yaml (full rotary, vocab 2048; toy-small's MLP is d_model wide).
SHAPES: dict[str, dict[str, float]] = {
    "toy-tiny": {"n_layers": 2, "n_heads": 2, "d_model": 64, "vocab": 2048, "rotary": 1.0},
    "toy-small": {
        "n_layers": 4, "n_heads": 2, "d_model": 128, "d_ff": 128, "vocab": 2048, "rotary": 1.0,
    },
    "pythia-14m": {"n_layers": 6, "n_heads": 4, "d_model": 128, "vocab": 50304, "rotary": 0.25},
    "pythia-70m": {"n_layers": 6, "n_heads": 8, "d_model": 512, "vocab": 50304, "rotary": 0.25},
    "pythia-160m": {"n_layers": 12, "n_heads": 12, "d_model": 768, "vocab": 50304, "rotary": 0.25},
    "pythia-410m": {"n_layers": 24, "n_heads": 16, "d_model": 1024, "vocab": 50304, "rotary": 0.25},
}


def build(shape: dict[str, float]) -> GPTNeoXForCausalLM:
    d_model = int(shape["d_model"])
    config = GPTNeoXConfig(
        vocab_size=int(shape["vocab"]),
        hidden_size=d_model,
        num_hidden_layers=int(shape["n_layers"]),
        num_attention_heads=int(shape["n_heads"]),
        intermediate_size=int(shape.get("d_ff", 4 * d_model)),
        max_position_embeddings=2048,
        rotary_pct=shape["rotary"],
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(config).eval()


CLOCK: Callable[[], float] = time.perf_counter
"""What :func:`median_time` reads: wall time, or this process's CPU time with ``--cpu-time``."""


def median_time(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = CLOCK()
        function()
        times.append(CLOCK() - start)
    return statistics.median(times)


def bench_shape(name: str, args: argparse.Namespace) -> dict[str, float]:
    model = build(SHAPES[name])
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    # Ids below 50,277 for Pythia shapes (the tokenizer's range); any id for the toy.
    hi = min(vocab, 50277)
    sentences = [
        rng.integers(2, hi, size=int(rng.integers(args.min_len, args.max_len + 1))).tolist()
        for _ in range(args.n_sentences)
    ]
    sequences = make_repeated_sequences(
        lo=2, hi=hi, n_sequences=args.n_sequences, half_length=args.half_length, seed=0
    )
    n_layers = model.config.num_hidden_layers

    def one_back() -> None:
        score_heads(model, sentences, batch_size=16, clipped_window=8)

    ride_along: dict[str, torch.Tensor] = {}

    def one_back_with_ride_along() -> None:
        with offset_profile_hooks(model, max_offset=8), mean_head_output_hooks(model) as means:
            score_heads(model, sentences, batch_size=16, clipped_window=8)
        ride_along["mean_z"] = means.mean_z

    copying = not args.no_copying
    baseline = score_induction(model, sequences, copying=copying)
    others = control_half(sequences)

    def ablation() -> None:
        causal_dependence(
            model,
            sequences,
            (max(0, n_layers - 2), 0),
            ride_along["mean_z"],
            baseline=baseline,
            copying=copying,
        )

    times = {
        "one_back": median_time(one_back, args.repeats),
        "one_back+ride-along": median_time(one_back_with_ride_along, args.repeats),
        "induction": median_time(
            lambda: score_induction(model, sequences, copying=copying), args.repeats
        ),
        "induction+control": median_time(
            lambda: score_induction_with_control(model, sequences, others, 16, copying),
            args.repeats,
        ),
        "composition": median_time(
            lambda: composition_scores(model, kinds=tuple(args.kinds), n_baseline=200), args.repeats
        ),
        "spectra": median_time(lambda: head_spectra(model), args.repeats),
        "ablation": median_time(ablation, args.repeats),
    }
    times["ride-along"] = max(0.0, times["one_back+ride-along"] - times["one_back"])
    times["control"] = max(0.0, times["induction+control"] - times["induction"])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes", nargs="+", default=["toy-small", "pythia-70m"], choices=sorted(SHAPES)
    )
    parser.add_argument("--n-sentences", type=int, default=200)
    parser.add_argument("--min-len", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=48)
    parser.add_argument("--n-sequences", type=int, default=100)
    parser.add_argument("--half-length", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-copying", action="store_true", help="skip the LM head (copying accuracy)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kinds", default="KQV", help="composition kinds, e.g. K or KQV")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time this process's CPU seconds (time.process_time) instead of wall seconds: "
        "less sensitive to other processes on a shared machine (with --threads 1)",
    )
    args = parser.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    torch.set_num_threads(args.threads)
    print(
        f"threads={args.threads} sentences={args.n_sentences} (lengths {args.min_len}-{args.max_len}) "
        f"induction N={args.n_sequences} L={args.half_length} copying={not args.no_copying} "
        f"composition={args.kinds} repeats={args.repeats} "
        f"clock={'CPU' if args.cpu_time else 'wall'}"
    )
    header = f"{'shape':<12} {'1-back s':>9} {'ride':>8} {'induct.':>8} {'control':>8} {'compos.':>8} {'spectra':>8} {'ablat.':>8} {'ratio':>7} {'+ablat.':>8}"
    print(header)
    for name in args.shapes:
        t = bench_shape(name, args)
        extra = t["ride-along"] + t["induction"] + t["control"] + t["composition"] + t["spectra"]
        print(
            f"{name:<12} {t['one_back']:9.2f} {t['ride-along']:8.2f} {t['induction']:8.2f} {t['control']:8.2f} {t['composition']:8.2f} "
            f"{t['spectra']:8.2f} {t['ablation']:8.2f} {extra / t['one_back']:7.2f} {(extra + t['ablation']) / t['one_back']:8.2f}",
            flush=True,
        )
    print(
        "ratio = (ride-along + induction + control + composition + spectra) / 1-back; +ablat. adds the ablation."
    )


if __name__ == "__main__":
    main()
