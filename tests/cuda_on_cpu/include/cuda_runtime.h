// The CPU executor's cuda_runtime.h: the same .cu sources that nvcc compiles for the GPU, compiled
// by g++ and executed on CPU threads (README.md beside include/). It shadows the toolkit's header
// (this folder comes first on the include path) and takes the runtime's types and declarations
// from the toolkit's host-includable headers; the runtime calls themselves are implemented in
// ../src, the device built-ins in cuda_on_cpu/builtins.h.
#pragma once

#ifndef SY_CUDA_ON_CPU
#define SY_CUDA_ON_CPU 1
#endif

#include <cuda_runtime_api.h>
#include <driver_types.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <cuda/atomic>

#include "cuda_on_cpu/builtins.h"
#include "cuda_on_cpu/launch.h"

// Execution spaces mean nothing on the CPU; host_defines.h already makes __host__, __device__
// and __global__ empty for a host compiler.
#undef __launch_bounds__
#define __launch_bounds__(...)
#ifndef __restrict__
#define __restrict__ __restrict
#endif

// Block-shared memory must be one copy per block, garbage until written: kernels declare it with
// SY_SHARED / SY_DYNAMIC_SHARED (csrc/cuda/portable.cuh). A bare __shared__ would silently be a
// per-thread variable here, so it does not compile.
#undef __shared__
#define __shared__                                                                                       \
  static_assert(false, "a bare __shared__ would be per-thread memory on the CPU executor: declare it with " \
                       "SY_SHARED or SY_DYNAMIC_SHARED (csrc/cuda/portable.cuh)");

// Inline PTX cannot execute on the CPU: the build stops at the asm statement (the compiler shows
// it, template included). Put the instruction behind a function in csrc/cuda/portable.cuh with a
// C++ twin instead.
#define asm                                                                                        \
  static_assert(false, "inline PTX cannot run on the CPU executor: put the instruction behind a " \
                       "function in csrc/cuda/portable.cuh with a C++ twin");

// The C++ conveniences of the toolkit's cuda_runtime.h that the sources use.
template <class T>
inline cudaError_t cudaMalloc(T** p, size_t n) {
  return ::cudaMalloc(reinterpret_cast<void**>(p), n);
}
template <class T>
inline cudaError_t cudaMallocHost(T** p, size_t n) {
  return ::cudaMallocHost(reinterpret_cast<void**>(p), n);
}
template <class T>
inline cudaError_t cudaHostAlloc(T** p, size_t n, unsigned int flags) {
  return ::cudaHostAlloc(reinterpret_cast<void**>(p), n, flags);
}
template <class T>
inline cudaError_t cudaHostGetDevicePointer(T** device, void* host, unsigned int flags) {
  return ::cudaHostGetDevicePointer(reinterpret_cast<void**>(device), host, flags);
}
template <class T>
inline cudaError_t cudaMallocAsync(T** p, size_t n, cudaStream_t stream) {
  return ::cudaMallocAsync(reinterpret_cast<void**>(p), n, stream);
}
inline cudaError_t cudaEventCreate(cudaEvent_t* event, unsigned int flags) {
  return ::cudaEventCreateWithFlags(event, flags);
}
template <class T>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, T func, int threads, size_t shared) {
  return ::cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, reinterpret_cast<const void*>(func), threads, shared);
}
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* func, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}
