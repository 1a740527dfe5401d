// The channel the two hops' kernels drive (rdma.h): the CPU proxy's, or, in a build with NCCL's
// device API (SY_NCCL_GIN) and a buffer whose network is NCCL GIN, GIN's. One type, so that the
// kernels are compiled once for both; which one a channel is never changes, so the branch in
// every call goes the same way for a whole operation.
#pragma once

#include <cstdint>

#include "proxy_channel.cuh"
#include "rdma.h"
#if SY_NCCL_GIN
#include "gin_channel.cuh"
#endif

namespace sy::cuda::transport {

struct NetChannel {
  ProxyChannel proxy;
#if SY_NCCL_GIN
  GinChannel gin;
  int32_t on_gin = 0;
#endif
};

__device__ inline bool on_gin(const NetChannel& ch) {
#if SY_NCCL_GIN
  return ch.on_gin != 0;
#else
  return false;
#endif
}

#if SY_NCCL_GIN
#define SY_NET_CALL(ch, call) (on_gin(ch) ? call(ch.gin) : call(ch.proxy))
#else
#define SY_NET_CALL(ch, call) call(ch.proxy)
#endif

__device__ inline TransportStatus put_signal(const NetChannel& ch, int peer, uint64_t src, uint64_t dst,
                                             uint64_t bytes, uint32_t slot, uint64_t add) {
  const auto call = [&](const auto& c) { return put_signal(c, peer, src, dst, bytes, slot, add); };
  return SY_NET_CALL(ch, call);
}

__device__ inline TransportStatus signal(const NetChannel& ch, int peer, uint32_t slot, uint64_t add) {
  const auto call = [&](const auto& c) { return signal(c, peer, slot, add); };
  return SY_NET_CALL(ch, call);
}

__device__ inline uint64_t read_signal(const NetChannel& ch, int source, int slot) {
  const auto call = [&](const auto& c) { return read_signal(c, source, slot); };
  return SY_NET_CALL(ch, call);
}

#undef SY_NET_CALL

// The proxy's refusal of a descriptor, also of one posted earlier and accepted then (its NIC
// failed the put); GIN refuses only in the call itself (its put's range checks), so never here.
__device__ inline TransportStatus refusal(const NetChannel& ch) {
  return on_gin(ch) ? TransportStatus{} : refusal(ch.proxy);
}

// The proxy's descriptor `index` of this channel, which a refusal names; GIN posts no
// descriptors: null.
__device__ inline const RdmaDescriptor* posted(const NetChannel& ch, uint64_t index) {
  return on_gin(ch) ? nullptr : &posted(ch.proxy, index);
}

}  // namespace sy::cuda::transport
