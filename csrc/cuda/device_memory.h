// Device memory and streams without hidden waits. cudaFree waits for every kernel on the device,
// and with virtual ranks a kernel may be waiting for a peer whose work the calling thread has
// yet to enqueue: neither an allocation nor a release may ever wait for queued work, on the host
// or on the GPU (a stream waiting for another holds up whatever shares its hardware queue).
//
//   allocate   from CUDA's stream-ordered pool, zero-filled, on a per-device non-blocking stream
//              of its own (the legacy default stream would wait for every blocking stream); the
//              host polls for the fill with a deadline. Operation outputs skip all this: they are
//              allocated in the order of the operation's stream and not filled (allocate_output)
//   release    deferred on the host: pointers gather into batches; a batch records a marker event
//              on every stream the library knows and is freed (cudaFreeAsync on the allocation
//              stream) once the host sees all its markers complete, so after all work queued
//              before the release. Pinned host memory the kernels read (kernel reports) goes
//              the same way (cudaFreeHost does not wait for the kernels still reading it), and
//              is freed by a reaper thread of its own, which also looks for its markers'
//              completion: cudaFreeHost may wait for the whole device. Dispatch and combine end with a kernel that waits until every
//              peer has read this rank's inputs, so the peers' reads come first too.
//   streams    recycled, never destroyed. The driver gives streams hardware queues round-robin
//              in creation order (the legacy default stream holds queue 0); a queue starts its
//              work in order whatever the stream, so a kernel waiting for a peer can hold up,
//              behind it, the very kernel it waits for. The library models the assignment (it
//              assumes it creates every stream of the context) and hands out streams on queues
//              no live stream uses; `queue_sharing` says whether live streams share one anyway.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <string>

namespace sy::cuda {

// Keeps the calling thread's current device across the switches in its scope.
struct KeepDevice {
  int device = 0;
  KeepDevice() { cudaGetDevice(&device); }
  ~KeepDevice() { cudaSetDevice(device); }
};

// Zero-filled pool memory of `bytes` on `device`; returns once it is ready for any stream, or
// cudaErrorTimeout if the zero fill has not completed within seconds (it never blocks).
cudaError_t allocate_device_memory(int device, uint64_t bytes, void** out);
// Frees `ptr` (from allocate_device_memory) once all work queued so far has completed.
void release_device_memory(void* ptr, int device);
// Frees pinned host memory (from cudaHostAlloc) that kernels of `device` may still read, once
// all work queued so far has completed.
void release_pinned_memory(void* ptr, int device);
// Closes a peer's memory mapped with cudaIpcOpenMemHandle once all work queued so far has
// completed (a kernel may still write into it: an abandoning rank's, for one).
void release_ipc_mapping(void* ptr, int device);
// Runs `action` on the reaper thread once all work queued so far has completed (what kernels
// may still drive, as a buffer's proxy, goes after them).
void run_when_done(std::function<void()> action, int device);
// A non-blocking stream of `device` for the library (a recycled one when one is idle).
cudaError_t acquire_stream(int device, cudaStream_t* out);
// The device's stream for the emulated NIC's copies (transport/proxy.h), shared by every proxy
// of the process on it and kept for good: made once, on a queue of its own when one is free.
cudaError_t acquire_nic_stream(int device, cudaStream_t* out);
// Gives a stream back; its queued work still counts for every release before it completes.
void return_stream(cudaStream_t stream, int device);
// The hardware queues of every device's context (CUDA_DEVICE_MAX_CONNECTIONS as the context
// read it) and where that number comes from; set once, before the first stream.
void set_hardware_queues(int queues, const std::string& source);

// Whether live streams of `device` share a hardware queue, and the numbers that say why.
struct QueueSharing {
  bool shared = false;
  int streams = 0;  // live: the library's, its internal stream, and the legacy default stream
  int queues = 0;
  std::string source;
};
QueueSharing queue_sharing(int device);

}  // namespace sy::cuda
