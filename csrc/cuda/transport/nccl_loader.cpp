#include "nccl_loader.h"

#include <dlfcn.h>

#include <map>
#include <memory>
#include <mutex>

namespace sy::nccl {

Error load(const std::string& path, const Library** out) {
  static std::mutex mu;
  static auto* loaded = new std::map<std::string, std::unique_ptr<Library>>();  // never unloaded
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = loaded->find(path); it != loaded->end()) {
    *out = it->second.get();
    return ok();
  }
  if (path.empty() || path[0] != '/') {
    return invalid("SWITCHYARD_NCCL", "SWITCHYARD_NCCL: '" + path + "' is not an absolute path (NCCL is opened by "
                                      "path, so a framework's copy already in the process is not picked up)");
  }
  dlerror();
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) {
    const char* why = dlerror();
    return fail(SY_ERROR_UNSUPPORTED, "NCCL at " + path + " cannot be loaded: " + (why ? why : "unknown reason"),
                "SWITCHYARD_NCCL");
  }
  auto lib = std::make_unique<Library>();
  lib->path = path;
  auto sym = [&](const char* name) { return dlsym(h, name); };
  lib->get_version = reinterpret_cast<int (*)(int*)>(sym("ncclGetVersion"));
  lib->error_string = reinterpret_cast<const char* (*)(int)>(sym("ncclGetErrorString"));
  lib->get_unique_id = reinterpret_cast<int (*)(UniqueId*)>(sym("ncclGetUniqueId"));
  lib->comm_init_rank = reinterpret_cast<int (*)(Comm*, int, UniqueId, int)>(sym("ncclCommInitRank"));
  lib->comm_destroy = reinterpret_cast<int (*)(Comm)>(sym("ncclCommDestroy"));
  lib->query_properties = reinterpret_cast<int (*)(Comm, void*)>(sym("ncclCommQueryProperties"));
  lib->mem_alloc = reinterpret_cast<int (*)(void**, size_t)>(sym("ncclMemAlloc"));
  lib->mem_free = reinterpret_cast<int (*)(void*)>(sym("ncclMemFree"));
  lib->window_register = reinterpret_cast<int (*)(Comm, void*, size_t, void**, int)>(sym("ncclCommWindowRegister"));
  lib->window_deregister = reinterpret_cast<int (*)(Comm, void*)>(sym("ncclCommWindowDeregister"));
  lib->dev_comm_create = reinterpret_cast<int (*)(Comm, const void*, void*)>(sym("ncclDevCommCreate"));
  lib->dev_comm_destroy = reinterpret_cast<int (*)(Comm, const void*)>(sym("ncclDevCommDestroy"));
  lib->device_api = lib->query_properties && lib->mem_alloc && lib->mem_free && lib->window_register &&
                    lib->window_deregister && lib->dev_comm_create && lib->dev_comm_destroy;
  if (!lib->get_version || !lib->get_unique_id || !lib->comm_init_rank || !lib->comm_destroy) {
    dlclose(h);
    return fail(SY_ERROR_UNSUPPORTED, path + " is not an NCCL library (ncclGetVersion, ncclGetUniqueId, "
                                             "ncclCommInitRank or ncclCommDestroy missing)",
                "SWITCHYARD_NCCL");
  }
  int v = 0;
  if (lib->get_version(&v) != 0 || v <= 0) {
    dlclose(h);
    return fail(SY_ERROR_UNSUPPORTED, path + ": ncclGetVersion failed", "SWITCHYARD_NCCL");
  }
  lib->version = v;
  *out = lib.get();
  (*loaded)[path] = std::move(lib);
  return ok();
}

Error call_error(const Library& lib, int rc, const char* what) {
  if (rc == 0) return ok();
  std::string text = lib.error_string ? lib.error_string(rc) : "unknown";
  return fail(SY_ERROR_INTERNAL, std::string(what) + ": NCCL error " + std::to_string(rc) + " (" + text + ")");
}

}  // namespace sy::nccl
