// What a test program can ask the CPU executor about the CUDA calls it saw. A GPU build has none
// of this: declare the functions weak and check them for null before use.
#pragma once

#include <cstddef>

extern "C" {

// Starts (`on` != 0) or stops watching the calling thread for the calls CUDA-graph capture
// forbids. Starting clears what an earlier watch saw. Two kinds:
//   waits  block the thread on the device or allocate outside the stream order:
//          cudaStreamSynchronize, cudaEventSynchronize, cudaDeviceSynchronize, a synchronous
//          cudaMemcpy or cudaMemset, cudaMalloc, cudaFree, cudaMallocHost, cudaHostAlloc,
//          cudaFreeHost, cudaHostRegister, cudaHostUnregister;
//   polls  cudaStreamQuery and cudaEventQuery: they do not block, but capture in the default
//          (global) mode refuses them too, and in any mode on an event recorded during capture.
void sy_cuda_cpu_watch_host_waits(int on);

// How many calls of the kind (`polls` = 0: waits, 1: polls) the calling thread made while
// watched; their names, comma-separated, go into `out` (`n` bytes, always NUL-terminated,
// truncated if need be).
size_t sy_cuda_cpu_host_waits(int polls, char* out, size_t n);

}  // extern "C"
