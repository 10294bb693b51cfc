# The comparison across model families of a combined study (workflow/rules/study.smk).


rule families:
    localrule: True
    conda:
        "../envs/mechgen.yaml"
    input:
        study_inputs(),
    output:
        families=report(
            f"{STUDY_RES}/stats/families.csv",
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "families.csv"},
        ),
        models=report(
            f"{STUDY_RES}/stats/families_models.csv",
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "families_models.csv"},
        ),
        profiles=f"{STUDY_RES}/stats/families_profile.csv",
        trajectories=report(
            f"{STUDY_RES}/figures/families_trajectories.png",
            caption="../report/families_trajectories.rst",
            category="Across families",
        ),
        heatmap=report(
            f"{STUDY_RES}/figures/families_profile.png",
            caption="../report/families_profile.rst",
            category="Across families",
        ),
        summary=f"{STUDY_RES}/summary.rst",
    params:
        study=STUDY,
        members=study_member_info(),
        mechanisms=study_mechanisms(),
        bootstrap=config["analysis"]["bootstrap"],
        n_permutations=config["analysis"]["positional"]["n_permutations"],
    log:
        f"{STUDY_RES}/logs/families.log",
    script:
        "../../scripts/families.py"
