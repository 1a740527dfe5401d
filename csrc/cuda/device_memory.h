// Device memory without host waits on the device. cudaFree waits for every kernel on the
// device, and with virtual ranks a kernel may be waiting for a peer whose work the calling
// thread has yet to enqueue: neither an allocation nor a release may ever wait for queued work.
//
//   allocate   from CUDA's stream-ordered pool, zero-filled, on a per-device non-blocking stream
//              of its own (the legacy default stream would wait for every blocking stream)
//   release    deferred: the pointer joins a per-device list; a flush orders the frees after all
//              work queued so far on every stream the library knows (a marker event recorded
//              on each, waited for by a per-device release stream), then frees with
//              cudaFreeAsync on that stream. Dispatch and combine end with a kernel that waits
//              until every peer has read this rank's inputs, so the peers' reads come before
//              the free too. If the ordering cannot be set up, the memory is kept, never freed
//              early.
//
// Streams that run peer-waiting kernels must each have their own hardware queue (a queue
// shared with a kernel that waits could hold up the kernel it waits for): `streams_on` counts
// them, with the two internal streams of each device.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sy::cuda {

// Zero-filled pool memory of `bytes` on `device`; returns once it is ready for any stream.
cudaError_t allocate_device_memory(int device, uint64_t bytes, void** out);
// Frees `ptr` (from allocate_device_memory) once all work queued so far has completed.
void release_device_memory(void* ptr, int device);
// A stream whose queued work may use memory (the library's streams register themselves).
void track_stream(cudaStream_t stream, int device);
// Before the stream is destroyed: its queued work stays a dependency of every later free.
void untrack_stream(cudaStream_t stream, int device);
// The streams of `device` that occupy a hardware queue: the tracked ones and the two internal.
int streams_on(int device);

}  // namespace sy::cuda
