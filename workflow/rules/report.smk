# The report's opening summary: the key numbers per size, read from the statistics tables.
# workflow/report/workflow.rst includes summary.rst; summary.csv is attached to the report.


rule summary:
    # Reads small tables: run on the submitting host, not as a cluster job.
    localrule: True
    conda:
        "../envs/mechgen.yaml"
    input:
        unpack(summary_inputs),
    output:
        csv=report(
            f"{RES}/summary.csv",
            caption="../report/summary.rst",
            category="Tables",
            labels={"table": "summary.csv"},
        ),
        rst=f"{RES}/summary.rst",
    params:
        suite=SUITE,
        metric=ANALYSIS["metric"],
        confidence=ANALYSIS["bootstrap"]["confidence"],
        stats_dir=f"{RES}/stats/",
    log:
        f"{RES}/logs/summary.log",
    script:
        "../../scripts/summary.py"
