# Data order or initialisation (issue 13): for a suite with `variation` (mechgen.variation), the
# lineage check of every run's checkpoints and the split of the seed variance by source.
# SEEDS_ENABLED, seed_runs(), seed_sources_inputs() and seeds_targets() are in common.smk.


rule lineage:
    localrule: True
    conda:
        "../envs/mechgen.yaml"
    input:
        sidecars=[f"{RES}/scores/{run}/step{step}.json" for run in RUNS for step in STEPS],
    output:
        lineage=report(
            f"{RES}/stats/lineage.csv",
            caption="../report/table.rst",
            category="Seed sources",
            labels={"table": "lineage.csv"},
        ),
    params:
        runs=seed_runs(("kind", "init_group")),
    log:
        f"{RES}/logs/lineage.log",
    script:
        "../../scripts/lineage.py"


rule seed_sources:
    localrule: True
    conda:
        "../envs/mechgen.yaml"
    input:
        unpack(seed_sources_inputs),
    output:
        table=report(
            f"{RES}/stats/seed_sources.csv",
            caption="../report/table.rst",
            category="Seed sources",
            labels={"table": "seed_sources.csv"},
        ),
        figure=report(
            f"{RES}/figures/seed_sources.png",
            caption="../report/seed_sources.rst",
            category="Seed sources",
        ),
    params:
        runs=seed_runs(("kind", "base_size")),
        token_files=run_token_files(),
        mechanisms=MECHANISMS,
        settings=mechanism_null_settings(),
        confidence=ANALYSIS["bootstrap"]["confidence"],
        n_resamples=ANALYSIS["bootstrap"]["n_resamples"],
        seed=ANALYSIS["bootstrap"]["seed"],
    log:
        f"{RES}/logs/seed_sources.log",
    script:
        "../../scripts/seed_sources.py"
