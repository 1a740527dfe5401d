// The CPU proxy and the emulated NIC (csrc/cuda/transport/proxy.h) driven by kernels, as the
// two hops across nodes will drive them: four ranks on one device, each with a window and a
// proxy of two channels whose rings (8 descriptors) wrap many times.
//
//   exchange        every rank puts 24 messages of odd sizes (1..640 bytes, at unaligned
//                   offsets) to every other rank on each channel, interleaving the peers, from 11
//                   staging slots that it reuses after a flush; every third message, and the
//                   last, is a put with a signal. Each receiver waits for every signal value in
//                   turn and checks, at each, every message up to the one that raised it: a
//                   signal seen before its data, or before an earlier put's, fails. Then the host
//                   checks every window byte for byte (the bytes after each message too), the
//                   signals and what the NIC says it carried, each computed here from the
//                   message sizes alone.
//   link model      the same under a link of 40 MB/s and 300 us: the sources are read when a
//                   put leaves the link, so a flush that returned early lets the sender
//                   overwrite a source before it was read; and the exchange takes at least the
//                   busiest link's bytes over the bandwidth plus the latency.
//   timeout         a receiver waits for a signal nobody sends: its wait ends after its deadline
//                   and names the source, the slot and the values.
//   refusal         a put past the peer's window is refused, never carried out: the sender's
//                   flush says so, the proxy's error names the rank, channel, descriptor and
//                   reason, the peer's window is untouched; after reset() the exchange runs again
//                   on the same proxies.
//
// Every line "ok: ..." is a check that passed; the exit status is 0 only if all did. Kernels'
// waits have deadlines of 10 s, so nothing here can hang.
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "../../csrc/cuda/transport/emulated_nic.h"
#include "../../csrc/cuda/transport/proxy.h"
#include "../../csrc/cuda/transport/verbs_engine.h"

namespace tr = sy::cuda::transport;

namespace {

constexpr int kRanks = 4, kChannels = 2, kMessages = 25, kStaging = 11, kMaxMessage = 640;
constexpr uint32_t kEntries = 8;
constexpr int kThreads = 64;
constexpr uint64_t kTimeoutNs = 10'000'000'000ull;

// The window: the channels' staging slots, then one receive region per (source, channel).
constexpr uint64_t kStageBytes = uint64_t(kChannels) * kStaging * kMaxMessage;
constexpr uint64_t kRegionBytes = uint64_t(kMessages) * kMaxMessage;
constexpr uint64_t kWindowBytes = kStageBytes + uint64_t(kRanks) * kChannels * kRegionBytes;

__host__ __device__ inline uint32_t mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Message m from src to dst on channel c: its size (odd sizes, 1..640), its byte i, whether it
// signals, and where it lands (each message right after the previous one: unaligned offsets).
__host__ __device__ inline uint32_t message_bytes(int src, int dst, int c, int m) {
  if (m == 7) return 0;  // a put of nothing is a put too
  return 1 + mix(uint32_t(((src * 8 + dst) * 8 + c) * 64 + m) * 2654435761u) % (kMaxMessage - 1);
}
__host__ __device__ inline uint8_t message_byte(int src, int dst, int c, int m, uint32_t i) {
  return uint8_t(mix(uint32_t(((src * 8 + dst) * 8 + c) * 64 + m) ^ (i * 0x9e3779b9u)) | 1u);  // never 0
}
// What message m raises its signal by (0: a plain put): 1, 2 or 3, as a put of that many entries
// would (the NIC then counts it as that many). The last message is a plain put: the signal without
// data that ends each (source, channel) covers it.
__host__ __device__ inline uint64_t message_signals(int m) {
  return m % 3 == 2 && m != kMessages - 1 ? 1 + uint64_t(m / 3) % 3 : 0;
}
__host__ __device__ inline uint64_t region_offset(int src, int c) {
  return kStageBytes + (uint64_t(src) * kChannels + uint64_t(c)) * kRegionBytes;
}
__host__ __device__ inline uint64_t message_offset(int src, int dst, int c, int m) {
  uint64_t o = region_offset(src, c);
  for (int j = 0; j < m; ++j) o += message_bytes(src, dst, c, j);
  return o;
}

// What a block saw: its transport status, and the bytes that did not match.
struct Outcome {
  tr::TransportStatus status;
  unsigned long long mismatches;
};

struct SendArgs {
  int rank;
  uint8_t* window;
  tr::ProxyChannel channels[kChannels];
  Outcome* out;  // [channels]
};

__global__ void send_kernel(SendArgs a) {
  SY_SHARED(tr::TransportStatus, status);
  const int c = blockIdx.x;
  const tr::ProxyChannel& ch = a.channels[c];
  if (threadIdx.x == 0) status = tr::TransportStatus{};
  __syncthreads();
  for (int n = 0; n < kMessages * (kRanks - 1); ++n) {
    const int m = n / (kRanks - 1), dst = (a.rank + 1 + n % (kRanks - 1)) % kRanks;
    const int s = n % kStaging;
    // Before a staging slot is written again, every put that read it must have read it.
    if (s == 0 && n > 0) {
      __syncthreads();  // every thread has read the last put's status
      if (threadIdx.x == 0) status = tr::flush(ch);
      __syncthreads();
      if (!status.ok()) break;
    }
    const uint64_t src_off = uint64_t(c) * kStaging * kMaxMessage + uint64_t(s) * kMaxMessage;
    const uint32_t bytes = message_bytes(a.rank, dst, c, m);
    for (uint32_t i = threadIdx.x; i < bytes; i += blockDim.x)
      a.window[src_off + i] = message_byte(a.rank, dst, c, m, i);
    __syncthreads();
    if (threadIdx.x == 0) {
      const uint64_t dst_off = message_offset(a.rank, dst, c, m);
      status = message_signals(m) ? tr::put_signal(ch, dst, src_off, dst_off, bytes, uint32_t(c), message_signals(m))
                                  : tr::put(ch, dst, src_off, dst_off, bytes);
    }
    __syncthreads();
    if (!status.ok()) break;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // A signal without data to every peer: after every put to it of this channel.
    for (int k = 0; k < kRanks - 1 && status.ok(); ++k)
      status = tr::signal(ch, (a.rank + 1 + k) % kRanks, uint32_t(c), 1);
    if (status.ok()) status = tr::flush(ch);
    a.out[c].status = status;
    a.out[c].mismatches = 0;
  }
}

struct RecvArgs {
  int rank;
  const uint8_t* window;
  tr::ProxyChannel channel;  // any of the rank's: signals are per rank
  uint64_t signal_base[kRanks][kChannels];  // the signals' values before this exchange
  Outcome* out;  // [sources][channels]
};

__device__ void check_message(const RecvArgs& a, int src, int c, int m, unsigned long long* bad) {
  const uint64_t o = message_offset(src, a.rank, c, m);
  const uint32_t bytes = message_bytes(src, a.rank, c, m);
  for (uint32_t i = threadIdx.x; i < bytes; i += blockDim.x)
    if (a.window[o + i] != message_byte(src, a.rank, c, m, i)) atomicAdd(bad, 1ull);
}

// Block (source, channel): waits for each signal value in turn; at each, checks every message up
// to the one that raised it; then the signal without data, and the rest.
__global__ void recv_kernel(RecvArgs a) {
  SY_SHARED(tr::TransportStatus, status);
  SY_SHARED(unsigned long long, bad);
  const int src = blockIdx.x / kChannels, c = blockIdx.x % kChannels;
  if (src == a.rank) return;
  if (threadIdx.x == 0) {
    status = tr::TransportStatus{};
    bad = 0;
  }
  __syncthreads();
  uint64_t seen = 0;
  int checked = 0;
  for (int m = 0; m < kMessages; ++m) {
    if (!message_signals(m)) continue;
    seen += message_signals(m);
    if (threadIdx.x == 0) status = tr::wait_signal(a.channel, src, c, a.signal_base[src][c] + seen);
    __syncthreads();
    if (!status.ok()) break;
    for (; checked <= m; ++checked) check_message(a, src, c, checked, &bad);
    __syncthreads();
  }
  // The signal without data: every message is there.
  __syncthreads();
  const bool go = status.ok();
  __syncthreads();  // read by all before thread 0 writes it again
  if (go) {
    if (threadIdx.x == 0) status = tr::wait_signal(a.channel, src, c, a.signal_base[src][c] + seen + 1);
    __syncthreads();
    if (status.ok())
      for (; checked < kMessages; ++checked) check_message(a, src, c, checked, &bad);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    a.out[blockIdx.x].status = status;
    a.out[blockIdx.x].mismatches = bad;
  }
}

// Waits for one signal (source, slot) to reach `least` (the timeout case).
__global__ void wait_kernel(tr::ProxyChannel ch, int source, int slot, uint64_t least, Outcome* out) {
  out->status = tr::wait_signal(ch, source, slot, least);
  out->mismatches = 0;
}

// Posts one put and flushes (the refusal case).
__global__ void bad_put_kernel(tr::ProxyChannel ch, int peer, uint64_t dst_off, uint64_t bytes, Outcome* out) {
  tr::TransportStatus s = tr::put(ch, peer, 0, dst_off, bytes);
  if (s.ok()) s = tr::flush(ch);
  out->status = s;
  out->mismatches = 0;
}

int failures = 0;
// The NIC engine the worlds are made with: the emulated NIC, or ibverbs on the provider at
// `verbs_library` (the software NIC, tests/native/soft_verbs.cpp, on the CPU executor).
bool use_verbs = false;
std::string verbs_library;

// A test hook of the software NIC (tests/native/soft_verbs.cpp), from the copy the engine loaded.
template <class F>
F soft_verbs(const char* name) {
  void* h = dlopen(verbs_library.c_str(), RTLD_NOW | RTLD_NOLOAD);
  void* f = h ? dlsym(h, name) : nullptr;
  if (f == nullptr) {
    std::printf("FAILED: %s: no %s\n", verbs_library.c_str(), name);
    std::exit(1);
  }
  return reinterpret_cast<F>(f);
}

void check(bool ok, const std::string& what) {
  std::printf("%s: %s%s\n", ok ? "ok" : "FAILED", use_verbs ? "ibverbs: " : "", what.c_str());
  std::fflush(stdout);
  if (!ok) ++failures;
}

void must(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  std::printf("FAILED: %s: %s\n", what, cudaGetErrorString(e));
  std::exit(1);
}

void must(const sy::Error& e, const char* what) {
  if (!e) return;
  std::printf("FAILED: %s: %s\n", what, e.message.c_str());
  std::exit(1);
}

std::string describe(const tr::TransportStatus& s) {
  return "result " + std::to_string(int(s.result)) + ", waited for " + std::to_string(int(s.waited_for)) +
         ", peer " + std::to_string(s.peer) + ", slot " + std::to_string(s.slot) + ", expected " +
         std::to_string(s.expected) + ", observed " + std::to_string(s.observed) + ", refusal " +
         std::to_string(s.refusal);
}

// How a world's ibverbs engines are made.
struct Setup {
  // As between processes: every rank has a directory of its own, and the ranks reach each other
  // only through the endpoints they export as text and import.
  bool apart = false;
  tr::VerbsSettings::DmaBuf dmabuf = tr::VerbsSettings::DmaBuf::Auto;
  uint64_t window_offset = 0;  // each window starts this far into its allocation
  int gid_index = -1;
  int timeout = 14;
  // As two hops across 2 nodes of 2: each rank reaches only rank ^ 2 (else every other rank).
  bool columns = false;
};

struct World {
  std::unique_ptr<tr::EmulatedFabric> fabric;
  std::shared_ptr<tr::VerbsDirectory> directory;
  sy::core::NetworkCounters counters[kRanks];  // what each rank's proxy carried
  std::vector<uint8_t*> windows, allocations;
  std::vector<std::string> endpoints;  // apart: each rank's, as text
  std::vector<std::unique_ptr<tr::Proxy>> proxies;
  std::vector<cudaStream_t> send_streams, recv_streams;
  Outcome* outcomes = nullptr;  // [ranks][kChannels] sends, then [ranks][ranks * kChannels] receives

  explicit World(sy::core::LinkModel model, Setup setup = {}) {
    const bool apart = setup.apart;
    fabric = std::make_unique<tr::EmulatedFabric>(kRanks, kChannels, model);
    directory = tr::make_verbs_directory(kRanks);
    tr::VerbsSettings settings;
    settings.library = verbs_library;
    settings.dmabuf = setup.dmabuf;
    settings.gid_index = setup.gid_index;
    settings.timeout = setup.timeout;
    must(cudaMalloc(&outcomes, sizeof(Outcome) * kRanks * (kChannels + kRanks * kChannels)), "cudaMalloc");
    std::vector<std::unique_ptr<tr::NicEngine>> engines(kRanks);
    for (int r = 0; r < kRanks; ++r) {
      uint8_t* a = nullptr;
      must(cudaMalloc(&a, kWindowBytes + setup.window_offset), "cudaMalloc window");
      allocations.push_back(a);
      uint8_t* w = a + setup.window_offset;
      windows.push_back(w);
      if (use_verbs) {
        const auto dir = apart ? tr::make_verbs_directory(kRanks) : directory;
        const std::vector<int> peers = setup.columns ? std::vector<int>{r ^ 2} : std::vector<int>{};
        must(tr::create_verbs_engine(dir, r, peers, kChannels, 0, w, kWindowBytes, settings, &engines[size_t(r)]),
             "create_verbs_engine");
      } else {
        must(tr::EmulatedNic::create(*fabric, r, w, kWindowBytes, nullptr, &engines[size_t(r)]), "EmulatedNic::create");
      }
    }
    if (apart) {
      endpoints.resize(kRanks);
      for (int r = 0; r < kRanks; ++r) must(tr::verbs_endpoint_text(*engines[size_t(r)], &endpoints[size_t(r)]), "export");
      for (int r = 0; r < kRanks; ++r)
        for (int p = 0; p < kRanks; ++p)
          if (p != r) must(tr::verbs_import_endpoint(*engines[size_t(r)], p, endpoints[size_t(p)]), "import");
    }
    for (int r = 0; r < kRanks; ++r) {
      std::unique_ptr<tr::Proxy> p;
      tr::ProxyOptions o;
      o.rank = r;
      o.channels = kChannels;
      o.entries = kEntries;
      o.counters = &counters[r];
      must(tr::Proxy::create(o, std::move(engines[size_t(r)]), &p), "Proxy::create");
      proxies.push_back(std::move(p));
      cudaStream_t s1, s2;
      must(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking), "stream");
      must(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking), "stream");
      send_streams.push_back(s1);
      recv_streams.push_back(s2);
    }
  }
  ~World() {
    proxies.clear();
    for (auto a : allocations)
      if (a) cudaFree(a);
    for (auto s : send_streams) cudaStreamDestroy(s);
    for (auto s : recv_streams) cudaStreamDestroy(s);
    cudaFree(outcomes);
  }
  Outcome* send_out(int r) { return outcomes + r * kChannels; }
  Outcome* recv_out(int r) { return outcomes + kRanks * kChannels + r * kRanks * kChannels; }
};

// One exchange (see the top); returns the seconds it took.
double exchange(World& w, const std::string& label) {
  for (int r = 0; r < kRanks; ++r) must(cudaMemset(w.windows[size_t(r)], 0, kWindowBytes), "cudaMemset");
  must(cudaMemset(w.outcomes, 0xff, sizeof(Outcome) * kRanks * (kChannels + kRanks * kChannels)), "cudaMemset");
  must(cudaDeviceSynchronize(), "sync");
  uint64_t before[kRanks][kRanks][kChannels];
  uint64_t carried_before[kRanks][3];
  for (int r = 0; r < kRanks; ++r) {
    carried_before[r][0] = w.counters[r].records.load();
    carried_before[r][1] = w.counters[r].bytes.load();
    carried_before[r][2] = w.counters[r].puts.load();
    for (int s = 0; s < kRanks; ++s)
      for (int c = 0; c < kChannels; ++c) before[r][s][c] = w.proxies[size_t(r)]->signal(s, c);
  }
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < kRanks; ++r) {
    RecvArgs a{};
    a.rank = r;
    a.window = w.windows[size_t(r)];
    a.channel = w.proxies[size_t(r)]->channel(0, kTimeoutNs);
    std::memcpy(a.signal_base, before[r], sizeof(a.signal_base));
    a.out = w.recv_out(r);
    SY_LAUNCH(recv_kernel, kRanks * kChannels, kThreads, 0, w.recv_streams[size_t(r)])(a);
    must(cudaGetLastError(), "recv_kernel launch");
  }
  for (int r = 0; r < kRanks; ++r) {
    SendArgs a{};
    a.rank = r;
    a.window = w.windows[size_t(r)];
    for (int c = 0; c < kChannels; ++c) a.channels[c] = w.proxies[size_t(r)]->channel(c, kTimeoutNs);
    a.out = w.send_out(r);
    SY_LAUNCH(send_kernel, kChannels, kThreads, 0, w.send_streams[size_t(r)])(a);
    must(cudaGetLastError(), "send_kernel launch");
  }
  must(cudaDeviceSynchronize(), "the exchange");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  std::vector<Outcome> out(size_t(kRanks) * (kChannels + kRanks * kChannels));
  must(cudaMemcpy(out.data(), w.outcomes, sizeof(Outcome) * out.size(), cudaMemcpyDeviceToHost), "copy back");
  std::string bad;
  for (int r = 0; r < kRanks; ++r) {
    for (int c = 0; c < kChannels; ++c) {
      const Outcome& o = out[size_t(r * kChannels + c)];
      if (!o.status.ok()) bad += " send " + std::to_string(r) + "/" + std::to_string(c) + ": " + describe(o.status);
    }
    for (int b = 0; b < kRanks * kChannels; ++b) {
      if (b / kChannels == r) continue;
      const Outcome& o = out[size_t(kRanks * kChannels + r * kRanks * kChannels + b)];
      if (!o.status.ok() || o.mismatches != 0)
        bad += " recv " + std::to_string(r) + " from " + std::to_string(b / kChannels) + "/" +
               std::to_string(b % kChannels) + ": " + describe(o.status) + ", " + std::to_string(o.mismatches) +
               " bytes wrong";
    }
  }
  check(bad.empty(), label + ": every wait succeeded and every signal came after its data" + bad);

  // The windows, byte for byte: each message where it belongs, nothing after the last one.
  std::vector<uint8_t> host(kWindowBytes);
  uint64_t wrong = 0, first_wrong = ~0ull;
  for (int r = 0; r < kRanks; ++r) {
    must(cudaMemcpy(host.data(), w.windows[size_t(r)], kWindowBytes, cudaMemcpyDeviceToHost), "copy window");
    for (int s = 0; s < kRanks; ++s) {
      for (int c = 0; c < kChannels; ++c) {
        const uint64_t region = region_offset(s, c);
        uint64_t o = region;
        for (int m = 0; s != r && m < kMessages; ++m) {
          const uint32_t bytes = message_bytes(s, r, c, m);
          for (uint32_t i = 0; i < bytes; ++i)
            if (host[o + i] != message_byte(s, r, c, m, i) && wrong++ == 0) first_wrong = o + i;
          o += bytes;
        }
        for (; o < region + kRegionBytes; ++o)
          if (host[o] != 0 && wrong++ == 0) first_wrong = o;
      }
    }
  }
  check(wrong == 0, label + ": every window holds exactly the messages put into it" +
                        (wrong ? " (" + std::to_string(wrong) + " bytes wrong, the first at " +
                                     std::to_string(first_wrong) + ")"
                               : std::string()));

  std::string counts;
  for (int r = 0; r < kRanks; ++r) {
    uint64_t records = 0, bytes = 0, puts = 0;
    for (int dst = 0; dst < kRanks; ++dst) {
      if (dst == r) continue;
      for (int c = 0; c < kChannels; ++c)
        for (int m = 0; m < kMessages; ++m) {
          records += message_signals(m) ? message_signals(m) : 1;  // a put with a signal: that many entries
          puts += 1;  // whatever it carries
          bytes += message_bytes(r, dst, c, m);
        }
      for (int c = 0; c < kChannels; ++c) {
        uint64_t signals = 1;  // the one without data
        for (int m = 0; m < kMessages; ++m) signals += message_signals(m);
        const uint64_t got = w.proxies[size_t(dst)]->signal(r, c) - before[dst][r][c];
        if (got != signals)
          counts += " signal (" + std::to_string(r) + "->" + std::to_string(dst) + ", " + std::to_string(c) +
                    ") grew by " + std::to_string(got) + ", not " + std::to_string(signals);
      }
    }
    const uint64_t got_records = w.counters[r].records.load() - carried_before[r][0];
    const uint64_t got_bytes = w.counters[r].bytes.load() - carried_before[r][1];
    const uint64_t got_puts = w.counters[r].puts.load() - carried_before[r][2];
    if (got_records != records || got_bytes != bytes || got_puts != puts)
      counts += " rank " + std::to_string(r) + " carried " + std::to_string(got_records) + " entries, " +
                std::to_string(got_bytes) + " bytes in " + std::to_string(got_puts) + " puts, not " +
                std::to_string(records) + ", " + std::to_string(bytes) + ", " + std::to_string(puts);
  }
  check(counts.empty(), label + ": the signals and what the NIC carried match the messages" + counts);
  return seconds;
}

// Rank 0 puts 64 bytes into `peer`'s staging area on channel 0 and flushes: the outcome, and the
// seconds it took.
Outcome put_and_flush(World& w, int peer, double* seconds) {
  const auto start = std::chrono::steady_clock::now();
  SY_LAUNCH(bad_put_kernel, 1, 1, 0, w.send_streams[0])(w.proxies[0]->channel(0, kTimeoutNs), peer, kStageBytes, 64,
                                                        w.outcomes);
  must(cudaStreamSynchronize(w.send_streams[0]), "a put and its flush");
  *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  Outcome o;
  must(cudaMemcpy(&o, w.outcomes, sizeof(o), cudaMemcpyDeviceToHost), "copy back");
  return o;
}

void timeout_case() {
  World w({});
  Outcome* out = w.outcomes;
  const uint64_t timeout_ns = 300'000'000ull;
  const auto start = std::chrono::steady_clock::now();
  SY_LAUNCH(wait_kernel, 1, 1, 0, w.recv_streams[0])(w.proxies[0]->channel(0, timeout_ns), 1, 1, 1, out);
  must(cudaStreamSynchronize(w.recv_streams[0]), "wait_kernel");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  Outcome o;
  must(cudaMemcpy(&o, out, sizeof(o), cudaMemcpyDeviceToHost), "copy back");
  const tr::TransportStatus& s = o.status;
  check(s.result == tr::TransportResult::Timeout && s.waited_for == tr::TransportWait::Signal && s.peer == 1 &&
            s.slot == 1 && s.expected == 1 && s.observed == 0 && s.waited_ns >= int64_t(timeout_ns),
        "a wait for a signal nobody sends times out naming the source, the slot and the values (" + describe(s) +
            ", " + std::to_string(s.waited_ns / 1000000) + " ms)");
  check(seconds < 5.0, "and it ends within its deadline (" + std::to_string(seconds) + " s for 0.3 s)");
}

void refusal_case() {
  World w({});
  Outcome* out = w.outcomes;
  must(cudaMemset(w.windows[1], 0, kWindowBytes), "cudaMemset");
  must(cudaDeviceSynchronize(), "sync");
  // 64 bytes at 10 bytes before the end of rank 1's window.
  SY_LAUNCH(bad_put_kernel, 1, 1, 0, w.send_streams[0])(w.proxies[0]->channel(0, kTimeoutNs), 1, kWindowBytes - 10,
                                                        64, out);
  must(cudaStreamSynchronize(w.send_streams[0]), "bad_put_kernel");
  Outcome o;
  must(cudaMemcpy(&o, out, sizeof(o), cudaMemcpyDeviceToHost), "copy back");
  check(o.status.result == tr::TransportResult::Refused &&
            o.status.refusal == uint32_t(tr::Refusal::Destination) && o.status.slot == 0 &&
            o.status.refused_index == 0,
        "a put past the peer's window is refused and the sender's flush says so (" + describe(o.status) + ")");
  const sy::Error e = w.proxies[0]->refusal();
  check(bool(e) && e.message.find("rank 0, channel 0, descriptor 0") != std::string::npos &&
            e.message.find("the destination range leaves the peer's window") != std::string::npos,
        "the proxy's error names the rank, channel, descriptor and reason: " + e.message);
  std::vector<uint8_t> tail(64);
  must(cudaMemcpy(tail.data(), w.windows[1] + kWindowBytes - 64, 64, cudaMemcpyDeviceToHost), "copy back");
  bool untouched = true;
  for (uint8_t b : tail) untouched = untouched && b == 0;
  check(untouched, "the peer's window is untouched");
  must(w.proxies[0]->reset(), "reset");
  check(!w.proxies[0]->refusal(), "reset() clears the refusal");
  exchange(w, "after a refusal and reset()");
}

// Posts one put of `bytes` to `peer` without waiting for it (the teardown case).
__global__ void post_kernel(tr::ProxyChannel ch, int peer, uint64_t dst_off, uint64_t bytes, Outcome* out) {
  out->status = tr::put_signal(ch, peer, 0, dst_off, bytes, 0, 1);
  out->mismatches = 0;
}

// Flushes (the teardown case: the put to the rank that went away completed before it did).
__global__ void flush_kernel(tr::ProxyChannel ch, Outcome* out) {
  out->status = tr::flush(ch);
  out->mismatches = 0;
}

// The proxy's checks of a descriptor, on values no kernel of ours makes: wrapping ranges,
// negative and missing peers, ops and slots that do not exist.
void descriptor_checks() {
  const uint64_t W = 4096, huge = ~0ull;
  auto d = [](uint32_t op, int peer, uint64_t src, uint64_t dst, uint64_t bytes, uint32_t slot) {
    tr::RdmaDescriptor x{};
    x.op = op;
    x.peer = peer;
    x.src_offset = src;
    x.dst_offset = dst;
    x.bytes = bytes;
    x.signal = slot;
    return x;
  };
  const uint32_t put = uint32_t(tr::RdmaOp::Put), ps = uint32_t(tr::RdmaOp::PutSignal),
                 sig = uint32_t(tr::RdmaOp::Signal);
  struct Case {
    const char* what;
    tr::RdmaDescriptor desc;
    bool attached;
    tr::Refusal expected;
  } cases[] = {
      {"a put that fits exactly", d(put, 1, W - 8, W - 8, 8, 0), true, tr::Refusal::None},
      {"an unknown op", d(0, 1, 0, 0, 8, 0), true, tr::Refusal::Op},
      {"op 4", d(4, 1, 0, 0, 8, 0), true, tr::Refusal::Op},
      {"a negative peer", d(put, -1, 0, 0, 8, 0), true, tr::Refusal::Peer},
      {"a peer past the ranks", d(put, kRanks, 0, 0, 8, 0), true, tr::Refusal::Peer},
      {"a peer without a window", d(put, 1, 0, 0, 8, 0), false, tr::Refusal::PeerWindow},
      {"a source that wraps around", d(put, 1, huge - 3, 0, 8, 0), true, tr::Refusal::Source},
      {"a source one byte long past the end", d(put, 1, W - 7, 0, 8, 0), true, tr::Refusal::Source},
      {"a length that wraps around (the source is checked first)", d(put, 1, 0, 16, huge, 0), true, tr::Refusal::Source},
      {"a destination past the end", d(put, 1, 0, W, 1, 0), true, tr::Refusal::Destination},
      {"a destination offset near 2^64", d(put, 1, 0, huge, 2, 0), true, tr::Refusal::Destination},
      {"a signal slot that does not exist", d(ps, 1, 0, 0, 8, kChannels), true, tr::Refusal::Signal},
      {"a signal without data ignores the ranges", d(sig, 1, huge, huge, huge, 1), true, tr::Refusal::None},
      {"a signal without data, slot past the end", d(sig, 1, 0, 0, 0, 99), true, tr::Refusal::Signal},
  };
  std::string bad;
  for (const Case& c : cases) {
    const tr::Refusal got = tr::check_descriptor(c.desc, kRanks, kChannels, W, c.attached, W);
    if (got != c.expected)
      bad += std::string(" ") + c.what + ": " + tr::refusal_text(got) + ", not " + tr::refusal_text(c.expected) + ";";
  }
  check(bad.empty(), "the proxy's descriptor checks refuse wrapping ranges, bad peers, ops and slots" + bad);
}

// One put with a signal under a link of 100 ms latency: the signal comes one latency later, not
// sooner and not much later.
void latency_case() {
  sy::core::LinkModel model;
  model.latency_ns = 100'000'000;
  World w(model);
  Outcome* out = w.outcomes;
  const auto start = std::chrono::steady_clock::now();
  SY_LAUNCH(post_kernel, 1, 1, 0, w.send_streams[0])(w.proxies[0]->channel(0, kTimeoutNs), 1, kStageBytes, 64, out);
  SY_LAUNCH(wait_kernel, 1, 1, 0, w.recv_streams[1])(w.proxies[1]->channel(0, kTimeoutNs), 0, 0, 1, out + 1);
  must(cudaDeviceSynchronize(), "the put");
  const double ms = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e3;
  Outcome o[2];
  must(cudaMemcpy(o, out, sizeof(o), cudaMemcpyDeviceToHost), "copy back");
  check(o[0].status.ok() && o[1].status.ok() && ms >= 100.0 && ms < 400.0,
        "link model: a put's signal comes one latency later (" + std::to_string(ms) + " ms for 100 ms)");
}

// A rank's proxy goes away while a peer's put to it is in flight (a slow link): the destructor
// waits for that put, which lands and completes; a later put to the rank is refused.
void teardown_case() {
  sy::core::LinkModel model;
  model.latency_ns = 150'000'000;
  World w(use_verbs ? sy::core::LinkModel{} : model);  // ibverbs: the software NIC's delay instead
  Outcome* out = w.outcomes;
  if (use_verbs) soft_verbs<void (*)(uint32_t)>("soft_verbs_set_delay_us")(150000);
  SY_LAUNCH(post_kernel, 1, 1, 0, w.send_streams[0])(w.proxies[0]->channel(0, kTimeoutNs), 1, kStageBytes, 64, out);
  must(cudaStreamSynchronize(w.send_streams[0]), "post_kernel");
  // The put has been posted; give the proxy a moment to take it, then take rank 1 away.
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  if (use_verbs) soft_verbs<void (*)(uint32_t)>("soft_verbs_set_delay_us")(0);
  const auto start = std::chrono::steady_clock::now();
  w.proxies[1].reset();
  const double ms = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e3;
  must(cudaFree(w.allocations[1]), "cudaFree");
  w.allocations[1] = w.windows[1] = nullptr;
  SY_LAUNCH(flush_kernel, 1, 1, 0, w.send_streams[0])(w.proxies[0]->channel(0, kTimeoutNs), out);
  SY_LAUNCH(bad_put_kernel, 1, 1, 0, w.send_streams[0])(w.proxies[0]->channel(1, kTimeoutNs), 1, kStageBytes, 64,
                                                        out + 1);
  must(cudaStreamSynchronize(w.send_streams[0]), "flush and put");
  Outcome o[2];
  must(cudaMemcpy(o, out, sizeof(o), cudaMemcpyDeviceToHost), "copy back");
  check(ms >= 100.0 && o[0].status.ok(),
        "a proxy going away waits for a peer's put in flight to it (" + std::to_string(ms) +
            " ms), which completes: " + describe(o[0].status));
  check(o[1].status.result == tr::TransportResult::Refused && o[1].status.refusal == uint32_t(tr::Refusal::PeerWindow),
        "a put to a rank that went away is refused: " + describe(o[1].status));
}

}  // namespace

// Raises a peer's signal by `add`, with `bytes` of data from the window's start (none: a signal
// alone), and flushes (the ibverbs case of a large signal).
__global__ void signal_kernel(tr::ProxyChannel ch, int peer, uint64_t dst, uint64_t bytes, uint32_t slot, uint64_t add,
                              Outcome* out) {
  tr::TransportStatus s = bytes == 0 ? tr::signal(ch, peer, slot, add) : tr::put_signal(ch, peer, 0, dst, bytes, slot, add);
  if (s.ok()) s = tr::flush(ch);
  out->status = s;
  out->mismatches = 0;
}

// ibverbs: an immediate carries at most 2^24 - 1: a signal of more goes as several (after the
// put's data, for a put with a signal), and the receiver's signal grows by exactly the amount; a
// signal that would take more work requests than a queue pair holds is refused, not left waiting.
void large_signal_case() {
  World w({});
  Outcome* out = w.outcomes;
  const uint64_t big = (1ull << 24) * 2 + 12345, put_add = (1ull << 24) + 7;
  const uint64_t before = w.proxies[2]->signal(3, 1);
  std::vector<uint8_t> data(200);
  for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t(i * 7 + 3);
  must(cudaMemcpy(w.windows[3], data.data(), data.size(), cudaMemcpyHostToDevice), "stage");
  SY_LAUNCH(signal_kernel, 1, 1, 0, w.send_streams[3])(w.proxies[3]->channel(1, kTimeoutNs), 2, 0, 0, 1, big, out);
  SY_LAUNCH(signal_kernel, 1, 1, 0, w.send_streams[3])(w.proxies[3]->channel(1, kTimeoutNs), 2, kStageBytes, 200, 1,
                                                       put_add, out + 2);
  SY_LAUNCH(wait_kernel, 1, 1, 0, w.recv_streams[2])(w.proxies[2]->channel(0, kTimeoutNs), 3, 1,
                                                     before + big + put_add, out + 1);
  must(cudaDeviceSynchronize(), "the signals");
  Outcome o[3];
  must(cudaMemcpy(o, out, sizeof(o), cudaMemcpyDeviceToHost), "copy back");
  std::vector<uint8_t> landed(200);
  must(cudaMemcpy(landed.data(), w.windows[2] + kStageBytes, 200, cudaMemcpyDeviceToHost), "copy back");
  const uint64_t got = w.proxies[2]->signal(3, 1) - before;
  check(o[0].status.ok() && o[1].status.ok() && o[2].status.ok() && got == big + put_add && landed == data,
        "a signal of " + std::to_string(big) + " and a put with a signal of " + std::to_string(put_add) +
            " (more than one immediate carries) raise the peer's by exactly that: " + std::to_string(got) +
            ", the put's bytes landed (" + describe(o[0].status) + "; " + describe(o[2].status) + ")");
  SY_LAUNCH(signal_kernel, 1, 1, 0, w.send_streams[3])(w.proxies[3]->channel(0, kTimeoutNs), 2, 0, 0, 1,
                                                       ((1ull << 24) - 1) * 257, out);
  must(cudaDeviceSynchronize(), "too large a signal");
  must(cudaMemcpy(o, out, sizeof(o[0]), cudaMemcpyDeviceToHost), "copy back");
  check(o[0].status.result == tr::TransportResult::Refused && o[0].status.refusal == uint32_t(tr::Refusal::Size),
        "a signal of 257 immediates' worth is refused (" + describe(o[0].status) + ")");
}

// ibverbs: a work request the NIC fails (as a NIC reports a fault; here the software NIC's
// soft_verbs_fail_next): the sender's proxy refuses the put, naming both ranks and the NIC's
// status; its queue pairs are then in error, so reset() reports the failure and every later put
// is refused saying the buffer must be made again. Nothing waits until a deadline.
void nic_failure_case() {
  World w({});
  Outcome* out = w.outcomes;
  soft_verbs<void (*)(int)>("soft_verbs_fail_next")(10);  // IBV_WC_REM_ACCESS_ERR
  double seconds = 0;
  Outcome o = put_and_flush(w, 1, &seconds);
  check(o.status.result == tr::TransportResult::Refused && o.status.refusal == uint32_t(tr::Refusal::Device) &&
            seconds < 5.0,
        "a put the NIC fails is refused at once (" + describe(o.status) + ", " + std::to_string(seconds) + " s)");
  const sy::Error e = w.proxies[0]->refusal();
  check(bool(e) && e.message.find("rank 0, channel 0, descriptor 0") != std::string::npos &&
            e.message.find("rank 0 to rank 1: ibverbs: a put failed: remote access error") != std::string::npos,
        "the proxy's error names the ranks and the NIC's status: " + e.message);
  const sy::Error r = w.proxies[0]->reset(10000);
  check(bool(r), "reset() reports the failure: " + r.message);
  SY_LAUNCH(bad_put_kernel, 1, 1, 0, w.send_streams[0])(w.proxies[0]->channel(1, kTimeoutNs), 2, kStageBytes, 64,
                                                        out + 1);
  must(cudaStreamSynchronize(w.send_streams[0]), "a later put");
  must(cudaMemcpy(&o, out + 1, sizeof(o), cudaMemcpyDeviceToHost), "copy back");
  const sy::Error later = w.proxies[0]->refusal();
  check(o.status.result == tr::TransportResult::Refused && o.status.refusal == uint32_t(tr::Refusal::Device) &&
            later.message.find("the buffer must be made again") != std::string::npos,
        "a later put is refused: the queue pairs are gone (" + later.message + ")");
}

// ibverbs: a NIC fault that belongs to no put of rank 0's (a receive failing on its side, for a
// write of rank 1's): rank 0's proxy stops, naming no channel or descriptor, its kernels' waits on
// it end Refused on no channel (kNoChannel), and its error says whose write the receive was for.
void receive_failure_case() {
  World w({});
  soft_verbs<void (*)(int)>("soft_verbs_fail_next_receive")(4);  // IBV_WC_LOC_PROT_ERR
  SY_LAUNCH(signal_kernel, 1, 1, 0, w.send_streams[1])(w.proxies[1]->channel(0, kTimeoutNs), 0, kStageBytes, 64, 0, 1,
                                                       w.outcomes + 1);
  must(cudaStreamSynchronize(w.send_streams[1]), "rank 1's put with a signal");
  sy::Error stopped;
  for (int i = 0; i < 5000 && !(stopped = w.proxies[0]->refusal()); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  soft_verbs<void (*)(int)>("soft_verbs_fail_next_receive")(-1);  // used, or no later case meets it
  double seconds = 0;
  const Outcome o = put_and_flush(w, 1, &seconds);
  check(o.status.result == tr::TransportResult::Refused && o.status.refusal == uint32_t(tr::Refusal::Device) &&
            o.status.slot == -1 && o.status.refused_index == 0 &&
            stopped.message == "rank 0: the proxy stopped: the NIC engine failed: rank 1 to rank 0: ibverbs: a receive "
                               "failed: local protection error",
        "a receive that fails stops the receiver's proxy on no descriptor (" + describe(o.status) + "): " +
            stopped.message);
}

// ibverbs: a signal refused because its rank's window is gone (which the two hops' waits let
// pass: that rank may have finished and left), then the NIC failing (a receive): the NIC's
// failure replaces the first refusal in every control, since the proxy then takes in no more
// signals and the kernels must not wait on; the error keeps both.
void refusal_then_failure_case() {
  World w({});
  w.proxies[1].reset();  // rank 1 goes away
  SY_LAUNCH(signal_kernel, 1, 1, 0, w.send_streams[0])(w.proxies[0]->channel(0, kTimeoutNs), 1, 0, 0, 0, 1,
                                                       w.outcomes);
  must(cudaStreamSynchronize(w.send_streams[0]), "a signal to the rank that went away");
  Outcome first;
  must(cudaMemcpy(&first, w.outcomes, sizeof(first), cudaMemcpyDeviceToHost), "copy back");
  soft_verbs<void (*)(int)>("soft_verbs_fail_next_receive")(4);  // IBV_WC_LOC_PROT_ERR
  SY_LAUNCH(signal_kernel, 1, 1, 0, w.send_streams[2])(w.proxies[2]->channel(0, kTimeoutNs), 0, kStageBytes, 64, 0, 1,
                                                       w.outcomes + 2);
  must(cudaStreamSynchronize(w.send_streams[2]), "rank 2's put with a signal");
  sy::Error both;
  for (int i = 0; i < 5000; ++i) {
    both = w.proxies[0]->refusal();
    if (both.message.find("; then") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  soft_verbs<void (*)(int)>("soft_verbs_fail_next_receive")(-1);
  double seconds = 0;
  const Outcome o = put_and_flush(w, 2, &seconds);
  check(first.status.refusal == uint32_t(tr::Refusal::PeerWindow) && o.status.result == tr::TransportResult::Refused &&
            o.status.refusal == uint32_t(tr::Refusal::Device) && o.status.slot == -1 &&
            both.message.find("the peer has no window") != std::string::npos &&
            both.message.find("; then rank 0: the proxy stopped: the NIC engine failed: rank 2 to rank 0") !=
                std::string::npos,
        "a refusal of a signal to a rank gone, then the NIC failing: the failure is what the kernels see (" +
            describe(o.status) + "): " + both.message);
}

// ibverbs, as between processes: an endpoint comes from another process, so every way it can be
// wrong is refused, naming the peer, and leaves the engine usable; the right one connects.
void endpoint_case() {
  tr::VerbsSettings settings;
  settings.library = verbs_library;
  uint8_t* w[2] = {nullptr, nullptr};
  std::unique_ptr<tr::NicEngine> e[2];
  for (int r = 0; r < 2; ++r) {
    must(cudaMalloc(&w[r], kWindowBytes), "cudaMalloc window");
    must(tr::create_verbs_engine(tr::make_verbs_directory(kRanks), r, {}, kChannels, 0, w[r], kWindowBytes, settings, &e[r]),
         "create_verbs_engine");
  }
  std::string good;
  must(tr::verbs_endpoint_text(*e[1], &good), "export");
  auto flip = [&](size_t at, char c) {
    std::string x = good;
    x[at] = c;
    return x;
  };
  const std::string rank_field = good.substr(16, 8);  // bytes 8..11: the rank
  struct Bad {
    const char* what;
    std::string text;
    const char* says;
  } bad[] = {
      {"an empty endpoint", "", "is missing"},
      {"a short one", good.substr(0, good.size() - 2), "bytes, not"},
      {"a long one", good + "00", "bytes, not"},
      {"not hex", flip(10, 'g'), "not lowercase hex"},
      {"uppercase hex", flip(1, 'F'), "not lowercase hex"},
      {"another magic", flip(0, good[0] == '0' ? '1' : '0'), "magic or version"},
      {"another rank's", good.substr(0, 16) + "02000000" + good.substr(24), "another rank or group size"},
      {"a window of another size", good.substr(0, 96) + "0100000000000000" + good.substr(112), "window of"},
      {"no queue pair for this rank", good.substr(0, 112) + "00000000" + good.substr(120), "no queue pair"},
      {"a queue pair to itself", good.substr(0, 120) + "01000000" + good.substr(128), "cannot be (24 bits"},
      {"a queue-pair number past 24 bits", good.substr(0, 112) + "01000001" + good.substr(120), "cannot be (24 bits"},
      {"no valid MTU", good.substr(0, 12) + "09" + good.substr(14), "no valid MTU"},
      {"addressing by GID", good.substr(0, 14) + "01" + good.substr(16), "addresses by GID"},
      {"reserved bytes set", good.substr(0, 38) + "01" + good.substr(40), "reserved bytes"},
      {"no RoCE version", good.substr(0, 36) + "03" + good.substr(38), "names no RoCE version"},
      {"no LID", good.substr(0, 32) + "0000" + good.substr(36), "has no LID"},
      {"a LID no port answers to", good.substr(0, 32) + "3412" + good.substr(36), "cannot be connected to"},
  };
  std::string failures;
  for (const Bad& b : bad) {
    const sy::Error err = tr::verbs_import_endpoint(*e[0], 1, b.text);
    if (!err || err.message.find(b.says) == std::string::npos || err.message.find("rank 1") == std::string::npos)
      failures += std::string(" ") + b.what + ": " + (err ? err.message : "accepted") + ";";
  }
  const sy::Error self = tr::verbs_import_endpoint(*e[0], 0, good);
  if (!self) failures += " its own rank: accepted;";
  const sy::Error right = tr::verbs_import_endpoint(*e[0], 1, good);
  const sy::Error again = tr::verbs_import_endpoint(*e[0], 1, good);
  check(failures.empty() && !right && again && again.message.find("imported already") != std::string::npos &&
            rank_field == "01000000",
        "a peer's endpoint is refused when missing, short, long, not hex, of another magic, rank, window, MTU, "
        "addressing or LID, a LID no port answers to, no RoCE version, with reserved bytes set, without a queue pair for this rank or with impossible ones, "
        "naming the peer; the engine stays usable, and the right one then connects, once" + failures +
            (right ? " right: " + right.message : ""));
  e[0].reset();
  e[1].reset();
  for (uint8_t* x : w) cudaFree(x);
}

// ibverbs with the queue pairs of two hops: 4 ranks as 2 nodes of 2, each reaching only the rank
// of the other node with its local index (rank ^ 2): one queue pair each, not three. A put there
// goes; one to a rank of its own node is refused (not a rank it puts to); the endpoint of a rank
// it does not reach is checked and taken without a connection, unless it offers a queue pair to
// this rank (the ranks disagree about the nodes).
void columns_case() {
  const auto qps_made = soft_verbs<uint64_t (*)(int)>("soft_verbs_stats");
  const uint64_t before = qps_made(4);
  World w({}, {.apart = true, .columns = true});
  const uint64_t made = qps_made(4) - before;
  check(made == kRanks, "two hops: one queue pair per rank, to the rank of the other node (" + std::to_string(made) +
                            " made for " + std::to_string(kRanks) + " ranks)");
  Outcome* out = w.outcomes;
  SY_LAUNCH(bad_put_kernel, 1, 1, 0, w.send_streams[0])(w.proxies[0]->channel(0, kTimeoutNs), 2, kStageBytes, 64, out);
  SY_LAUNCH(bad_put_kernel, 1, 1, 0, w.send_streams[0])(w.proxies[0]->channel(1, kTimeoutNs), 1, kStageBytes, 64,
                                                        out + 1);
  must(cudaStreamSynchronize(w.send_streams[0]), "the two puts");
  Outcome o[2];
  must(cudaMemcpy(o, out, sizeof(o), cudaMemcpyDeviceToHost), "copy back");
  check(o[0].status.ok() && o[1].status.result == tr::TransportResult::Refused &&
            o[1].status.refusal == uint32_t(tr::Refusal::Peer),
        "two hops: a put to the other node's rank goes (" + describe(o[0].status) +
            "), one to a rank of its own node is refused (" + describe(o[1].status) + ")");
  tr::VerbsSettings settings;
  settings.library = verbs_library;
  std::unique_ptr<tr::NicEngine> e;
  must(tr::create_verbs_engine(tr::make_verbs_directory(kRanks), 0, {2}, kChannels, 0, w.windows[0], kWindowBytes,
                               settings, &e),
       "create_verbs_engine");
  const std::string& of_rank1 = w.endpoints[1];
  const sy::Error plain = tr::verbs_import_endpoint(*e, 1, of_rank1);
  const sy::Error forged =
      tr::verbs_import_endpoint(*e, 3, w.endpoints[3].substr(0, 112) + "01000000" + w.endpoints[3].substr(120));
  check(!plain && forged && forged.message.find("has a queue pair for this rank, which puts nothing to it") !=
                                std::string::npos,
        "two hops: a rank of its own node's endpoint is taken, one that offers it a queue pair is refused: " +
            (plain ? plain.message : std::string("taken")) + "; " + (forged ? forged.message : std::string("taken")));
}

// ibverbs: how the window (device memory) is registered. Through dma-buf by default, also for a
// window that starts inside its allocation (the dma-buf is the allocation's, the region starts at
// the window's offset in it); as peer memory only; without peer memory (a host without
// nvidia-peermem), the default still registers; and when neither way works the error says why
// each did not.
void registration_case() {
  using D = tr::VerbsSettings::DmaBuf;
  {
    World w({}, {.dmabuf = D::Only, .window_offset = 4096 + 192});
    exchange(w, "windows 4288 bytes into their allocations, registered through dma-buf only");
  }
  {
    World w({}, {.dmabuf = D::Never});
    exchange(w, "windows registered as peer memory only (ibv_reg_mr)");
  }
  const auto set_peermem = soft_verbs<void (*)(int)>("soft_verbs_set_peermem");
  set_peermem(0);
  {
    World w({});
    exchange(w, "no peer memory on the host: the default registers through dma-buf");
  }
  tr::VerbsSettings settings;
  settings.library = verbs_library;
  settings.dmabuf = D::Never;
  uint8_t* device = nullptr;
  uint8_t* pinned = nullptr;
  must(cudaMalloc(&device, kWindowBytes), "cudaMalloc");
  must(cudaMallocHost(&pinned, kWindowBytes), "cudaMallocHost");
  std::unique_ptr<tr::NicEngine> e;
  const sy::Error neither =
      tr::create_verbs_engine(tr::make_verbs_directory(kRanks), 0, {}, kChannels, 0, device, kWindowBytes, settings, &e);
  check(bool(neither) &&
            neither.message.find("through dma-buf: not tried (SWITCHYARD_IBVERBS_DMABUF=0); with ibv_reg_mr: Bad "
                                 "address (GPU memory needs the nvidia-peermem module)") != std::string::npos,
        "peer memory only, on a host without it: the error says why: " + neither.message);
  settings.dmabuf = D::Only;
  const sy::Error no_dmabuf =
      tr::create_verbs_engine(tr::make_verbs_directory(kRanks), 0, {}, kChannels, 0, pinned, kWindowBytes, settings, &e);
  check(bool(no_dmabuf) && no_dmabuf.message.find("through dma-buf: cuMemGetAddressRange failed") != std::string::npos &&
            no_dmabuf.message.find("with ibv_reg_mr: not tried (SWITCHYARD_IBVERBS_DMABUF=1)") != std::string::npos,
        "dma-buf only, of memory the driver cannot export: the error says why: " + no_dmabuf.message);
  set_peermem(1);
  cudaFree(device);
  cudaFreeHost(pinned);
}

// RoCE (the software NIC's Ethernet mode, SOFT_VERBS_LINK_LAYER=ethernet): the engine chooses a
// RoCE v2 GID of an IPv4 address by itself and the exchange goes through, with the ranks together
// and apart; GID 0, RoCE v1, crosses no IP router (the software NIC's fabric is routed, so its
// packets are dropped): the put fails at the transport timeout, naming the ranks; a peer of
// another address family or RoCE version is refused on import.
void roce_case() {
  {
    World w({});
    exchange(w, "RoCE: exchange");
  }
  {
    World w({}, {.apart = true});
    exchange(w, "RoCE: ranks apart, connected by the endpoints they exchanged as text");
    std::string endpoint;
    tr::VerbsSettings settings;
    settings.library = verbs_library;
    std::unique_ptr<tr::NicEngine> e;
    must(tr::create_verbs_engine(tr::make_verbs_directory(kRanks), 0, {}, kChannels, 0, w.windows[0], kWindowBytes,
                                 settings, &e),
         "create_verbs_engine");
    must(tr::verbs_endpoint_text(*e, &endpoint), "export");
    check(endpoint.find("00000000000000000000ffff0a4d") != std::string::npos,
          "RoCE: the GID chosen is the RoCE v2 one of an IPv4 address (::ffff:10.77.x.y): " + endpoint);
    // What rank 0's engine says to rank 1's endpoint from an engine on its GID `index`.
    const auto import_from_gid = [&](int index) {
      settings.gid_index = index;
      std::unique_ptr<tr::NicEngine> peer;
      std::string text;
      must(tr::create_verbs_engine(tr::make_verbs_directory(kRanks), 1, {}, kChannels, 0, w.windows[1], kWindowBytes,
                                   settings, &peer),
           "create_verbs_engine");
      must(tr::verbs_endpoint_text(*peer, &text), "export");
      return tr::verbs_import_endpoint(*e, 1, text);
    };
    // A peer whose host has only a link-local RoCE v2 GID (here: set to GID 1): no packet would
    // pass between the two families, so its endpoint is refused, saying why.
    const sy::Error mixed = import_from_gid(1);
    check(bool(mixed) && mixed.message.find("rank 1's endpoint is a GID of an IPv6 address, this rank's (GID 3) of an "
                                            "IPv4 one") != std::string::npos,
          "RoCE: a peer's GID of the other address family is refused: " + mixed.message);
    // A peer set to RoCE v1 (GID 2: the same IPv4 address, RoCE v1): v1 and v2 packets do not
    // meet, so its endpoint is refused, saying why, before any queue pair is connected.
    const sy::Error versions = import_from_gid(2);
    check(bool(versions) && versions.message.find("rank 1's endpoint is a RoCE v1 GID, this rank's (GID 3) a RoCE v2 "
                                                  "one") != std::string::npos,
          "RoCE: a peer's RoCE v1 GID against this rank's v2 is refused: " + versions.message);
  }
  World w({}, {.gid_index = 0, .timeout = 8});
  double seconds = 0;
  const Outcome o = put_and_flush(w, 1, &seconds);
  const sy::Error e = w.proxies[0]->refusal();
  check(o.status.result == tr::TransportResult::Refused && o.status.refusal == uint32_t(tr::Refusal::Device) &&
            e.message.find("rank 0 to rank 1: ibverbs: a put failed: transport retry counter exceeded") !=
                std::string::npos &&
            seconds < 5.0,
        "RoCE: a put from GID 0 (RoCE v1) fails at the transport timeout, naming the ranks (" +
            std::to_string(seconds) + " s): " + e.message);
}

// The ibverbs provider the ibverbs cases run on: SWITCHYARD_IBVERBS_LIBRARY, or on the CPU
// executor the software NIC built beside this program (on a GPU it would copy into device memory
// from the CPU: there the cases need a real provider, named by the variable).
std::string find_verbs_library(const char* argv0) {
  if (const char* v = std::getenv("SWITCHYARD_IBVERBS_LIBRARY"); v != nullptr && *v != 0) return v;
#if defined(SY_CUDA_ON_CPU)
  std::string dir = argv0;
  dir = dir.find('/') == std::string::npos ? "." : dir.substr(0, dir.rfind('/'));
  return dir + "/libsoft_verbs.so";
#else
  return "";
#endif
}

// With --roce (and SOFT_VERBS_LINK_LAYER=ethernet for the software NIC): the RoCE cases only.
// With --emulated or --ibverbs: the cases of that NIC only (ThreadSanitizer runs them apart: one
// process creating every case's threads outgrows its room for thread traces).
int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  const bool roce = only == "--roce";
  verbs_library = find_verbs_library(argv[0]);
  if (roce) {
    if (!tr::verbs_compiled() || verbs_library.empty() || access(verbs_library.c_str(), R_OK) != 0) {
      std::printf("note: no ibverbs engine or provider: the RoCE cases did not run\n");
      return 0;
    }
    use_verbs = true;
    roce_case();
    std::printf(failures ? "%d check(s) failed\n" : "all ok\n", failures);
    return failures ? 1 : 0;
  }
  if (only != "--ibverbs") {
  descriptor_checks();
  {
    World w({});
    const double plain = exchange(w, "exchange");
    std::printf("note: the exchange without a link model took %.1f ms\n", plain * 1e3);
    exchange(w, "a second exchange on the same proxies (signals go on counting)");
  }
  {
    sy::core::LinkModel model;
    model.bytes_per_second = 40e6;
    model.latency_ns = 300000;
    World w(model);
    const double seconds = exchange(w, "link model");
    double busiest = 0;
    for (int r = 0; r < kRanks; ++r) {
      uint64_t bytes = 0;
      for (int dst = 0; dst < kRanks; ++dst)
        for (int c = 0; c < kChannels; ++c)
          for (int m = 0; dst != r && m < kMessages; ++m) bytes += message_bytes(r, dst, c, m);
      busiest = std::max(busiest, double(bytes) / model.bytes_per_second);
    }
    const double bound = busiest + 300e-6;
    check(seconds >= bound, "link model: the exchange takes at least the busiest link's bytes over the bandwidth "
                            "plus the latency (" + std::to_string(seconds * 1e3) + " ms >= " +
                                std::to_string(bound * 1e3) + " ms)");
  }
  latency_case();
  timeout_case();
  refusal_case();
  teardown_case();
  }
  if (only == "--emulated") {
    // the ibverbs cases run apart
  } else if (!tr::verbs_compiled()) {
    std::printf("note: built without the ibverbs headers (bash .ci/fetch-headers.sh): the ibverbs cases did not run\n");
  } else if (verbs_library.empty() || access(verbs_library.c_str(), R_OK) != 0) {
    std::printf("note: no ibverbs provider (SWITCHYARD_IBVERBS_LIBRARY): the ibverbs cases did not run\n");
  } else {
    use_verbs = true;
    {
      World w({});
      exchange(w, "exchange");
      exchange(w, "a second exchange on the same proxies (signals go on counting)");
    }
    {
      World w({}, {.apart = true});
      exchange(w, "ranks apart, connected by the endpoints they exchanged as text");
    }
    endpoint_case();
    timeout_case();
    refusal_case();
    large_signal_case();
    teardown_case();
    nic_failure_case();
    receive_failure_case();
    refusal_then_failure_case();
    registration_case();
    columns_case();
    use_verbs = false;
  }
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all ok\n");
  return 0;
}
