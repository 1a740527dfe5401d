// One block of a kernel: its GPU threads as fibers on the calling OS thread, scheduled round-robin.
// A fiber runs until it waits (barrier, warp collective), sleeps (__nanosleep) or has polled 64
// times (atomics, flag loads, timer reads); so threads of one block that spin on each other make
// progress. Everything a GPU would leave undefined is an error here, reported with file:line:
//   * a deadlock: no thread of the block can run (each group's waiting site is listed);
//   * threads at different __syncthreads, or a thread exiting while others wait at one;
//   * warp collectives: a lane outside its mask, lanes at different collectives, a mask naming
//     an exited lane, overlapping masks, a shuffle reading outside its mask;
//   * shared memory starts as 0xCB bytes, so reads before writes show.
#include <sanitizer/common_interface_defs.h>
#include <sys/mman.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "executor.h"

namespace sy::cuda_cpu {

thread_local ThreadCtx* current = nullptr;

namespace {

enum class FiberState { Runnable, AtBarrier, AtWarp, Done };

struct Fiber {
  void* sp = nullptr;
  FiberStack stack;
  ThreadCtx ctx;
  FiberState state = FiberState::Runnable;
  uint64_t wait_generation = 0;
  bool yielded_polling = false;  // its last yield came from polling, not from waiting
  const char* wait_file = nullptr;
  int wait_line = 0;
  uint64_t collective[32];  // the values of this lane's last warp collective
  void* tsan = nullptr;
};

// One warp collective in progress: the lanes of `mask` arrive, the last one releases them.
struct WarpSlot {
  bool busy = false;
  unsigned mask = 0, arrived = 0;
  int kind = 0;
  const char* file = nullptr;
  int line = 0;
  uint64_t generation = 0;
  uint64_t values[32];
  char sync[2];  // race-detector tokens, one per generation parity
};

constexpr int kSlotsPerWarp = 4;
constexpr size_t kStaticSharedBytes = 48 * 1024;  // the static __shared__ limit of a block
constexpr int kPollsPerYield = 64;
const bool g_strict = env_int("SY_CUDA_CPU_STRICT", 1) != 0;

}  // namespace

struct Block {
  // Fibers live at the top of their (pooled, never unmapped) stacks, so the race detector never
  // sees one freed while GPU threads' reads of threadIdx are on record.
  std::vector<Fiber*> fibers;
  unsigned n = 0, live = 0;
  unsigned barrier_arrived = 0;
  uint64_t barrier_generation = 0;
  char barrier_sync[2];  // race-detector tokens, one per barrier-generation parity
  void* done = nullptr;
  // Released by the block's OS thread once the block is set up, acquired by each GPU thread as it
  // starts: what came before the block (stream order, the fresh shared memory, the thread's own
  // storage) comes before its threads, and no thread of another block does.
  char start = 0;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  std::vector<WarpSlot> slots;
  void* scheduler_sp = nullptr;
  SwitchTarget scheduler;  // the OS thread's own stack, for the sanitizers
  const std::function<void()>* body = nullptr;
  const char* kernel = "";
  uint3 index{};
  // Shared memory: a fresh mapping per block (the dynamic part first, then each SY_SHARED
  // declaration's copy), filled with garbage as on a GPU and unmapped when the block ends, so
  // the race detector forgets it instead of taking the next block's use for a race.
  unsigned char* shared = nullptr;
  size_t shared_mapped = 0, shared_used = 0;
  std::vector<std::pair<const void*, void*>> shared_vars;
};

namespace {

thread_local Block* tl_block = nullptr;
thread_local Fiber* tl_fiber = nullptr;

const char* state_words(FiberState s) {
  switch (s) {
    case FiberState::AtBarrier: return "wait at __syncthreads";
    case FiberState::AtWarp: return "wait at a warp collective";
    case FiberState::Done: return "have exited";
    default: return "are running or spinning";
  }
}

void to_scheduler(bool leaving = false) {
  Block* b = tl_block;
  switch_context(&tl_fiber->sp, b->scheduler_sp, b->scheduler, leaving);
}

void release_barrier(Block* b) {
  for (Fiber* f : b->fibers)
    if (f->state == FiberState::AtBarrier && f->wait_generation == b->barrier_generation) f->state = FiberState::Runnable;
  b->barrier_generation++;
  b->barrier_arrived = 0;
  b->barrier_file = nullptr;
}

void fiber_main(void* arg) {
  Fiber* f = static_cast<Fiber*>(arg);
  Block* b = tl_block;
  entered_fiber(&b->scheduler.stack_bottom, &b->scheduler.stack_bytes);
#ifdef SY_CUDA_CPU_TSAN
  __tsan_acquire(&b->start);
#endif
  (*b->body)();
  // The thread exits.
#ifdef SY_CUDA_CPU_TSAN
  __tsan_release(b->done);
#endif
  f->state = FiberState::Done;
  b->live--;
  const unsigned lane = f->ctx.linear & 31u, warp = f->ctx.linear >> 5;
  for (int i = 0; i < kSlotsPerWarp; ++i) {
    const WarpSlot& s = b->slots[warp * kSlotsPerWarp + i];
    if (s.busy && (s.mask >> lane & 1u) && !(s.arrived >> lane & 1u))
      device_trap("a thread exited while its warp waits for it in a collective", s.file, s.line);
  }
  if (b->barrier_arrived > 0) {
    char msg[512];
    std::snprintf(msg, sizeof msg, "a thread exited while others wait at __syncthreads (%s:%d)", b->barrier_file,
                  b->barrier_line);
    if (g_strict) device_trap(msg, "(thread exit)", 0);
    if (b->barrier_arrived == b->live) release_barrier(b);
  }
  to_scheduler(true);
  __builtin_unreachable();
}

void report_deadlock(const Block& b) {
  std::fprintf(stderr, "cuda_on_cpu: deadlock in kernel %s, block (%u,%u,%u): no thread can run\n%s", b.kernel, b.index.x,
               b.index.y, b.index.z, describe_block(b).c_str());
  std::fflush(stderr);
  std::abort();
}

}  // namespace

std::string describe_block(const Block& b) {
  std::string out;
  for (unsigned i = 0; i < b.n;) {
    const Fiber& f = *b.fibers[i];
    unsigned j = i + 1;
    while (j < b.n && b.fibers[j]->state == f.state && b.fibers[j]->wait_line == f.wait_line &&
           b.fibers[j]->wait_file == f.wait_file)
      ++j;
    char line[512];
    if (f.state == FiberState::AtBarrier || f.state == FiberState::AtWarp) {
      std::snprintf(line, sizeof line, "  threads %u-%u %s at %s:%d\n", i, j - 1, state_words(f.state), f.wait_file,
                    f.wait_line);
    } else {
      std::snprintf(line, sizeof line, "  threads %u-%u %s\n", i, j - 1, state_words(f.state));
    }
    out += line;
    i = j;
  }
  return out;
}

[[noreturn]] void device_trap(const char* what, const char* file, int line) {
  const ThreadCtx* c = current;
  if (c != nullptr && tl_block != nullptr) {
    std::fprintf(stderr, "cuda_on_cpu: device error in kernel %s, block (%u,%u,%u), thread (%u,%u,%u): %s at %s:%d\n",
                 tl_block->kernel, c->bid.x, c->bid.y, c->bid.z, c->tid.x, c->tid.y, c->tid.z, what, file, line);
  } else {
    std::fprintf(stderr, "cuda_on_cpu: device error: %s at %s:%d\n", what, file, line);
  }
  std::fflush(stderr);
  std::abort();
}

namespace {

// A sanitizer stopping the program (a misaligned access, an out-of-bounds write, ...) names the
// GPU thread it stopped in, which its own report cannot.
void name_the_gpu_thread() {
  const ThreadCtx* c = current;
  if (c == nullptr || tl_block == nullptr) return;
  std::fprintf(stderr, "cuda_on_cpu: in kernel %s, block (%u,%u,%u), thread (%u,%u,%u)\n", tl_block->kernel, c->bid.x,
               c->bid.y, c->bid.z, c->tid.x, c->tid.y, c->tid.z);
}

const bool g_death_callback = (__sanitizer_set_death_callback(&name_the_gpu_thread), true);

}  // namespace

void yield() {
  if (current == nullptr || tl_fiber == nullptr) {
    std::this_thread::yield();
    return;
  }
  current->polls = 0;
  tl_fiber->yielded_polling = true;
  to_scheduler();
}

void polled() {
  if (current != nullptr && ++current->polls >= kPollsPerYield) yield();
}

void syncthreads(const char* file, int line) {
  Block* b = tl_block;
  Fiber* f = tl_fiber;
  if (b->barrier_arrived == 0) {
    b->barrier_file = file;
    b->barrier_line = line;
  } else if (b->barrier_line != line || std::strcmp(b->barrier_file, file) != 0) {
    char msg[512];
    std::snprintf(msg, sizeof msg, "divergent __syncthreads: other threads wait at %s:%d", b->barrier_file,
                  b->barrier_line);
    if (g_strict) device_trap(msg, file, line);
  }
  f->wait_generation = b->barrier_generation;
#ifdef SY_CUDA_CPU_TSAN
  __tsan_release(&b->barrier_sync[f->wait_generation & 1]);
#endif
  f->wait_file = file;
  f->wait_line = line;
  if (++b->barrier_arrived == b->live) {
    release_barrier(b);
  } else {
    f->state = FiberState::AtBarrier;
    f->yielded_polling = false;
    to_scheduler();
  }
#ifdef SY_CUDA_CPU_TSAN
  __tsan_acquire(&b->barrier_sync[f->wait_generation & 1]);
#endif
}

const uint64_t* warp_collective(unsigned mask, int kind, uint64_t value, const char* file, int line) {
  Block* b = tl_block;
  Fiber* f = tl_fiber;
  const unsigned lane = f->ctx.linear & 31u, warp = f->ctx.linear >> 5;
  if (!(mask >> lane & 1u)) device_trap("a warp collective called by a lane outside its mask", file, line);
  const unsigned base = warp * 32;
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (base + l >= b->n) device_trap("a warp collective's mask names a lane that does not exist", file, line);
    if (b->fibers[base + l]->state == FiberState::Done)
      device_trap("a warp collective's mask names a lane that has exited (it would hang on a GPU)", file, line);
  }
  WarpSlot* s = nullptr;
  WarpSlot* free_slot = nullptr;
  for (int i = 0; i < kSlotsPerWarp; ++i) {
    WarpSlot& c = b->slots[warp * kSlotsPerWarp + i];
    if (c.busy && c.mask == mask) {
      s = &c;
    } else if (c.busy && (c.mask & mask)) {
      char msg[512];
      std::snprintf(msg, sizeof msg, "overlapping warp collectives: mask %08x here, %08x pending at %s:%d", mask, c.mask,
                    c.file, c.line);
      device_trap(msg, file, line);
    } else if (!c.busy && free_slot == nullptr) {
      free_slot = &c;
    }
  }
  if (s == nullptr) {
    if (free_slot == nullptr) device_trap("too many warp collectives in progress at once", file, line);
    s = free_slot;
    s->busy = true;
    s->mask = mask;
    s->arrived = 0;
    s->kind = kind;
    s->file = file;
    s->line = line;
  } else if (s->kind != kind || (kind != kSyncWarp && (s->line != line || std::strcmp(s->file, file) != 0))) {
    // Lanes may meet at different __syncwarp calls (legal since Volta), but a shuffle or a vote
    // is one instruction that every lane of its mask must execute.
    char msg[512];
    std::snprintf(msg, sizeof msg, "divergent warp collectives: lanes of mask %08x wait at %s:%d", mask, s->file, s->line);
    if (g_strict || s->kind != kind) device_trap(msg, file, line);
  }
  [[maybe_unused]] const uint64_t generation = s->generation;
#ifdef SY_CUDA_CPU_TSAN
  __tsan_release(&s->sync[generation & 1]);
#endif
  s->values[lane] = value;
  s->arrived |= 1u << lane;
  if (s->arrived == mask) {
    for (unsigned l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      Fiber* g = b->fibers[base + l];
      std::memcpy(g->collective, s->values, sizeof g->collective);
      if (g != f) g->state = FiberState::Runnable;
    }
    s->busy = false;
    s->generation++;
  } else {
    f->state = FiberState::AtWarp;
    f->wait_file = file;
    f->wait_line = line;
    f->yielded_polling = false;
    to_scheduler();
  }
#ifdef SY_CUDA_CPU_TSAN
  __tsan_acquire(&s->sync[generation & 1]);
#endif
  return f->collective;
}

unsigned active_mask() {
  const Block* b = tl_block;
  const unsigned base = current->linear & ~31u;
  unsigned m = 0;
  for (unsigned l = 0; l < 32 && base + l < b->n; ++l)
    if (b->fibers[base + l]->state != FiberState::Done) m |= 1u << l;
  return m;
}

void* dynamic_shared() { return tl_block->shared; }

void* block_shared_bytes(const void* id, size_t size, size_t align) {
  Block* b = tl_block;
  for (const auto& [k, p] : b->shared_vars)
    if (k == id) return p;
  const size_t off = (b->shared_used + align - 1) & ~(align - 1);
  if (b->shared_vars.size() == b->shared_vars.capacity())
    device_trap("too many SY_SHARED declarations in one kernel", "(shared memory)", 0);
  if (off + size > b->shared_mapped) device_trap("static shared memory over 48 KiB", "(shared memory)", 0);
  void* p = b->shared + off;
  b->shared_used = off + size;
  b->shared_vars.emplace_back(id, p);
  return p;
}

namespace {

const auto g_epoch = std::chrono::steady_clock::now();
// Below 1 the global timer runs slower than real time (deadlines stretch on a slow machine).
const double g_time_scale = env_double("SY_CUDA_CPU_TIME_SCALE", 1.0);

}  // namespace

uint64_t global_ns() {
  polled();
  const auto d = std::chrono::steady_clock::now() - g_epoch;
  return uint64_t(double(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count()) * g_time_scale) +
         1000000000ull;
}

uint64_t clock_ticks() {
  polled();
  return __builtin_ia32_rdtsc();
}

void run_block(const std::function<void()>& body, const LaunchConfig& config, uint3 block_index, FiberPool& pool,
               void* done) {
  // On the heap: the race detector forgets the block's tokens with it (a stack slot would keep
  // their history for whatever uses the same address next).
  auto owned = std::make_unique<Block>();
  Block& b = *owned;
  b.done = done;
  b.n = config.block.x * config.block.y * config.block.z;
  b.live = b.n;
  b.body = &body;
  b.kernel = config.kernel;
  b.index = block_index;
  const size_t dynamic = (config.shared_bytes + 15) & ~size_t(15);
  b.shared_mapped = dynamic + kStaticSharedBytes;
  b.shared_used = dynamic;
  void* sm = mmap(nullptr, b.shared_mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (sm == MAP_FAILED) {
    std::perror("cuda_on_cpu: mmap of shared memory");
    std::abort();
  }
  b.shared = static_cast<unsigned char*>(sm);
  std::memset(b.shared, 0xCB, b.shared_mapped);
  b.shared_vars.reserve(256);  // no reallocation while GPU threads hold references
  b.slots.resize(((b.n + 31) / 32) * kSlotsPerWarp);
  b.fibers.resize(b.n);
  tl_block = &b;
#ifdef SY_CUDA_CPU_TSAN
  b.scheduler.tsan_fiber = __tsan_get_current_fiber();
#endif
  for (unsigned i = 0; i < b.n; ++i) {
    const FiberStack stack = take_stack(pool);
    char* top = stack.base + kStackBytes - ((sizeof(Fiber) + 63) & ~size_t(63));
    Fiber* f = new (top) Fiber();
    b.fibers[i] = f;
    f->stack = stack;
    const dim3 d = config.block;
    f->ctx.tid = make_uint3(i % d.x, (i / d.x) % d.y, i / (d.x * d.y));
    f->ctx.bid = block_index;
    f->ctx.bdim = d;
    f->ctx.gdim = config.grid;
    f->ctx.linear = i;
    f->sp = initial_stack_pointer(top, &fiber_main, f);
    f->tsan = stack.tsan;
  }
  block_started(&b, config.kernel);
#ifdef SY_CUDA_CPU_TSAN
  __tsan_release(&b.start);
#endif
  unsigned idle_rounds = 0;
  while (b.live > 0) {
    bool ran = false, progress = false;
    for (Fiber* f : b.fibers) {
      if (f->state != FiberState::Runnable) continue;
      ran = true;
      f->yielded_polling = false;
      current = &f->ctx;
      tl_fiber = f;
      SwitchTarget to;
      to.stack_bottom = f->stack.base;
      to.stack_bytes = kStackBytes;
      to.tsan_fiber = f->tsan;
      switch_context(&b.scheduler_sp, f->sp, to);
      current = nullptr;
      tl_fiber = nullptr;
      if (!f->yielded_polling) progress = true;
    }
    if (!ran) report_deadlock(b);
    if (progress) {
      idle_rounds = 0;
    } else if (++idle_rounds > 64) {
      // Every thread spins on something another block or stream must do: give them the CPU.
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    } else {
      std::this_thread::yield();
    }
  }
  block_finished(&b);
  for (Fiber* f : b.fibers) {
    const FiberStack stack = f->stack;
    f->~Fiber();
    give_stack(pool, stack);
  }
  munmap(b.shared, b.shared_mapped);
  tl_block = nullptr;
}

}  // namespace sy::cuda_cpu
