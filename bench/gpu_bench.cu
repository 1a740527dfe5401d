// GPU benchmark of normal-mode dispatch and combine on virtual ranks of one GPU, next to a naive
// baseline on the same inputs and the GPU's own device-to-device copy bandwidth, all measured in
// the same run (bench/gpu-check.sh runs it and keeps the JSON).
//
// It drives the library through its C ABI only, like any other user. Every rank's work is
// enqueued behind a gate (a one-thread kernel that holds the streams until the host releases
// it), so the timings are GPU time from the release to the last rank's completion, not the time
// one host thread takes to enqueue eight ranks one after the other. Times are CUDA events;
// each case reports the median of `--iters` runs after `--warmup` runs.
//
//   modes         worst-case: num_worst_tokens > 0, outputs sized for the worst case, no host
//                 wait; cached: the routing of an earlier dispatch; exact: num_worst_tokens = 0,
//                 each rank's sy_dispatch waits on the host for its received counts, then sizes
//                 its outputs. That wait needs every rank's first kernels running, so exact rows
//                 are not gated: one host thread per rank, all released at once just after a
//                 start event is recorded, and the time runs from that event to the last rank's
//                 completion (host wait and the enqueue after it included).
//   rw bytes      what the operation must read plus what it must write, payload (and FP8 scales)
//                 only, no top-k metadata: dispatch reads every received row at its source and
//                 writes it at its destination (2 x received rows x row bytes); combine reads
//                 every expert output row and writes every combined token ((received rows +
//                 ranks x tokens) x row bytes). The copy bandwidth is counted the same way: a
//                 cudaMemcpyAsync D2D of n bytes reads n and writes n, so 2n / time. The fraction
//                 of copy is the ratio of the two (fraction_of_copy_rw).
//   bytes         (kept from earlier results) every received row's payload counted once, against
//                 the copy's bytes copied / time (fraction_of_copy). Equal to the rw fraction for
//                 dispatch; for combine it leaves out the writes of the combined tokens.
//   host time     the CPU wall time spent inside each sy_dispatch / sy_combine call (its
//                 enqueue cost; in exact mode also the wait for the counts): per rank the median
//                 over the timed iterations, reported as the median and the max over ranks. The
//                 gated rows enqueue while the gate holds, so it does not add to their GPU time.
//   naive         dispatch: per rank, gather the rows each destination gets into a send buffer
//                 (one row per (token, destination), by destination), then one cudaMemcpyAsync
//                 per destination into its receive buffer. Combine: one copy per source back
//                 into its send-buffer order, then a per-token gather-and-sum kernel.
//   checks        the library's received rows and combined rows must equal the naive ones bit
//                 for bit (both follow the order of csrc/core/reduce.h), and an exact-size
//                 dispatch must give exactly the received rows; a mismatch fails.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../csrc/core/dtype.h"
#include "../csrc/cuda/portable.cuh"
#include "../tests/native/abi_driver.h"
#include "gpu_timing.cuh"
#include "switchyard.h"

namespace {

using sy::driver::make_tensor;
struct Options {
  int ranks = 8, tokens = 4096, hidden = 7168, topk = 8, experts = 256;
  int warmup = 3, iters = 10, sms = 0;
  size_t copy_bytes = size_t(1) << 30;  // what the copy-bandwidth ceiling copies
  bool gate = true;
  bool expand = false;    // the expanded layout instead (runs and times it; no naive baseline)
  bool copy_ceiling = true;
  std::string json;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) die("missing value after " + a);
      return argv[++i];
    };
    if (a == "--ranks") o.ranks = std::stoi(value());
    else if (a == "--tokens") o.tokens = std::stoi(value());
    else if (a == "--hidden") o.hidden = std::stoi(value());
    else if (a == "--topk") o.topk = std::stoi(value());
    else if (a == "--experts") o.experts = std::stoi(value());
    else if (a == "--warmup") o.warmup = std::stoi(value());
    else if (a == "--iters") o.iters = std::stoi(value());
    else if (a == "--sms") o.sms = std::stoi(value());
    else if (a == "--json") o.json = value();
    else if (a == "--no-gate") o.gate = false;
    else if (a == "--expand") o.expand = true;
    else if (a == "--small") {  // a quick case
      o.ranks = 2, o.tokens = 64, o.hidden = 256, o.topk = 2, o.experts = 8, o.warmup = 0, o.iters = 1;
      o.copy_bytes = size_t(64) << 20;
    } else if (a == "--sanitize") {
      // For compute-sanitizer, which runs one kernel at a time: one rank (its barrier waits for
      // itself alone) and no gate (a held stream would hold everything).
      o.ranks = 1, o.tokens = 64, o.hidden = 256, o.topk = 2, o.experts = 8, o.warmup = 0, o.iters = 1;
      o.gate = false;
      o.copy_ceiling = false;
    } else {
      die("unknown option " + a +
          " (--ranks --tokens --hidden --topk --experts --warmup --iters --sms --json --small --sanitize --no-gate "
          "--expand)");
    }
  }
  if (o.experts % o.ranks != 0 || o.topk > o.experts || o.hidden % 128 != 0) die("inconsistent shape");
  return o;
}

// dst[i] = src[perm[i]] for rows of `row_bytes`; one warp per row, 16-byte accesses when the
// row size allows (4-byte otherwise).
__global__ void gather_rows(const uint8_t* src, const int32_t* perm, int64_t n, int row_bytes, uint8_t* dst) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; i < n; i += warps) {
    const uint8_t* s = src + int64_t(perm[i]) * row_bytes;
    uint8_t* d = dst + i * row_bytes;
    if (row_bytes % 16 == 0) {
      for (int j = lane; j < row_bytes / 16; j += 32)
        reinterpret_cast<int4*>(d)[j] = reinterpret_cast<const int4*>(s)[j];
    } else {
      for (int j = lane; j < row_bytes / 4; j += 32)
        reinterpret_cast<uint32_t*>(d)[j] = reinterpret_cast<const uint32_t*>(s)[j];
    }
  }
}

// out[t] = sum over destinations d (in rank order) of the row token t got back from d.
__global__ void naive_reduce(const uint16_t* back, const int32_t* slots, const int64_t* send_off, int64_t tokens,
                             int ranks, int hidden, uint16_t* out) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  for (int64_t t = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; t < tokens; t += warps) {
    for (int g = lane; g < hidden / 8; g += 32) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int d = 0; d < ranks; ++d) {
        const int32_t s = slots[t * ranks + d];
        if (s < 0) continue;
        const int4 v = reinterpret_cast<const int4*>(back + (send_off[d] + s) * hidden)[g];
        const uint32_t w[4] = {uint32_t(v.x), uint32_t(v.y), uint32_t(v.z), uint32_t(v.w)};
        for (int i = 0; i < 4; ++i) {
          acc[2 * i] += sy::core::bf16_to_float(uint16_t(w[i] & 0xffffu));
          acc[2 * i + 1] += sy::core::bf16_to_float(uint16_t(w[i] >> 16));
        }
      }
      uint32_t w[4];
      for (int i = 0; i < 4; ++i)
        w[i] = uint32_t(sy::core::float_to_bf16(acc[2 * i])) | (uint32_t(sy::core::float_to_bf16(acc[2 * i + 1])) << 16);
      reinterpret_cast<int4*>(out + t * hidden)[g] = make_int4(int(w[0]), int(w[1]), int(w[2]), int(w[3]));
    }
  }
}

__global__ void count_diff(const uint8_t* a, const uint8_t* b, int64_t n, unsigned long long* diffs) {
  unsigned long long local = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    local += a[i] != b[i];
  if (local) atomicAdd(diffs, local);
}

uint64_t count_mismatches(const void* a, const void* b, int64_t n) {
  if (n == 0) return 0;
  unsigned long long* d = nullptr;
  CU(cudaMalloc(&d, sizeof *d));
  CU(cudaMemset(d, 0, sizeof *d));
  SY_LAUNCH(count_diff, 1024, 256, 0, nullptr)(static_cast<const uint8_t*>(a), static_cast<const uint8_t*>(b), n, d);
  unsigned long long h = 0;
  CU(cudaMemcpy(&h, d, sizeof h, cudaMemcpyDeviceToHost));
  CU(cudaFree(d));
  return h;
}

// Holds every rank's streams behind one kernel; the timed region starts at its release.
template <class T>
T* device_copy(const std::vector<T>& v) {
  T* p = nullptr;
  CU(cudaMalloc(&p, std::max<size_t>(v.size(), 1) * sizeof(T)));
  if (!v.empty()) CU(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

void* device_address(sy_tensor t) { return reinterpret_cast<void*>(uintptr_t(sy::driver::describe(t).data)); }

// Reads all of `t` on `stream`, which reports the failure of the operation that produced it (a
// kernel's record, e.g. a capacity overflow): every timed operation's outcome is checked.
void expect_produced(sy_tensor t, sy_stream stream) { sy::driver::read_tensor(t, stream); }

// Checks the dispatch's outcome on `stream`, then releases its outputs.
void destroy(sy_dispatch_result& r, sy_stream stream) {
  if (r.recv_count) expect_produced(r.recv_count, stream);
  for (sy_tensor t : {r.recv_x, r.recv_x_scales, r.recv_topk_idx, r.recv_topk_weights, r.recv_count})
    if (t) sy_tensor_destroy(t);
  if (r.handle) sy_handle_destroy(r.handle);
  std::memset(&r, 0, sizeof r);
}

struct Row {
  std::string op, dtype, mode;
  bool threaded = false;  // timed by timed_threads (exact-size), not behind the gate
  double median_ms = 0, min_ms = 0, naive_ms = 0;
  double bytes = 0;            // one way: every received row once (see the header)
  double rw_bytes = 0;         // read plus written
  std::vector<float> host_us;  // per rank: median host time of one call, microseconds
  uint64_t mismatches = 0;
  std::string failure;  // a check other than the bytes (an exact-size row count)
};

// The host time of each library call, per rank: the CPU wall time spent inside sy_dispatch or
// sy_combine. Each rank's vector is written by one thread only (timed_threads gives each rank its
// own).
struct HostTimes {
  std::vector<std::vector<float>> us;  // [rank][call]
  explicit HostTimes(int ranks) : us(ranks) {}
  template <class Call>
  void time(int r, Call call) {
    const auto t0 = std::chrono::steady_clock::now();
    call();
    us[r].push_back(std::chrono::duration<float, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  void clear() {
    for (auto& v : us) v.clear();
  }
  // Per rank the median of the calls after the first `skip` (the warm-up), into `row`.
  void summarize(Row& row, int skip) const {
    row.host_us.clear();
    for (const auto& v : us) {
      std::vector<float> kept(v.begin() + std::min<size_t>(size_t(skip), v.size()), v.end());
      row.host_us.push_back(median(kept));
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  sy::driver::program_name() = "gpu_bench";
  const Options o = parse(argc, argv);
  const sy_backend_info info = sy::driver::cuda_backend();
  cudaDeviceProp prop;
  CU(cudaGetDeviceProperties(&prop, 0));
  const int R = o.ranks, T = o.tokens, H = o.hidden, K = o.topk, E = o.experts, EL = E / R, S = H / 128;
  std::printf("gpu_bench: %s, %d SMs; %d ranks x %d tokens x hidden %d, top-%d of %d experts\n", prop.name,
              prop.multiProcessorCount, R, T, H, K, E);

  sy::driver::LocalGroup job({SY_BACKEND_CUDA, R, 30000, H, T, 0, o.sms});
  const std::vector<sy_rank>& ranks = job.ranks;
  const std::vector<sy_stream>& streams = job.streams;
  const std::vector<sy_buffer>& buffers = job.buffers;
  std::vector<cudaStream_t> raw(R);
  for (int r = 0; r < R; ++r) raw[r] = static_cast<cudaStream_t>(job.native_stream(r));

  // Inputs: uniform top-k routing, random payloads.
  std::mt19937_64 rng(12345);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::vector<std::vector<uint16_t>> xb(R);
  std::vector<std::vector<uint8_t>> x8(R);
  std::vector<std::vector<float>> scales(R), weights(R);
  std::vector<std::vector<int64_t>> topk(R);
  for (int r = 0; r < R; ++r) {
    xb[r].resize(size_t(T) * H);
    for (auto& v : xb[r]) v = sy::core::float_to_bf16(uni(rng));
    x8[r].resize(size_t(T) * H);
    for (auto& v : x8[r]) v = uint8_t(rng() % 0x7e);  // finite E4M3 bit patterns
    scales[r].resize(size_t(T) * S);
    for (auto& v : scales[r]) v = 1.0f + uni(rng);
    weights[r].resize(size_t(T) * K);
    for (auto& v : weights[r]) v = 0.5f + 0.5f * uni(rng);
    topk[r].resize(size_t(T) * K);
    for (int t = 0; t < T; ++t) {
      for (int k = 0; k < K; ++k) {
        int64_t e;
        bool dup;
        do {
          e = int64_t(rng() % uint64_t(E));
          dup = false;
          for (int j = 0; j < k; ++j) dup = dup || topk[r][size_t(t) * K + j] == e;
        } while (dup);
        topk[r][size_t(t) * K + k] = e;
      }
    }
  }

  // The routing on the host, for the naive baseline and the byte counts: per (source,
  // destination) the tokens in order.
  std::vector<std::vector<std::vector<int32_t>>> sends(R, std::vector<std::vector<int32_t>>(R));
  std::vector<std::vector<int32_t>> slot(R, std::vector<int32_t>(size_t(T) * R, -1));
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) {
      std::vector<char> to(R, 0);
      for (int k = 0; k < K; ++k) to[topk[r][size_t(t) * K + k] / EL] = 1;
      for (int d = 0; d < R; ++d) {
        if (!to[d]) continue;
        slot[r][size_t(t) * R + d] = int32_t(sends[r][d].size());
        sends[r][d].push_back(t);
      }
    }
  }
  std::vector<int64_t> received(R, 0);
  for (int d = 0; d < R; ++d)
    for (int r = 0; r < R; ++r) received[d] += int64_t(sends[r][d].size());
  int64_t total_rows = 0;
  for (int64_t n : received) total_rows += n;

  // Library inputs.
  std::vector<sy_tensor> tx(R), tx8(R), tsc(R), tidx(R), tw(R), tout(R);
  for (int r = 0; r < R; ++r) {
    tx[r] = make_tensor(ranks[r], streams[r], SY_DTYPE_BF16, {T, H}, xb[r].data(), xb[r].size() * 2);
    tx8[r] = make_tensor(ranks[r], streams[r], SY_DTYPE_FP8_E4M3, {T, H}, x8[r].data(), x8[r].size());
    tsc[r] = make_tensor(ranks[r], streams[r], SY_DTYPE_F32, {T, S}, scales[r].data(), scales[r].size() * 4);
    tidx[r] = make_tensor(ranks[r], streams[r], SY_DTYPE_I64, {T, K}, topk[r].data(), topk[r].size() * 8);
    tw[r] = make_tensor(ranks[r], streams[r], SY_DTYPE_F32, {T, K}, weights[r].data(), weights[r].size() * 4);
    tout[r] = make_tensor(ranks[r], streams[r], SY_DTYPE_BF16, {T, H}, nullptr, 0);
  }

  Gate gate(o.gate);
  std::vector<cudaEvent_t> ends(R);
  for (auto& e : ends) CU(cudaEventCreate(&e));
  const double copy_bps = o.copy_ceiling ? copy_bandwidth(gate, raw[0], o.iters, o.copy_bytes) : 0.0;
  if (o.copy_ceiling) {
    std::printf("device-to-device copy: %.1f GB/s copied, %.1f GB/s read + written\n", copy_bps / 1e9,
                2 * copy_bps / 1e9);
  }

  // Worst-case rows: every rank's tokens (compact); the expanded layout has one row per token and
  // local expert, and each local expert's group is padded to the alignment (8 here).
  const int alignment = o.expand ? 8 : 1;
  const int64_t worst_rows = int64_t(R) * T * (o.expand ? std::min(K, EL) : 1) + (o.expand ? EL * (alignment - 1) : 0);
  auto dispatch_args = [&](int r, bool fp8, sy_handle cached) {
    sy_dispatch_args a;
    std::memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.x = fp8 ? tx8[r] : tx[r];
    a.x_scales = fp8 ? tsc[r] : nullptr;
    a.compute_stream = streams[r];
    a.expert_alignment = alignment;
    a.layout = o.expand ? SY_LAYOUT_EXPANDED : SY_LAYOUT_COMPACT;
    a.zero_padding = o.expand ? 1 : 0;
    if (cached) {
      a.handle = cached;
    } else {
      a.topk_idx = tidx[r];
      a.topk_weights = tw[r];
      a.num_experts = E;
      a.num_worst_tokens = worst_rows;
    }
    return a;
  };

  // Naive baseline buffers (per rank: permutation, send buffer, receive buffer).
  const int payload8 = H, payload16 = 2 * H, scale_bytes = 4 * S;
  std::vector<int32_t*> perm(R);
  std::vector<int64_t*> send_off_d(R);
  std::vector<std::vector<int64_t>> send_off(R, std::vector<int64_t>(R, 0)), recv_off(R, std::vector<int64_t>(R, 0));
  std::vector<int32_t*> slots_d(R);
  std::vector<uint8_t*> send_buf(R), recv_buf(R), send_sc(R), recv_sc(R), back_buf(R), naive_out(R);
  for (int r = 0; r < R; ++r) {
    std::vector<int32_t> p;
    for (int d = 0; d < R; ++d) {
      send_off[r][d] = int64_t(p.size());
      p.insert(p.end(), sends[r][d].begin(), sends[r][d].end());
    }
    perm[r] = device_copy(p);
    send_off_d[r] = device_copy(send_off[r]);
    slots_d[r] = device_copy(slot[r]);
    CU(cudaMalloc(&send_buf[r], std::max<size_t>(p.size(), 1) * payload16));
    CU(cudaMalloc(&send_sc[r], std::max<size_t>(p.size(), 1) * scale_bytes));
    CU(cudaMalloc(&back_buf[r], std::max<size_t>(p.size(), 1) * payload16));
    CU(cudaMalloc(&recv_buf[r], std::max<int64_t>(received[r], 1) * payload16));
    CU(cudaMalloc(&recv_sc[r], std::max<int64_t>(received[r], 1) * scale_bytes));
    CU(cudaMalloc(&naive_out[r], size_t(T) * payload16));
  }
  for (int d = 0; d < R; ++d) {
    int64_t acc = 0;
    for (int r = 0; r < R; ++r) {
      recv_off[r][d] = acc;
      acc += int64_t(sends[r][d].size());
    }
  }
  const int grid = prop.multiProcessorCount;
  auto naive_dispatch = [&](bool fp8) {
    const int row = fp8 ? payload8 : payload16;
    for (int r = 0; r < R; ++r) {
      const int64_t n = send_off[r][R - 1] + int64_t(sends[r][R - 1].size());
      const uint8_t* x = static_cast<const uint8_t*>(device_address(fp8 ? tx8[r] : tx[r]));
      SY_LAUNCH(gather_rows, grid, 256, 0, raw[r])(x, perm[r], n, row, send_buf[r]);
      if (fp8) {
        SY_LAUNCH(gather_rows, grid, 256, 0, raw[r])(static_cast<const uint8_t*>(device_address(tsc[r])), perm[r],
                                                     n, scale_bytes, send_sc[r]);
      }
      for (int d = 0; d < R; ++d) {
        const size_t rows = sends[r][d].size();
        if (rows == 0) continue;
        CU(cudaMemcpyAsync(recv_buf[d] + recv_off[r][d] * row, send_buf[r] + send_off[r][d] * row, rows * row,
                           cudaMemcpyDeviceToDevice, raw[r]));
        if (fp8) {
          CU(cudaMemcpyAsync(recv_sc[d] + recv_off[r][d] * scale_bytes, send_sc[r] + send_off[r][d] * scale_bytes,
                             rows * scale_bytes, cudaMemcpyDeviceToDevice, raw[r]));
        }
      }
    }
    CU(cudaGetLastError());
  };
  std::vector<cudaEvent_t> copied(R);
  for (auto& e : copied) CU(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  // Naive combine of the expert outputs `y[d]` (rows in receive order).
  auto naive_combine = [&](const std::vector<const uint8_t*>& y) {
    for (int d = 0; d < R; ++d) {
      for (int r = 0; r < R; ++r) {
        const size_t rows = sends[r][d].size();
        if (rows == 0) continue;
        CU(cudaMemcpyAsync(back_buf[r] + send_off[r][d] * payload16, y[d] + recv_off[r][d] * payload16,
                           rows * payload16, cudaMemcpyDeviceToDevice, raw[d]));
      }
      CU(cudaEventRecord(copied[d], raw[d]));
    }
    for (int r = 0; r < R; ++r) {
      for (int d = 0; d < R; ++d) CU(cudaStreamWaitEvent(raw[r], copied[d], 0));
      SY_LAUNCH(naive_reduce, grid, 256, 0, raw[r])(reinterpret_cast<const uint16_t*>(back_buf[r]), slots_d[r],
                                                    send_off_d[r], T, R, H, reinterpret_cast<uint16_t*>(naive_out[r]));
    }
    CU(cudaGetLastError());
  };

  std::vector<Row> rows;
  HostTimes host(R), host_combine(R);
  // Times the library (`library_ms` runs it once and returns its milliseconds) and the naive
  // baseline behind the gate, alternately; `after_each` releases (and checks) the library's
  // outputs. The library's calls keep their host times in `host`.
  auto measure_with = [&](Row row, auto library_ms, auto naive, auto after_each) {
    std::vector<float> lib_ms, naive_ms;
    host.clear();
    for (int i = 0; i < o.warmup + o.iters; ++i) {
      const float a = library_ms();
      after_each();
      const float b = timed(gate, raw, ends, naive);
      if (i >= o.warmup) {
        lib_ms.push_back(a);
        naive_ms.push_back(b);
      }
    }
    row.median_ms = median(lib_ms);
    row.min_ms = *std::min_element(lib_ms.begin(), lib_ms.end());
    row.naive_ms = median(naive_ms);
    host.summarize(row, o.warmup);
    rows.push_back(row);
    return rows.size() - 1;
  };
  // The same, with every rank's calls enqueued by this thread behind the gate.
  auto measure = [&](Row row, auto enqueue, auto naive, auto after_each) {
    return measure_with(row, [&] { return timed(gate, raw, ends, enqueue); }, naive, after_each);
  };
  // Rank r's dispatch into `out`, its host time kept in `h`.
  auto dispatch = [&](int r, const sy_dispatch_args& a, sy_dispatch_result& out, HostTimes& h) {
    out.struct_size = sizeof(sy_dispatch_result);
    h.time(r, [&] { SY(sy_dispatch(buffers[r], &a, &out), buffers[r]); });
  };

  std::vector<sy_dispatch_result> res(R);
  // Every rank combines the rows of its dispatch in `res` back into tout (with the received
  // top-k weights when `weights`), its host times kept in `h`.
  std::vector<sy_combine_result> back(R);
  auto combine_all = [&](bool weights, HostTimes& h) {
    for (int r = 0; r < R; ++r) {
      sy_combine_args a;
      std::memset(&a, 0, sizeof a);
      a.struct_size = sizeof a;
      a.x = res[r].recv_x;
      a.handle = res[r].handle;
      a.topk_weights = weights ? res[r].recv_topk_weights : nullptr;
      a.out = tout[r];
      a.compute_stream = streams[r];
      back[r].struct_size = sizeof(sy_combine_result);
      h.time(r, [&] { SY(sy_combine(buffers[r], &a, &back[r]), buffers[r]); });
    }
  };
  auto release_combines = [&] {
    for (int r = 0; r < R; ++r) {
      sy_combine_result& b = back[r];
      if (b.combined_x) expect_produced(b.combined_x, streams[r]);
      if (b.combined_topk_weights) sy_tensor_destroy(b.combined_topk_weights);
      if (b.combined_x) sy_tensor_destroy(b.combined_x);
      std::memset(&b, 0, sizeof b);
    }
  };
  if (o.expand) {
    // The expanded layout: dispatch (BF16 and FP8), cached dispatch, combine. Its rows have no
    // naive counterpart: timed, not compared.
    for (const bool fp8 : {true, false}) {  // BF16 last: its handles serve the cached dispatch and combine
      std::vector<float> ms;
      host.clear();
      for (int i = 0; i < o.warmup + o.iters; ++i) {
        const float t = timed(gate, raw, ends, [&] {
          for (int r = 0; r < R; ++r) dispatch(r, dispatch_args(r, fp8, nullptr), res[r], host);
        });
        if (i >= o.warmup) ms.push_back(t);
        if (i + 1 < o.warmup + o.iters || fp8) {
          for (int r = 0; r < R; ++r) destroy(res[r], streams[r]);
        }
      }
      Row row{"dispatch", fp8 ? "fp8" : "bf16", "expanded"};
      row.median_ms = median(ms);
      row.min_ms = *std::min_element(ms.begin(), ms.end());
      host.summarize(row, o.warmup);
      rows.push_back(row);
    }
    std::vector<sy_dispatch_result> again(R);
    std::vector<float> cached_ms, combine_ms;
    host.clear();
    host_combine.clear();
    for (int i = 0; i < o.warmup + o.iters; ++i) {
      const float c = timed(gate, raw, ends, [&] {
        for (int r = 0; r < R; ++r) dispatch(r, dispatch_args(r, false, res[r].handle), again[r], host);
      });
      for (int r = 0; r < R; ++r) destroy(again[r], streams[r]);
      const float b = timed(gate, raw, ends, [&] { combine_all(false, host_combine); });
      release_combines();
      if (i >= o.warmup) {
        cached_ms.push_back(c);
        combine_ms.push_back(b);
      }
    }
    for (int r = 0; r < R; ++r) destroy(res[r], streams[r]);
    Row cached{"dispatch", "bf16", "expanded-cached"};
    cached.median_ms = median(cached_ms);
    cached.min_ms = *std::min_element(cached_ms.begin(), cached_ms.end());
    host.summarize(cached, o.warmup);
    rows.push_back(cached);
    Row comb{"combine", "bf16", "expanded"};
    comb.median_ms = median(combine_ms);
    comb.min_ms = *std::min_element(combine_ms.begin(), combine_ms.end());
    host_combine.summarize(comb, o.warmup);
    rows.push_back(comb);
  }

  // The bytes of every rank's received rows (and FP8 scales) in `got` that differ from the naive
  // receive buffers.
  auto received_mismatches = [&](const std::vector<sy_dispatch_result>& got, bool fp8) {
    uint64_t n = 0;
    for (int r = 0; r < R; ++r) {
      n += count_mismatches(device_address(got[r].recv_x), recv_buf[r], received[r] * (fp8 ? payload8 : payload16));
      if (fp8) n += count_mismatches(device_address(got[r].recv_x_scales), recv_sc[r], received[r] * scale_bytes);
    }
    return n;
  };

  // Dispatch, worst-case mode (no host wait) and exact-size mode, BF16 and FP8; then cached mode
  // and combine.
  std::vector<sy_dispatch_result> exact(R);
  for (const bool fp8 : {false, true}) {
    if (o.expand) break;
    Row row{"dispatch", fp8 ? "fp8" : "bf16", "worst-case"};
    row.bytes = double(total_rows) * ((fp8 ? payload8 + scale_bytes : payload16));
    row.rw_bytes = 2 * row.bytes;  // read at the source, written at the destination
    const size_t idx = measure(
        row,
        [&] {
          for (int r = 0; r < R; ++r) dispatch(r, dispatch_args(r, fp8, nullptr), res[r], host);
        },
        [&] { naive_dispatch(fp8); },
        [&] {
          for (int r = 0; r < R; ++r) destroy(res[r], streams[r]);
        });
    // Check the last run: the library's rows equal the naive ones.
    for (int r = 0; r < R; ++r) dispatch(r, dispatch_args(r, fp8, nullptr), res[r], host);
    for (int r = 0; r < R; ++r) CU(cudaStreamSynchronize(raw[r]));
    naive_dispatch(fp8);
    for (int r = 0; r < R; ++r) CU(cudaStreamSynchronize(raw[r]));
    rows[idx].mismatches += received_mismatches(res, fp8);

    // Exact-size mode: the same rows, each rank's outputs sized after its host wait for the
    // counts; one host thread per rank (timed_threads).
    Row ex{"dispatch", row.dtype, "exact"};
    ex.threaded = true;
    ex.bytes = row.bytes;
    ex.rw_bytes = row.rw_bytes;
    auto exact_call = [&](int r) {
      sy_dispatch_args a = dispatch_args(r, fp8, nullptr);
      a.num_worst_tokens = 0;
      dispatch(r, a, exact[r], host);
    };
    const size_t eidx = measure_with(
        ex, [&] { return timed_threads(gate, raw, ends, exact_call); }, [&] { naive_dispatch(fp8); },
        [&] {
          for (int r = 0; r < R; ++r) destroy(exact[r], streams[r]);
        });
    // One more, checked against the naive receive buffers (which hold this dtype's rows): exactly
    // the received rows, each equal.
    timed_threads(gate, raw, ends, exact_call);
    for (int r = 0; r < R; ++r) {
      const int64_t shape_rows = sy::driver::describe(exact[r].recv_x).shape[0];
      if (exact[r].num_recv_tokens != received[r] || exact[r].num_rows != received[r] || shape_rows != received[r]) {
        rows[eidx].failure += "rank " + std::to_string(r) + ": num_recv_tokens " +
                              std::to_string(exact[r].num_recv_tokens) + ", num_rows " +
                              std::to_string(exact[r].num_rows) + ", recv_x rows " + std::to_string(shape_rows) +
                              ", expected " + std::to_string(received[r]) + "; ";
      }
    }
    rows[eidx].mismatches += received_mismatches(exact, fp8);
    for (int r = 0; r < R; ++r) destroy(exact[r], streams[r]);

    if (!fp8) {
      // Cached dispatch with the handles of the worst-case (completed) dispatch.
      std::vector<sy_dispatch_result> again(R);
      Row cached{"dispatch", "bf16", "cached"};
      cached.bytes = row.bytes;
      cached.rw_bytes = row.rw_bytes;
      const size_t cidx = measure(
          cached,
          [&] {
            for (int r = 0; r < R; ++r) dispatch(r, dispatch_args(r, false, res[r].handle), again[r], host);
          },
          [&] { naive_dispatch(false); },
          [&] {
            for (int r = 0; r < R; ++r) destroy(again[r], streams[r]);
          });
      for (int r = 0; r < R; ++r) dispatch(r, dispatch_args(r, false, res[r].handle), again[r], host);  // checked
      for (int r = 0; r < R; ++r) CU(cudaStreamSynchronize(raw[r]));
      rows[cidx].mismatches += received_mismatches(again, false);
      for (int r = 0; r < R; ++r) destroy(again[r], streams[r]);

      // Combine the received rows back (as if every expert were the identity), with weights.
      Row comb{"combine", "bf16", "compact"};
      comb.bytes = double(total_rows) * payload16;
      // Every expert output row read, every token's combined row written.
      comb.rw_bytes = comb.bytes + double(R) * T * payload16;
      std::vector<const uint8_t*> y(R);
      for (int r = 0; r < R; ++r) y[r] = static_cast<const uint8_t*>(device_address(res[r].recv_x));
      const size_t ci = measure(
          comb, [&] { combine_all(true, host); }, [&] { naive_combine(y); }, release_combines);
      for (int r = 0; r < R; ++r) {
        rows[ci].mismatches += count_mismatches(device_address(tout[r]), naive_out[r], int64_t(T) * payload16);
      }
    }
    for (int r = 0; r < R; ++r) destroy(res[r], streams[r]);
  }

  // Report. Without a copy ceiling (--sanitize) or a baseline (--expand) those columns are n/a.
  const double copy_rw_bps = 2 * copy_bps;  // a copy of n bytes reads n and writes n
  struct Derived {
    double gbps, fraction;        // one way (bytes), against the copy's bytes copied / time
    double rw_gbps, fraction_rw;  // read + write (rw_bytes), against the copy's read + write / time
    double speedup, host_med_us, host_max_us;
    bool compared;
  };
  auto derive = [&](const Row& r) {
    const double bps = r.bytes > 0 ? r.bytes / (r.median_ms * 1e-3) : 0.0;
    const double rw_bps = r.rw_bytes > 0 ? r.rw_bytes / (r.median_ms * 1e-3) : 0.0;
    return Derived{bps / 1e9,
                   copy_bps > 0 && bps > 0 ? bps / copy_bps : -1.0,
                   rw_bps / 1e9,
                   copy_rw_bps > 0 && rw_bps > 0 ? rw_bps / copy_rw_bps : -1.0,
                   r.naive_ms > 0 ? r.naive_ms / r.median_ms : -1.0,
                   r.host_us.empty() ? -1.0 : double(median(r.host_us)),
                   r.host_us.empty() ? -1.0 : double(*std::max_element(r.host_us.begin(), r.host_us.end())),
                   r.naive_ms > 0};
  };
  auto number = [](double v, const char* fmt) {
    char b[32];
    if (v < 0) return std::string("n/a");
    std::snprintf(b, sizeof b, fmt, v);
    return std::string(b);
  };
  auto check = [](const Row& r, const Derived& d) {
    if (!r.failure.empty()) return "WRONG ROWS";
    return !d.compared ? "not compared" : r.mismatches == 0 ? "= naive" : "MISMATCH";
  };
  std::printf("\nrw: bytes read + written (the copy's too); host us: time inside one call, median over iterations, "
              "then median and max over ranks\n");
  std::printf("\n%-9s %-5s %-15s %10s %8s %9s %10s %9s %9s %11s %8s %s\n", "op", "dtype", "mode", "median ms", "GB rw",
              "GB/s rw", "of copy rw", "host us", "max rank", "naive ms", "speedup", "check");
  for (const Row& r : rows) {
    const Derived d = derive(r);
    std::printf("%-9s %-5s %-15s %10.3f %8s %9s %10s %9s %9s %11s %8s %s\n", r.op.c_str(), r.dtype.c_str(),
                r.mode.c_str(), r.median_ms, number(r.rw_bytes > 0 ? r.rw_bytes / 1e9 : -1, "%.3f").c_str(),
                number(r.rw_bytes > 0 ? d.rw_gbps : -1, "%.1f").c_str(), number(d.fraction_rw, "%.2f").c_str(),
                number(d.host_med_us, "%.1f").c_str(), number(d.host_max_us, "%.1f").c_str(),
                number(r.naive_ms > 0 ? r.naive_ms : -1, "%.3f").c_str(), number(d.speedup, "%.2f").c_str(),
                check(r, d));
  }
  uint64_t bad = 0;
  std::string failures;
  for (const Row& r : rows) {
    bad += r.mismatches;
    if (!r.failure.empty()) failures += r.op + " " + r.dtype + " " + r.mode + ": " + r.failure;
  }
  if (!o.json.empty()) {
    FILE* f = std::fopen(o.json.c_str(), "w");
    if (!f) die("cannot write " + o.json);
    char date[32];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    std::fprintf(f,
                 "{\n  \"date\": \"%s\",\n  \"gpu\": \"%s\",\n  \"sm_count\": %d,\n  \"cuda_driver\": %d,\n"
                 "  \"cuda_runtime\": %d,\n  \"library\": \"%s\",\n",
                 date, prop.name, prop.multiProcessorCount, info.cuda_driver_version, info.cuda_runtime_version,
                 sy_version_string());
    std::fprintf(f,
                 "  \"shape\": {\"ranks\": %d, \"tokens_per_rank\": %d, \"hidden\": %d, \"topk\": %d, \"experts\": %d, "
                 "\"routing\": \"uniform\", \"received_rows\": %lld},\n",
                 R, T, H, K, E, (long long)total_rows);
    std::fprintf(f, "  \"warmup\": %d,\n  \"iters\": %d,\n  \"num_sms\": %d,\n  \"gated\": %s,\n", o.warmup, o.iters,
                 o.sms, o.gate ? "true" : "false");
    std::fprintf(f,
                 "  \"copy_bandwidth_gbps\": %.3f,\n  \"copy_bandwidth_rw_gbps\": %.3f,\n"
                 "  \"rw_bytes_convention\": \"rw_bytes: payload (and FP8 scale) bytes the operation must read plus "
                 "those it must write: dispatch reads every received row at its source and writes it at its "
                 "destination (2 x received rows x row bytes); combine reads every expert output row and writes "
                 "every combined token ((received rows + ranks x tokens) x row bytes); no top-k metadata. "
                 "copy_bandwidth_rw_gbps counts a copy of n bytes as 2n (read + written); fraction_of_copy_rw = "
                 "rw_gbps / copy_bandwidth_rw_gbps\",\n"
                 "  \"bytes_convention\": \"bytes (kept for comparison with earlier results): payload (and FP8 scale) "
                 "bytes of every received row, counted once; copy_bandwidth_gbps counted the same way (bytes copied / "
                 "time); fraction_of_copy = gbps / copy_bandwidth_gbps\",\n"
                 "  \"timing_convention\": \"gated: every rank enqueued by one thread behind a gate kernel, CUDA "
                 "events from its release to the last rank's completion; threads (exact-size dispatch, whose host wait "
                 "needs the kernels running): one host thread per rank, released together after a start event, CUDA "
                 "events from it to the last rank's completion, host wait included\",\n"
                 "  \"host_time_convention\": \"host_us_per_rank: per rank, the median over the timed iterations of "
                 "the CPU wall time inside one sy_dispatch / sy_combine call (exact-size: its host wait included); "
                 "host_us_median and host_us_max over ranks\",\n"
                 "  \"naive\": \"per rank: gather rows by destination into a send buffer, one cudaMemcpyAsync per "
                 "destination (combine: copies back, then a gather-and-sum kernel); payload and scales only, no "
                 "top-k metadata; permutations precomputed on the host\",\n",
                 copy_bps / 1e9, copy_rw_bps / 1e9);
    std::fprintf(f, "  \"results\": [\n");
    auto json_number = [](double v) {
      char b[32];
      if (v < 0) return std::string("null");
      std::snprintf(b, sizeof b, "%.4f", v);
      return std::string(b);
    };
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      const Derived d = derive(r);
      std::string per_rank;
      for (size_t k = 0; k < r.host_us.size(); ++k) per_rank += (k ? ", " : "") + json_number(r.host_us[k]);
      // The failure text is built from numbers and plain words: nothing to escape.
      const std::string failure = r.failure.empty() ? "null" : "\"" + r.failure + "\"";
      std::fprintf(f,
                   "    {\"op\": \"%s\", \"dtype\": \"%s\", \"mode\": \"%s\", \"timing\": \"%s\", \"median_ms\": %.4f, "
                   "\"min_ms\": %.4f, \"rw_bytes\": %.0f, \"rw_gbps\": %s, \"fraction_of_copy_rw\": %s, "
                   "\"bytes\": %.0f, \"gbps\": %s, \"fraction_of_copy\": %s, \"host_us_median\": %s, "
                   "\"host_us_max\": %s, \"host_us_per_rank\": [%s], \"naive_median_ms\": %s, "
                   "\"speedup_vs_naive\": %s, \"matches_naive\": %s, \"check_failure\": %s}%s\n",
                   r.op.c_str(), r.dtype.c_str(), r.mode.c_str(), r.threaded ? "threads" : "gated", r.median_ms,
                   r.min_ms, r.rw_bytes, json_number(r.rw_bytes > 0 ? d.rw_gbps : -1).c_str(),
                   json_number(d.fraction_rw).c_str(), r.bytes, json_number(r.bytes > 0 ? d.gbps : -1).c_str(),
                   json_number(d.fraction).c_str(), json_number(d.host_med_us).c_str(),
                   json_number(d.host_max_us).c_str(), per_rank.c_str(),
                   json_number(r.naive_ms > 0 ? r.naive_ms : -1).c_str(), json_number(d.speedup).c_str(),
                   !d.compared ? "null" : r.mismatches == 0 && r.failure.empty() ? "true" : "false", failure.c_str(),
                   i + 1 < rows.size() ? "," : "");
    }
    std::fprintf(f, "  ]\n}\n");
    std::fclose(f);
  }
  if (!failures.empty()) die(failures);
  if (bad != 0) die(std::to_string(bad) + " bytes differ from the naive baseline");
  std::printf("\ngpu_bench: ok\n");
  return 0;
}
