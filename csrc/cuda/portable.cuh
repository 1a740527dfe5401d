// The few things kernel code writes differently so that the same source also runs on the CPU
// executor (tests/cuda_on_cpu/, the SWITCHYARD_CUDA=CPU build): with nvcc every macro and
// function here is plain CUDA, so kernels stay plain CUDA too.
//
//   SY_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...)   kernel<<<...>>>(args...)
//   SY_SHARED(type, name);                                          __shared__ type name;
//   SY_DYNAMIC_SHARED(type, name);                                  extern __shared__ type name[];
//   ld_acquire_sys / st_release_sys                                 flags between GPUs and host
//   ld_volatile                                                     *(volatile T*)p
//   global_ns()                                                     %globaltimer
//
// Inline PTX does not compile on the CPU executor (its build stops at the asm statement): an
// instruction that cuda::atomic_ref or a CUDA intrinsic cannot express goes into a function
// here, with a plain C++ twin under SY_CUDA_ON_CPU.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cuda/atomic>

#ifndef SY_CUDA_ON_CPU
#define SY_CUDA_ON_CPU 0
#endif

namespace sy::cuda {

// `type` spelled as one token sequence (an array type included), for SY_SHARED.
template <class T>
using declared = T;

}  // namespace sy::cuda

#if SY_CUDA_ON_CPU

// The executor runs the kernel's blocks on its own threads; the lambda names the kernel, so
// template arguments are deduced from the launch's arguments, as with <<<>>>.
#define SY_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::sy::cuda_cpu::Launch(#kernel, grid, block, shared_bytes, stream, [](auto&&... sy_a) { kernel(sy_a...); })
// One copy per block, filled with garbage as on a GPU; the static is the declaration's identity.
#define SY_SHARED(type, name)              \
  static const char name##_sy_shared_id{}; \
  auto& name = ::sy::cuda_cpu::block_shared<::sy::cuda::declared<type>>(&name##_sy_shared_id)
#define SY_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::sy::cuda_cpu::dynamic_shared())

#else

#define SY_LAUNCH(kernel, grid, block, shared_bytes, stream) kernel<<<grid, block, shared_bytes, stream>>>
#define SY_SHARED(type, name) __shared__ ::sy::cuda::declared<type> name
#define SY_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]

#endif

namespace sy::cuda {

// Flags another GPU, a virtual rank or the host waits on: release stores and acquire loads at
// system scope, so a flag never overtakes the data it announces. nvcc 13.0 emits
// `ld.acquire.sys.b32` / `st.release.sys.b32` for these (generic addressing where hand-written
// PTX said `.global`; the same ordering), checked with `nvcc -ptx`.
__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  const uint32_t v = ::cuda::atomic_ref<uint32_t, ::cuda::thread_scope_system>(*const_cast<uint32_t*>(p))
                         .load(::cuda::memory_order_acquire);
#if SY_CUDA_ON_CPU
  ::sy::cuda_cpu::polled();  // a loop on this load lets the block's other threads run
#endif
  return v;
}

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  ::cuda::atomic_ref<uint32_t, ::cuda::thread_scope_system>(*p).store(v, ::cuda::memory_order_release);
}

// The 64-bit counters the transports share with the host (transport/proxy_ring.h).
__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  const uint64_t v = ::cuda::atomic_ref<uint64_t, ::cuda::thread_scope_system>(*const_cast<uint64_t*>(p))
                         .load(::cuda::memory_order_acquire);
#if SY_CUDA_ON_CPU
  ::sy::cuda_cpu::polled();
#endif
  return v;
}

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
  ::cuda::atomic_ref<uint64_t, ::cuda::thread_scope_system>(*p).store(v, ::cuda::memory_order_release);
}

// A volatile load: in CUDA's memory model a relaxed load at system scope that is never cached
// or merged, which is how kernels look at a flag another thread may be setting (a race
// detector must see it as the atomic it is, not as a plain read).
template <class T>
__device__ __forceinline__ T ld_volatile(const T* p) {
#if SY_CUDA_ON_CPU
  const T v = __atomic_load_n(p, __ATOMIC_RELAXED);
  ::sy::cuda_cpu::polled();
  return v;
#else
  return *reinterpret_cast<const volatile T*>(p);
#endif
}

// Nanoseconds of the GPU's global timer, the clock of every deadline.
__device__ __forceinline__ uint64_t global_ns() {
#if SY_CUDA_ON_CPU
  return ::sy::cuda_cpu::global_ns();
#else
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
#endif
}

}  // namespace sy::cuda
