/**
 * What the normal-mode operations return. Each result owns its tensors, handle and event:
 * dispose it (`using`) to release them all.
 *
 * @module
 */

import type { Event } from "./event.ts";
import type { DispatchHandle } from "./handle.ts";
import type { Tensor } from "./tensor.ts";

function release(items: readonly (Disposable | undefined)[]): void {
  for (const item of items) item?.[Symbol.dispose]();
}

/** The routing statistics of `EpBuffer.layout`. */
export class DispatchLayout implements Disposable {
  /** Creates the result (the library does). */
  constructor(
    /** `[R]` i32: tokens going to each rank (a token counts once per rank). */
    readonly numTokensPerRank: Tensor<"i32">,
    /** `[E]` i32: tokens going to each expert. */
    readonly numTokensPerExpert: Tensor<"i32">,
    /** `[T, R]` bool: whether each token goes to each rank. */
    readonly isTokenInRank: Tensor<"bool">,
    /**
     * `[N]` i32: tokens going to each node (a token counts once per node; N = ranks / ranksPerNode).
     * What a two-hop dispatch sends across the network: one copy per (token, node).
     */
    readonly numTokensPerNode: Tensor<"i32">,
    /** `[T, N]` bool: whether each token goes to each node. */
    readonly isTokenInNode: Tensor<"bool">,
    /** Completion event, with `asyncFinish`. */
    readonly event?: Event,
  ) {}

  /** Releases the tensors and the event. */
  [Symbol.dispose](): void {
    release([
      this.numTokensPerRank,
      this.numTokensPerExpert,
      this.isTokenInRank,
      this.numTokensPerNode,
      this.isTokenInNode,
      this.event,
    ]);
  }
}

/** The parts of a {@linkcode DispatchResult}. */
export interface DispatchParts {
  /** Received rows, `[rows, hidden]` in the payload's dtype. */
  readonly recvX: Tensor;
  /** FP8 scales of the received rows, `[rows, S]`. */
  readonly recvXScales?: Tensor;
  /** Compact layout with top-k: `[rows, K]` local expert ids, -1 where not local. */
  readonly recvTopkIdx?: Tensor;
  /** Compact: `[rows, K]` weights, 0 where not local. Expanded: `[rows]`, one per row. */
  readonly recvTopkWeights?: Tensor<"f32">;
  /** `[1]` i32: rows in use, valid in stream order (also in worst-case mode). */
  readonly recvCount: Tensor<"i32">;
  /** The routing, for combine and cached dispatch. */
  readonly handle: DispatchHandle;
  /** Completion event, with `asyncFinish`. */
  readonly event?: Event;
  /** Received (token, rank) pairs; null in worst-case mode. */
  readonly numRecvTokens: number | null;
  /** Rows of `recvX`. */
  readonly numRows: number;
}

/** What `EpBuffer.dispatch` returns. */
export class DispatchResult implements DispatchParts, Disposable {
  /** Received rows, `[rows, hidden]` in the payload's dtype. */
  readonly recvX: Tensor;
  /** FP8 scales of the received rows, `[rows, S]`. */
  readonly recvXScales?: Tensor;
  /** Compact layout with top-k: `[rows, K]` local expert ids, -1 where not local. */
  readonly recvTopkIdx?: Tensor;
  /** Compact: `[rows, K]` weights, 0 where not local. Expanded: `[rows]`, one per row. */
  readonly recvTopkWeights?: Tensor<"f32">;
  /** `[1]` i32: rows in use, valid in stream order (also in worst-case mode). */
  readonly recvCount: Tensor<"i32">;
  /** The routing, for combine and cached dispatch. */
  readonly handle: DispatchHandle;
  /** Completion event, with `asyncFinish`. */
  readonly event?: Event;
  /** Received (token, rank) pairs; null in worst-case mode. */
  readonly numRecvTokens: number | null;
  /** Rows of `recvX`. */
  readonly numRows: number;
  #perExpert?: readonly number[];

  /** Creates the result (the library does). */
  constructor(parts: DispatchParts) {
    this.recvX = parts.recvX;
    this.recvXScales = parts.recvXScales;
    this.recvTopkIdx = parts.recvTopkIdx;
    this.recvTopkWeights = parts.recvTopkWeights;
    this.recvCount = parts.recvCount;
    this.handle = parts.handle;
    this.event = parts.event;
    this.numRecvTokens = parts.numRecvTokens;
    this.numRows = parts.numRows;
  }

  /**
   * Received tokens per local expert, rounded up to the expert alignment (DeepEP's
   * `num_recv_tokens_per_expert_list`); empty in worst-case mode and without top-k.
   */
  get numRecvTokensPerExpert(): readonly number[] {
    this.#perExpert ??= Object.freeze(this.handle.numRecvTokensPerExpert());
    return this.#perExpert;
  }

  /** Releases the tensors, the handle and the event. */
  [Symbol.dispose](): void {
    release([
      this.recvX,
      this.recvXScales,
      this.recvTopkIdx,
      this.recvTopkWeights,
      this.recvCount,
      this.handle,
      this.event,
    ]);
  }
}

/** What `EpBuffer.combine` returns. */
export class CombineResult implements Disposable {
  /** Creates the result (the library does). */
  constructor(
    /** `[T, hidden]` bf16: the reduced rows, in this rank's token order. */
    readonly combinedX: Tensor<"bf16">,
    /** `[T, K]` f32: the returned top-k weights summed over ranks. */
    readonly combinedTopkWeights?: Tensor<"f32">,
    /** Completion event, with `asyncFinish`. */
    readonly event?: Event,
  ) {}

  /** Releases the tensors and the event. */
  [Symbol.dispose](): void {
    release([this.combinedX, this.combinedTopkWeights, this.event]);
  }
}
