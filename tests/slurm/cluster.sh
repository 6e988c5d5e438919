#!/usr/bin/env bash
# A single-node SLURM cluster for the tests: munged, slurmctld and slurmd, as root, with every
# file (config, state, logs, pid files, munge socket) in one folder.
#
#   tests/slurm/cluster.sh install       apt-get Debian's slurmctld, slurmd, slurm-client, munge
#   tests/slurm/cluster.sh up DIR        start the daemons (state, logs and pid files in DIR)
#   tests/slurm/cluster.sh down DIR      stop the daemons this script started there, by their pid
#
# The config goes where every SLURM command finds it, /etc/slurm/slurm.conf (the executor plugin's
# job steps drop SLURM_CONF from the environment), and only when no other config is there; `down`
# removes it again.
# The node has the machine's CPUs and memory and one GPU gres backed by /dev/null (a job asking
# for a GPU is placed and sees CUDA_VISIBLE_DEVICES, but has no GPU). Accounting is off, so
# `sacct` has nothing: Snakemake's executor asks `squeue` (--slurm-status-command squeue).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
CONF=/etc/slurm/slurm.conf
MARK="# written by snakembed's tests/slurm/cluster.sh"

die() { echo "cluster.sh: $*" >&2; exit 1; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "installing ${PACKAGES[*]} needs root"
    command -v apt-get >/dev/null || die "no apt-get: install ${PACKAGES[*]} by hand"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" \
        >/dev/null || {
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${PACKAGES[@]}" >/dev/null
    }
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 10))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    die "$what did not come up in $seconds s; see the logs in $DIR"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

up() {
    [ "$(id -u)" = 0 ] || die "the daemons run as root here; run as root"
    mkdir -p "$DIR/state" "$DIR/spool"
    local host cpus memory
    host=$(hostname -s)
    cpus=$(nproc)
    memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    local key=/etc/munge/munge.key
    if [ ! -s "$key" ]; then
        key="$DIR/munge.key"
        dd if=/dev/urandom of="$key" bs=1 count=1024 2>/dev/null
        chmod 600 "$key"
    fi
    if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and is not ours: this machine has a SLURM setup; not replacing it"
    fi
    mkdir -p /etc/slurm
    cat >"$CONF" <<CONF
$MARK
ClusterName=snakembed-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge.sock
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
GresTypes=gpu
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    printf '%s\nName=gpu File=/dev/null\n' "$MARK" >/etc/slurm/gres.conf
    munged --force --socket="$DIR/munge.sock" --key-file="$key" \
        --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed"
    wait_for 10 munged test -S "$DIR/munge.sock"
    slurmctld -i -f "$CONF"
    wait_for 30 slurmctld scontrol ping
    slurmd -f "$CONF" -N "$host"
    wait_for 60 "the node" sh -c "sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)'"
}

down() {
    local name pid
    for name in slurmd slurmctld munged; do
        [ -s "$DIR/$name.pid" ] || continue
        pid=$(cat "$DIR/$name.pid")
        # only a daemon of that name started here: the pid may have been reused since
        if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$name"; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/$name.pid"
    done
    for conf in "$CONF" /etc/slurm/gres.conf; do
        if [ -e "$conf" ] && grep -qF "$MARK" "$conf"; then rm -f "$conf"; fi
    done
}

case "${1:-}" in
    install) install ;;
    up) DIR=$(realpath -m "${2:?usage: cluster.sh up DIR}"); install; up ;;
    down) DIR=$(realpath -m "${2:?usage: cluster.sh down DIR}"); down ;;
    *) die "usage: cluster.sh install | up DIR | down DIR" ;;
esac
