// What a native program driving libswitchyard through its C ABI needs again and again: stop with
// the library's own message, create tensors from host data, read them back (which reports the
// failure of the operation that produced them), probe the CUDA backend, set up a group of virtual
// ranks with a stream and a buffer each. Used by tests/native/kernel_families.cpp,
// bench/gpu_bench.cu and bench/ll_bench.cu.
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

// What a LocalGroup is made of: the group, and one buffer per rank.
struct LocalGroupSpec {
  int32_t backend = SY_BACKEND_CUDA;
  int ranks = 1;
  int64_t timeout_ms = 30000;
  int32_t hidden = 0;
  int32_t max_tokens_per_rank = 0;
  int32_t ll_num_experts = 0;  // > 0: with the low-latency double buffer
  int32_t num_sms = 0;         // 0: the library's default
  int32_t ranks_per_node = 0;  // 0: one node
  int32_t network_ring_entries = 0;  // across nodes, two hops: 0 is the library's default
};

// A group of virtual ranks in this process, with one stream and one buffer per rank; destroyed
// with it.
struct LocalGroup {
  sy_group group = nullptr;
  std::vector<sy_rank> ranks;
  std::vector<sy_stream> streams;
  std::vector<sy_buffer> buffers;

  explicit LocalGroup(const LocalGroupSpec& spec) {
    sy_group_options go;
    std::memset(&go, 0, sizeof go);
    go.struct_size = sizeof go;
    go.backend = spec.backend;
    go.ranks = spec.ranks;
    go.timeout_ms = spec.timeout_ms;
    go.ranks_per_node = spec.ranks_per_node;
    SY(sy_group_create_local(&go, &group), nullptr);
    ranks.resize(size_t(spec.ranks));
    streams.resize(size_t(spec.ranks));
    buffers.resize(size_t(spec.ranks));
    for (int r = 0; r < spec.ranks; ++r) {
      SY(sy_group_rank(group, r, &ranks[size_t(r)]), group);
      SY(sy_stream_create(ranks[size_t(r)], &streams[size_t(r)]), ranks[size_t(r)]);
    }
    for (int r = 0; r < spec.ranks; ++r) {
      sy_buffer_options bo;
      std::memset(&bo, 0, sizeof bo);
      bo.struct_size = sizeof bo;
      bo.hidden = spec.hidden;
      bo.max_tokens_per_rank = spec.max_tokens_per_rank;
      bo.ll_num_experts = spec.ll_num_experts;
      bo.num_sms = spec.num_sms;
      bo.network_ring_entries = spec.network_ring_entries;
      SY(sy_buffer_create(ranks[size_t(r)], &bo, &buffers[size_t(r)]), ranks[size_t(r)]);
    }
  }
  LocalGroup(const LocalGroup&) = delete;
  LocalGroup& operator=(const LocalGroup&) = delete;
  ~LocalGroup() {
    for (sy_buffer b : buffers) sy_buffer_destroy(b);
    for (sy_stream s : streams) sy_stream_destroy(s);
    for (sy_rank r : ranks) sy_rank_destroy(r);
    sy_group_destroy(group);
  }

  // Rank r's stream as the backend has it (the cudaStream_t on CUDA).
  void* native_stream(int r) const {
    void* s = nullptr;
    SY(sy_stream_native(streams[size_t(r)], &s), streams[size_t(r)]);
    return s;
  }

  // A dense tensor on rank r, filled from `data` on its stream.
  sy_tensor tensor(int r, int32_t dtype, const std::vector<int64_t>& shape, const void* data, uint64_t bytes) const {
    return make_tensor(ranks[size_t(r)], streams[size_t(r)], dtype, shape, data, bytes);
  }

  // The tensor's first `bytes` bytes (all of it when 0), read on rank r's stream.
  std::vector<uint8_t> read(int r, sy_tensor t, uint64_t bytes = 0) const {
    return read_tensor(t, streams[size_t(r)], bytes);
  }
};

}  // namespace sy::driver
