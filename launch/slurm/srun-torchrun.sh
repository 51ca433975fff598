#!/usr/bin/env bash
# The body of the sbatch scripts beside it: inside a Slurm allocation, start one torchrun agent per
# node with srun (launch/torchrun.sh, c10d rendezvous on the head node), give it every CPU the job
# holds on its node (the step gets the job's GPUs by default), and keep one log per node.
#
# Knobs (environment), beside launch/torchrun.sh's CONFIG, NPROC_PER_NODE and PYTHON:
#   EPRUNTIME_ROOT  the repository (default: the directory sbatch was run from)
#   RDZV_PORT       rendezvous port on the head node (default: 29500 + job id mod 1000)
#   LOG_DIR         where node-<N>.log go, N = node index in the job (default: out/logs/<job id>)
# Arguments are passed to `epruntime run`.
set -euo pipefail
cd "${EPRUNTIME_ROOT:-${SLURM_SUBMIT_DIR:?run this inside a Slurm job: sbatch launch/slurm/...}}"

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
head_addr=$(srun --nodes=1 --ntasks=1 --nodelist="$head_node" hostname --ip-address | awk '{print $1}')
rdzv_port=${RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
log_dir=${LOG_DIR:-out/logs/$SLURM_JOB_ID}
mkdir -p "$log_dir"
echo "epruntime: $SLURM_JOB_NUM_NODES nodes x ${NPROC_PER_NODE:-8} ranks, rendezvous on $head_node" \
    "($head_addr:$rdzv_port), per-node logs in $log_dir/"

status=0
NNODES=$SLURM_JOB_NUM_NODES RDZV_ENDPOINT=$head_addr:$rdzv_port RDZV_ID=$SLURM_JOB_ID \
    srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" \
    --kill-on-bad-exit=1 --output="$log_dir/node-%n.log" launch/torchrun.sh "$@" || status=$?
tail -n 4 "$log_dir"/node-*.log || true  # rank 0's summary is on whichever node the rendezvous made node 0
exit "$status"
