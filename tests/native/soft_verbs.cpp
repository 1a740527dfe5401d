// soft_verbs: a software RC NIC for tests, within one process and between the processes of one
// user on one machine.
//
// A shared library exporting the subset of the libibverbs C API that the ibverbs NIC engine
// (csrc/cuda/transport/) uses, so that the engine runs, and fails, here the way it would on a
// real NIC. Tests load it by path (SWITCHYARD_IBVERBS_LIBRARY); the engine resolves each function
// with dlsym by its plain name and calls post_send, post_recv and poll_cq through the context's
// ops table, as the inline wrappers in verbs.h do. Each process has one device, "soft_verbs0",
// with one port that all its contexts share: the ranks of one process connect RC QPs to each
// other in loopback, and to the ranks of other processes through those processes' ports.
//
// Port addresses. A port's LID is unique among this user's live processes: when the first
// context opens, the NIC creates the POSIX shared-memory segment "/soft_verbs.<euid>.<lid>"
// (O_CREAT|O_EXCL, mode 0600) for LID 1, 2, ... until one is free; a segment whose owner (its pid
// and start time, stored in it) is gone is unlinked and its LID taken. The NIC unlinks its segment
// when the last context closes, at unload and at exit; those left by killed processes are unlinked
// by the next NIC that sends to one, and by every NIC as it starts and stops. The GID encodes the LID,
// fe80::25e:fffe:0:<lid>. An address vector names a port by dlid, or by a GRH whose dgid is such
// a GID (a dlid beside it must agree); it must be this port or another live one.
//
// Link layer. SOFT_VERBS_LINK_LAYER (read once per process, when the NIC is first used) is
// `infiniband` (the default, all of the above) or `ethernet`: a RoCE port, as an mlx5 one reports
// it. ibv_query_port then says IBV_LINK_LAYER_ETHERNET, lid and sm_lid 0 and gid_tbl_len 4 (the LID
// above still names the port's segment; only what is reported changes), and the GID table is:
// 0 RoCE v1 and 1 RoCE v2 of fe80::25e:fffe:0:<lid>, 2 RoCE v1 and 3 RoCE v2 of the IPv4-mapped
// ::ffff:10.77.<lid / 256>.<lid % 256> (on InfiniBand: entry 0 only, type IB). ibv_query_gid and
// _ibv_query_gid_ex (behind verbs.h's ibv_query_gid_ex; its errno values: EINVAL for a bad port,
// flags or entry, ENODATA beyond the table) answer for each entry. An address vector must have a
// GRH (is_global), sgid_index < 4 (on InfiniBand: 0) and a dgid of either form of a live port; its
// dlid is ignored. The fabric is L3-routed, so only RoCE v2 crosses it, within a family: a QP whose
// sgid_index names a v1 entry, or whose sgid and dgid are of different families, connects, but
// none of its packets arrives (its writes, and, as a destination, its ACKs and NAKs): its sender
// retransmits until the transport timeout (IBV_WC_RETRY_EXC_ERR), within a process and between
// processes alike. Ports of different link layers are on different fabrics: an address vector
// naming one is EINVAL (the wire records each port's link layer).
//
// Memory. ibv_reg_mr registers the caller's addresses as they are. ibv_reg_dmabuf_mr registers
// [offset, offset + length) of a dma-buf fd, which the NIC maps MAP_SHARED itself (not keeping the
// fd), as [iova, iova + length): the NIC reaches every MR through a translation, host = base +
// (addr - mr.addr), base being addr itself or the mapping + offset, for local SGEs and for remote
// writes, within a process and between processes; so the bytes land in every other mapping of the
// buffer, as a NIC's DMA does. SOFT_VERBS_PEERMEM=0 (read once per process) models a host without
// nvidia-peermem: every ibv_reg_mr fails with EFAULT (the engine registers only GPU memory);
// ibv_reg_dmabuf_mr still works; soft_verbs_set_peermem(0 or 1) changes it from then on. A value
// other than those named for either variable makes every ibv_open_device fail with EINVAL.
//
// The wire (soft_verbs_wire.h). That segment is the port's inbound wire: a ring of packets (Packet)
// that the other processes' NIC threads append under a process-shared robust mutex and that the
// owner's NIC thread consumes, sleeping on a futex in the segment in between. A write to a QP in
// another process is one WR on the wire per QP at a time, as packets of at most 64 KiB; the
// receiving NIC validates each packet (its framing, then everything the in-process path checks),
// places it, and answers into the sender's wire with an ACK or a NAK naming its reason. The WR
// completes when its last packet is acknowledged. A NAK resends from the packet it names, after the
// receiver's RNR timer for RNR, at once for a destination not (yet) ready; an ACK timeout without
// any answer resends too; a duplicate PSN (a packet already placed) is acknowledged again, never
// placed twice. A full wire makes the sender try again later; it never waits on it or overwrites
// it. Within one process a WR still executes directly (memmove under the NIC's lock), as before.
//
// What it checks, as a real NIC would (the failures surface where the real ones do: a return code
// from the call, or an error completion that moves the QP to ERR and flushes the rest):
//   * the QP state machine and the exact attribute masks of each transition (IB spec / kernel
//     table: missing or unexpected bits are EINVAL), and the attribute values: port 1, pkey 0,
//     an address vector that names a live soft_verbs port (above), path MTU <= 4096;
//   * posting: only in RTS (ERR flushes), RDMA WRITE and WRITE_WITH_IMM only, the SGE and depth
//     limits; a send WR keeps its slot until a signaled completion at or after it is polled, a
//     receive WR until its own completion is polled (ENOMEM beyond the depth);
//   * registration: access (remote write or atomic needs local write) and length; for a dma-buf,
//     an open fd (EBADF), a regular file at least offset + length long, iova congruent to offset
//     modulo the page size (EINVAL), as the kernel and mlx5 check them;
//   * memory: every local SGE inside an MR of the QP's PD with that lkey, at execution
//     (IBV_WC_LOC_PROT_ERR); the remote range inside an MR of the target's PD with that rkey and
//     IBV_ACCESS_REMOTE_WRITE, and the target QP allowing remote writes (IBV_WC_REM_ACCESS_ERR);
//     lkeys and rkeys are disjoint sets, so swapping them fails;
//   * connection: the target QP exists, is in RTR/RTS, is connected back to the sender (its LID
//     and QP), expects the sender's PSN and accepts its MTU, else the packet is retransmitted until
//     the transport timeout, (retry_cnt + 1) * 4.096 us * 2^timeout without progress
//     (IBV_WC_RETRY_EXC_ERR), which is also how a peer process that died or stalls, or a RoCE
//     path that is not routed, is reported; a WRITE_WITH_IMM with no receive posted is retried
//     after the receiver's RNR timer, rnr_retry times (7: forever), then IBV_WC_RNR_RETRY_EXC_ERR;
//   * completion queues: more unpolled completions than cqe is an overflow, after which poll_cq
//     returns -1; destroying a CQ, PD or context still in use is EBUSY.
// Execution is asynchronous, on one NIC thread per process, in order per QP. For tests,
// soft_verbs_fail_next_receive(status) gives the next receive completion that status,
// soft_verbs_set_delay_us(N) delays every WR posted after it by N us, soft_verbs_fail_next(status)
// fails the next WR this process's NIC executes (to a QP here or in another process);
// SOFT_VERBS_JITTER_US=N delays each WR by a pseudo-random 0..N us so that QPs interleave
// differently from run to run; soft_verbs_stats counts what this process's NIC did.
//
// What it does not model: a network (only the processes of one machine, and a packet is lost
// only when its receiver dies or, on Ethernet, its QP's path is not routed: no ARP/ND, hop limits,
// traffic classes or VLANs), sends/reads/atomics, UD/UC/XRC, SRQs, completion channels and
// async events, memory windows, alternate paths, the partial placement of a failed write within a
// process (between processes the packets acknowledged before the failing one stay placed, as on a
// real NIC), a QP reset and reconnected while packets of its old connection are still on a wire,
// and fork: a child inherits no usable NIC (as without ibv_fork_init).

#include <infiniband/verbs.h>

#include <dirent.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
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

#include "soft_verbs_wire.h"

#define SOFT_VERBS_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using namespace soft_verbs_wire;
using Clock = std::chrono::steady_clock;
using Nanos = std::chrono::nanoseconds;

constexpr uint8_t kPort = 1;
constexpr uint16_t kMaxLid = 0xBFFF;  // the unicast LIDs are 1..0xBFFF
constexpr ibv_mtu kActiveMtu = IBV_MTU_4096;
constexpr uint32_t kMaxWr = 32768, kMaxSge = 30, kMaxInline = 256, kMaxRdAtomic = 16;
constexpr int kMaxCqe = 1 << 22;
constexpr uint32_t kPsnMask = 0xFFFFFF;
constexpr uint64_t kMaxMessage = 1ull << 31;  // the port's max_msg_sz
// While a packet goes undelivered it is re-tried at least this often, so that a peer reaching
// RTR late is found quickly; the transport timeout still decides when the sender gives up.
constexpr Nanos kRetryPoll = std::chrono::microseconds(50);
// Between processes: a full wire is tried again this often.
constexpr Nanos kBackpressurePoll = std::chrono::microseconds(20);
// Between processes: the least silence before packets are sent again (a short ACK timeout would
// fill a slow receiver's wire with copies; a receiver that is there answers every packet).
constexpr Nanos kMinRetransmit = std::chrono::milliseconds(1);

// RNR NAK timer values of the IB spec (table 45), in units of 10 us; code 0 is the longest.
constexpr uint32_t kRnrTimer10us[32] = {65536, 1,    2,    3,    4,    6,     8,     12,
                                        16,    24,   32,   48,   64,   96,    128,   192,
                                        256,   384,  512,  768,  1024, 1536,  2048,  3072,
                                        4096,  6144, 8192, 12288, 16384, 24576, 32768, 49152};

constexpr uint8_t kGidPrefix[14] = {0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x02, 0x5e, 0xff, 0xfe, 0, 0};
// ::ffff:10.77.<lid >> 8>.<lid & 255>: the port's IPv4 address as a RoCE GID (Ethernet mode).
constexpr uint8_t kIpv4GidPrefix[14] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 77};

// The GID table: one entry on InfiniBand; on Ethernet, as on an mlx5 RoCE port with one IPv6
// link-local and one IPv4 address, each address once as RoCE v1 and once as RoCE v2.
constexpr uint32_t kIbGids = 1, kRoceGids = 4;
constexpr uint32_t kRoceIfindex = 2;  // the netdev a RoCE GID belongs to (ibv_gid_entry::ndev_ifindex)

enum class GidFamily : uint8_t { LinkLocal, Ipv4 };

// A GID encoding `lid`: fe80::25e:fffe:0:<lid> (link-local, the LID in the last two bytes, so
// that an address vector by GID names a port as one by LID does), or its IPv4-mapped twin.
ibv_gid port_gid(uint16_t lid, GidFamily family = GidFamily::LinkLocal) {
  ibv_gid gid{};
  std::memcpy(gid.raw, family == GidFamily::LinkLocal ? kGidPrefix : kIpv4GidPrefix, sizeof kGidPrefix);
  gid.raw[14] = uint8_t(lid >> 8);
  gid.raw[15] = uint8_t(lid);
  return gid;
}

// The LID a soft_verbs GID encodes, and its family; 0 when it is not one. The IPv4-mapped form is
// a port's address on Ethernet only.
uint16_t lid_of_gid(const ibv_gid& gid, bool ethernet, GidFamily* family) {
  if (std::memcmp(gid.raw, kGidPrefix, sizeof kGidPrefix) == 0) *family = GidFamily::LinkLocal;
  else if (ethernet && std::memcmp(gid.raw, kIpv4GidPrefix, sizeof kIpv4GidPrefix) == 0) *family = GidFamily::Ipv4;
  else return 0;
  const uint16_t lid = uint16_t(gid.raw[14] << 8 | gid.raw[15]);
  return lid <= kMaxLid ? lid : 0;
}

uint32_t gid_table_length(bool ethernet) { return ethernet ? kRoceGids : kIbGids; }

// Entry `index` of the port's GID table; false beyond it.
bool gid_entry(bool ethernet, uint16_t lid, uint32_t index, ibv_gid_entry* e) {
  if (index >= gid_table_length(ethernet)) return false;
  *e = ibv_gid_entry{};
  e->gid_index = index;
  e->port_num = kPort;
  if (!ethernet) {
    e->gid = port_gid(lid);
    e->gid_type = IBV_GID_TYPE_IB;
    return true;
  }
  e->gid = port_gid(lid, index < 2 ? GidFamily::LinkLocal : GidFamily::Ipv4);
  e->gid_type = index % 2 == 0 ? IBV_GID_TYPE_ROCE_V1 : IBV_GID_TYPE_ROCE_V2;
  e->ndev_ifindex = kRoceIfindex;
  return true;
}

// Whether an Ethernet QP's packets cross the fabric, which is L3-routed: RoCE v1 (an Ethernet
// frame, not IP) stops at the first router, and so does a packet from one address family to the
// other. Such a QP connects, but nothing it sends arrives; no error says so, as on a real network.
enum class Route : uint8_t { Ok, RoceV1, MixedFamilies };

Route route_of(uint8_t sgid_index, GidFamily dgid_family) {
  if (sgid_index % 2 == 0) return Route::RoceV1;
  const GidFamily sgid_family = sgid_index < 2 ? GidFamily::LinkLocal : GidFamily::Ipv4;
  return sgid_family == dgid_family ? Route::Ok : Route::MixedFamilies;
}

// Why the packets of a QP with this route are dropped: its own (the sender's) or, for an answer
// lost on its way back, the destination QP's.
const char* route_text(Route r, bool own) {
  switch (r) {
    case Route::RoceV1:
      return own ? "packets dropped by the routed fabric: this QP's sgid_index names a RoCE v1 GID (only RoCE v2 is routed)"
                 : "answers dropped by the routed fabric: the destination QP's sgid_index names a RoCE v1 GID "
                   "(only RoCE v2 is routed)";
    case Route::MixedFamilies:
      return own ? "packets dropped by the routed fabric: this QP's sgid and dgid are of different families "
                   "(link-local vs IPv4-mapped)"
                 : "answers dropped by the routed fabric: the destination QP's sgid and dgid are of different "
                   "families (link-local vs IPv4-mapped)";
    default:
      return "routed";
  }
}

uint32_t mtu_bytes(uint32_t mtu) { return 128u << mtu; }

// The PSNs a write of `length` bytes takes: one per MTU-sized packet, one for no bytes.
uint32_t psn_span(uint64_t length, uint32_t mtu) {
  return length == 0 ? 1 : uint32_t((length + mtu_bytes(mtu) - 1) / mtu_bytes(mtu));
}

ibv_device g_device = [] {
  ibv_device d{};
  d.node_type = IBV_NODE_CA;
  d.transport_type = IBV_TRANSPORT_IB;
  std::snprintf(d.name, sizeof d.name, "soft_verbs0");
  std::snprintf(d.dev_name, sizeof d.dev_name, "uverbs0");
  return d;
}();

// ---- Why a write is not accepted: the same checks within a process and between processes ----

enum class Reason : uint8_t {
  None,
  // Not delivered: the sender retransmits until its transport timeout.
  NoQp, NotReady, OtherPeer, Mtu, Psn,
  // IBV_WC_REM_ACCESS_ERR.
  QpAccess, NoMr, OtherPd, MrAccess, Range,
  // An RNR NAK: the sender retries after the receiver's RNR timer.
  NoReceive,
  Count
};

const char* reason_text(Reason r) {
  static const char* const text[] = {
      "accepted",
      "destination QP does not exist",
      "destination QP is not in RTR/RTS",
      "destination QP is connected to another QP",
      "path MTU larger than the destination's",
      "sq_psn differs from the destination's expected rq_psn",
      "destination QP lacks IBV_ACCESS_REMOTE_WRITE",
      "rkey names no registered MR",
      "rkey's MR is on another PD than the destination QP",
      "rkey's MR lacks IBV_ACCESS_REMOTE_WRITE",
      "remote range outside the rkey's MR",
      "no receive posted at the destination"};
  static_assert(sizeof text / sizeof text[0] == size_t(Reason::Count), "one text per reason");
  return text[size_t(r)];
}

bool access_denied(Reason r) { return r >= Reason::QpAccess && r <= Reason::Range; }

// ---- Objects. Each embeds the ibv_* struct handed to the caller as its first member. ----

struct Context { ibv_context ctx; int users = 0; };  // users: PDs and CQs
struct Pd { ibv_pd pd; int users = 0; };              // users: MRs and QPs
struct Mr {
  ibv_mr mr;
  int access;
  // Where byte mr.addr lies in this process, as the NIC reaches it: mr.addr itself (ibv_reg_mr),
  // or `offset` into this library's own mapping of a dma-buf (ibv_reg_dmabuf_mr), whose mr.addr
  // is an iova the caller chose.
  uint8_t* host = nullptr;
  void* map = nullptr;  // a dma-buf MR's mapping of its fd, unmapped at ibv_dereg_mr
  size_t map_length = 0;
};

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
  // To another process: the write as packets of kPacketPayload bytes, [0, sent) on the wire,
  // [0, acked) acknowledged (in order).
  bool started = false;
  uint64_t length = 0;
  uint32_t start_psn = 0, packets = 0, sent = 0, acked = 0;
  Clock::time_point progress_at{}, sent_at{};  // the last answer that moved it on; the last sending
  Clock::time_point looked_at{};               // the last look at whether a full wire's reader lives
  Reason last_nak = Reason::None;              // why the last attempt was not delivered
  bool placed = false;  // within a process: written, but the destination's answer is lost (Route)
};

struct Qp {
  ibv_qp qp;
  ibv_qp_cap cap;
  bool sig_all;
  ibv_qp_state state = IBV_QPS_RESET;  // the NIC's view; qp.state is what ibv_modify_qp last set
  uint32_t generation = 0;
  int access = 0;
  ibv_mtu mtu = IBV_MTU_256;
  uint16_t dest_lid = 0;  // the port of the destination QP: this process's, or another's
  Route route = Route::Ok;  // Ethernet: whether its packets cross the fabric, set with the AV at RTR
  uint32_t dest_qpn = 0, expected_psn = 0, next_psn = 0;
  uint64_t psns_taken = 0;  // since rq_psn was set: only those PSNs can come again as duplicates
  uint8_t timeout = 0, retry_cnt = 0, rnr_retry = 0, min_rnr_timer = 0;
  uint64_t sq_posted = 0, sq_released = 0;  // depth in use = posted - released
  std::deque<SendWr> pending;               // posted, not yet executed; the head runs next
  std::deque<uint64_t> recvs;               // wr_ids of posted receives, not yet consumed
  uint32_t recv_outstanding = 0;            // posted receives whose completion is not polled
};

// ---- The device: one lock over every object, and the NIC thread that executes WRs. ----

struct Nic {
  std::mutex mu;
  std::map<uint32_t, Qp*> qps;
  std::unordered_map<uint32_t, Mr*> by_lkey, by_rkey;
  uint32_t next_qpn = 0x101, next_key = 1, next_handle = 1;
  int contexts = 0;
  std::thread thread;
  uint64_t epoch = 0;  // a NIC thread runs while epoch is the one it was started with
  uint32_t jitter_us = 0;
  std::atomic<uint32_t> delay_us{0};  // every WR posted from now on waits this much more (soft_verbs_set_delay_us)
  int fail_next = -1;  // under mu: the status the next WR to execute fails with (soft_verbs_fail_next), or -1
  int fail_next_receive = -1;  // under mu: the status of the next receive completion (soft_verbs_fail_next_receive)
  uint64_t rng = 0x9E3779B97F4A7C15ull;
  std::atomic<uint64_t> stats[5] = {};  // WRs executed, bytes written, receive CQEs, retries, QPs created

  // The port, while a context is open: its LID and its inbound wire (the segment it allocated).
  uint16_t lid = 0;
  Wire* wire = nullptr;
  ino_t wire_inode = 0;
  pid_t wire_pid = 0;                // the process that made it: a forked child never unlinks it
  std::map<uint16_t, Wire*> peers;   // other ports' wires, mapped when first needed
  std::map<uint16_t, std::deque<Packet>> replies;  // ACKs and NAKs waiting for room on a full wire
  std::vector<uint8_t> payload = std::vector<uint8_t>(kPacketPayload);  // one packet's, gathered

  // Read once, from the environment: the port's link layer (SOFT_VERBS_LINK_LAYER), whether
  // ibv_reg_mr can pin GPU memory (SOFT_VERBS_PEERMEM; soft_verbs_set_peermem changes it later),
  // and what was wrong with either (every ibv_open_device then fails).
  bool ethernet = false;
  std::atomic<bool> peermem{true};
  std::string config_error;

  Nic() {
    if (const char* j = std::getenv("SOFT_VERBS_JITTER_US")) jitter_us = uint32_t(std::strtoul(j, nullptr, 10));
    const char* link = std::getenv("SOFT_VERBS_LINK_LAYER");
    if (link && *link && std::strcmp(link, "infiniband") != 0) {
      if (std::strcmp(link, "ethernet") == 0) ethernet = true;
      else config_error = "SOFT_VERBS_LINK_LAYER=" + std::string(link) + ": must be infiniband or ethernet";
    }
    const char* peer = std::getenv("SOFT_VERBS_PEERMEM");
    if (peer && *peer && std::strcmp(peer, "1") != 0) {
      if (std::strcmp(peer, "0") == 0) peermem = false;
      else config_error = "SOFT_VERBS_PEERMEM=" + std::string(peer) + ": must be 0 or 1";
    }
  }
  uint32_t link_layer() const { return ethernet ? IBV_LINK_LAYER_ETHERNET : IBV_LINK_LAYER_INFINIBAND; }
  uint64_t random() { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }
};

// Never destroyed: callers may still poll from other threads while static destructors run.
Nic& nic() { static Nic* n = new Nic; return *n; }

void count(int what, uint64_t by = 1) { nic().stats[what].fetch_add(by, std::memory_order_relaxed); }

// Wakes the NIC thread (call with the lock held): it sleeps on its own wire's doorbell.
void kick(Nic& n) {
  if (n.wire) ring_doorbell(n.wire);
}

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

// Where the NIC reaches `addr` of an MR (checked inside it): every access to MR memory, local
// SGEs and remote writes, goes through this, as a NIC's DMA goes through its translation table.
uint8_t* host_address(const Mr& mr, uint64_t addr) { return mr.host + (addr - uint64_t(uintptr_t(mr.mr.addr))); }

// ---- The port's segment: allocated with the LID, unlinked when the NIC stops ----

// Unlinks every segment of this user whose owner is gone (killed processes leave theirs), as
// listed in /dev/shm, where Linux keeps POSIX shared memory.
void reclaim_dead_segments() {
  DIR* dir = opendir("/dev/shm");
  if (!dir) return;
  const std::string prefix = "soft_verbs." + std::to_string(geteuid()) + ".";
  std::vector<uint32_t> lids;
  while (const dirent* e = readdir(dir)) {
    char* end = nullptr;
    if (std::strncmp(e->d_name, prefix.c_str(), prefix.size()) != 0) continue;
    const unsigned long lid = std::strtoul(e->d_name + prefix.size(), &end, 10);
    if (*end == 0 && lid >= 1 && lid <= kMaxLid) lids.push_back(uint32_t(lid));
  }
  closedir(dir);
  for (uint32_t lid : lids) reclaim_if_dead(lid);
}

// Creates this process's segment for the first free LID (call with the lock held); false, with
// errno and a line on stderr, if there is none.
bool open_port(Nic& n) {
  if (n.wire) return true;  // the last close has not taken it down yet
  reclaim_dead_segments();
  const uint64_t start = own_start();
  for (uint32_t lid = 1, tries = 0; lid <= kMaxLid; ++lid) {
    const std::string name = wire_name(lid);
    const int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
      if (errno != EEXIST) {
        const int err = errno;
        std::fprintf(stderr, "soft_verbs: cannot create %s: %s\n", name.c_str(), std::strerror(err));
        errno = err;
        return false;
      }
      if (reclaim_if_dead(lid) && ++tries < 8) --lid;  // free again: this LID once more
      else tries = 0;
      continue;
    }
    // fchmod: exactly 0600 whatever the umask. posix_fallocate, not ftruncate: a full /dev/shm
    // fails here rather than with SIGBUS when the ring is first written.
    struct stat st {};
    void* map = MAP_FAILED;
    int err = fchmod(fd, 0600) == 0 ? posix_fallocate(fd, 0, sizeof(Wire)) : errno;
    if (err == 0 && fstat(fd, &st) != 0) err = errno;
    if (err == 0 && (map = mmap(nullptr, sizeof(Wire), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED) err = errno;
    close(fd);
    if (map == MAP_FAILED) {
      shm_unlink(name.c_str());
      std::fprintf(stderr, "soft_verbs: cannot size or map %s: %s\n", name.c_str(), std::strerror(err));
      errno = err;
      return false;
    }
    auto* w = static_cast<Wire*>(map);
    w->version = kWireVersion;
    w->owner_pid = int32_t(getpid());
    w->owner_start = start;
    w->lid = lid;
    w->link_layer = n.link_layer();
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&w->producers, &attr);
    pthread_mutexattr_destroy(&attr);
    __atomic_store_n(&w->magic, kWireMagic, __ATOMIC_RELEASE);
    n.wire = w;
    n.lid = uint16_t(lid);
    n.wire_inode = st.st_ino;
    n.wire_pid = getpid();
    return true;
  }
  std::fprintf(stderr, "soft_verbs: no free LID: %u segments /soft_verbs.%u.* of live processes\n",
               unsigned(kMaxLid), unsigned(geteuid()));
  errno = EBUSY;
  return false;
}

// Unmaps another port's wire and forgets it; unlinks its segment too if its owner is gone.
void forget_peer(Nic& n, uint16_t lid) {
  auto it = n.peers.find(lid);
  if (it == n.peers.end()) return;
  Wire* w = it->second;
  const bool dead = !__atomic_load_n(&w->closed, __ATOMIC_ACQUIRE) && !owner_alive(w->owner_pid, w->owner_start);
  munmap(w, sizeof(Wire));
  n.peers.erase(it);
  if (dead) reclaim_if_dead(lid);
}

// Takes this process's port down (call with the lock held, the NIC thread joined): senders that
// still have the segment mapped see `closed`, and its name is free for another process.
void close_port(Nic& n) {
  while (!n.peers.empty()) {
    munmap(n.peers.begin()->second, sizeof(Wire));
    n.peers.erase(n.peers.begin());
  }
  n.replies.clear();
  if (!n.wire) return;
  if (n.wire_pid == getpid()) {
    __atomic_store_n(&n.wire->closed, 1u, __ATOMIC_RELEASE);
    const std::string name = wire_name(n.lid);
    const int fd = shm_open(name.c_str(), O_RDONLY | O_CLOEXEC, 0);
    struct stat st {};
    if (fd >= 0 && fstat(fd, &st) == 0 && st.st_ino == n.wire_inode) shm_unlink(name.c_str());
    if (fd >= 0) close(fd);
    reclaim_dead_segments();  // peers that died while this port ran, if nothing removed theirs yet
  }
  munmap(n.wire, sizeof(Wire));
  n.wire = nullptr;
  n.lid = 0;
}

// Another port's wire, mapped; nullptr if there is no such port. Only a segment of this user
// that nobody else may read or write, of this library's layout, is used; a port of the other link
// layer is on another fabric, not there (`other_fabric` says when that was why).
Wire* peer_wire(Nic& n, uint16_t lid, bool* other_fabric = nullptr) {
  auto it = n.peers.find(lid);
  if (it != n.peers.end()) {
    if (!__atomic_load_n(&it->second->closed, __ATOMIC_ACQUIRE)) return it->second;
    forget_peer(n, lid);  // its owner stopped: the LID may belong to another process by now
  }
  if (lid == 0 || lid > kMaxLid || lid == n.lid) return nullptr;
  const int fd = shm_open(wire_name(lid).c_str(), O_RDWR | O_CLOEXEC, 0);
  if (fd < 0) return nullptr;
  struct stat st {};
  void* map = MAP_FAILED;
  if (fstat(fd, &st) == 0 && st.st_uid == geteuid() && (st.st_mode & 077) == 0 && size_t(st.st_size) == sizeof(Wire))
    map = mmap(nullptr, sizeof(Wire), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (map == MAP_FAILED) return nullptr;
  auto* w = static_cast<Wire*>(map);
  const bool port = __atomic_load_n(&w->magic, __ATOMIC_ACQUIRE) == kWireMagic && w->version == kWireVersion &&
                    w->lid == lid && !__atomic_load_n(&w->closed, __ATOMIC_ACQUIRE);
  if (!port || w->link_layer != n.link_layer()) {
    if (port && other_fabric) *other_fabric = true;
    munmap(map, sizeof(Wire));
    return nullptr;
  }
  n.peers[lid] = w;
  return w;
}

// Another port's wire if its owner still runs (reading /proc: for the slow paths only).
Wire* live_peer_wire(Nic& n, uint16_t lid, bool* other_fabric = nullptr) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    Wire* w = peer_wire(n, lid, other_fabric);
    if (!w || owner_alive(w->owner_pid, w->owner_start)) return w;
    forget_peer(n, lid);  // a killed owner's segment: unlinked, and the name looked up once more
  }
  return nullptr;
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

// A WRITE_WITH_IMM arrived whole (the data is placed): its receive completion, as the target saw it.
void complete_write_with_imm(Qp& t, uint64_t length, uint32_t imm, uint32_t src_qpn, uint16_t slid) {
  Nic& n = nic();
  const auto status = n.fail_next_receive < 0 ? IBV_WC_SUCCESS : ibv_wc_status(n.fail_next_receive);
  n.fail_next_receive = -1;
  Cqe e = completion(t, t.recvs.front(), status, IBV_WC_RECV_RDMA_WITH_IMM);
  t.recvs.pop_front();
  e.wc.wc_flags = IBV_WC_WITH_IMM;
  e.wc.imm_data = imm;
  e.wc.byte_len = uint32_t(length);
  e.wc.src_qp = src_qpn;
  e.wc.slid = slid;
  e.recv = true;
  push(t.qp.recv_cq, e);
  count(2);
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

// The head WR succeeded: it is written, and acknowledged.
void complete_head(Qp& s, uint64_t length) {
  count(0);
  count(1, length);
  if (s.pending.front().signaled) complete_send(s, s.pending.front(), IBV_WC_SUCCESS);
  s.pending.pop_front();
}

// ---- The checks a write meets at its destination (the lock is held) ----

// Why the target would not take a packet from QP `src_qpn` at port `src_lid` (PSN aside).
Reason not_accepting(const Qp* t, uint16_t src_lid, uint32_t src_qpn, uint32_t mtu) {
  if (!t) return Reason::NoQp;
  if (t->state != IBV_QPS_RTR && t->state != IBV_QPS_RTS) return Reason::NotReady;
  if (t->dest_lid != src_lid || t->dest_qpn != src_qpn) return Reason::OtherPeer;
  if (mtu > uint32_t(t->mtu)) return Reason::Mtu;
  return Reason::None;
}

Reason remote_access_error(const Qp& t, uint32_t rkey, uint64_t addr, uint64_t length) {
  if (!(t.access & IBV_ACCESS_REMOTE_WRITE)) return Reason::QpAccess;
  if (length == 0) return Reason::None;  // a zero-length write validates no rkey (IB spec C9-88)
  auto it = nic().by_rkey.find(rkey);
  if (it == nic().by_rkey.end()) return Reason::NoMr;
  const Mr& mr = *it->second;
  if (mr.mr.pd != t.qp.pd) return Reason::OtherPd;
  if (!(mr.access & IBV_ACCESS_REMOTE_WRITE)) return Reason::MrAccess;
  if (!inside(mr, addr, length)) return Reason::Range;
  return Reason::None;
}

// The WR's length, checking that the NIC may read its local memory now (at execution: an MR gone
// by then fails); false if an SGE is not inside an MR of the QP's PD with that lkey.
bool local_length(const Qp& s, const SendWr& wr, uint64_t* length) {
  *length = wr.inline_bytes.size();
  if (wr.is_inline) return true;
  for (const ibv_sge& sge : wr.sges) {
    auto it = nic().by_lkey.find(sge.lkey);
    if (it == nic().by_lkey.end() || it->second->mr.pd != s.qp.pd || !inside(*it->second, sge.addr, sge.length))
      return false;
    *length += sge.length;
  }
  return true;
}

// Where the NIC reads an SGE that local_length has just accepted (under the same hold of the lock).
const uint8_t* sge_bytes(const ibv_sge& sge) { return host_address(*nic().by_lkey.at(sge.lkey), sge.addr); }

// Bytes [offset, offset + length) of the WR's local data, into `out` (local_length accepted it).
void gather(const SendWr& wr, uint64_t offset, uint32_t length, uint8_t* out) {
  if (wr.is_inline) {
    std::memcpy(out, wr.inline_bytes.data() + offset, length);
    return;
  }
  for (const ibv_sge& sge : wr.sges) {
    if (length == 0) return;
    if (offset >= sge.length) { offset -= sge.length; continue; }
    const uint32_t take = uint32_t(std::min<uint64_t>(length, sge.length - offset));
    std::memcpy(out, sge_bytes(sge) + offset, take);
    out += take;
    length -= take;
    offset = 0;
  }
}

bool fail_on_purpose(Qp& s) {
  Nic& n = nic();
  if (n.fail_next < 0) return false;
  const auto status = ibv_wc_status(n.fail_next);
  n.fail_next = -1;
  fail_head(s, status, "failed on purpose (soft_verbs_fail_next)");
  return true;
}

// ---- Execution of one WR to a QP of this process (the lock is held) ----

// The head WR was not delivered, or its answer was lost: retransmitted until (retry_cnt + 1)
// transport timeouts of 4.096 us * 2^timeout have passed; timeout 0 means wait forever (IB spec).
void undelivered(Qp& s, Clock::time_point now, const char* why) {
  SendWr& wr = s.pending.front();
  if (!wr.tried) { wr.tried = true; wr.first_try = now; }
  const Nanos period(int64_t(4096) << s.timeout);
  if (s.timeout != 0 && now - wr.first_try >= period * (s.retry_cnt + 1))
    return fail_head(s, IBV_WC_RETRY_EXC_ERR, why);
  wr.ready_at = now + std::min(period, kRetryPoll);
  count(3);
}

void execute_local(Qp& s, Clock::time_point now) {
  Nic& n = nic();
  SendWr& wr = s.pending.front();

  uint64_t length = 0;
  if (!local_length(s, wr, &length))
    return fail_head(s, IBV_WC_LOC_PROT_ERR, "SGE not inside an MR of this QP's PD with that lkey");
  if (s.route != Route::Ok) return undelivered(s, now, route_text(s.route, true));

  auto found = n.qps.find(s.dest_qpn);
  Qp* t = found == n.qps.end() ? nullptr : found->second;
  // Written already, the answer lost: each retransmission is a duplicate, answered (and lost) again.
  if (wr.placed && t && t->route != Route::Ok) return undelivered(s, now, route_text(t->route, false));
  Reason why = not_accepting(t, n.lid, s.qp.qp_num, s.mtu);
  if (why == Reason::None && s.next_psn != t->expected_psn) why = Reason::Psn;
  if (why != Reason::None) return undelivered(s, now, reason_text(why));
  // From here the destination answers; a destination whose packets do not cross the fabric acts
  // on the write all the same, but its NAK or ACK never arrives.
  const char* answer_lost = t->route == Route::Ok ? nullptr : route_text(t->route, false);
  if (Reason r = remote_access_error(*t, wr.rkey, wr.remote_addr, length); r != Reason::None)
    return answer_lost ? undelivered(s, now, answer_lost) : fail_head(s, IBV_WC_REM_ACCESS_ERR, reason_text(r));
  if (fail_on_purpose(s)) return;
  if (wr.opcode == IBV_WR_RDMA_WRITE_WITH_IMM && t->recvs.empty()) {
    if (answer_lost) return undelivered(s, now, answer_lost);
    // Receiver not ready: nothing is written; retried after the receiver's RNR timer.
    if (s.rnr_retry != 7 && wr.rnr_tries >= s.rnr_retry)
      return fail_head(s, IBV_WC_RNR_RETRY_EXC_ERR, reason_text(Reason::NoReceive));
    ++wr.rnr_tries;
    wr.ready_at = now + std::chrono::microseconds(10ull * kRnrTimer10us[t->min_rnr_timer]);
    return count(3);
  }

  if (length) {  // a zero-length write names no memory (its rkey is not even checked)
    uint8_t* dst = host_address(*n.by_rkey.at(wr.rkey), wr.remote_addr);
    if (wr.is_inline) {
      std::memcpy(dst, wr.inline_bytes.data(), length);
    } else {
      for (const ibv_sge& sge : wr.sges) {  // memmove: loopback tests may overlap source and target
        std::memmove(dst, sge_bytes(sge), sge.length);
        dst += sge.length;
      }
    }
  }
  const uint32_t packets = psn_span(length, s.mtu);
  s.next_psn = (s.next_psn + packets) & kPsnMask;
  t->expected_psn = (t->expected_psn + packets) & kPsnMask;

  // Both completions are queued under the lock that covered the copy: a poller that sees them
  // (taking the same lock) sees the data.
  if (wr.opcode == IBV_WR_RDMA_WRITE_WITH_IMM) complete_write_with_imm(*t, length, wr.imm, s.qp.qp_num, n.lid);
  if (answer_lost) {
    wr.placed = true;
    return undelivered(s, now, answer_lost);
  }
  complete_head(s, length);
}

// ---- Between processes: the answers (the lock is held) ----

// Sends an ACK or NAK for `p` to the port it came from; queued behind earlier answers to that
// port while its wire is full, dropped if the port is gone (its sender is too).
void answer(Nic& n, const Packet& p, Reason why, uint8_t rnr_timer) {
  Packet a{};
  a.size = packet_size(0);
  a.kind = kAck;
  a.status = uint8_t(why);
  a.rnr_timer = rnr_timer;
  a.src_lid = n.lid;
  a.src_qpn = p.dst_qpn;
  a.dst_qpn = p.src_qpn;
  a.psn = p.psn;
  auto queued = n.replies.find(p.src_lid);
  if (queued != n.replies.end()) return queued->second.push_back(a);
  Wire* w = peer_wire(n, p.src_lid);
  if (w && append(w, a, nullptr) == Append::Full) n.replies[p.src_lid].push_back(a);
}

// Sends queued answers; true if any went. `waiting` is set when some wait for room.
bool send_answers(Nic& n, bool* waiting) {
  bool sent = false;
  for (auto it = n.replies.begin(); it != n.replies.end();) {
    Wire* w = peer_wire(n, it->first);
    std::deque<Packet>& q = it->second;
    while (w && !q.empty()) {
      const Append r = append(w, q.front(), nullptr);
      if (r == Append::Full) break;
      if (r == Append::Broken) w = nullptr;
      else { q.pop_front(); sent = true; }
    }
    if (!w || q.empty()) { it = n.replies.erase(it); continue; }
    *waiting = true;
    ++it;
  }
  return sent;
}

// ---- Between processes: the receiving end of a write (the lock is held) ----

// What is wrong with a WRITE packet's own fields, before anything it names is looked at.
const char* malformed_write(const Nic& n, const Packet& p) {
  if (p.length > kPacketPayload || p.size != packet_size(p.length)) return "size and length disagree";
  if (p.mtu < IBV_MTU_256 || p.mtu > kActiveMtu) return "no valid MTU";
  if (p.flags & ~(kLast | kWithImm) || ((p.flags & kWithImm) && !(p.flags & kLast))) return "unknown flags";
  if (p.src_lid == 0 || p.src_lid > kMaxLid || p.src_lid == n.lid) return "no valid source LID";
  if (p.src_qpn == 0 || p.src_qpn > kPsnMask || p.dst_qpn == 0 || p.dst_qpn > kPsnMask || p.psn > kPsnMask)
    return "QP number or PSN beyond 24 bits";
  if (p.wr_length > kMaxMessage || p.offset > p.wr_length || p.length > p.wr_length - p.offset)
    return "payload outside the write";
  if (p.wr_addr + p.wr_length < p.wr_addr) return "remote range wraps around";
  const bool last = p.offset + p.length == p.wr_length;
  if (last != bool(p.flags & kLast)) return "kLast on a packet that does not end the write, or missing";
  if (!last && (p.length == 0 || p.length % mtu_bytes(p.mtu) != 0)) return "a packet before the last is not whole MTUs";
  if (p.offset % kPacketPayload != 0) return "offset not at a packet boundary";
  return nullptr;
}

// One WRITE packet from another process, its payload at `payload_at` on this port's wire: placed
// and acknowledged, or NAKed with the reason, or dropped if malformed. A destination QP whose own
// packets do not cross the fabric (Route) acts on it all the same, but its answer is lost.
void receive_write(Nic& n, const Packet& p, uint64_t payload_at) {
  if (const char* bad = malformed_write(n, p)) {
    std::fprintf(stderr, "soft_verbs: dropped a malformed WRITE packet (from LID %u QP 0x%x): %s\n",
                 unsigned(p.src_lid), p.src_qpn, bad);
    return;
  }
  auto found = n.qps.find(p.dst_qpn);
  Qp* t = found == n.qps.end() ? nullptr : found->second;
  const bool answers_lost = t && t->route != Route::Ok;
  auto reply = [&](Reason why, uint8_t rnr_timer) {
    if (!answers_lost) answer(n, p, why, rnr_timer);
  };
  Reason why = not_accepting(t, p.src_lid, p.src_qpn, p.mtu);
  if (why == Reason::None && p.psn != t->expected_psn) {
    // A PSN this QP has taken already (a retransmission) is acknowledged again, not placed again;
    // any other is a PSN mismatch, as within a process.
    const uint32_t behind = (t->expected_psn - p.psn) & kPsnMask;
    if (behind <= std::min<uint64_t>(t->psns_taken, kPsnMask / 2)) return reply(Reason::None, 0);
    why = Reason::Psn;
  }
  if (why == Reason::None) why = remote_access_error(*t, p.rkey, p.wr_addr, p.wr_length);
  if (why == Reason::None && (p.flags & kWithImm) && t->recvs.empty()) why = Reason::NoReceive;
  if (why != Reason::None) return reply(why, t ? t->min_rnr_timer : 0);

  // remote_access_error found the rkey's MR for any write with bytes (a zero-length one has none).
  if (p.length) ring_read(n.wire, payload_at, host_address(*n.by_rkey.at(p.rkey), p.wr_addr + p.offset), p.length);
  t->expected_psn = (t->expected_psn + psn_span(p.length, p.mtu)) & kPsnMask;
  t->psns_taken += psn_span(p.length, p.mtu);
  if (p.flags & kWithImm) complete_write_with_imm(*t, p.wr_length, p.imm, p.src_qpn, p.src_lid);
  reply(Reason::None, 0);
}

// ---- Between processes: the sending end (the lock is held) ----

Nanos transport_period(const Qp& s) { return Nanos(int64_t(4096) << s.timeout); }
Nanos retransmit_after(const Qp& s) { return std::max(transport_period(s), kMinRetransmit); }

// When the sender gives up on a WR without progress, or max() for timeout 0 (wait forever).
Clock::time_point give_up_at(const Qp& s, const SendWr& wr) {
  return s.timeout == 0 ? Clock::time_point::max() : wr.progress_at + transport_period(s) * (s.retry_cnt + 1);
}

uint32_t psns_per_packet(const Qp& s) { return kPacketPayload / mtu_bytes(s.mtu); }

// One ACK or NAK for the head WR of one of this process's QPs.
void receive_answer(Nic& n, const Packet& p, Clock::time_point now) {
  if (p.size != packet_size(0) || p.length != 0 || p.status >= uint8_t(Reason::Count) || p.rnr_timer > 31 ||
      p.psn > kPsnMask) {
    std::fprintf(stderr, "soft_verbs: dropped a malformed ACK packet (from LID %u QP 0x%x)\n", unsigned(p.src_lid),
                 p.src_qpn);
    return;
  }
  auto found = n.qps.find(p.dst_qpn);
  if (found == n.qps.end()) return;  // the QP is gone: a late answer
  Qp& s = *found->second;
  if (s.state != IBV_QPS_RTS || s.dest_lid != p.src_lid || s.dest_qpn != p.src_qpn || s.pending.empty()) return;
  SendWr& wr = s.pending.front();
  const uint32_t distance = (p.psn - wr.start_psn) & kPsnMask;
  if (!wr.started || distance % psns_per_packet(s) != 0 || distance / psns_per_packet(s) != wr.acked) return;  // stale

  const Reason why = Reason(p.status);
  if (why == Reason::None) {
    ++wr.acked;
    wr.sent = std::max(wr.sent, wr.acked);  // an answer to a packet sent before a retransmission
    wr.progress_at = now;
    if (wr.acked < wr.packets) return;
    s.next_psn = (wr.start_psn + psn_span(wr.length, s.mtu)) & kPsnMask;
    return complete_head(s, wr.length);
  }
  if (access_denied(why)) return fail_head(s, IBV_WC_REM_ACCESS_ERR, reason_text(why));
  wr.sent = wr.acked;  // go back to the packet that was refused
  count(3);
  if (why == Reason::NoReceive) {
    if (s.rnr_retry != 7 && wr.rnr_tries >= s.rnr_retry)
      return fail_head(s, IBV_WC_RNR_RETRY_EXC_ERR, reason_text(why));
    ++wr.rnr_tries;
    wr.progress_at = now;  // the receiver answered: the transport timer starts again
    wr.ready_at = now + std::chrono::microseconds(10ull * kRnrTimer10us[p.rnr_timer]);
    return;
  }
  wr.last_nak = why;  // not delivered: tried again soon, until the transport timeout
  wr.ready_at = std::min(now + std::min(transport_period(s), kRetryPoll), give_up_at(s, wr));
}

// Runs the head WR of a QP connected to another process: starts it, puts (more of) its packets on
// the destination's wire, or, when its answers are overdue, sends them again or gives up.
void execute_remote(Qp& s, Clock::time_point now) {
  Nic& n = nic();
  SendWr& wr = s.pending.front();
  uint64_t length = 0;
  if (!local_length(s, wr, &length))
    return fail_head(s, IBV_WC_LOC_PROT_ERR, "SGE not inside an MR of this QP's PD with that lkey");
  if (!wr.started) {
    if (fail_on_purpose(s)) return;
    wr.started = true;
    wr.length = length;
    wr.packets = length == 0 ? 1 : uint32_t((length + kPacketPayload - 1) / kPacketPayload);
    wr.start_psn = s.next_psn;
    wr.progress_at = now;
  }
  if (now >= give_up_at(s, wr)) {
    live_peer_wire(n, s.dest_lid);  // if its owner died: unmapped, and its segment unlinked
    const std::string lid = std::to_string(s.dest_lid);
    const std::string why =
        (s.route != Route::Ok          ? std::string(route_text(s.route, true)) + " (to LID " + lid + ")"
         : wr.last_nak != Reason::None ? std::string(reason_text(wr.last_nak)) + " (NAK from LID " + lid + ")"
         : n.ethernet ? "no answer from LID " + lid + " (its process gone or stalled, or its QP's answers not routed?)"
                      : "no answer from LID " + lid + " (its process gone or stalled?)") +
        ", " + std::to_string(wr.acked) + " of " + std::to_string(wr.packets) + " packets acknowledged";
    return fail_head(s, IBV_WC_RETRY_EXC_ERR, why.c_str());
  }
  if (wr.sent == wr.packets) {  // all on the wire, some unanswered
    const auto resend_at = std::max(wr.sent_at, wr.progress_at) + retransmit_after(s);
    if (now < resend_at) { wr.ready_at = std::min(resend_at, give_up_at(s, wr)); return; }
    wr.sent = wr.acked;
    wr.last_nak = Reason::None;
    count(3);
    live_peer_wire(n, s.dest_lid);  // a port whose owner died: unmapped, and its segment unlinked
  }
  // A QP whose packets do not cross the fabric sends them all the same; none arrives.
  Wire* w = s.route == Route::Ok ? peer_wire(n, s.dest_lid) : nullptr;
  for (int budget = 16; wr.sent < wr.packets; ++wr.sent) {  // a few per sweep, so that QPs interleave
    if (!w) { wr.sent = wr.packets; break; }  // no port there, or dropped on the way: lost, as on a dead link
    if (budget-- == 0) { wr.ready_at = now; return; }
    Packet p{};
    const uint64_t offset = uint64_t(wr.sent) * kPacketPayload;
    p.length = uint32_t(std::min<uint64_t>(kPacketPayload, length - offset));
    p.size = packet_size(p.length);
    p.kind = kWrite;
    const bool last = wr.sent + 1 == wr.packets;
    p.flags = uint8_t((last ? kLast : 0) | (last && wr.opcode == IBV_WR_RDMA_WRITE_WITH_IMM ? kWithImm : 0));
    p.mtu = uint8_t(s.mtu);
    p.src_lid = n.lid;
    p.src_qpn = s.qp.qp_num;
    p.dst_qpn = s.dest_qpn;
    p.psn = (wr.start_psn + wr.sent * psns_per_packet(s)) & kPsnMask;
    p.rkey = wr.rkey;
    p.wr_addr = wr.remote_addr;
    p.wr_length = length;
    p.offset = offset;
    p.imm = last ? wr.imm : 0;
    if (p.length) gather(wr, offset, p.length, n.payload.data());
    const Append r = append(w, p, n.payload.data());
    if (r == Append::Full) {  // backpressure; once per ACK timeout without progress, is its reader alive?
      if (now - std::max(wr.progress_at, wr.looked_at) >= retransmit_after(s)) {
        wr.looked_at = now;
        live_peer_wire(n, s.dest_lid);  // a dead owner's wire is unmapped: the packets are lost from now on
      }
      wr.ready_at = now + kBackpressurePoll;
      return;
    }
    if (r == Append::Broken) w = nullptr;
  }
  wr.sent_at = now;
  wr.ready_at = std::min(now + retransmit_after(s), give_up_at(s, wr));
}

// Reads this port's wire, a bounded number of packets per sweep so that posters and pollers get
// the lock in between. True if any was read.
bool drain_wire(Nic& n, Clock::time_point now) {
  Wire* w = n.wire;
  uint64_t tail = w->tail;
  const uint64_t head = __atomic_load_n(&w->head, __ATOMIC_ACQUIRE);
  if (head == tail) return false;
  if (head - tail > kRingBytes || (head - tail) % 8 != 0) {
    std::fprintf(stderr, "soft_verbs: LID %u: the wire's head is corrupt: %llu bytes dropped\n", unsigned(n.lid),
                 static_cast<unsigned long long>(head - tail));
    __atomic_store_n(&w->tail, head, __ATOMIC_RELEASE);
    return true;
  }
  for (int budget = 32; tail != head && budget > 0; --budget) {  // 2 MiB at most under the lock
    Packet p;
    ring_read(w, tail, &p, sizeof p);
    if (head - tail < sizeof p || p.size < sizeof p || p.size > head - tail || p.size % 8 != 0 ||
        p.size > packet_size(kPacketPayload)) {
      // The framing cannot be trusted: nothing after this point can be.
      std::fprintf(stderr, "soft_verbs: LID %u: dropped %llu bytes of the wire: a packet of size %u\n",
                   unsigned(n.lid), static_cast<unsigned long long>(head - tail), p.size);
      tail = head;
      break;
    }
    if (p.kind == kWrite) {
      receive_write(n, p, tail + sizeof p);
    } else if (p.kind == kAck) {
      receive_answer(n, p, now);
    } else {
      std::fprintf(stderr, "soft_verbs: LID %u: dropped a packet of unknown kind %u\n", unsigned(n.lid), unsigned(p.kind));
    }
    tail += p.size;
  }
  __atomic_store_n(&w->tail, tail, __ATOMIC_RELEASE);  // after the payloads were read
  return true;
}

// ---- The NIC thread ----

// Drains the wire, sends waiting answers, then runs one WR per QP per sweep, so QPs interleave;
// sleeps on the doorbell until the earliest delayed WR is due.
void nic_loop(uint64_t epoch) {
  Nic& n = nic();
  std::unique_lock<std::mutex> lock(n.mu);
  while (n.epoch == epoch) {
    Wire* wire = n.wire;  // stays mapped until this thread is joined
    // Read before looking for work: a packet or post after this changes it, so the wait returns.
    const uint32_t bell = __atomic_load_n(&wire->doorbell, __ATOMIC_ACQUIRE);
    const auto now = Clock::now();
    auto next = Clock::time_point::max();
    bool progressed = drain_wire(n, now), waiting = false;
    progressed |= send_answers(n, &waiting);
    if (waiting) next = now + kBackpressurePoll;
    for (auto& entry : n.qps) {
      Qp& q = *entry.second;
      if (q.pending.empty()) continue;
      if (q.pending.front().ready_at > now) { next = std::min(next, q.pending.front().ready_at); continue; }
      if (q.dest_lid == n.lid) execute_local(q, now);
      else execute_remote(q, now);
      progressed = true;
    }
    if (progressed) {  // let posters and pollers in between sweeps
      lock.unlock();
      std::this_thread::yield();
      lock.lock();
      continue;
    }
    // Woken by the doorbell; a timeout bounds the sleep anyway (a peer that died holds no bell).
    const Nanos wait = next == Clock::time_point::max() ? Nanos(std::chrono::milliseconds(100))
                                                        : std::chrono::duration_cast<Nanos>(next - now);
    lock.unlock();
    futex_wait(&wire->doorbell, bell, wait);
    lock.lock();
  }
}

// Call with the lock held; returns the thread to join after unlocking.
std::thread stop_nic_locked() {
  Nic& n = nic();
  ++n.epoch;
  kick(n);
  return std::move(n.thread);
}

// Stops the NIC thread and takes the port down at unload or exit if contexts were left open.
struct NicStopper {
  ~NicStopper() {
    Nic& n = nic();
    if (n.wire_pid != getpid()) return;  // never opened, or a forked child: no thread or port of its own
    std::thread t;
    { std::lock_guard<std::mutex> lock(n.mu); t = stop_nic_locked(); }
    if (t.joinable()) t.join();
    std::lock_guard<std::mutex> lock(n.mu);
    close_port(n);
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
      kick(n);
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
  kick(n);
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

// The port an address vector names (by GID if it has a GRH, else by LID; on Ethernet by GID
// only, dlid ignored) and the dgid's family, or 0 with `why`.
uint16_t av_lid(const Nic& n, const ibv_ah_attr& av, const char** why, GidFamily* family) {
  *family = GidFamily::LinkLocal;
  if (!av.is_global) return av.dlid;
  const uint16_t lid = lid_of_gid(av.grh.dgid, n.ethernet, family);
  if (lid == 0)
    *why = n.ethernet ? "ah_attr.grh.dgid is not a soft_verbs port's GID (fe80::25e:fffe:0:<lid> or "
                        "::ffff:10.77.<lid / 256>.<lid % 256>)"
                      : "ah_attr.grh.dgid is not a soft_verbs port's GID (fe80::25e:fffe:0:<lid>)";
  else if (!n.ethernet && av.dlid != 0 && av.dlid != lid) *why = "ah_attr.dlid and ah_attr.grh.dgid name different ports";
  else return lid;
  return 0;
}

// The attribute values the mask says are present; nullptr when they are acceptable.
const char* bad_attribute(Nic& n, const ibv_qp_attr& a, int mask) {
  const int access_bits =
      IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC;
  if ((mask & IBV_QP_PKEY_INDEX) && a.pkey_index != 0) return "pkey_index must be 0 (one P_Key)";
  if ((mask & IBV_QP_PORT) && a.port_num != kPort) return "port_num must be 1";
  if ((mask & IBV_QP_ACCESS_FLAGS) && (a.qp_access_flags & ~access_bits)) return "unknown qp_access_flags bits";
  if (mask & IBV_QP_AV) {
    const ibv_ah_attr& av = a.ah_attr;
    if (av.port_num != kPort) return "ah_attr.port_num must be 1";
    if (n.ethernet) {
      if (!av.is_global) return "ah_attr.is_global must be 1 on a RoCE port (every packet carries a GRH)";
      if (av.grh.sgid_index >= kRoceGids) return "ah_attr.grh.sgid_index must be below 4 (the port's GID table length)";
    } else if (av.is_global && av.grh.sgid_index != 0) {
      return "ah_attr.grh.sgid_index must be 0";
    }
    const char* why = nullptr;
    GidFamily family;
    const uint16_t lid = av_lid(n, av, &why, &family);
    if (why) return why;
    bool other_fabric = false;
    if (lid != n.lid && !live_peer_wire(n, lid, &other_fabric))
      return other_fabric ? "the address vector names a port of the other link layer (SOFT_VERBS_LINK_LAYER differs "
                            "between the processes): not on this fabric"
                          : "the address vector names no live soft_verbs port (neither this process's LID nor "
                            "another process's)";
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
  if (const std::string& bad = nic().config_error; !bad.empty()) {  // set once, before any thread could read it
    std::fprintf(stderr, "soft_verbs: ibv_open_device: %s\n", bad.c_str());
    errno = EINVAL;
    return nullptr;
  }
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
  if (n.contexts == 0) {  // the port comes up: its LID and wire, then the NIC thread that reads it
    if (!open_port(n)) {
      const int err = errno;
      pthread_mutex_destroy(&ctx.mutex);
      delete c;
      errno = err;
      return nullptr;
    }
    n.thread = std::thread(nic_loop, n.epoch);
  }
  ++n.contexts;
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
  if (finished.joinable()) {
    finished.join();
    std::lock_guard<std::mutex> lock(n.mu);
    if (n.contexts == 0) close_port(n);  // unless another context opened meanwhile
  }
  pthread_mutex_destroy(&context->mutex);
  delete &as_context(context);
  return 0;
}

// rdma-core exports this symbol with `struct _compat_ibv_port_attr *`: the ibv_port_attr layout
// up to `flags`. Callers may pass either struct, so only that prefix is written.
SOFT_VERBS_EXPORT int ibv_query_port(ibv_context* context, uint8_t port_num, _compat_ibv_port_attr* out) {
  if (!context || port_num != kPort) return EINVAL;
  Nic& n = nic();
  std::lock_guard<std::mutex> lock(n.mu);
  ibv_port_attr a{};
  a.state = IBV_PORT_ACTIVE;
  a.max_mtu = kActiveMtu;
  a.active_mtu = kActiveMtu;
  a.gid_tbl_len = int(gid_table_length(n.ethernet));
  a.max_msg_sz = uint32_t(kMaxMessage);
  a.pkey_tbl_len = 1;
  a.lid = n.ethernet ? 0 : n.lid;  // RoCE has no LIDs: the port is addressed by GID only
  a.sm_lid = n.ethernet ? 0 : n.lid;
  a.max_vl_num = 1;
  a.active_width = 2;  // 4x
  a.active_speed = 32; // 25 Gb/s (EDR lane)
  a.phys_state = 5;    // LinkUp
  a.link_layer = uint8_t(n.link_layer());
  std::memcpy(out, &a, offsetof(ibv_port_attr, flags) + sizeof a.flags);
  return 0;
}

SOFT_VERBS_EXPORT int ibv_query_gid(ibv_context* context, uint8_t port_num, int index, ibv_gid* gid) {
  if (!context || port_num != kPort || index < 0) return -1;
  Nic& n = nic();
  std::lock_guard<std::mutex> lock(n.mu);
  ibv_gid_entry e;
  if (!gid_entry(n.ethernet, n.lid, uint32_t(index), &e)) return -1;
  *gid = e.gid;
  return 0;
}

// The symbol behind verbs.h's inline ibv_query_gid_ex: 0 or an errno value, as rdma-core's.
// Only sizeof(ibv_gid_entry) bytes are written when the caller's entry is larger.
SOFT_VERBS_EXPORT int _ibv_query_gid_ex(ibv_context* context, uint32_t port_num, uint32_t gid_index,
                                        ibv_gid_entry* entry, uint32_t flags, size_t entry_size) {
  if (!context || port_num != kPort || flags != 0 || !entry || entry_size < sizeof(ibv_gid_entry)) return EINVAL;
  Nic& n = nic();
  std::lock_guard<std::mutex> lock(n.mu);
  return gid_entry(n.ethernet, n.lid, gid_index, entry) ? 0 : ENODATA;
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

namespace {

// The checks ibv_reg_mr and ibv_reg_dmabuf_mr share. As the kernel: remote write (or atomic)
// access requires local write access.
bool valid_registration(const ibv_pd* pd, size_t length, int access) {
  const bool remote = access & (IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC);
  return pd && length != 0 && (!remote || (access & IBV_ACCESS_LOCAL_WRITE));
}

// Registers [addr, addr + length) of the caller's, which the NIC reaches at `host` (a dma-buf's
// `map` is unmapped at ibv_dereg_mr).
ibv_mr* register_mr(ibv_pd* pd, void* addr, size_t length, int access, uint8_t* host, void* map, size_t map_length) {
  Nic& n = nic();
  std::lock_guard<std::mutex> lock(n.mu);
  auto* m = new Mr{};
  m->mr.context = pd->context;
  m->mr.pd = pd;
  m->mr.addr = addr;
  m->mr.length = length;
  m->host = host;
  m->map = map;
  m->map_length = map_length;
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

}  // namespace

// Pins user memory. SOFT_VERBS_PEERMEM=0 models a host without nvidia-peermem: the kernel cannot
// pin GPU memory, and since the engine registers nothing else, every registration fails as that
// one would (EFAULT from the page pinning), after the argument checks.
SOFT_VERBS_EXPORT ibv_mr* ibv_reg_mr(ibv_pd* pd, void* addr, size_t length, int access) {
  if (!valid_registration(pd, length, access)) {
    errno = EINVAL;
    return nullptr;
  }
  if (!nic().peermem.load(std::memory_order_relaxed)) {
    std::fprintf(stderr, "soft_verbs: ibv_reg_mr(%p, %zu): EFAULT: no GPUDirect peer memory on this host "
                 "(SOFT_VERBS_PEERMEM=0: nvidia-peermem not loaded); use ibv_reg_dmabuf_mr\n", addr, length);
    errno = EFAULT;
    return nullptr;
  }
  return register_mr(pd, addr, length, access, static_cast<uint8_t*>(addr), nullptr, 0);
}

// Registers [offset, offset + length) of a dma-buf, addressed as [iova, iova + length). The NIC
// maps the fd itself (as the kernel takes its own reference, the caller may close it at once) and
// reaches the bytes through that mapping only: a second view of the same pages, as a NIC's DMA.
// The checks are the kernel's (ib_umem_dmabuf_get, mlx5): the offset range must not wrap and the
// buffer must cover it, and iova and offset must lie at the same offset within a page.
SOFT_VERBS_EXPORT ibv_mr* ibv_reg_dmabuf_mr(ibv_pd* pd, uint64_t offset, size_t length, uint64_t iova, int fd,
                                            int access) {
  const uint64_t page = uint64_t(sysconf(_SC_PAGESIZE));
  uint64_t end = 0, iova_end = 0;
  if (!valid_registration(pd, length, access) || __builtin_add_overflow(offset, uint64_t(length), &end) ||
      __builtin_add_overflow(iova, uint64_t(length), &iova_end) || end > uint64_t(SIZE_MAX) - page) {
    errno = EINVAL;
    return nullptr;
  }
  struct stat st {};
  if (fd < 0 || fcntl(fd, F_GETFD) < 0 || fstat(fd, &st) != 0) {
    errno = EBADF;
    return nullptr;
  }
  if (!S_ISREG(st.st_mode) || uint64_t(st.st_size) < end || (iova ^ offset) % page != 0) {
    errno = EINVAL;  // not a buffer (as a non-dma-buf fd), too small, or iova and offset not congruent
    return nullptr;
  }
  const size_t map_length = size_t((end + page - 1) / page * page);
  void* map = mmap(nullptr, map_length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) return nullptr;  // errno from mmap: EACCES for an fd not open for writing
  return register_mr(pd, reinterpret_cast<void*>(uintptr_t(iova)), length, access, static_cast<uint8_t*>(map) + offset,
                     map, map_length);
}

SOFT_VERBS_EXPORT int ibv_dereg_mr(ibv_mr* mr) {
  Nic& n = nic();
  void* map;
  size_t map_length;
  {
    std::lock_guard<std::mutex> lock(n.mu);
    n.by_lkey.erase(mr->lkey);
    n.by_rkey.erase(mr->rkey);
    --as_pd(mr->pd).users;
    Mr* m = reinterpret_cast<Mr*>(mr);
    map = m->map;
    map_length = m->map_length;
    delete m;
  }
  // Unreachable by the NIC since it left the tables (every access looks the key up under the lock).
  if (map) munmap(map, map_length);
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
  count(4);
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
  if (const char* why = bad_attribute(n, *attr, mask)) {
    std::fprintf(stderr, "soft_verbs: QP 0x%x: modify_qp %s -> %s: %s\n", qp->qp_num, from, to, why);
    return EINVAL;
  }
  if (next == IBV_QPS_RESET) {
    reset_qp(q);
  } else {
    if (mask & IBV_QP_ACCESS_FLAGS) q.access = attr->qp_access_flags;
    if (mask & IBV_QP_AV) {
      const char* checked_above = nullptr;
      GidFamily family;
      q.dest_lid = av_lid(n, attr->ah_attr, &checked_above, &family);
      q.route = n.ethernet ? route_of(attr->ah_attr.grh.sgid_index, family) : Route::Ok;
    }
    if (mask & IBV_QP_PATH_MTU) q.mtu = attr->path_mtu;
    if (mask & IBV_QP_DEST_QPN) q.dest_qpn = attr->dest_qp_num;
    if (mask & IBV_QP_RQ_PSN) {
      q.expected_psn = attr->rq_psn & kPsnMask;
      q.psns_taken = 0;
    }
    if (mask & IBV_QP_SQ_PSN) q.next_psn = attr->sq_psn & kPsnMask;
    if (mask & IBV_QP_TIMEOUT) q.timeout = attr->timeout;
    if (mask & IBV_QP_RETRY_CNT) q.retry_cnt = attr->retry_cnt;
    if (mask & IBV_QP_RNR_RETRY) q.rnr_retry = attr->rnr_retry;
    if (mask & IBV_QP_MIN_RNR_TIMER) q.min_rnr_timer = attr->min_rnr_timer;
    if (next == IBV_QPS_ERR) enter_error(q);
    q.state = next;
  }
  qp->state = next;
  kick(n);
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
  return what >= 0 && what < 5 ? nic().stats[what].load(std::memory_order_relaxed) : 0;
}

// For tests: every WR posted from now on waits `us` microseconds before it executes, as on a slow
// link (a put that is still in flight when its target goes away).
SOFT_VERBS_EXPORT void soft_verbs_set_delay_us(uint32_t us) { nic().delay_us.store(us, std::memory_order_relaxed); }

// For tests: from now on this process's host has GPUDirect peer memory (nonzero: ibv_reg_mr works)
// or not (0: every ibv_reg_mr fails with EFAULT), as SOFT_VERBS_PEERMEM set it at the start. MRs
// registered already stay.
SOFT_VERBS_EXPORT void soft_verbs_set_peermem(int on) { nic().peermem.store(on != 0, std::memory_order_relaxed); }

// For tests: the next WR to reach its destination fails with `status` (an ibv_wc_status), as a
// NIC reports a fault: its QP goes to the error state.
SOFT_VERBS_EXPORT void soft_verbs_fail_next(int status) {
  std::lock_guard<std::mutex> l(nic().mu);
  nic().fail_next = status;
}

// For tests: the next receive completion this NIC raises (a write with immediate that arrived)
// has `status`, as a NIC reports a fault on the receiving side; the sender's write succeeded.
SOFT_VERBS_EXPORT void soft_verbs_fail_next_receive(int status) {
  std::lock_guard<std::mutex> l(nic().mu);
  nic().fail_next_receive = status;
}
