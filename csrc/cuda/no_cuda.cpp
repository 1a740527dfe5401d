// Built when CMake found no CUDA compiler (or SWITCHYARD_CUDA=OFF): the CUDA backend exists in
// the ABI but says why it is unavailable.
#include <cstring>

#include "../abi/objects.h"

namespace sy {

Error probe_cuda(sy_backend_info* info) {
  info->compiled = 0;
  info->available = 0;
  std::strncpy(info->reason, "this build of libswitchyard has no CUDA backend (built with SWITCHYARD_CUDA=OFF or without nvcc)",
               sizeof info->reason - 1);
  return ok();
}

Error cuda_peer_access(int, int, int*, int*) {
  return fail(SY_ERROR_UNSUPPORTED, "this build of libswitchyard has no CUDA backend");
}

std::unique_ptr<Backend> make_cuda_backend(Error* why) {
  *why = fail(SY_ERROR_UNSUPPORTED,
              "backend: this build of libswitchyard has no CUDA backend (rebuild with nvcc on PATH "
              "and -DSWITCHYARD_CUDA=ON)",
              "backend");
  return nullptr;
}

}  // namespace sy
