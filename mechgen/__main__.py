"""Small command-line helpers for mechgen.sh.

``python -m mechgen report-path [snakemake args]`` prints where the HTML report of the suite
selected by config.yaml (as modified by the same ``--configfile``/``--config suite=...``
arguments that Snakemake gets) belongs.

``python -m mechgen retitle-report PATH`` gives the built HTML report at PATH
(``results/<suite>/report.html``) a title naming its suite (:mod:`mechgen.report`).

``python -m mechgen check-config [FILE...] [--snakemake ARGS...]`` checks that each FILE, and
each ``--configfile``/``--configfiles`` file among Snakemake's ARGS, parses as a YAML mapping;
for each that does not it prints ``FILE:LINE:COLUMN: message`` and the exit status is 2.
(Snakemake's own message names none of the three.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from mechgen.config import REPO_ROOT, SCHEMA_PATH, load_yaml, yaml_problem
from mechgen.report import retitle

USAGE = (
    "usage: python -m mechgen report-path [snakemake args]\n"
    "       python -m mechgen check-config [FILE...] [--snakemake ARGS...]\n"
    "       python -m mechgen retitle-report PATH"
)


def _configfiles(args: list[str]) -> list[str]:
    """The files given to Snakemake's ``--configfile``/``--configfiles`` in ``args``."""
    files = []
    taking = False
    for arg in args:
        if arg.startswith(("--configfile=", "--configfiles=")):
            files.append(arg.split("=", 1)[1])
            taking = False
        elif arg in ("--configfile", "--configfiles"):
            taking = True
        elif arg.startswith("-"):
            taking = False
        elif taking:
            files.append(arg)
    return files


def _report_path(args: list[str]) -> str:
    config = load_yaml(REPO_ROOT / "config.yaml")
    for path in _configfiles(args):
        config.update(load_yaml(path))
    i = 0
    mode = None
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            mode = "config"
        elif arg.startswith("-"):
            mode = None
        elif mode == "config" and "=" in arg:
            key, value = arg.split("=", 1)
            if key in ("suite", "results_dir"):
                config[key] = value
        i += 1
    results_dir = (
        config.get("results_dir") or load_yaml(SCHEMA_PATH)["properties"]["results_dir"]["default"]
    )
    return f"{results_dir}/{config['suite']}/report.html"


def _check_config(args: list[str]) -> int:
    if "--snakemake" in args:
        cut = args.index("--snakemake")
        files = args[:cut] + _configfiles(args[cut + 1 :])
    else:
        files = list(args)
    problems = [p for p in map(yaml_problem, files) if p]
    for problem in problems:
        print(f"mechgen: invalid config file: {problem}", file=sys.stderr)
    return 2 if problems else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["report-path"]:
        print(_report_path(argv[1:]))
        return 0
    if argv[:1] == ["check-config"]:
        return _check_config(argv[1:])
    if argv[:1] == ["retitle-report"] and len(argv) == 2:
        path = Path(argv[1])
        retitle(path, path.parent.name)  # results/<suite>/report.html
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
