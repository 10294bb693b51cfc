# Aggregation: every (run, step) result into the tidy per-head table, the per-layer table
# (layers.parquet, from the sidecars' layer_scores) and the max-over-heads trajectories. A `table` suite imports published per-head tables instead of scoring.

if SOURCE == "table":

    rule import_table:
        conda:
            "../envs/mechgen.yaml"
        # Reads tables, no model: run on the submitting host, not as a cluster job.
        localrule: True
        output:
            heads=f"{RES}/heads.parquet",
        params:
            path=SPEC["path"],
            format=SPEC["format"],
            suite=SUITE,
        log:
            f"{RES}/logs/import_table.log",
        script:
            "../../scripts/import_table.py"

else:

    rule aggregate:
        conda:
            "../envs/mechgen.yaml"
        # Concatenates tables, no model: run on the submitting host, not as a cluster job.
        localrule: True
        input:
            score_files(),
        output:
            heads=f"{RES}/heads.parquet",
            layers=f"{RES}/layers.parquet",
            missing=f"{RES}/missing.csv",
            checkpoints=f"{RES}/checkpoints.csv",
        log:
            f"{RES}/logs/aggregate.log",
        script:
            "../../scripts/aggregate.py"


rule trajectories:
    conda:
        "../envs/mechgen.yaml"
    localrule: True
    input:
        heads=f"{RES}/heads.parquet",
    output:
        parquet=f"{RES}/trajectories.parquet",
        csv=f"{RES}/trajectories.csv",
    params:
        metric=ANALYSIS["metric"],
    log:
        f"{RES}/logs/trajectories.log",
    script:
        "../../scripts/trajectories.py"
