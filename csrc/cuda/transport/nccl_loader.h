// NCCL, loaded at run time by absolute path (never linked): the library works intranode without
// it, and a process that already holds another NCCL (a framework's) keeps its own copy apart.
#pragma once

#include <string>

#include "../../abi/error.h"

namespace sy::nccl {

// The ABI pieces Switchyard needs, declared here so NCCL's headers stay optional.
struct UniqueId {
  char internal[128];
};
using Comm = void*;

struct Library {
  std::string path;
  int version = 0;            // NCCL_VERSION_CODE of the loaded library, e.g. 22907
  bool device_api = false;    // the device API's host calls present (2.28+)
  int (*get_version)(int*) = nullptr;
  const char* (*error_string)(int) = nullptr;
  int (*get_unique_id)(UniqueId*) = nullptr;
  int (*comm_init_rank)(Comm*, int, UniqueId, int) = nullptr;
  int (*comm_destroy)(Comm) = nullptr;
  // The device API's host calls (2.28+), present when device_api; NCCL's structs and windows are
  // opaque here (gin_network.cu, compiled against the headers, passes them).
  int (*query_properties)(Comm, void* properties) = nullptr;
  int (*mem_alloc)(void**, size_t) = nullptr;
  int (*mem_free)(void*) = nullptr;
  int (*window_register)(Comm, void* buffer, size_t bytes, void** window, int flags) = nullptr;
  int (*window_deregister)(Comm, void* window) = nullptr;
  int (*dev_comm_create)(Comm, const void* requirements, void* dev_comm) = nullptr;
  int (*dev_comm_destroy)(Comm, const void* dev_comm) = nullptr;
};

// Opens `path` (RTLD_LOCAL) and resolves the symbols; the error says why it cannot be used.
Error load(const std::string& path, const Library** out);
// "NCCL error N: text" for a failed call.
Error call_error(const Library& lib, int rc, const char* what);

}  // namespace sy::nccl
