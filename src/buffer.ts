/**
 * The communication buffer of one rank and the normal-mode operations on it: `layout`,
 * `dispatch` and `combine`.
 *
 * @module
 */

import {
  BufferOptions,
  BufferPlan as PlanStruct,
  BufferShare,
  CombineArgs,
  CombineResult as CombineStruct,
  DispatchArgs,
  DispatchResult as DispatchStruct,
  LayoutArgs,
  LayoutResult as LayoutStruct,
  LLCombineArgs,
  LLCombineResult as LLCombineStruct,
  LLDispatchArgs,
  LLDispatchResult as LLDispatchStruct,
  NetworkStats as NetworkStatsStruct,
} from "../ffi/structs.ts";
import { LLFlags, Operation, Status } from "../ffi/symbols.ts";
import { type BufferPlan, INTERNODE_PATHS, type InternodePath, planFromStruct } from "./config.ts";
import { LowLatencyCombineResult, LowLatencyDispatchResult, LowLatencyHandle, RecvHook } from "./low_latency.ts";
import { SwitchyardError } from "./errors.ts";
import { Event } from "./event.ts";
import { DispatchHandle } from "./handle.ts";
import {
  Borrowed,
  check,
  choiceArg,
  errorFor,
  instanceArg,
  integerArg,
  native,
  NativeResource,
  OutHandle,
} from "./native.ts";
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
  /** Adds the low-latency double buffer, sized for this many experts (and `hidden`, `maxTokensPerRank`). */
  readonly lowLatency?: { readonly numExperts: number };
  /** Rank masking: masked ranks are skipped, and a rank missing at a low-latency deadline is masked. */
  readonly enableMasking?: boolean;
  /**
   * How the normal mode crosses nodes (groups with `ranksPerNode`): `"two-hop"` (default) sends a
   * token once per destination node, to the rank there with the sender's local index, which
   * forwards it inside its node; `"direct"` sends it once per destination rank, the baseline the
   * two hops save network bytes on. Every rank must pass the same.
   */
  readonly internodePath?: InternodePath;
  /**
   * Two hops: entries of each network ring (one ring per sender node at every rank; a sender puts
   * entry i once entry i - networkRingEntries has been taken). Default: DeepEP's receive chunk
   * for the rank count (128 up to 160 ranks); at most `maxTokensPerRank` are used. Every rank
   * must pass the same.
   */
  readonly networkRingEntries?: number;
}

/** How a two-hop combine reduces across nodes: see {@linkcode CombineOptions.internodeReduction}. */
export type InternodeReduction = "chain" | "hierarchical";
/** The `sy_internode_reduction` values, in order. */
export const INTERNODE_REDUCTIONS: readonly InternodeReduction[] = ["chain", "hierarchical"];

/** Options of {@linkcode EpBuffer.lowLatencyDispatch}. */
export interface LowLatencyDispatchOptions {
  /** The compute stream (default: the rank's). */
  readonly stream?: Stream;
  /** Quantise to FP8 E4M3 with one scale per 128 channels (default true, as in DeepEP). */
  readonly useFp8?: boolean;
  /** Power-of-two scales. */
  readonly roundScale?: boolean;
  /** Scales as UE8M0 exponents packed 4 per int32 (needs `roundScale`). */
  readonly useUe8m0?: boolean;
  /** Return an event instead of making the compute stream wait. */
  readonly asyncFinish?: boolean;
  /** Send now; receive when the returned hook runs (nothing is held in between). */
  readonly returnRecvHook?: boolean;
  /** `[E_local]` i32 counters, incremented by the tokens each local expert receives. */
  readonly cumulativeLocalExpertRecvStats?: Tensor;
  /** `[R]` i64 counters, incremented by the nanoseconds spent waiting for each source rank. */
  readonly dispatchWaitRecvCostStats?: Tensor;
}

/** Options of {@linkcode EpBuffer.lowLatencyCombine}. */
export interface LowLatencyCombineOptions {
  /** The compute stream (default: the rank's). */
  readonly stream?: Stream;
  /** Send LogFMT-10 rows (BF16 for blocks whose largest magnitude is 1 or more). */
  readonly useLogfmt?: boolean;
  /** The expert outputs are already in `nextCombineBuffer(handle)`; `x` is not read. */
  readonly zeroCopy?: boolean;
  /** Return an event instead of making the compute stream wait. */
  readonly asyncFinish?: boolean;
  /** Send now; reduce when the returned hook runs. */
  readonly returnRecvHook?: boolean;
  /** `[T, hidden]` bf16 tensor to write into. */
  readonly out?: Tensor;
  /** `[R]` i64 counters, incremented by the nanoseconds spent waiting for each source rank. */
  readonly combineWaitRecvCostStats?: Tensor;
}

/**
 * What a rank has put on the network across nodes, summed over its buffer's operations
 * (`EpBuffer.networkStats`).
 */
export interface NetworkStats {
  /** Entries: dispatch records (one per token and destination node) and combine entries. */
  records: number;
  /** Their bytes. */
  bytes: number;
  /**
   * The one-sided puts that carried them (what a NIC counts as work requests): one per entry on
   * the host backend; on the CUDA backend one per proxy descriptor, a run of up to 16 consecutive
   * entries for one ring going as one (dispatch records, and combine entries as they are ready;
   * never past the end of the ring, at most half of it).
   */
  puts: number;
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
}

/** Options of {@linkcode EpBuffer.combine}. */
export interface CombineOptions extends StreamOptions {
  /** Compact layout: `[rows, K]` f32 weights to sum back (e.g. dispatch's `recvTopkWeights`). */
  readonly topkWeights?: Tensor;
  /** One or two `[T, hidden]` bf16 tensors added to the sum. */
  readonly bias?: Tensor | readonly [Tensor] | readonly [Tensor, Tensor];
  /** `[T, hidden]` bf16 tensor to write into. */
  readonly out?: Tensor;
  /**
   * Across nodes, in two hops: `"chain"` (default) passes each token's float32 sum from node to
   * node in ascending order, so the result is the one-node result bit for bit whatever the
   * split; `"hierarchical"` (DeepEP's way) has every node send one BF16 partial home at once:
   * half the bytes per partial and one network latency, results that depend on the split.
   * Every rank must pass the same.
   */
  readonly internodeReduction?: InternodeReduction;
}

function optionalTensor(name: string, t: unknown, held: Borrowed): Deno.PointerObject | null {
  if (t === undefined || t === null) return null;
  return held.take(instanceArg(name, t, Tensor, "Tensor"), name);
}

function optionsObject(name: string, v: unknown): object {
  if (typeof v !== "object" || v === null) {
    throw new SwitchyardError("INVALID_ARGUMENT", `${name}: expected an options object, got ${String(v)}`, {
      argument: name,
    });
  }
  return v;
}

function flag(name: string, v: unknown): number {
  if (v === undefined) return 0;
  if (typeof v !== "boolean") {
    throw new SwitchyardError("INVALID_ARGUMENT", `${name}: expected a boolean, got ${typeof v}`, { argument: name });
  }
  return v ? 1 : 0;
}

/** The low-latency expert count of the buffer options (0: no low-latency region). */
export function lowLatencyExperts(ll: { readonly numExperts: number } | undefined): number {
  if (ll === undefined) return 0;
  return integerArg("lowLatency.numExperts", ll?.numExperts, 1, 2 ** 31 - 1);
}

/** The token-in-rank matrix of the options: `isTokenInRank`, or the one of `layout`. */
function routingOf(o: DispatchOptions, held: Borrowed): Deno.PointerObject | null {
  if (o.isTokenInRank !== undefined && o.layout !== undefined) {
    throw new SwitchyardError("INVALID_ARGUMENT", "isTokenInRank: pass either layout or isTokenInRank", {
      argument: "isTokenInRank",
    });
  }
  if (o.layout !== undefined) {
    return held.take(instanceArg("layout", o.layout, DispatchLayout, "DispatchLayout").isTokenInRank, "layout");
  }
  return optionalTensor("isTokenInRank", o.isTokenInRank, held);
}

/** Encodes the stream options into an args struct. */
function setStreamOptions(
  s: {
    setPointer(f: "compute_stream" | "previous_event", p: Deno.PointerObject | null): unknown;
    set(f: "async_finish" | "allocate_on_comm_stream", v: number): unknown;
  },
  rank: Rank,
  o: StreamOptions,
  held: Borrowed,
): void {
  const stream = o.stream === undefined ? rank.stream : instanceArg("stream", o.stream, Stream, "Stream");
  s.setPointer("compute_stream", held.take(stream, "stream"));
  s.setPointer(
    "previous_event",
    o.previousEvent === undefined
      ? null
      : held.take(instanceArg("previousEvent", o.previousEvent, Event, "Event"), "previousEvent"),
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
  // Operations are collective and numbered in the order they reach the library; chaining them
  // keeps that order the program's, even when an exact-size dispatch waits off the JS thread.
  #tail: Promise<unknown> = Promise.resolve();

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
    optionsObject("options", options);
    const opts = BufferOptions.create()
      .set("hidden", integerArg("hidden", options.hidden, 1, 2 ** 31 - 1))
      .set("max_tokens_per_rank", integerArg("maxTokensPerRank", options.maxTokensPerRank, 1, 2 ** 31 - 1))
      .set("num_sms", integerArg("numSms", options.numSms ?? 0, 0, 1024))
      .set("timeout_ms", integerArg("timeoutMs", options.timeoutMs ?? 0, 0, 2 ** 40))
      .set("ll_num_experts", lowLatencyExperts(options.lowLatency))
      .set("enable_masking", flag("enableMasking", options.enableMasking))
      .set("internode_path", choiceArg("internodePath", options.internodePath, INTERNODE_PATHS))
      .set("network_ring_entries", integerArg("networkRingEntries", options.networkRingEntries ?? 0, 0, 2 ** 24));
    const out = new OutHandle();
    check(native().sy_buffer_create(rank.pointer, opts.bytes, out.cell), rank.pointer, "buffer create");
    return new EpBuffer(out.take(), rank, options);
  }

  /**
   * What this rank has put on the network so far (groups of several nodes): entries and their
   * bytes, summed over its operations. A two-hop dispatch puts one record per token and
   * destination node other than its own; a combine its starts, partials and results (the chain)
   * or its node parts (hierarchical). The emulated NIC counts them: the host backend's, and the
   * CUDA backend's CPU proxy.
   */
  networkStats(): NetworkStats {
    const out = NetworkStatsStruct.create();
    const p = this.pointer;
    check(native().sy_buffer_network_stats(p, out.bytes), p, "networkStats");
    return { records: out.number("records"), bytes: out.number("bytes"), puts: out.number("puts") };
  }

  /**
   * Process groups: what another process needs to map this buffer, as JSON (the rendezvous
   * carries it; `Group.createBuffers` does this for you).
   */
  exportShare(): string {
    const s = BufferShare.create();
    const p = this.pointer;
    check(native().sy_buffer_export(p, s.bytes), p, "exportShare");
    return JSON.stringify({
      rank: s.number("rank"),
      hidden: s.number("hidden"),
      maxTokensPerRank: s.number("max_tokens_per_rank"),
      lowLatencyExperts: s.number("ll_num_experts"),
      bytes: s.number("bytes"),
      name: s.string("name"),
      ranksPerNode: s.number("ranks_per_node"),
      internodePath: s.number("internode_path"),
      networkRingEntries: s.number("network_ring_entries"),
      networkEndpoint: s.string("network_endpoint"),
    });
  }

  /** Process groups: maps a peer's buffer from what its `exportShare()` returned. */
  importShare(share: string): void {
    let v: Record<string, unknown>;
    try {
      v = JSON.parse(share);
    } catch {
      throw new SwitchyardError("INVALID_ARGUMENT", "share: not JSON", { argument: "share" });
    }
    const s = BufferShare.create()
      .set("rank", integerArg("share.rank", v?.rank, 0, 2 ** 31 - 1))
      .set("hidden", integerArg("share.hidden", v.hidden, 0, 2 ** 31 - 1))
      .set("max_tokens_per_rank", integerArg("share.maxTokensPerRank", v.maxTokensPerRank, 0, 2 ** 31 - 1))
      .set("ll_num_experts", integerArg("share.lowLatencyExperts", v.lowLatencyExperts, 0, 2 ** 31 - 1))
      .set("bytes", BigInt(integerArg("share.bytes", v.bytes, 0, Number.MAX_SAFE_INTEGER)))
      .set("ranks_per_node", integerArg("share.ranksPerNode", v.ranksPerNode, 1, 2 ** 31 - 1))
      .set("internode_path", integerArg("share.internodePath", v.internodePath ?? 0, 0, INTERNODE_PATHS.length - 1))
      .set("network_ring_entries", integerArg("share.networkRingEntries", v.networkRingEntries ?? 0, 0, 2 ** 24));
    if (typeof v.name !== "string" || v.name.length >= 256) {
      throw new SwitchyardError("INVALID_ARGUMENT", "share.name: expected a segment name", { argument: "share.name" });
    }
    s.setString("name", v.name);
    const endpoint = v.networkEndpoint ?? "";
    if (typeof endpoint !== "string" || endpoint.length >= 1024 || !/^[0-9a-f]*$/.test(endpoint)) {
      throw new SwitchyardError("INVALID_ARGUMENT", `share.networkEndpoint: rank ${v.rank}'s: expected lowercase hex`, {
        argument: "share.networkEndpoint",
      });
    }
    s.setString("network_endpoint", endpoint);
    const p = this.pointer;
    check(native().sy_buffer_import(p, s.bytes), p, "importShare");
  }

  /** Process groups: once every peer has mapped this buffer, drops its name (see `sy_buffer_seal`). */
  seal(): void {
    const p = this.pointer;
    check(native().sy_buffer_seal(p), p, "seal");
  }

  /**
   * Process groups: gives up on the buffer set because rank `peer` failed before the first
   * operation (see `sy_buffer_abandon`): every peer's wait on it ends at once, naming `peer`.
   */
  abandon(peer: number): void {
    const p = this.pointer;
    check(native().sy_buffer_abandon(p, integerArg("peer", peer, 0, 2 ** 31 - 1)), p, "abandon");
  }

  /** The stream the buffer's operations run on. */
  get commStream(): Stream {
    this.pointer;
    return this.#commStream;
  }

  /**
   * Routing statistics of `topkIdx` (`[T, K]`, -1 = none): tokens per rank, per node and per
   * expert, and the token-in-rank and token-in-node matrices. Local: no other rank takes part.
   */
  layout(topkIdx: Tensor, options: LayoutOptions): Promise<DispatchLayout> {
    // Local (not collective): it need not wait for earlier operations of this buffer to be issued.
    const held = new Borrowed();
    return Promise.resolve().then(() => {
      const o = optionsObject("options", options) as LayoutOptions;
      const args = LayoutArgs.create()
        .set("num_experts", integerArg("numExperts", o.numExperts, 1, 2 ** 31 - 1))
        .setPointer("topk_idx", held.take(instanceArg("topkIdx", topkIdx, Tensor, "Tensor"), "topkIdx"));
      setStreamOptions(args, this.rank, o, held);
      const res = LayoutStruct.create();
      const p = this.pointer;
      check(native().sy_layout(p, args.bytes, res.bytes), p, "layout");
      const t = (
        f:
          | "num_tokens_per_rank"
          | "num_tokens_per_expert"
          | "is_token_in_rank"
          | "num_tokens_per_node"
          | "is_token_in_node",
      ) => new Tensor(res.pointer(f)!, this.rank);
      const ev = res.pointer("event");
      return new DispatchLayout(
        t("num_tokens_per_rank") as Tensor<"i32">,
        t("num_tokens_per_expert") as Tensor<"i32">,
        t("is_token_in_rank") as Tensor<"bool">,
        t("num_tokens_per_node") as Tensor<"i32">,
        t("is_token_in_node") as Tensor<"bool">,
        ev ? new Event(ev, this.rank) : undefined,
      );
    }).finally(() => held.release());
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
  dispatch(x: Tensor, options: DispatchOptions = {}): Promise<DispatchResult> {
    // Everything the call uses is taken now: disposing it once dispatch() returns is safe. An
    // argument refused here is a refusal the peers hear of (#refused), as the library's own.
    return this.#call(Operation.DISPATCH, (held) => {
      const o = optionsObject("options", options ?? {}) as DispatchOptions;
      const args = DispatchArgs.create()
        .setPointer("x", held.take(instanceArg("x", x, Tensor, "Tensor"), "x"))
        .setPointer("x_scales", optionalTensor("xScales", o.xScales, held))
        .setPointer("topk_idx", optionalTensor("topkIdx", o.topkIdx, held))
        .setPointer("topk_weights", optionalTensor("topkWeights", o.topkWeights, held))
        .setPointer("is_token_in_rank", routingOf(o, held))
        .setPointer(
          "handle",
          o.handle === undefined
            ? null
            : held.take(instanceArg("handle", o.handle, DispatchHandle, "DispatchHandle"), "handle"),
        )
        .set("num_experts", integerArg("numExperts", o.numExperts ?? 0, 0, 2 ** 31 - 1))
        .set("num_worst_tokens", integerArg("numWorstTokens", o.numWorstTokens ?? 0, 0, 2 ** 31))
        .set("expert_alignment", integerArg("expertAlignment", o.expertAlignment ?? 1, 1, 2 ** 20))
        .set("layout", flag("expand", o.expand))
        .set("zero_padding", flag("zeroPadding", o.zeroPadding));
      setStreamOptions(args, this.rank, o, held);
      return { args, waits: o.handle === undefined && !o.numWorstTokens };
    }, ({ args, waits }) => this.#dispatchNow(args, waits));
  }

  async #dispatchNow(args: ReturnType<typeof DispatchArgs.create>, waits: boolean): Promise<DispatchResult> {
    const res = DispatchStruct.create();
    const p = this.pointer;
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
    // Inputs taken now, refusals told to the peers: as in dispatch().
    return this.#call(Operation.COMBINE, (held) => {
      const o = optionsObject("options", options ?? {}) as CombineOptions;
      const reduction = choiceArg("internodeReduction", o.internodeReduction, INTERNODE_REDUCTIONS);
      const bias = o.bias === undefined ? [] : o.bias instanceof Tensor ? [o.bias] : [...o.bias];
      if (bias.length > 2) {
        throw new SwitchyardError("INVALID_ARGUMENT", "bias: at most two bias tensors", { argument: "bias" });
      }
      const args = CombineArgs.create()
        .setPointer("x", held.take(instanceArg("x", x, Tensor, "Tensor"), "x"))
        .setPointer("handle", held.take(instanceArg("handle", handle, DispatchHandle, "DispatchHandle"), "handle"))
        .setPointer("topk_weights", optionalTensor("topkWeights", o.topkWeights, held))
        .setPointer("bias0", optionalTensor("bias", bias[0], held))
        .setPointer("bias1", optionalTensor("bias", bias[1], held))
        .setPointer("out", optionalTensor("out", o.out, held))
        .set("internode_reduction", reduction);
      setStreamOptions(args, this.rank, o, held);
      return args;
    }, (args) => {
      const res = CombineStruct.create();
      const p = this.pointer;
      check(native().sy_combine(p, args.bytes, res.bytes), p, "combine");
      const w = res.pointer("combined_topk_weights");
      const ev = res.pointer("event");
      return new CombineResult(
        new Tensor(res.pointer("combined_x")!, this.rank) as Tensor<"bf16">,
        w ? new Tensor(w, this.rank) as Tensor<"f32"> : undefined,
        ev ? new Event(ev, this.rank) : undefined,
      );
    });
  }

  /**
   * Low-latency dispatch of `x` (`[T, hidden]` bf16, T <= maxTokensPerRank) by `topkIdx`
   * (`[T, K]`, -1 = none): every rank receives, per local expert, the tokens routed to it in
   * fixed slots, sources ascending then token order. Never waits on the host. Collective.
   */
  lowLatencyDispatch(
    x: Tensor,
    topkIdx: Tensor,
    options: LowLatencyDispatchOptions = {},
  ): Promise<LowLatencyDispatchResult> {
    // Inputs taken now, and a refusal told to the peers, as in dispatch().
    return this.#call(Operation.LOW_LATENCY_DISPATCH, (held) => {
      const o = optionsObject("options", options ?? {}) as LowLatencyDispatchOptions;
      const flags = (flag("useFp8", o.useFp8 ?? true) ? LLFlags.FP8 : 0) |
        (flag("roundScale", o.roundScale) ? LLFlags.ROUND_SCALE : 0) |
        (flag("useUe8m0", o.useUe8m0) ? LLFlags.UE8M0 : 0) |
        (flag("asyncFinish", o.asyncFinish) ? LLFlags.ASYNC_FINISH : 0) |
        (flag("returnRecvHook", o.returnRecvHook) ? LLFlags.RETURN_HOOK : 0);
      const args = LLDispatchArgs.create()
        .set("flags", flags)
        .setPointer("x", held.take(instanceArg("x", x, Tensor, "Tensor"), "x"))
        .setPointer("topk_idx", held.take(instanceArg("topkIdx", topkIdx, Tensor, "Tensor"), "topkIdx"))
        .setPointer(
          "cumulative_local_expert_recv_stats",
          optionalTensor("cumulativeLocalExpertRecvStats", o.cumulativeLocalExpertRecvStats, held),
        )
        .setPointer(
          "dispatch_wait_recv_cost_stats",
          optionalTensor("dispatchWaitRecvCostStats", o.dispatchWaitRecvCostStats, held),
        )
        .setPointer("compute_stream", held.take(this.#computeStream(o.stream), "stream"));
      return args;
    }, (args) => {
      const res = LLDispatchStruct.create();
      const p = this.pointer;
      check(native().sy_ll_dispatch(p, args.bytes, res.bytes), p, "lowLatencyDispatch");
      const scales = res.pointer("recv_x_scales");
      const ev = res.pointer("event");
      const hook = res.pointer("hook");
      return new LowLatencyDispatchResult(
        new Tensor(res.pointer("recv_x")!, this.rank),
        scales ? new Tensor(scales, this.rank) : undefined,
        new Tensor(res.pointer("recv_count")!, this.rank) as Tensor<"i32">,
        new LowLatencyHandle(res.pointer("handle")!, this.rank),
        ev ? new Event(ev, this.rank) : undefined,
        hook ? new RecvHook(hook) : undefined,
      );
    });
  }

  /**
   * Low-latency combine: sends the expert outputs `x` (`[E_local, R * maxTokensPerRank, hidden]`
   * bf16, rows as `lowLatencyDispatch` delivered them) back, and reduces each token as
   * `sum_k topkWeights[t][k] * y_k` in float32 over its valid entries in top-k order. Pass the
   * rank's own `topkIdx`/`topkWeights` of the dispatch. Collective.
   */
  lowLatencyCombine(
    x: Tensor | undefined,
    topkIdx: Tensor,
    topkWeights: Tensor,
    handle: LowLatencyHandle,
    options: LowLatencyCombineOptions = {},
  ): Promise<LowLatencyCombineResult> {
    return this.#call(Operation.LOW_LATENCY_COMBINE, (held) => {
      const o = optionsObject("options", options ?? {}) as LowLatencyCombineOptions;
      const flags = (flag("useLogfmt", o.useLogfmt) ? LLFlags.LOGFMT : 0) |
        (flag("zeroCopy", o.zeroCopy) ? LLFlags.ZERO_COPY : 0) |
        (flag("asyncFinish", o.asyncFinish) ? LLFlags.ASYNC_FINISH : 0) |
        (flag("returnRecvHook", o.returnRecvHook) ? LLFlags.RETURN_HOOK : 0);
      const args = LLCombineArgs.create()
        .set("flags", flags)
        .setPointer("x", optionalTensor("x", x, held))
        .setPointer("topk_idx", held.take(instanceArg("topkIdx", topkIdx, Tensor, "Tensor"), "topkIdx"))
        .setPointer("topk_weights", held.take(instanceArg("topkWeights", topkWeights, Tensor, "Tensor"), "topkWeights"))
        .setPointer("handle", held.take(instanceArg("handle", handle, LowLatencyHandle, "LowLatencyHandle"), "handle"))
        .setPointer("out", optionalTensor("out", o.out, held))
        .setPointer(
          "combine_wait_recv_cost_stats",
          optionalTensor("combineWaitRecvCostStats", o.combineWaitRecvCostStats, held),
        )
        .setPointer("compute_stream", held.take(this.#computeStream(o.stream), "stream"));
      return args;
    }, (args) => {
      const res = LLCombineStruct.create();
      const p = this.pointer;
      check(native().sy_ll_combine(p, args.bytes, res.bytes), p, "lowLatencyCombine");
      const ev = res.pointer("event");
      const hook = res.pointer("hook");
      return new LowLatencyCombineResult(
        new Tensor(res.pointer("combined_x")!, this.rank) as Tensor<"bf16">,
        ev ? new Event(ev, this.rank) : undefined,
        hook ? new RecvHook(hook) : undefined,
      );
    });
  }

  /**
   * The buffer the next low-latency combine sends from (`[E_local, R * maxTokensPerRank,
   * hidden]` bf16): write the expert outputs into it and combine with `zeroCopy`. It becomes
   * unusable once another low-latency call takes its half of the double buffer.
   */
  nextCombineBuffer(handle: LowLatencyHandle): Tensor<"bf16"> {
    const out = new OutHandle();
    const p = this.pointer;
    const h = instanceArg("handle", handle, LowLatencyHandle, "LowLatencyHandle").pointer;
    check(native().sy_ll_next_combine_buffer(p, h, out.cell), p, "nextCombineBuffer");
    return new Tensor(out.take(), this.rank) as Tensor<"bf16">;
  }

  /**
   * Resets the low-latency double buffer on every rank (collective, in stream order): after an
   * abandoned or masked sequence of calls, or to restart the call numbering.
   */
  cleanLowLatencyBuffer(options: { readonly stream?: Stream } = {}): Promise<void> {
    return this.#serial(async () => {
      const p = this.pointer;
      const out = new OutHandle();
      check(
        native().sy_ll_clean(p, this.#computeStream(options?.stream).pointer, out.cell),
        p,
        "cleanLowLatencyBuffer",
      );
      using done = new Event(out.take(), this.rank);
      await done.synchronize();
    });
  }

  /**
   * Masks (or unmasks) `rank` in this rank's view (buffers created with `enableMasking`). It
   * takes effect once the work already enqueued for this buffer (on its communication stream
   * and on `stream`, the rank's stream by default) has finished, so no call in flight sees the
   * mask change under it.
   */
  updateMask(rank: number, masked = true, options: { readonly stream?: Stream } = {}): Promise<void> {
    const r = integerArg("rank", rank, 0, 2 ** 31 - 1);
    return this.#afterEnqueued(options.stream, "updateMask", (p) => native().sy_mask_update(p, r, masked ? 1 : 0));
  }

  /** This rank's mask: 1 for each masked rank. */
  queryMask(): number[] {
    const n = this.rank.group.size;
    const out = new Int32Array(n);
    const p = this.pointer;
    check(native().sy_mask_query(p, out, n), p, "queryMask");
    return Array.from(out);
  }

  /** Unmasks every rank, in the same order as {@linkcode EpBuffer.updateMask}. */
  cleanMask(options: { readonly stream?: Stream } = {}): Promise<void> {
    return this.#afterEnqueued(options.stream, "cleanMask", (p) => native().sy_mask_clean(p));
  }

  /** Runs `apply` once every operation enqueued so far for this buffer has finished. */
  #afterEnqueued(
    stream: Stream | undefined,
    what: string,
    apply: (p: Deno.PointerObject) => number,
  ): Promise<void> {
    const compute = this.#computeStream(stream);
    return this.#serial(async () => {
      await compute.synchronize();
      await this.#commStream.synchronize();
      const p = this.pointer;
      check(apply(p), p, what);
    });
  }

  #serial<T>(op: () => T | Promise<T>): Promise<T> {
    const run = this.#tail.then(op);
    this.#tail = run.then(() => {}, () => {});
    return run;
  }

  // A call whose arguments are built now (`build` takes the inputs into `held`, so disposing
  // them once the call returns is safe) and which then runs in order (`run`), after which
  // the inputs are released. An argument refused while building is told to the peers
  // (`refusal`: the sy_operation, #refused).
  #call<A, R>(
    refusal: number,
    build: (held: Borrowed) => A,
    run: (args: A) => R | Promise<R>,
  ): Promise<R> {
    const held = new Borrowed();
    let args: A;
    try {
      args = build(held);
    } catch (e) {
      held.release();
      return this.#refused(refusal, e);
    }
    return this.#serial(() => run(args)).finally(() => held.release());
  }

  // A collective refused before it reached the library (`why`): in its place in the order, the
  // library is told this rank will not make it, so the peers fail it at once naming this rank
  // (sy_reject) instead of waiting; then the call rejects with `why`. Where even that could not
  // be enqueued, the error says so: the peers then fail the call only at their deadline.
  #refused<T>(operation: number, why: unknown): Promise<T> {
    return this.#serial(() => {
      if (this.disposed) throw why;
      const p = this.pointer;
      const status = native().sy_reject(p, operation);
      if (status === Status.OK) throw why;
      // The library's message says what stopped the refusal and that the peers wait it out.
      const untold = errorFor(status, p, "telling the peers of the refusal");
      const known = why instanceof SwitchyardError ? why : undefined;
      throw new SwitchyardError(
        known?.code ?? "INVALID_ARGUMENT",
        `${why instanceof Error ? why.message : String(why)} (${untold.message})`,
        { argument: known?.argument, rank: known?.rank, cause: why },
      );
    });
  }

  #computeStream(stream: Stream | undefined): Stream {
    return stream === undefined ? this.rank.stream : instanceArg("stream", stream, Stream, "Stream");
  }

  /** Releases the communication stream reference with the buffer. */
  protected override disposeChildren(): void {
    this.#commStream[Symbol.dispose]();
  }
}
