// The normal-mode operations of the host backend. Each runs as a task on the rank's
// communication stream and talks to its peers only through their buffers (peers.h).
#pragma once

#include "../abi/objects.h"

namespace sy::host {

Error run_layout(LayoutWork& work);
// A refused call's place in the operation sequence: the barrier, as a rejection (Backend::reject).
Error run_reject(BufferSet& set, int rank, int64_t timeout_ms, uint32_t epoch, core::OpKind kind);
Error run_dispatch_notify(BufferSet& set, int64_t timeout_ms, DispatchWork& work);
Error run_dispatch_epilogue(BufferSet& set, DispatchWork& work);
Error run_combine(BufferSet& set, int64_t timeout_ms, CombineWork& work);

}  // namespace sy::host
