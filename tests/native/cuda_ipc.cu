// CUDA IPC between two processes, through the CUDA runtime alone: device memory exported by
// handle in this process is opened in a child process, which reads what this process wrote and
// writes what this process then reads; handles of pooled memory are refused, as are closing
// memory twice and freeing opened memory. The executor is stricter than a driver about handles
// of freed memory and of an interior pointer (it refuses both; "note:" lines say what a GPU
// did). On the CPU executor (tests/cuda_on_cpu) this is what lets processes share device memory
// at all; on a GPU it checks the driver does what the CUDA backend relies on (two processes on
// one GPU).
//
//   switchyard_cuda_ipc                 the parent: exports, runs the child (30 s at most), checks
//   switchyard_cuda_ipc --child A B D   the child, given the handles in hex
//
// Every line "ok: ..." is a check that passed; the exit status is 0 only if all did.
#include <cuda_runtime.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#ifndef SY_CUDA_ON_CPU
#define SY_CUDA_ON_CPU 0
#endif

extern char** environ;

namespace {

constexpr size_t kSmall = 1003;            // not a multiple of anything
constexpr size_t kLarge = (3u << 20) + 40;  // spans pages; its second half is the child's to write

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAILED", what.c_str());
  std::fflush(stdout);
  if (!ok) ++failures;
}

bool cuda_ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::printf("FAILED: %s: %s\n", what, cudaGetErrorString(e));
  ++failures;
  return false;
}

// Bytes where a shifted or partial copy shows: each depends on its offset and the writer.
uint8_t pattern(size_t i, uint32_t writer) { return uint8_t((i * 131u + (i >> 8) * 7u + writer * 29u + 5u) & 255u); }

std::vector<uint8_t> expected(size_t begin, size_t end, uint32_t writer) {
  std::vector<uint8_t> v(end - begin);
  for (size_t i = begin; i < end; ++i) v[i - begin] = pattern(i, writer);
  return v;
}

bool device_equals(const void* d, size_t begin, const std::vector<uint8_t>& want) {
  std::vector<uint8_t> got(want.size());
  if (cudaMemcpy(got.data(), static_cast<const uint8_t*>(d) + begin, got.size(), cudaMemcpyDeviceToHost) !=
      cudaSuccess) {
    return false;
  }
  return got == want;
}

std::string to_hex(const cudaIpcMemHandle_t& h) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (char c : h.reserved) {
    s += digits[uint8_t(c) >> 4];
    s += digits[uint8_t(c) & 15];
  }
  return s;
}

bool from_hex(const char* s, cudaIpcMemHandle_t* h) {
  if (std::strlen(s) != 2 * sizeof h->reserved) return false;
  auto nibble = [](char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1; };
  for (size_t i = 0; i < sizeof h->reserved; ++i) {
    const int hi = nibble(s[2 * i]), lo = nibble(s[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    h->reserved[i] = char(hi << 4 | lo);
  }
  return true;
}

int child(const char* small_hex, const char* large_hex, const char* freed_hex) {
  cudaIpcMemHandle_t hs, hl, hf;
  if (!from_hex(small_hex, &hs) || !from_hex(large_hex, &hl) || !from_hex(freed_hex, &hf)) {
    std::printf("FAILED: the child's arguments are not handles\n");
    return 1;
  }
  if (!cuda_ok(cudaSetDevice(0), "child: cudaSetDevice")) return 1;
  void* small = nullptr;
  void* large = nullptr;
  if (!cuda_ok(cudaIpcOpenMemHandle(&small, hs, cudaIpcMemLazyEnablePeerAccess), "child: open the small handle") ||
      !cuda_ok(cudaIpcOpenMemHandle(&large, hl, cudaIpcMemLazyEnablePeerAccess), "child: open the large handle")) {
    return 1;
  }
  check(device_equals(small, 0, expected(0, kSmall, 1)), "child: reads all the parent wrote, to the last byte");
  check(device_equals(large, 0, expected(0, kLarge / 2, 1)), "child: reads the large allocation's first half");
  const std::vector<uint8_t> mine = expected(kLarge / 2, kLarge, 2);
  cuda_ok(cudaMemcpy(static_cast<uint8_t*>(large) + kLarge / 2, mine.data(), mine.size(), cudaMemcpyHostToDevice),
          "child: write the second half");
  cuda_ok(cudaDeviceSynchronize(), "child: synchronize");

  void* freed = nullptr;
  const cudaError_t stale = cudaIpcOpenMemHandle(&freed, hf, cudaIpcMemLazyEnablePeerAccess);
  // The executor refuses it; a driver need not (an H200 with driver 580.159.04 opened it, on
  // 2026-11-30): nothing in the library may rely on either.
  if (SY_CUDA_ON_CPU) {
    check(stale != cudaSuccess, "child: the handle of memory freed before it was opened is refused");
  } else {
    std::printf("note: child: the handle of memory freed before it was opened %s\n",
                stale == cudaSuccess ? "opens (the driver allows it)" : "is refused");
    if (stale == cudaSuccess) cudaIpcCloseMemHandle(freed);
  }
  cudaGetLastError();
#if SY_CUDA_ON_CPU
  cudaIpcMemHandle_t forged = hs;
  forged.reserved[24] ^= 1;  // the allocation's id: the right process and descriptor, not its memory
  void* f = nullptr;
  check(cudaIpcOpenMemHandle(&f, forged, 0) == cudaErrorInvalidResourceHandle, "child: a forged handle is refused");
  cudaGetLastError();
#endif
  check(cudaFree(large) != cudaSuccess, "child: memory opened by handle cannot be freed");
  cudaGetLastError();
#if SY_CUDA_ON_CPU
  // The executor's stream-ordered free checks when it is called (CUDA's may fail later).
  check(cudaFreeAsync(large, nullptr) != cudaSuccess, "child: nor freed in stream order");
  cudaGetLastError();
#endif
  cuda_ok(cudaIpcCloseMemHandle(small), "child: close the small mapping");
  check(cudaIpcCloseMemHandle(small) != cudaSuccess, "child: closing it twice is refused");
  cudaGetLastError();
  cuda_ok(cudaIpcCloseMemHandle(large), "child: close the large mapping");
  return failures == 0 ? 0 : 1;
}

// Runs this program as the child; its exit status, or -1 after killing it at the deadline.
int run_child(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  std::string self = "/proc/self/exe";
  argv.push_back(self.data());
  std::vector<std::string> copy = args;
  for (auto& a : copy) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  if (posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv.data(), environ) != 0) return -2;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  for (;;) {
    int status = 0;
    const pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

int parent() {
  if (!cuda_ok(cudaSetDevice(0), "cudaSetDevice")) return 1;
  void *small = nullptr, *large = nullptr, *freed = nullptr, *pooled = nullptr;
  if (!cuda_ok(cudaMalloc(&small, kSmall), "cudaMalloc") || !cuda_ok(cudaMalloc(&large, kLarge), "cudaMalloc") ||
      !cuda_ok(cudaMalloc(&freed, 4096), "cudaMalloc")) {
    return 1;
  }
  const std::vector<uint8_t> a = expected(0, kSmall, 1), b = expected(0, kLarge, 1);
  cuda_ok(cudaMemcpy(small, a.data(), a.size(), cudaMemcpyHostToDevice), "write the small allocation");
  cuda_ok(cudaMemcpy(large, b.data(), b.size(), cudaMemcpyHostToDevice), "write the large allocation");
  cudaIpcMemHandle_t hs, hl, hf;
  if (!cuda_ok(cudaIpcGetMemHandle(&hs, small), "handle of the small allocation") ||
      !cuda_ok(cudaIpcGetMemHandle(&hl, large), "handle of the large allocation") ||
      !cuda_ok(cudaIpcGetMemHandle(&hf, freed), "handle of the allocation to free")) {
    return 1;
  }
  cuda_ok(cudaFree(freed), "free it");
  void* reused = nullptr;  // likely where the freed one's resources were
  cuda_ok(cudaMalloc(&reused, 4096), "cudaMalloc after the free");

  cudaIpcMemHandle_t h;
  // The executor refuses it, so that a library exporting anything but an allocation's base fails
  // here; a driver gives the whole allocation's handle (an H200, driver 580.159.04, 2026-11-30).
  const cudaError_t interior = cudaIpcGetMemHandle(&h, static_cast<uint8_t*>(large) + 4096);
  if (SY_CUDA_ON_CPU) {
    check(interior != cudaSuccess, "a pointer inside an allocation has no handle");
  } else {
    std::printf("note: a pointer inside an allocation %s\n",
                interior == cudaSuccess ? "has a handle (the allocation's)" : "has no handle");
  }
  cudaGetLastError();
  cudaStream_t s;
  cuda_ok(cudaStreamCreate(&s), "cudaStreamCreate");
  cuda_ok(cudaMallocAsync(&pooled, 4096, s), "cudaMallocAsync");
  check(cudaIpcGetMemHandle(&h, pooled) != cudaSuccess, "pooled memory (cudaMallocAsync) has no handle");
  cudaGetLastError();
  check(cudaIpcCloseMemHandle(small) != cudaSuccess, "memory this process allocated cannot be closed as opened");
  cudaGetLastError();
  void* own = nullptr;
  check(cudaIpcOpenMemHandle(&own, hs, cudaIpcMemLazyEnablePeerAccess) != cudaSuccess,
        "a process does not open its own handle");
  cudaGetLastError();

  const int status = run_child({"--child", to_hex(hs), to_hex(hl), to_hex(hf)});
  check(status == 0, "the child ran its checks (exit status " + std::to_string(status) + ")");
  check(device_equals(large, kLarge / 2, expected(kLarge / 2, kLarge, 2)),
        "the child's writes are in this process's memory, to the last byte");
  check(device_equals(large, 0, expected(0, kLarge / 2, 1)), "and the first half is as this process left it");
  check(device_equals(small, 0, a), "the small allocation survived the child's close");

  cuda_ok(cudaFreeAsync(pooled, s), "cudaFreeAsync");
  cuda_ok(cudaStreamDestroy(s), "cudaStreamDestroy");
  cuda_ok(cudaFree(reused), "cudaFree");
  cuda_ok(cudaFree(large), "cudaFree");
  cuda_ok(cudaFree(small), "cudaFree");
  std::printf("%s\n", failures == 0 ? "all ok" : "some checks FAILED");
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && std::strcmp(argv[1], "--child") == 0) return child(argv[2], argv[3], argv[4]);
  if (argc != 1) {
    std::fprintf(stderr, "usage: switchyard_cuda_ipc\n");
    return 2;
  }
  return parent();
}
