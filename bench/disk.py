"""Peak disk use of the hub cache during a real scoring sweep: is it jobs x one checkpoint?

Weights are streamed: each scoring job downloads one checkpoint, scores it, deletes it
(``scoring.delete_weights``). So at any moment the hub cache should hold at most one weight
file per running job (plus config/tokenizer files and, during a download, its temporary file,
which is renamed, not copied). This benchmark checks that on a simulated grid:

1. random GPT-NeoX checkpoints (default 2 runs x 8 steps, ~12.6 MB each; step index 1 is a
   byte copy of step index 0, as Pythia's step0/step1) are served by tests/support/fakehub.py on
   127.0.0.1 as ``EleutherAI/pythia-14m-seed{1..runs}`` (throttled to ``--mb-per-s``);
2. the real Snakemake DAG runs an ``hf`` suite over them with ``--cores N`` (HF_HOME in tmp,
   HF_ENDPOINT at the fake hub), target ``results/<suite>/heads.parquet``;
3. a background thread measures the hub cache every ``--poll-s`` (du-like: allocated blocks,
   each inode once) and the bytes of weight files in it (blobs larger than 1 MB and partial
   downloads).

Prints the peak against the bound ``cores x largest checkpoint`` as a ratio, and the download
count (one GET per distinct weight blob expected).

    python bench/disk.py                       # 2 runs x 8 steps, 2 cores
    python bench/disk.py --runs 3 --steps 6 --mb-per-s 20
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
# The fake hub and the offline cache builder are test support code (tests/support/).
sys.path.insert(0, str(REPO_ROOT / "tests"))

from support.fakehub import (
    FakeHub,
    save_random_checkpoint,
    tiny_gpt_neox_config,
    train_tiny_tokenizer,
)

from mechgen.sources.hubcache import directory_bytes

SUITE = "diskbench"
WEIGHT_MIN_BYTES = 1_000_000
EVAL_TEXT = "\n".join(
    [
        "the cat sat on the mat",
        "a dog ran far away from the cat",
        "the small bird sang in the old tree",
        "we walked to the river and back again",
    ]
    * 5
)


def weight_bytes(hub_cache: Path) -> int:
    """Allocated bytes of weight files in the cache: blobs over 1 MB and partial downloads."""
    total = 0
    for blob in hub_cache.glob("models--*/blobs/*"):
        try:
            info = blob.lstat()
        except FileNotFoundError:
            continue
        if blob.name.endswith(".incomplete") or info.st_size > WEIGHT_MIN_BYTES:
            total += info.st_blocks * 512
    return total


class DiskSampler(threading.Thread):
    """Polls the size of ``path`` every ``poll_s`` seconds until stopped; keeps the peaks."""

    def __init__(self, path: Path, poll_s: float) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.poll_s = poll_s
        self.peak_total = 0
        self.peak_weights = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_total = max(self.peak_total, directory_bytes(self.path))
            self.peak_weights = max(self.peak_weights, weight_bytes(self.path))
            self.samples += 1
            self._stop_event.wait(self.poll_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument(
        "--mb-per-s", type=float, default=50.0, help="download rate of the fake hub"
    )
    parser.add_argument("--poll-s", type=float, default=0.05)
    parser.add_argument("--max-concurrent-downloads", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=1800)
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="mechgen-disk-"))
    try:
        tokenizer = train_tiny_tokenizer(root / "tokenizer")
        config = tiny_gpt_neox_config(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=4,
        )
        steps = [0, 1] + [2 ** (k + 1) for k in range(args.steps - 2)]
        hub = FakeHub(max_seconds=args.timeout_s + 60, bytes_per_s=args.mb_per_s * 1e6)
        largest = 0
        for seed in range(1, args.runs + 1):
            revisions = {}
            for index, step in enumerate(steps):
                step_dir = root / "ckpt" / f"seed{seed}" / f"step{step}"
                if index == 1:  # step1 = step0's bytes, as in Pythia
                    shutil.copytree(root / "ckpt" / f"seed{seed}" / f"step{steps[0]}", step_dir)
                else:
                    save_random_checkpoint(
                        step_dir, config, seed=1000 * seed + step, tokenizer_dir=tokenizer
                    )
                largest = max(largest, (step_dir / "model.safetensors").stat().st_size)
                revisions[f"step{step}"] = step_dir
            hub.add_checkpoints(root / "server", f"EleutherAI/pythia-14m-seed{seed}", revisions)
        (root / "eval.txt").write_text(EVAL_TEXT + "\n")
        overlay = {
            "suite": SUITE,
            "hub": {"max_concurrent_downloads": args.max_concurrent_downloads},
            "suites": {
                SUITE: {
                    "source": "hf",
                    "model_prefix": "pythia-",
                    "repo_template": "EleutherAI/pythia-{size}-seed{seed}",
                    "sizes": ["14m"],
                    "seeds": list(range(1, args.runs + 1)),
                    "schedule": steps,
                    "tokens_per_step": 2048,
                    "tokenizer_revision": f"step{steps[-1]}",
                    "eval": {"kind": "file", "path": str(root / "eval.txt")},
                }
            },
        }
        (root / "overlay.yaml").write_text(yaml.safe_dump(overlay))
        hf_home = root / "hf_home"
        hub_cache = hf_home / "hub"
        hub_cache.mkdir(parents=True)

        with hub:
            sampler = DiskSampler(hub_cache, args.poll_s)
            sampler.start()
            started = time.monotonic()
            cmd = [
                sys.executable, "-m", "snakemake",
                "--snakefile", str(REPO_ROOT / "Snakefile"),
                "--directory", str(root / "work"),
                "--configfile", str(REPO_ROOT / "config.yaml"), str(root / "overlay.yaml"),
                "--cores", str(args.cores),
                f"results/{SUITE}/heads.parquet",
            ]  # fmt: skip
            result = subprocess.run(
                cmd,
                check=False,
                env=hub.client_env(hf_home),
                capture_output=True,
                text=True,
                timeout=args.timeout_s,
            )
            elapsed = time.monotonic() - started
            sampler.stop()
            if result.returncode != 0:
                print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
                print(f"snakemake failed (exit {result.returncode})")
                return 1
            weight_gets = hub.count("GET", "model.safetensors", status=200)
            concurrent_gets = hub.max_concurrency("GET", "model.safetensors")
        final = directory_bytes(hub_cache)

        n_checkpoints = args.runs * len(steps)
        distinct = args.runs * (len(steps) - 1)
        bound = args.cores * largest
        print(
            f"grid: {args.runs} runs x {len(steps)} steps = {n_checkpoints} checkpoints ({distinct} distinct weight blobs), "
            f"largest weight file {largest / 1e6:.2f} MB; --cores {args.cores}; sweep {elapsed:.1f} s; {sampler.samples} samples"
        )
        print(
            f"weight downloads (GET 200): {weight_gets} (distinct blobs: {distinct}); most at once: {concurrent_gets}"
        )
        print(f"bound = cores x largest checkpoint = {bound / 1e6:.2f} MB")
        print(
            f"peak weight bytes in the HF cache: {sampler.peak_weights / 1e6:.2f} MB  (ratio to bound {sampler.peak_weights / bound:.2f})"
        )
        print(
            f"peak total HF cache (weights + config/tokenizer files): {sampler.peak_total / 1e6:.2f} MB  (ratio {sampler.peak_total / bound:.2f})"
        )
        print(
            f"HF cache after the sweep: {final / 1e6:.3f} MB; all weights streamed (total if kept: {distinct * largest / 1e6:.1f} MB)"
        )
        return 0 if sampler.peak_weights <= bound else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this process never needs the hub itself
    sys.exit(main())
