// The errors of the peer protocol, worded once for both backends: the host backend raises them
// from its waits, the CUDA backend from the records its kernels leave.
#pragma once

#include <cstdint>
#include <string>

#include "../core/routing.h"
#include "error.h"

namespace sy {

// A peer gave up on operation `epoch` (its abort record): PEER_FAILED naming it and, if it timed
// out, whom it waited for.
Error abandoned_error(int rank, uint32_t epoch, int failed, int peer, core::WaitRole role, sy_status status);
// Rank `peer` called another operation as `epoch`.
Error kind_mismatch_error(int rank, uint32_t epoch, uint32_t mine, int peer, uint32_t theirs);
// Rank `peer` rejected its own input for operation `kind`.
Error peer_rejected_error(int rank, uint32_t epoch, uint32_t kind, int peer);
// Rank `peer`'s parameters for operation `epoch` were overwritten: it is at operation `theirs`.
Error peer_moved_on_error(int rank, uint32_t epoch, int peer, uint32_t theirs);
// Rank `peer` passed `theirs` for the parameter `name` (word of the barrier's description).
Error desc_mismatch_error(int rank, uint32_t epoch, uint32_t kind, int peer, const char* name, uint32_t mine,
                          uint32_t theirs);
// The peers sent `sent` rows where the cached handle expects `expected`.
Error cached_mismatch_error(int rank, int64_t expected, int64_t sent);
// Worst-case outputs too small: `received` tokens (or `rows` expanded rows) for `capacity` rows.
Error capacity_error(int rank, int64_t needed, int64_t capacity, bool expanded_rows);
// Combine of a handle whose dispatch failed: that failure (its code, the rank it names) when
// known, else a plain refusal.
Error failed_handle_error(Error dispatch_failure = Error{});
// Bad top-k entry `entry` of token `token` (holding `value`; experts are [0, experts)).
Error topk_problem_error(core::TopkProblem kind, int64_t token, int entry, int64_t value, int64_t experts);
// Low-latency mode (`op` "dispatch" or "combine", call `call`): rank `peer` rejected its own
// input; rank `peer` sent format word `theirs` where this rank expects `mine` (core::kFormat*);
// rank `peer` overwrote the half while this rank read it (it is at call `theirs`); rank `peer`
// announced `count` tokens for one expert, more than `max_tokens`.
Error ll_peer_rejected_error(int rank, int peer, const char* op, uint32_t call);
Error ll_format_error(int rank, int peer, const char* op, uint32_t theirs, uint32_t mine);
Error ll_overwritten_error(int rank, int peer, const char* what, uint32_t call, uint32_t theirs);
Error ll_count_error(int peer, int64_t count);
// Combine of the handle of low-latency call `dispatch_call`, whose receive phase did not deliver:
// the dispatch's failure (its code, the rank it names) when known, else that it has not run.
Error ll_failed_dispatch_error(uint32_t dispatch_call, Error dispatch_failure);
// Combine was given other top-k ids than low-latency call `dispatch_call` dispatched with.
Error ll_routing_mismatch_error(uint32_t dispatch_call);
// A refusal (`why`) whose rejection could not be enqueued (`untold`): the peers learn of it only
// at their deadline, and the caller is told so.
Error untold_refusal_error(Error why, const Error& untold);
// A wait that ran out: "operation N of this buffer; missing: ranks ...".
Error missing_ranks_error(const core::WaitFailure& w, uint32_t epoch, const std::string& missing);

}  // namespace sy
