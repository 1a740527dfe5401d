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
//                    into the ring forwarder f keeps for s's node (lane 0), in token order, as
//                    f's credit allows; it has announced how many (off_net_counts[s]) first. Its
//                    own node's records it writes straight to their ranks, with off_forwarded[s]
//                    as a forwarder would.
//   hop 2 (node)     f takes each record as it arrives and copies it to the ranks of its node
//                    whose slot is >= 0, at record_offset(s, slot); once it has taken all of every
//                    source's, it writes how many it delivered from each (off_forwarded[s], which
//                    the receiver checks against what s announced) and raises the flags of its
//                    node's ranks (off_forward_epoch[f]).
//
// The network rings (BufferPlan::off_net): every rank keeps, per sender node, two rings of
// net_ring_entries entries, written only by the rank of that node with its local index. The
// sender counts its puts (off_net_tail, published once the NIC says they arrived), the receiver
// what it has taken (off_net_credit, its credit back); entry i waits for entry i - entries to be
// taken. Memory per rank: nodes x 2 x entries, whatever the token count (DeepEP's
// num_max_rdma_chunked_recv_tokens; the default is its value for the rank count). Every rank runs
// each operation as one loop that sends what has room, takes what has arrived, and sleeps only
// when neither moved; a stall longer than the deadline names the peer and the hop.
// Lane 0 carries what the receiver passes on (records; the chain's starts and partials), lane 1
// what it keeps (results, hierarchical partials). Nothing can wait in a cycle: taking from lane 1
// never waits; taking from lane 0 waits only for room towards a higher node (a partial) or in a
// lane 1; the highest node's lane 0 entries go to lane 1 only. (With one lane, a start waiting
// for room to a higher node could hold up the results that node needs taken to make room.)
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
//   starts (network) every source tells the forwarders of its column on the other nodes whether
//                    its tokens start from biases (off_chain_starts, off_chain_start_epoch); if
//                    so it folds them (0 + bias0 + bias1) and puts that float partial, a start,
//                    to the token's first node, unless that is its own.
//   chain (network)  the forwarder f on node n, once the rows of its node are in, passes on each
//                    token it forwards (the own node's source is f itself) when what it starts
//                    from is there: the biases (its own tokens), zero, a start, or the partial the
//                    previous node put. It adds the rows of its node's ranks in ascending order
//                    and puts the float partial (channels and top-k weights) to the next node,
//                    or, on the token's last node, rounds once and puts the result (a combine
//                    row) home. The starts and partials come in lane 0, in the order their
//                    senders made them; the results in lane 1, and the source stores them.
//
// What crosses the network per token with |V| nodes visited: |V| - 1 float partials, one BF16
// result unless the source's own node is the last, and one float start if biases are given and
// the first node is not the source's. DeepEP's hierarchical combine sends |V| - 1 (or |V|) BF16
// partials instead, in parallel; the chain keeps the results independent of the split at twice
// the bytes per partial and one network latency per node visited (its first node's ranks send
// the most).
//
// The hierarchical combine (sy_internode_reduction, per call; every rank must agree): each
// forwarder folds its node's rows of a token from zero, rounds once to BF16 and puts that
// partial (a combine row) home in lane 1, all nodes at once, each in its source's token order;
// home folds bias0, bias1, then the partials in node order, token by token, and rounds again. One network round, |V| - 1 or
// |V| BF16 partials; results that depend on the node split (one more rounding per node).
//
// The direct path (sy_internode_path, per buffer): no forwarding; every record and every combine
// row goes straight to its rank as on one node, the ones for other nodes over the network: one
// copy per (token, destination rank). It exists to measure what the two hops save.
#pragma once

#include <cstdint>

#include "hd.h"
#include "plan.h"
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

// The nodes a token visits, in ascending order (the chain's order), from its slots at every rank
// (-1: not sent there): where its network records go in dispatch, and its way in combine.
struct TokenNodes {
  const int32_t* slots;  // the token's row of [T][R]
  int ranks_per_node, nodes;
  SY_HD bool at(int node) const {
    for (int q = 0; q < ranks_per_node; ++q)
      if (slots[node * ranks_per_node + q] >= 0) return true;
    return false;
  }
  // The first node after `node` the token visits (-1: none); after -1, its first node.
  SY_HD int next(int node) const {
    for (int k = node + 1; k < nodes; ++k)
      if (at(k)) return k;
    return -1;
  }
  // The last node before `node` the token visits (-1: none); before `nodes`, its last node.
  SY_HD int prev(int node) const {
    for (int k = node - 1; k >= 0; --k)
      if (at(k)) return k;
    return -1;
  }
  SY_HD int last() const { return prev(nodes); }
};

// The two-hop combine's routing rules, per token, for both reductions: what a rank takes from and
// puts into the network rings, and in which lane. Both backends schedule by them, and count by
// them what each lane brings (and the CUDA backend what it announces), so they cannot disagree
// about the protocol. `my_node` is the rank's node; a forwarded token is described by its source
// node and the nodes before and after this one on its way (-1: none), as the dispatch's
// forwarding table keeps them.

// An entry's destination: a node's column peer and a lane; node -1: this rank's own output.
struct NetHop {
  int node, lane;
};

// The chain: where a forwarded token goes once this node's rows are added. On to the next node it
// visits (lane 0: that node passes it on); from its last node home (lane 1: home keeps it), or,
// home being this node, into the output.
SY_HD NetHop chain_onward(int source_node, int next, int my_node) {
  if (next >= 0) return {next, kPassOn};
  return {source_node == my_node ? -1 : source_node, kKeep};
}

// The chain: what a forwarded token's fold starts from here. The partial of the node before it;
// else its biases, folded here when its source is on this node, or there and sent as a start if
// the source sends starts (it has biases); else zero.
enum class ChainFrom : int32_t { Zero = 0, Biases, Start, Partial };
SY_HD ChainFrom chain_from(int source_node, int prev, int my_node, bool source_sends_starts) {
  if (prev >= 0) return ChainFrom::Partial;
  if (source_node == my_node) return ChainFrom::Biases;
  return source_sends_starts ? ChainFrom::Start : ChainFrom::Zero;
}
// The node whose lane 0 brings what a forwarded token starts from (-1: nothing comes).
SY_HD int chain_from_node(ChainFrom from, int source_node, int prev) {
  return from == ChainFrom::Partial ? prev : from == ChainFrom::Start ? source_node : -1;
}
// The chain: whether an entry of `kind` that came in lane 0 from node `from_node` is what a
// forwarded token starts from (`wanted`, chain_from): a start only from a source that said it
// sends them, a partial only from the node before; any other kind never.
SY_HD bool chain_accepts(ChainFrom wanted, uint32_t kind, int source_node, int prev, int from_node) {
  const ChainFrom came = kind == uint32_t(NetEntry::Start)     ? ChainFrom::Start
                         : kind == uint32_t(NetEntry::Partial) ? ChainFrom::Partial
                                                               : ChainFrom::Zero;
  return came != ChainFrom::Zero && wanted == came && chain_from_node(wanted, source_node, prev) == from_node;
}

// The chain: the start an own token's source puts, in lane 0, when it has biases and the token's
// first node is another: that node (-1: none).
SY_HD int chain_start_node(const TokenNodes& v, int my_node, bool biased) {
  const int first = v.next(-1);
  return biased && first >= 0 && first != my_node ? first : -1;
}

// The chain: the node an own token's result comes home from, in lane 1: its last node, unless
// that is this one (-1: none).
SY_HD int chain_result_node(const TokenNodes& v, int my_node) {
  const int last = v.last();
  return last >= 0 && last != my_node ? last : -1;
}

// Calls f(node, lane) once per entry that comes to this rank for one of its own tokens: the
// chain's result; the hierarchical parts, one from every other node it visits.
template <class F>
SY_HD void own_token_arrivals(const TokenNodes& v, int my_node, bool hierarchical, F&& f) {
  if (!hierarchical) {
    if (const int k = chain_result_node(v, my_node); k >= 0) f(k, kKeep);
    return;
  }
  for (int k = v.next(-1); k >= 0; k = v.next(k))
    if (k != my_node) f(k, kKeep);
}

// Calls f(node, lane) for the entry, if any, that comes to this rank for a token it forwards: the
// chain's start or partial to fold (lane 0). The hierarchical reduction's parts start from zero.
template <class F>
SY_HD void forwarded_arrival(int source_node, int prev, int my_node, bool source_sends_starts, bool hierarchical,
                             F&& f) {
  if (hierarchical) return;
  const int from = chain_from_node(chain_from(source_node, prev, my_node, source_sends_starts), source_node, prev);
  if (from >= 0) f(from, kPassOn);
}

// Where a token this rank forwards goes after its node's rows: the chain's next step, or (the
// hierarchical reduction) its source node's part, home in lane 1; node -1 for a token of this
// node's own source that stays here (the rank's output, no entry).
SY_HD NetHop forwarded_departure(int source_node, int next, int my_node, bool hierarchical) {
  return chain_onward(source_node, hierarchical ? -1 : next, my_node);
}

}  // namespace sy::core
