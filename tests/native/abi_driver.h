// What a native program driving libswitchyard through its C ABI needs again and again: stop with
// the library's own message, create tensors from host data, read them back (which reports the
// failure of the operation that produced them), probe the CUDA backend. Used by
// tests/native/kernel_families.cpp and bench/gpu_bench.cu.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "switchyard.h"

namespace sy::driver {

// The name error messages start with.
inline const char*& program_name() {
  static const char* name = "switchyard";
  return name;
}

[[noreturn]] inline void die(const std::string& what) {
  std::fprintf(stderr, "%s: %s\n", program_name(), what.c_str());
  std::exit(1);
}

// The message the library recorded on `handle` (or the calling thread's, for nullptr).
inline std::string last_error(const void* handle) {
  sy_error_info info;
  std::memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  sy_last_error(handle, &info);
  return std::string(sy_status_name(info.status)) + ": " + info.message;
}

inline void check(sy_status st, const void* handle, const char* what) {
  if (st != SY_OK) die(std::string(what) + ": " + last_error(handle));
}

// Calls the ABI and stops with its message on failure: SY(sy_dispatch(b, &a, &r), b).
#define SY(call, handle) ::sy::driver::check((call), (handle), #call)

inline sy_tensor_desc describe(sy_tensor t) {
  sy_tensor_desc d;
  std::memset(&d, 0, sizeof d);
  d.struct_size = sizeof d;
  SY(sy_tensor_describe(t, &d), t);
  return d;
}

// Bytes of the dense copy of `t` (what sy_tensor_read writes).
inline uint64_t dense_bytes(sy_tensor t) {
  const sy_tensor_desc d = describe(t);
  uint64_t n = d.dtype == SY_DTYPE_BF16 ? 2
               : d.dtype == SY_DTYPE_I64 ? 8
               : d.dtype == SY_DTYPE_F32 || d.dtype == SY_DTYPE_I32 ? 4
                                                                     : 1;
  for (int i = 0; i < d.ndim; ++i) n *= uint64_t(d.shape[i]);
  return n;
}

// A dense tensor of `shape` on `rank`, filled from `data` (bytes of it) when given.
inline sy_tensor make_tensor(sy_rank rank, sy_stream stream, int32_t dtype, const std::vector<int64_t>& shape,
                             const void* data, uint64_t bytes) {
  sy_tensor_desc d;
  std::memset(&d, 0, sizeof d);
  d.struct_size = sizeof d;
  d.dtype = dtype;
  d.ndim = int32_t(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) d.shape[i] = shape[i];
  sy_tensor t = nullptr;
  SY(sy_tensor_create(rank, &d, &t), rank);
  if (data != nullptr) SY(sy_tensor_write(t, stream, data, bytes, 0), t);
  return t;
}

// The first `limit` bytes of `t` (all of it for 0), read on `stream`. Stops with the failure of
// the operation that produced `t`, if it failed.
inline std::vector<uint8_t> read_tensor(sy_tensor t, sy_stream stream, uint64_t limit = 0) {
  const uint64_t n = dense_bytes(t);
  std::vector<uint8_t> out(n);
  if (n) SY(sy_tensor_read(t, stream, out.data(), n, 0), t);
  if (limit && limit < n) out.resize(limit);
  return out;
}

// The CUDA backend's description; stops when it is not available.
inline sy_backend_info cuda_backend() {
  sy_backend_info info;
  std::memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  SY(sy_backend_probe(SY_BACKEND_CUDA, &info), nullptr);
  if (!info.available) die(std::string("the CUDA backend is not available: ") + info.reason);
  return info;
}

}  // namespace sy::driver
