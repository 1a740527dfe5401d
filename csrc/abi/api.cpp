// The C ABI (switchyard.h): reads the versioned structs, resolves handles, calls the object
// model, registers the handles it returns, and records every failure on the handle called.
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <exception>
#include <new>
#include <vector>

#include "../core/config.h"
#include "../core/dtype.h"
#include "../core/limits.h"
#include "../core/plan.h"
#include "api_util.h"
#include "handles.h"
#include "ll_ops.h"
#include "objects.h"
#include "ops.h"
#include "strided.h"
#include "switchyard.h"
#include "validate.h"

#ifndef SY_VERSION
#define SY_VERSION "0.0.0"
#endif
#ifndef SY_NCCL_HEADER_VERSION
#define SY_NCCL_HEADER_VERSION 0
#endif

using namespace sy;
using core::DType;

namespace {

std::shared_ptr<GroupCore> group_of(const std::shared_ptr<RankCore>& r) {
  return std::shared_ptr<GroupCore>(r, r->group);
}

Error resolve_order(sy_stream compute, sy_event previous, uint32_t async_finish,
                    uint32_t allocate_on_comm, StreamOrder* o) {
  SY_TRY(resolve(compute, Kind::Stream, "stream", &o->compute));
  SY_TRY(resolve(previous, Kind::Event, "previousEvent", &o->previous, true));
  o->async_finish = async_finish != 0;
  o->allocate_on_comm = allocate_on_comm != 0;
  return ok();
}


void copy_cstr(char* dst, size_t cap, const std::string& s) {
  size_t n = std::min(cap - 1, s.size());
  std::memcpy(dst, s.data(), n);
  dst[n] = 0;
}

Error check_tensor_desc(const sy_tensor_desc& d, Tensor* t) {
  DType dt = DType(d.dtype);
  if (core::dtype_size(dt) == 0) return invalid("dtype", "dtype: unknown dtype " + std::to_string(d.dtype));
  SY_TRY(check_range("shape: ndim", d.ndim, 0, SY_MAX_DIMS));
  constexpr int64_t kMaxExtent = int64_t(1) << 40;
  t->dtype = dt;
  t->ndim = d.ndim;
  bool any_stride = false;
  int64_t numel = 1;
  for (int i = 0; i < d.ndim; ++i) {
    if (d.shape[i] < 0 || d.shape[i] > kMaxExtent) {
      return invalid("shape", "shape: dimension " + std::to_string(i) + " is " + std::to_string(d.shape[i]));
    }
    if (__builtin_mul_overflow(numel, d.shape[i], &numel) || numel > kMaxExtent) {
      return invalid("shape", "shape: more than 2^40 elements");
    }
    t->shape[i] = d.shape[i];
    any_stride = any_stride || d.strides[i] != 0;
  }
  if (!any_stride) {
    dense_strides(t->ndim, t->shape, t->strides);
  } else {
    // Non-negative, bounded, and non-overlapping: sorted by stride, each dimension starts past
    // the extent of the smaller ones. Every product below stays under 2^80 / 2^40 checks.
    std::vector<int> order;
    for (int i = 0; i < d.ndim; ++i) {
      if (d.strides[i] < 0 || d.strides[i] > kMaxExtent) {
        return invalid("strides", "strides: dimension " + std::to_string(i) + " has stride " +
                                      std::to_string(d.strides[i]) + " (0..2^40 supported)");
      }
      t->strides[i] = d.strides[i];
      if (d.shape[i] > 1) order.push_back(i);
    }
    std::sort(order.begin(), order.end(), [&](int a, int b) { return t->strides[a] < t->strides[b]; });
    int64_t extent = 1;
    for (int i : order) {
      if (t->strides[i] < extent) {
        return invalid("strides", "strides: dimension " + std::to_string(i) + " (stride " +
                                      std::to_string(t->strides[i]) +
                                      ") overlaps the dimensions with smaller strides");
      }
      if (__builtin_mul_overflow(t->strides[i], t->shape[i], &extent) || extent > kMaxExtent) {
        return invalid("strides", "strides: the tensor would span more than 2^40 elements");
      }
    }
  }
  if (uint64_t(span_elements(*t)) * uint64_t(t->element_size()) > (uint64_t(1) << 40)) {
    return invalid("shape", "shape: the tensor would exceed 1 TiB");
  }
  return ok();
}

// The group's backend, by its sy_backend value.
Error attach_backend(int32_t kind, GroupCore& g) {
  if (kind == SY_BACKEND_HOST) {
    g.backend = make_host_backend();
  } else if (kind == SY_BACKEND_CUDA) {
    Error why;
    g.backend = make_cuda_backend(&why);
    if (!g.backend) return why;
  } else {
    return invalid("backend", "backend: must be host (0) or cuda (1), got " + std::to_string(kind));
  }
  g.backend_kind = sy_backend(kind);
  return ok();
}

}  // namespace

extern "C" {

// ---------------------------------------------------------------------------------------------
// Errors and library

SY_API sy_status sy_last_error(const void* handle, sy_error_info* info) {
  if (info == nullptr || info->struct_size < sizeof(sy_error_info)) return SY_ERROR_INVALID_ARGUMENT;
  Error e;
  Error lookup = last_error_of(handle, &e);
  if (lookup) return lookup.status;
  sy_error_info out;
  std::memset(&out, 0, sizeof out);
  out.struct_size = sizeof out;
  out.status = e.status;
  out.rank = e.wait.rank;
  out.peer_rank = e.wait.peer;
  out.role = int32_t(e.wait.role);
  out.channel = e.wait.channel;
  out.expected = e.wait.expected;
  out.observed = e.wait.observed;
  out.waited_seconds = e.wait.waited_seconds;
  copy_cstr(out.argument, sizeof out.argument, e.argument);
  copy_cstr(out.message, sizeof out.message, e.message);
  std::memcpy(info, &out, sizeof out);
  return SY_OK;
}

SY_API uint32_t sy_abi_version(void) { return SY_ABI_VERSION; }

SY_API const char* sy_version_string(void) { return SY_VERSION; }

SY_API sy_status sy_struct_sizes(uint32_t* sizes, uint32_t count) {
  if (sizes == nullptr) return SY_ERROR_INVALID_ARGUMENT;
  const uint32_t all[SY_STRUCT_COUNT] = {
      sizeof(sy_error_info),   sizeof(sy_backend_info),    sizeof(sy_group_options),
      sizeof(sy_rank_info),    sizeof(sy_tensor_desc),     sizeof(sy_buffer_options),
      sizeof(sy_buffer_plan),  sizeof(sy_config),          sizeof(sy_layout_args),
      sizeof(sy_layout_result), sizeof(sy_dispatch_args),  sizeof(sy_dispatch_result),
      sizeof(sy_combine_args), sizeof(sy_combine_result),  sizeof(sy_handle_info),
      sizeof(sy_ll_dispatch_args), sizeof(sy_ll_dispatch_result), sizeof(sy_ll_combine_args),
      sizeof(sy_ll_combine_result), sizeof(sy_ll_handle_info), sizeof(sy_process_group_options),
      sizeof(sy_buffer_share), sizeof(sy_nccl_info), sizeof(sy_host_info),
      sizeof(sy_network_stats),
  };
  for (uint32_t i = 0; i < count && i < SY_STRUCT_COUNT; ++i) sizes[i] = all[i];
  return SY_OK;
}

SY_API sy_status sy_backend_probe(int32_t backend, sy_backend_info* info) {
  return guarded(nullptr, [&]() -> Error {
    if (info == nullptr || info->struct_size < sizeof(sy_backend_info)) {
      return invalid("info", "info: NULL or struct_size too small");
    }
    sy_backend_info out;
    std::memset(&out, 0, sizeof out);
    out.struct_size = sizeof out;
    out.backend = backend;
    out.nccl_header_version = SY_NCCL_HEADER_VERSION;
    if (backend == SY_BACKEND_HOST) {
      out.compiled = 1;
      out.available = 1;
      out.dispatch_supported = 1;
      copy_cstr(out.device_name, sizeof out.device_name, "host (CPU threads)");
    } else if (backend == SY_BACKEND_CUDA) {
      SY_TRY(probe_cuda(&out));
    } else {
      return invalid("backend", "backend: must be host (0) or cuda (1), got " + std::to_string(backend));
    }
    std::memcpy(info, &out, sizeof out);
    return ok();
  });
}

SY_API sy_status sy_convert(int32_t src_dtype, const void* src, int32_t dst_dtype, void* dst,
                            uint64_t count) {
  return guarded(nullptr, [&]() -> Error {
    if (count > 0 && (src == nullptr || dst == nullptr)) return invalid("data", "data: NULL with a non-zero count");
    DType s = DType(src_dtype), d = DType(dst_dtype);
    auto* out = static_cast<uint8_t*>(dst);
    const auto* in = static_cast<const uint8_t*>(src);
    if (s == DType::F32 && d == DType::BF16) {
      for (uint64_t i = 0; i < count; ++i) {
        float f;
        std::memcpy(&f, in + 4 * i, 4);
        uint16_t h = core::float_to_bf16(f);
        std::memcpy(out + 2 * i, &h, 2);
      }
    } else if (s == DType::BF16 && d == DType::F32) {
      for (uint64_t i = 0; i < count; ++i) {
        uint16_t h;
        std::memcpy(&h, in + 2 * i, 2);
        float f = core::bf16_to_float(h);
        std::memcpy(out + 4 * i, &f, 4);
      }
    } else if (s == DType::F32 && d == DType::FP8E4M3) {
      for (uint64_t i = 0; i < count; ++i) {
        float f;
        std::memcpy(&f, in + 4 * i, 4);
        out[i] = core::float_to_fp8e4m3(f);
      }
    } else if (s == DType::FP8E4M3 && d == DType::F32) {
      for (uint64_t i = 0; i < count; ++i) {
        float f = core::fp8e4m3_to_float(in[i]);
        std::memcpy(out + 4 * i, &f, 4);
      }
    } else {
      return invalid("dtype", std::string("dtype: no conversion from ") + core::dtype_name(s) + " to " +
                                  core::dtype_name(d));
    }
    return ok();
  });
}

// ---------------------------------------------------------------------------------------------
// Groups and ranks

namespace {

// The emulated NIC's link model of a group: a link of 1 MB/s or more (below, a test of a few
// records would take minutes), at most 1 s away; 0, 0 = memory speed.
Error set_nic_model(GroupCore& g, double bytes_per_second, int64_t latency_ns) {
  if (!(bytes_per_second == 0 || (bytes_per_second >= 1e6 && bytes_per_second <= 1e15))) {
    return invalid("emulatedNic.bytesPerSecond",
                   "emulatedNic.bytesPerSecond: 0 (memory speed) or 1e6..1e15, got " + std::to_string(bytes_per_second));
  }
  SY_TRY(check_range("emulatedNic.latencyNs", latency_ns, 0, 1000000000));
  g.nic_bytes_per_second = bytes_per_second;
  g.nic_latency_ns = latency_ns;
  return ok();
}

}  // namespace

SY_API sy_status sy_group_create_local(const sy_group_options* options, sy_group* out) {
  return guarded(nullptr, [&]() -> Error {
    sy_group_options o;
    SY_TRY(read_struct(options, "options", &o, offsetof(sy_group_options, ranks_per_node)));
    if (out == nullptr) return invalid("out", "out: NULL");
    SY_TRY(check_range("ranks", o.ranks, 1, SY_MAX_LOCAL_RANKS));
    SY_TRY(check_range("ranksPerNode", o.ranks_per_node, 0, o.ranks));
    if (o.ranks_per_node > 0 && o.ranks % o.ranks_per_node != 0) {
      return invalid("ranksPerNode", "ranksPerNode: " + std::to_string(o.ranks_per_node) + " does not divide the " +
                                         std::to_string(o.ranks) + " ranks into whole nodes");
    }
    SY_TRY(check_range("timeoutMs", o.timeout_ms, 0, int64_t(1) << 40));
    SY_TRY(check_range("firstDevice", o.first_device, 0, 1 << 16));
    auto g = std::make_shared<GroupCore>();
    g->num_ranks = o.ranks;
    g->ranks_per_node = o.ranks_per_node > 0 ? o.ranks_per_node : o.ranks;
    SY_TRY(set_nic_model(*g, o.emulated_nic_bytes_per_second, o.emulated_nic_latency_ns));
    g->timeout_ms = o.timeout_ms > 0 ? o.timeout_ms : core::kDefaultTimeoutMs;
    SY_TRY(attach_backend(o.backend, *g));
    for (int i = 0; i < o.ranks; ++i) {
      auto r = std::make_unique<RankCore>();
      r->group = g.get();
      r->index = i;
      r->device = o.first_device;  // the CUDA backend spreads ranks from here
      SY_TRY(g->backend->init_rank(*g, *r));
      g->ranks.push_back(std::move(r));
    }
    *out = static_cast<sy_group>(register_handle(Kind::Group, g));
    return ok();
  });
}

SY_API sy_status sy_group_create_process(const sy_process_group_options* options, sy_group* out) {
  return guarded(nullptr, [&]() -> Error {
    sy_process_group_options o;
    SY_TRY(read_struct(options, "options", &o, offsetof(sy_process_group_options, emulated_nic_bytes_per_second)));
    if (out == nullptr) return invalid("out", "out: NULL");
    SY_TRY(check_range("worldSize", o.world_size, 1, core::kMaxRanks));
    SY_TRY(check_range("rank", o.rank, 0, o.world_size - 1));
    SY_TRY(check_range("localWorldSize", o.local_world_size, 1, o.world_size));
    SY_TRY(check_range("localRank", o.local_rank, 0, o.local_world_size - 1));
    // Nodes are numbered from the ranks, node-major (torchrun's numbering, Slurm's block
    // distribution): rank = node * localWorldSize + localRank.
    if (o.world_size % o.local_world_size != 0 || o.rank % o.local_world_size != o.local_rank) {
      return invalid("localWorldSize",
                     "localWorldSize: rank " + std::to_string(o.rank) + " of " + std::to_string(o.world_size) +
                         " with localRank " + std::to_string(o.local_rank) + " of " +
                         std::to_string(o.local_world_size) +
                         " is not node-major numbering (rank = node * localWorldSize + localRank, every node "
                         "alike), which Switchyard's nodes are derived from");
    }
    SY_TRY(check_range("device", o.device, -1, 1 << 16));
    SY_TRY(check_range("timeoutMs", o.timeout_ms, 0, int64_t(1) << 40));
    auto g = std::make_shared<GroupCore>();
    g->num_ranks = o.world_size;
    g->process_group = true;
    g->local_rank = o.local_rank;
    g->local_world_size = o.local_world_size;
    g->ranks_per_node = o.local_world_size;
    SY_TRY(set_nic_model(*g, o.emulated_nic_bytes_per_second, o.emulated_nic_latency_ns));
    g->timeout_ms = o.timeout_ms > 0 ? o.timeout_ms : core::kDefaultTimeoutMs;
    SY_TRY(attach_backend(o.backend, *g));
    auto r = std::make_unique<RankCore>();
    r->group = g.get();
    r->index = o.rank;
    r->device = o.device >= 0 ? o.device : o.local_rank;
    SY_TRY(g->backend->init_rank(*g, *r));
    g->ranks.push_back(std::move(r));
    *out = static_cast<sy_group>(register_handle(Kind::Group, g));
    return ok();
  });
}

SY_API sy_status sy_group_destroy(sy_group group) {
  return guarded(nullptr, [&] { return release_handle(group, Kind::Group, "group"); });
}

SY_API sy_status sy_group_rank(sy_group group, int32_t index, sy_rank* out) {
  return guarded(group, [&]() -> Error {
    std::shared_ptr<GroupCore> g;
    SY_TRY(resolve(group, Kind::Group, "group", &g));
    if (out == nullptr) return invalid("out", "out: NULL");
    SY_TRY(check_range("rank", index, 0, int64_t(g->ranks.size()) - 1));  // slots of this process's ranks
    std::shared_ptr<RankCore> r(g, g->ranks[size_t(index)].get());
    *out = static_cast<sy_rank>(register_handle(Kind::Rank, r));
    return ok();
  });
}

SY_API sy_status sy_rank_destroy(sy_rank rank) {
  return guarded(nullptr, [&] { return release_handle(rank, Kind::Rank, "rank"); });
}

SY_API sy_status sy_rank_info_get(sy_rank rank, sy_rank_info* info) {
  return guarded(rank, [&]() -> Error {
    std::shared_ptr<RankCore> r;
    SY_TRY(resolve(rank, Kind::Rank, "rank", &r));
    sy_rank_info out;
    std::memset(&out, 0, sizeof out);
    out.struct_size = sizeof out;
    out.rank = r->index;
    out.num_ranks = r->group->num_ranks;
    out.backend = r->group->backend_kind;
    out.device = r->device;
    out.local_ranks = int32_t(r->group->ranks.size());
    out.timeout_ms = r->group->timeout_ms;
    out.ranks_per_node = r->group->ranks_per_node;
    out.node = r->index / r->group->ranks_per_node;
    return write_struct(info, out, "info");
  });
}

// ---------------------------------------------------------------------------------------------
// Streams and events

SY_API sy_status sy_stream_create(sy_rank rank, sy_stream* out) {
  return guarded(rank, [&]() -> Error {
    std::shared_ptr<RankCore> r;
    SY_TRY(resolve(rank, Kind::Rank, "rank", &r));
    if (out == nullptr) return invalid("out", "out: NULL");
    std::shared_ptr<Stream> s;
    SY_TRY(r->group->backend->create_stream(group_of(r), *r, &s));
    *out = static_cast<sy_stream>(register_handle(Kind::Stream, s));
    return ok();
  });
}

SY_API sy_status sy_stream_destroy(sy_stream stream) {
  return guarded(nullptr, [&] { return release_handle(stream, Kind::Stream, "stream"); });
}

SY_API sy_status sy_stream_wait_event(sy_stream stream, sy_event event) {
  return guarded(stream, [&]() -> Error {
    std::shared_ptr<Stream> s;
    std::shared_ptr<Event> e;
    SY_TRY(resolve(stream, Kind::Stream, "stream", &s));
    SY_TRY(resolve(event, Kind::Event, "event", &e));
    if (e->group != s->group || e->rank != s->rank) {
      return fail(SY_ERROR_WRONG_HANDLE, "event: belongs to rank " + std::to_string(e->rank) +
                                             ", the stream to rank " + std::to_string(s->rank),
                  "event");
    }
    return s->wait_event(*e);
  });
}

SY_API sy_status sy_stream_synchronize(sy_stream stream, int64_t timeout_ms) {
  return guarded(stream, [&]() -> Error {
    std::shared_ptr<Stream> s;
    SY_TRY(resolve(stream, Kind::Stream, "stream", &s));
    return s->synchronize(Deadline::after_ms(timeout_ms > 0 ? timeout_ms : outer_timeout_ms(s->group->timeout_ms)));
  });
}

SY_API sy_status sy_stream_native(sy_stream stream, void** out) {
  return guarded(stream, [&]() -> Error {
    std::shared_ptr<Stream> s;
    SY_TRY(resolve(stream, Kind::Stream, "stream", &s));
    if (out == nullptr) return invalid("out", "out: NULL");
    *out = s->native();
    if (*out == nullptr) {
      return fail(SY_ERROR_UNSUPPORTED, "stream: the host backend runs streams on threads; it has no native stream");
    }
    return ok();
  });
}

SY_API sy_status sy_event_create(sy_rank rank, sy_event* out) {
  return guarded(rank, [&]() -> Error {
    std::shared_ptr<RankCore> r;
    SY_TRY(resolve(rank, Kind::Rank, "rank", &r));
    if (out == nullptr) return invalid("out", "out: NULL");
    std::shared_ptr<Event> e;
    SY_TRY(r->group->backend->create_event(group_of(r), *r, &e, true));
    *out = static_cast<sy_event>(register_handle(Kind::Event, e));
    return ok();
  });
}

SY_API sy_status sy_event_destroy(sy_event event) {
  return guarded(nullptr, [&] { return release_handle(event, Kind::Event, "event"); });
}

SY_API sy_status sy_event_record(sy_event event, sy_stream stream) {
  return guarded(event, [&]() -> Error {
    std::shared_ptr<Stream> s;
    std::shared_ptr<Event> e;
    SY_TRY(resolve(event, Kind::Event, "event", &e));
    SY_TRY(resolve(stream, Kind::Stream, "stream", &s));
    if (e->group != s->group || e->rank != s->rank) {
      return fail(SY_ERROR_WRONG_HANDLE, "stream: belongs to rank " + std::to_string(s->rank) +
                                             ", the event to rank " + std::to_string(e->rank),
                  "stream");
    }
    return e->record(*s);
  });
}

SY_API sy_status sy_event_query(sy_event event) {
  sy_status st = SY_OK;
  const sy_status failed = guarded(event, [&]() -> Error {
    std::shared_ptr<Event> e;
    SY_TRY(resolve(event, Kind::Event, "event", &e));
    Error q = e->query();
    st = q.status;
    return q.status == SY_NOT_READY ? ok() : q;  // not ready is an answer, not a failure
  });
  return failed != SY_OK ? failed : st;
}

SY_API sy_status sy_event_synchronize(sy_event event, int64_t timeout_ms) {
  return guarded(event, [&]() -> Error {
    std::shared_ptr<Event> e;
    SY_TRY(resolve(event, Kind::Event, "event", &e));
    return e->synchronize(Deadline::after_ms(timeout_ms > 0 ? timeout_ms : outer_timeout_ms(e->group->timeout_ms)));
  });
}

SY_API sy_status sy_event_elapsed(sy_event start, sy_event end, double* ms) {
  sy_status st = SY_OK;
  const sy_status failed = guarded(start, [&]() -> Error {
    std::shared_ptr<Event> a, b;
    SY_TRY(resolve(start, Kind::Event, "start", &a));
    SY_TRY(resolve(end, Kind::Event, "end", &b));
    if (ms == nullptr) return invalid("ms", "ms: NULL");
    if (a->group != b->group) return fail(SY_ERROR_WRONG_HANDLE, "end: belongs to another group than start", "end");
    if (a->rank != b->rank) {
      return fail(SY_ERROR_WRONG_HANDLE, "end: belongs to rank " + std::to_string(b->rank) +
                                             ", start to rank " + std::to_string(a->rank),
                  "end");
    }
    Error e = a->elapsed_ms(*b, ms);
    st = e.status;
    return e.status == SY_NOT_READY ? ok() : e;  // not ready is an answer, not a failure
  });
  return failed != SY_OK ? failed : st;
}

// ---------------------------------------------------------------------------------------------
// Tensors

SY_API sy_status sy_tensor_create(sy_rank rank, const sy_tensor_desc* desc, sy_tensor* out) {
  return guarded(rank, [&]() -> Error {
    std::shared_ptr<RankCore> r;
    SY_TRY(resolve(rank, Kind::Rank, "rank", &r));
    sy_tensor_desc d;
    SY_TRY(read_struct(desc, "desc", &d));
    if (out == nullptr) return invalid("out", "out: NULL");
    auto t = std::make_shared<Tensor>();
    SY_TRY(check_tensor_desc(d, t.get()));
    t->group = group_of(r);
    t->rank = r->index;
    uint64_t bytes = uint64_t(span_elements(*t)) * uint64_t(t->element_size());
    SY_TRY(r->group->backend->allocate(*r, bytes, &t->memory));
    *out = static_cast<sy_tensor>(register_handle(Kind::Tensor, t));
    return ok();
  });
}

SY_API sy_status sy_tensor_destroy(sy_tensor tensor) {
  return guarded(nullptr, [&] { return release_handle(tensor, Kind::Tensor, "tensor"); });
}

SY_API sy_status sy_tensor_describe(sy_tensor tensor, sy_tensor_desc* out) {
  return guarded(tensor, [&]() -> Error {
    std::shared_ptr<Tensor> t;
    SY_TRY(resolve(tensor, Kind::Tensor, "tensor", &t));
    sy_tensor_desc d;
    std::memset(&d, 0, sizeof d);
    d.struct_size = sizeof d;
    d.dtype = int32_t(t->dtype);
    d.ndim = t->ndim;
    for (int i = 0; i < t->ndim; ++i) {
      d.shape[i] = t->shape[i];
      d.strides[i] = t->strides[i];
    }
    d.data = uint64_t(reinterpret_cast<uintptr_t>(t->data()));
    d.device = t->memory->device;
    return write_struct(out, d, "out");
  });
}

static Error tensor_copy_args(sy_tensor tensor, sy_stream stream, const void* host, uint64_t bytes,
                              std::shared_ptr<Tensor>* t, std::shared_ptr<Stream>* s) {
  SY_TRY(resolve(tensor, Kind::Tensor, "tensor", t));
  SY_TRY(resolve(stream, Kind::Stream, "stream", s));
  if ((*s)->group != (*t)->group || (*s)->rank != (*t)->rank) {
    return fail(SY_ERROR_WRONG_HANDLE, "stream: belongs to rank " + std::to_string((*s)->rank) +
                                           ", the tensor to rank " + std::to_string((*t)->rank),
                "stream");
  }
  SY_TRY(check_view("tensor", **t));
  if (bytes != (*t)->dense_bytes()) {
    return invalid("data", "data: the tensor holds " + std::to_string((*t)->dense_bytes()) +
                               " bytes (" + shape_string(**t) + " " + core::dtype_name((*t)->dtype) +
                               "), got " + std::to_string(bytes));
  }
  if (bytes > 0 && host == nullptr) return invalid("data", "data: NULL");
  return ok();
}

SY_API sy_status sy_tensor_write(sy_tensor tensor, sy_stream stream, const void* src,
                                 uint64_t bytes, int64_t timeout_ms) {
  return guarded(tensor, [&]() -> Error {
    std::shared_ptr<Tensor> t;
    std::shared_ptr<Stream> s;
    SY_TRY(tensor_copy_args(tensor, stream, src, bytes, &t, &s));
    SY_TRY(check_writable("tensor", *t));
    Deadline d = Deadline::after_ms(timeout_ms > 0 ? timeout_ms : outer_timeout_ms(t->group->timeout_ms));
    return t->group->backend->write_tensor(*s, t, src, d);
  });
}

SY_API sy_status sy_tensor_read(sy_tensor tensor, sy_stream stream, void* dst, uint64_t bytes,
                                int64_t timeout_ms) {
  return guarded(tensor, [&]() -> Error {
    std::shared_ptr<Tensor> t;
    std::shared_ptr<Stream> s;
    SY_TRY(tensor_copy_args(tensor, stream, dst, bytes, &t, &s));
    Deadline d = Deadline::after_ms(timeout_ms > 0 ? timeout_ms : outer_timeout_ms(t->group->timeout_ms));
    return t->group->backend->read_tensor(*s, t, dst, d);
  });
}

SY_API sy_status sy_tensor_copy(sy_tensor dst, sy_tensor src, sy_stream stream) {
  return guarded(dst, [&]() -> Error {
    std::shared_ptr<Tensor> d, from;
    std::shared_ptr<Stream> s;
    SY_TRY(resolve(dst, Kind::Tensor, "dst", &d));
    SY_TRY(resolve(src, Kind::Tensor, "src", &from));
    SY_TRY(resolve(stream, Kind::Stream, "stream", &s));
    for (const auto* t : {&d, &from}) {
      if (s->group != (*t)->group || s->rank != (*t)->rank) {
        return fail(SY_ERROR_WRONG_HANDLE, std::string(t == &d ? "dst" : "src") + ": belongs to rank " +
                                               std::to_string((*t)->rank) + ", the stream to rank " +
                                               std::to_string(s->rank),
                    t == &d ? "dst" : "src");
      }
    }
    SY_TRY(check_view("dst", *d));
    SY_TRY(check_view("src", *from));
    SY_TRY(check_writable("dst", *d));
    if (!d->is_dense()) return invalid("dst", "dst: must be dense (row-major, no strides) for a copy");
    if (!from->is_dense()) return invalid("src", "src: must be dense (row-major, no strides) for a copy");
    if (d->dtype != from->dtype || d->dense_bytes() != from->dense_bytes()) {
      return invalid("dst", "dst: " + shape_string(*d) + " " + core::dtype_name(d->dtype) + " cannot hold src, " +
                                shape_string(*from) + " " + core::dtype_name(from->dtype) +
                                " (same dtype and element count needed)");
    }
    // Overlapping bytes (a tensor and a view of it) would make the copy's result undefined.
    const uint8_t* a0 = d->data();
    const uint8_t* b0 = from->data();
    const uint64_t n = d->dense_bytes();
    if (n > 0 && a0 < b0 + n && b0 < a0 + n) {
      if (a0 == b0) return ok();  // the same bytes: nothing to do
      return invalid("dst", "dst: overlaps src in memory; copy through a third tensor");
    }
    return d->group->backend->copy_tensor(*s, d, from);
  });
}

// ---------------------------------------------------------------------------------------------
// Configuration and buffers

SY_API sy_status sy_default_config(int32_t ranks, sy_config* out) {
  return guarded(nullptr, [&]() -> Error {
    SY_TRY(check_range("ranks", ranks, 1, core::kMaxRanks));
    core::Config c = core::default_config(ranks);
    sy_config v{sizeof(sy_config), c.num_sms, c.nvl_chunk_send, c.nvl_chunk_recv, c.rdma_chunk_send,
                c.rdma_chunk_recv};
    return write_struct(out, v, "out");
  });
}

static sy_buffer_plan plan_to_c(const core::BufferPlan& p) {
  sy_buffer_plan v;
  std::memset(&v, 0, sizeof v);
  v.struct_size = sizeof v;
  v.record_bytes = p.record_bytes;
  v.combine_row_bytes = p.combine_row_bytes;
  v.max_topk = p.max_topk;
  v.header_bytes = p.header_bytes;
  v.dispatch_region_bytes = p.dispatch_region_bytes;
  v.combine_region_bytes = p.combine_region_bytes;
  v.total_bytes = p.total_bytes;
  v.max_recv_rows = p.max_recv_rows();
  v.ll_half_bytes = p.ll.half_bytes;
  v.ll_message_bytes = p.ll.msg_bytes;
  v.ll_combine_row_bytes = p.ll.row_bytes;
  v.net_record_bytes = p.net_record_bytes;
  v.net_partial_bytes = p.net_partial_bytes;
  v.net_result_bytes = p.net_result_bytes;
  v.net_ring_entries = p.net_ring_entries;
  v.net_region_bytes = p.net_region_bytes;
  return v;
}

static core::NetworkOptions network_options(const sy_buffer_options& o, int32_t ranks_per_node) {
  core::NetworkOptions n;
  n.ranks_per_node = ranks_per_node;
  n.direct = o.internode_path == SY_INTERNODE_DIRECT;
  n.ring_entries = o.network_ring_entries;
  return n;
}

static Error check_internode_path(const sy_buffer_options& o) {
  if (o.internode_path == SY_INTERNODE_TWO_HOP || o.internode_path == SY_INTERNODE_DIRECT) return ok();
  return invalid("internodePath", "internodePath: expected 0 (two hops) or 1 (direct), got " +
                                      std::to_string(o.internode_path));
}

SY_API sy_status sy_plan_buffer(const sy_buffer_options* options, int32_t ranks,
                                sy_buffer_plan* out) {
  return guarded(nullptr, [&]() -> Error {
    sy_buffer_options o;
    SY_TRY(read_struct(options, "options", &o, SY_BUFFER_OPTIONS_V1_SIZE));
    core::BufferPlan p;
    SY_TRY(check_internode_path(o));
    SY_TRY(from_problem(core::plan_buffer(ranks, o.hidden, o.max_tokens_per_rank, o.ll_num_experts, &p,
                                          network_options(o, o.ranks_per_node))));
    return write_struct(out, plan_to_c(p), "out");
  });
}

SY_API sy_status sy_buffer_create(sy_rank rank, const sy_buffer_options* options,
                                  sy_buffer* out) {
  return guarded(rank, [&]() -> Error {
    std::shared_ptr<RankCore> r;
    SY_TRY(resolve(rank, Kind::Rank, "rank", &r));
    sy_buffer_options o;
    SY_TRY(read_struct(options, "options", &o, SY_BUFFER_OPTIONS_V1_SIZE));
    if (out == nullptr) return invalid("out", "out: NULL");
    std::shared_ptr<GroupCore> g = group_of(r);
    const int R = g->num_ranks;
    SY_TRY(check_range("lowLatency.numExperts", o.ll_num_experts, 0, int64_t(R) * core::kMaxExpertsPerRank));
    SY_TRY(check_internode_path(o));
    if (o.ranks_per_node != 0 && o.ranks_per_node != g->ranks_per_node) {
      return invalid("ranksPerNode", "ranksPerNode: " + std::to_string(o.ranks_per_node) + " differs from the group's " +
                                         std::to_string(g->ranks_per_node) + "; leave it 0 (the group's)");
    }
    core::BufferPlan plan;
    SY_TRY(from_problem(
        core::plan_buffer(R, o.hidden, o.max_tokens_per_rank, o.ll_num_experts, &plan,
                          network_options(o, g->ranks_per_node))));
    if (o.num_sms != 0 && (o.num_sms < 2 || o.num_sms % 2 != 0 || o.num_sms > 1024)) {
      return invalid("numSms", "numSms: must be an even number of SMs in 2..1024 (half send, "
                               "half receive), got " + std::to_string(o.num_sms));
    }
    SY_TRY(check_range("timeoutMs", o.timeout_ms, 0, int64_t(1) << 40));
    auto buf = std::make_shared<BufferCore>();
    buf->group = g;
    buf->rank = r->index;
    buf->plan = plan;
    buf->timeout_ms = o.timeout_ms > 0 ? o.timeout_ms : g->timeout_ms;
    buf->num_sms = o.num_sms > 0 ? o.num_sms : core::default_config(R).num_sms;
    buf->masking = o.enable_masking != 0;
    // The modelled link must carry a worst-case dispatch or combine well within the deadline the
    // peers wait on it with: an operation that cannot make it would time out every time.
    if (plan.nodes > 1 && (g->nic_bytes_per_second > 0 || g->nic_latency_ns > 0)) {
      const double worst_ms =
          1e3 * ((g->nic_bytes_per_second > 0 ? double(plan.worst_network_bytes()) / g->nic_bytes_per_second : 0.0) +
                 double(g->nic_latency_ns) * 1e-9);
      if (2 * worst_ms > double(buf->timeout_ms)) {
        return invalid("emulatedNic",
                       "emulatedNic: the modelled link takes up to " + std::to_string(int64_t(worst_ms)) +
                           " ms for a worst-case dispatch or combine, over half the " + std::to_string(buf->timeout_ms) +
                           " ms deadline; a faster link, a longer timeoutMs or a smaller maxTokensPerRank");
      }
    }
    SY_TRY(g->backend->create_stream(g, *r, &buf->comm_stream));
    SY_TRY(g->backend->allocate_shared(*r, g->backend->shared_bytes(plan, g->process_group), &buf->region));

    // Join the n-th set: the buffers every rank creates n-th belong together. In a process
    // group the set is this buffer's own; the peers' buffers arrive through sy_buffer_import.
    std::shared_ptr<BufferSet> set;
    if (g->process_group) {
      set = std::make_shared<BufferSet>(R);
      set->plan = plan;
      set->masking = buf->masking;
      set->timeout_ms = buf->timeout_ms;
      set->nic = {g->nic_bytes_per_second, g->nic_latency_ns};
    } else {
      std::lock_guard<std::mutex> l(g->sets_mu);
      size_t n = size_t(r->buffers_created);
      if (g->sets.size() <= n) g->sets.resize(n + 1);
      set = g->sets[n].lock();
      if (set) {
        // Name the first option that differs from the other ranks' n-th buffer.
        const char* arg = set->plan.hidden != plan.hidden                             ? "hidden"
                          : set->plan.max_tokens_per_rank != plan.max_tokens_per_rank ? "maxTokensPerRank"
                          : set->plan.ll.experts != plan.ll.experts                   ? "lowLatency.numExperts"
                          : set->masking != buf->masking                              ? "enableMasking"
                          : set->timeout_ms != buf->timeout_ms                        ? "timeoutMs"
                          : set->plan.direct != plan.direct                           ? "internodePath"
                          : set->plan.net_ring_entries != plan.net_ring_entries       ? "networkRingEntries"
                                                                                      : nullptr;
        if (arg) {
          return invalid(arg, std::string(arg) + ": buffer " + std::to_string(n) + " of the other ranks has hidden " +
                                  std::to_string(set->plan.hidden) + ", maxTokensPerRank " +
                                  std::to_string(set->plan.max_tokens_per_rank) + ", " +
                                  std::to_string(set->plan.ll.experts) + " low-latency experts, masking " +
                                  (set->masking ? "on" : "off") + ", timeout " + std::to_string(set->timeout_ms) +
                                  " ms, " + (set->plan.direct ? "direct" : "two-hop") +
                                  " across nodes; every rank must create the same buffers in the same order");
        }
      }
      if (!set) {
        set = std::make_shared<BufferSet>(R);
        set->plan = plan;
        set->masking = buf->masking;
        set->timeout_ms = buf->timeout_ms;
        set->nic = {g->nic_bytes_per_second, g->nic_latency_ns};
        g->sets[n] = set;
      }
      r->buffers_created += 1;
    }
    {
      std::lock_guard<std::mutex> l(set->mu);
      set->bases[size_t(r->index)] = static_cast<uint8_t*>(buf->region->ptr);
      set->regions[size_t(r->index)] = buf->region;
      set->joined += 1;
      set->cv.notify_all();
    }
    buf->set = set;
    SY_TRY(g->backend->init_buffer(*buf));
    *out = static_cast<sy_buffer>(register_handle(Kind::Buffer, buf));
    return ok();
  });
}

SY_API sy_status sy_buffer_destroy(sy_buffer buffer) {
  return guarded(nullptr, [&] { return release_handle(buffer, Kind::Buffer, "buffer"); });
}

SY_API sy_status sy_buffer_export(sy_buffer buffer, sy_buffer_share* out) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    SY_TRY(resolve(buffer, Kind::Buffer, "buffer", &b));
    if (!b->group->process_group) {
      return invalid("buffer", "buffer: belongs to a group of virtual ranks, which share memory without export");
    }
    sy_buffer_share v;
    std::memset(&v, 0, sizeof v);
    v.struct_size = sizeof v;
    v.rank = b->rank;
    v.hidden = b->plan.hidden;
    v.max_tokens_per_rank = b->plan.max_tokens_per_rank;
    v.ll_num_experts = b->plan.ll.experts;
    v.enable_masking = b->masking ? 1 : 0;
    v.bytes = b->group->backend->shared_bytes(b->plan, true);
    copy_cstr(v.name, sizeof v.name, b->region->share_name);
    v.ranks_per_node = b->group->ranks_per_node;
    v.internode_path = b->plan.direct ? SY_INTERNODE_DIRECT : SY_INTERNODE_TWO_HOP;
    v.network_ring_entries = b->plan.net_ring_entries;
    std::string endpoint;
    SY_TRY(b->group->backend->export_network(*b, &endpoint));
    if (endpoint.size() >= sizeof v.network_endpoint) {
      return fail(SY_ERROR_INTERNAL, "the network endpoint (" + std::to_string(endpoint.size()) +
                                         " characters) does not fit sy_buffer_share");
    }
    copy_cstr(v.network_endpoint, sizeof v.network_endpoint, endpoint);
    return write_struct(out, v, "out");
  });
}

SY_API sy_status sy_buffer_import(sy_buffer buffer, const sy_buffer_share* share) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    SY_TRY(resolve(buffer, Kind::Buffer, "buffer", &b));
    sy_buffer_share v;
    SY_TRY(read_struct(share, "share", &v, offsetof(sy_buffer_share, ranks_per_node)));
    v.name[sizeof v.name - 1] = 0;
    const core::BufferPlan& p = b->plan;
    SY_TRY(check_range("share.rank", v.rank, 0, b->group->num_ranks - 1));
    if (v.rank == b->rank) return invalid("share.rank", "share.rank: a rank does not import its own buffer");
    if ((v.enable_masking != 0) != b->masking) {
      return invalid("enableMasking", "enableMasking: rank " + std::to_string(v.rank) + " created its buffer with masking " +
                                          (v.enable_masking ? "on" : "off") + ", this rank with masking " +
                                          (b->masking ? "on" : "off") + "; every rank must pass the same options");
    }
    const int peer_per_node = v.ranks_per_node > 0 ? v.ranks_per_node : b->group->num_ranks;
    if (peer_per_node != b->group->ranks_per_node) {
      return invalid("localWorldSize", "localWorldSize: rank " + std::to_string(v.rank) + " has " +
                                           std::to_string(peer_per_node) + " ranks per node, this rank " +
                                           std::to_string(b->group->ranks_per_node) +
                                           "; every process of a job must see the same LOCAL_WORLD_SIZE");
    }
    if ((v.internode_path == SY_INTERNODE_DIRECT) != p.direct) {
      return invalid("internodePath", "internodePath: rank " + std::to_string(v.rank) + " crosses nodes " +
                                          (v.internode_path == SY_INTERNODE_DIRECT ? "directly" : "in two hops") +
                                          ", this rank " + (p.direct ? "directly" : "in two hops") +
                                          "; every rank must pass the same options");
    }
    if (v.network_ring_entries != p.net_ring_entries) {
      return invalid("networkRingEntries", "networkRingEntries: rank " + std::to_string(v.rank) + "'s network rings hold " +
                                               std::to_string(v.network_ring_entries) + " entries, this rank's " +
                                               std::to_string(p.net_ring_entries) +
                                               "; every rank must pass the same options");
    }
    if (v.hidden != p.hidden || v.max_tokens_per_rank != p.max_tokens_per_rank || v.ll_num_experts != p.ll.experts ||
        v.bytes != b->group->backend->shared_bytes(p, true)) {
      return invalid("share", "share: rank " + std::to_string(v.rank) + " created its buffer with hidden " +
                                  std::to_string(v.hidden) + ", maxTokensPerRank " +
                                  std::to_string(v.max_tokens_per_rank) + ", " + std::to_string(v.ll_num_experts) +
                                  " low-latency experts; this rank with " + std::to_string(p.hidden) + ", " +
                                  std::to_string(p.max_tokens_per_rank) + ", " + std::to_string(p.ll.experts) +
                                  ": every rank must create the same buffers in the same order");
    }
    BufferSet& set = *b->set;
    {
      std::lock_guard<std::mutex> l(set.mu);
      if (set.bases[size_t(v.rank)] != nullptr) {
        return invalid("share.rank", "share.rank: rank " + std::to_string(v.rank) + "'s buffer is already imported");
      }
    }
    v.network_endpoint[sizeof v.network_endpoint - 1] = 0;
    // The memory first: a failure there leaves nothing behind (the mapping goes with `m`), so the
    // import can be tried again; connecting the network engine's queue pair to the peer cannot be
    // undone, and comes last.
    std::shared_ptr<Memory> m;
    SY_TRY(b->group->backend->import_shared(b->rank_core(), v.name, v.bytes, b->plan, &m));
    SY_TRY(b->group->backend->import_network(*b, v.rank, v.network_endpoint));
    std::lock_guard<std::mutex> l(set.mu);
    if (set.bases[size_t(v.rank)] != nullptr) {  // imported meanwhile, by another thread
      return invalid("share.rank", "share.rank: rank " + std::to_string(v.rank) + "'s buffer is already imported");
    }
    set.bases[size_t(v.rank)] = static_cast<uint8_t*>(m->ptr);
    set.regions[size_t(v.rank)] = m;
    set.joined += 1;
    set.cv.notify_all();
    return ok();
  });
}

SY_API sy_status sy_buffer_seal(sy_buffer buffer) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    SY_TRY(resolve(buffer, Kind::Buffer, "buffer", &b));
    return b->group->backend->seal_shared(*b->region);
  });
}

SY_API sy_status sy_buffer_abandon(sy_buffer buffer, int32_t peer) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    SY_TRY(resolve(buffer, Kind::Buffer, "buffer", &b));
    SY_TRY(check_range("peer", peer, 0, b->group->num_ranks - 1));
    std::lock_guard<std::mutex> order(b->enqueue_mu);
    return b->group->backend->abandon(*b, peer);
  });
}

SY_API sy_status sy_buffer_comm_stream(sy_buffer buffer, sy_stream* out) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    SY_TRY(resolve(buffer, Kind::Buffer, "buffer", &b));
    if (out == nullptr) return invalid("out", "out: NULL");
    *out = static_cast<sy_stream>(register_handle(Kind::Stream, b->comm_stream));
    return ok();
  });
}

SY_API sy_status sy_buffer_plan_get(sy_buffer buffer, sy_buffer_plan* out) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    SY_TRY(resolve(buffer, Kind::Buffer, "buffer", &b));
    return write_struct(out, plan_to_c(b->plan), "out");
  });
}

SY_API sy_status sy_buffer_network_stats(sy_buffer buffer, sy_network_stats* out) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    SY_TRY(resolve(buffer, Kind::Buffer, "buffer", &b));
    const auto& c = b->set->network[size_t(b->rank)];
    sy_network_stats v;
    std::memset(&v, 0, sizeof v);
    v.struct_size = sizeof v;
    v.records = c.records.load(std::memory_order_relaxed);
    v.bytes = c.bytes.load(std::memory_order_relaxed);
    v.puts = c.puts.load(std::memory_order_relaxed);
    return write_struct(out, v, "out");
  });
}

// ---------------------------------------------------------------------------------------------
// Operations

SY_API sy_status sy_layout(sy_buffer buffer, const sy_layout_args* args, sy_layout_result* out) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    SY_TRY(resolve(buffer, Kind::Buffer, "buffer", &b));
    sy_layout_args a;
    SY_TRY(read_struct(args, "args", &a));
    if (out == nullptr) return invalid("out", "out: NULL");
    LayoutRequest req;
    req.num_experts = a.num_experts;
    SY_TRY(resolve(a.topk_idx, Kind::Tensor, "topkIdx", &req.topk_idx));
    SY_TRY(resolve_order(a.compute_stream, a.previous_event, a.async_finish, a.allocate_on_comm_stream, &req.order));
    LayoutOutputs o;
    SY_TRY(op_layout(*b, req, &o));
    sy_layout_result r;
    std::memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    r.num_tokens_per_rank = static_cast<sy_tensor>(handle_or_null(Kind::Tensor, o.num_tokens_per_rank));
    r.num_tokens_per_expert = static_cast<sy_tensor>(handle_or_null(Kind::Tensor, o.num_tokens_per_expert));
    r.is_token_in_rank = static_cast<sy_tensor>(handle_or_null(Kind::Tensor, o.is_token_in_rank));
    r.event = static_cast<sy_event>(handle_or_null(Kind::Event, o.event));
    // A caller built for ABI 4 has no room for the node outputs: no handles it could not free.
    if (out->struct_size >= offsetof(sy_layout_result, is_token_in_node) + sizeof(sy_tensor)) {
      r.num_tokens_per_node = static_cast<sy_tensor>(handle_or_null(Kind::Tensor, o.num_tokens_per_node));
      r.is_token_in_node = static_cast<sy_tensor>(handle_or_null(Kind::Tensor, o.is_token_in_node));
    }
    return write_struct(out, r, "out");
  });
}

SY_API sy_status sy_dispatch(sy_buffer buffer, const sy_dispatch_args* args,
                             sy_dispatch_result* out) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    SY_TRY(resolve(buffer, Kind::Buffer, "buffer", &b));
    DispatchRequest req;
    // An argument refused here (a disposed tensor, say) is a refusal of this rank's dispatch:
    // the peers are told (refuse), as for everything op_dispatch refuses.
    Error resolved = [&]() -> Error {
      sy_dispatch_args a;
      SY_TRY(read_struct(args, "args", &a));
      if (out == nullptr) return invalid("out", "out: NULL");
      SY_TRY(resolve_tensor_opt(a.x, "x", &req.x));
      SY_TRY(resolve_tensor_opt(a.x_scales, "xScales", &req.x_scales));
      SY_TRY(resolve_tensor_opt(a.topk_idx, "topkIdx", &req.topk_idx));
      SY_TRY(resolve_tensor_opt(a.topk_weights, "topkWeights", &req.topk_weights));
      SY_TRY(resolve_tensor_opt(a.is_token_in_rank, "isTokenInRank", &req.is_token_in_rank));
      SY_TRY(resolve(a.handle, Kind::Handle, "handle", &req.cached, true));
      SY_TRY(resolve_order(a.compute_stream, a.previous_event, a.async_finish, a.allocate_on_comm_stream, &req.order));
      req.num_experts = a.num_experts;
      req.num_worst_tokens = a.num_worst_tokens;
      req.timeout_ms = a.timeout_ms;
      req.expert_alignment = a.expert_alignment == 0 ? 1 : a.expert_alignment;
      req.layout = a.layout;
      req.zero_padding = a.zero_padding != 0;
      return ok();
    }();
    if (resolved) return refuse(*b, core::OpKind::Dispatch, std::move(resolved));
    DispatchOutputs o;
    SY_TRY(op_dispatch(*b, req, &o));
    sy_dispatch_result r;
    std::memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    r.num_local_experts = o.num_local_experts;
    r.recv_x = static_cast<sy_tensor>(handle_or_null(Kind::Tensor, o.recv_x));
    r.recv_x_scales = static_cast<sy_tensor>(handle_or_null(Kind::Tensor, o.recv_x_scales));
    r.recv_topk_idx = static_cast<sy_tensor>(handle_or_null(Kind::Tensor, o.recv_topk_idx));
    r.recv_topk_weights = static_cast<sy_tensor>(handle_or_null(Kind::Tensor, o.recv_topk_weights));
    r.recv_count = static_cast<sy_tensor>(handle_or_null(Kind::Tensor, o.recv_count));
    r.handle = static_cast<sy_handle>(handle_or_null(Kind::Handle, o.handle));
    r.event = static_cast<sy_event>(handle_or_null(Kind::Event, o.event));
    r.num_recv_tokens = o.num_recv_tokens;
    r.num_rows = o.num_rows;
    return write_struct(out, r, "out");
  });
}

SY_API sy_status sy_combine(sy_buffer buffer, const sy_combine_args* args,
                            sy_combine_result* out) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    SY_TRY(resolve(buffer, Kind::Buffer, "buffer", &b));
    CombineRequest req;
    Error resolved = [&]() -> Error {  // a refusal here is told to the peers, as in sy_dispatch
      sy_combine_args a;
      SY_TRY(read_struct(args, "args", &a));
      if (out == nullptr) return invalid("out", "out: NULL");
      SY_TRY(resolve_tensor_opt(a.x, "x", &req.x));
      SY_TRY(resolve(a.handle, Kind::Handle, "handle", &req.handle));
      SY_TRY(resolve_tensor_opt(a.topk_weights, "topkWeights", &req.topk_weights));
      SY_TRY(resolve_tensor_opt(a.bias0, "bias", &req.bias0));
      SY_TRY(resolve_tensor_opt(a.bias1, "bias", &req.bias1));
      SY_TRY(resolve_tensor_opt(a.out, "out", &req.out));
      req.internode_reduction = a.internode_reduction;
      return resolve_order(a.compute_stream, a.previous_event, a.async_finish, a.allocate_on_comm_stream, &req.order);
    }();
    if (resolved) return refuse(*b, core::OpKind::Combine, std::move(resolved));
    CombineOutputs o;
    SY_TRY(op_combine(*b, req, &o));
    sy_combine_result r;
    std::memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    r.combined_x = static_cast<sy_tensor>(handle_or_null(Kind::Tensor, o.combined_x));
    r.combined_topk_weights = static_cast<sy_tensor>(handle_or_null(Kind::Tensor, o.combined_topk_weights));
    r.event = static_cast<sy_event>(handle_or_null(Kind::Event, o.event));
    return write_struct(out, r, "out");
  });
}

SY_API sy_status sy_reject(sy_buffer buffer, int32_t operation) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    SY_TRY(resolve(buffer, Kind::Buffer, "buffer", &b));
    Error why = invalid("operation", "refused by the caller");
    Error e;
    switch (operation) {
      case SY_OPERATION_DISPATCH: e = refuse(*b, core::OpKind::Dispatch, std::move(why)); break;
      case SY_OPERATION_COMBINE: e = refuse(*b, core::OpKind::Combine, std::move(why)); break;
      case SY_OPERATION_LOW_LATENCY_DISPATCH: e = op_ll_refuse(b, true, std::move(why)); break;
      case SY_OPERATION_LOW_LATENCY_COMBINE: e = op_ll_refuse(b, false, std::move(why)); break;
      default:
        return invalid("operation", "operation: expected a sy_operation value (1 to 4), got " + std::to_string(operation));
    }
    if (e.peers_informed) return ok();
    return fail(SY_ERROR_INTERNAL, e.message);  // "...; the peers could not be told (why) ..."
  });
}

SY_API sy_status sy_handle_destroy(sy_handle handle) {
  return guarded(nullptr, [&] { return release_handle(handle, Kind::Handle, "handle"); });
}

SY_API sy_status sy_handle_info_get(sy_handle handle, sy_handle_info* info) {
  return guarded(handle, [&]() -> Error {
    std::shared_ptr<DispatchHandle> h;
    SY_TRY(resolve(handle, Kind::Handle, "handle", &h));
    sy_handle_info v;
    std::memset(&v, 0, sizeof v);
    v.struct_size = sizeof v;
    v.rank = h->rank;
    v.num_ranks = h->num_ranks;
    v.num_experts = h->num_experts;
    v.num_local_experts = h->num_local_experts;
    v.num_topk = h->num_topk;
    v.layout = h->layout;
    v.expert_alignment = h->expert_alignment;
    v.hidden = h->hidden;
    v.num_tokens = h->num_tokens;
    h->refresh();
    v.num_recv_tokens = h->num_recv_tokens.load();
    v.num_rows = h->num_rows;
    return write_struct(info, v, "info");
  });
}

SY_API sy_status sy_handle_tensor(sy_handle handle, int32_t kind, sy_tensor* out) {
  return guarded(handle, [&]() -> Error {
    std::shared_ptr<DispatchHandle> h;
    SY_TRY(resolve(handle, Kind::Handle, "handle", &h));
    if (out == nullptr) return invalid("out", "out: NULL");
    std::shared_ptr<Tensor> t;
    switch (kind) {
      case SY_HANDLE_RANK_PREFIX_MATRIX: t = h->rank_prefix_matrix; break;
      case SY_HANDLE_RECV_SRC_IDX: t = h->recv_src_idx; break;
      case SY_HANDLE_IS_TOKEN_IN_RANK: t = h->is_token_in_rank; break;
      case SY_HANDLE_SEND_SLOT: t = h->send_slot; break;
      case SY_HANDLE_RECV_SRC_RANK: t = h->recv_src_rank; break;
      case SY_HANDLE_EXPANDED_ROW: t = h->expanded_row; break;
      default: return invalid("kind", "kind: unknown handle tensor " + std::to_string(kind));
    }
    if (!t) return invalid("kind", "kind: this handle has no such tensor (expanded rows exist only "
                                   "for the expanded layout)");
    *out = static_cast<sy_tensor>(register_handle(Kind::Tensor, read_only_view(t)));
    return ok();
  });
}

SY_API sy_status sy_handle_expert_counts(sy_handle handle, int32_t* counts, int32_t capacity) {
  bool known = true;
  sy_status st = guarded(handle, [&]() -> Error {
    std::shared_ptr<DispatchHandle> h;
    SY_TRY(resolve(handle, Kind::Handle, "handle", &h));
    std::lock_guard<std::mutex> l(h->mu);
    known = h->expert_counts_known;
    if (!known) return ok();
    if (capacity > 0 && counts == nullptr) return invalid("counts", "counts: NULL");
    int32_t n = std::min<int32_t>(capacity, int32_t(h->expert_counts.size()));
    for (int32_t i = 0; i < n; ++i) counts[i] = h->expert_counts[size_t(i)];
    return ok();
  });
  return st == SY_OK && !known ? SY_NOT_READY : st;
}

}  // extern "C"
