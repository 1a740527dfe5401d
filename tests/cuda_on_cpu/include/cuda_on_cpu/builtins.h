// CUDA's device built-ins on the CPU executor: thread and block indices, __syncthreads, warp
// collectives, atomics, fences, timers and the bit intrinsics, for code compiled by g++.
//
// Every GPU thread of a block is a fiber on one OS thread. A fiber runs until it reaches a
// barrier, a warp collective, __nanosleep, or its 64th "poll" (an atomic, a flag load, a timer
// read): then the block's next fiber runs. So a thread that spins on what another thread of its
// block writes makes progress, as on a GPU; a spin that polls nothing never yields (every spin
// in our kernels reads the timer for its deadline, which polls).
#pragma once

#include <vector_functions.h>
#include <vector_types.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace sy::cuda_cpu {

// What a GPU thread knows of itself; `current` points at the running fiber's.
struct ThreadCtx {
  uint3 tid;
  uint3 bid;
  dim3 bdim;
  dim3 gdim;
  unsigned linear = 0;  // index within the block
  unsigned polls = 0;   // polls since the fiber last yielded
};
extern thread_local ThreadCtx* current;

// Services of the executor (src/block.cpp), called from device code.
void syncthreads(const char* file, int line);
// Every lane of `mask` deposits `value`; returns the 32 values of this round (read them before
// the calling lane's next collective).
const uint64_t* warp_collective(unsigned mask, int kind, uint64_t value, const char* file, int line);
unsigned active_mask();
void polled();  // a load, atomic or timer read a spin loop may be waiting on
void yield();
uint64_t global_ns();
uint64_t clock_ticks();
void* dynamic_shared();
void* block_shared_bytes(const void* id, size_t size, size_t align);
[[noreturn]] void device_trap(const char* what, const char* file, int line);

// This block's copy of the __shared__ variable declared at `id` (SY_SHARED).
template <class T>
inline T& block_shared(const void* id) {
  return *static_cast<T*>(block_shared_bytes(id, sizeof(T), alignof(T)));
}

enum CollectiveKind : int { kShfl = 1, kShflUp, kShflDown, kShflXor, kBallot, kSyncWarp };

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "a warp shuffle moves at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <class T>
T shuffle(int kind, unsigned mask, T v, int arg, int width, const char* file, int line) {
  const uint64_t* all = warp_collective(mask, kind, to_bits(v), file, line);
  const int lane = int(current->linear & 31u);
  const int base = lane & ~(width - 1);
  int src = lane;
  switch (kind) {
    case kShfl: src = base + (arg & (width - 1)); break;
    case kShflUp: src = lane - base >= arg ? lane - arg : lane; break;
    case kShflDown: src = lane - base + arg < width ? lane + arg : lane; break;
    case kShflXor: src = ((lane ^ arg) & ~(width - 1)) == base ? (lane ^ arg) : lane; break;
  }
  if (!(mask >> src & 1u)) device_trap("a shuffle reads a lane outside its mask (undefined on a GPU)", file, line);
  return from_bits<T>(all[src]);
}

inline unsigned ballot(unsigned mask, bool p, const char* file, int line) {
  const uint64_t* all = warp_collective(mask, kBallot, p ? 1 : 0, file, line);
  unsigned r = 0;
  for (int i = 0; i < 32; ++i)
    if ((mask >> i & 1u) && all[i]) r |= 1u << i;
  return r;
}

inline unsigned full_mask_or() { return 0xffffffffu; }
inline unsigned full_mask_or(unsigned m) { return m; }
inline int width_or_32() { return 32; }
inline int width_or_32(int w) { return w; }

}  // namespace sy::cuda_cpu

#define threadIdx (::sy::cuda_cpu::current->tid)
#define blockIdx (::sy::cuda_cpu::current->bid)
#define blockDim (::sy::cuda_cpu::current->bdim)
#define gridDim (::sy::cuda_cpu::current->gdim)
static constexpr int warpSize = 32;

#define __syncthreads() ::sy::cuda_cpu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...)                                                                                             \
  ((void)::sy::cuda_cpu::warp_collective(::sy::cuda_cpu::full_mask_or(__VA_ARGS__), ::sy::cuda_cpu::kSyncWarp, 0, \
                                         __FILE__, __LINE__))
#define __shfl_sync(m, v, s, ...) \
  ::sy::cuda_cpu::shuffle(::sy::cuda_cpu::kShfl, (m), (v), int(s), ::sy::cuda_cpu::width_or_32(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(m, v, d, ...)                                                                                \
  ::sy::cuda_cpu::shuffle(::sy::cuda_cpu::kShflUp, (m), (v), int(d), ::sy::cuda_cpu::width_or_32(__VA_ARGS__), \
                          __FILE__, __LINE__)
#define __shfl_down_sync(m, v, d, ...)                                                                                \
  ::sy::cuda_cpu::shuffle(::sy::cuda_cpu::kShflDown, (m), (v), int(d), ::sy::cuda_cpu::width_or_32(__VA_ARGS__), \
                          __FILE__, __LINE__)
#define __shfl_xor_sync(m, v, x, ...)                                                                                \
  ::sy::cuda_cpu::shuffle(::sy::cuda_cpu::kShflXor, (m), (v), int(x), ::sy::cuda_cpu::width_or_32(__VA_ARGS__), \
                          __FILE__, __LINE__)
#define __ballot_sync(m, p) ::sy::cuda_cpu::ballot((m), bool(p), __FILE__, __LINE__)
#define __any_sync(m, p) (::sy::cuda_cpu::ballot((m), bool(p), __FILE__, __LINE__) != 0u)
#define __all_sync(m, p) (::sy::cuda_cpu::ballot((m), bool(p), __FILE__, __LINE__) == unsigned(m))
#define __activemask() ::sy::cuda_cpu::active_mask()
#define __trap() ::sy::cuda_cpu::device_trap("__trap()", __FILE__, __LINE__)

// ---- ordering and time --------------------------------------------------------------------
// x86 never reorders what these fences forbid; they poll, as a fence in a spin loop would.
inline void __threadfence() {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  ::sy::cuda_cpu::polled();
}
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  ::sy::cuda_cpu::polled();
}
inline void __nanosleep(unsigned) { ::sy::cuda_cpu::yield(); }
inline long long clock64() { return (long long)::sy::cuda_cpu::clock_ticks(); }

// ---- atomics: relaxed, as CUDA's atomicXxx are ---------------------------------------------
template <class T, class U>
inline T atomicAdd(T* p, U v) {
  ::sy::cuda_cpu::polled();
  if constexpr (std::is_floating_point_v<T>) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &old, T(old + T(v)), false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
  } else {
    return __atomic_fetch_add(p, T(v), __ATOMIC_RELAXED);
  }
}
template <class T, class U>
inline T atomicSub(T* p, U v) {
  ::sy::cuda_cpu::polled();
  return __atomic_fetch_sub(p, T(v), __ATOMIC_RELAXED);
}
template <class T, class U>
inline T atomicAnd(T* p, U v) {
  ::sy::cuda_cpu::polled();
  return __atomic_fetch_and(p, T(v), __ATOMIC_RELAXED);
}
template <class T, class U>
inline T atomicOr(T* p, U v) {
  ::sy::cuda_cpu::polled();
  return __atomic_fetch_or(p, T(v), __ATOMIC_RELAXED);
}
template <class T, class U>
inline T atomicXor(T* p, U v) {
  ::sy::cuda_cpu::polled();
  return __atomic_fetch_xor(p, T(v), __ATOMIC_RELAXED);
}
template <class T, class U>
inline T atomicExch(T* p, U v) {
  ::sy::cuda_cpu::polled();
  return __atomic_exchange_n(p, T(v), __ATOMIC_RELAXED);
}
template <class T, class U>
inline T atomicMax(T* p, U v) {
  ::sy::cuda_cpu::polled();
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < T(v) && !__atomic_compare_exchange_n(p, &old, T(v), false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <class T, class U>
inline T atomicMin(T* p, U v) {
  ::sy::cuda_cpu::polled();
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old > T(v) && !__atomic_compare_exchange_n(p, &old, T(v), false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <class T, class U, class V>
inline T atomicCAS(T* p, U compare, V value) {
  ::sy::cuda_cpu::polled();
  T expected = T(compare);
  __atomic_compare_exchange_n(p, &expected, T(value), false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return expected;
}
// Every scope is the same on the CPU.
#define SY_CUDA_CPU_SCOPED(name)                            \
  template <class T, class... A>                            \
  inline T name##_block(T* p, A... a) {                     \
    return name(p, a...);                                   \
  }                                                         \
  template <class T, class... A>                            \
  inline T name##_system(T* p, A... a) {                    \
    return name(p, a...);                                   \
  }
SY_CUDA_CPU_SCOPED(atomicAdd)
SY_CUDA_CPU_SCOPED(atomicSub)
SY_CUDA_CPU_SCOPED(atomicAnd)
SY_CUDA_CPU_SCOPED(atomicOr)
SY_CUDA_CPU_SCOPED(atomicXor)
SY_CUDA_CPU_SCOPED(atomicExch)
SY_CUDA_CPU_SCOPED(atomicMax)
SY_CUDA_CPU_SCOPED(atomicMin)
SY_CUDA_CPU_SCOPED(atomicCAS)
#undef SY_CUDA_CPU_SCOPED

// ---- loads and bits ------------------------------------------------------------------------
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
// L2-only loads (data another agent wrote): every load is coherent here.
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline float __int_as_float(int x) { return ::sy::cuda_cpu::from_bits<float>(uint32_t(x)); }
inline int __float_as_int(float f) { return int(uint32_t(::sy::cuda_cpu::to_bits(f))); }
inline unsigned __float_as_uint(float f) { return unsigned(::sy::cuda_cpu::to_bits(f)); }
inline float __uint_as_float(unsigned x) { return ::sy::cuda_cpu::from_bits<float>(x); }
