"""A synthetic per-head table with two catalog mechanisms whose onset order is planted."""

from __future__ import annotations

import numpy as np
import pandas as pd

STEPS = (0, 1, 3, 7, 15, 31, 63, 127, 255, 511, 1023)
SIZES = (("small", 2, 2, 1_000_000), ("big", 3, 2, 10_000_000))
EVAL_LENGTHS = [11, 11]
HALF_LENGTH = 10


def planted_heads(seeds=(1, 2, 3), sizes=SIZES, never=()) -> pd.DataFrame:
    """Per run: a previous-token head at (0, 0) whose one_back rises at log10(step + 1) = 1 +
    0.2 seed-rank, and an induction head at (n_layers - 1, 1) rising 1 decade later; every
    other head sits at the uniform level. ``never``: runs whose induction head never rises."""
    rng = np.random.default_rng(0)
    one_back_null = float(np.mean(1 / np.arange(2, 12)))
    induction_null = float(np.mean(1 / (np.arange(HALF_LENGTH, 2 * HALF_LENGTH) + 1.0)))
    rows = []
    for size, n_layers, n_heads, n_params in sizes:
        for rank, seed in enumerate(seeds):
            run = f"syn-{size}-seed{seed}"
            mid = 1.0 + 0.2 * rank
            for step in STEPS:
                x = np.log10(step + 1)
                prev = 1 / (1 + np.exp(-6 * (x - mid)))
                ind = 0.0 if run in never else 1 / (1 + np.exp(-6 * (x - mid - 1.0)))
                for layer in range(n_layers):
                    for head in range(n_heads):
                        noise = 0.002 * rng.standard_normal(2)
                        one_back = one_back_null + noise[0]
                        induction = induction_null + noise[1]
                        if (layer, head) == (0, 0):
                            one_back += 0.8 * prev
                        if (layer, head) == (n_layers - 1, 1):
                            induction += 0.7 * ind
                        rows.append(
                            {
                                "suite": "syn",
                                "model": f"syn-{size}",
                                "size": size,
                                "seed": seed,
                                "run": run,
                                "step": step,
                                "tokens_seen": step * 8,
                                "layer": layer,
                                "head": head,
                                "n_layers": n_layers,
                                "n_heads": n_heads,
                                "n_params": n_params,
                                "one_back": one_back,
                                "induction": induction,
                                "induction_control": induction_null,
                                "nonfinite": False,
                            }
                        )
    return pd.DataFrame(rows)
