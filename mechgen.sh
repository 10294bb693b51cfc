#!/usr/bin/env bash
# mechgen's front door. Creates the virtual environment on first use, then:
#   ./mechgen.sh run [snakemake args]    run the whole DAG (default: the embedded toy suite),
#                                        then build results/<suite>/report.html
#   ./mechgen.sh resume [snakemake args] after a crash or kill: unlock, then rerun what is
#                                        unfinished (finished jobs are kept), then the report
#   ./mechgen.sh test [pytest args]      run the test suite
#   ./mechgen.sh setup                   only (re)install the environment
# Environment: MECHGEN_VENV (default .venv), CORES (default 2).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${MECHGEN_VENV:-.venv}

# A profile (e.g. profiles/slurm) sets its own `cores`; only a plain run gets --cores.
cores_args() {
    case " $* " in
        *" --profile "*|*" --profile="*|*" --workflow-profile "*) ;;
        *) echo "--cores ${CORES:-2}" ;;
    esac
}

# Snakemake's message for a YAML error names no file, line or column: check the config files first.
check_configs() {
    python -m mechgen check-config config.yaml --snakemake "$@"
}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.mechgen-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        # torch is pinned in pyproject.toml (2.13.0, CPU build on this machine).
        "$VENV/bin/python" -m pip install -q -e '.[dev]'
        touch "$stamp"
    fi
}

cmd=${1:-run}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup)
        setup
        ;;
    run)
        setup
        export PATH="$PWD/$VENV/bin:$PATH"
        check_configs "$@"
        # shellcheck disable=SC2046
        snakemake $(cores_args "$@") "$@"
        report=$(python -m mechgen report-path "$@")
        snakemake --cores 1 "$@" --report "$report"
        echo "report: $report"
        ;;
    resume)
        setup
        export PATH="$PWD/$VENV/bin:$PATH"
        check_configs "$@"
        snakemake --unlock "$@"
        # shellcheck disable=SC2046
        snakemake $(cores_args "$@") --rerun-incomplete "$@"
        report=$(python -m mechgen report-path "$@")
        snakemake --cores 1 "$@" --report "$report"
        echo "report: $report"
        ;;
    test)
        setup
        export PATH="$PWD/$VENV/bin:$PATH"
        exec python -m pytest "$@"
        ;;
    *)
        echo "usage: $0 {run|resume|test|setup} [args]" >&2
        exit 2
        ;;
esac
