/**
 * Host-backend low-latency dispatch and combine at DeepSeek-V3 decode shape (8 ranks x 128
 * tokens x hidden 7168, top-8 of 256 experts), next to a plain copy of the same bytes in the
 * same run. "Bytes" are the BF16 rows a dispatch delivers (one per valid top-k entry); the FP8
 * dispatch moves about half of them, plus scales.
 *
 * Run: deno task bench:micro (or deno bench --allow-ffi --allow-env --allow-read bench/low_latency_bench.ts).
 */

import { Group, randomFloats, randomRouting, Tensor, toBF16 } from "../mod.ts";

const R = 8, T = 128, H = 7168, E = 256, K = 8;
const group = Group.local({ ranks: R });
const buffers = await group.createBuffers({ hidden: H, maxTokensPerRank: T, lowLatency: { numExperts: E } });
const inputs = await group.all(async (rank, r) => {
  const routing = randomRouting({ tokens: T, experts: E, topk: K, seed: r });
  return {
    x: await Tensor.from(rank, toBF16(randomFloats(T * H, r)), { shape: [T, H] }),
    topkIdx: await Tensor.from(rank, routing.topkIdx, { shape: [T, K] }),
    topkWeights: await Tensor.from(rank, routing.topkWeights, { shape: [T, K] }),
  };
});
const rows = R * T * K; // no -1 entries in this routing
const bytes = rows * H * 2;
const src = new Uint8Array(bytes).fill(1);
const dst = new Uint8Array(bytes);

const sync = () => group.all((rank) => rank.stream.synchronize());
const dispatch = (useFp8: boolean) =>
  group.all((_, r) => buffers[r].lowLatencyDispatch(inputs[r].x, inputs[r].topkIdx, { useFp8 }));
// A dispatch whose handle and rows the combine benchmark reuses.
const held = await dispatch(false);
await sync();

const opts = { group: "low-latency decode step", n: 20, warmup: 3 } as const;
console.log(`payload: ${rows} rows, ${(bytes / 2 ** 20).toFixed(1)} MiB of BF16`);

Deno.bench(
  `copy of the same bytes (${(bytes / 2 ** 20).toFixed(0)} MiB, one thread)`,
  { ...opts, baseline: true },
  () => {
    dst.set(src);
  },
);

Deno.bench("lowLatencyDispatch, BF16", opts, async () => {
  const res = await dispatch(false);
  await sync();
  for (const d of res) d[Symbol.dispose]();
});

Deno.bench("lowLatencyDispatch, FP8 (quantised by the library)", opts, async () => {
  const res = await dispatch(true);
  await sync();
  for (const d of res) d[Symbol.dispose]();
});

Deno.bench("lowLatencyCombine, BF16", opts, async () => {
  const res = await group.all((_, r) =>
    buffers[r].lowLatencyCombine(held[r].recvX, inputs[r].topkIdx, inputs[r].topkWeights, held[r].handle)
  );
  await sync();
  for (const c of res) c[Symbol.dispose]();
});
