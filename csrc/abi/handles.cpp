#include "handles.h"

#include <unordered_map>

namespace sy {

namespace {

// Handles are numbers, not addresses: each is issued once and never again, so a destroyed
// handle can never name a newer object (addresses of freed refs would be reused).
struct Registry {
  std::mutex mu;
  std::unordered_map<const void*, HandleRef*> live;
  uintptr_t next = 0x10000;  // clear of NULL and of small integers passed by mistake
};

// Never destroyed: worker threads may still release handles while the process exits.
Registry& registry() {
  static Registry* r = new Registry();
  return *r;
}

thread_local Error t_last_error;

}  // namespace

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::Group: return "group";
    case Kind::Rank: return "rank";
    case Kind::Buffer: return "buffer";
    case Kind::Tensor: return "tensor";
    case Kind::Stream: return "stream";
    case Kind::Event: return "event";
    case Kind::Handle: return "dispatch handle";
    case Kind::LLHandle: return "low-latency handle";
    case Kind::Hook: return "receive hook";
  }
  return "unknown";
}

void* register_handle(Kind kind, std::shared_ptr<void> object) {
  auto* ref = new HandleRef();
  ref->kind = kind;
  ref->object = std::move(object);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  void* id = reinterpret_cast<void*>(r.next);
  r.next += 16;
  r.live[id] = ref;
  return id;
}

namespace {

// Finds a live handle of `kind`; the registry lock must be held.
Error find_locked(Registry& r, const void* handle, Kind kind, const char* argument, HandleRef** out) {
  auto it = handle == nullptr ? r.live.end() : r.live.find(handle);
  if (it == r.live.end()) {
    return fail(SY_ERROR_DISPOSED,
                std::string(argument) + ": the " + kind_name(kind) +
                    " handle was disposed (or never created)",
                argument);
  }
  if (it->second->kind != kind) {
    return fail(SY_ERROR_WRONG_HANDLE,
                std::string(argument) + ": expected a " + kind_name(kind) + " handle, got a " +
                    kind_name(it->second->kind) + " handle",
                argument);
  }
  *out = it->second;
  return ok();
}

}  // namespace

Error resolve_handle(const void* handle, Kind kind, const char* argument, bool optional,
                     std::shared_ptr<void>* object) {
  if (handle == nullptr) {
    if (optional) return ok();
    return invalid(argument, std::string(argument) + ": a " + kind_name(kind) +
                                 " handle is required, got NULL");
  }
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  HandleRef* ref = nullptr;
  SY_TRY(find_locked(r, handle, kind, argument, &ref));
  *object = ref->object;
  return ok();
}

Error release_handle(const void* handle, Kind kind, const char* argument) {
  HandleRef* ref = nullptr;
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    SY_TRY(find_locked(r, handle, kind, argument, &ref));
    r.live.erase(handle);
  }
  delete ref;  // drops this reference outside the registry lock
  return ok();
}

sy_status finish(const void* handle, const Error& e) {
  // Only failures are recorded: a success on another thread must not erase a failure whose
  // caller has yet to ask for it.
  if (e.ok()) return SY_OK;
  t_last_error = e;
  if (handle != nullptr) {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.live.find(handle);
    if (it != r.live.end()) {
      std::lock_guard<std::mutex> l2(it->second->mu);
      it->second->last_error = e;
    }
  }
  return e.status;
}

Error last_error_of(const void* handle, Error* out) {
  if (handle == nullptr) {
    *out = t_last_error;
    return ok();
  }
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.live.find(handle);
  if (it == r.live.end()) {
    return fail(SY_ERROR_DISPOSED, "handle: disposed (or never created)", "handle");
  }
  std::lock_guard<std::mutex> l2(it->second->mu);
  *out = it->second->last_error;
  return ok();
}

}  // namespace sy
