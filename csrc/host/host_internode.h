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

// Both hops of the dispatch's network part: this rank's records to the forwarders of the other
// nodes (its own node's straight to their ranks), and the records it forwards, to the ranks of
// its node, as they arrive. `slots` [T][R]: the slot of each token at each rank (-1: not sent
// there). What the combine of `handle` needs of the forwarding stays in the handle.
Error exchange_network_records(Peers& peers, DispatchHandle& handle, int64_t num_tokens, const int32_t* slots,
                               const RecordWriter& write_record);
// Every forwarder of this rank's node has delivered what its sources announced.
Error wait_forwarders(Peers& peers);

// The combine across nodes, once this rank has written its rows to the forwarders of its node
// (core::forwarded_row_index) and raised their combine flags: the chain of partial sums, and
// this rank's results.
Error combine_across_nodes(Peers& peers, CombineWork& work);

}  // namespace sy::host
