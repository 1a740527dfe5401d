/**
 * The CUDA backend where a GPU exists: device memory, streams, events, copies (dense and
 * strided), and the layout kernel compared with the host backend. Without a GPU these tests are
 * skipped, and say so.
 */

import assert from "node:assert/strict";
import { backendInfo, Group, randomRouting, SwitchyardError, Tensor } from "../mod.ts";

const cuda = backendInfo("cuda");
const ignore = !cuda.available;
if (ignore) console.log(`cuda_test: skipped, no usable GPU (${cuda.reason || "not compiled"})`);

Deno.test({ name: "cuda: tensors round-trip through device memory, dense and strided", ignore }, async () => {
  using g = Group.local({ ranks: 2, backend: "cuda" });
  const rank = g.ranks[1];
  assert.ok(rank.device >= 0);
  const data = new Float32Array(6 * 5).map((_, i) => i * 0.5);
  using dense = await Tensor.from(rank, data, { shape: [6, 5] });
  assert.deepEqual(await dense.read(), data);
  using strided = Tensor.empty(rank, { dtype: "f32", shape: [6, 5], strides: [1, 6] });
  await strided.write(data);
  assert.deepEqual(await strided.read(), data);
  using side = rank.createStream();
  await dense.write(data.map((v) => -v), { stream: side });
  using ev = side.record();
  ev.wait();
  assert.deepEqual(await dense.read(), data.map((v) => -v));
  assert.equal(ev.query(), true);
});

Deno.test({ name: "cuda: the layout kernel agrees with the host backend", ignore }, async (t) => {
  for (
    const [ranks, experts, topk, tokens, zipf, drop] of [
      [8, 256, 8, 4096, 0, 0],
      [8, 256, 8, 4096, 1.2, 0.1],
      [4, 16, 4, 777, 0, 0.3],
      [16, 16384, 6, 513, 0.5, 0], // more experts than the shared-memory histogram holds
    ]
  ) {
    await t.step(`${ranks} ranks, ${experts} experts, top-${topk}, ${tokens} tokens`, async () => {
      using host = Group.local({ ranks, backend: "host" });
      using gpu = Group.local({ ranks, backend: "cuda" });
      const hb = host.ranks[0].createBuffer({ hidden: 128, maxTokensPerRank: tokens });
      const gb = gpu.ranks[0].createBuffer({ hidden: 128, maxTokensPerRank: tokens });
      const routing = randomRouting({ tokens, experts, topk, seed: tokens, zipf, dropProbability: drop });
      using hi = await Tensor.from(host.ranks[0], routing.topkIdx, { shape: [tokens, topk] });
      using gi = await Tensor.from(gpu.ranks[0], routing.topkIdx, { shape: [tokens, topk] });
      using hl = await hb.layout(hi, { numExperts: experts });
      using gl = await gb.layout(gi, { numExperts: experts });
      assert.deepEqual(await gl.numTokensPerRank.read(), await hl.numTokensPerRank.read());
      assert.deepEqual(await gl.numTokensPerExpert.read(), await hl.numTokensPerExpert.read());
      assert.deepEqual(await gl.isTokenInRank.read(), await hl.isTokenInRank.read());
      hb[Symbol.dispose]();
      gb[Symbol.dispose]();
    });
  }
});

Deno.test({ name: "cuda: a bad expert id is reported from the kernel, and the context survives", ignore }, async () => {
  using g = Group.local({ ranks: 2, backend: "cuda" });
  using buf = g.ranks[0].createBuffer({ hidden: 128, maxTokensPerRank: 4 });
  using idx = await Tensor.from(g.ranks[0], new BigInt64Array([0n, 1n, 2n, 99n]), { shape: [2, 2] });
  using layout = await buf.layout(idx, { numExperts: 4 });
  await assert.rejects(
    () => layout.numTokensPerRank.read(),
    (e: unknown) => e instanceof SwitchyardError && e.argument === "topkIdx" && /token 1, entry 1/.test(e.message),
  );
  using ok = await Tensor.from(g.ranks[0], new Int32Array([5]), { shape: [1] });
  assert.deepEqual(Array.from(await ok.read()), [5]);
});

Deno.test({ name: "cuda: dispatch says clearly that it is not on this backend yet", ignore }, async () => {
  using g = Group.local({ ranks: 1, backend: "cuda" });
  using buf = g.ranks[0].createBuffer({ hidden: 128, maxTokensPerRank: 4 });
  using x = Tensor.empty(g.ranks[0], { dtype: "bf16", shape: [4, 128] });
  using idx = await Tensor.from(g.ranks[0], new BigInt64Array(4), { shape: [4, 1] });
  using w = Tensor.empty(g.ranks[0], { dtype: "f32", shape: [4, 1] });
  await assert.rejects(
    () => buf.dispatch(x, { topkIdx: idx, topkWeights: w, numExperts: 1 }),
    (e: unknown) => e instanceof SwitchyardError && e.code === "UNSUPPORTED",
  );
});
