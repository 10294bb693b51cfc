"""Small command-line helpers for mechgen.sh: ``python -m mechgen report-path [snakemake args]``.

``report-path`` prints where the HTML report of the suite selected by config.yaml (as modified by
the same ``--configfile``/``--config suite=...`` arguments that Snakemake gets) belongs.
"""

from __future__ import annotations

import sys

from mechgen.config import REPO_ROOT, load_yaml


def _report_path(args: list[str]) -> str:
    config = load_yaml(REPO_ROOT / "config.yaml")
    i = 0
    mode = None
    while i < len(args):
        arg = args[i]
        if arg in ("--configfile", "--configfiles"):
            mode = "configfile"
        elif arg == "--config":
            mode = "config"
        elif arg.startswith("-"):
            mode = None
        elif mode == "configfile":
            config.update(load_yaml(arg))
        elif mode == "config" and "=" in arg:
            key, value = arg.split("=", 1)
            if key in ("suite", "results_dir"):
                config[key] = value
        i += 1
    return f"{config.get('results_dir', 'results')}/{config['suite']}/report.html"


def main(argv: list[str]) -> int:
    if argv[:1] == ["report-path"]:
        print(_report_path(argv[1:]))
        return 0
    print("usage: python -m mechgen report-path [snakemake args]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
