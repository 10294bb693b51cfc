"""A cheap fingerprint of a checkpoint's weights, computed in the scoring job from the loaded model.

The lineage check (:mod:`mechgen.stats.lineage`, which also compares two fingerprints) compares
checkpoints without keeping their weights:
the blob sha256 says whether two files are identical, and this fingerprint how close two
checkpoints are. It is a fixed sample of the matrix entries: every parameter with ndim >= 2
(embeddings, attention and MLP matrices; biases and LayerNorm gains are left out since they
start at the same constants in every run), in sorted name order, flattened and concatenated;
from that vector of N entries, :data:`N_SAMPLE` positions drawn without replacement by
``numpy.random.default_rng(SAMPLE_SEED)`` and sorted. The same architecture gives the same
positions in every checkpoint, so two samples are comparable entry by entry. Two independent
random inits give a cosine near 0 (SD ~ 1/sqrt(N_SAMPLE) = 0.03), a checkpoint and its own
init a cosine near 1 early in training.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

N_SAMPLE = 1024
"""Entries in a fingerprint."""
SAMPLE_SEED = 0
"""Seed of the sampled positions (fixed: every checkpoint of one architecture shares them)."""


def weight_fingerprint(model: Any) -> dict[str, Any]:
    """``{"n_entries", "n_sample", "sample_seed", "sample", "norm", "sample_sha256"}`` of
    ``model``'s matrices.

    ``n_entries``: N, the entries of every ndim >= 2 parameter; ``sample``: the
    min(N_SAMPLE, N) values at the sampled positions (float32, printed to 7 significant digits,
    as a list); ``norm``: the L2 norm of all N entries (float32 per parameter, relative error
    ~1e-6); ``sample_sha256``: sha256 of the float32 sample's bytes (equal samples: almost surely
    equal weights).
    """
    params = sorted((name, p) for name, p in model.named_parameters() if p.ndim >= 2)
    sizes = [p.numel() for _, p in params]
    total = int(sum(sizes))
    positions = np.sort(
        np.random.default_rng(SAMPLE_SEED).choice(total, size=min(N_SAMPLE, total), replace=False)
    )
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    sample = np.empty(len(positions), dtype=np.float32)
    sq = 0.0
    for i, (_, p) in enumerate(params):
        flat = p.detach().reshape(-1).float()
        # float32 norm per parameter: no float64 copy of a 50k x 1024 embedding in the job.
        sq += float(torch.linalg.vector_norm(flat)) ** 2
        lo, hi = np.searchsorted(positions, [offsets[i], offsets[i + 1]])
        if hi > lo:
            idx = positions[lo:hi] - offsets[i]
            sample[lo:hi] = flat[idx].cpu().numpy()
    return {
        "n_entries": total,
        "n_sample": len(positions),
        "sample_seed": SAMPLE_SEED,
        "sample": [float(f"{v:.7g}") for v in sample],
        "norm": sq**0.5,
        "sample_sha256": hashlib.sha256(sample.tobytes()).hexdigest(),
    }
