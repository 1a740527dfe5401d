/**
 * Low-latency (decode) mode: fixed slots per (local expert, source rank), a double buffer that
 * alternates on every low-latency call, FP8 quantisation by the library, and a send/receive
 * split through receive hooks. The operations themselves are methods of `EpBuffer`; this module
 * holds what they return.
 *
 * @module
 */

import { LLHandleInfo as InfoStruct } from "../ffi/structs.ts";
import type { Event } from "./event.ts";
import { check, native, NativeResource, OutHandle } from "./native.ts";
import type { Rank } from "./rank.ts";
import { Tensor } from "./tensor.ts";

/** A deferred receive phase: call `run()` when the data should be collected (once). */
export class RecvHook extends NativeResource {
  /** Wraps an owned `sy_hook`. */
  constructor(pointer: Deno.PointerObject) {
    super(pointer, (p) => native().sy_hook_destroy(p), "receive hook");
  }

  /**
   * Enqueues the receive phase on the compute stream; the results are valid after it in stream
   * order. Fails if the call after next has already reused the half of the double buffer.
   */
  run(): void {
    const p = this.pointer;
    check(native().sy_hook_run(p), p, "hook run");
  }
}

/** What a low-latency handle describes. */
export interface LowLatencyHandleInfo {
  /** The rank that dispatched. */
  readonly rank: number;
  /** Ranks in the group. */
  readonly numRanks: number;
  /** Experts in total. */
  readonly numExperts: number;
  /** Experts on each rank. */
  readonly numLocalExperts: number;
  /** Slots per (local expert, source rank). */
  readonly maxTokensPerRank: number;
  /** Channels per token. */
  readonly hidden: number;
  /** Tokens this rank dispatched. */
  readonly numTokens: number;
  /** The low-latency call number of the dispatch (1, 2, ...). */
  readonly call: number;
  /** Whether the receive phase has run. */
  readonly received: boolean;
}

/** The layout of one low-latency dispatch, needed by its combine. */
export class LowLatencyHandle extends NativeResource {
  /** The rank that owns the handle. */
  readonly rank: Rank;

  /** Wraps an owned `sy_ll_handle`. */
  constructor(pointer: Deno.PointerObject, rank: Rank) {
    super(pointer, (p) => native().sy_ll_handle_destroy(p), "low-latency handle");
    this.rank = rank;
  }

  /** The handle's current description. */
  info(): LowLatencyHandleInfo {
    const s = InfoStruct.create();
    const p = this.pointer;
    check(native().sy_ll_handle_info_get(p, s.bytes), p, "low-latency handle info");
    return {
      rank: s.number("rank"),
      numRanks: s.number("num_ranks"),
      numExperts: s.number("num_experts"),
      numLocalExperts: s.number("num_local_experts"),
      maxTokensPerRank: s.number("max_tokens_per_rank"),
      hidden: s.number("hidden"),
      numTokens: s.number("num_tokens"),
      call: s.number("call"),
      received: s.number("received") !== 0,
    };
  }

  #tensor(kind: number): Tensor {
    const out = new OutHandle();
    const p = this.pointer;
    check(native().sy_ll_handle_tensor(p, kind, out.cell), p, "low-latency handle tensor");
    return new Tensor(out.take(), this.rank);
  }

  /** `[E_local, R * maxTokensPerRank]` i32: the sender's token index of each received row. */
  srcInfo(): Tensor<"i32"> {
    return this.#tensor(0) as Tensor<"i32">;
  }

  /** `[E_local, R]` i64: per local expert and source rank, `begin << 32 | count`. */
  layoutRange(): Tensor<"i64"> {
    return this.#tensor(1) as Tensor<"i64">;
  }
}

/** What `EpBuffer.lowLatencyDispatch` returns. */
export class LowLatencyDispatchResult implements Disposable {
  /** Creates the result (the library does). */
  constructor(
    /** `[E_local, R * maxTokensPerRank, hidden]`, bf16 or fp8_e4m3; rows `[0, recvCount[e])` hold tokens. */
    readonly recvX: Tensor,
    /** FP8: `[E_local, R * maxTokensPerRank, S]` f32 scales (i32 UE8M0 words), column-major in the last two dims. */
    readonly recvXScales: Tensor | undefined,
    /** `[E_local]` i32: received tokens per local expert. */
    readonly recvCount: Tensor<"i32">,
    /** The layout, for combine. */
    readonly handle: LowLatencyHandle,
    /** Completion event, with `asyncFinish`. */
    readonly event?: Event,
    /** With `returnRecvHook`: run it to receive. */
    readonly hook?: RecvHook,
  ) {}

  /** Releases the tensors, handle, event and hook. */
  [Symbol.dispose](): void {
    for (const r of [this.recvX, this.recvXScales, this.recvCount, this.handle, this.event, this.hook]) {
      r?.[Symbol.dispose]();
    }
  }
}

/** What `EpBuffer.lowLatencyCombine` returns. */
export class LowLatencyCombineResult implements Disposable {
  /** Creates the result (the library does). */
  constructor(
    /** `[T, hidden]` bf16: the weighted sum of each token's expert outputs. */
    readonly combinedX: Tensor<"bf16">,
    /** Completion event, with `asyncFinish`. */
    readonly event?: Event,
    /** With `returnRecvHook`: run it to receive. */
    readonly hook?: RecvHook,
  ) {}

  /** Releases the tensor, event and hook. */
  [Symbol.dispose](): void {
    for (const r of [this.combinedX, this.event, this.hook]) r?.[Symbol.dispose]();
  }
}
