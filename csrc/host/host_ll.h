// The low-latency mode of the host backend: each phase runs as a task on a stream.
#pragma once

#include "../abi/objects.h"

namespace sy::host {

Error run_ll_dispatch_send(BufferSet& set, LLWork& work);
Error run_ll_dispatch_recv(BufferSet& set, LLWork& work);
Error run_ll_combine_send(BufferSet& set, LLWork& work);
Error run_ll_combine_recv(BufferSet& set, LLWork& work);
// A call refused before its send phase: announce the rejection, acknowledge the peers' data.
Error run_ll_dispatch_reject(BufferSet& set, LLWork& work);
Error run_ll_combine_reject(BufferSet& set, LLWork& work);
Error run_ll_clean(BufferSet& set, int rank, int64_t timeout_ms, bool masking, uint32_t epoch);

}  // namespace sy::host
