// One scenario of every CUDA kernel family, driven through the C ABI alone (no Deno): layout;
// dispatch in exact-size, worst-case and cached modes, compact and expanded; combine with weights
// and a bias; and a missing rank's timeout. Each scenario runs on the CUDA backend and on the
// host backend with the same inputs, and every output must agree byte for byte.
//
// CI runs it on the CPU executor built with ThreadSanitizer (SWITCHYARD_SANITIZE=thread): the
// kernels, their flags and the host orchestration under the race detector, with the happens-before
// edges CUDA promises and no others (tests/cuda_on_cpu/README.md). Exit status 0 means every
// scenario agreed; ThreadSanitizer's reports make it non-zero (TSAN_OPTIONS exitcode).
//
//   kernel_families [--ranks 4] [--tokens 40] [--hidden 256] [--experts 16] [--topk 4] [--timeout-ms 20000]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../../csrc/core/dtype.h"
#include "abi_driver.h"
#include "switchyard.h"

// The CPU executor's watch for calls CUDA-graph capture forbids (tests/cuda_on_cpu/include/
// cuda_on_cpu/inspect.h); weak, so that a GPU build, which has no executor, leaves them null.
extern "C" void sy_cuda_cpu_watch_host_waits(int on) __attribute__((weak));
extern "C" size_t sy_cuda_cpu_host_waits(int polls, char* out, size_t n) __attribute__((weak));

namespace {

using sy::driver::die;
using Bytes = std::vector<uint8_t>;
using Outputs = std::map<std::string, Bytes>;  // one rank's outputs of one scenario, by name

struct Shape {
  int ranks = 4, tokens = 40, hidden = 256, experts = 16, topk = 4;
  // The operations' deadline: longer under a sanitizer in CI, whose lane runs at low priority
  // beside the main steps and can be starved for tens of seconds.
  int timeout_ms = 20000;
};

// Every rank's inputs, generated once and uploaded to both backends.
struct Inputs {
  std::vector<std::vector<uint16_t>> x;        // [T, H] BF16
  std::vector<std::vector<int64_t>> topk;      // [T, K], -1 = no expert
  std::vector<std::vector<float>> weights;     // [T, K]
  std::vector<std::vector<uint16_t>> bias;     // [T, H] BF16
  std::vector<std::vector<uint16_t>> expert;   // expert outputs, enough rows for any dispatch
};

// BF16 values whose float sum depends on the order of addition: mostly small, some near 2^12.
uint16_t order_sensitive_bf16(std::mt19937_64& rng) {
  std::uniform_real_distribution<float> small(-1.0f, 1.0f);
  const float v = rng() % 8 == 0 ? (rng() % 2 ? 1.0f : -1.0f) * 4096.0f * (1.0f + small(rng) / 4) : small(rng);
  return sy::core::float_to_bf16(v);
}

Inputs generate(const Shape& s) {
  std::mt19937_64 rng(20261129);
  Inputs in;
  const int T = s.tokens, H = s.hidden, K = s.topk;
  const size_t rows = size_t(s.ranks) * T * K + 64;
  for (int r = 0; r < s.ranks; ++r) {
    std::vector<uint16_t> x(size_t(T) * H), bias(size_t(T) * H), expert(rows * H);
    for (auto& v : x) v = order_sensitive_bf16(rng);
    for (auto& v : bias) v = order_sensitive_bf16(rng);
    for (auto& v : expert) v = order_sensitive_bf16(rng);
    std::vector<int64_t> topk(size_t(T) * K);
    std::vector<float> weights(size_t(T) * K);
    for (int t = 0; t < T; ++t) {
      for (int k = 0; k < K; ++k) {
        int64_t e;
        bool dup;
        do {
          e = rng() % 5 == 0 ? -1 : int64_t(rng() % uint64_t(s.experts));
          dup = false;
          for (int j = 0; j < k && e >= 0; ++j) dup = dup || topk[size_t(t) * K + j] == e;
        } while (dup);
        topk[size_t(t) * K + k] = e;
        weights[size_t(t) * K + k] = float(rng() % 1000) / 997.0f;
      }
    }
    in.x.push_back(std::move(x));
    in.bias.push_back(std::move(bias));
    in.expert.push_back(std::move(expert));
    in.topk.push_back(std::move(topk));
    in.weights.push_back(std::move(weights));
  }
  return in;
}

// Runs fn(r) for every rank at once: collective operations block until every rank has called.
void each_rank(int ranks, const std::function<void(int)>& fn) {
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r) threads.emplace_back(fn, r);
  for (std::thread& t : threads) t.join();
}

// A group of virtual ranks with one stream and one buffer each, sized for the shape.
struct Job : sy::driver::LocalGroup {
  Job(int32_t backend, const Shape& s, int64_t timeout_ms, bool low_latency = false, int32_t ranks_per_node = 0)
      // Across nodes, rings of 4 entries: the two hops wrap them and wait for credit, and the
      // dispatch puts two records at a time (normal_network.cu).
      : LocalGroup({backend, s.ranks, timeout_ms, s.hidden, s.tokens, low_latency ? s.experts : 0, 0, ranks_per_node,
                    ranks_per_node > 0 ? 4 : 0}) {}
};

struct Mode {
  const char* name;
  int32_t layout = SY_LAYOUT_COMPACT;
  int32_t alignment = 1;
  bool worst = false;
  bool cached = false;
  bool zero_padding = false;
  int32_t ranks_per_node = 0;  // > 0: virtual nodes (the host backend's dispatch takes two hops)
  int32_t reduction = SY_INTERNODE_CHAIN;  // across nodes: how combine reduces
};

// One dispatch (and, for cached mode, a second one on its handle) and a combine back, on every
// rank; returns each rank's outputs.
std::vector<Outputs> dispatch_and_combine(int32_t backend, const Shape& s, const Inputs& in, const Mode& m) {
  Job job(backend, s, s.timeout_ms, false, m.ranks_per_node);
  std::vector<Outputs> out(size_t(s.ranks));
  each_rank(s.ranks, [&](int r) {
    const int T = s.tokens, H = s.hidden, K = s.topk;
    Outputs& o = out[size_t(r)];
    sy_tensor x = job.tensor(r, SY_DTYPE_BF16, {T, H}, in.x[size_t(r)].data(), uint64_t(T) * H * 2);
    sy_tensor idx = job.tensor(r, SY_DTYPE_I64, {T, K}, in.topk[size_t(r)].data(), uint64_t(T) * K * 8);
    sy_tensor w = job.tensor(r, SY_DTYPE_F32, {T, K}, in.weights[size_t(r)].data(), uint64_t(T) * K * 4);
    sy_tensor bias = job.tensor(r, SY_DTYPE_BF16, {T, H}, in.bias[size_t(r)].data(), uint64_t(T) * H * 2);

    sy_dispatch_args a;
    std::memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.num_experts = s.experts;
    a.x = x;
    a.topk_idx = idx;
    a.topk_weights = w;
    a.compute_stream = job.streams[size_t(r)];
    a.expert_alignment = m.alignment;
    a.layout = m.layout;
    a.zero_padding = m.zero_padding ? 1 : 0;
    // Worst case: every token of every rank, and for the expanded layout one row per top-k entry
    // plus each local expert's padding.
    const int64_t all_tokens = int64_t(s.ranks) * T;
    a.num_worst_tokens = m.worst ? all_tokens * (m.layout == SY_LAYOUT_EXPANDED ? K : 1) +
                                       int64_t(s.experts / s.ranks) * (m.alignment - 1)
                                 : 0;
    sy_dispatch_result first;
    std::memset(&first, 0, sizeof first);
    first.struct_size = sizeof first;
    SY(sy_dispatch(job.buffers[size_t(r)], &a, &first), job.buffers[size_t(r)]);
    sy_dispatch_result res = first, again;
    if (m.cached) {
      job.read(r, first.recv_count);  // a handle is reusable once its dispatch completed
      sy_dispatch_args c;
      std::memset(&c, 0, sizeof c);
      c.struct_size = sizeof c;
      c.x = x;
      c.handle = first.handle;
      c.compute_stream = job.streams[size_t(r)];
      c.expert_alignment = m.alignment;
      c.layout = m.layout;
      std::memset(&again, 0, sizeof again);
      again.struct_size = sizeof again;
      SY(sy_dispatch(job.buffers[size_t(r)], &c, &again), job.buffers[size_t(r)]);
      res = again;
    }
    const Bytes count = job.read(r, res.recv_count);
    int32_t used = 0;
    std::memcpy(&used, count.data(), 4);
    o["recv_count"] = count;
    o["recv_x"] = job.read(r, res.recv_x, uint64_t(used) * H * 2);
    if (m.layout == SY_LAYOUT_EXPANDED && !m.zero_padding) {
      // Padding rows hold no token and, unless zeroed on request, no defined payload: only the
      // rows the handle maps a (token, expert) pair to are compared.
      sy_tensor t = nullptr;
      SY(sy_handle_tensor(res.handle, SY_HANDLE_EXPANDED_ROW, &t), res.handle);
      const Bytes map = job.read(r, t);
      sy_tensor_destroy(t);
      std::vector<bool> real(size_t(used), false);
      for (size_t i = 0; i + 4 <= map.size(); i += 4) {
        int32_t row = -1;
        std::memcpy(&row, map.data() + i, 4);
        if (row >= 0 && row < used) real[size_t(row)] = true;
      }
      Bytes& x_rows = o["recv_x"];
      for (int32_t row = 0; row < used; ++row)
        if (!real[size_t(row)]) std::memset(x_rows.data() + size_t(row) * H * 2, 0, size_t(H) * 2);
    }
    // A cached dispatch moves the payload only: the routing outputs are the first dispatch's.
    if (m.layout == SY_LAYOUT_COMPACT) {
      o["recv_topk_idx"] = job.read(r, first.recv_topk_idx, uint64_t(used) * K * 8);
      o["recv_topk_weights"] = job.read(r, first.recv_topk_weights, uint64_t(used) * K * 4);
    } else {
      o["recv_topk_weights"] = job.read(r, first.recv_topk_weights, uint64_t(used) * 4);
    }
    for (int32_t kind : {SY_HANDLE_RANK_PREFIX_MATRIX, SY_HANDLE_RECV_SRC_IDX, SY_HANDLE_SEND_SLOT}) {
      sy_tensor t = nullptr;
      SY(sy_handle_tensor(res.handle, kind, &t), res.handle);
      o["handle" + std::to_string(kind)] = job.read(r, t);
      sy_tensor_destroy(t);
    }

    // Combine: expert outputs for every row, the weights (compact) and one bias.
    sy_tensor y = job.tensor(r, SY_DTYPE_BF16, {res.num_rows, H}, in.expert[size_t(r)].data(),
                             uint64_t(res.num_rows) * H * 2);
    sy_combine_args ca;
    std::memset(&ca, 0, sizeof ca);
    ca.struct_size = sizeof ca;
    ca.x = y;
    ca.handle = res.handle;
    ca.topk_weights = m.layout == SY_LAYOUT_COMPACT ? first.recv_topk_weights : nullptr;
    ca.bias0 = bias;
    ca.internode_reduction = uint32_t(m.reduction);
    ca.compute_stream = job.streams[size_t(r)];
    sy_combine_result cr;
    std::memset(&cr, 0, sizeof cr);
    cr.struct_size = sizeof cr;
    SY(sy_combine(job.buffers[size_t(r)], &ca, &cr), job.buffers[size_t(r)]);
    o["combined_x"] = job.read(r, cr.combined_x);
    if (cr.combined_topk_weights) o["combined_topk_weights"] = job.read(r, cr.combined_topk_weights);

    for (sy_tensor t : {cr.combined_x, cr.combined_topk_weights, y, x, idx, w, bias})
      if (t) sy_tensor_destroy(t);
    for (sy_dispatch_result* d : {&first, m.cached ? &again : nullptr}) {
      if (d == nullptr) continue;
      for (sy_tensor t : {d->recv_x, d->recv_x_scales, d->recv_topk_idx, d->recv_topk_weights, d->recv_count})
        if (t) sy_tensor_destroy(t);
      sy_handle_destroy(d->handle);
    }
  });
  return out;
}

// What the executor's watch saw on this thread during `call`: the waits (returned, so that the
// comparison with the host backend, which makes no CUDA calls, fails on any), and the polls
// (printed by rank 0 as a note).
Bytes watched(int rank, const char* call, bool note_polls) {
  char seen[1024];
  if (note_polls && sy_cuda_cpu_host_waits(1, seen, sizeof seen)) {
    std::printf("  note: %s polls events on the calling thread (%s): CUDA-graph capture in the default mode "
                "would refuse that\n", call, seen);
  }
  const size_t n = sy_cuda_cpu_host_waits(0, seen, sizeof seen);
  if (n) std::printf("  rank %d: %zu host waits in %s: %s\n", rank, n, call, seen);
  return Bytes(seen, seen + std::strlen(seen));
}

// Low-latency dispatch (`flags`: FP8 and its scale options) and combine (LogFMT-10 with
// `logfmt`), twice in a row so both halves of the double buffer and their acknowledgements run;
// returns each rank's outputs: the rows each local expert received, their scales and source
// tokens, the layout ranges, the counts and the combined tokens.
std::vector<Outputs> low_latency(int32_t backend, const Shape& s, const Inputs& in, uint32_t flags, bool logfmt) {
  Job job(backend, s, s.timeout_ms, true);
  std::vector<Outputs> out(size_t(s.ranks));
  const int T = s.tokens, H = s.hidden, K = s.topk, EL = s.experts / s.ranks;
  const int64_t N = int64_t(s.ranks) * T;
  each_rank(s.ranks, [&](int r) {
    Outputs& o = out[size_t(r)];
    sy_tensor x = job.tensor(r, SY_DTYPE_BF16, {T, H}, in.x[size_t(r)].data(), uint64_t(T) * H * 2);
    sy_tensor idx = job.tensor(r, SY_DTYPE_I64, {T, K}, in.topk[size_t(r)].data(), uint64_t(T) * K * 8);
    sy_tensor w = job.tensor(r, SY_DTYPE_F32, {T, K}, in.weights[size_t(r)].data(), uint64_t(T) * K * 4);
    // Expert outputs for every slot: the expert rows the normal-mode combine uses, cycled.
    std::vector<uint16_t> ys(size_t(EL) * size_t(N) * size_t(H));
    const std::vector<uint16_t>& pool = in.expert[size_t(r)];
    for (size_t i = 0; i < ys.size(); ++i) ys[i] = pool[(i * 7) % pool.size()];
    sy_tensor y = job.tensor(r, SY_DTYPE_BF16, {EL, N, H}, ys.data(), ys.size() * 2);
    for (int round = 0; round < 2; ++round) {
      const std::string at = std::to_string(round) + " ";
      // The second round's calls must not block the calling thread on the device nor allocate
      // outside the stream order, as CUDA-graph capture requires (the first call of a buffer may
      // wait once, for every rank's tables). Watched where the executor can tell; the event
      // polls it also sees are printed, not failed: capture in the default mode refuses them,
      // and the report and memory recycling still make them (README, low-latency mode).
      const bool watch = round == 1 && sy_cuda_cpu_watch_host_waits != nullptr;
      if (watch) sy_cuda_cpu_watch_host_waits(1);
      sy_ll_dispatch_args a;
      std::memset(&a, 0, sizeof a);
      a.struct_size = sizeof a;
      a.flags = flags;
      a.x = x;
      a.topk_idx = idx;
      a.compute_stream = job.streams[size_t(r)];
      sy_ll_dispatch_result d;
      std::memset(&d, 0, sizeof d);
      d.struct_size = sizeof d;
      SY(sy_ll_dispatch(job.buffers[size_t(r)], &a, &d), job.buffers[size_t(r)]);
      if (watch) sy_cuda_cpu_watch_host_waits(0);
      const Bytes count = job.read(r, d.recv_count);
      o[at + "recv_count"] = count;
      const Bytes xs = job.read(r, d.recv_x);
      const Bytes sc = d.recv_x_scales ? job.read(r, d.recv_x_scales) : Bytes();
      sy_tensor src = nullptr, range = nullptr;
      SY(sy_ll_handle_tensor(d.handle, SY_LL_HANDLE_SRC_INFO, &src), d.handle);
      SY(sy_ll_handle_tensor(d.handle, SY_LL_HANDLE_LAYOUT_RANGE, &range), d.handle);
      const Bytes srcs = job.read(r, src);
      o[at + "layout_range"] = job.read(r, range);
      const size_t row = xs.size() / size_t(EL * N), words = sc.size() / size_t(EL * N * 4);
      for (int l = 0; l < EL; ++l) {  // only the rows the counts cover are written
        int32_t c = 0;
        std::memcpy(&c, count.data() + 4 * l, 4);
        const size_t first = size_t(l) * size_t(N);
        o[at + "recv_x " + std::to_string(l)] = Bytes(xs.begin() + long(first * row), xs.begin() + long((first + c) * row));
        o[at + "src_info " + std::to_string(l)] =
            Bytes(srcs.begin() + long(first * 4), srcs.begin() + long((first + c) * 4));
        // The scales read densely are [EL, N, S]: row i of expert l is S words at (l * N + i) * S.
        o[at + "scales " + std::to_string(l)] =
            Bytes(sc.begin() + long(first * words * 4), sc.begin() + long((first + c) * words * 4));
      }
      sy_ll_combine_args ca;
      std::memset(&ca, 0, sizeof ca);
      ca.struct_size = sizeof ca;
      ca.flags = logfmt ? SY_LL_LOGFMT : 0;
      ca.x = y;
      ca.topk_idx = idx;
      ca.topk_weights = w;
      ca.handle = d.handle;
      ca.compute_stream = job.streams[size_t(r)];
      sy_ll_combine_result cr;
      std::memset(&cr, 0, sizeof cr);
      cr.struct_size = sizeof cr;
      if (watch) {
        // The watch restarts below (reading the outputs above waits, as it may outside a graph),
        // so what the dispatch saw is taken first.
        o["host waits in sy_ll_dispatch"] = watched(r, "sy_ll_dispatch", round == 1 && r == 0);
        sy_cuda_cpu_watch_host_waits(1);
      }
      SY(sy_ll_combine(job.buffers[size_t(r)], &ca, &cr), job.buffers[size_t(r)]);
      if (watch) {
        sy_cuda_cpu_watch_host_waits(0);
        o["host waits in sy_ll_combine"] = watched(r, "sy_ll_combine", round == 1 && r == 0);
      }
      o[at + "combined_x"] = job.read(r, cr.combined_x);
      for (sy_tensor t : {cr.combined_x, d.recv_x, d.recv_x_scales, d.recv_count, src, range})
        if (t) sy_tensor_destroy(t);
      sy_ll_handle_destroy(d.handle);
    }
    for (sy_tensor t : {x, idx, w, y}) sy_tensor_destroy(t);
  });
  return out;
}

std::vector<Outputs> layout(int32_t backend, const Shape& s, const Inputs& in) {
  // Nodes of two ranks where the ranks pair up, so that the per-node counts have work to do.
  sy::driver::LocalGroupSpec spec{backend, s.ranks, s.timeout_ms, s.hidden, s.tokens};
  spec.ranks_per_node = s.ranks % 2 == 0 ? 2 : 1;
  sy::driver::LocalGroup job(spec);
  std::vector<Outputs> out(size_t(s.ranks));
  each_rank(s.ranks, [&](int r) {
    sy_tensor idx = job.tensor(r, SY_DTYPE_I64, {s.tokens, s.topk}, in.topk[size_t(r)].data(),
                               uint64_t(s.tokens) * s.topk * 8);
    sy_layout_args a;
    std::memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.num_experts = s.experts;
    a.topk_idx = idx;
    a.compute_stream = job.streams[size_t(r)];
    sy_layout_result l;
    std::memset(&l, 0, sizeof l);
    l.struct_size = sizeof l;
    SY(sy_layout(job.buffers[size_t(r)], &a, &l), job.buffers[size_t(r)]);
    out[size_t(r)]["per_rank"] = job.read(r, l.num_tokens_per_rank);
    out[size_t(r)]["per_expert"] = job.read(r, l.num_tokens_per_expert);
    out[size_t(r)]["in_rank"] = job.read(r, l.is_token_in_rank);
    out[size_t(r)]["per_node"] = job.read(r, l.num_tokens_per_node);
    out[size_t(r)]["in_node"] = job.read(r, l.is_token_in_node);
    for (sy_tensor t : {l.num_tokens_per_rank, l.num_tokens_per_expert, l.is_token_in_rank, l.num_tokens_per_node,
                        l.is_token_in_node, idx}) {
      sy_tensor_destroy(t);
    }
  });
  return out;
}

// Rank 1 never calls: rank 0's dispatch must fail with a timeout naming rank 1, and the CUDA
// context must keep working (the next group's dispatch runs).
bool timeout_names_the_missing_rank(const Shape& s) {
  Shape two = s;
  two.ranks = 2;
  Job job(SY_BACKEND_CUDA, two, 300);
  const Inputs in = generate(two);
  sy_tensor x = job.tensor(0, SY_DTYPE_BF16, {two.tokens, two.hidden}, in.x[0].data(), uint64_t(two.tokens) * two.hidden * 2);
  sy_tensor idx = job.tensor(0, SY_DTYPE_I64, {two.tokens, two.topk}, in.topk[0].data(), uint64_t(two.tokens) * two.topk * 8);
  sy_tensor w = job.tensor(0, SY_DTYPE_F32, {two.tokens, two.topk}, in.weights[0].data(), uint64_t(two.tokens) * two.topk * 4);
  sy_dispatch_args a;
  std::memset(&a, 0, sizeof a);
  a.struct_size = sizeof a;
  a.num_experts = two.experts;
  a.x = x;
  a.topk_idx = idx;
  a.topk_weights = w;
  a.compute_stream = job.streams[0];
  sy_dispatch_result res;
  std::memset(&res, 0, sizeof res);
  res.struct_size = sizeof res;
  const sy_status st = sy_dispatch(job.buffers[0], &a, &res);
  sy_error_info info;
  std::memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  sy_last_error(job.buffers[0], &info);
  for (sy_tensor t : {x, idx, w}) sy_tensor_destroy(t);
  const bool ok = st == SY_ERROR_TIMEOUT && info.peer_rank == 1;
  std::printf("  timeout: %s (peer %d): %s\n", sy_status_name(st), info.peer_rank, info.message);
  return ok;
}

int compare(const char* scenario, const std::vector<Outputs>& host, const std::vector<Outputs>& cuda) {
  int bad = 0;
  for (size_t r = 0; r < host.size(); ++r) {
    for (const auto& [name, want] : host[r]) {
      auto it = cuda[r].find(name);
      if (it == cuda[r].end()) {
        std::printf("  %s, rank %zu: %s missing on the CUDA backend\n", scenario, r, name.c_str());
        ++bad;
        continue;
      }
      const Bytes& got = it->second;
      if (got == want) continue;
      size_t at = 0;
      while (at < got.size() && at < want.size() && got[at] == want[at]) ++at;
      std::printf("  %s, rank %zu: %s differs at byte %zu of %zu (cuda %zu bytes)\n", scenario, r, name.c_str(), at,
                  want.size(), got.size());
      ++bad;
    }
  }
  std::printf("%s: %s\n", scenario, bad ? "MISMATCH" : "agrees with the host backend");
  return bad;
}

Shape parse(int argc, char** argv) {
  Shape s;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const int v = std::atoi(argv[i + 1]);
    if (k == "--ranks") s.ranks = v;
    else if (k == "--tokens") s.tokens = v;
    else if (k == "--hidden") s.hidden = v;
    else if (k == "--experts") s.experts = v;
    else if (k == "--topk") s.topk = v;
    else if (k == "--timeout-ms") s.timeout_ms = v;
    else die("unknown option " + k + " (--ranks --tokens --hidden --experts --topk --timeout-ms)");
  }
  if (s.ranks < 2 || s.experts % s.ranks != 0 || s.topk > s.experts || s.hidden % 8 != 0) die("inconsistent shape");
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  sy::driver::program_name() = "kernel_families";
  const Shape s = parse(argc, argv);
  const sy_backend_info info = sy::driver::cuda_backend();
  std::printf("kernel_families on %s: %d ranks, %d tokens, hidden %d, top-%d of %d experts\n", info.device_name, s.ranks,
              s.tokens, s.hidden, s.topk, s.experts);
  const Inputs in = generate(s);
  int bad = compare("layout", layout(SY_BACKEND_HOST, s, in), layout(SY_BACKEND_CUDA, s, in));
  const Mode modes[] = {
      {"dispatch compact (exact size) + combine"},
      {"dispatch expanded (alignment 4, zero padding) + combine", SY_LAYOUT_EXPANDED, 4, false, false, true},
      {"dispatch compact, worst case + combine", SY_LAYOUT_COMPACT, 1, true},
      {"dispatch expanded, worst case + combine", SY_LAYOUT_EXPANDED, 2, true},
      {"dispatch compact, cached + combine", SY_LAYOUT_COMPACT, 1, false, true},
      {"dispatch expanded, cached + combine", SY_LAYOUT_EXPANDED, 1, false, true},
  };
  for (const Mode& m : modes) {
    bad += compare(m.name, dispatch_and_combine(SY_BACKEND_HOST, s, in, m), dispatch_and_combine(SY_BACKEND_CUDA, s, in, m));
  }
  // Across virtual nodes: two nodes where the ranks split evenly, else nodes of one rank.
  const int32_t per_node = s.ranks % 2 == 0 ? s.ranks / 2 : 1;
  const Mode across[] = {
      {"dispatch compact (exact size) + combine, across nodes (two hops)", SY_LAYOUT_COMPACT, 1, false, false,
       false, per_node},
      {"dispatch expanded, cached + combine, across nodes (two hops)", SY_LAYOUT_EXPANDED, 2, false, true, true,
       per_node},
      {"dispatch compact, worst case + hierarchical combine, across nodes (two hops)", SY_LAYOUT_COMPACT, 1, true,
       false, false, per_node, SY_INTERNODE_HIERARCHICAL},
  };
  for (const Mode& m : across) {
    bad += compare(m.name, dispatch_and_combine(SY_BACKEND_HOST, s, in, m), dispatch_and_combine(SY_BACKEND_CUDA, s, in, m));
  }
  {
    // The host backend's forwarding between threads (nodes of two ranks), against its own one-hop
    // dispatch: on four ranks whatever the shape's count (the CPU executor's fibers stay out of it,
    // so that a ThreadSanitizer run of three ranks can afford a fourth).
    Shape four = s;
    four.ranks = 4;
    four.experts = (s.experts + 3) / 4 * 4;
    const Inputs in4 = generate(four);
    const Mode one_node{"one node"};
    Mode two_nodes{"two nodes"};
    two_nodes.ranks_per_node = 2;
    bad += compare("dispatch compact (exact size) + combine, host: 2 nodes of 2 (two hops) against one node",
                   dispatch_and_combine(SY_BACKEND_HOST, four, in4, one_node),
                   dispatch_and_combine(SY_BACKEND_HOST, four, in4, two_nodes));
  }
  if (s.hidden % 128 == 0) {  // the low-latency mode's FP8 scales cover 128 channels each
    bad += compare("low-latency FP8 (UE8M0) dispatch + LogFMT-10 combine, both halves",
                   low_latency(SY_BACKEND_HOST, s, in, SY_LL_FP8 | SY_LL_ROUND_SCALE | SY_LL_UE8M0, true),
                   low_latency(SY_BACKEND_CUDA, s, in, SY_LL_FP8 | SY_LL_ROUND_SCALE | SY_LL_UE8M0, true));
    bad += compare("low-latency BF16 dispatch + BF16 combine, both halves", low_latency(SY_BACKEND_HOST, s, in, 0, false),
                   low_latency(SY_BACKEND_CUDA, s, in, 0, false));
  }
  const bool timed_out = timeout_names_the_missing_rank(s);
  std::printf("missing rank: %s\n", timed_out ? "times out naming it" : "WRONG");
  bad += compare("after the timeout, a new group", layout(SY_BACKEND_HOST, s, in), layout(SY_BACKEND_CUDA, s, in));
  if (!timed_out) ++bad;
  std::printf("%s\n", bad ? "kernel_families: FAILED" : "kernel_families: every scenario agrees");
  return bad ? 1 : 0;
}
