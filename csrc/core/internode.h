// The two-hop dispatch across nodes: who forwards what. Shared by every backend that runs it.
//
// Nodes are runs of consecutive ranks (routing.h: node_of). A token of source s bound for node n
// crosses the network once, to the forwarder of s on n: the rank of n with s's local index
// (DeepEP's "same local rank on the target node"); the forwarder hands it to every rank of n it
// is for. On its own node s is its own forwarder: those records go straight to the ranks they
// are for, as in the one-hop dispatch.
//
//   hop 1 (network)  s puts one network record per (token, destination node other than its own)
//                    into forwarder f's region at net_record_offset(node_of(s), j), j counting s's
//                    records for that node in token order; then s writes how many
//                    (off_net_counts[s]) and raises f's off_net_epoch[s]. Its own node's records it
//                    writes straight to their ranks, with off_forwarded[s] as a forwarder would.
//   hop 2 (node)     f waits for the sources of its local index on every node, then copies each
//                    record to the ranks of its node whose slot is >= 0, at
//                    record_offset(s, slot), writes how many it delivered there
//                    (off_forwarded[s], which the receiver checks against what s announced),
//                    and raises their off_forward_epoch[f].
//
// A network record is the token record of the one-hop dispatch (payload, scales, top-k ids and
// weights, source token), then the slot the token takes at each rank of the destination node:
// the sender numbers its tokens per destination rank exactly as the one-hop dispatch does, so
// every rank's dispatch region, and so every output, is the one-hop dispatch's bit for bit,
// whatever the node split. The receivers' counts (off_send_counts, off_expert_counts) are small
// and go to every rank directly, as in the one-hop dispatch.
//
// Combine still returns every row in one hop (the reduction contract of reduce.h). Reducing
// inside the node first cannot keep that contract: it is one float left fold over the ranks in
// ascending order, bias first, so a node's partial sum started from zero rounds differently.
// The ways out, for the two-hop combine still to come:
//   chain         the accumulator itself travels: source (biases) -> node 0 -> node 1 -> ...
//                 -> source, each node folding its rows in; today's results bit for bit, for
//                 any split, at 4 bytes per channel per (token, node) and a latency that grows
//                 with the nodes a token visits;
//   hierarchical  each node folds its rows from zero and sends one partial (DeepEP's way); the
//                 source folds biases then partials in node order. As many bytes as DeepEP (2 per
//                 channel as BF16, 4 as float), results that depend on the node split;
//   exact         the sum computed exactly and rounded once: independent of order and split,
//                 but an exact partial of a node does not fit in 2 or 4 bytes per channel.
#pragma once

#include "hd.h"
#include "routing.h"

namespace sy::core {

// The rank's index inside its node.
SY_HD int local_index(int rank, int ranks_per_node) { return rank % ranks_per_node; }

// The rank of `node` that forwards what `source` sends there; read the other way, the source on
// `node` that a forwarder forwards for (the relation is symmetric: the same local index).
SY_HD int forwarder(int node, int source, int ranks_per_node) {
  return node * ranks_per_node + local_index(source, ranks_per_node);
}

}  // namespace sy::core
