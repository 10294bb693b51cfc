#!/usr/bin/env bash
# Bring up a throw-away single-node SLURM cluster on this machine, for mechgen's cluster tests
# (tests/test_slurm.py). .ci/run calls it before the tests and .ci/slurm_down.sh after.
# Adapted from a recipe tested on Debian 12 with snakemake 9.27.1 and
# snakemake-executor-plugin-slurm 2.8.0 (Slurm 22.05); docs/cluster.md lists the pitfalls.
#
# Debian 12, run as root. Everything the daemons write (config, munge key, state,
# spool, logs, pid files, database) lives under PREFIX. Outside it: the apt
# packages, munged's socket in /run/munge (its default, which every Slurm tool
# finds), and the symlink /etc/slurm/slurm.conf (see SLURM_LINK_ETC). Clients find
# the cluster through that link or SLURM_CONF, so after this script:
#     source "$PREFIX/env.sh"      # exports SLURM_CONF
#     sinfo; sbatch --wrap hostname
#
# Usage: .ci/slurm_up.sh [PREFIX]          (default /tmp/mechgen-slurm)
# Environment knobs:
#   SLURM_ACCOUNTING=none|dbd   none (default): no slurmdbd. `sacct` then fails
#                               ("Slurm accounting storage is disabled"); job state
#                               comes from `squeue --states=all` for MinJobAge seconds
#                               (snakemake: --slurm-status-command squeue).
#                               dbd: also start MariaDB + slurmdbd, so sacct works.
#   SLURM_CPUS=N                CPUs to advertise (default: nproc). More than the real
#                               count is allowed (oversubscription for tiny test jobs).
#   SLURM_MEM_MB=N              RealMemory to advertise (default: 90% of MemTotal).
#   SLURM_MIN_JOB_AGE=S         seconds a finished job stays visible to squeue (default 300).
#   SKIP_APT=1                  do not apt-get install (packages already present).
#   SLURM_LINK_ETC=0            do not link /etc/slurm/slurm.conf to PREFIX/etc/slurm.conf.
#                               The link is needed by snakemake's slurm-jobstep plugin: it
#                               strips SLURM_CONF before its inner `srun`, so srun inside a
#                               job only finds the config at the default path.
# Stop everything again with .ci/slurm_down.sh PREFIX [--purge].
set -euo pipefail

PREFIX=${1:-${SLURM_PREFIX:-/tmp/mechgen-slurm}}
ACCOUNTING=${SLURM_ACCOUNTING:-none}
CPUS=${SLURM_CPUS:-$(nproc)}
MEM_MB=${SLURM_MEM_MB:-$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)}
MIN_JOB_AGE=${SLURM_MIN_JOB_AGE:-300}
CLUSTER=localcluster
NODE=localhost
DB_PORT=${SLURM_DB_PORT:-3306}

log() { printf '[slurm_up %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
case "$ACCOUNTING" in none|dbd) ;; *) die "SLURM_ACCOUNTING must be none or dbd" ;; esac
if [ -e "$PREFIX/run/slurmctld.pid" ] && kill -0 "$(cat "$PREFIX/run/slurmctld.pid")" 2>/dev/null; then
    die "a cluster is already running from $PREFIX (teardown first)"
fi

# ---------------------------------------------------------------- packages
if [ "${SKIP_APT:-0}" != 1 ]; then
    pkgs=(slurmctld slurmd slurm-client munge)
    [ "$ACCOUNTING" = dbd ] && pkgs+=(slurmdbd mariadb-server)
    missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # --no-install-recommends: slurm-wlm's recommends pull ~35 extra plugin packages
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi
for b in munged slurmctld slurmd sbatch; do command -v "$b" >/dev/null || die "$b not found"; done

# ---------------------------------------------------------------- layout
mkdir -p "$PREFIX"/{etc,state,spool,log,run,munge}
chmod 0700 "$PREFIX/munge"
CONF=$PREFIX/etc/slurm.conf

# ---------------------------------------------------------------- munge
# munged listens on its default socket, /run/munge/munge.socket.2: every Slurm tool
# (sacctmgr -> slurmdbd included) finds it there without AuthInfo settings.
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "a munged is already running on /run/munge; using it"
else
    if [ ! -s "$PREFIX/munge/munge.key" ]; then
        dd if=/dev/urandom of="$PREFIX/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 0400 "$PREFIX/munge/munge.key"
    mkdir -p /run/munge && chmod 0755 /run/munge   # socket dir must be world-searchable
    log "starting munged"
    munged \
        --key-file="$PREFIX/munge/munge.key" \
        --pid-file="$PREFIX/run/munged.pid" \
        --log-file="$PREFIX/log/munged.log" \
        --seed-file="$PREFIX/munge/munged.seed"
    munge -n | unmunge >/dev/null || die "munge self-test failed"
fi

# ---------------------------------------------------------------- accounting backend
if [ "$ACCOUNTING" = dbd ]; then
    log "starting MariaDB on 127.0.0.1:$DB_PORT"
    DATADIR=$PREFIX/mysql
    if [ ! -d "$DATADIR/mysql" ]; then
        mkdir -p "$DATADIR"
        mariadb-install-db --no-defaults --user=root --datadir="$DATADIR" \
            --auth-root-authentication-method=normal >"$PREFIX/log/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed (see $PREFIX/log/mariadb-install.log)"
    fi
    mariadbd --no-defaults --user=root --datadir="$DATADIR" \
        --bind-address=127.0.0.1 --port="$DB_PORT" \
        --socket="$PREFIX/run/mysqld.sock" --pid-file="$PREFIX/run/mysqld.pid" \
        --log-error="$PREFIX/log/mariadb.log" \
        --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
        </dev/null >>"$PREFIX/log/mariadb.log" 2>&1 &
    for _ in $(seq 60); do
        mariadb-admin --no-defaults --socket="$PREFIX/run/mysqld.sock" -uroot ping >/dev/null 2>&1 && break
        sleep 0.5
    done
    mariadb-admin --no-defaults --socket="$PREFIX/run/mysqld.sock" -uroot ping >/dev/null 2>&1 \
        || die "MariaDB did not come up (see $PREFIX/log/mariadb.log)"
    mariadb --no-defaults --socket="$PREFIX/run/mysqld.sock" -uroot <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
    cat >"$PREFIX/etc/slurmdbd.conf" <<CONFEOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$PREFIX/log/slurmdbd.log
PidFile=$PREFIX/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
CONFEOF
    chmod 0600 "$PREFIX/etc/slurmdbd.conf"
    ACCOUNTING_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
    ACCOUNTING_LINES="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

# ---------------------------------------------------------------- slurm.conf
cat >"$CONF" <<CONFEOF
# Generated by mechgen's .ci/slurm_up.sh: single node, no cgroups, root daemons.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# No cgroups: works in containers / VMs without a delegated cgroup tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Config values win over what slurmd detects (allows SLURM_CPUS > real cores).
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Jobs that ask for no memory must not claim the whole node.
DefMemPerCPU=256
MinJobAge=$MIN_JOB_AGE
StateSaveLocation=$PREFIX/state
SlurmdSpoolDir=$PREFIX/spool
SlurmctldPidFile=$PREFIX/run/slurmctld.pid
SlurmdPidFile=$PREFIX/run/slurmd.pid
SlurmctldLogFile=$PREFIX/log/slurmctld.log
SlurmdLogFile=$PREFIX/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
$ACCOUNTING_LINES
JobCompType=jobcomp/filetxt
JobCompLoc=$PREFIX/log/jobcomp.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONFEOF
printf 'export SLURM_CONF=%q\n' "$CONF" >"$PREFIX/env.sh"
export SLURM_CONF=$CONF
if [ "${SLURM_LINK_ETC:-1}" = 1 ]; then
    mkdir -p /etc/slurm
    if [ -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; then
        [ "$(readlink /etc/slurm/slurm.conf || true)" = "$CONF" ] \
            || die "/etc/slurm/slurm.conf exists and is not ours; remove it or set SLURM_LINK_ETC=0"
    else
        ln -s "$CONF" /etc/slurm/slurm.conf
    fi
fi

# ---------------------------------------------------------------- daemons
if [ "$ACCOUNTING" = dbd ]; then
    log "starting slurmdbd"
    slurmdbd  # finds slurmdbd.conf in the directory of $SLURM_CONF
    for _ in $(seq 30); do
        timeout 5 sacctmgr -n list cluster >/dev/null 2>&1 && break
        sleep 1
    done
    timeout 5 sacctmgr -n list cluster >/dev/null 2>&1 || die "slurmdbd not answering (see $PREFIX/log/slurmdbd.log)"
    sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
fi
log "starting slurmctld and slurmd"
slurmctld -c -f "$CONF"   # -c: start from empty job state
slurmd -f "$CONF" -N "$NODE"

for _ in $(seq 60); do
    state=$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null || true)
    case "$state" in idle|mixed|allocated) break ;; esac
    sleep 0.5
done
case "$state" in
    idle|mixed|allocated) ;;
    *) tail -n 20 "$PREFIX/log/slurmctld.log" "$PREFIX/log/slurmd.log" >&2 || true
       die "node $NODE is '$state', not idle" ;;
esac

# ---------------------------------------------------------------- smoke test
jobid=$(sbatch --parsable -o "$PREFIX/log/smoke-%j.out" --wrap 'srun hostname') \
    || die "sbatch failed"
for _ in $(seq 120); do
    jstate=$(squeue -h -j "$jobid" --states=all -o '%T' 2>/dev/null || true)
    case "$jstate" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) break ;; esac
    sleep 0.5
done
[ "$jstate" = COMPLETED ] || die "smoke job $jobid ended as '$jstate': $(cat "$PREFIX/log/smoke-$jobid.out" 2>/dev/null)"
log "ready: cluster $CLUSTER, node $NODE ($CPUS CPUs, $MEM_MB MB), accounting=$ACCOUNTING, smoke job $jobid ok"
log "use it with: source $PREFIX/env.sh"
