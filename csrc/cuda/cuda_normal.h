// The CUDA backend's normal-mode operations: per-buffer state, argument marshalling and the
// launches of the kernels in normal_kernels.h.
#pragma once

#include <memory>
#include <string>

#include "cuda_objects.h"

namespace sy::cuda {

// Bytes of a rank's shared buffer (SharedLayout in normal_kernels.h).
uint64_t normal_shared_bytes(const core::BufferPlan& plan, bool process_group);
// A new buffer's state: its layout in the shared region, its workspace (normal_kernels.h).
Error normal_init_buffer(BufferCore& buf);
// Two hops between processes: the bytes of a rank's proxy signal array, which the peers' proxies
// raise (a shared segment exported with its buffer; transport/proxy.h).
uint64_t network_signal_bytes(int ranks);
// Two hops between processes: what the peers need to reach this rank's network engine, and a
// peer's (Backend::export_network, import_network; ibverbs: transport/verbs_engine.h).
Error normal_export_network(BufferCore& buf, std::string* endpoint);
Error normal_import_network(BufferCore& buf, int peer, const std::string& endpoint);
Error normal_reject(BufferCore& buf, CudaStream& comm, core::OpKind kind, uint32_t epoch);
// sy_buffer_abandon: every peer's abort record says this rank gave up because `peer` failed.
Error normal_abandon(BufferCore& buf, CudaStream& comm, int peer);
Error normal_dispatch_notify(BufferCore& buf, CudaStream& comm, const std::shared_ptr<DispatchWork>& work);
Error normal_dispatch_wait_counts(DispatchWork& work, Deadline deadline);
Error normal_dispatch_epilogue(BufferCore& buf, CudaStream& comm, const std::shared_ptr<DispatchWork>& work);
void normal_dispatch_abandon(BufferCore& buf, CudaStream& comm, const std::shared_ptr<DispatchWork>& work);
Error normal_combine(BufferCore& buf, CudaStream& comm, const std::shared_ptr<CombineWork>& work);
// What every operation on the buffer does first, the low-latency ones too (its device current,
// the peer tables in place, the ranks per GPU and the hardware queues checked): `op` names the
// operation in the errors; `bases` receives the device table of every rank's buffer base.
Error begin_buffer_operation(BufferCore& buf, CudaStream& stream, const char* op, uint8_t* const** bases);

}  // namespace sy::cuda
