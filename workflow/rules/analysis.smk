# Analyses: the functional, positional and developmental axes, the statistics and the figures.
# Analysis parameters are params of these rules only, so changing them never rescores.
# STATS, FIGURES and analysis_targets() are defined in common.smk.

rule analyze:
    conda:
        "../envs/mechgen.yaml"
    input:
        heads=f"{RES}/heads.parquet",
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
        metric=ANALYSIS.get("metric", "one_back"),
        thresholds=ANALYSIS.get("onset_thresholds", {"start": 0.01, "stop": 0.30, "step": 0.01}),
        functional_multiple=ANALYSIS.get("functional_multiple", 2.0),
        bootstrap=ANALYSIS.get("bootstrap", {}),
        positional=ANALYSIS.get("positional", {}),
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
        metric=ANALYSIS.get("metric", "one_back"),
        functional_multiple=ANALYSIS.get("functional_multiple", 2.0),
    log:
        f"{RES}/logs/figures.log",
    script:
        "../../scripts/figures.py"
