#!/usr/bin/env bash
# mechgen's front door; `./mechgen.sh --help` lists the commands. Creates the virtual environment
# on first use (except for --help). Environment: MECHGEN_VENV (default .venv), CORES (default 2).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${MECHGEN_VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac

usage() {
    cat <<USAGE
usage: ./mechgen.sh COMMAND [ARGS]

commands:
  run [snakemake args]     run the whole DAG (default: the embedded toy suite; minutes), then
                           build results/<suite>/report.html. With -n/--dry-run, --help or a
                           listing option, only Snakemake runs (no jobs, no report).
  resume [snakemake args]  after a crash or kill: stop jobs the dead run left running, unlock,
                           rerun what is unfinished (finished jobs are kept), then the report
  test [pytest args]       run the tests on \$CORES workers (e.g. ./mechgen.sh test -m "not slow")
  setup                    only (re)install the virtual environment (\$MECHGEN_VENV, default .venv)
  help, -h, --help         print this help

environment: MECHGEN_VENV (default .venv), CORES (parallel jobs of a local run, test workers;
             default 2)
USAGE
}

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
    # Never pip-install into something that is not a venv (e.g. MECHGEN_VENV=/usr).
    if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
        echo "mechgen: MECHGEN_VENV=$VENV exists but is not a virtual environment (no pyvenv.cfg)" >&2
        exit 2
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.mechgen-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        # torch is pinned in pyproject.toml (2.13.0, CPU build on this machine). uv installs
        # the same pins as pip in about a quarter of pip's CPU time; pip is the fallback.
        if ! uv_install; then
            echo "mechgen: installing with uv failed; installing with pip" >&2
            "$VENV/bin/python" -m pip install -q --upgrade pip
            "$VENV/bin/python" -m pip install -q -e '.[dev]'
        fi
        touch "$stamp"
    fi
}

# uv does not read pip's configuration, so what pip would use (pip.conf and PIP_* variables:
# indexes, local wheel directories such as the one holding the CPU torch, constraints) is
# passed on. pip takes the best version from all its indexes; uv does so only when told.
uv_install() {
    local args
    "$VENV/bin/python" -m pip install -q uv || return 1
    mapfile -t args < <("$VENV/bin/python" -m pip config list 2>/dev/null | "$VENV/bin/python" -c '
import shlex, sys
flags = {"find-links": "--find-links", "index-url": "--index-url",
         "extra-index-url": "--extra-index-url", "constraint": "--constraint"}
seen = []
for line in sys.stdin:
    key, _, value = line.strip().partition("=")
    flag = flags.get(key.rpartition(".")[2])
    for item in shlex.split(value)[0].split() if flag and value else ():
        if (flag, item) not in seen:
            seen.append((flag, item))
for flag, item in seen:
    print(flag)
    print(item)
')
    "$VENV/bin/python" -m uv pip install -q --python "$VENV/bin/python" \
        --index-strategy unsafe-best-match "${args[@]}" -e '.[dev]'
}

# Build results/<suite>/report.html. `snakemake --report` logs "Loading script code for rule X"
# for every rule at INFO level, which only `--quiet all` hides, and that hides errors too; so
# its output is shown only when it fails.
report() {
    local path out
    path=$(python -m mechgen report-path "$@")
    # The report opens with the summary (rule `summary`); a run of a partial target (e.g.
    # heads.parquet) has not made it yet, and the report would fail on it.
    if [ ! -f "$(dirname "$path")/summary.rst" ]; then
        echo "report: not built, $(dirname "$path")/summary.rst is missing (a partial target?); run the whole pipeline for $path"
        return 0
    fi
    if ! out=$(snakemake --cores 1 "$@" --report "$path" 2>&1); then
        printf '%s\n' "$out" >&2
        echo "mechgen: building $path failed" >&2
        return 1
    fi
    python -m mechgen retitle-report "$path"
    echo "report: $path"
}

# Run the DAG supervised (mechgen/runguard.py): in its own session, recorded in
# .snakemake/mechgen-run.json, and whatever of it outlives the Snakemake process is stopped.
run_dag() {
    # shellcheck disable=SC2046
    python -m mechgen.runguard exec -- snakemake $(cores_args "$@") "$@"
}

if [ $# -eq 0 ]; then
    usage >&2
    exit 2
fi
cmd=$1
shift
case "$cmd" in
    help|-h|--help)
        usage
        ;;
    setup)
        setup
        ;;
    run|resume)
        setup
        export PATH="$VENV/bin:$PATH"
        check_configs "$@"
        if ! python -m mechgen.runguard runs-jobs "$@"; then
            # A dry run, --help, a listing: Snakemake once, no jobs to supervise, no report.
            # shellcheck disable=SC2046
            exec snakemake $(cores_args "$@") "$@"
        fi
        # Jobs of an earlier run that was killed with its supervisor must not race this one.
        python -m mechgen.runguard stop
        if [ "$cmd" = resume ]; then
            snakemake --unlock "$@"
            run_dag --rerun-incomplete "$@"
        else
            run_dag "$@"
        fi
        report "$@"
        ;;
    test)
        setup
        export PATH="$VENV/bin:$PATH"
        # $CORES pytest-xdist workers (-n 0 in the arguments: one process); worksteal hands a
        # worker that runs out of tests part of the other's queue.
        exec python -m pytest -n "${CORES:-2}" --dist worksteal "$@"
        ;;
    *)
        echo "mechgen: unknown command '$cmd'" >&2
        usage >&2
        exit 2
        ;;
esac
