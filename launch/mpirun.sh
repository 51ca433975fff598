#!/usr/bin/env bash
# `epruntime run` under Open MPI's mpirun. Each rank reads its rank, local rank and node from MPI;
# rank 0 picks the torch.distributed rendezvous and broadcasts it with mpi4py (pip install '.[mpi]').
#
#   NP=8 launch/mpirun.sh --verify                               # CPU simulation on this machine
#   NP=32 NPROC_PER_NODE=8 HOSTFILE=hosts.txt \
#       CONFIG=configs/deepseek-v3-ep32.yaml launch/mpirun.sh    # 4 GPU nodes x 8
#
# Knobs (environment):
#   CONFIG          YAML topology (default: configs/cpu-sim.yaml)
#   NP              total ranks (default 8)
#   NPROC_PER_NODE  ranks per node, placed in blocks (--map-by ppr:N:node); default: mpirun's own
#   HOSTFILE        Open MPI hostfile ("node01 slots=8" per line); default: this machine only
#   MPIRUN          the mpirun to use (default: the one beside PYTHON, else mpirun on PATH)
#   MPIRUN_ARGS     extra mpirun options, e.g. "--allow-run-as-root --oversubscribe"
#   OMP_NUM_THREADS threads per rank (default 1, as torchrun sets it)
#   PYTHON          see launch/common.sh
# Arguments are passed to `epruntime run`. (MPICH: mpiexec -n NP -ppn N "$PYTHON" -m epruntime run ...)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

mpirun_bin=${MPIRUN:-mpirun}
if [[ -z ${MPIRUN:-} && -x $(dirname "$PYTHON")/mpirun ]]; then
    mpirun_bin=$(dirname "$PYTHON")/mpirun
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mpirun_args=(-np "${NP:-8}" -x OMP_NUM_THREADS -x PYTHONUNBUFFERED=1)
if [[ -n ${NPROC_PER_NODE:-} ]]; then
    mpirun_args+=(--map-by "ppr:$NPROC_PER_NODE:node")
fi
if [[ -n ${HOSTFILE:-} ]]; then
    mpirun_args+=(--hostfile "$HOSTFILE")
fi
read -r -a extra_args <<<"${MPIRUN_ARGS:-}"
exec "$mpirun_bin" "${mpirun_args[@]}" "${extra_args[@]}" \
    "$PYTHON" -m epruntime run --config "${CONFIG:-$EPRUNTIME_ROOT/configs/cpu-sim.yaml}" "$@"
