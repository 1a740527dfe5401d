// The software NIC's wire between processes (soft_verbs.cpp): each port's inbound ring of packets
// in a POSIX shared-memory segment of its owner's (mode 0600, named by the user and the port's
// LID), appended to by the other processes' NIC threads under a robust process-shared mutex and
// read by the owner's; and which owners are still alive, so that a dead one's segment is
// reclaimed. Nothing read from a segment is trusted by its reader.
#pragma once

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
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>

namespace soft_verbs_wire {

// A segment still without its magic this long after it was made was left by a process that
// died while making it.
constexpr time_t kUnfinishedSegmentSeconds = 10;

// ---- The wire: one port's inbound ring of packets, in its shared-memory segment ----

constexpr uint32_t kWireMagic = 0x31575653;  // "SVW1"
constexpr uint32_t kWireVersion = 2;  // 2: link_layer
constexpr uint64_t kRingBytes = 4ull << 20;     // a power of two, a multiple of 8
constexpr uint32_t kPacketPayload = 64u << 10;  // a multiple of every MTU: packets take whole PSNs

enum PacketKind : uint8_t { kWrite = 1, kAck = 2 };
enum PacketFlags : uint8_t { kLast = 1, kWithImm = 2 };

// One packet as it lies on a wire; a WRITE's payload follows it, and the next packet follows that
// at the next multiple of 8 bytes. Nothing in it is trusted by its reader.
struct Packet {
  uint32_t size;       // this header and the payload, rounded up to 8
  uint8_t kind;        // kWrite or kAck
  uint8_t flags;       // kWrite: kLast on a write's last packet, kWithImm beside it for WRITE_WITH_IMM
  uint8_t status;      // kAck: the Reason (None: an ACK, else a NAK)
  uint8_t mtu;         // kWrite: the sender's path MTU (enum ibv_mtu)
  uint16_t src_lid;    // the port that sent it, where the answer goes
  uint8_t rnr_timer;   // kAck, an RNR NAK: the receiver's min_rnr_timer code
  uint8_t reserved0;
  uint32_t src_qpn, dst_qpn;
  uint32_t psn;        // kWrite: this packet's first PSN; kAck: the PSN of the packet answered
  uint32_t rkey;
  uint32_t length;     // payload bytes
  uint64_t wr_addr, wr_length;  // kWrite: the write's whole remote range, checked by every packet
  uint64_t offset;              // kWrite: where this payload goes, from wr_addr
  uint32_t imm;                 // kWrite, last packet of a WRITE_WITH_IMM: network order
  uint32_t reserved1;
};
static_assert(sizeof(Packet) == 64, "the packet header is 64 bytes");

uint32_t packet_size(uint32_t length) { return (uint32_t(sizeof(Packet)) + length + 7) & ~7u; }

// A shared-memory segment of its owner's port. The owner writes the identity once, `magic`
// last; producers append under `producers` and then ring `doorbell`; only the owner moves `tail`.
struct Wire {
  uint32_t magic, version;
  int32_t owner_pid;
  uint32_t lid;
  uint64_t owner_start;  // the owner's start time (/proc/<pid>/stat): a reused pid is not the owner
  uint32_t closed;       // the owner stopped: senders unmap it
  uint32_t doorbell;     // a futex word, bumped after each append and by the owner's own posts
  // The owner's port's link layer (IBV_LINK_LAYER_INFINIBAND or _ETHERNET): an InfiniBand port
  // and a RoCE port are on different fabrics, so neither sends to the other.
  uint32_t link_layer;
  uint32_t reserved;
  pthread_mutex_t producers;     // process-shared, robust
  alignas(64) uint64_t head;     // bytes ever appended (under `producers`)
  alignas(64) uint64_t tail;     // bytes ever consumed (by the owner)
  alignas(64) uint8_t ring[kRingBytes];
};

void futex_wake(uint32_t* word) { syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0); }

void futex_wait(uint32_t* word, uint32_t seen, std::chrono::nanoseconds timeout) {
  if (timeout <= std::chrono::nanoseconds(0)) return;
  const timespec ts{time_t(timeout.count() / 1000000000), long(timeout.count() % 1000000000)};
  syscall(SYS_futex, word, FUTEX_WAIT, seen, &ts, nullptr, 0);
}

void ring_doorbell(Wire* w) {
  __atomic_fetch_add(&w->doorbell, 1, __ATOMIC_SEQ_CST);
  futex_wake(&w->doorbell);
}

void ring_write(Wire* w, uint64_t pos, const void* src, size_t length) {
  const size_t at = size_t(pos % kRingBytes), first = std::min<size_t>(length, kRingBytes - at);
  std::memcpy(w->ring + at, src, first);
  std::memcpy(w->ring, static_cast<const uint8_t*>(src) + first, length - first);
}

void ring_read(const Wire* w, uint64_t pos, void* dst, size_t length) {
  const size_t at = size_t(pos % kRingBytes), first = std::min<size_t>(length, kRingBytes - at);
  std::memcpy(dst, w->ring + at, first);
  std::memcpy(static_cast<uint8_t*>(dst) + first, w->ring, length - first);
}

enum class Append { Done, Full, Broken };

// Appends one packet to another port's wire, or says it is full (the caller tries again later).
Append append(Wire* w, const Packet& p, const uint8_t* payload) {
  int rc = pthread_mutex_lock(&w->producers);
  // A producer died holding the lock: it had not moved `head` yet, so the ring is intact.
  if (rc == EOWNERDEAD) rc = pthread_mutex_consistent(&w->producers);
  if (rc != 0) return Append::Broken;
  const uint64_t head = w->head, tail = __atomic_load_n(&w->tail, __ATOMIC_ACQUIRE);
  Append result = Append::Done;
  if (head - tail > kRingBytes) {
    result = Append::Broken;
  } else if (kRingBytes - (head - tail) < p.size) {
    result = Append::Full;
  } else {
    ring_write(w, head, &p, sizeof p);
    if (p.length) ring_write(w, head + sizeof p, payload, p.length);
    __atomic_store_n(&w->head, head + p.size, __ATOMIC_RELEASE);
  }
  pthread_mutex_unlock(&w->producers);
  if (result == Append::Done) ring_doorbell(w);
  return result;
}

// ---- Which processes are alive, and the segments' names ----

// Field 3 (state) and 22 (start time) of /proc/<pid>/stat; false when it cannot be read.
bool read_stat(pid_t pid, char* state, uint64_t* start) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", int(pid));
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buf[1024];
  const ssize_t got = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (got <= 0) return false;
  buf[got] = 0;
  const char* p = std::strrchr(buf, ')');  // the command may hold spaces and parentheses
  if (!p || p[1] != ' ') return false;
  p += 2;
  *state = *p;
  for (int field = 3; field < 22; ++field) {
    p = std::strchr(p, ' ');
    if (!p) return false;
    ++p;
  }
  *start = std::strtoull(p, nullptr, 10);
  return true;
}

uint64_t own_start() {
  char state;
  uint64_t start = 0;
  return read_stat(getpid(), &state, &start) ? start : 0;
}

// Whether the process that made a segment still runs: the pid exists, is not a zombie, and
// started when the segment says (else the pid was reused).
bool owner_alive(int32_t pid, uint64_t start) {
  if (pid <= 0) return false;
  if (kill(pid_t(pid), 0) != 0 && errno == ESRCH) return false;
  char state;
  uint64_t started = 0;
  if (!read_stat(pid_t(pid), &state, &started)) return own_start() == 0;  // gone, unless there is no /proc
  return state != 'Z' && state != 'X' && (start == 0 || started == start);
}

std::string wire_name(uint32_t lid) {
  return "/soft_verbs." + std::to_string(geteuid()) + "." + std::to_string(lid);
}

// The identity a segment starts with (the first fields of Wire), read without mapping it.
struct WireIdentity {
  uint32_t magic, version;
  int32_t owner_pid;
  uint32_t lid;
  uint64_t owner_start;
};

// Unlinks the segment of `lid` if its owner is gone; true if it did, or the name is free now.
// Reclaimers of one segment take its flock in turn and unlink only the segment they inspected, so
// that one cannot unlink the segment another has just made under the same name.
bool reclaim_if_dead(uint32_t lid) {
  const std::string name = wire_name(lid);
  const int fd = shm_open(name.c_str(), O_RDONLY | O_CLOEXEC, 0);
  if (fd < 0) return errno == ENOENT;
  bool freed = false;
  struct stat st {};
  if (flock(fd, LOCK_EX) == 0 && fstat(fd, &st) == 0 && st.st_uid == geteuid()) {
    struct stat now {};
    const int again = shm_open(name.c_str(), O_RDONLY | O_CLOEXEC, 0);
    const bool same = again >= 0 && fstat(again, &now) == 0 && now.st_ino == st.st_ino && now.st_dev == st.st_dev;
    if (again >= 0) close(again);
    WireIdentity id{};
    const bool made = size_t(st.st_size) >= sizeof(Wire) && pread(fd, &id, sizeof id, 0) == ssize_t(sizeof id) &&
                      id.magic == kWireMagic;
    const bool dead = made ? !owner_alive(id.owner_pid, id.owner_start)
                           : std::time(nullptr) - st.st_mtime > kUnfinishedSegmentSeconds;
    if (!same) {
      freed = true;  // replaced or removed meanwhile: try the name again
    } else if (dead && shm_unlink(name.c_str()) == 0) {
      freed = true;
      if (made) std::fprintf(stderr, "soft_verbs: removed %s, left by process %d\n", name.c_str(), int(id.owner_pid));
    }
  }
  close(fd);  // drops the flock
  return freed;
}

}  // namespace soft_verbs_wire
