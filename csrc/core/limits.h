// Hard limits of the protocol. They size fixed regions of the shared buffer, so changing one
// changes the buffer plan (and is caught by the plan's tests).
#pragma once

#include <cstdint>

namespace sy::core {

// Top-k entries per token. DeepEP's normal kernels allow 32 as well.
inline constexpr int kMaxTopk = 32;
// Ranks in one buffer set. Count matrices are R x R ints in every rank's header.
inline constexpr int kMaxRanks = 1024;
// Experts hosted by one rank; sizes the per-source expert-count rows of the header.
inline constexpr int kMaxExpertsPerRank = 1024;
// Channels per token; keeps a token record far below 2 GiB and every offset in int64.
inline constexpr int kMaxHidden = 65536;
// FP8 scales: one per 128 channels.
inline constexpr int kScaleBlock = 128;
// Every record, row and region is aligned to this many bytes (16-byte vector accesses).
inline constexpr int kAlignBytes = 16;
// Regions start on cache-line-sized boundaries so flags of different writers never share a line.
inline constexpr int kRegionAlignBytes = 128;
// Default deadline of every wait.
inline constexpr int64_t kDefaultTimeoutMs = 20000;

}  // namespace sy::core
