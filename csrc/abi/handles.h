// Opaque C handles. Each handle the library gives out is a HandleRef: one owned reference to an
// object plus the last error recorded on it. A registry of live refs lets every entry point
// reject a destroyed or foreign pointer instead of dereferencing it.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "error.h"

namespace sy {

enum class Kind : uint32_t { Group = 1, Rank, Buffer, Tensor, Stream, Event, Handle, LLHandle, Hook };

const char* kind_name(Kind k);

struct HandleRef {
  Kind kind;
  std::shared_ptr<void> object;
  std::mutex mu;
  Error last_error;
};

// Registers a new reference to `object` and returns it as an opaque handle.
void* register_handle(Kind kind, std::shared_ptr<void> object);
// Unregisters and frees a reference. Fails for a pointer that is not live.
Error release_handle(const void* handle, Kind kind, const char* argument);
// Resolves a handle of the expected kind. `optional` accepts NULL (object stays empty).
Error resolve_handle(const void* handle, Kind kind, const char* argument, bool optional,
                     std::shared_ptr<void>* object);

template <class T>
Error resolve(const void* handle, Kind kind, const char* argument, std::shared_ptr<T>* out,
              bool optional = false) {
  std::shared_ptr<void> obj;
  Error e = resolve_handle(handle, kind, argument, optional, &obj);
  if (e) return e;
  *out = std::static_pointer_cast<T>(obj);
  return e;
}

// Records `e` as the last error of `handle` (if live) and of the calling thread; returns status.
sy_status finish(const void* handle, const Error& e);
// Copies the last error of `handle` (or of the thread when NULL) into info.
Error last_error_of(const void* handle, Error* out);

}  // namespace sy
