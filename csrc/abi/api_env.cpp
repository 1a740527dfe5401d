// The C ABI of the environment probes (NCCL, host shared memory, CUDA peers) and of the NCCL
// bootstrap of process groups.
#include <sys/statvfs.h>
#include <unistd.h>

#include <cstring>

#include "../cuda/transport/nccl_loader.h"
#include "api_util.h"

#ifndef SY_NCCL_HEADER_VERSION
#define SY_NCCL_HEADER_VERSION 0
#endif

using namespace sy;

namespace sy {
Error cuda_peer_access(int a, int b, int* can_access, int* native_atomics);  // cuda backend or stub
}

namespace {

void copy_text(char* dst, size_t cap, const std::string& s) {
  size_t n = std::min(cap - 1, s.size());
  std::memcpy(dst, s.data(), n);
  dst[n] = 0;
}

Error process_group_for_nccl(sy_group group, std::shared_ptr<GroupCore>* g) {
  SY_TRY(resolve(group, Kind::Group, "group", g));
  if (!(*g)->process_group) {
    return invalid("group", "group: virtual ranks share memory directly and need no NCCL communicator");
  }
  return (*g)->backend->nccl_usable();
}

}  // namespace

extern "C" {

SY_API sy_status sy_nccl_probe(const char* path, sy_nccl_info* info) {
  return guarded(nullptr, [&]() -> Error {
    if (info == nullptr || info->struct_size < sizeof(sy_nccl_info)) return invalid("info", "info: NULL or too small");
    if (path == nullptr) return invalid("path", "path: NULL");
    sy_nccl_info v;
    std::memset(&v, 0, sizeof v);
    v.struct_size = sizeof v;
    v.header_version = SY_NCCL_HEADER_VERSION;
    const nccl::Library* lib = nullptr;
    Error e = nccl::load(path, &lib);
    if (e) {
      copy_text(v.error, sizeof v.error, e.message);
    } else {
      v.loaded = 1;
      v.version = lib->version;
      v.device_api = lib->device_api ? 1 : 0;
    }
    std::memcpy(info, &v, sizeof v);
    return ok();
  });
}

SY_API sy_status sy_group_nccl_unique_id(sy_group group, const char* path, uint8_t* id) {
  return guarded(group, [&]() -> Error {
    std::shared_ptr<GroupCore> g;
    SY_TRY(process_group_for_nccl(group, &g));
    if (path == nullptr || id == nullptr) return invalid("path", "path: NULL");
    const nccl::Library* lib = nullptr;
    SY_TRY(nccl::load(path, &lib));
    nccl::UniqueId u;
    SY_TRY(nccl::call_error(*lib, lib->get_unique_id(&u), "ncclGetUniqueId"));
    std::memcpy(id, u.internal, sizeof u.internal);
    return ok();
  });
}

SY_API sy_status sy_group_nccl_init(sy_group group, const char* path, const uint8_t* id) {
  return guarded(group, [&]() -> Error {
    std::shared_ptr<GroupCore> g;
    SY_TRY(process_group_for_nccl(group, &g));
    if (path == nullptr || id == nullptr) return invalid("path", "path: NULL");
    if (g->nccl_comm) return invalid("group", "group: already has an NCCL communicator");
    const nccl::Library* lib = nullptr;
    SY_TRY(nccl::load(path, &lib));
    RankCore& rank = *g->ranks.front();
    SY_TRY(g->backend->bind_thread(rank));  // FFI calls arrive on any thread
    nccl::UniqueId u;
    std::memcpy(u.internal, id, sizeof u.internal);
    nccl::Comm comm = nullptr;
    SY_TRY(nccl::call_error(*lib, lib->comm_init_rank(&comm, g->num_ranks, u, rank.index), "ncclCommInitRank"));
    g->nccl_comm = comm;
    g->nccl_library = lib;
    g->nccl_destroy = [lib](void* c) { lib->comm_destroy(c); };
    return ok();
  });
}

SY_API sy_status sy_host_info_get(sy_host_info* info) {
  return guarded(nullptr, [&]() -> Error {
    sy_host_info v;
    std::memset(&v, 0, sizeof v);
    v.struct_size = sizeof v;
    v.cpus = int32_t(sysconf(_SC_NPROCESSORS_ONLN));
    struct statvfs st;
    if (statvfs("/dev/shm", &st) == 0) {
      v.shm_total_bytes = uint64_t(st.f_blocks) * st.f_frsize;
      v.shm_free_bytes = uint64_t(st.f_bavail) * st.f_frsize;
    }
    return write_struct(info, v, "info");
  });
}

SY_API sy_status sy_cuda_peer_access(int32_t a, int32_t b, int32_t* can_access, int32_t* native_atomics) {
  return guarded(nullptr, [&]() -> Error {
    if (can_access == nullptr || native_atomics == nullptr) return invalid("out", "out: NULL");
    int c = 0, n = 0;
    SY_TRY(cuda_peer_access(a, b, &c, &n));
    *can_access = c;
    *native_atomics = n;
    return ok();
  });
}

}  // extern "C"
