"""Cost of the mechanism catalog per ordinary checkpoint, relative to the previous-token pass.

For each model shape (random weights: the time does not depend on the values), on one thread,
this times what the scoring job runs for each mechanism at an ordinary (non-detail) step:

- ``previous_token``: :func:`mechgen.scoring.metrics.score_heads` over ``--n-sentences`` token lists
  (Natural-Stories-like lengths, batch 16): the baseline. The locality mechanism's
  ``received_concentration`` is computed in the same hooks (no pass of its own);
- ``induction+controls``: :func:`mechgen.scoring.relational.score_induction_with_control` on
  N x [L random ids] x 2 and the positional controls' N x [the same L ids, L other ids]: per
  batch the shared first halves run once (key/value cache), then the repeated second halves
  (induction, and duplicate-token's attention read in the same pass, plus the LM head on the
  second half for copying accuracy; ``--no-copying`` skips it; the in-context retrieval
  logit lens read by hooks on every block in the same pass, which then runs through the last
  layer's MLP) and the control second halves against that cache;
- ``weights``: :func:`mechgen.model.weight_scores.score_weight_mechanisms`, successor heads
  and copy suppression from the weights alone, with the task items of Pythia's tokenizer
  (``tests/data/pythia-tokenizer``) and the evaluation text's frequent tokens.

For comparison (not in the total): ``induction alone`` (:func:`mechgen.scoring.relational.score_induction`)
and ``controls alone`` (:func:`mechgen.scoring.circuit.positional_controls`), each with its own first-half
passes, as two separate calls would run them; their sum minus ``induction+controls`` is what the
shared first halves save; ``induction+controls, no retrieval``: the same passes without the
in-context retrieval hooks (``retrieval=False``), whose difference to ``induction+controls`` is
what that layer-level mechanism costs.

The copying-accuracy LM head skips the positions a few unembedding rows provably refute
(``mechgen.scoring.relational._refuted_positions``): with random weights nearly all of them. Where
copying works no position is refuted and the full product runs, so the bench also times the
LM head on hidden states aimed at their targets (every position a hit) and prints the catalog
total for that case (``copying works``), apart from the total.

Detail steps (K-composition, ablation, CKA outputs) run at ``relational.detail_steps`` only and
are measured apart by ``bench/relational.py``. Each time is the median of ``--repeats`` runs,
taken round-robin (every part once per round, so a change of the machine's load over the run
falls on all parts alike), in CPU seconds of this process (``time.process_time``; one thread,
so less sensitive to other processes on a shared machine than wall time) or with ``--wall``
in wall seconds. Printed: seconds per part and each part's ratio to ``previous_token``; the
catalog's total ratio (goal: at most 2.5).

    python bench/mechanisms.py --shapes pythia-70m pythia-410m --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
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
from tokenizers import Tokenizer

from mechgen.mechanisms import successor
from mechgen.model.weight_scores import WeightTasks, score_weight_mechanisms
from mechgen.scoring.circuit import control_half, positional_controls
from mechgen.scoring.metrics import score_heads
from mechgen.scoring.relational import (
    _copying_hits,
    make_repeated_sequences,
    score_induction,
    score_induction_with_control,
)

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


def interleaved_medians(
    parts: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Per part, the median of ``repeats`` timings on ``clock``, the parts run round-robin."""
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(repeats):
        for name, function in parts.items():
            start = clock()
            function()
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_shape(name: str, args: argparse.Namespace, rel) -> dict[str, float]:
    model = rel.build(rel.SHAPES[name])
    hi = min(model.config.vocab_size, 50277)
    rng = np.random.default_rng(0)
    sentences = natural_stories_like(args.n_sentences, hi, rng)
    sequences = make_repeated_sequences(
        lo=2, hi=hi, n_sequences=args.n_sequences, half_length=args.half_length, seed=0
    )
    others = control_half(sequences)
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
    parts: dict[str, Callable[[], object]] = {
        "previous_token": lambda: score_heads(model, sentences, batch_size=16, clipped_window=8),
        "induction+controls": lambda: score_induction_with_control(
            model, sequences, others, 16, copying
        ),
        "weights": lambda: score_weight_mechanisms(model, tasks),
        "induction+controls, no retrieval": lambda: score_induction_with_control(
            model, sequences, others, 16, copying, retrieval=False
        ),
        "induction alone": lambda: score_induction(model, sequences, copying=copying),
        "controls alone": lambda: positional_controls(model, sequences, 16),
    }
    if copying:
        # The LM head alone on the N x (L - 1) copying positions: random hidden states (as with
        # random weights) and states aimed at their targets (every position a hit: nothing
        # refuted, the full product runs).
        ids = torch.as_tensor(sequences.input_ids)
        half = args.half_length
        weight = model.get_output_embeddings().weight.detach()
        targets = ids[:, half + 1 : 2 * half]
        random_states = torch.randn(ids.shape[0], half - 1, weight.shape[1])
        aimed = 3 * weight[targets]

        def lm_head(states: torch.Tensor) -> Callable[[], object]:
            def run() -> int:
                with torch.inference_mode():
                    return _copying_hits(model, states, targets)

            return run

        parts["lm_head_random"] = lm_head(random_states)
        parts["lm_head_hits"] = lm_head(aimed)
    clock = time.perf_counter if args.wall else time.process_time
    return interleaved_medians(parts, args.repeats, clock)


COMPARISON = ("induction+controls, no retrieval", "induction alone", "controls alone")
"""Parts timed for comparison only, not summed into the catalog's total."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["pythia-70m", "pythia-410m"])
    parser.add_argument("--n-sentences", type=int, default=666)
    parser.add_argument("--n-sequences", type=int, default=100)
    parser.add_argument("--half-length", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-copying", action="store_true")
    parser.add_argument("--wall", action="store_true", help="wall time instead of CPU time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rel = _relational_bench()
    clock = "wall" if args.wall else "CPU"
    print(f"torch {torch.__version__}, 1 thread, {clock} seconds, median of {args.repeats} (round-robin)")
    for name in args.shapes:
        times = bench_shape(name, args, rel)
        base = times["previous_token"]
        lm_random = times.pop("lm_head_random", 0.0)
        lm_hits = times.pop("lm_head_hits", 0.0)
        comparison = {part: times.pop(part) for part in COMPARISON}
        total = sum(times.values())
        print(f"\n## {name} ({args.n_sentences} sentences, N = {args.n_sequences}, L = {args.half_length})")
        for part, seconds in times.items():
            print(f"  {part:20s} {seconds:8.2f} s   {seconds / base:5.2f} x previous_token")
        print(f"  {'catalog total':20s} {total:8.2f} s   {total / base:5.2f} x previous_token (goal <= 2.5)")
        if lm_hits:
            worst = total - lm_random + lm_hits
            print(f"  LM head alone: {lm_random:.2f} s on random states, {lm_hits:.2f} s when every position is a hit")
            print(f"  {'total, copying works':20s} {worst:8.2f} s   {worst / base:5.2f} x previous_token")
        for part, seconds in comparison.items():
            print(f"  ({part:18s} {seconds:8.2f} s   {seconds / base:5.2f} x previous_token)")
        # Like for like: the two separate calls read no retrieval either.
        separate = comparison["induction alone"] + comparison["controls alone"]
        shared = comparison["induction+controls, no retrieval"]
        retrieval = times["induction+controls"] - shared
        print(
            f"  in-context retrieval costs {retrieval:.2f} s "
            f"({retrieval / base:.2f} x previous_token) in the shared passes"
        )
        print(
            f"  shared first halves save {separate - shared:.2f} s "
            f"({(separate - shared) / base:.2f} x previous_token) against the two separate calls"
        )


if __name__ == "__main__":
    main()
