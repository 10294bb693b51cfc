# mechgen: from checkpoints to per-head scores to cross-seed, cross-size correspondence.
# The suite to run is `suite:` in config.yaml (default: the embedded toy suite); when it names
# an entry of `studies:`, the combined study's analyses across model families run instead.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/study.smk"


if STUDY is None:

    include: "workflow/rules/common.smk"
    include: "workflow/rules/mechanisms.smk"
    include: "workflow/rules/toy.smk"
    include: "workflow/rules/eval.smk"
    include: "workflow/rules/relational.smk"
    include: "workflow/rules/score.smk"
    include: "workflow/rules/aggregate.smk"
    include: "workflow/rules/analysis.smk"
    include: "workflow/rules/report.smk"
    include: "workflow/rules/seeds.smk"

    rule all:
        input:
            final_targets(),
            relational_targets(),  # workflow/rules/relational.smk
            mechanism_targets(),  # workflow/rules/mechanisms.smk
            seeds_targets(),  # workflow/rules/seeds.smk (suites with `variation`)
            f"{RES}/summary.rst",  # workflow/rules/report.smk: the report opens with it
        default_target: True

else:

    include: "workflow/rules/families.smk"

    rule all:
        input:
            rules.families.output,
        default_target: True
