#!/usr/bin/env bash
# Stop the cluster started by .ci/slurm_up.sh and (with --purge) delete its files.
# Usage: .ci/slurm_down.sh [PREFIX] [--purge]      (default /tmp/mechgen-slurm)
# Only the daemons whose pid files are under PREFIX are signalled.
set -uo pipefail

PREFIX=${SLURM_PREFIX:-/tmp/mechgen-slurm}
PURGE=0
for a in "$@"; do
    case "$a" in --purge) PURGE=1 ;; *) PREFIX=$a ;; esac
done

log() { printf '[slurm_down] %s\n' "$*" >&2; }

# Cancel leftover jobs first so slurmstepd processes exit cleanly.
if [ -f "$PREFIX/etc/slurm.conf" ] && [ -f "$PREFIX/run/slurmctld.pid" ]; then
    SLURM_CONF=$PREFIX/etc/slurm.conf timeout 10 scancel --full --quiet --user root 2>/dev/null || true
fi

stop_pidfile() {  # name pidfile
    local name=$1 pidfile=$2 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile" 2>/dev/null)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name did not stop, sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

# Order: compute daemon, controller, accounting, database, then authentication.
stop_pidfile slurmd "$PREFIX/run/slurmd.pid"
stop_pidfile slurmctld "$PREFIX/run/slurmctld.pid"
stop_pidfile slurmdbd "$PREFIX/run/slurmdbd.pid"
stop_pidfile mariadbd "$PREFIX/run/mysqld.pid"
stop_pidfile munged "$PREFIX/run/munged.pid"

# Remove the /etc/slurm/slurm.conf link only if setup made it and it still points here.
if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$PREFIX/etc/slurm.conf" ]; then
    rm -f /etc/slurm/slurm.conf
    log "removed /etc/slurm/slurm.conf link"
fi

if [ "$PURGE" = 1 ] && [ -d "$PREFIX" ]; then
    rm -rf -- "$PREFIX"
    log "removed $PREFIX"
fi
log "done"
