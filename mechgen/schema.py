"""Column names of mechgen's tidy tables.

The per-head table (``results/<suite>/heads.parquet``, and one Parquet file per (run, step)
under ``results/<suite>/scores/``) has one row per suite x model x seed x step x layer x head.
Layers and heads are 0-indexed.
"""

from __future__ import annotations

RUN_ID_COLUMNS = ["suite", "model", "size", "seed", "run", "n_params"]
"""What identifies a training run in the per-run and per-link tables (n_params as the study
counts it)."""
RUN_SHAPE_COLUMNS = [*RUN_ID_COLUMNS, "n_layers", "n_heads"]
"""A run's identity and its model's shape (0-indexed layers and heads counted)."""

ID_COLUMNS = [
    "suite",  # suite name from config.yaml
    "model",  # size label with the suite prefix, e.g. "pythia-70m", "toy-small"
    "size",  # bare size label, e.g. "70m", "small"
    "seed",  # int; 0 is the original Pythia run
    "run",  # run id, e.g. "pythia-70m-seed3"
    "step",  # optimiser step of the checkpoint
    "tokens_seen",  # step x tokens per step
    "layer",  # 0-indexed
    "head",  # 0-indexed
    "n_layers",
    "n_heads",
    "n_params",  # all parameters of the causal LM, embeddings and LM head included
]

LAYER_COLUMNS = [*RUN_SHAPE_COLUMNS, "step", "tokens_seen", "layer"]
"""Id columns of the per-layer table (``results/<suite>/layers.parquet``): one row per suite x
model x seed x step x layer, then one column per layer-level score (a layer-unit mechanism's
``score_column``, from the scoring sidecars' ``layer_scores``)."""

ATTENTION_METRICS = [
    "one_back",  # mean over query positions 1..L-1 of A[i, i-1]
    "self_attention",  # mean over query positions 0..L-1 of A[i, i]
    "first_token",  # mean over query positions 1..L-1 of A[i, 0]
    "first_token_ref",  # the reference study's version: mean over 0..L-1 of A[i, 0]
    "prev_self_ratio",  # per sentence one_back / self_attention, then the mean
    "prev_uniform_ratio",  # per sentence one_back x L, then the mean
    "entropy",  # mean over query positions of -sum_j A[i,j] log A[i,j], nats
    "mean_distance",  # mean over query positions of sum_j A[i,j] (i - j), tokens
    "clipped_distance",  # the same with (i - j) clipped at the window W, tokens
    "received_concentration",  # 1 - normalised entropy of the attention keys 1..L-2 receive
]
"""Per-head attention metrics; each is computed per sentence, then the unweighted mean over
sentences (``received_concentration``: over the sentences of >= 4 tokens)."""

FLAG_COLUMNS = [
    "nonfinite",  # True when this head's attention had NaN/inf on any sentence
]

HEAD_COLUMNS = ID_COLUMNS + ATTENTION_METRICS + FLAG_COLUMNS

CIRCUIT_COLUMNS = [
    "induction",  # mean over [random]x2 sequences and second-half positions p of A[p, p-L+1]
    "induction_control",  # the same positions on sequences whose halves differ (positional control)
    "duplicate_token",  # mean over [random]x2 sequences and second-half positions p of A[p, p-L]
    "duplicate_token_control",  # the same positions on sequences whose halves differ
    "copying_accuracy",  # per checkpoint (same on every head row): top-1 copying on [random]x2
]
"""Columns the scoring job appends after HEAD_COLUMNS when ``relational.enabled``
(mechgen.scoring.circuit); absent (and NaN after aggregation) otherwise."""

WEIGHT_COLUMNS = [
    "successor",  # fraction of (token, successor) pairs whose successor tops the OV logits, mean over tasks
    "successor_permuted",  # the same with each task's targets deranged (control)
    "successor_chance",  # per run (same on every row): mean over kept tasks of 1 / task size
    "copy_suppression",  # mean normalised rank of the own OV logit among K frequent tokens, 1 = lowest
    "copying",  # 1 - copy_suppression: 1 = the own logit highest
]
"""Columns of the weight-based mechanisms (mechgen.model.weight_scores: successor heads, copy
suppression and copying), which the scoring job appends when the run's eval_tokens record holds
the successor task."""

TRAJECTORY_COLUMNS = [
    "suite",
    "model",
    "size",
    "seed",
    "run",
    "step",
    "tokens_seen",
    "n_layers",
    "n_heads",
    "n_params",
    "metric",
    "value",  # max over all heads of all layers
    "argmax_layer",
    "argmax_head",
]
