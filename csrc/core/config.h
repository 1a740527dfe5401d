// Default tuning per rank count.
#pragma once

#include <cstdint>

namespace sy::core {

struct Config {
  int32_t num_sms = 20;
  int32_t nvl_chunk_send = 6;
  int32_t nvl_chunk_recv = 256;
  int32_t rdma_chunk_send = 6;
  int32_t rdma_chunk_recv = 256;
};

// DeepEP's published dispatch table for 2..160 ranks (reference/deepep.md §1.A); other counts
// take the entry of the next larger tabulated size, and beyond 160 the 160 entry.
inline Config default_config(int32_t ranks) {
  struct Row { int32_t ranks, send, recv, rsend, rrecv; };
  static constexpr Row rows[] = {
      {2, 24, 256, 6, 128},   {4, 6, 256, 6, 128},    {8, 6, 256, 6, 128},
      {16, 36, 288, 20, 128}, {24, 32, 288, 8, 128},  {32, 32, 288, 8, 128},
      {48, 32, 288, 8, 128},  {64, 32, 288, 8, 128},  {96, 20, 480, 12, 128},
      {128, 20, 560, 12, 128}, {144, 32, 720, 12, 128}, {160, 28, 720, 12, 128},
  };
  Config c;
  const Row* pick = &rows[sizeof(rows) / sizeof(rows[0]) - 1];
  for (const Row& r : rows) {
    if (ranks <= r.ranks) {
      pick = &r;
      break;
    }
  }
  c.nvl_chunk_send = pick->send;
  c.nvl_chunk_recv = pick->recv;
  c.rdma_chunk_send = pick->rsend;
  c.rdma_chunk_recv = pick->rrecv;
  return c;
}

}  // namespace sy::core
