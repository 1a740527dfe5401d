# The CUDA backend executed on the CPU (SWITCHYARD_CUDA=CPU), included by the top CMakeLists.txt
# with the `switchyard` target defined and SWITCHYARD_CUDA_INCLUDE found.
#
#   the .cu sources        compiled as C++ against include/ (our cuda_runtime.h comes first),
#                          with SWITCHYARD_SANITIZE like the rest of the library, and always with
#                          -fsanitize=alignment: a misaligned 4-, 8- or 16-byte access faults on a
#                          GPU, so it stops the program here too, naming the line
#   the executor (src/)    never instrumented; with ThreadSanitizer or AddressSanitizer it tells
#                          the sanitizer what CUDA orders and where each fiber's stack is
#   gpu_bench              bench/gpu_bench.cu, the same way (bench/gpu-check.sh --no-gpu)
#   kernel_families        tests/native/kernel_families.cpp: one scenario per kernel family
#                          through the C ABI, for the ThreadSanitizer run in CI
#   cuda_ipc               tests/native/cuda_ipc.cu: device memory shared between two processes
#   rdma_transport         tests/native/rdma_transport.cu: the CPU proxy driven by kernels, on
#                          the emulated NIC and through the ibverbs engine on the software NIC
#   soft_verbs             tests/native/soft_verbs.cpp: that software NIC (a libibverbs that the
#                          tests load by path), beside the programs; with the ibverbs headers
set(cuda_on_cpu_dir "${CMAKE_CURRENT_LIST_DIR}")
set(cuda_on_cpu_includes "${cuda_on_cpu_dir}/include" "${SWITCHYARD_CUDA_INCLUDE}" "${SWITCHYARD_CUDA_INCLUDE}/cccl")

add_library(switchyard_cuda_on_cpu OBJECT
  "${cuda_on_cpu_dir}/src/block.cpp"
  "${cuda_on_cpu_dir}/src/fiber.cpp"
  "${cuda_on_cpu_dir}/src/memory.cpp"
  "${cuda_on_cpu_dir}/src/runtime_api.cpp"
  "${cuda_on_cpu_dir}/src/stream.cpp")
target_include_directories(switchyard_cuda_on_cpu BEFORE PRIVATE ${cuda_on_cpu_includes})
# Exported from libswitchyard: programs that drive the library (gpu_bench, kernel_families) run
# their own kernels and runtime calls on the same executor, as they would share one GPU.
set_target_properties(switchyard_cuda_on_cpu PROPERTIES CXX_VISIBILITY_PRESET default VISIBILITY_INLINES_HIDDEN OFF)
target_compile_options(switchyard_cuda_on_cpu PRIVATE -Wall -Wextra -Wno-unused-parameter -O1 -g1)
if(SWITCHYARD_SANITIZE MATCHES "thread")
  target_compile_definitions(switchyard_cuda_on_cpu PRIVATE SY_CUDA_CPU_TSAN=1)
elseif(SWITCHYARD_SANITIZE MATCHES "address")
  target_compile_definitions(switchyard_cuda_on_cpu PRIVATE SY_CUDA_CPU_ASAN=1)
endif()

# One set of flags for every file of the library and the programs, so that they can share a
# precompiled header: -O1 with line tables (the test build compiles often and must be quick to
# build); CUDA code type-puns freely (nvcc does not assume strict aliasing) and says
# #pragma unroll; kernels and host code alike fault on misaligned accesses.
set(cuda_on_cpu_options -O1 -g1 -fno-strict-aliasing -Wno-unknown-pragmas -fsanitize=alignment
    -fno-sanitize-recover=alignment)
set(cuda_on_cpu_pch <cuda/atomic> <cuda_runtime_api.h> <algorithm> <atomic> <chrono> <condition_variable>
    <cstring> <functional> <map> <memory> <mutex> <string> <thread> <vector>)

# .cu files compiled as C++ (CMake passes -x c++) against the executor's headers.
set_source_files_properties(${cuda_sources} tests/native/cuda_ipc.cu PROPERTIES LANGUAGE CXX)

target_sources(switchyard PRIVATE ${cuda_sources} $<TARGET_OBJECTS:switchyard_cuda_on_cpu>)
target_include_directories(switchyard BEFORE PRIVATE ${cuda_on_cpu_includes})
target_compile_definitions(switchyard PRIVATE SY_CUDA_ON_CPU=1 SY_CUDA_ARCHS="cpu")
# After the build type's flags, so -O1 wins.
target_compile_options(switchyard PRIVATE ${cuda_on_cpu_options})
target_precompile_headers(switchyard PRIVATE ${cuda_on_cpu_pch})
target_link_options(switchyard PRIVATE -fsanitize=alignment -Wl,--no-undefined)

# The benchmarks in their correctness mode (bench/gpu-check.sh --no-gpu); not in sanitizer builds.
if(NOT SWITCHYARD_SANITIZE)
  foreach(bench gpu_bench ll_bench)
    add_executable(switchyard_${bench} bench/${bench}.cu)
    set_source_files_properties(bench/${bench}.cu PROPERTIES LANGUAGE CXX)
    target_include_directories(switchyard_${bench} BEFORE PRIVATE ${cuda_on_cpu_includes})
    target_compile_definitions(switchyard_${bench} PRIVATE SY_CUDA_ON_CPU=1)
    target_compile_options(switchyard_${bench} PRIVATE ${cuda_on_cpu_options})
    target_link_libraries(switchyard_${bench} PRIVATE switchyard)
    target_link_options(switchyard_${bench} PRIVATE -fsanitize=alignment)
  endforeach()
endif()

# CUDA IPC between two processes, on the executor's memfd-backed device memory; in the
# sanitizer builds too (CMakeLists.txt adds their flags).
add_executable(switchyard_cuda_ipc tests/native/cuda_ipc.cu)
target_include_directories(switchyard_cuda_ipc BEFORE PRIVATE ${cuda_on_cpu_includes})
target_compile_definitions(switchyard_cuda_ipc PRIVATE SY_CUDA_ON_CPU=1)
target_compile_options(switchyard_cuda_ipc PRIVATE ${cuda_on_cpu_options})
target_link_libraries(switchyard_cuda_ipc PRIVATE switchyard)
target_link_options(switchyard_cuda_ipc PRIVATE -fsanitize=alignment)

# The CPU proxy and the emulated NIC driven by kernels; in the sanitizer builds too. It compiles
# its own copy of the proxy (the library exports only the executor).
set_source_files_properties(tests/native/rdma_transport.cu PROPERTIES LANGUAGE CXX)
add_executable(switchyard_rdma_transport ${rdma_transport_sources})
target_include_directories(switchyard_rdma_transport BEFORE PRIVATE ${cuda_on_cpu_includes})
target_include_directories(switchyard_rdma_transport PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/csrc/include)
target_compile_definitions(switchyard_rdma_transport PRIVATE SY_CUDA_ON_CPU=1)
target_compile_options(switchyard_rdma_transport PRIVATE ${cuda_on_cpu_options})
target_link_libraries(switchyard_rdma_transport PRIVATE switchyard Threads::Threads)
target_link_options(switchyard_rdma_transport PRIVATE -fsanitize=alignment)

# The software ibverbs provider the NIC engine's tests load (tests/native/soft_verbs.cpp), beside
# the transport test, which finds it there.
if(verbs_include)
  add_library(switchyard_soft_verbs SHARED tests/native/soft_verbs.cpp)
  target_include_directories(switchyard_soft_verbs SYSTEM PRIVATE ${verbs_include})
  set_target_properties(switchyard_soft_verbs PROPERTIES OUTPUT_NAME soft_verbs CXX_VISIBILITY_PRESET hidden)
  target_link_libraries(switchyard_soft_verbs PRIVATE Threads::Threads)
  add_dependencies(switchyard_rdma_transport switchyard_soft_verbs)
endif()
