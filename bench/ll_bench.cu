// GPU benchmark of the low-latency (decode) mode on virtual ranks of one GPU: dispatch (FP8 by
// default) and combine (BF16) at DeepSeek-V3 decode shapes, per rank, next to the lower bound
// the same run's copy bandwidth gives for the bytes they must move (bench/gpu-check.sh runs it
// and keeps the JSON).
//
// It drives the library through its C ABI only. Every iteration enqueues every rank's call behind
// a gate (bench/gpu_timing.cuh), so a rank's time is GPU time from the gate's release to the end
// of its own call (CUDA events on its stream), whatever order the host enqueued the ranks in.
// Each case reports, per rank, the median and p99 over `--iters` iterations (after `--warmup`),
// and the max over ranks of each.
//
//   bytes         what the call must read plus write, payload and scales only: dispatch reads each
//                 routed (token, expert) entry's row at its source and writes it in the
//                 destination's output (2 x entries x (H + 4 x H / 128) bytes in FP8, 2 x entries x
//                 2H in BF16); combine reads every entry's expert output and writes every token
//                 ((entries + ranks x tokens) x 2H). The copy ceiling counts a D2D copy of n bytes
//                 as 2n. bound = bytes / copy bandwidth: what all ranks together cannot beat on one
//                 GPU.
//   checks        the received counts per local expert must equal the routing's, on every rank,
//                 and no call may fail (the library's errors end the run).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "../csrc/core/dtype.h"
#include "../tests/native/abi_driver.h"
#include "gpu_timing.cuh"
#include "switchyard.h"

namespace {

using sy::driver::make_tensor;

struct Options {
  int ranks = 8, max_tokens = 128, hidden = 7168, topk = 8, experts = 256;
  std::vector<int> tokens{128, 1};  // the cases: tokens per rank
  int warmup = 5, iters = 50;
  bool fp8 = true, copy_ceiling = true;
  size_t copy_bytes = size_t(1) << 30;
  std::string json;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) die("missing value for " + a);
      return argv[++i];
    };
    if (a == "--ranks") o.ranks = std::stoi(value());
    else if (a == "--max-tokens") o.max_tokens = std::stoi(value());
    else if (a == "--hidden") o.hidden = std::stoi(value());
    else if (a == "--topk") o.topk = std::stoi(value());
    else if (a == "--experts") o.experts = std::stoi(value());
    else if (a == "--warmup") o.warmup = std::stoi(value());
    else if (a == "--iters") o.iters = std::stoi(value());
    else if (a == "--bf16") o.fp8 = false;
    else if (a == "--json") o.json = value();
    else if (a == "--small") {  // what a CPU runs in seconds (bench/gpu-check.sh --no-gpu)
      o.ranks = 4, o.max_tokens = 16, o.hidden = 256, o.topk = 4, o.experts = 16;
      o.tokens = {16, 1};
      o.warmup = 1, o.iters = 3;
      o.copy_bytes = size_t(1) << 20;
    } else {
      die("unknown argument " + a +
          " (--ranks --max-tokens --hidden --topk --experts --warmup --iters --bf16 --json --small)");
    }
  }
  if (o.experts % o.ranks != 0 || o.topk > o.experts || o.hidden % 128 != 0) die("inconsistent shape");
  for (int t : o.tokens)
    if (t > o.max_tokens) die("tokens beyond --max-tokens");
  return o;
}

// Milliseconds from the gate's start to each rank's end.
std::vector<float> per_rank(Gate& gate, std::vector<cudaEvent_t>& ends) {
  std::vector<float> ms(ends.size());
  for (size_t r = 0; r < ends.size(); ++r) {
    CU(cudaEventSynchronize(ends[r]));
    CU(cudaEventElapsedTime(&ms[r], gate.start, ends[r]));
  }
  return ms;
}

float percentile(std::vector<float> v, double p) {
  std::sort(v.begin(), v.end());
  if (v.empty()) return 0.0f;
  return v[std::min(v.size() - 1, size_t(p * double(v.size() - 1) + 0.5))];
}

// One case's per-rank times: [rank][iteration] milliseconds.
struct Timings {
  std::vector<std::vector<float>> ms;
  explicit Timings(int ranks) : ms(size_t(ranks)) {}
  void add(const std::vector<float>& v) {
    for (size_t r = 0; r < v.size(); ++r) ms[r].push_back(v[r]);
  }
  float max_median() const {
    float m = 0;
    for (const auto& v : ms) m = std::max(m, percentile(v, 0.5));
    return m;
  }
  float max_p99() const {
    float m = 0;
    for (const auto& v : ms) m = std::max(m, percentile(v, 0.99));
    return m;
  }
};

}  // namespace

int main(int argc, char** argv) {
  sy::driver::program_name() = "ll_bench";
  const Options o = parse(argc, argv);
  const sy_backend_info info = sy::driver::cuda_backend();
  cudaDeviceProp prop;
  CU(cudaGetDeviceProperties(&prop, 0));
  const int R = o.ranks, Tmax = o.max_tokens, H = o.hidden, K = o.topk, E = o.experts, EL = E / R;
  const int64_t N = int64_t(R) * Tmax;
  std::printf("ll_bench: %s, %d SMs; %d ranks, up to %d tokens each, hidden %d, top-%d of %d experts, %s dispatch\n",
              prop.name, prop.multiProcessorCount, R, Tmax, H, K, E, o.fp8 ? "FP8" : "BF16");

  sy::driver::LocalGroup job({SY_BACKEND_CUDA, R, 30000, H, Tmax, E});
  const std::vector<sy_rank>& ranks = job.ranks;
  const std::vector<sy_stream>& streams = job.streams;
  const std::vector<sy_buffer>& buffers = job.buffers;
  std::vector<cudaStream_t> raw(static_cast<size_t>(R));
  for (int r = 0; r < R; ++r) raw[size_t(r)] = static_cast<cudaStream_t>(job.native_stream(r));

  Gate gate(true);
  std::vector<cudaEvent_t> ends(static_cast<size_t>(R));
  for (auto& e : ends) CU(cudaEventCreate(&e));
  const double copy_bps = o.copy_ceiling ? copy_bandwidth(gate, raw[0], o.iters, o.copy_bytes) : 0.0;
  std::printf("device-to-device copy: %.1f GB/s copied, %.1f GB/s read + written\n", copy_bps / 1e9,
              2 * copy_bps / 1e9);

  // The expert outputs combine sends back: random BF16, [EL, N, H] per rank.
  std::mt19937_64 rng(20261130);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::vector<sy_tensor> ty(static_cast<size_t>(R));
  for (int r = 0; r < R; ++r) {
    std::vector<uint16_t> y(size_t(EL) * size_t(N) * size_t(H));
    for (auto& v : y) v = sy::core::float_to_bf16(uni(rng));
    ty[size_t(r)] = make_tensor(ranks[size_t(r)], streams[size_t(r)], SY_DTYPE_BF16, {EL, N, H}, y.data(), y.size() * 2);
  }

  std::string json = "{\"schema\":1,\"gpu\":\"" + std::string(prop.name) + "\",\"sm_count\":" +
                     std::to_string(prop.multiProcessorCount) + ",\"library\":\"" + info.device_name +
                     "\",\"ranks\":" + std::to_string(R) + ",\"hidden\":" + std::to_string(H) +
                     ",\"experts\":" + std::to_string(E) + ",\"topk\":" + std::to_string(K) +
                     ",\"max_tokens\":" + std::to_string(Tmax) + ",\"dispatch_dtype\":\"" +
                     (o.fp8 ? "fp8" : "bf16") + "\",\"copy_bandwidth_rw_gbps\":" + std::to_string(2 * copy_bps / 1e9) +
                     ",\"iters\":" + std::to_string(o.iters) + ",\"results\":[";
  std::printf("\n%-9s %6s %10s %10s %10s %10s %10s\n", "op", "tokens", "median us", "p99 us", "bound us",
              "MB rw", "check");
  bool first_row = true;
  for (const int T : o.tokens) {
    // Uniform top-k routing, random BF16 tokens, weights in [0.5, 1).
    std::vector<sy_tensor> tx(static_cast<size_t>(R)), tidx(static_cast<size_t>(R)), tw(static_cast<size_t>(R));
    std::vector<int32_t> want(size_t(E), 0);  // entries per global expert, all ranks together
    int64_t entries = 0;
    for (int r = 0; r < R; ++r) {
      std::vector<uint16_t> x(size_t(T) * size_t(H));
      for (auto& v : x) v = sy::core::float_to_bf16(uni(rng));
      std::vector<int64_t> idx(size_t(T) * size_t(K));
      std::vector<float> w(size_t(T) * size_t(K));
      for (int t = 0; t < T; ++t) {
        for (int k = 0; k < K; ++k) {
          int64_t e;
          bool dup;
          do {
            e = int64_t(rng() % uint64_t(E));
            dup = false;
            for (int j = 0; j < k; ++j) dup = dup || idx[size_t(t) * K + j] == e;
          } while (dup);
          idx[size_t(t) * K + k] = e;
          w[size_t(t) * K + k] = 0.5f + 0.25f * (uni(rng) + 1.0f);
          want[size_t(e)] += 1;
          entries += 1;
        }
      }
      tx[size_t(r)] = make_tensor(ranks[size_t(r)], streams[size_t(r)], SY_DTYPE_BF16, {T, H}, x.data(), x.size() * 2);
      tidx[size_t(r)] = make_tensor(ranks[size_t(r)], streams[size_t(r)], SY_DTYPE_I64, {T, K}, idx.data(), idx.size() * 8);
      tw[size_t(r)] = make_tensor(ranks[size_t(r)], streams[size_t(r)], SY_DTYPE_F32, {T, K}, w.data(), w.size() * 4);
    }
    Timings dispatch_ms(R), combine_ms(R);
    bool counts_ok = true;
    for (int it = 0; it < o.warmup + o.iters; ++it) {
      std::vector<sy_ll_dispatch_result> sent(static_cast<size_t>(R));
      gate.hold();
      for (int r = 0; r < R; ++r) CU(cudaStreamWaitEvent(raw[size_t(r)], gate.start, 0));
      for (int r = 0; r < R; ++r) {
        sy_ll_dispatch_args a;
        std::memset(&a, 0, sizeof a);
        a.struct_size = sizeof a;
        a.flags = o.fp8 ? SY_LL_FP8 : 0;
        a.x = tx[size_t(r)];
        a.topk_idx = tidx[size_t(r)];
        a.compute_stream = streams[size_t(r)];
        std::memset(&sent[size_t(r)], 0, sizeof(sy_ll_dispatch_result));
        sent[size_t(r)].struct_size = sizeof(sy_ll_dispatch_result);
        SY(sy_ll_dispatch(buffers[size_t(r)], &a, &sent[size_t(r)]), buffers[size_t(r)]);
        CU(cudaEventRecord(ends[size_t(r)], raw[size_t(r)]));
      }
      gate.release();
      const std::vector<float> d = per_rank(gate, ends);
      if (it == 0) {  // every rank received what the routing sends its experts
        for (int r = 0; r < R; ++r) {
          const std::vector<uint8_t> c = sy::driver::read_tensor(sent[size_t(r)].recv_count, streams[size_t(r)]);
          for (int l = 0; l < EL; ++l) {
            int32_t got = 0;
            std::memcpy(&got, c.data() + 4 * l, 4);
            if (got != want[size_t(r) * EL + l]) counts_ok = false;
          }
        }
      }
      std::vector<sy_ll_combine_result> back(static_cast<size_t>(R));
      gate.hold();
      for (int r = 0; r < R; ++r) CU(cudaStreamWaitEvent(raw[size_t(r)], gate.start, 0));
      for (int r = 0; r < R; ++r) {
        sy_ll_combine_args a;
        std::memset(&a, 0, sizeof a);
        a.struct_size = sizeof a;
        a.x = ty[size_t(r)];
        a.topk_idx = tidx[size_t(r)];
        a.topk_weights = tw[size_t(r)];
        a.handle = sent[size_t(r)].handle;
        a.compute_stream = streams[size_t(r)];
        std::memset(&back[size_t(r)], 0, sizeof(sy_ll_combine_result));
        back[size_t(r)].struct_size = sizeof(sy_ll_combine_result);
        SY(sy_ll_combine(buffers[size_t(r)], &a, &back[size_t(r)]), buffers[size_t(r)]);
        CU(cudaEventRecord(ends[size_t(r)], raw[size_t(r)]));
      }
      gate.release();
      const std::vector<float> c = per_rank(gate, ends);
      for (int r = 0; r < R; ++r) {  // a failed call says so when its output is read
        sy::driver::read_tensor(back[size_t(r)].combined_x, streams[size_t(r)], 2);
        sy_tensor_destroy(back[size_t(r)].combined_x);
        sy_tensor_destroy(sent[size_t(r)].recv_x);
        if (sent[size_t(r)].recv_x_scales) sy_tensor_destroy(sent[size_t(r)].recv_x_scales);
        sy_tensor_destroy(sent[size_t(r)].recv_count);
        sy_ll_handle_destroy(sent[size_t(r)].handle);
      }
      if (it >= o.warmup) {
        dispatch_ms.add(d);
        combine_ms.add(c);
      }
    }
    const double row = o.fp8 ? double(H) + 4.0 * (H / 128) : 2.0 * H;
    const double dispatch_bytes = 2.0 * double(entries) * row;
    const double combine_bytes = (double(entries) + double(R) * T) * 2.0 * H;
    for (const auto& [op, t, bytes] :
         {std::tuple<const char*, const Timings*, double>{"dispatch", &dispatch_ms, dispatch_bytes},
          std::tuple<const char*, const Timings*, double>{"combine", &combine_ms, combine_bytes}}) {
      const double bound_us = copy_bps > 0 ? bytes / (2 * copy_bps) * 1e6 : 0.0;
      const char* check = counts_ok ? "ok" : "COUNTS";
      std::printf("%-9s %6d %10.1f %10.1f %10.1f %10.2f %10s\n", op, T, t->max_median() * 1e3, t->max_p99() * 1e3,
                  bound_us, bytes / 1e6, check);
      std::string ranks_json;
      for (int r = 0; r < R; ++r) {
        ranks_json += std::string(r ? "," : "") + "{\"median_us\":" +
                      std::to_string(percentile(t->ms[size_t(r)], 0.5) * 1e3) +
                      ",\"p99_us\":" + std::to_string(percentile(t->ms[size_t(r)], 0.99) * 1e3) + "}";
      }
      json += std::string(first_row ? "" : ",") + "{\"op\":\"" + op + "\",\"tokens\":" + std::to_string(T) +
              ",\"max_median_us\":" + std::to_string(t->max_median() * 1e3) +
              ",\"max_p99_us\":" + std::to_string(t->max_p99() * 1e3) + ",\"rw_bytes\":" +
              std::to_string(int64_t(bytes)) + ",\"bound_us\":" + std::to_string(bound_us) +
              ",\"counts_ok\":" + (counts_ok ? "true" : "false") + ",\"per_rank\":[" + ranks_json + "]}";
      first_row = false;
    }
    for (int r = 0; r < R; ++r) {
      sy_tensor_destroy(tx[size_t(r)]);
      sy_tensor_destroy(tidx[size_t(r)]);
      sy_tensor_destroy(tw[size_t(r)]);
    }
    if (!counts_ok) die("received counts differ from the routing's");
  }
  json += "]}\n";
  if (!o.json.empty()) {
    FILE* f = std::fopen(o.json.c_str(), "w");
    if (!f) die("cannot write " + o.json);
    std::fputs(json.c_str(), f);
    std::fclose(f);
  }
  for (sy_tensor t : ty) sy_tensor_destroy(t);
  for (cudaEvent_t e : ends) CU(cudaEventDestroy(e));
  std::printf("\nll_bench: ok\n");
  return 0;
}
