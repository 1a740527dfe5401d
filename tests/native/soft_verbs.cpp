// soft_verbs: a software RC NIC for tests, inside one process.
//
// A shared library exporting the subset of the libibverbs C API that the ibverbs NIC engine
// (csrc/cuda/transport/) uses, so that the engine runs, and fails, here the way it would on a
// real NIC. Tests load it by path (SWITCHYARD_IBVERBS_LIBRARY); the engine resolves each function
// with dlsym by its plain name and calls post_send, post_recv and poll_cq through the context's
// ops table, as the inline wrappers in verbs.h do. Several ranks of one process each open their
// own context on the one device, "soft_verbs0", and connect RC QPs to each other in loopback.
//
// What it checks, as a real NIC would (the failures surface where the real ones do: a return code
// from the call, or an error completion that moves the QP to ERR and flushes the rest):
//   * the QP state machine and the exact attribute masks of each transition (IB spec / kernel
//     table: missing or unexpected bits are EINVAL), and the attribute values: port 1, pkey 0,
//     an address vector that names this port (dlid 1, or a GRH with our GID), path MTU <= 4096;
//   * posting: only in RTS (ERR flushes), RDMA WRITE and WRITE_WITH_IMM only, the SGE and depth
//     limits; a send WR keeps its slot until a signaled completion at or after it is polled, a
//     receive WR until its own completion is polled (ENOMEM beyond the depth);
//   * memory: every local SGE inside an MR of the QP's PD with that lkey, at execution
//     (IBV_WC_LOC_PROT_ERR); the remote range inside an MR of the target's PD with that rkey and
//     IBV_ACCESS_REMOTE_WRITE, and the target QP allowing remote writes (IBV_WC_REM_ACCESS_ERR);
//     lkeys and rkeys are disjoint sets, so swapping them fails;
//   * connection: the target QP exists, is in RTR/RTS, is connected back to the sender, expects
//     the sender's PSN and accepts its MTU, else the packet is retransmitted until the transport
//     timeout (IBV_WC_RETRY_EXC_ERR); a WRITE_WITH_IMM with no receive posted is retried after the
//     receiver's RNR timer, rnr_retry times (7: forever), then IBV_WC_RNR_RETRY_EXC_ERR;
//   * completion queues: more unpolled completions than cqe is an overflow, after which poll_cq
//     returns -1; destroying a CQ, PD or context still in use is EBUSY.
// Execution is asynchronous, on one NIC thread, in order per QP. For tests,
// soft_verbs_set_delay_us(N) delays every WR posted after it by N us, soft_verbs_fail_next(status)
// fails the next WR that reaches its destination; SOFT_VERBS_JITTER_US=N delays
// each WR by a pseudo-random 0..N us so that QPs interleave differently from run to run.
//
// What it does not model: a network (there is none: bytes move with memmove under the lock),
// other processes, sends/reads/atomics, UD/UC/XRC, SRQs, completion channels and async events,
// memory windows, alternate paths, and the partial placement of a failed write.

#include <infiniband/verbs.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

// verbs.h wraps these in inline functions and macros; the library itself exports the plain names.
// (A caller compiled against verbs.h whose ibv_reg_mr access flags are not a compile-time constant
// reaches ibv_reg_mr_iova2, which this library does not export; dlsym("ibv_reg_mr") is unaffected.)
#undef ibv_get_device_list
#undef ibv_query_port
#undef ibv_reg_mr
#undef ibv_reg_mr_iova

#define SOFT_VERBS_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using Clock = std::chrono::steady_clock;
using Nanos = std::chrono::nanoseconds;

constexpr uint8_t kPort = 1;
constexpr uint16_t kLid = 1;
constexpr ibv_mtu kActiveMtu = IBV_MTU_4096;
constexpr uint32_t kMaxWr = 32768, kMaxSge = 30, kMaxInline = 256, kMaxRdAtomic = 16;
constexpr int kMaxCqe = 1 << 22;
constexpr uint32_t kPsnMask = 0xFFFFFF;
// While a packet goes undelivered it is re-tried at least this often, so that a peer reaching
// RTR late is found quickly; the transport timeout still decides when the sender gives up.
constexpr Nanos kRetryPoll = std::chrono::microseconds(50);

// RNR NAK timer values of the IB spec (table 45), in units of 10 us; code 0 is the longest.
constexpr uint32_t kRnrTimer10us[32] = {65536, 1,    2,    3,    4,    6,     8,     12,
                                        16,    24,   32,   48,   64,   96,    128,   192,
                                        256,   384,  512,  768,  1024, 1536,  2048,  3072,
                                        4096,  6144, 8192, 12288, 16384, 24576, 32768, 49152};

ibv_gid port_gid() {  // fe80::25e:ffff:fe00:1, link-local, fixed so peers can compare it
  ibv_gid gid{};
  const uint8_t raw[16] = {0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x02, 0x5e, 0xff, 0xfe, 0, 0, 0, 1};
  std::memcpy(gid.raw, raw, sizeof raw);
  return gid;
}

ibv_device g_device = [] {
  ibv_device d{};
  d.node_type = IBV_NODE_CA;
  d.transport_type = IBV_TRANSPORT_IB;
  std::snprintf(d.name, sizeof d.name, "soft_verbs0");
  std::snprintf(d.dev_name, sizeof d.dev_name, "uverbs0");
  return d;
}();

// ---- Objects. Each embeds the ibv_* struct handed to the caller as its first member. ----

struct Context { ibv_context ctx; int users = 0; };  // users: PDs and CQs
struct Pd { ibv_pd pd; int users = 0; };              // users: MRs and QPs
struct Mr { ibv_mr mr; int access; };

// A completion as queued: the work completion plus what polling it releases on its QP.
struct Cqe {
  ibv_wc wc;
  uint32_t qp_generation;    // the QP incarnation (it changes at RESET) the slots belong to
  uint64_t send_slots_upto;  // send completion: slots [0, this) are released once polled
  bool recv;                 // receive completion: releases one receive slot
};

struct Cq {
  ibv_cq cq;
  size_t capacity;
  std::deque<Cqe> entries;
  // entries.size(), or 1 once overflowed: read without the lock so that pollers spinning on an
  // empty CQ do not contend with the NIC thread.
  std::atomic<size_t> pollable{0};
  bool overflowed = false;
  int users = 0;  // QPs using it (a QP using it twice counts twice)
};

struct SendWr {
  uint64_t wr_id, seq;
  ibv_wr_opcode opcode;
  bool signaled;
  uint32_t imm;  // network order, passed through untouched
  uint64_t remote_addr;
  uint32_t rkey;
  std::vector<ibv_sge> sges;
  bool is_inline;
  std::vector<uint8_t> inline_bytes;  // IBV_SEND_INLINE copies at post; others read at execution
  Clock::time_point ready_at, first_try{};  // first_try: when the first undelivered attempt was
  bool tried = false;
  uint32_t rnr_tries = 0;
};

struct Qp {
  ibv_qp qp;
  ibv_qp_cap cap;
  bool sig_all;
  ibv_qp_state state = IBV_QPS_RESET;  // the NIC's view; qp.state is what ibv_modify_qp last set
  uint32_t generation = 0;
  int access = 0;
  ibv_mtu mtu = IBV_MTU_256;
  uint32_t dest_qpn = 0, expected_psn = 0, next_psn = 0;
  uint8_t timeout = 0, retry_cnt = 0, rnr_retry = 0, min_rnr_timer = 0;
  uint64_t sq_posted = 0, sq_released = 0;  // depth in use = posted - released
  std::deque<SendWr> pending;               // posted, not yet executed; the head runs next
  std::deque<uint64_t> recvs;               // wr_ids of posted receives, not yet consumed
  uint32_t recv_outstanding = 0;            // posted receives whose completion is not polled
};

// ---- The device: one lock over every object, and the NIC thread that executes WRs. ----

struct Nic {
  std::mutex mu;
  std::condition_variable wake;
  std::map<uint32_t, Qp*> qps;
  std::unordered_map<uint32_t, Mr*> by_lkey, by_rkey;
  uint32_t next_qpn = 0x101, next_key = 1, next_handle = 1;
  int contexts = 0;
  std::thread thread;
  uint64_t epoch = 0;  // a NIC thread runs while epoch is the one it was started with
  uint32_t jitter_us = 0;
  std::atomic<uint32_t> delay_us{0};  // every WR posted from now on waits this much more (soft_verbs_set_delay_us)
  int fail_next = -1;  // under mu: the status the next WR to execute fails with (soft_verbs_fail_next), or -1
  uint64_t rng = 0x9E3779B97F4A7C15ull;
  std::atomic<uint64_t> stats[4] = {};  // WRs executed, bytes written, receive CQEs, retries

  Nic() {
    if (const char* j = std::getenv("SOFT_VERBS_JITTER_US")) jitter_us = uint32_t(std::strtoul(j, nullptr, 10));
  }
  uint64_t random() { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }
};

// Never destroyed: callers may still poll from other threads while static destructors run.
Nic& nic() { static Nic* n = new Nic; return *n; }

void count(int what, uint64_t by = 1) { nic().stats[what].fetch_add(by, std::memory_order_relaxed); }

Context& as_context(ibv_context* c) { return *reinterpret_cast<Context*>(c); }
Pd& as_pd(ibv_pd* p) { return *reinterpret_cast<Pd*>(p); }
Cq& as_cq(ibv_cq* c) { return *reinterpret_cast<Cq*>(c); }
Qp& as_qp(ibv_qp* q) { return *reinterpret_cast<Qp*>(q); }

const char* state_name(ibv_qp_state s) {
  static const char* names[] = {"RESET", "INIT", "RTR", "RTS", "SQD", "SQE", "ERR"};
  return unsigned(s) < 7 ? names[s] : "UNKNOWN";
}

std::string mask_names(int mask) {
  static const char* names[] = {"STATE", "CUR_STATE", "EN_SQD_ASYNC_NOTIFY", "ACCESS_FLAGS",
                                "PKEY_INDEX", "PORT", "QKEY", "AV", "PATH_MTU", "TIMEOUT",
                                "RETRY_CNT", "RNR_RETRY", "RQ_PSN", "MAX_QP_RD_ATOMIC", "ALT_PATH",
                                "MIN_RNR_TIMER", "SQ_PSN", "MAX_DEST_RD_ATOMIC", "PATH_MIG_STATE",
                                "CAP", "DEST_QPN"};
  std::string out;
  for (int bit = 0; bit < 32; ++bit) {
    if (!(mask & (1 << bit))) continue;
    if (!out.empty()) out += '|';
    out += bit < 21 ? std::string("IBV_QP_") + names[bit] : "bit" + std::to_string(bit);
  }
  return out;
}

bool inside(const Mr& mr, uint64_t addr, uint64_t length) {
  const uint64_t base = uint64_t(uintptr_t(mr.mr.addr)), end = base + mr.mr.length;
  return addr >= base && addr <= end && length <= end - addr;
}

// ---- Completions ----

void push(ibv_cq* ibcq, const Cqe& e) {
  Cq& cq = as_cq(ibcq);
  if (cq.overflowed) return;
  if (cq.entries.size() >= cq.capacity) {
    cq.overflowed = true;
    cq.pollable.store(1, std::memory_order_release);
    std::fprintf(stderr, "soft_verbs: CQ %p overflow: more than cqe=%zu unpolled completions; "
                 "poll_cq fails from now on\n", static_cast<void*>(ibcq), cq.capacity);
    return;
  }
  cq.entries.push_back(e);
  cq.pollable.store(cq.entries.size(), std::memory_order_release);
}

Cqe completion(const Qp& q, uint64_t wr_id, ibv_wc_status status, ibv_wc_opcode opcode) {
  Cqe e{};
  e.wc.wr_id = wr_id;
  e.wc.status = status;
  e.wc.opcode = opcode;
  e.wc.qp_num = q.qp.qp_num;
  e.qp_generation = q.generation;
  return e;
}

void complete_send(Qp& q, const SendWr& wr, ibv_wc_status status) {
  Cqe e = completion(q, wr.wr_id, status, IBV_WC_RDMA_WRITE);
  e.send_slots_upto = wr.seq + 1;
  push(q.qp.send_cq, e);
}

void complete_recv(Qp& q, uint64_t wr_id, ibv_wc_status status) {
  Cqe e = completion(q, wr_id, status, IBV_WC_RECV);
  e.recv = true;
  push(q.qp.recv_cq, e);
}

// Entering ERR flushes every outstanding WR, signaled or not, in order.
void enter_error(Qp& q) {
  q.state = IBV_QPS_ERR;
  for (const SendWr& wr : q.pending) complete_send(q, wr, IBV_WC_WR_FLUSH_ERR);
  q.pending.clear();
  for (uint64_t wr_id : q.recvs) complete_recv(q, wr_id, IBV_WC_WR_FLUSH_ERR);
  q.recvs.clear();
}

// The head WR failed: its error completion (always generated), then the QP goes to ERR.
void fail_head(Qp& q, ibv_wc_status status, const char* why) {
  SendWr wr = std::move(q.pending.front());
  q.pending.pop_front();
  std::fprintf(stderr, "soft_verbs: QP 0x%x WR wr_id=%llu failed: %s: %s\n", q.qp.qp_num,
               static_cast<unsigned long long>(wr.wr_id), ibv_wc_status_str(status), why);
  complete_send(q, wr, status);
  enter_error(q);
}

// ---- Execution of one WR by the NIC thread (the lock is held) ----

// Why a packet from `s` would not be accepted by `t`; nullptr when it would.
const char* undeliverable(const Qp& s, const Qp* t) {
  if (!t) return "destination QP does not exist";
  if (t->state != IBV_QPS_RTR && t->state != IBV_QPS_RTS) return "destination QP is not in RTR/RTS";
  if (t->dest_qpn != s.qp.qp_num) return "destination QP is connected to another QP";
  if (s.mtu > t->mtu) return "path MTU larger than the destination's";
  if (s.next_psn != t->expected_psn) return "sq_psn differs from the destination's expected rq_psn";
  return nullptr;
}

const char* remote_access_error(const Qp& t, const SendWr& wr, uint64_t length) {
  if (!(t.access & IBV_ACCESS_REMOTE_WRITE)) return "destination QP lacks IBV_ACCESS_REMOTE_WRITE";
  if (length == 0) return nullptr;  // a zero-length write validates no rkey (IB spec C9-88)
  auto it = nic().by_rkey.find(wr.rkey);
  if (it == nic().by_rkey.end()) return "rkey names no registered MR";
  const Mr& mr = *it->second;
  if (mr.mr.pd != t.qp.pd) return "rkey's MR is on another PD than the destination QP";
  if (!(mr.access & IBV_ACCESS_REMOTE_WRITE)) return "rkey's MR lacks IBV_ACCESS_REMOTE_WRITE";
  if (!inside(mr, wr.remote_addr, length)) return "remote range outside the rkey's MR";
  return nullptr;
}

void execute_head(Qp& s, Clock::time_point now) {
  Nic& n = nic();
  SendWr& wr = s.pending.front();

  // The NIC reads local memory when it executes the WR, so an MR gone by then fails here.
  uint64_t length = wr.inline_bytes.size();
  if (!wr.is_inline) {
    for (const ibv_sge& sge : wr.sges) {
      auto it = n.by_lkey.find(sge.lkey);
      if (it == n.by_lkey.end() || it->second->mr.pd != s.qp.pd || !inside(*it->second, sge.addr, sge.length))
        return fail_head(s, IBV_WC_LOC_PROT_ERR, "SGE not inside an MR of this QP's PD with that lkey");
      length += sge.length;
    }
  }

  auto found = n.qps.find(s.dest_qpn);
  Qp* t = found == n.qps.end() ? nullptr : found->second;
  if (const char* why = undeliverable(s, t)) {
    // Retransmitted until (retry_cnt + 1) transport timeouts of 4.096 us * 2^timeout have passed;
    // timeout 0 means wait forever (IB spec).
    if (!wr.tried) { wr.tried = true; wr.first_try = now; }
    const Nanos period(int64_t(4096) << s.timeout);
    if (s.timeout != 0 && now - wr.first_try >= period * (s.retry_cnt + 1))
      return fail_head(s, IBV_WC_RETRY_EXC_ERR, why);
    wr.ready_at = now + std::min(period, kRetryPoll);
    return count(3);
  }
  if (const char* why = remote_access_error(*t, wr, length)) return fail_head(s, IBV_WC_REM_ACCESS_ERR, why);
  if (n.fail_next >= 0) {
    const auto status = ibv_wc_status(n.fail_next);
    n.fail_next = -1;
    return fail_head(s, status, "failed on purpose (soft_verbs_fail_next)");
  }
  if (wr.opcode == IBV_WR_RDMA_WRITE_WITH_IMM && t->recvs.empty()) {
    // Receiver not ready: nothing is written; retried after the receiver's RNR timer.
    if (s.rnr_retry != 7 && wr.rnr_tries >= s.rnr_retry)
      return fail_head(s, IBV_WC_RNR_RETRY_EXC_ERR, "no receive posted at the destination");
    ++wr.rnr_tries;
    wr.ready_at = now + std::chrono::microseconds(10ull * kRnrTimer10us[t->min_rnr_timer]);
    return count(3);
  }

  auto* dst = reinterpret_cast<uint8_t*>(uintptr_t(wr.remote_addr));
  if (wr.is_inline) {
    if (length) std::memcpy(dst, wr.inline_bytes.data(), length);
  } else {
    for (const ibv_sge& sge : wr.sges) {  // memmove: loopback tests may overlap source and target
      std::memmove(dst, reinterpret_cast<const void*>(uintptr_t(sge.addr)), sge.length);
      dst += sge.length;
    }
  }
  const uint32_t mtu_bytes = 128u << s.mtu;
  const uint32_t packets = length == 0 ? 1 : uint32_t((length + mtu_bytes - 1) / mtu_bytes);
  s.next_psn = (s.next_psn + packets) & kPsnMask;
  t->expected_psn = (t->expected_psn + packets) & kPsnMask;
  count(0);
  count(1, length);

  // Both completions are queued under the lock that covered the copy: a poller that sees them
  // (taking the same lock) sees the data.
  if (wr.opcode == IBV_WR_RDMA_WRITE_WITH_IMM) {
    Cqe e = completion(*t, t->recvs.front(), IBV_WC_SUCCESS, IBV_WC_RECV_RDMA_WITH_IMM);
    t->recvs.pop_front();
    e.wc.wc_flags = IBV_WC_WITH_IMM;
    e.wc.imm_data = wr.imm;
    e.wc.byte_len = uint32_t(length);
    e.wc.src_qp = s.qp.qp_num;
    e.wc.slid = kLid;
    e.recv = true;
    push(t->qp.recv_cq, e);
    count(2);
  }
  if (wr.signaled) complete_send(s, wr, IBV_WC_SUCCESS);
  s.pending.pop_front();
}

// One WR per QP per sweep, so QPs interleave; sleeps until the earliest delayed WR is due.
void nic_loop(uint64_t epoch) {
  Nic& n = nic();
  std::unique_lock<std::mutex> lock(n.mu);
  while (n.epoch == epoch) {
    const auto now = Clock::now();
    auto next = Clock::time_point::max();
    bool progressed = false;
    for (auto& entry : n.qps) {
      Qp& q = *entry.second;
      if (q.pending.empty()) continue;
      if (q.pending.front().ready_at > now) { next = std::min(next, q.pending.front().ready_at); continue; }
      execute_head(q, now);
      progressed = true;
    }
    if (progressed) {  // let posters and pollers in between sweeps
      lock.unlock();
      std::this_thread::yield();
      lock.lock();
      continue;
    }
    if (next == Clock::time_point::max()) n.wake.wait(lock);
    else n.wake.wait_until(lock, next);
  }
}

// Call with the lock held; returns the thread to join after unlocking.
std::thread stop_nic_locked() {
  Nic& n = nic();
  ++n.epoch;
  n.wake.notify_all();
  return std::move(n.thread);
}

// Stops the NIC thread at unload or exit if contexts were left open.
struct NicStopper {
  ~NicStopper() {
    std::thread t;
    { std::lock_guard<std::mutex> lock(nic().mu); t = stop_nic_locked(); }
    if (t.joinable()) t.join();
  }
} g_nic_stopper;

// ---- The data path, reached through the context's ops table ----

int reject(ibv_qp* qp, int err, const char* what) {
  std::fprintf(stderr, "soft_verbs: QP 0x%x: %s\n", qp->qp_num, what);
  return err;
}

int check_send(const Qp& q, const ibv_send_wr& wr) {
  ibv_qp* qp = const_cast<ibv_qp*>(&q.qp);
  if (q.state != IBV_QPS_RTS && q.state != IBV_QPS_ERR)
    return reject(qp, EINVAL, "post_send: QP is not in RTS");
  if (wr.opcode != IBV_WR_RDMA_WRITE && wr.opcode != IBV_WR_RDMA_WRITE_WITH_IMM)
    return reject(qp, EINVAL, "post_send: only IBV_WR_RDMA_WRITE and _WITH_IMM are supported");
  if (wr.num_sge < 0 || uint32_t(wr.num_sge) > q.cap.max_send_sge)
    return reject(qp, EINVAL, "post_send: num_sge > max_send_sge");
  if (wr.num_sge > 0 && !wr.sg_list) return reject(qp, EINVAL, "post_send: sg_list is NULL");
  if (q.sq_posted - q.sq_released >= q.cap.max_send_wr)
    return reject(qp, ENOMEM, "post_send: send queue full (max_send_wr WRs await a polled signaled completion)");
  if (wr.send_flags & IBV_SEND_INLINE) {
    uint64_t total = 0;
    for (int i = 0; i < wr.num_sge; ++i) total += wr.sg_list[i].length;
    if (total > q.cap.max_inline_data) return reject(qp, EINVAL, "post_send: inline data > max_inline_data");
  }
  return 0;
}

int post_send(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad_wr) {
  Nic& n = nic();
  std::lock_guard<std::mutex> lock(n.mu);
  Qp& q = as_qp(qp);
  const auto now = Clock::now();
  for (; wr; wr = wr->next) {
    if (int err = check_send(q, *wr)) {
      if (bad_wr) *bad_wr = wr;
      n.wake.notify_one();
      return err;
    }
    SendWr w{};
    w.wr_id = wr->wr_id;
    w.seq = q.sq_posted++;
    w.opcode = wr->opcode;
    w.signaled = q.sig_all || (wr->send_flags & IBV_SEND_SIGNALED);
    w.imm = wr->imm_data;
    w.remote_addr = wr->wr.rdma.remote_addr;
    w.rkey = wr->wr.rdma.rkey;
    w.is_inline = wr->send_flags & IBV_SEND_INLINE;
    for (int i = 0; i < wr->num_sge; ++i) {
      const ibv_sge& sge = wr->sg_list[i];
      if (!w.is_inline) { w.sges.push_back(sge); continue; }
      const auto* src = reinterpret_cast<const uint8_t*>(uintptr_t(sge.addr));
      w.inline_bytes.insert(w.inline_bytes.end(), src, src + sge.length);
    }
    w.ready_at = now + std::chrono::microseconds(n.delay_us.load(std::memory_order_relaxed) +
                                                 (n.jitter_us ? n.random() % (n.jitter_us + 1) : 0));
    if (q.state == IBV_QPS_ERR) complete_send(q, w, IBV_WC_WR_FLUSH_ERR);
    else q.pending.push_back(std::move(w));
  }
  n.wake.notify_one();
  return 0;
}

int post_recv(ibv_qp* qp, ibv_recv_wr* wr, ibv_recv_wr** bad_wr) {
  std::lock_guard<std::mutex> lock(nic().mu);
  Qp& q = as_qp(qp);
  for (; wr; wr = wr->next) {
    int err = 0;
    if (q.state == IBV_QPS_RESET)
      err = reject(qp, EINVAL, "post_recv: QP is in RESET");
    else if (wr->num_sge < 0 || uint32_t(wr->num_sge) > q.cap.max_recv_sge)
      err = reject(qp, EINVAL, "post_recv: num_sge > max_recv_sge");
    else if (q.recv_outstanding >= q.cap.max_recv_wr)
      err = reject(qp, ENOMEM, "post_recv: receive queue full (max_recv_wr completions not yet polled)");
    if (err) {
      if (bad_wr) *bad_wr = wr;
      return err;
    }
    ++q.recv_outstanding;
    if (q.state == IBV_QPS_ERR) complete_recv(q, wr->wr_id, IBV_WC_WR_FLUSH_ERR);
    else q.recvs.push_back(wr->wr_id);
  }
  return 0;
}

int poll_cq(ibv_cq* ibcq, int num_entries, ibv_wc* wc) {
  Cq& cq = as_cq(ibcq);
  if (cq.pollable.load(std::memory_order_acquire) == 0) return 0;
  Nic& n = nic();
  std::lock_guard<std::mutex> lock(n.mu);
  if (cq.overflowed) return -1;
  int got = 0;
  while (got < num_entries && !cq.entries.empty()) {
    const Cqe& e = cq.entries.front();
    wc[got++] = e.wc;
    // Polling a completion is what frees queue slots (a send completion frees every WR up to it).
    auto it = n.qps.find(e.wc.qp_num);
    if (it != n.qps.end() && it->second->generation == e.qp_generation) {
      Qp& q = *it->second;
      if (e.recv) --q.recv_outstanding;
      else q.sq_released = std::max(q.sq_released, e.send_slots_upto);
    }
    cq.entries.pop_front();
  }
  cq.pollable.store(cq.entries.size(), std::memory_order_relaxed);
  return got;
}

// ---- ibv_modify_qp: the IB state machine with the kernel's required/optional mask table ----

bool transition_masks(ibv_qp_state cur, ibv_qp_state next, int* required, int* optional) {
  *required = *optional = 0;
  const int rts_optional = IBV_QP_CUR_STATE | IBV_QP_ACCESS_FLAGS | IBV_QP_MIN_RNR_TIMER |
                           IBV_QP_ALT_PATH | IBV_QP_PATH_MIG_STATE;
  if (next == IBV_QPS_RESET || next == IBV_QPS_ERR) return true;
  if (cur == IBV_QPS_RESET && next == IBV_QPS_INIT) {
    *required = IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
  } else if (cur == IBV_QPS_INIT && next == IBV_QPS_INIT) {
    *optional = IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
  } else if (cur == IBV_QPS_INIT && next == IBV_QPS_RTR) {
    *required = IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER;
    *optional = IBV_QP_ALT_PATH | IBV_QP_ACCESS_FLAGS | IBV_QP_PKEY_INDEX;
  } else if (cur == IBV_QPS_RTR && next == IBV_QPS_RTS) {
    *required = IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC;
    *optional = rts_optional;
  } else if (cur == IBV_QPS_RTS && next == IBV_QPS_RTS) {
    *optional = rts_optional;
  } else {
    return false;
  }
  *required |= IBV_QP_STATE;
  return true;
}

// The attribute values the mask says are present; nullptr when they are acceptable.
const char* bad_attribute(const ibv_qp_attr& a, int mask) {
  const int access_bits =
      IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC;
  if ((mask & IBV_QP_PKEY_INDEX) && a.pkey_index != 0) return "pkey_index must be 0 (one P_Key)";
  if ((mask & IBV_QP_PORT) && a.port_num != kPort) return "port_num must be 1";
  if ((mask & IBV_QP_ACCESS_FLAGS) && (a.qp_access_flags & ~access_bits)) return "unknown qp_access_flags bits";
  if (mask & IBV_QP_AV) {
    const ibv_ah_attr& av = a.ah_attr;
    if (av.port_num != kPort) return "ah_attr.port_num must be 1";
    if (av.is_global) {
      const ibv_gid gid = port_gid();
      if (std::memcmp(av.grh.dgid.raw, gid.raw, sizeof gid.raw) != 0)
        return "ah_attr.grh.dgid is not this port's GID";
      if (av.grh.sgid_index != 0) return "ah_attr.grh.sgid_index must be 0";
    } else if (av.dlid != kLid) {
      return "ah_attr.dlid must be 1 (this port's LID)";
    }
  }
  if ((mask & IBV_QP_PATH_MTU) && (a.path_mtu < IBV_MTU_256 || a.path_mtu > kActiveMtu))
    return "path_mtu invalid or above the port's active MTU";
  if ((mask & IBV_QP_DEST_QPN) && (a.dest_qp_num == 0 || a.dest_qp_num > kPsnMask))
    return "dest_qp_num must be a 24-bit QP number";
  if ((mask & IBV_QP_TIMEOUT) && a.timeout > 31) return "timeout > 31";
  if ((mask & IBV_QP_RETRY_CNT) && a.retry_cnt > 7) return "retry_cnt > 7";
  if ((mask & IBV_QP_RNR_RETRY) && a.rnr_retry > 7) return "rnr_retry > 7";
  if ((mask & IBV_QP_MIN_RNR_TIMER) && a.min_rnr_timer > 31) return "min_rnr_timer > 31";
  if ((mask & IBV_QP_MAX_QP_RD_ATOMIC) && a.max_rd_atomic > kMaxRdAtomic) return "max_rd_atomic > 16";
  if ((mask & IBV_QP_MAX_DEST_RD_ATOMIC) && a.max_dest_rd_atomic > kMaxRdAtomic) return "max_dest_rd_atomic > 16";
  return nullptr;
}

// RESET forgets everything but the creation parameters; completions still queued from the
// previous incarnation no longer free slots (the generation changes).
void reset_qp(Qp& q) {
  Qp fresh{};
  fresh.qp = q.qp;
  fresh.cap = q.cap;
  fresh.sig_all = q.sig_all;
  fresh.generation = q.generation + 1;
  q = std::move(fresh);
}

}  // namespace

// ---- The exported API ----

SOFT_VERBS_EXPORT ibv_device** ibv_get_device_list(int* num_devices) {
  auto** list = static_cast<ibv_device**>(std::calloc(2, sizeof(ibv_device*)));
  if (!list) { errno = ENOMEM; return nullptr; }
  list[0] = &g_device;
  if (num_devices) *num_devices = 1;
  return list;
}

SOFT_VERBS_EXPORT void ibv_free_device_list(ibv_device** list) { std::free(list); }

SOFT_VERBS_EXPORT const char* ibv_get_device_name(ibv_device* device) {
  return device ? device->name : nullptr;
}

SOFT_VERBS_EXPORT ibv_context* ibv_open_device(ibv_device* device) {
  if (device != &g_device) { errno = ENODEV; return nullptr; }
  auto* c = new Context{};
  ibv_context& ctx = c->ctx;
  ctx.device = device;
  ctx.ops.post_send = post_send;
  ctx.ops.post_recv = post_recv;
  ctx.ops.poll_cq = poll_cq;
  ctx.cmd_fd = ctx.async_fd = -1;
  ctx.num_comp_vectors = 1;
  pthread_mutex_init(&ctx.mutex, nullptr);
  ctx.abi_compat = nullptr;  // not a verbs_context: verbs.h's inline wrappers use the plain calls
  Nic& n = nic();
  std::lock_guard<std::mutex> lock(n.mu);
  if (n.contexts++ == 0) n.thread = std::thread(nic_loop, n.epoch);
  return &ctx;
}

SOFT_VERBS_EXPORT int ibv_close_device(ibv_context* context) {
  Nic& n = nic();
  std::thread finished;
  {
    std::lock_guard<std::mutex> lock(n.mu);
    if (as_context(context).users > 0) return EBUSY;
    if (--n.contexts == 0) finished = stop_nic_locked();
  }
  if (finished.joinable()) finished.join();
  pthread_mutex_destroy(&context->mutex);
  delete &as_context(context);
  return 0;
}

// rdma-core exports this symbol with `struct _compat_ibv_port_attr *`: the ibv_port_attr layout
// up to `flags`. Callers may pass either struct, so only that prefix is written.
SOFT_VERBS_EXPORT int ibv_query_port(ibv_context* context, uint8_t port_num, _compat_ibv_port_attr* out) {
  if (!context || port_num != kPort) return EINVAL;
  ibv_port_attr a{};
  a.state = IBV_PORT_ACTIVE;
  a.max_mtu = kActiveMtu;
  a.active_mtu = kActiveMtu;
  a.gid_tbl_len = 1;
  a.max_msg_sz = 1u << 31;
  a.pkey_tbl_len = 1;
  a.lid = kLid;
  a.sm_lid = kLid;
  a.max_vl_num = 1;
  a.active_width = 2;  // 4x
  a.active_speed = 32; // 25 Gb/s (EDR lane)
  a.phys_state = 5;    // LinkUp
  a.link_layer = IBV_LINK_LAYER_INFINIBAND;
  std::memcpy(out, &a, offsetof(ibv_port_attr, flags) + sizeof a.flags);
  return 0;
}

SOFT_VERBS_EXPORT int ibv_query_gid(ibv_context* context, uint8_t port_num, int index, ibv_gid* gid) {
  if (!context || port_num != kPort || index != 0) return -1;
  *gid = port_gid();
  return 0;
}

SOFT_VERBS_EXPORT ibv_pd* ibv_alloc_pd(ibv_context* context) {
  Nic& n = nic();
  std::lock_guard<std::mutex> lock(n.mu);
  auto* p = new Pd{};
  p->pd.context = context;
  p->pd.handle = n.next_handle++;
  ++as_context(context).users;
  return &p->pd;
}

SOFT_VERBS_EXPORT int ibv_dealloc_pd(ibv_pd* pd) {
  std::lock_guard<std::mutex> lock(nic().mu);
  if (as_pd(pd).users > 0) return EBUSY;
  --as_context(pd->context).users;
  delete &as_pd(pd);
  return 0;
}

SOFT_VERBS_EXPORT ibv_mr* ibv_reg_mr(ibv_pd* pd, void* addr, size_t length, int access) {
  // As the kernel: remote write (or atomic) access requires local write access.
  const bool remote = access & (IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC);
  if (!pd || length == 0 || (remote && !(access & IBV_ACCESS_LOCAL_WRITE))) {
    errno = EINVAL;
    return nullptr;
  }
  Nic& n = nic();
  std::lock_guard<std::mutex> lock(n.mu);
  auto* m = new Mr{};
  m->mr.context = pd->context;
  m->mr.pd = pd;
  m->mr.addr = addr;
  m->mr.length = length;
  m->mr.handle = n.next_handle++;
  // Distinct low bytes keep lkeys and rkeys disjoint: using one for the other never resolves.
  const uint32_t k = n.next_key++;
  m->mr.lkey = (k << 8) | 0x4c;
  m->mr.rkey = (k << 8) | 0x72;
  m->access = access;
  n.by_lkey[m->mr.lkey] = m;
  n.by_rkey[m->mr.rkey] = m;
  ++as_pd(pd).users;
  return &m->mr;
}

SOFT_VERBS_EXPORT int ibv_dereg_mr(ibv_mr* mr) {
  Nic& n = nic();
  std::lock_guard<std::mutex> lock(n.mu);
  n.by_lkey.erase(mr->lkey);
  n.by_rkey.erase(mr->rkey);
  --as_pd(mr->pd).users;
  delete reinterpret_cast<Mr*>(mr);
  return 0;
}

SOFT_VERBS_EXPORT ibv_cq* ibv_create_cq(ibv_context* context, int cqe, void* cq_context,
                                        ibv_comp_channel* channel, int comp_vector) {
  if (!context || cqe < 1 || cqe > kMaxCqe || channel || comp_vector != 0) { errno = EINVAL; return nullptr; }
  Nic& n = nic();
  std::lock_guard<std::mutex> lock(n.mu);
  auto* c = new Cq{};
  c->cq.context = context;
  c->cq.cq_context = cq_context;
  c->cq.handle = n.next_handle++;
  c->cq.cqe = cqe;
  pthread_mutex_init(&c->cq.mutex, nullptr);
  pthread_cond_init(&c->cq.cond, nullptr);
  c->capacity = size_t(cqe);
  ++as_context(context).users;
  return &c->cq;
}

SOFT_VERBS_EXPORT int ibv_destroy_cq(ibv_cq* cq) {
  std::lock_guard<std::mutex> lock(nic().mu);
  if (as_cq(cq).users > 0) return EBUSY;
  --as_context(cq->context).users;
  pthread_mutex_destroy(&cq->mutex);
  pthread_cond_destroy(&cq->cond);
  delete &as_cq(cq);
  return 0;
}

SOFT_VERBS_EXPORT ibv_qp* ibv_create_qp(ibv_pd* pd, ibv_qp_init_attr* attr) {
  const ibv_qp_cap cap = attr ? attr->cap : ibv_qp_cap{};
  if (!pd || !attr || attr->qp_type != IBV_QPT_RC || !attr->send_cq || !attr->recv_cq || attr->srq ||
      attr->send_cq->context != pd->context || attr->recv_cq->context != pd->context ||
      cap.max_send_wr > kMaxWr || cap.max_recv_wr > kMaxWr || cap.max_send_sge > kMaxSge ||
      cap.max_recv_sge > kMaxSge || cap.max_inline_data > kMaxInline) {
    errno = EINVAL;
    return nullptr;
  }
  Nic& n = nic();
  std::lock_guard<std::mutex> lock(n.mu);
  auto* q = new Qp{};
  ibv_qp& qp = q->qp;
  qp.context = pd->context;
  qp.qp_context = attr->qp_context;
  qp.pd = pd;
  qp.send_cq = attr->send_cq;
  qp.recv_cq = attr->recv_cq;
  qp.handle = n.next_handle++;
  qp.qp_num = n.next_qpn++ & kPsnMask;
  qp.state = IBV_QPS_RESET;
  qp.qp_type = IBV_QPT_RC;
  pthread_mutex_init(&qp.mutex, nullptr);
  pthread_cond_init(&qp.cond, nullptr);
  q->cap = cap;  // exactly what was asked (a real NIC may round up; exact catches overflow bugs)
  q->sig_all = attr->sq_sig_all != 0;
  ++as_cq(qp.send_cq).users;
  ++as_cq(qp.recv_cq).users;
  ++as_pd(pd).users;
  n.qps[qp.qp_num] = q;
  return &qp;
}

SOFT_VERBS_EXPORT int ibv_modify_qp(ibv_qp* qp, ibv_qp_attr* attr, int mask) {
  Nic& n = nic();
  std::lock_guard<std::mutex> lock(n.mu);
  Qp& q = as_qp(qp);
  const ibv_qp_state cur = q.state;
  if ((mask & IBV_QP_CUR_STATE) && attr->cur_qp_state != cur)
    return reject(qp, EINVAL, "modify_qp: cur_qp_state is not the current state");
  const ibv_qp_state next = (mask & IBV_QP_STATE) ? attr->qp_state : cur;
  const char *from = state_name(cur), *to = state_name(next);
  int required, optional;
  if (!transition_masks(cur, next, &required, &optional)) {
    std::fprintf(stderr, "soft_verbs: QP 0x%x: modify_qp: transition %s -> %s is not allowed\n", qp->qp_num, from, to);
    return EINVAL;
  }
  const int missing = required & ~mask, unexpected = mask & ~(required | optional | IBV_QP_STATE);
  if (missing || unexpected) {
    std::fprintf(stderr, "soft_verbs: QP 0x%x: modify_qp %s -> %s: missing [%s] unexpected [%s]\n", qp->qp_num,
                 from, to, mask_names(missing).c_str(), mask_names(unexpected).c_str());
    return EINVAL;
  }
  if (const char* why = bad_attribute(*attr, mask)) {
    std::fprintf(stderr, "soft_verbs: QP 0x%x: modify_qp %s -> %s: %s\n", qp->qp_num, from, to, why);
    return EINVAL;
  }
  if (next == IBV_QPS_RESET) {
    reset_qp(q);
  } else {
    if (mask & IBV_QP_ACCESS_FLAGS) q.access = attr->qp_access_flags;
    if (mask & IBV_QP_PATH_MTU) q.mtu = attr->path_mtu;
    if (mask & IBV_QP_DEST_QPN) q.dest_qpn = attr->dest_qp_num;
    if (mask & IBV_QP_RQ_PSN) q.expected_psn = attr->rq_psn & kPsnMask;
    if (mask & IBV_QP_SQ_PSN) q.next_psn = attr->sq_psn & kPsnMask;
    if (mask & IBV_QP_TIMEOUT) q.timeout = attr->timeout;
    if (mask & IBV_QP_RETRY_CNT) q.retry_cnt = attr->retry_cnt;
    if (mask & IBV_QP_RNR_RETRY) q.rnr_retry = attr->rnr_retry;
    if (mask & IBV_QP_MIN_RNR_TIMER) q.min_rnr_timer = attr->min_rnr_timer;
    if (next == IBV_QPS_ERR) enter_error(q);
    q.state = next;
  }
  qp->state = next;
  n.wake.notify_one();
  return 0;
}

SOFT_VERBS_EXPORT int ibv_destroy_qp(ibv_qp* qp) {
  Nic& n = nic();
  std::lock_guard<std::mutex> lock(n.mu);
  // WRs still queued are dropped with the QP; the NIC thread finds it gone from the registry.
  n.qps.erase(qp->qp_num);
  --as_cq(qp->send_cq).users;
  --as_cq(qp->recv_cq).users;
  --as_pd(qp->pd).users;
  pthread_mutex_destroy(&qp->mutex);
  pthread_cond_destroy(&qp->cond);
  delete &as_qp(qp);
  return 0;
}

SOFT_VERBS_EXPORT const char* ibv_wc_status_str(ibv_wc_status status) {
  static const char* const names[] = {  // rdma-core's wording
      "success", "local length error", "local QP operation error", "local EE context operation error",
      "local protection error", "Work Request Flushed Error", "memory management operation error",
      "bad response error", "local access error", "remote invalid request error", "remote access error",
      "remote operation error", "transport retry counter exceeded", "RNR retry counter exceeded",
      "local RDD violation error", "remote invalid RD request", "aborted error", "invalid EE context number",
      "invalid EE context state", "fatal error", "response timeout error", "general error", "TM error",
      "TM software rendezvous"};
  return unsigned(status) < sizeof names / sizeof names[0] ? names[status] : "unknown";
}

// For tests: 0 WRs executed, 1 bytes written, 2 receive completions, 3 retries (transport
// retransmissions and RNR retries).
SOFT_VERBS_EXPORT uint64_t soft_verbs_stats(int what) {
  return what >= 0 && what < 4 ? nic().stats[what].load(std::memory_order_relaxed) : 0;
}

// For tests: every WR posted from now on waits `us` microseconds before it executes, as on a slow
// link (a put that is still in flight when its target goes away).
SOFT_VERBS_EXPORT void soft_verbs_set_delay_us(uint32_t us) { nic().delay_us.store(us, std::memory_order_relaxed); }

// For tests: the next WR to reach its destination fails with `status` (an ibv_wc_status), as a
// NIC reports a fault: its QP goes to the error state.
SOFT_VERBS_EXPORT void soft_verbs_fail_next(int status) {
  std::lock_guard<std::mutex> l(nic().mu);
  nic().fail_next = status;
}
