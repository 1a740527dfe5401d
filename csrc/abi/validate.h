// Argument checks shared by every operation. Messages start with the argument's name as the
// TypeScript API spells it, so an error points at what the caller wrote.
#pragma once

#include <initializer_list>
#include <memory>
#include <string>

#include "objects.h"

namespace sy {

std::string shape_string(const Tensor& t);

// The tensor lives on `rank` of `group` (else SY_ERROR_WRONG_HANDLE).
Error check_owner(const char* arg, const Tensor& t, const GroupCore* group, int rank);
Error check_dtype(const char* arg, const Tensor& t, std::initializer_list<core::DType> allowed);
// ndim, then each dimension; -1 in `dims` accepts any size. `names` describe the dimensions.
Error check_shape(const char* arg, const Tensor& t, std::initializer_list<int64_t> dims,
                  const char* names);
// The last dimension is contiguous and each row starts 16-byte aligned (vector access).
Error check_rows_contiguous(const char* arg, const Tensor& t);
Error check_range(const char* arg, int64_t value, int64_t lo, int64_t hi);
// A view into a buffer is still what it was handed out as (see ViewGuard).
Error check_view(const char* arg, const Tensor& t);
// The library may write into `t` for the caller: not a handle's tensor, not a zero-copy buffer
// whose combine is already queued.
// A view of `t` for the caller to read only (a handle's tensors: the library's routing).
std::shared_ptr<Tensor> read_only_view(const std::shared_ptr<Tensor>& t);

Error check_writable(const char* arg, const Tensor& t);

}  // namespace sy
