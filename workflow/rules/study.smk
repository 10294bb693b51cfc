# A combined study (config `studies:`; `suite:` names one): the suites it combines have run their
# own pipelines under results/<member>/; this reads their tables (nothing is rescored) and writes
# the comparison across model families under results/<study>/ (mechgen/stats/families.py).
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir)))

from snakemake.exceptions import WorkflowError

from mechgen.config import (
    ConfigError,
    is_study,
    study_members,
    suite_family,
    tokens_per_step,
    validate_config,
)

try:
    _validated = validate_config(config)
except ConfigError as exc:
    raise WorkflowError(f"invalid configuration: {exc}") from None
config.update(_validated)

STUDY = config["suite"] if is_study(config) else None


def study_mechanisms():
    """The mechanisms every member analyses, in the first member's order."""
    lists = [config["suites"][m]["mechanisms"] for m in study_members(config)]
    return [name for name in lists[0] if all(name in other for other in lists[1:])]


def study_member_info():
    """Per member: suite, family, tokens per step, stats directory, whether it has the
    relational tables (params of rule `families`)."""
    return [
        {
            "suite": m,
            "family": suite_family(config, m),
            "tokens_per_step": tokens_per_step(config, m),
            "stats_dir": f"{config['results_dir']}/{m}/stats",
            "relational": config["suites"][m]["source"] != "table"
            and bool(config["relational"]["enabled"]),
        }
        for m in study_members(config)
    ]


def study_inputs():
    from mechgen.stats.families import Member, member_files

    files = []
    for info in study_member_info():
        member = Member(info["suite"], info["family"], info["tokens_per_step"], Path(info["stats_dir"]))
        files += [str(p) for p in member_files(member, study_mechanisms(), info["relational"])]
    return files


if STUDY is not None:
    STUDY_RES = f"{config['results_dir']}/{STUDY}"
    _missing = [p for p in study_inputs() if not Path(p).exists()]
    if _missing:
        _suites = sorted({Path(p).relative_to(config["results_dir"]).parts[0] for p in _missing})
        raise WorkflowError(
            f"study {STUDY!r} reads its members' results, and {len(_missing)} file(s) are "
            f"missing, e.g. {_missing[0]}: run each member first "
            f"({'; '.join(f'./mechgen.sh run --config suite={s}' for s in _suites)})"
        )
