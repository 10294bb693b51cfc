# Scoring: download (or read) the weights of a checkpoint, score every head, write one Parquet
# row per head plus a JSON sidecar, then delete the downloaded weights.
#
# hf and local suites: rule `score`, one job per (run, checkpoint), so that adding checkpoints
# scores only the new ones and each job holds the weights of one checkpoint.
# toy suites: rule `score_run`, one job per run scoring all its checkpoints in one process. All
# of a toy run's checkpoints come from one `toy_train` job (a new step retrains the run), so
# per-checkpoint jobs would buy no rerun granularity, only a Python start (torch, transformers:
# ~5-7 CPU-s) per checkpoint. Same outputs; only one of the two rules exists in a suite's DAG.
#
# Params are the rerun triggers, and only what changes a score is one: batch size, threads and
# weight deletion are read from the config by the script, so changing them on a cluster never
# throws away finished checkpoints. The relational `detail` flag is per step
# (common.smk, relational_job_params): changing relational.detail_steps reruns only the
# checkpoints whose flag flips under `score`, and the whole `score_run` job of each toy run
# (cheap: its other checkpoints are read back from the score cache).

if SOURCE == "toy":

    rule score_run:
        conda:
            "../envs/mechgen.yaml"
        input:
            unpack(score_inputs),
        output:
            table=expand(f"{RES}/scores/{{{{run}}}}/step{{step}}.parquet", step=STEPS),
            sidecar=expand(f"{RES}/scores/{{{{run}}}}/step{{step}}.json", step=STEPS),
            # As rule `score`'s circuit output, per step.
            **(
                {
                    "circuit": expand(
                        f"{RES}/scores/{{{{run}}}}/step{{step}}.circuit.npz", step=STEPS
                    )
                }
                if RELATIONAL_ENABLED
                else {}
            ),
        params:
            run=lambda wc: run_info(wc.run),
            # The order of the outputs (and of `relational`).
            steps=STEPS,
            tokens_per_step=TOKENS_PER_STEP,
            clipped_window=SCORING["clipped_window"],
            relational=[relational_job_params(step) for step in STEPS],
        threads: SCORING["threads"]
        resources:
            mem_mb=lambda wc: score_mem_mb(RUNS[wc.run].size),
            # The checkpoints are scored one after another: the sum of their wall times.
            runtime=lambda wc: score_runtime_min(RUNS[wc.run].size) * max(len(STEPS), 1),
        log:
            f"{RES}/logs/score/{{run}}.log",
        script:
            "../../scripts/score_checkpoint.py"

else:

    rule score:
        conda:
            "../envs/mechgen.yaml"
        input:
            unpack(score_inputs),
        output:
            table=f"{RES}/scores/{{run}}/step{{step}}.parquet",
            sidecar=f"{RES}/scores/{{run}}/step{{step}}.json",
            # Offset profiles, spectra, W_QK factors; composition, ablation and CKA outputs at
            # the detail steps (workflow/rules/relational.smk).
            **(
                {"circuit": f"{RES}/scores/{{run}}/step{{step}}.circuit.npz"}
                if RELATIONAL_ENABLED
                else {}
            ),
        params:
            run=lambda wc: run_info(wc.run),
            tokens_per_step=TOKENS_PER_STEP,
            clipped_window=SCORING["clipped_window"],
            relational=lambda wc: relational_job_params(wc.step),
        threads: SCORING["threads"]
        resources:
            mem_mb=lambda wc: score_mem_mb(RUNS[wc.run].size),
            runtime=lambda wc: score_runtime_min(RUNS[wc.run].size),
        log:
            f"{RES}/logs/score/{{run}}/step{{step}}.log",
        script:
            "../../scripts/score_checkpoint.py"
