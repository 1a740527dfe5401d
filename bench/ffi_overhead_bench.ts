/**
 * What the TypeScript and FFI layers add to one dispatch call, on tiny inputs (1 rank, 1 token,
 * hidden 8, top-1), next to a bare FFI call:
 *
 *   bare FFI call                 sy_abi_version(): the floor of any call into the library
 *   C dispatch, raw FFI           sy_dispatch with a prebuilt args struct (worst-case mode, so
 *                                 the call only validates, allocates and enqueues), results
 *                                 released through raw FFI: the C side plus one FFI crossing
 *   EpBuffer.dispatch             the same dispatch through the TypeScript API, results disposed
 *   EpBuffer.dispatch exact-size  the default mode: a nonblocking FFI call that waits for the
 *                                 counts on a worker thread
 *
 * Run: deno task bench:micro (or deno bench --allow-ffi --allow-env --allow-read bench/).
 */

import { DispatchArgs, DispatchResult as DispatchStruct } from "../ffi/structs.ts";
import { Group, Tensor } from "../mod.ts";
import { native } from "../src/native.ts";

const lib = native();
const group = Group.local({ ranks: 1 });
const rank = group.ranks[0];
const buffer = rank.createBuffer({ hidden: 8, maxTokensPerRank: 1 });
const x = await Tensor.from(rank, new Uint16Array(8), { shape: [1, 8] });
const topkIdx = await Tensor.from(rank, new BigInt64Array([0n]), { shape: [1, 1] });
const topkWeights = await Tensor.from(rank, new Float32Array([1]), { shape: [1, 1] });
const options = { topkIdx, topkWeights, numExperts: 1, numWorstTokens: 1 };

const args = DispatchArgs.create()
  .setPointer("x", x.pointer)
  .setPointer("topk_idx", topkIdx.pointer)
  .setPointer("topk_weights", topkWeights.pointer)
  .setPointer("compute_stream", rank.stream.pointer)
  .set("num_experts", 1)
  .set("num_worst_tokens", 1)
  .set("expert_alignment", 1);
const result = DispatchStruct.create();
const outputs = ["recv_x", "recv_topk_idx", "recv_topk_weights", "recv_count"] as const;

let calls = 0;
// Keep the stream's queue short: every 256 calls, let the worker catch up.
async function drain(): Promise<void> {
  if (++calls % 256 === 0) await rank.stream.synchronize();
}

Deno.bench("bare FFI call (sy_abi_version)", { group: "dispatch", baseline: true, n: 200000, warmup: 20000 }, () => {
  lib.sy_abi_version();
});

Deno.bench("C dispatch, raw FFI (worst-case mode)", { group: "dispatch", n: 20000, warmup: 2000 }, async () => {
  if (lib.sy_dispatch(buffer.pointer, args.bytes, result.bytes) !== 0) throw new Error("sy_dispatch failed");
  for (const f of outputs) lib.sy_tensor_destroy(result.pointer(f));
  lib.sy_handle_destroy(result.pointer("handle"));
  await drain();
});

Deno.bench("EpBuffer.dispatch (worst-case mode)", { group: "dispatch", n: 20000, warmup: 2000 }, async () => {
  const res = await buffer.dispatch(x, options);
  res[Symbol.dispose]();
  await drain();
});

Deno.bench("EpBuffer.dispatch (exact-size mode)", { group: "dispatch", n: 20000, warmup: 2000 }, async () => {
  const res = await buffer.dispatch(x, { topkIdx, topkWeights, numExperts: 1 });
  res[Symbol.dispose]();
  await drain();
});
