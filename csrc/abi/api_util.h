// Helpers shared by the C entry points: versioned struct copies, exception guards, handles out.
#pragma once

#include <algorithm>
#include <cstring>
#include <exception>
#include <new>
#include <string>

#include "handles.h"
#include "objects.h"

namespace sy {

// Reads a caller's struct: at least `min_size` bytes (the oldest supported size), at most what
// this library knows; fields past the caller's size keep their zero defaults.
template <class T>
Error read_struct(const T* in, const char* arg, T* out, size_t min_size = sizeof(T)) {
  std::memset(static_cast<void*>(out), 0, sizeof(T));
  if (in == nullptr) return invalid(arg, std::string(arg) + ": NULL");
  if (in->struct_size < min_size) {
    return invalid(arg, std::string(arg) + ": struct_size " + std::to_string(in->struct_size) +
                            " is smaller than this library's " + std::to_string(min_size));
  }
  std::memcpy(static_cast<void*>(out), in, std::min<size_t>(in->struct_size, sizeof(T)));
  out->struct_size = sizeof(T);
  return ok();
}

// Writes as much of `value` as the caller's struct holds; keeps the caller's struct_size.
template <class T>
Error write_struct(T* out, const T& value, const char* arg) {
  if (out == nullptr) return invalid(arg, std::string(arg) + ": NULL");
  uint32_t size = out->struct_size;
  if (size < sizeof(uint32_t)) {
    return invalid(arg, std::string(arg) + ": struct_size must be set to the struct's size");
  }
  std::memcpy(static_cast<void*>(out), &value, std::min<size_t>(size, sizeof(T)));
  out->struct_size = size;
  return ok();
}

// Runs an entry point body, turning C++ exceptions into statuses (nothing escapes the ABI).
template <class Fn>
sy_status guarded(const void* handle, Fn body) {
  try {
    return finish(handle, body());
  } catch (const std::bad_alloc&) {
    return finish(handle, fail(SY_ERROR_OUT_OF_MEMORY, "out of host memory"));
  } catch (const std::exception& ex) {
    return finish(handle, fail(SY_ERROR_INTERNAL, std::string("internal error: ") + ex.what()));
  } catch (...) {
    return finish(handle, fail(SY_ERROR_INTERNAL, "internal error"));
  }
}

template <class T>
void* handle_or_null(Kind k, const std::shared_ptr<T>& obj) {
  return obj ? register_handle(k, obj) : nullptr;
}

inline Error resolve_tensor_opt(const void* t, const char* arg, std::shared_ptr<Tensor>* out) {
  return resolve(t, Kind::Tensor, arg, out, true);
}

}  // namespace sy
