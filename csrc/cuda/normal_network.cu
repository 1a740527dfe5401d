// The two hops of dispatch across nodes on the CUDA backend (core/internode.h has the protocol,
// transport/rdma.h the network): after the exchange, each rank puts one network record per
// (token, other node it goes to) into the ring its column peer on that node keeps for its node,
// through its proxy; each forwarder takes the records from its rings as they land and copies
// each into the relay region of every rank of its node the record is for (normal_kernels.h,
// SharedLayout); once every forwarder of a node has delivered, its ranks read the records of
// other nodes' sources from their relay regions as they read their own node's sources' inputs.
//
// One block per rank, a warp per role, so that the roles never wait for each other's launch:
//   warp m            sends to node m's column peer (m != own node): for each of its tokens
//                     bound there, in token order, it waits for room in that peer's ring (the
//                     peer's credit signal), stages the network record in its own out ring
//                     (the NIC reads it from this rank's window), in runs: it waits for room for a
//                     whole run (up to put_run_limit records, never past the ring's end, so that a
//                     put is contiguous in both rings), stages the run and puts it as one put
//                     with a records signal that grows by its length (DeepEP's chunked sends).
//                     One put per record would cost a proxy descriptor and a copy each; room for
//                     one record at a time would shrink the runs to one whenever the receiver
//                     is the slower.
//   warp nodes + m    forwards for node m's column source: it learns from the source's exchange
//                     page how many records come, and for each waits for the records signal and
//                     copies the record to the ranks of this node its slots name. It credits the
//                     source for what it took in runs, one signal for up to put_run_limit
//                     records (a credit per record would cost a proxy descriptor, a NIC message,
//                     each), and at once before it waits for a record that has not landed. So it
//                     never waits while it owes credit, and the source's wait for room always
//                     ends; holding back up to a run only delays the source while landed records
//                     are still being forwarded.
// Then the block tells the ranks of its node that its forwarding is done and waits for their
// forwarders. Every wait has the operation's deadline and names the peer and the hop.
//
// The forwarders also write what the combine of the same handle needs into the handle
// (ForwardTable): per source node, the tokens they forwarded, in order, with their slots here and
// their way; the warp of the own node writes this rank's own tokens that visit it.
//
// The counts go directly, as the host backend's do (core/internode.h): a forwarder reads how many
// records come from the source's exchange page, written before the barrier. Only the records
// cross the network.
//
// The rings' counters (records put, taken, credited) are signals, which only grow: each rank
// keeps how far it got across operations (NetworkArgs::sent, taken). A failure in the middle of
// the network hop leaves them out of step with the peers', so the buffer is given up: every later
// two-hop dispatch fails at once, saying so. A rejected call never gets here (it fails at the
// barrier, before anything is put), so the buffers stay usable after one.
#include <cstdint>

#include "../core/internode.h"
#include "../core/routing.h"
#include "network_state.cuh"
#include "normal_kernels.h"
#include "row_copy.cuh"

namespace sy::cuda {

namespace {

constexpr auto kHop = core::WaitRole::DispatchNetwork;

__device__ __forceinline__ int32_t* exchange_page_i32(const DispatchArgs& a, int owner, uint64_t off) {
  return reinterpret_cast<int32_t*>(a.xchg[owner] + off);
}

// Copies `bytes` (a multiple of 16, 16-byte aligned) with L2 loads: the source was written by the
// NIC, and a ring slot is read again on the next lap (a cached line could be stale). Warp-wide.
__device__ __forceinline__ void warp_copy_landed(const uint8_t* src, uint8_t* dst, int64_t bytes, int lane) {
  const auto* s = reinterpret_cast<const int4*>(src);
  auto* d = reinterpret_cast<int4*>(dst);
  for (int64_t i = lane; i < bytes / 16; i += 32) d[i] = __ldcg(s + i);
}

// Lane 0 polls `ready()` until it holds, the block failed, a peer aborted, or the deadline
// passed (then the failure is recorded naming `peer` in `role`); every lane gets the verdict.
template <class Ready, class Observed>
__device__ bool warp_wait(const DispatchArgs& a, NetState& st, int lane, int peer, core::WaitRole role,
                          int64_t expected, Ready ready, Observed observed) {
  int ok = 1;
  if (lane == 0) {
    const uint64_t start = global_ns();
    for (uint32_t spins = 0; !ready(); ++spins) {
      if (net_stopped(a.sync, st, spins, role, a.net.channels, 2 * a.net.nodes)) {
        ok = 0;
        break;
      }
      if ((spins & 63u) != 63u) continue;
      if (const uint64_t waited = global_ns() - start; waited > a.sync.timeout_ns) {
        net_timed_out(a.sync, st, late_network_hop(a.net, kHop), peer, role, expected, observed(), waited);
        ok = 0;
        break;
      }
      __nanosleep(256);
    }
  }
  return __shfl_sync(0xffffffffu, ok, 0) != 0;
}

// Warp `m`: this rank's tokens bound for node m, one network record each, in token order.
__device__ void send_to_node(const DispatchArgs& a, NetState& st, int m, int lane) {
  const NetworkArgs& n = a.net;
  const int R = a.sync.ranks, me = a.sync.rank, P = n.ranks_per_node;
  const int my_node = core::node_of(me, P);
  const int column = core::forwarder(m, me, P);
  const transport::NetChannel& ch = n.channels[m];
  const Published& p = a.pub;
  const uint64_t entries = uint64_t(n.entries);
  uint64_t sent = n.sent_to(m, core::kPassOn);
  uint64_t credit_seen = sent > entries ? sent - entries : 0;  // lane 0's
  const uint64_t batch = put_run_limit(entries);
  // The records that go there (this rank's count, written before the barrier; the forwarder reads
  // the same), so that a run never waits for room it will not fill.
  const int32_t counted = exchange_page_i32(a, me, a.xl.off_node_send)[m];
  const uint64_t total = counted > 0 ? uint64_t(counted) : 0;
  const uint64_t first = sent;
  uint64_t posted = sent;  // records [posted, sent) are staged and not put yet
  uint64_t run_left = 0;   // records the current run still takes (room for them is there)
  // Puts the staged records, warp-wide (lane 0 posts); false if the put failed (recorded).
  const auto put_staged = [&]() -> bool {
    transport::TransportStatus put;
    if (lane == 0 && sent > posted) {
      const uint64_t k = sent - posted;
      put = transport::put_signal(ch, column, n.ring_record(n.off_net_out, m, posted),
                                  n.ring_record(n.off_net_in, my_node, posted), k * uint64_t(n.net_record_bytes),
                                  signal_landed(core::kPassOn), k);
      if (!put.ok()) transport_failed(a.sync, st, kHop, column, put, n.channels, 2 * n.nodes);
    }
    posted = sent;
    return __shfl_sync(0xffffffffu, int(put.ok()), 0) != 0;
  };
  bool failed = false;
  for (int64_t t = 0; t < a.tokens; ++t) {
    bool to_node = false;
    for (int q = 0; q < P && !to_node; ++q) to_node = a.h_route[t * R + m * P + q] != 0;
    if (!to_node) continue;
    if (run_left == 0) {
      // A new run of b records: entry sent + b - 1 goes where entry sent + b - 1 - entries was, so
      // the column peer must have taken that one. Nothing is staged now (the last run was put), so
      // whatever the peer waits for to make room is on its way.
      const uint64_t left = total > sent - first ? total - (sent - first) : 1;
      const uint64_t to_end = entries - sent % entries;  // a run never wraps
      uint64_t b = batch < left ? batch : left;
      b = b < to_end ? b : to_end;
      const uint64_t need = sent + b > entries ? sent + b - entries : 0;
      // (Signals only grow: the last value seen answers first; on a GPU a read crosses PCIe.)
      const auto credit = [&] {
        return credit_seen = transport::read_signal(ch, column, signal_credit(core::kPassOn));
      };
      const auto room = [&] {
        return transport::signal_reached(credit_seen, need) || transport::signal_reached(credit(), need);
      };
      if (!warp_wait(a, st, lane, column, kHop, int64_t(need), room, [&] { return int64_t(credit()); })) {
        failed = true;
        break;
      }
      run_left = b;
    }
    uint8_t* rec = n.net_base + n.ring_record(n.off_net_out, m, sent);
    warp_copy_row(p.x + t * p.x_stride, [&](int) { return rec + n.rec_payload; }, 1, a.payload_bytes, lane);
    for (int s = lane; s < a.num_scales; s += 32) {
      reinterpret_cast<uint32_t*>(rec + n.rec_scales)[s] =
          *reinterpret_cast<const uint32_t*>(p.scales + t * p.scale_st + s * p.scale_ss);
    }
    for (int k = lane; k < a.topk; k += 32) {
      const int64_t e = p.idx_i64 ? *reinterpret_cast<const int64_t*>(p.topk_idx + t * p.idx_st + k * p.idx_sk)
                                  : *reinterpret_cast<const int32_t*>(p.topk_idx + t * p.idx_st + k * p.idx_sk);
      reinterpret_cast<int32_t*>(rec + n.rec_topk_idx)[k] = int32_t(e);
      if (p.topk_w != nullptr) {
        reinterpret_cast<float*>(rec + n.rec_topk_weights)[k] =
            *reinterpret_cast<const float*>(p.topk_w + t * p.w_st + k * p.w_sk);
      }
    }
    for (int q = lane; q < P; q += 32) reinterpret_cast<int32_t*>(rec + n.net_slots)[q] = a.h_slot[t * R + m * P + q];
    if (lane == 0) {
      *reinterpret_cast<int32_t*>(rec + n.rec_src_idx) = int32_t(t);
      const core::TokenNodes visits{a.h_slot + t * R, P, n.nodes};
      *reinterpret_cast<int32_t*>(rec + n.net_chain_next) = visits.next(m);
      *reinterpret_cast<int32_t*>(rec + n.net_chain_prev) = visits.prev(m);
    }
    __syncwarp();
    ++sent;
    if (--run_left == 0 && !put_staged()) {  // the run is staged: put it
      failed = true;
      break;
    }
  }
  if (!failed) (void)put_staged();
  if (lane == 0) n.sent_to(m, core::kPassOn) = sent;  // after a failure the buffer is given up
}

// Warp nodes + m: the records of node m's column source, each to the ranks of this node it
// names, credited in runs.
__device__ void forward_from_node(const DispatchArgs& a, NetState& st, int m, int lane) {
  const NetworkArgs& n = a.net;
  const int me = a.sync.rank, P = n.ranks_per_node;
  const int my_node = core::node_of(me, P);
  const int source = core::forwarder(m, me, P);
  const transport::NetChannel& ch = n.channels[n.nodes + m];
  // How many come: from the source's exchange page, bounded (it comes from another rank).
  const int32_t count = exchange_page_i32(a, source, a.xl.off_node_send)[my_node];
  if (count < 0 || count > a.max_tokens) {
    if (lane == 0) peer_value_wrong(a.sync, st, kHop, -6, source, a.max_tokens, count);
    return;
  }
  const int relay = relay_index(source, my_node, P);
  uint64_t taken = n.taken_from(m, core::kPassOn);
  uint64_t landed_seen = taken;  // lane 0's
  int32_t last_token = -1;
  if (a.fwd.base != nullptr && lane == 0) a.fwd.count()[m] = 0;
  // Records delivered to each rank q of the node: lane q % 32 counts q (nodes of up to 64 ranks).
  int32_t delivered[2] = {0, 0};
  const uint64_t run = put_run_limit(uint64_t(n.entries));
  uint64_t owed = 0;  // records taken and not credited yet (every lane keeps it)
  // Credits the source for them in one signal; false if that failed (recorded).
  const auto pay = [&]() -> bool {
    transport::TransportStatus credit;
    if (lane == 0 && owed > 0) {
      credit = transport::signal(ch, source, signal_credit(core::kPassOn), owed);
      if (!credit.ok()) transport_failed(a.sync, st, kHop, source, credit, n.channels, 2 * n.nodes);
    }
    owed = 0;
    return __shfl_sync(0xffffffffu, int(credit.ok()), 0) != 0;
  };
  bool failed = false;
  for (int32_t k = 0; k < count; ++k) {
    const auto landed = [&] { return landed_seen = transport::read_signal(ch, source, signal_landed(core::kPassOn)); };
    // Nothing owed while this warp waits: if the record is not there yet, credit first.
    if (owed > 0) {
      const int there = lane == 0 && (transport::signal_reached(landed_seen, taken + 1) ||
                                       transport::signal_reached(landed(), taken + 1));
      if (__shfl_sync(0xffffffffu, there, 0) == 0 && !pay()) {
        failed = true;
        break;
      }
    }
    if (!warp_wait(a, st, lane, source, kHop, int64_t(taken + 1),
                   [&] {
                     return transport::signal_reached(landed_seen, taken + 1) ||
                            transport::signal_reached(landed(), taken + 1);
                   },
                   [&] { return int64_t(landed()); })) {
      failed = true;
      break;
    }
    __syncwarp();
    const uint8_t* rec = n.net_base + n.ring_record(n.off_net_in, m, taken);
    // The token and its way, for the combine of this handle: in token order, within the nodes.
    int32_t token = 0, prev = 0, next = 0;
    if (lane == 0) {
      token = ld_volatile(reinterpret_cast<const int32_t*>(rec + n.rec_src_idx));
      prev = ld_volatile(reinterpret_cast<const int32_t*>(rec + n.net_chain_prev));
      next = ld_volatile(reinterpret_cast<const int32_t*>(rec + n.net_chain_next));
    }
    token = __shfl_sync(0xffffffffu, token, 0);
    prev = __shfl_sync(0xffffffffu, prev, 0);
    next = __shfl_sync(0xffffffffu, next, 0);
    if (token <= last_token || token >= a.max_tokens || prev < -1 || prev >= my_node ||
        (next != -1 && (next <= my_node || next >= n.nodes))) {
      if (lane == 0) peer_value_wrong(a.sync, st, kHop, -9, source, last_token, token, prev, next);
      failed = true;
      break;
    }
    last_token = token;
    int32_t* table = a.fwd.base != nullptr ? a.fwd.entry(m, token) : nullptr;
    if (table != nullptr && lane == 0) {
      a.fwd.list(m)[k] = token;
      table[ForwardTable::kIndex] = k;
      table[ForwardTable::kPrev] = prev;
      table[ForwardTable::kNext] = next;
      table[ForwardTable::kDone] = 0;
    }
    bool bad = false;
    for (int q = 0; q < P; ++q) {
      // Lane 0 reads the slot and every lane acts on its answer (one verdict per warp).
      int32_t slot = 0;
      if (lane == 0) slot = ld_volatile(reinterpret_cast<const int32_t*>(rec + n.net_slots) + q);
      slot = __shfl_sync(0xffffffffu, slot, 0);
      if (table != nullptr && lane == 0) table[ForwardTable::kSlots + q] = slot < 0 ? -1 : slot;
      if (slot < 0) continue;
      if (slot >= a.max_tokens) {  // a slot past the relay region: refused, whoever sent it
        bad = true;
        if (lane == 0) peer_value_wrong(a.sync, st, kHop, -5, source, a.max_tokens, slot);
        break;
      }
      if (lane == q % 32) delivered[q / 32] += 1;
      uint8_t* dst = a.sync.bases[my_node * P + q] + n.off_relay +
                     (uint64_t(relay) * uint64_t(a.max_tokens) + uint64_t(slot)) * uint64_t(n.record_bytes);
      warp_copy_landed(rec, dst, n.record_bytes, lane);
    }
    if (bad) {
      failed = true;
      break;
    }
    __syncwarp();  // every lane's copy of this entry before a credit frees its slot
    ++taken;
    ++owed;
    if (a.fwd.base != nullptr && lane == 0) a.fwd.count()[m] = k + 1;
    if (owed >= run && !pay()) {
      failed = true;
      break;
    }
  }
  if (!failed) (void)pay();  // the rest (after a failure the buffer is given up)
  if (lane == 0) n.taken_from(m, core::kPassOn) = taken;
  // What each rank of the node received from this source through this forwarder (it checks the
  // count against what the source announced, once the forward flag is up).
  for (int q = lane; q < P; q += 32) {
    *reinterpret_cast<int32_t*>(header_word(a.sync, my_node * P + q, n.off_forwarded + 4ull * uint64_t(source))) =
        delivered[q / 32];
  }
}

// Warp `own node`: this rank's own tokens that visit its node, in the forwarding table (the
// combine passes them on from here or keeps them), and no result stored yet.
__device__ void own_forward_entries(const DispatchArgs& a, int lane) {
  const ForwardTable& f = a.fwd;
  const int R = a.sync.ranks, P = a.net.ranks_per_node, my_node = core::node_of(a.sync.rank, P);
  int32_t count = 0;
  for (int64_t t0 = 0; t0 < a.tokens; t0 += 32) {
    const int64_t t = t0 + lane;
    const core::TokenNodes visits{a.h_slot + t * R, P, a.net.nodes};
    const bool here = t < a.tokens && visits.at(my_node);
    const unsigned mask = __ballot_sync(0xffffffffu, here);
    if (here) {
      const int32_t k = count + __popc(mask & ((1u << lane) - 1u));
      int32_t* e = f.entry(my_node, t);
      f.list(my_node)[k] = int32_t(t);
      e[ForwardTable::kIndex] = k;
      e[ForwardTable::kPrev] = visits.prev(my_node);
      e[ForwardTable::kNext] = visits.next(my_node);
      e[ForwardTable::kDone] = 0;
      for (int q = 0; q < P; ++q) e[ForwardTable::kSlots + q] = a.h_slot[t * R + my_node * P + q];
    }
    count += __popc(mask);
  }
  for (int64_t t = lane; t < f.tokens; t += 32) f.stored()[t] = 0;
  if (lane == 0) f.count()[my_node] = count;
}

__global__ void __launch_bounds__(kSyncThreads) dispatch_network_kernel(DispatchArgs a) {
  SY_SHARED(NetState, st);
  SY_SHARED(int, go);
  const NetworkArgs& n = a.net;
  const int me = a.sync.rank, P = n.ranks_per_node;
  const int my_node = core::node_of(me, P);
  if (threadIdx.x == 0) {
    net_begin(st, kHop);
    // Only an operation past its barrier puts anything (a rejected one stops there, everywhere).
    go = *a.ws.passed_barrier == 1 ? 1 : 0;
    if (go && *n.broken != 0) peer_value_wrong(a.sync, st, kHop, -3, -1, 0, 0);
  }
  __syncthreads();
  if (!go) return;
  net_announce(a.sync, n.off_started);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  if (ld_volatile(&st.failed) == 0) {
    if (warp == my_node) {
      if (a.fwd.base != nullptr) own_forward_entries(a, lane);
    } else if (warp < n.nodes) {
      send_to_node(a, st, warp, lane);
    } else if (warp >= n.nodes && warp < 2 * n.nodes && warp - n.nodes != my_node) {
      forward_from_node(a, st, warp - n.nodes, lane);
    }
  }
  __syncthreads();
  if (ld_volatile(&st.failed) == 0) {
    // Delivered: the relay writes before the flags, for every rank of the node.
    for (int q = threadIdx.x; q < P; q += blockDim.x) {
      __threadfence_system();
      st_release_sys(header_word(a.sync, my_node * P + q, n.off_forward_epoch + 4ull * uint64_t(me)), a.sync.epoch);
    }
    // Wait for the node's forwarders (each thread one), with the deadline.
    const uint64_t start = global_ns();
    for (int q = threadIdx.x; q < P; q += blockDim.x) {
      const int f = my_node * P + q;
      const uint32_t* flag = header_word(a.sync, me, n.off_forward_epoch + 4ull * uint64_t(f));
      for (uint32_t spins = 0;; ++spins) {
        const uint32_t v = ld_acquire_sys(flag);
        if (epoch_reached(v, a.sync.epoch) || net_stopped(a.sync, st, spins, kHop, n.channels, 2 * n.nodes)) break;
        if ((spins & 63u) != 63u) continue;
        if (const uint64_t waited = global_ns() - start; waited > a.sync.timeout_ns) {
          net_timed_out(a.sync, st, late_network_hop(n, kHop), f, core::WaitRole::DispatchForward, a.sync.epoch, v,
                        waited);
          break;
        }
        __nanosleep(256);
      }
    }
  }
  __syncthreads();
  if (ld_volatile(&st.failed) == 0) {
    // Every source of another node: its forwarder here delivered what it announced for this rank.
    for (int s = threadIdx.x; s < a.sync.ranks; s += blockDim.x) {
      if (core::node_of(s, P) == my_node) continue;
      const int32_t got =
          ld_volatile(reinterpret_cast<const int32_t*>(header_word(a.sync, me, n.off_forwarded + 4ull * uint64_t(s))));
      if (got != a.ws.recv_cnt[s]) {
        peer_value_wrong(a.sync, st, kHop, -7, core::forwarder(my_node, s, P), a.ws.recv_cnt[s], got);
      }
    }
  }
  net_end(a.sync, st, n.broken);
}

}  // namespace

cudaError_t launch_dispatch_network(const DispatchArgs& a, cudaStream_t stream) {
  SY_LAUNCH(dispatch_network_kernel, 1, kSyncThreads, 0, stream)(a);
  return cudaGetLastError();
}

}  // namespace sy::cuda
