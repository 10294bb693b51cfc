"""Measure the toy suite's training: wall time per run and the emergence of 1-back heads.

For each (size, seed) this trains one run with :func:`mechgen.sources.toy.train_run`, then scores every
checkpoint on held-out sentences and prints, per checkpoint, the max over heads of the 1-back
score (mean over query positions 1..L-1 of A[i, i-1], then mean over sentences) next to its
uniform baseline (mean over positions of 1/(i+1)). With ``--induction`` it also scores every
checkpoint on [random tokens] x 2 sequences: the induction score of a head is the mean over
second-half positions p of A[p, p - T + 1] (the token after the previous occurrence of the
current token), T the length of the random block.

    python bench/toy_training.py --size '{"n_layers":2,"n_heads":4,"d_model":256}' --seeds 1 \
        --steps 1000 --out /tmp/toybench --induction

Runs with different seeds can be started as separate processes (``--threads 1`` each) to
mimic two Snakemake jobs on two cores; they share the tokenizer in ``--out/tokenizer``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from mechgen.sources import toy, toytext
from mechgen.sources.toy_tokenizer import train_tokenizer


def log_schedule(steps: int) -> list[int]:
    """0, 1, 2, 4, ..., powers of two below ``steps``, then every 128 steps from 256, and ``steps``."""
    out = [0] + [2**k for k in range(20) if 2**k < steps]
    out += list(range(256, steps, 128)) + [steps]
    return sorted(set(out))


@torch.no_grad()
def one_back_per_head(model: torch.nn.Module, encoded: list[torch.Tensor]) -> torch.Tensor:
    """[layers, heads] mean over sentences of mean over i in 1..L-1 of A[i, i-1]."""
    total = None
    for ids in encoded:
        attentions = model(input_ids=ids[None], output_attentions=True).attentions
        stacked = torch.stack([a[0] for a in attentions])  # [layers, heads, L, L]
        length = ids.shape[0]
        idx = torch.arange(1, length)
        per_head = stacked[:, :, idx, idx - 1].mean(-1)
        total = per_head if total is None else total + per_head
    return total / len(encoded)


@torch.no_grad()
def induction_per_head(
    model: torch.nn.Module, vocab_size: int, block: int = 32, n_seq: int = 20
) -> torch.Tensor:
    """[layers, heads] mean over sequences of mean over p in T..2T-1 of A[p, p-T+1]."""
    generator = torch.Generator().manual_seed(0)
    total = None
    for _ in range(n_seq):
        random_block = torch.randint(2, vocab_size, (block,), generator=generator)
        ids = torch.cat([random_block, random_block])
        attentions = model(input_ids=ids[None], output_attentions=True).attentions
        stacked = torch.stack([a[0] for a in attentions])
        query = torch.arange(block, 2 * block)
        per_head = stacked[:, :, query, query - block + 1].mean(-1)
        total = per_head if total is None else total + per_head
    return total / n_seq


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", required=True, help="JSON size spec {n_layers, n_heads, d_model[, d_ff]}"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--schedule", type=int, nargs="*", help="checkpoint steps (default: log-spaced)"
    )
    parser.add_argument("--n-sentences", type=int, default=100)
    parser.add_argument(
        "--induction", action="store_true", help="score induction on the last checkpoint"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--tag", default="", help="prefix of the run directories (to keep variants apart)"
    )
    args = parser.parse_args()

    from transformers import AutoTokenizer, GPTNeoXForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    size_spec = json.loads(args.size)
    tokenizer_dir = args.out / "tokenizer"
    if not (tokenizer_dir / "special_tokens_map.json").exists():
        train_tokenizer(tokenizer_dir, args.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    encoded = [
        torch.tensor(tokenizer(s)["input_ids"]) for s in toytext.heldout_sentences(args.n_sentences)
    ]
    uniform = sum(float((1.0 / torch.arange(2, len(e) + 1)).mean()) for e in encoded) / len(encoded)
    training = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "learning_rate": args.lr,
        "warmup_steps": args.warmup,
        "weight_decay": args.weight_decay,
    }
    schedule = args.schedule or log_schedule(args.steps)
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        run_dir = (
            args.out
            / f"{args.tag}{'x'.join(str(size_spec[k]) for k in ('n_layers', 'n_heads', 'd_model'))}-seed{seed}"
        )
        manifest = toy.train_run(
            tokenizer_dir,
            run_dir,
            size_spec,
            seed,
            training,
            schedule,
            args.vocab_size,
            threads=args.threads,
        )
        print(
            f"size={size_spec} seed={seed} n_params={manifest['n_params']} train_wall={manifest['wall_seconds']:.1f}s"
            f" train_cpu={manifest['cpu_seconds']:.1f}s"
            f" final_loss={manifest['final_loss']:.3f} uniform_1back={uniform:.3f}",
            flush=True,
        )
        t0 = time.perf_counter()
        trajectory = []
        for step in manifest["steps"]:
            model = GPTNeoXForCausalLM.from_pretrained(
                str(run_dir / f"step{step}"), attn_implementation="eager"
            )
            scores = one_back_per_head(model, encoded)
            flat = int(scores.argmax())
            layer, head = divmod(flat, scores.shape[1])
            trajectory.append((step, float(scores.max()), layer, head))
            induction_text = ""
            if args.induction:
                induction = induction_per_head(model, args.vocab_size)
                flat = int(induction.argmax())
                induction_text = f"  max induction {induction.max():.3f} (L{flat // induction.shape[1]}H{flat % induction.shape[1]})"
            print(
                f"  step {step:5d}  max 1-back {scores.max():.3f} (L{layer}H{head})"
                f"  loss {manifest['checkpoint_losses'].get(str(step), float('nan')):.3f}{induction_text}",
                flush=True,
            )
        if args.induction:
            print(
                f"  induction uniform baseline ~{float((1.0 / torch.arange(33, 65)).mean()):.3f}",
                flush=True,
            )
        peak = max(v for _, v, _, _ in trajectory)
        start = trajectory[0][1]
        half = next((s for s, v, _, _ in trajectory if v >= start + 0.5 * (peak - start)), None)
        print(
            f"  peak {peak:.3f} half-rise step {half} scoring_wall={time.perf_counter() - t0:.1f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
