# The mechanism catalog on the table side: every mechanism of the suite's `mechanisms:` through
# the axes (stats/<mechanism>/), the cross-mechanism tables and the generalizability profile.
# Included before the other analyses so that the profile opens the report.
# MECHANISMS, MECHANISM_TABLES, CROSS_STATS, mechanism_targets() and mechanism_caption_params()
# are defined in common.smk.


rule mechanisms:
    localrule: True
    conda:
        "../envs/mechgen.yaml"
    input:
        unpack(mechanism_inputs),
    output:
        **{
            f"{name}__{table}": f"{RES}/stats/{name}/{table}.csv"
            for name in MECHANISMS
            for table in MECHANISM_TABLES
        },
        **{
            name: report(
                f"{RES}/stats/{name}.csv",
                caption="../report/table.rst",
                category="Tables",
                labels={"table": f"{name}.csv"},
            )
            for name in CROSS_STATS
        },
    params:
        token_files=run_token_files(),
        mechanisms=MECHANISMS,
        settings=mechanism_null_settings(),
        thresholds=ANALYSIS["onset_thresholds"],
        tokens_per_step=TOKENS_PER_STEP,
        confidence=ANALYSIS["bootstrap"]["confidence"],
        seed=ANALYSIS["bootstrap"]["seed"],
        n_permutations=ANALYSIS["positional"]["n_permutations"],
        alignment_cost=ANALYSIS["positional"]["alignment_cost"],
        configurational=mechanism_configurational_settings(),
    log:
        f"{RES}/logs/mechanisms.log",
    script:
        "../../scripts/mechanisms.py"


rule mechanism_figures:
    localrule: True
    conda:
        "../envs/mechgen.yaml"
    input:
        profile=f"{RES}/stats/profile.csv",
    output:
        profile=report(
            f"{RES}/figures/profile.png",
            caption="../report/profile.rst",
            category="Across mechanisms",  # sorts first in the report's menu
        ),
    log:
        f"{RES}/logs/mechanism_figures.log",
    script:
        "../../scripts/mechanism_figures.py"


rule mechanism_figure:
    localrule: True
    conda:
        "../envs/mechgen.yaml"
    input:
        run_step=f"{RES}/stats/{{mechanism}}/functional_run_step.csv",
        sizes=f"{RES}/stats/{{mechanism}}/functional_size.csv",
        per_seed=f"{RES}/stats/{{mechanism}}/per_seed.csv",
        profile=f"{RES}/stats/profile.csv",
    output:
        figure=report(
            f"{RES}/figures/mechanisms/{{mechanism}}.png",
            caption="../report/mechanism.rst",
            category="Mechanism: {mechanism}",  # one report section per mechanism
        ),
    wildcard_constraints:
        mechanism="|".join(MECHANISMS) if MECHANISMS else "(?!)",
    params:
        mechanism=mechanism_caption_params,
    log:
        f"{RES}/logs/mechanism_figure/{{mechanism}}.log",
    script:
        "../../scripts/mechanism_figure.py"
