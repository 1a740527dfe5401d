// Compiles NCCL's host and device API headers with the library's own flags, so a header update
// that breaks the future GIN/LSA transports fails the build instead of the first GPU run. NCCL is
// not linked: the transports will load it at run time by absolute path.
#include <nccl.h>
#include <nccl_device.h>

// CMakeLists.txt compiles this file only for headers at least this new; the assert guards a build
// configured by hand.
static_assert(NCCL_VERSION_CODE >= SY_NCCL_MINIMUM_VERSION, "the transports need the NCCL >= 2.29.7 device API");

// The device communicator is what kernels receive by value; it must stay trivially copyable.
static_assert(std::is_trivially_copyable<ncclDevComm>::value, "ncclDevComm passes by value");
