"""Cost of the mechanism catalog per ordinary checkpoint, relative to the previous-token pass.

For each model shape (random weights: wall time does not depend on the values), on one thread,
this times what the scoring job runs for each mechanism at an ordinary (non-detail) step:

- ``previous_token``: :func:`mechgen.scoring.metrics.score_heads` over ``--n-sentences`` token lists
  (Natural-Stories-like lengths, batch 16): the baseline. The locality mechanism's
  ``received_concentration`` is computed in the same hooks (no pass of its own);
- ``induction``: :func:`mechgen.scoring.relational.score_induction` on N x [L random ids] x 2, which
  also reads duplicate-token's attention (no pass of its own); ``--no-copying`` skips the LM
  head on the second half (copying accuracy);
- ``control``: :func:`mechgen.scoring.circuit.positional_controls`, the induction and duplicate-token
  controls from one set of passes;
- ``weights``: :func:`mechgen.model.weight_scores.score_weight_mechanisms`, successor heads
  and copy suppression from the weights alone, with the task items of Pythia's tokenizer
  (``tests/data/pythia-tokenizer``) and the evaluation text's frequent tokens.

The copying-accuracy LM head skips the positions a few unembedding rows provably refute
(``mechgen.scoring.relational._refuted_positions``): with random weights nearly all of them. Where
copying works no position is refuted and the full product runs, so the bench also times the
LM head on hidden states aimed at their targets (every position a hit) and prints the
induction part and the catalog total for that case (``copying works``), apart from the total.

Detail steps (K-composition, ablation, CKA outputs) run at ``relational.detail_steps`` only and
are measured apart by ``bench/relational.py``. Each time is the median of ``--repeats`` runs.
Printed: seconds per part and each part's ratio to ``previous_token``; the catalog's total
ratio (goal: at most 2.5).

    python bench/mechanisms.py --shapes pythia-70m pythia-410m --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np
import torch
from tokenizers import Tokenizer

from mechgen.mechanisms import successor
from mechgen.model.weight_scores import WeightTasks, score_weight_mechanisms
from mechgen.scoring.circuit import positional_controls
from mechgen.scoring.metrics import score_heads
from mechgen.scoring.relational import _copying_hits, make_repeated_sequences, score_induction

PYTHIA_TOKENIZER = REPO_ROOT / "tests" / "data" / "pythia-tokenizer" / "tokenizer.json"


def _relational_bench():
    """bench/relational.py's model shapes, builder and timer (one definition of each)."""
    spec = importlib.util.spec_from_file_location("bench_relational", REPO_ROOT / "bench" / "relational.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def natural_stories_like(n: int, hi: int, rng: np.random.Generator) -> list[list[int]]:
    """Token lists whose lengths mimic Natural Stories for Pythia (gamma, mean 25, sd 12,
    clipped to 3..75 tokens), ids in [2, hi)."""
    lengths = np.clip(rng.gamma(shape=(25 / 12) ** 2, scale=12**2 / 25, size=n), 3, 75)
    return [rng.integers(2, hi, size=int(length)).tolist() for length in lengths]


def bench_shape(name: str, args: argparse.Namespace, rel) -> dict[str, float]:
    model = rel.build(rel.SHAPES[name])
    hi = min(model.config.vocab_size, 50277)
    rng = np.random.default_rng(0)
    sentences = natural_stories_like(args.n_sentences, hi, rng)
    sequences = make_repeated_sequences(
        lo=2, hi=hi, n_sequences=args.n_sequences, half_length=args.half_length, seed=0
    )
    tokenizer = Tokenizer.from_file(str(PYTHIA_TOKENIZER))
    tasks = WeightTasks.from_eval_tokens(
        {
            "token_ids": sentences,
            "successor_tasks": successor.task_token_ids(
                lambda text: tokenizer.encode(text, add_special_tokens=False).ids
            ),
        }
    )
    copying = not args.no_copying
    times = {
        "previous_token": rel.median_time(
            lambda: score_heads(model, sentences, batch_size=16, clipped_window=8), args.repeats
        ),
        "induction": rel.median_time(
            lambda: score_induction(model, sequences, copying=copying), args.repeats
        ),
        "control": rel.median_time(
            lambda: positional_controls(model, sequences, 0, 16), args.repeats
        ),
        "weights": rel.median_time(lambda: score_weight_mechanisms(model, tasks), args.repeats),
    }
    if copying:
        # The LM head alone on N x 2L hidden states: random (as with random weights) and aimed
        # at the next token (every position a hit: nothing refuted, the full product runs).
        ids = torch.as_tensor(sequences.input_ids)
        weight = model.get_output_embeddings().weight.detach()
        random_hidden = torch.randn(ids.shape[0], ids.shape[1], weight.shape[1])
        aimed = random_hidden.clone()
        aimed[:, :-1] = 3 * weight[ids[:, 1:]]
        with torch.inference_mode():
            times["lm_head_random"] = rel.median_time(
                lambda: _copying_hits(model, random_hidden, ids, args.half_length), args.repeats
            )
            times["lm_head_hits"] = rel.median_time(
                lambda: _copying_hits(model, aimed, ids, args.half_length), args.repeats
            )
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["pythia-70m", "pythia-410m"])
    parser.add_argument("--n-sentences", type=int, default=666)
    parser.add_argument("--n-sequences", type=int, default=100)
    parser.add_argument("--half-length", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-copying", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rel = _relational_bench()
    print(f"torch {torch.__version__}, 1 thread, median of {args.repeats}")
    for name in args.shapes:
        times = bench_shape(name, args, rel)
        base = times["previous_token"]
        lm_random = times.pop("lm_head_random", 0.0)
        lm_hits = times.pop("lm_head_hits", 0.0)
        total = sum(times.values())
        print(f"\n## {name} ({args.n_sentences} sentences, N = {args.n_sequences}, L = {args.half_length})")
        for part, seconds in times.items():
            print(f"  {part:15s} {seconds:8.2f} s   {seconds / base:5.2f} x previous_token")
        print(f"  {'catalog total':15s} {total:8.2f} s   {total / base:5.2f} x previous_token (goal <= 2.5)")
        if lm_hits:
            worst = total - lm_random + lm_hits
            print(f"  LM head alone: {lm_random:.2f} s on random states, {lm_hits:.2f} s when every position is a hit")
            print(f"  {'total, copying works':15s} {worst:8.2f} s   {worst / base:5.2f} x previous_token")


if __name__ == "__main__":
    main()
