// Fibers: pooled stacks with guard pages and an x86-64 context switch that saves what the SysV
// ABI makes callee-saved (rbx, rbp, r12-r15, the SSE control/status word and the x87 control
// word), announced to the sanitizers.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "executor.h"

#ifdef SY_CUDA_CPU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#error "the CPU executor's context switch is written for x86-64"
#endif

extern "C" void sy_cuda_cpu_switch(void** save_sp, void* new_sp);
extern "C" void sy_cuda_cpu_trampoline();
__asm__(R"(
.text
.globl sy_cuda_cpu_switch
.type sy_cuda_cpu_switch,@function
sy_cuda_cpu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size sy_cuda_cpu_switch, .-sy_cuda_cpu_switch
.globl sy_cuda_cpu_trampoline
.type sy_cuda_cpu_trampoline,@function
sy_cuda_cpu_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
.size sy_cuda_cpu_trampoline, .-sy_cuda_cpu_trampoline
)");

namespace sy::cuda_cpu {

FiberStack take_stack(FiberPool& pool) {
  {
    QuietLock l(pool.mu);
    if (!pool.stacks.empty()) {
      FiberStack s = pool.stacks.back();
      pool.stacks.pop_back();
      return s;
    }
  }
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::perror("cuda_on_cpu: mmap of a fiber stack");
    std::abort();
  }
  mprotect(p, page, PROT_NONE);  // an overflow hits the guard page
  FiberStack s{static_cast<char*>(p) + page};
#ifdef SY_CUDA_CPU_TSAN
  s.tsan = __tsan_create_fiber(0);
#endif
  return s;
}

void give_stack(FiberPool& pool, FiberStack s) {
  // A pool keeps what its stream's largest grid runs at once; more are unmapped (a stream that
  // once ran many small blocks keeps no more fibers than one that runs big ones).
  const size_t keep = size_t(resident_blocks()) * 1024;
  {
    QuietLock l(pool.mu);
    if (pool.stacks.size() < keep) {
      pool.stacks.push_back(s);
      return;
    }
  }
#ifdef SY_CUDA_CPU_TSAN
  __tsan_destroy_fiber(s.tsan);
#endif
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  munmap(s.base - page, kStackBytes + page);
}

void* initial_stack_pointer(char* top, void (*entry)(void*), void* arg) {
  // The frame sy_cuda_cpu_switch pops on the first switch-in: mxcsr and x87 control word,
  // r15, r14, r13 (entry), r12 (arg), rbx, rbp, then the return address (the trampoline, which
  // calls entry(arg)). `top` is 64-byte aligned, so the trampoline's call leaves the stack
  // 16-byte aligned as the ABI wants.
  auto* ret = reinterpret_cast<uint64_t*>(top - 24);
  ret[0] = reinterpret_cast<uint64_t>(&sy_cuda_cpu_trampoline);
  ret[-1] = 0;                                     // rbp
  ret[-2] = 0;                                     // rbx
  ret[-3] = reinterpret_cast<uint64_t>(arg);       // r12
  ret[-4] = reinterpret_cast<uint64_t>(entry);     // r13
  ret[-5] = 0;                                     // r14
  ret[-6] = 0;                                     // r15
  ret[-7] = 0x1F80ull | (0x037Full << 32);         // default mxcsr, x87 control word
  return &ret[-7];
}

void switch_context(void** save_sp, void* to, const SwitchTarget& target, bool leaving) {
#ifdef SY_CUDA_CPU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(leaving ? nullptr : &fake, target.stack_bottom, target.stack_bytes);
#else
  (void)leaving;
#endif
#ifdef SY_CUDA_CPU_TSAN
  // No synchronisation implied: CUDA orders GPU threads only where it says so.
  __tsan_switch_to_fiber(target.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
  sy_cuda_cpu_switch(save_sp, to);
#ifdef SY_CUDA_CPU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  (void)target;
}

void entered_fiber(const void** from_bottom, size_t* from_bytes) {
#ifdef SY_CUDA_CPU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, from_bottom, from_bytes);
#else
  (void)from_bottom;
  (void)from_bytes;
#endif
}

}  // namespace sy::cuda_cpu
