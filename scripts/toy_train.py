"""Snakemake script of rule `toy_train`: train one toy run and save its hub-style checkpoints.

Snakemake: input.tokenizer (or input[0]) = the suite's ``tokenizer.json``; output.manifest (or
output[0]) = ``<run dir>/manifest.json``, whose directory receives ``step{N}/`` (``checkpoint-{N}/``
for params.architecture gpt2); params:
size_spec ({n_layers, n_heads, d_model[, d_ff]}), seed (int), data_seed and weight_seed (ints:
batch order and init; mechgen.variation), training ({steps, batch_size,
seq_len, learning_rate, warmup_steps, weight_decay[, threads]}), schedule (list of steps, each
<= training.steps), vocab_size (int); threads = torch threads; log[0] optional.

Command line (for testing)::

    python scripts/toy_train.py TOKENIZER_DIR OUT_DIR --size '{"n_layers":2,"n_heads":2,"d_model":128}' \
        --seed 1 --training '{"steps":20,"batch_size":4,"seq_len":32,"learning_rate":0.003,
        "warmup_steps":5,"weight_decay":0.01}' --schedule 0 1 2 4 8 16 20
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mechgen.sources import toy

if "snakemake" in globals():
    from _common import setup_logging

    sm = snakemake  # noqa: F821
    log = setup_logging(sm)
    tokenizer_json = Path(sm.input.get("tokenizer", sm.input[0]))
    manifest_path = Path(sm.output.get("manifest", sm.output[0]))
    if manifest_path.name != "manifest.json":
        sys.exit(f"mechgen: toy_train's output must be named manifest.json, got {manifest_path}")
    # The run id labels the progress lines in the main log (jobs run in parallel).
    run = getattr(getattr(sm, "wildcards", None), "run", None)
    manifest = toy.train_run(
        tokenizer_json.parent,
        manifest_path.parent,
        size_spec=dict(sm.params.size_spec),
        seed=int(sm.params.seed),
        data_seed=int(sm.params.data_seed),
        weight_seed=int(sm.params.weight_seed),
        training=dict(sm.params.training),
        schedule=[int(s) for s in sm.params.schedule],
        vocab_size=int(sm.params.vocab_size),
        threads=int(sm.threads),
        progress_label=f"train {run}" if run else None,
        architecture=str(sm.params.get("architecture", "gpt_neox")),
    )
    log.info(
        "toy run seed %d: %d steps saved, %d parameters, final loss %.3f, %.1f s wall, %.1f s CPU",
        manifest["seed"],
        len(manifest["steps"]),
        manifest["n_params"],
        manifest["final_loss"],
        manifest["wall_seconds"],
        manifest["cpu_seconds"],
    )
else:
    import argparse

    parser = argparse.ArgumentParser(description="Train one toy run (hub-style checkpoints).")
    parser.add_argument("tokenizer_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", required=True, help="JSON size spec")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--data-seed", type=int, help="batch order (default: --seed)")
    parser.add_argument("--weight-seed", type=int, help="initialisation (default: --seed)")
    parser.add_argument("--training", required=True, help="JSON training config")
    parser.add_argument("--schedule", type=int, nargs="+", required=True)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--architecture", default="gpt_neox", choices=["gpt_neox", "gpt2"])
    args = parser.parse_args()
    manifest = toy.train_run(
        args.tokenizer_dir,
        args.out_dir,
        size_spec=json.loads(args.size),
        seed=args.seed,
        data_seed=args.data_seed,
        weight_seed=args.weight_seed,
        training=json.loads(args.training),
        schedule=args.schedule,
        vocab_size=args.vocab_size,
        threads=args.threads,
        architecture=args.architecture,
    )
    print(json.dumps(manifest, indent=2))
