# The relational (1-back head -> induction head) and configurational (head shape across runs)
# axes. Their per-checkpoint scores come from scoring (rule `score`, or `score_run` for toy
# suites, which write scores/<run>/step<N>.circuit.npz next to the per-head table); the rules
# here only analyse, so changing `relational.analysis` plans no scoring job.

# RELATIONAL settings, targets and input functions are defined in common.smk.

if RELATIONAL_ENABLED:

    rule relational:
        # Reads small arrays, no model: run on the submitting host, not as a cluster job.
        localrule: True
        conda:
            "../envs/mechgen.yaml"
        input:
            heads=f"{RES}/heads.parquet",
            circuits=circuit_files(),
        output:
            **{
                name: report(
                    f"{RES}/stats/{name}.csv",
                    caption="../report/table.rst",
                    category="Tables",
                    labels={"table": f"{name}.csv"},
                )
                for name in RELATIONAL_STATS
            },
            trajectories=f"{RES}/relational_trajectories.parquet",
        params:
            thresholds=ANALYSIS["onset_thresholds"],
            analysis=RELATIONAL["analysis"],
        log:
            f"{RES}/logs/relational.log",
        script:
            "../../scripts/relational.py"

    rule relational_figures:
        localrule: True
        conda:
            "../envs/mechgen.yaml"
        input:
            trajectories=f"{RES}/relational_trajectories.parquet",
            **{name: f"{RES}/stats/{name}.csv" for name in RELATIONAL_STATS},
        output:
            **{
                name: report(
                    f"{RES}/figures/{name}.png",
                    caption=f"../report/{name}.rst",
                    category="Relational and configurational",
                )
                for name in RELATIONAL_FIGURES
            },
        params:
            half_length=relational_job_params(0)["half_length"],
        log:
            f"{RES}/logs/relational_figures.log",
        script:
            "../../scripts/relational_figures.py"
