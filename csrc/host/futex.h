// Waiting on a 32-bit word in memory another thread — or, with shared memory, another process —
// writes. Linux futexes without the PRIVATE flag work for both.
#pragma once

#include <cstdint>

namespace sy::host {

// Sleeps while *word == expected, at most `seconds`. Returns early on a wake or a change.
void futex_wait(uint32_t* word, uint32_t expected, double seconds);
void futex_wake_all(uint32_t* word);

inline uint32_t load_acquire(const uint32_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
inline void store_release(uint32_t* p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
inline int32_t load_acquire_i32(const int32_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

}  // namespace sy::host
