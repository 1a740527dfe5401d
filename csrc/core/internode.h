// The two hops across nodes: who forwards what, in dispatch and in combine. Shared by every backend
// that runs them.
//
// Nodes are runs of consecutive ranks (routing.h: node_of). A token of source s bound for node n
// crosses the network once, to the forwarder of s on n: the rank of n with s's local index
// (DeepEP's "same local rank on the target node"); the forwarder hands it to every rank of n it
// is for. On its own node s is its own forwarder: those records go straight to the ranks they
// are for, as in the one-hop dispatch.
//
//   hop 1 (network)  s puts one network record per (token, destination node other than its own)
//                    into forwarder f's region at net_offset(node_of(s), j), j counting s's
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
// and go to every rank directly, as in the one-hop dispatch. The record also carries what the
// combine's chain needs: the next node the token visits and whether this node is its first.
//
// The two-hop combine: the chain. The reduction contract (reduce.h) is one float left fold over
// the ranks in ascending order, bias first, rounded once. Ranks are numbered node by node, so
// that fold visits a token's nodes in ascending order, each node's ranks in a run: the
// accumulator itself can travel, and the result is the one-hop combine's bit for bit, whatever
// the node split. (A node's partial started from zero, DeepEP's way, rounds differently.)
//
//   rows (node)      every rank writes the row of each token it received to the forwarder of
//                    the token's source on its own node, at combine row
//                    forwarded_row_index(source, writer) and the writer's slot; then raises the
//                    combine flags of its node's ranks.
//   starts (network) with biases, the source s folds them (0 + bias0 + bias1) and puts that
//                    float partial to its forwarder on the token's first node, unless that is
//                    its own; then it tells every forwarder whether it did (off_chain_starts)
//                    and raises their off_chain_start_epoch.
//   chain (network)  the forwarder f on node n, once the rows of its node, the starts and the
//                    chains of the forwarders of lower nodes are in: for each token it forwards
//                    (the own node's source is f itself), it starts from the start or from the
//                    partial the previous node put, adds the rows of its node's ranks in
//                    ascending order, and puts the float partial (channels and top-k weights) to
//                    the forwarder of the next node, or, on the token's last node, rounds once
//                    and puts the result (a combine row) to the source. It then raises
//                    off_chain_epoch at the forwarders of every other node.
//   results          the source waits for the chains of the higher nodes and takes its results.
//
// Partials, starts and results for source s's token t go to the network region entry
// net_offset(node_of(s), t) of their receiver; one entry is written at most once between
// reads (a source that forwards its own token in mid-chain reads the partial before it raises
// the flag that lets a later node put the result there). What crosses the network per token
// with |V| nodes visited: |V| - 1 float partials, one BF16 result unless the source's own node
// is the last, and one float start if biases are given and the first node is not the source's.
// DeepEP's hierarchical combine sends |V| - 1 (or |V|) BF16 partials instead, in parallel; the
// chain keeps the results independent of the split at twice the bytes per partial and one
// network latency per node visited.
//
// The hierarchical combine (sy_internode_reduction, per call; every rank must agree): each
// forwarder folds its node's rows of a token from zero, rounds once to BF16 and puts that
// partial (a combine row) home at entry net_offset(its node, t), all nodes at once; home folds
// bias0, bias1, then the partials in node order, and rounds again. One network round, |V| - 1 or
// |V| BF16 partials; results that depend on the node split (one more rounding per node).
//
// The direct path (sy_internode_path, per buffer): no forwarding; every record and every combine
// row goes straight to its rank as on one node, the ones for other nodes over the network: one
// copy per (token, destination rank). It exists to measure what the two hops save.
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

// The combine row index under which `writer`'s rows for tokens of `source` arrive at their
// forwarder on the writer's node: the forwarder takes rows for one source per node, from each
// rank of its own node. On one node it is the writer itself, as in the one-hop combine.
SY_HD int forwarded_row_index(int source, int writer, int ranks_per_node) {
  return node_of(source, ranks_per_node) * ranks_per_node + local_index(writer, ranks_per_node);
}

}  // namespace sy::core
