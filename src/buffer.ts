/**
 * The communication buffer of one rank and the normal-mode operations on it: `layout`,
 * `dispatch` and `combine`.
 *
 * @module
 */

import {
  BufferOptions,
  BufferPlan as PlanStruct,
  CombineArgs,
  CombineResult as CombineStruct,
  DispatchArgs,
  DispatchResult as DispatchStruct,
  LayoutArgs,
  LayoutResult as LayoutStruct,
} from "../ffi/structs.ts";
import { type BufferPlan, planFromStruct } from "./config.ts";
import { SwitchyardError } from "./errors.ts";
import { Event } from "./event.ts";
import { DispatchHandle } from "./handle.ts";
import { check, instanceArg, integerArg, native, NativeResource, OutHandle } from "./native.ts";
import type { Rank } from "./rank.ts";
import { CombineResult, DispatchLayout, DispatchResult } from "./results.ts";
import { Stream } from "./stream.ts";
import { Tensor } from "./tensor.ts";

/** Options of a communication buffer. */
export interface EpBufferOptions {
  /** Channels per token. */
  readonly hidden: number;
  /** Most tokens any rank dispatches in one call. */
  readonly maxTokensPerRank: number;
  /** SM budget of the CUDA kernels (even); default from the rank count. */
  readonly numSms?: number;
  /** Deadline of the buffer's waits in milliseconds; default the group's. */
  readonly timeoutMs?: number;
}

/**
 * Stream semantics shared by every operation: the communication stream waits for
 * `previousEvent` (or the compute stream), the work runs there, and afterwards either the
 * result carries an event (`asyncFinish`) or the compute stream waits for it.
 */
export interface StreamOptions {
  /** The compute stream (default: the rank's). */
  readonly stream?: Stream;
  /** Start after this event instead of after the compute stream's work. */
  readonly previousEvent?: Event;
  /** Return an event instead of making the compute stream wait. */
  readonly asyncFinish?: boolean;
  /** The outputs belong to the communication stream (needs previousEvent and asyncFinish). */
  readonly allocateOnCommStream?: boolean;
}

/** Options of {@linkcode EpBuffer.layout}. */
export interface LayoutOptions extends StreamOptions {
  /** Experts in total (a multiple of the rank count). */
  readonly numExperts: number;
}

/** Options of {@linkcode EpBuffer.dispatch}. */
export interface DispatchOptions extends StreamOptions {
  /** FP8 only: `[T, hidden/128]` f32 scales or `[T, hidden/512]` i32 packed UE8M0; any strides. */
  readonly xScales?: Tensor;
  /** `[T, K]` i64 or i32 expert ids, -1 = none. */
  readonly topkIdx?: Tensor;
  /** `[T, K]` f32 weights, with `topkIdx`. */
  readonly topkWeights?: Tensor;
  /** Experts in total, with `topkIdx`. */
  readonly numExperts?: number;
  /** The routing from `layout`: tokens go where its `isTokenInRank` says. */
  readonly layout?: DispatchLayout;
  /** `[T, R]` bool: explicit destinations of each token (instead of `layout`). */
  readonly isTokenInRank?: Tensor;
  /** Cached dispatch: reuse this routing (no top-k, no host wait). */
  readonly handle?: DispatchHandle;
  /** Round per-expert counts (and expanded groups) up to this many rows. Default 1. */
  readonly expertAlignment?: number;
  /** Worst-case mode: allocate this many rows and never wait on the host (graph-capturable). */
  readonly numWorstTokens?: number;
  /** One row per (token, local expert), grouped by expert and padded, instead of per token. */
  readonly expand?: boolean;
  /** Expanded layout: zero the padding rows. */
  readonly zeroPadding?: boolean;
  /** Host wait deadline in milliseconds (exact-size mode). */
  readonly timeoutMs?: number;
}

/** Options of {@linkcode EpBuffer.combine}. */
export interface CombineOptions extends StreamOptions {
  /** Compact layout: `[rows, K]` f32 weights to sum back (e.g. dispatch's `recvTopkWeights`). */
  readonly topkWeights?: Tensor;
  /** One or two `[T, hidden]` bf16 tensors added to the sum. */
  readonly bias?: Tensor | readonly [Tensor] | readonly [Tensor, Tensor];
  /** `[T, hidden]` bf16 tensor to write into. */
  readonly out?: Tensor;
}

function optionalTensor(name: string, t: unknown): Deno.PointerObject | null {
  if (t === undefined || t === null) return null;
  return instanceArg(name, t, Tensor, "Tensor").pointer;
}

function flag(name: string, v: unknown): number {
  if (v === undefined) return 0;
  if (typeof v !== "boolean") {
    throw new SwitchyardError("INVALID_ARGUMENT", `${name}: expected a boolean, got ${typeof v}`, { argument: name });
  }
  return v ? 1 : 0;
}

/** The token-in-rank matrix of the options: `isTokenInRank`, or the one of `layout`. */
function routingOf(o: DispatchOptions): Deno.PointerObject | null {
  if (o.isTokenInRank !== undefined && o.layout !== undefined) {
    throw new SwitchyardError("INVALID_ARGUMENT", "isTokenInRank: pass either layout or isTokenInRank", {
      argument: "isTokenInRank",
    });
  }
  if (o.layout !== undefined) {
    return instanceArg("layout", o.layout, DispatchLayout, "DispatchLayout").isTokenInRank.pointer;
  }
  return optionalTensor("isTokenInRank", o.isTokenInRank);
}

/** Encodes the stream options into an args struct. */
function setStreamOptions(
  s: {
    setPointer(f: "compute_stream" | "previous_event", p: Deno.PointerObject | null): unknown;
    set(f: "async_finish" | "allocate_on_comm_stream", v: number): unknown;
  },
  rank: Rank,
  o: StreamOptions,
): void {
  const stream = o.stream === undefined ? rank.stream : instanceArg("stream", o.stream, Stream, "Stream");
  s.setPointer("compute_stream", stream.pointer);
  s.setPointer(
    "previous_event",
    o.previousEvent === undefined ? null : instanceArg("previousEvent", o.previousEvent, Event, "Event").pointer,
  );
  s.set("async_finish", flag("asyncFinish", o.asyncFinish));
  s.set("allocate_on_comm_stream", flag("allocateOnCommStream", o.allocateOnCommStream));
}

/**
 * One rank's communication buffer. The buffers of all ranks form a set: every rank calls the
 * same operations on its buffer in the same order (they are collective).
 */
export class EpBuffer extends NativeResource {
  /** The rank this buffer belongs to. */
  readonly rank: Rank;
  /** Channels per token. */
  readonly hidden: number;
  /** Most tokens one rank dispatches at once. */
  readonly maxTokensPerRank: number;
  /** What the buffer holds, byte by byte. */
  readonly plan: BufferPlan;
  readonly #commStream: Stream;

  private constructor(pointer: Deno.PointerObject, rank: Rank, options: EpBufferOptions) {
    super(pointer, (p) => native().sy_buffer_destroy(p), "buffer");
    this.rank = rank;
    this.hidden = options.hidden;
    this.maxTokensPerRank = options.maxTokensPerRank;
    const plan = PlanStruct.create();
    check(native().sy_buffer_plan_get(pointer, plan.bytes), pointer, "buffer plan");
    this.plan = planFromStruct(plan);
    const out = new OutHandle();
    check(native().sy_buffer_comm_stream(pointer, out.cell), pointer, "buffer comm stream");
    this.#commStream = new Stream(out.take(), rank);
  }

  /** Creates `rank`'s buffer (collective: see {@linkcode Rank.createBuffer}). */
  static create(rank: Rank, options: EpBufferOptions): EpBuffer {
    const opts = BufferOptions.create()
      .set("hidden", integerArg("hidden", options?.hidden, 1, 2 ** 31 - 1))
      .set("max_tokens_per_rank", integerArg("maxTokensPerRank", options.maxTokensPerRank, 1, 2 ** 31 - 1))
      .set("num_sms", integerArg("numSms", options.numSms ?? 0, 0, 1024))
      .set("timeout_ms", integerArg("timeoutMs", options.timeoutMs ?? 0, 0, 2 ** 40));
    const out = new OutHandle();
    check(native().sy_buffer_create(rank.pointer, opts.bytes, out.cell), rank.pointer, "buffer create");
    return new EpBuffer(out.take(), rank, options);
  }

  /** The stream the buffer's operations run on. */
  get commStream(): Stream {
    this.pointer;
    return this.#commStream;
  }

  /**
   * Routing statistics of `topkIdx` (`[T, K]`, -1 = none): tokens per rank and per expert and
   * the token-in-rank matrix. Local: no other rank takes part.
   */
  layout(topkIdx: Tensor, options: LayoutOptions): Promise<DispatchLayout> {
    try {
      const args = LayoutArgs.create()
        .set("num_experts", integerArg("numExperts", options?.numExperts, 1, 2 ** 31 - 1))
        .setPointer("topk_idx", instanceArg("topkIdx", topkIdx, Tensor, "Tensor").pointer);
      setStreamOptions(args, this.rank, options);
      const res = LayoutStruct.create();
      const p = this.pointer;
      check(native().sy_layout(p, args.bytes, res.bytes), p, "layout");
      const t = (f: "num_tokens_per_rank" | "num_tokens_per_expert" | "is_token_in_rank") =>
        new Tensor(res.pointer(f)!, this.rank);
      const ev = res.pointer("event");
      return Promise.resolve(
        new DispatchLayout(
          t("num_tokens_per_rank") as Tensor<"i32">,
          t("num_tokens_per_expert") as Tensor<"i32">,
          t("is_token_in_rank") as Tensor<"bool">,
          ev ? new Event(ev, this.rank) : undefined,
        ),
      );
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /**
   * Sends every token of `x` (`[T, hidden]`, bf16 or fp8_e4m3) to the ranks hosting its experts
   * and receives the tokens the other ranks send here, ordered by source rank, then by the
   * sender's token order. Collective: every rank of the set calls it.
   *
   * Modes: exact-size (the default: waits, off the JS thread, for the received counts and
   * sizes the outputs exactly), worst-case (`numWorstTokens`: no host wait) and cached
   * (`handle`: reuses an earlier routing, no host wait). With virtual ranks in one process,
   * start every rank's exact-size dispatch before awaiting any (e.g. `Promise.all`).
   */
  async dispatch(x: Tensor, options: DispatchOptions = {}): Promise<DispatchResult> {
    const args = DispatchArgs.create()
      .setPointer("x", instanceArg("x", x, Tensor, "Tensor").pointer)
      .setPointer("x_scales", optionalTensor("xScales", options.xScales))
      .setPointer("topk_idx", optionalTensor("topkIdx", options.topkIdx))
      .setPointer("topk_weights", optionalTensor("topkWeights", options.topkWeights))
      .setPointer("is_token_in_rank", routingOf(options))
      .setPointer(
        "handle",
        options.handle === undefined
          ? null
          : instanceArg("handle", options.handle, DispatchHandle, "DispatchHandle").pointer,
      )
      .set("num_experts", integerArg("numExperts", options.numExperts ?? 0, 0, 2 ** 31 - 1))
      .set("num_worst_tokens", integerArg("numWorstTokens", options.numWorstTokens ?? 0, 0, 2 ** 31))
      .set("timeout_ms", integerArg("timeoutMs", options.timeoutMs ?? 0, 0, 2 ** 40))
      .set("expert_alignment", integerArg("expertAlignment", options.expertAlignment ?? 1, 1, 2 ** 20))
      .set("layout", flag("expand", options.expand))
      .set("zero_padding", flag("zeroPadding", options.zeroPadding));
    setStreamOptions(args, this.rank, options);
    const res = DispatchStruct.create();
    const p = this.pointer;
    const waits = options.handle === undefined && !options.numWorstTokens;
    const rc = waits
      ? await native().sy_dispatch_waiting(p, args.bytes, res.bytes)
      : native().sy_dispatch(p, args.bytes, res.bytes);
    check(rc, p, "dispatch");

    const tensor = (f: "recv_x" | "recv_x_scales" | "recv_topk_idx" | "recv_topk_weights" | "recv_count") => {
      const q = res.pointer(f);
      return q ? new Tensor(q, this.rank) : undefined;
    };
    const handle = new DispatchHandle(res.pointer("handle")!, this.rank);
    const ev = res.pointer("event");
    const recv = res.number("num_recv_tokens");
    return new DispatchResult({
      recvX: tensor("recv_x")!,
      recvXScales: tensor("recv_x_scales"),
      recvTopkIdx: tensor("recv_topk_idx"),
      recvTopkWeights: tensor("recv_topk_weights") as Tensor<"f32"> | undefined,
      recvCount: tensor("recv_count") as Tensor<"i32">,
      handle,
      event: ev ? new Event(ev, this.rank) : undefined,
      numRecvTokens: recv < 0 ? null : recv,
      numRows: res.number("num_rows"),
    });
  }

  /**
   * Sends the expert outputs `x` (rows in dispatch's output layout, bf16) back to the ranks the
   * tokens came from and sums them there in float32, in ascending rank order, after the
   * optional biases; one rounding to bf16. Collective.
   */
  combine(x: Tensor, handle: DispatchHandle, options: CombineOptions = {}): Promise<CombineResult> {
    try {
      const bias = options.bias === undefined
        ? []
        : options.bias instanceof Tensor
        ? [options.bias]
        : [...options.bias];
      if (bias.length > 2) {
        throw new SwitchyardError("INVALID_ARGUMENT", "bias: at most two bias tensors", { argument: "bias" });
      }
      const args = CombineArgs.create()
        .setPointer("x", instanceArg("x", x, Tensor, "Tensor").pointer)
        .setPointer("handle", instanceArg("handle", handle, DispatchHandle, "DispatchHandle").pointer)
        .setPointer("topk_weights", optionalTensor("topkWeights", options.topkWeights))
        .setPointer("bias0", optionalTensor("bias", bias[0]))
        .setPointer("bias1", optionalTensor("bias", bias[1]))
        .setPointer("out", optionalTensor("out", options.out));
      setStreamOptions(args, this.rank, options);
      const res = CombineStruct.create();
      const p = this.pointer;
      check(native().sy_combine(p, args.bytes, res.bytes), p, "combine");
      const w = res.pointer("combined_topk_weights");
      const ev = res.pointer("event");
      return Promise.resolve(
        new CombineResult(
          new Tensor(res.pointer("combined_x")!, this.rank) as Tensor<"bf16">,
          w ? new Tensor(w, this.rank) as Tensor<"f32"> : undefined,
          ev ? new Event(ev, this.rank) : undefined,
        ),
      );
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** Releases the communication stream reference with the buffer. */
  protected override disposeChildren(): void {
    this.#commStream[Symbol.dispose]();
  }
}
