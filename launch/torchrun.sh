#!/usr/bin/env bash
# `epruntime run` under torchrun with the c10d rendezvous; on a cluster, run it once on every node.
#
#   launch/torchrun.sh --verify                                  # CPU simulation: 8 ranks here
#   NNODES=4 NPROC_PER_NODE=8 RDZV_ENDPOINT=head:29500 RDZV_ID=ep32 \
#       CONFIG=configs/deepseek-v3-ep32.yaml launch/torchrun.sh  # on each of 4 GPU nodes
#
# Knobs (environment):
#   CONFIG          YAML topology (default: configs/cpu-sim.yaml)
#   NNODES          nodes in the job (default 1)
#   NPROC_PER_NODE  ranks on this node (default 8)
#   RDZV_ENDPOINT   host:port of the rendezvous, reachable from every node (default 127.0.0.1:29500)
#   RDZV_ID         id shared by the nodes of one job (default epruntime)
#   PYTHON          see launch/common.sh
# Arguments are passed to `epruntime run` (--verify, --json PATH, --set SECTION.KEY=VALUE ...).
# Node indices come from the rendezvous (agents sorted by host name), not from the order of start.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

torchrun_args=(
    --nnodes "${NNODES:-1}"
    --nproc-per-node "${NPROC_PER_NODE:-8}"
    --rdzv-backend c10d
    --rdzv-endpoint "${RDZV_ENDPOINT:-127.0.0.1:29500}"
    --rdzv-id "${RDZV_ID:-epruntime}"
    --max-restarts 0
)
exec "$PYTHON" -m torch.distributed.run "${torchrun_args[@]}" \
    -m epruntime run --config "${CONFIG:-$EPRUNTIME_ROOT/configs/cpu-sim.yaml}" "$@"
