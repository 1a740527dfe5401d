/**
 * Switchyard: expert-parallel communication for Mixture-of-Experts models, for Deno.
 *
 * `dispatch` sends every token to the ranks that host its top-k experts; `combine` brings the
 * expert outputs back and reduces them. Ranks are virtual ranks in one process (threads on the
 * host backend, GPUs on the CUDA backend).
 *
 * @example Dispatch and combine on four virtual ranks
 * ```ts
 * import { Group, randomFloats, randomRouting, Tensor } from "@switchyard/ep";
 *
 * const hidden = 256, tokens = 32, experts = 16, topk = 4;
 * using group = Group.local({ ranks: 4, backend: "host" });
 * const buffers = await group.createBuffers({ hidden, maxTokensPerRank: tokens });
 * const combined = await group.all(async (rank, r) => {
 *   const routing = randomRouting({ tokens, experts, topk, seed: r });
 *   using x = await Tensor.fromFloat32(rank, randomFloats(tokens * hidden, r), { dtype: "bf16", shape: [tokens, hidden] });
 *   using topkIdx = await Tensor.from(rank, routing.topkIdx, { shape: [tokens, topk] });
 *   using topkWeights = await Tensor.from(rank, routing.topkWeights, { shape: [tokens, topk] });
 *   using sent = await buffers[r].dispatch(x, { topkIdx, topkWeights, numExperts: experts });
 *   // ... run the local experts on sent.recvX; here they return their input ...
 *   using back = await buffers[r].combine(sent.recvX, sent.handle);
 *   return await back.combinedX.readFloat32();
 * });
 * console.log(combined.length); // 4
 * for (const b of buffers) b[Symbol.dispose]();
 * ```
 *
 * @module
 */

export {
  type Backend,
  type EmulatedNicModel,
  Group,
  type LocalGroupOptions,
  type ProcessGroupOptions,
} from "./src/group.ts";
export { type NcclStatus } from "./src/nccl.ts";
export { type DistEnv, type EnvReader } from "./src/dist_env.ts";
export { Rank } from "./src/rank.ts";
export { Stream } from "./src/stream.ts";
export { Event } from "./src/event.ts";
export { type CopyOptions, type DTypeOf, Tensor, type TensorSpec } from "./src/tensor.ts";
export {
  type CombineOptions,
  type DispatchOptions,
  EpBuffer,
  type EpBufferOptions,
  type InternodeReduction,
  type LayoutOptions,
  type LowLatencyCombineOptions,
  type LowLatencyDispatchOptions,
  type NetworkStats,
  type StreamOptions,
} from "./src/buffer.ts";
export {
  LowLatencyCombineResult,
  LowLatencyDispatchResult,
  LowLatencyHandle,
  type LowLatencyHandleInfo,
  RecvHook,
} from "./src/low_latency.ts";
export { DispatchHandle, type HandleInfo } from "./src/handle.ts";
export { CombineResult, DispatchLayout, type DispatchParts, DispatchResult } from "./src/results.ts";
export {
  type BufferPlan,
  bufferSizeHint,
  type BufferSizeQuery,
  type Config,
  defaultConfig,
  type InternodePath,
} from "./src/config.ts";
export { type BackendInfo, backendInfo } from "./src/backend.ts";
export {
  type DType,
  type DTypeArray,
  dtypeSize,
  fromBF16,
  fromFP8E4M3,
  type TensorArray,
  toBF16,
  toFP8E4M3,
} from "./src/dtype.ts";
export {
  type ErrorCode,
  SwitchyardError,
  type SwitchyardErrorOptions,
  SwitchyardTimeoutError,
  type WaitDetails,
  type WaitRole,
} from "./src/errors.ts";
export { libraryVersion, NativeResource } from "./src/native.ts";
export { randomFloats, randomRouting, Rng, type Routing, type RoutingSpec } from "./src/workload.ts";
export { imbalance, quantile, spread, summarize, type Summary } from "./src/stats.ts";
