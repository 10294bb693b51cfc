# Analyses: the functional, positional and developmental axes, the statistics and the figures.
# Analysis parameters are params of these rules only, so changing them never rescores.
# STATS, FIGURES and analysis_targets() are defined in common.smk.

rule analyze:
    conda:
        "../envs/mechgen.yaml"
    input:
        heads=f"{RES}/heads.parquet",
        # The max over heads of analysis.metric, computed once by rule `trajectories`.
        trajectories=f"{RES}/trajectories.parquet",
        tokens=eval_token_files,
    output:
        # Attached to the report (category Tables) so it carries the numbers behind the figures.
        **{
            name: report(
                f"{RES}/stats/{name}.csv",
                caption="../report/table.rst",
                category="Tables",
                labels={"table": f"{name}.csv"},
            )
            for name in STATS
        },
    params:
        token_files=run_token_files(),
        thresholds=ANALYSIS["onset_thresholds"],
        functional_multiple=ANALYSIS["functional_multiple"],
        bootstrap=ANALYSIS["bootstrap"],
        positional=ANALYSIS["positional"],
        tokens_per_step=TOKENS_PER_STEP,
    log:
        f"{RES}/logs/analyze.log",
    script:
        "../../scripts/analyze.py"


rule figures:
    conda:
        "../envs/mechgen.yaml"
    input:
        heads=f"{RES}/heads.parquet",
        trajectories=f"{RES}/trajectories.parquet",
        tokens=eval_token_files,
        **{name: f"{RES}/stats/{name}.csv" for name in STATS},
    output:
        **{
            name: report(
                f"{RES}/figures/{name}.png",
                caption=f"../report/{name}.rst",
                category="Figures",
            )
            for name in FIGURES
        },
    params:
        metric=ANALYSIS["metric"],
        functional_multiple=ANALYSIS["functional_multiple"],
    log:
        f"{RES}/logs/figures.log",
    script:
        "../../scripts/figures.py"
