// The two-hop normal mode of the host backend across nodes (core/internode.h has the protocol):
// the dispatch's network records and their forwarding, and the combine's chain of partial sums.
// host_ops.cpp runs the one-node parts and calls these when the buffer spans nodes.
#pragma once

#include <cstdint>
#include <functional>

#include "../abi/objects.h"
#include "peers.h"

namespace sy::host {

// Writes token `token`'s record (the one-hop dispatch's token record) at `record`.
using RecordWriter = std::function<void(uint8_t* record, int64_t token)>;

// Hop 1 of the dispatch: this rank's network records into its forwarders, its own node's
// records straight to their ranks; then the counts and the forwarders' flags. `slots` [T][R]:
// the slot of each token at each rank (-1: not sent there).
void send_network_records(Peers& peers, int64_t num_tokens, const int32_t* slots, const RecordWriter& write_record);
// Hop 2 of the dispatch: the records this rank forwards, delivered to the ranks of its node.
// What the combine of `handle` needs of them stays in the handle.
Error forward_network_records(Peers& peers, DispatchHandle& handle);
// Every forwarder of this rank's node has delivered what its sources announced.
Error wait_forwarders(Peers& peers);

// The combine across nodes, once this rank has written its rows to the forwarders of its node
// (core::forwarded_row_index) and raised their combine flags: the chain of partial sums, and
// this rank's results.
Error combine_across_nodes(Peers& peers, CombineWork& work);

}  // namespace sy::host
