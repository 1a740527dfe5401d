// The ibverbs NIC engine (nic_engine.h): the proxy's puts as RDMA writes over RC queue pairs,
// one per (rank, peer it puts to), from this rank's window, registered with the NIC, into the peer's.
//
//   put          an RDMA write
//   put_signal   an RDMA write with immediate: the immediate carries the slot and the amount
//                (imm = slot << 24 | add; an add of 2^24 or more goes as several)
//   signal       a write of no bytes with immediate
//
// The receiving rank's engine takes the immediates from its receive queue and raises its own
// signal (source = the queue pair's peer, slot) with a host atomic, after a GPUDirect flush
// (cudaDeviceFlushGPUDirectRDMAWrites, where the GPU has it), so a kernel that sees the signal sees the bytes: the
// write and its immediate are one message, whose completion comes after its data is placed, and
// a queue pair delivers its messages in order, so the earlier puts to that peer are there too.
// The signals stay in host memory and are never registered with the NIC. An immediate naming a
// slot that does not exist is a failure, never a write.
//
// A put is complete when its last work request's completion arrives (the peer acknowledged it:
// the source may be reused). Every work request is signalled, so the send queues never hold
// requests whose completions the engine would not see.
//
// The ranks find each other through a VerbsDirectory: each publishes its address (LID, GID), its
// window (address, rkey, bytes) and the queue-pair number it made for each peer it puts to (0 for
// the other ranks: with two hops a rank's network puts go only to the ranks of the other nodes
// with its local index, N - 1 queue pairs rather than R - 1), and connects its queue pair to a
// peer (RTR, RTS) once the peer has published. The ranks of one process
// share a directory, and a put to a peer waits until the peer's queue pair for it has reached
// RTR (rather than be dropped and retransmitted an ACK timeout later). Between processes (one
// rank per process) each process's directory is filled from the peers' endpoints, exchanged as
// text with their buffers (verbs_endpoint_text, verbs_import_endpoint): importing one connects
// the queue pair to that peer at once, and the process group's barrier after every import means
// every queue pair is in RTR before any operation. A peer that has not published is refused like
// a window that is not attached.
//
// Settings come from the environment (VerbsSettings::from_environment):
//   SWITCHYARD_IBVERBS_LIBRARY    the library to open (default libibverbs.so.1)
//   SWITCHYARD_IBVERBS_DEVICE     the device (default: the first)
//   SWITCHYARD_IBVERBS_PORT       its port (default 1)
//   SWITCHYARD_IBVERBS_GID_INDEX  the GID to address peers by (default: by LID on InfiniBand;
//                                 on Ethernet, RoCE, the port's first RoCE v2 GID of an IPv4
//                                 address, else of a global IPv6 one, else a link-local one, else
//                                 GID 0: RoCE v1 frames do not cross an IP router, and every rank
//                                 chooses alike, so both ends of a queue pair speak one version)
//   SWITCHYARD_IBVERBS_DMABUF     how the window (GPU memory) is registered: auto (default:
//                                 dma-buf where the driver and rdma-core have it, else peer
//                                 memory), 1 (dma-buf only), 0 (peer memory only)
//   SWITCHYARD_IBVERBS_TIMEOUT    the queue pairs' local ACK timeout exponent (default 14:
//                                 4.096 us * 2^14, about 67 ms, before a retry)
//
// After a failed work request the queue pairs are in error and stay so: every later put fails,
// and the buffer must be made again.
//
// The window is device memory. It is registered through dma-buf where it can be (the driver
// exports the allocation's pages, cuMemGetHandleForAddressRange, and ibv_reg_dmabuf_mr registers
// them: an open GPU kernel module and rdma-core 34 or later, no extra module), else with
// ibv_reg_mr, which needs the nvidia-peermem module; when neither works the error says why each
// did not.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "nic_engine.h"

namespace sy::cuda::transport {

struct VerbsSettings {
  std::string library = "libibverbs.so.1";
  std::string device;  // empty: the first
  int port = 1;
  int gid_index = -1;  // -1: by LID on InfiniBand, chosen on Ethernet (RoCE v2 first)
  int timeout = 14;
  // How the window is registered: dma-buf, then peer memory (Auto); dma-buf only; peer memory only.
  enum class DmaBuf { Auto, Only, Never } dmabuf = DmaBuf::Auto;
  static Error from_environment(VerbsSettings* out);
};

// Where the ranks of one buffer set find each other (see the top).
class VerbsDirectory;
std::shared_ptr<VerbsDirectory> make_verbs_directory(int ranks);

// Whether this build has the ibverbs engine (it was compiled with the ibverbs headers).
bool verbs_compiled();

// Rank `rank`'s engine (of the directory's ranks) on GPU `device`, its window registered with the
// NIC, with a queue pair to each of `peers`: the ranks it puts to, each of which puts to it (the
// two hops: the ranks of the other nodes with its local index); empty: every other rank.
Error create_verbs_engine(const std::shared_ptr<VerbsDirectory>& directory, int rank, const std::vector<int>& peers,
                          int slots, int device,
                          uint8_t* window, uint64_t window_bytes, const VerbsSettings& settings,
                          std::unique_ptr<NicEngine>* out);

// Between processes: this rank's endpoint, as text for its peers (after create_verbs_engine,
// before the engine starts), and a peer's, checked (it comes from another process) and entered
// into the engine's directory with this rank's queue pair to it connected.
Error verbs_endpoint_text(NicEngine& engine, std::string* out);
Error verbs_import_endpoint(NicEngine& engine, int peer, const std::string& text);

}  // namespace sy::cuda::transport
