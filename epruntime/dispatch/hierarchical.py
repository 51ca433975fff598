"""``hierarchical``: two-stage dispatch, inter-node over the rail group, then intra-node.

Dispatch, stage 1: each token goes once to each node hosting one of its experts, to the rank
with the source's local index there (an all-to-all over the rail group, in node order), with its
global top-k ids and weights; tokens for the source's own node stay on the source rank (the
rail all-to-all's self split is a local copy). Stage 2: each receiving rank forwards each of
those rows once to each rank of its node that hosts one of the row's experts (an all-to-all over
the intra group, in local-index order), with the ids made local to that rank.

Combine runs the hops backwards: each rank returns its results to the forwarder, which sums them
into one partial per (source token, node); the partials go back over the rail and the source
sums them. Where a row came from is its position in the receive buffer (rows arrive grouped by
sender, in the sender's order), so no source index travels. Inter-node rows per token equal the
number of distinct remote nodes among its experts instead of the number of distinct remote ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epruntime.dispatch.base import (
    AsyncDispatcher,
    Hop,
    InFlight,
    attach_routing,
    detach_routing,
    pack_routing,
)
from epruntime.dispatch.flat import destinations, localize


@dataclass
class HierarchicalHandle:
    """What combine needs: both hops, and how many rows each hop started from."""

    rail: Hop  # source tokens -> one forwarder per destination node
    intra: Hop  # forwarded rows -> expert ranks of the forwarder's node
    num_tokens: int
    num_forwarded: int


class HierarchicalDispatcher(AsyncDispatcher):
    """Inter-node once per (token, node) over the rail, then intra-node once per (token, rank)."""

    name = "hierarchical"

    def dispatch_a(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> InFlight:
        ep, topo = self.ep, self.ep.topo
        e_local, row_bytes = self.slots_per_rank, x.shape[1] * x.element_size()
        rail = Hop.plan(
            destinations(topk_idx.cpu(), self.slots_per_node, topo.nnodes),  # [T, N]
            ep.rail,
            topo.rail_ranks(ep.local_index),
            x.device,
        )
        rail_routing = pack_routing(topk_idx[rail.src_row], topk_weights[rail.src_row])  # [P1, 2K] global ids
        fwd_x, fwd_idx, fwd_weights = detach_routing(
            rail.send(attach_routing(x[rail.src_row], rail_routing)), x.shape[1]
        )  # [F, H], [F, K] global ids, [F, K]
        self.count_sends("dispatch", rail.peers, rail.send_counts, row_bytes, rail_routing.shape[1] * 4)

        node_ranks = topo.node_ranks(ep.node)
        needs = destinations(fwd_idx.cpu(), e_local, topo.world_size)[:, node_ranks[0] : node_ranks[-1] + 1]  # [F, L]
        intra = Hop.plan(needs, ep.intra, node_ranks, x.device)
        first_expert = (node_ranks[0] + intra.dest) * e_local  # [P2]
        routing = pack_routing(
            localize(fwd_idx[intra.src_row], first_expert, e_local), fwd_weights[intra.src_row]
        )  # [P2, 2K] local ids
        self.count_sends("dispatch", intra.peers, intra.send_counts, row_bytes, routing.shape[1] * 4)
        handle = HierarchicalHandle(rail, intra, x.shape[0], fwd_x.shape[0])
        return intra.issue_dispatch(fwd_x[intra.src_row], routing, e_local, handle)

    def combine_a(self, y: torch.Tensor, handle: HierarchicalHandle) -> InFlight:
        row_bytes = y.shape[1] * y.element_size()
        partial = handle.intra.reduce_back(y, handle.num_forwarded).to(y.dtype)  # [F, H] one per (token, node)
        self.count_sends("combine", handle.intra.peers, handle.intra.recv_counts, row_bytes, 0)
        out = handle.rail.issue_reduce_back(partial, handle.num_tokens)  # in flight: [T, H] fp32
        self.count_sends("combine", handle.rail.peers, handle.rail.recv_counts, row_bytes, 0)
        return InFlight([], lambda: out.wait().to(y.dtype))
