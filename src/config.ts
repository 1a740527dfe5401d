/**
 * Tuning defaults per rank count, and buffer size hints from the library's planner.
 *
 * @module
 */

import { BufferOptions, BufferPlan as PlanStruct, ConfigStruct } from "../ffi/structs.ts";
import { check, choiceArg, integerArg, native } from "./native.ts";

/** How the normal mode crosses nodes: see `EpBufferOptions.internodePath`. */
export type InternodePath = "two-hop" | "direct";
/** The `sy_internode_path` values, in order. */
export const INTERNODE_PATHS: readonly InternodePath[] = ["two-hop", "direct"];

/** Kernel tuning: SM budget and chunk sizes (tokens). */
export interface Config {
  /** SMs the communication kernels may use (even: half send, half receive). */
  readonly numSms: number;
  /** Tokens per NVLink publication. */
  readonly nvlChunkSend: number;
  /** NVLink receive ring capacity in tokens. */
  readonly nvlChunkRecv: number;
  /** Tokens per RDMA publication. */
  readonly rdmaChunkSend: number;
  /** RDMA receive ring capacity in tokens. */
  readonly rdmaChunkRecv: number;
}

/** The tuned defaults for `ranks` ranks (DeepEP's published table, extended). */
export function defaultConfig(ranks: number): Config {
  const c = ConfigStruct.create();
  check(native().sy_default_config(integerArg("ranks", ranks, 1, 1024), c.bytes), null, "defaultConfig");
  return {
    numSms: c.number("num_sms"),
    nvlChunkSend: c.number("nvl_chunk_send"),
    nvlChunkRecv: c.number("nvl_chunk_recv"),
    rdmaChunkSend: c.number("rdma_chunk_send"),
    rdmaChunkRecv: c.number("rdma_chunk_recv"),
  };
}

/** What one rank's communication buffer holds. */
export interface BufferPlan {
  /**
   * Bytes one rank allocates on the host backend. The CUDA backend shares only the header
   * ({@link BufferPlan.headerBytes}): its kernels read payloads straight from the peers' tensors.
   */
  readonly totalBytes: number;
  /** Bytes of one dispatched token record. */
  readonly recordBytes: number;
  /** Bytes of one combine row. */
  readonly combineRowBytes: number;
  /** Bytes of the flag and count header. */
  readonly headerBytes: number;
  /** Bytes of the dispatch receive region. */
  readonly dispatchRegionBytes: number;
  /** Bytes of the combine receive region. */
  readonly combineRegionBytes: number;
  /** Most rows one rank can receive (ranks x maxTokensPerRank). */
  readonly maxRecvRows: number;
  /** One half of the low-latency double buffer (0 without one); the buffer holds two. */
  readonly lowLatencyHalfBytes: number;
  /** One low-latency dispatch message. */
  readonly lowLatencyMessageBytes: number;
  /** One low-latency combine row. */
  readonly lowLatencyCombineRowBytes: number;
  /** One network record of the two-hop dispatch (0 on one node). */
  readonly networkRecordBytes: number;
  /**
   * What one partial sum of the two-hop combine puts on the network (0 on one node): a header,
   * float channels and top-k weights, what a node passes to the next node a token visits.
   */
  readonly networkPartialBytes: number;
  /** What one result (or hierarchical partial) of the two-hop combine puts on the network: a header and a combine row. */
  readonly networkResultBytes: number;
  /** Entries of each network ring: one ring per sender node at every rank (0 on one node). */
  readonly networkRingEntries: number;
  /** Bytes of the network rings of the two hops (0 on one node). */
  readonly networkRegionBytes: number;
}

/** Decodes a `sy_buffer_plan`. */
export function planFromStruct(p: ReturnType<typeof PlanStruct.create>): BufferPlan {
  return {
    totalBytes: p.number("total_bytes"),
    recordBytes: p.number("record_bytes"),
    combineRowBytes: p.number("combine_row_bytes"),
    headerBytes: p.number("header_bytes"),
    dispatchRegionBytes: p.number("dispatch_region_bytes"),
    combineRegionBytes: p.number("combine_region_bytes"),
    maxRecvRows: p.number("max_recv_rows"),
    lowLatencyHalfBytes: p.number("ll_half_bytes"),
    lowLatencyMessageBytes: p.number("ll_message_bytes"),
    lowLatencyCombineRowBytes: p.number("ll_combine_row_bytes"),
    networkRecordBytes: p.number("net_record_bytes"),
    networkPartialBytes: p.number("net_partial_bytes"),
    networkResultBytes: p.number("net_result_bytes"),
    networkRingEntries: p.number("net_ring_entries"),
    networkRegionBytes: p.number("net_region_bytes"),
  };
}

/** What {@linkcode bufferSizeHint} sizes. */
export interface BufferSizeQuery {
  /** Ranks in the group. */
  readonly ranks: number;
  /** Channels per token. */
  readonly hidden: number;
  /** Most tokens one rank dispatches at once. */
  readonly maxTokensPerRank: number;
  /** Size the low-latency double buffer for this many experts too. */
  readonly lowLatencyExperts?: number;
  /** Ranks per node (default: one node): across nodes a buffer also holds the network records. */
  readonly ranksPerNode?: number;
  /** How the buffer crosses nodes (default two hops; direct needs no network region). */
  readonly internodePath?: InternodePath;
  /** Entries of each network ring (default: DeepEP's for the rank count). */
  readonly networkRingEntries?: number;
}

/** How much memory a buffer with these settings takes per rank (the library's own plan). */
export function bufferSizeHint(query: BufferSizeQuery): BufferPlan {
  const opts = BufferOptions.create()
    .set("hidden", integerArg("hidden", query.hidden, 1, 2 ** 31 - 1))
    .set("max_tokens_per_rank", integerArg("maxTokensPerRank", query.maxTokensPerRank, 1, 2 ** 31 - 1))
    .set("ll_num_experts", integerArg("lowLatencyExperts", query.lowLatencyExperts ?? 0, 0, 2 ** 31 - 1));
  const ranks = integerArg("ranks", query.ranks, 1, 1024);
  opts.set("ranks_per_node", integerArg("ranksPerNode", query.ranksPerNode ?? ranks, 1, ranks))
    .set("internode_path", choiceArg("internodePath", query.internodePath, INTERNODE_PATHS))
    .set("network_ring_entries", integerArg("networkRingEntries", query.networkRingEntries ?? 0, 0, 2 ** 24));
  const out = PlanStruct.create();
  check(
    native().sy_plan_buffer(opts.bytes, ranks, out.bytes),
    null,
    "bufferSizeHint",
  );
  return planFromStruct(out);
}
