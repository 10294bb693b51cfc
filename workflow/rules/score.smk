# Scoring: one job per (run, checkpoint). Download (or read) the weights, score every head,
# write one Parquet row per head plus a JSON sidecar, then delete the downloaded weights.


rule score:
    conda:
        "../envs/mechgen.yaml"
    input:
        unpack(score_inputs),
    output:
        table=f"{RES}/scores/{{run}}/step{{step}}.parquet",
        sidecar=f"{RES}/scores/{{run}}/step{{step}}.json",
        # Offset profiles, spectra, W_QK factors; composition, ablation and CKA outputs at the
        # detail steps (workflow/rules/relational.smk).
        **(
            {"circuit": f"{RES}/scores/{{run}}/step{{step}}.circuit.npz"}
            if RELATIONAL_ENABLED
            else {}
        ),
    params:
        run=lambda wc: run_info(wc.run),
        tokens_per_step=TOKENS_PER_STEP,
        # Only what changes a score is a param (a rerun trigger): batch size, threads and
        # weight deletion are read from the config by the script, so changing them on a
        # cluster never throws away finished checkpoints.
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
