#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, on loopback only: try the sbatch scripts without a
# cluster (the tests run them this way).
#
#   slurm/local_cluster.sh start DIR   # installs slurm + munge if missing (Debian/Ubuntu, root),
#                                      # starts munged, slurmctld, slurmd with everything under DIR
#   export SLURM_CONF=DIR/slurm.conf   # then sbatch / squeue / scontrol talk to it
#   slurm/local_cluster.sh stop DIR    # cancels its jobs and stops the three daemons
#
# Nothing system-wide is configured: the key, socket, state, spool, logs and pid files live in DIR.
# CPUs come from nproc; processes are tracked without cgroups (proctrack/linuxproc, task/none).
set -euo pipefail

die() { echo "local_cluster: $*" >&2; exit 2; }

action=${1:-}
dir=${2:-}
[[ $action == start || $action == stop ]] || die "usage: $0 start|stop DIR"
[[ -n $dir ]] || die "usage: $0 $action DIR"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf=$dir/slurm.conf

install_if_missing() {
    local missing=()
    for cmd in slurmctld slurmd sbatch munged; do
        command -v "$cmd" > /dev/null || [[ -x /usr/sbin/$cmd ]] || missing+=("$cmd")
    done
    ((${#missing[@]} == 0)) && return
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}: install slurm-wlm and munge (needs root: apt-get install slurmctld slurmd slurm-client munge)"
    command -v apt-get > /dev/null || die "missing ${missing[*]} and no apt-get: install Slurm and MUNGE with your package manager"
    echo "local_cluster: installing slurm and munge with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Fresh machines have no package lists yet; install first, update only when that fails.
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge > "$dir/apt.log" 2>&1 ||
        { apt-get update -q > "$dir/apt.log" 2>&1 &&
          apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >> "$dir/apt.log" 2>&1; } ||
        die "apt-get could not install slurm and munge (log: $dir/apt.log)"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
    local host cpus mem ctld_port slurmd_port
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    cat > "$conf" <<EOF
# Written by slurm/local_cluster.sh: a one-node test cluster on loopback.
ClusterName=msa-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$dir/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    local munged=/usr/sbin/munged
    [[ -f $dir/munge.key ]] || { head -c 1024 /dev/urandom > "$dir/munge.key"; chmod 600 "$dir/munge.key"; }
    # --force: the key and socket live in a test directory, not in munge's own locked-down ones
    "$munged" --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
        --log-file="$dir/log/munged.log" --seed-file="$dir/munge.seed" ||
        die "munged did not start (log: $dir/log/munged.log)"
}

wait_idle() {
    for _ in $(seq 1 60); do
        state=$(SLURM_CONF=$conf sinfo -h -o %T 2> /dev/null || true)
        [[ $state == idle* ]] && return
        sleep 0.5
    done
    die "the node did not become idle (state: ${state:-none}; logs: $dir/log)"
}

stop_pidfile() {
    local file=$1 pid
    [[ -f $file ]] || return 0
    pid=$(cat "$file")
    if [[ -n $pid ]] && kill -0 "$pid" 2> /dev/null; then
        kill "$pid"
        for _ in $(seq 1 40); do kill -0 "$pid" 2> /dev/null || break; sleep 0.25; done
    fi
    rm -f "$file"
}

if [[ $action == start ]]; then
    install_if_missing
    write_conf
    start_munge
    export SLURM_CONF=$conf
    /usr/sbin/slurmctld -c -i -f "$conf" || die "slurmctld did not start (log: $dir/log/slurmctld.log)"
    /usr/sbin/slurmd -f "$conf" || die "slurmd did not start (log: $dir/log/slurmd.log)"
    wait_idle
    echo "local_cluster: up; export SLURM_CONF=$conf"
else
    if [[ -f $conf ]]; then
        SLURM_CONF=$conf scancel --full --quiet --user "$(id -un)" 2> /dev/null || true
    fi
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munged.pid"
    echo "local_cluster: stopped"
fi
