#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for the launch tests (and for trying the sbatch
# scripts by hand). Debian's slurmctld/slurmd/munge; every daemon is private to DIR: its own munge
# key and socket, one slurmctld and two `slurmd -N n1|n2` on 127.0.0.1 with distinct ports.
#
#   slurm_cluster.sh install      install slurmctld slurmd slurm-client munge (apt) if missing;
#                                 exit 3 with one line if that is impossible here
#   slurm_cluster.sh start DIR    write DIR/slurm.conf, start the daemons, wait for both nodes idle
#   slurm_cluster.sh stop DIR     stop the daemons that `start DIR` started (by their recorded pids)
#
# Clients then need SLURM_CONF=DIR/slurm.conf (sbatch, srun, scontrol, sinfo).
set -euo pipefail

readonly PACKAGES=(slurmctld slurmd slurm-client munge)
readonly COMMANDS=(slurmctld slurmd sbatch srun scontrol sinfo munged)

install_slurm() {
    local missing=()
    for cmd in "${COMMANDS[@]}"; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        echo "Slurm is not installed (${missing[*]} missing) and cannot be: needs root and apt-get" >&2
        return 3
    fi
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}"; } >&2; then
        echo "Slurm could not be installed: apt-get install ${PACKAGES[*]} failed" >&2
        return 3
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
    local dir=$1 ctld_port n1_port n2_port
    ctld_port=$(free_port)
    n1_port=$(free_port)
    n2_port=$(free_port)
    cat >"$dir/slurm.conf" <<EOF
ClusterName=epruntime-test
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# sbatch --wait polls after 2 s, then every 8 s while MinJobAge/2 <= 8 (else every 32 s); a job's
# record must outlive one poll, so 16 s
MinJobAge=16
# job ids (and the ports derived from them) differ between clusters started side by side
FirstJobId=$((RANDOM * 30 + 1000))
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=n1 NodeAddr=127.0.0.1 Port=$n1_port CPUs=8 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=$n2_port CPUs=8 State=UNKNOWN
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

# Start one daemon in the foreground, in the background of this shell, and record its pid.
spawn() {
    local dir=$1 name=$2
    shift 2
    "$@" </dev/null >>"$dir/log/$name.out" 2>&1 &
    echo "$!" >>"$dir/pids"
}

start_cluster() {
    local dir=$1
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    dir=$(cd "$dir" && pwd)
    : >"$dir/pids"
    head -c 1024 /dev/urandom >"$dir/munge.key"
    chmod 600 "$dir/munge.key"
    write_conf "$dir"
    export SLURM_CONF=$dir/slurm.conf
    spawn "$dir" munged munged --foreground --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" \
        --pid-file="$dir/munged.pid" --seed-file="$dir/munged.seed" --log-file="$dir/log/munged.log"
    for _ in $(seq 50); do [[ -S $dir/munge.socket ]] && break; sleep 0.1; done
    if [[ ! -S $dir/munge.socket ]]; then
        echo "munged did not start; see $dir/log/munged.*" >&2
        return 1
    fi
    spawn "$dir" slurmctld slurmctld -D -i -f "$SLURM_CONF"
    spawn "$dir" slurmd-n1 slurmd -D -N n1 -f "$SLURM_CONF"
    spawn "$dir" slurmd-n2 slurmd -D -N n2 -f "$SLURM_CONF"
    for _ in $(seq 120); do
        if [[ $(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l) -eq 2 ]]; then
            return 0
        fi
        sleep 0.5
    done
    echo "Slurm did not come up within 60 s; logs in $dir/log" >&2
    sinfo -N >&2 || true
    return 1
}

stop_cluster() {
    local dir=$1 pid pids=()
    [[ -f $dir/pids ]] || return 0
    mapfile -t pids <"$dir/pids"
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive -eq 0 ]] && break
        sleep 0.2
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -f "$dir/pids"
}

case "${1:-}" in
    install) install_slurm ;;
    start) start_cluster "${2:?usage: $0 start DIR}" ;;
    stop) stop_cluster "${2:?usage: $0 stop DIR}" ;;
    *)
        echo "usage: $0 install | start DIR | stop DIR" >&2
        exit 2
        ;;
esac
