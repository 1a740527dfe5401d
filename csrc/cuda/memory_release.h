// Stream-ordered release of device memory. cudaFree waits for every kernel on the device, and
// with virtual ranks a kernel may be waiting for a peer whose work the freeing thread has yet to
// enqueue: a free must never wait. So memory comes from CUDA's stream-ordered pool, and a
// release is deferred: the pointer joins a per-device list, and a flush orders the frees after
// all work queued so far on every stream the library knows (marker events recorded on each,
// waited for by a per-device release stream), then frees with cudaFreeAsync on that stream.
// Nothing the caller can still observe uses the memory then, whichever stream queued it:
// dispatch and combine end with a kernel that waits until every peer has read this rank's
// inputs, so the peers' reads are ordered before the free too.
#pragma once

#include <cuda_runtime.h>

namespace sy::cuda {

// A stream whose queued work may use memory (the library's streams register themselves).
void track_stream(cudaStream_t stream, int device);
// Before the stream is destroyed: its queued work stays a dependency of every later free.
void untrack_stream(cudaStream_t stream, int device);
// Frees `ptr` (pool memory of `device`) once all work queued so far has completed.
void release_device_memory(void* ptr, int device);
// Issues the pending frees of `device` now (allocations call it, so memory is reused soon).
void flush_releases(int device);

}  // namespace sy::cuda
