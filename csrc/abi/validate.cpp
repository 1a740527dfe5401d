#include "validate.h"

namespace sy {

std::string shape_string(const Tensor& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + "]";
}

Error check_owner(const char* arg, const Tensor& t, const GroupCore* group, int rank) {
  if (t.group.get() != group) {
    return fail(SY_ERROR_WRONG_HANDLE, std::string(arg) + ": the tensor belongs to another group",
                arg);
  }
  if (t.rank != rank) {
    return fail(SY_ERROR_WRONG_HANDLE,
                std::string(arg) + ": the tensor lives on rank " + std::to_string(t.rank) +
                    ", but this operation runs on rank " + std::to_string(rank),
                arg);
  }
  return ok();
}

Error check_dtype(const char* arg, const Tensor& t, std::initializer_list<core::DType> allowed) {
  std::string names;
  for (core::DType d : allowed) {
    if (d == t.dtype) return ok();
    names += (names.empty() ? "" : " or ") + std::string(core::dtype_name(d));
  }
  return invalid(arg, std::string(arg) + ": expected dtype " + names + ", got " +
                          core::dtype_name(t.dtype));
}

Error check_shape(const char* arg, const Tensor& t, std::initializer_list<int64_t> dims,
                  const char* names) {
  const int n = int(dims.size());
  std::string want = "[";
  int i = 0;
  for (int64_t d : dims) want += (i++ ? ", " : "") + (d < 0 ? std::string("*") : std::to_string(d));
  want += "]";
  bool good = t.ndim == n;
  i = 0;
  for (int64_t d : dims) {
    if (good && d >= 0 && t.shape[i] != d) good = false;
    ++i;
  }
  if (good) return ok();
  return invalid(arg, std::string(arg) + ": expected shape " + want + " (" + names + "), got " +
                          shape_string(t));
}

Error check_rows_contiguous(const char* arg, const Tensor& t) {
  const int64_t es = t.element_size();
  if (t.ndim >= 1 && t.shape[t.ndim - 1] > 1 && t.strides[t.ndim - 1] != 1) {
    return invalid(arg, std::string(arg) + ": the last dimension must be contiguous (stride 1), "
                                           "got stride " + std::to_string(t.strides[t.ndim - 1]));
  }
  if (t.ndim == 2 && t.shape[0] > 1) {
    if (t.strides[0] < t.shape[1] || (t.strides[0] * es) % 16 != 0) {
      return invalid(arg, std::string(arg) + ": rows must start 16 bytes apart at least a row "
                                             "long, got a row stride of " +
                              std::to_string(t.strides[0] * es) + " bytes");
    }
  }
  if ((reinterpret_cast<uintptr_t>(t.data()) % 16) != 0) {
    return invalid(arg, std::string(arg) + ": data must be 16-byte aligned");
  }
  return ok();
}

Error check_view(const char* arg, const Tensor& t) {
  if (!t.guard) return ok();
  const uint32_t now = t.guard->use->load();
  if (t.guard->voided && t.guard->voided->load()) {
    return invalid(arg, std::string(arg) + ": " + t.guard->what + " was handed out for low-latency call " +
                            std::to_string(t.guard->valid_through) +
                            ", which was not the zero-copy combine it was meant for: the call reused its half");
  }
  if (now <= t.guard->valid_through) return ok();
  return invalid(arg, std::string(arg) + ": " + t.guard->what + " was handed out for low-latency call " +
                          std::to_string(t.guard->valid_through) + ", and call " + std::to_string(now) +
                          " has reused its half of the double buffer since");
}

std::shared_ptr<Tensor> read_only_view(const std::shared_ptr<Tensor>& t) {
  auto view = std::make_shared<Tensor>(*t);  // same memory and producer
  view->read_only = true;
  return view;
}

Error check_writable(const char* arg, const Tensor& t) {
  SY_TRY(check_view(arg, t));
  if (t.read_only) {
    return invalid(arg, std::string(arg) + ": read-only (a handle's tensor: the library's routing depends on it; "
                                           "copy it to change it)");
  }
  if (t.guard && t.guard->consumed && t.guard->consumed->load()) {
    return invalid(arg, std::string(arg) + ": " + t.guard->what + " is being sent by its zero-copy combine; write "
                                           "the next one into nextCombineBuffer() again");
  }
  return ok();
}

Error check_range(const char* arg, int64_t value, int64_t lo, int64_t hi) {
  if (value >= lo && value <= hi) return ok();
  return invalid(arg, std::string(arg) + ": must be in " + std::to_string(lo) + ".." +
                          std::to_string(hi) + ", got " + std::to_string(value));
}

}  // namespace sy
