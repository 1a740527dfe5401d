/**
 * Dispatch handles: the routing one dispatch produced, reused by combine and cached dispatch.
 *
 * @module
 */

import { HandleInfo as InfoStruct } from "../ffi/structs.ts";
import { HandleTensorKind, Status } from "../ffi/symbols.ts";
import { check, native, NativeResource, OutHandle } from "./native.ts";
import type { Rank } from "./rank.ts";
import { Tensor } from "./tensor.ts";

/** What a dispatch handle describes. */
export interface HandleInfo {
  /** The rank that dispatched. */
  readonly rank: number;
  /** Ranks in the group. */
  readonly numRanks: number;
  /** Experts in total (0 when dispatched without top-k). */
  readonly numExperts: number;
  /** Experts this rank hosts. */
  readonly numLocalExperts: number;
  /** Top-k entries per token (0 without top-k). */
  readonly numTopk: number;
  /** `"compact"` or `"expanded"`. */
  readonly layout: "compact" | "expanded";
  /** Rows per expert are rounded up to this (expanded layout and expert counts). */
  readonly expertAlignment: number;
  /** Tokens this rank dispatched. */
  readonly numTokens: number;
  /** Received (token, rank) rows; null while unknown on the host (worst-case mode). */
  readonly numRecvTokens: number | null;
  /** Rows of the dispatch output. */
  readonly numRows: number;
}

/** The routing of one dispatch, needed by combine and by cached dispatch. */
export class DispatchHandle extends NativeResource {
  /** The rank that owns the handle. */
  readonly rank: Rank;

  /** Wraps an owned `sy_handle`. */
  constructor(pointer: Deno.PointerObject, rank: Rank) {
    super(pointer, (p) => native().sy_handle_destroy(p), "dispatch handle");
    this.rank = rank;
  }

  /** The handle's current description. */
  info(): HandleInfo {
    const s = InfoStruct.create();
    const p = this.pointer;
    check(native().sy_handle_info_get(p, s.bytes), p, "handle info");
    const recv = s.number("num_recv_tokens");
    return {
      rank: s.number("rank"),
      numRanks: s.number("num_ranks"),
      numExperts: s.number("num_experts"),
      numLocalExperts: s.number("num_local_experts"),
      numTopk: s.number("num_topk"),
      layout: s.number("layout") === 1 ? "expanded" : "compact",
      expertAlignment: s.number("expert_alignment"),
      numTokens: s.number("num_tokens"),
      numRecvTokens: recv < 0 ? null : recv,
      numRows: s.number("num_rows"),
    };
  }

  /**
   * Tokens received per local expert, rounded up to the expert alignment; empty in worst-case
   * mode (where the host never learns the counts) or without top-k.
   */
  numRecvTokensPerExpert(): number[] {
    const p = this.pointer;
    const n = this.info().numLocalExperts;
    const out = new Int32Array(Math.max(n, 1));
    const rc = native().sy_handle_expert_counts(p, out, n);
    if (rc === Status.NOT_READY) return [];
    check(rc, p, "handle expert counts");
    return Array.from(out.subarray(0, n));
  }

  #tensor(kind: number): Tensor {
    const out = new OutHandle();
    const p = this.pointer;
    check(native().sy_handle_tensor(p, kind, out.cell), p, "handle tensor");
    return new Tensor(out.take(), this.rank);
  }

  /** `[R, R]` i32: entry (i, j) = tokens ranks 0..i sent to rank j. */
  rankPrefixMatrix(): Tensor<"i32"> {
    return this.#tensor(HandleTensorKind.RANK_PREFIX_MATRIX) as Tensor<"i32">;
  }

  /** `[N]` i32: the sender's token index of each received token (-1 past the end). */
  recvSrcIdx(): Tensor<"i32"> {
    return this.#tensor(HandleTensorKind.RECV_SRC_IDX) as Tensor<"i32">;
  }

  /** `[N]` i32: the source rank of each received token (-1 past the end). */
  recvSrcRank(): Tensor<"i32"> {
    return this.#tensor(HandleTensorKind.RECV_SRC_RANK) as Tensor<"i32">;
  }

  /** `[T, R]` bool: which ranks each of this rank's tokens went to. */
  isTokenInRank(): Tensor<"bool"> {
    return this.#tensor(HandleTensorKind.IS_TOKEN_IN_RANK) as Tensor<"bool">;
  }

  /** `[T, R]` i32: the slot each token took at each rank, -1 where it was not sent. */
  sendSlot(): Tensor<"i32"> {
    return this.#tensor(HandleTensorKind.SEND_SLOT) as Tensor<"i32">;
  }

  /** `[N, K]` i32 (expanded layout): the output row of each (received token, top-k entry). */
  expandedRow(): Tensor<"i32"> {
    return this.#tensor(HandleTensorKind.EXPANDED_ROW) as Tensor<"i32">;
  }
}
