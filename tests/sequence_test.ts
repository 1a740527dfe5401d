/**
 * Operations in sequence on the same buffers: long dispatch/combine chains with fresh data each
 * time, cached and worst-case dispatches of data the buffers have never held, operations issued
 * without awaiting the previous ones, and recovery after a failed operation.
 */

import assert from "node:assert/strict";
import { type DispatchResult, SwitchyardError, Tensor } from "../mod.ts";
import {
  assertSameArray,
  bytesOf,
  fixture,
  generate,
  orderSensitiveBF16,
  randomBF16,
  type Scenario,
  upload,
} from "./helpers.ts";
import { referenceCombine, referenceDispatch } from "./reference.ts";

const s0: Scenario = { ranks: 4, tokens: [23, 17, 30, 9], hidden: 96, experts: 16, topk: 3, seed: 1, drop: 0.1 };

Deno.test("ten rounds of dispatch and combine with fresh data each round", async () => {
  using fx = await fixture(s0.ranks, s0.hidden, 30);
  for (let round = 0; round < 10; round++) {
    const s = { ...s0, seed: 100 + round, fp8: round % 3 === 1, columnMajorScales: round % 2 === 0 };
    const d = generate(s);
    const expected = referenceDispatch(d.inputs, d.shape);
    const y = expected.map((e, r) => orderSensitiveBF16(e.rows.length * s.hidden, round * 10 + r));
    const want = referenceCombine(expected, y, s.hidden, s.tokens);
    await fx.group.all(async (rank, r) => {
      using up = await upload(rank, s, d, r);
      using sent = await fx.buffers[r].dispatch(up.x, {
        xScales: up.scales,
        topkIdx: up.topkIdx,
        topkWeights: up.topkWeights,
        numExperts: s.experts,
      });
      assertSameArray(bytesOf(await sent.recvX.read()), expected[r].x, `round ${round}, rank ${r}`);
      using yt = await Tensor.from(rank, y[r], { shape: [expected[r].rows.length, s.hidden] });
      using back = await fx.buffers[r].combine(yt, sent.handle);
      assertSameArray(await back.combinedX.read(), want[r], `round ${round}, rank ${r}: combine`);
    });
  }
});

Deno.test("cached and worst-case dispatches move the new data, not what the buffer held", async () => {
  const first = generate(s0);
  const second = generate({ ...s0, seed: 2 }); // same shape, other payloads and routing
  const secondRows = referenceDispatch(second.inputs, second.shape);
  // A cached dispatch of `second`'s payloads along `first`'s routing: what `first`'s routing
  // would deliver if the tokens carried `second`'s payloads.
  const mixed = referenceDispatch(
    first.inputs.map((input, r) => ({ ...input, x: second.inputs[r].x })),
    first.shape,
  );
  using fx = await fixture(s0.ranks, s0.hidden, 30);
  await fx.group.all(async (rank, r) => {
    using a = await upload(rank, s0, first, r);
    using b = await upload(rank, s0, second, r);
    using exact = await fx.buffers[r].dispatch(a.x, { topkIdx: a.topkIdx, topkWeights: a.topkWeights, numExperts: 16 });
    using cached = await fx.buffers[r].dispatch(b.x, { handle: exact.handle });
    using worst = await fx.buffers[r].dispatch(b.x, {
      topkIdx: b.topkIdx,
      topkWeights: b.topkWeights,
      numExperts: 16,
      numWorstTokens: 30 * 4,
    });
    assertSameArray(bytesOf(await cached.recvX.read()), mixed[r].x, `rank ${r}: cached dispatch`);
    const n = secondRows[r].rows.length;
    assertSameArray(bytesOf(await worst.recvX.read()).subarray(0, n * s0.hidden * 2), secondRows[r].x);
    assert.deepEqual(Array.from(await worst.recvCount.read()), [n]);
  });
});

Deno.test("operations issued without awaiting keep their program order on every rank", async () => {
  const a = generate(s0), b = generate({ ...s0, seed: 3 });
  const ra = referenceDispatch(a.inputs, a.shape), rb = referenceDispatch(b.inputs, b.shape);
  using fx = await fixture(s0.ranks, s0.hidden, 30);
  const inputs = await fx.group.all(async (rank, r) => [await upload(rank, s0, a, r), await upload(rank, s0, b, r)]);
  // Every rank: exact-size dispatch of A, then (not awaited in between) worst-case dispatch of B,
  // with ranks starting at different moments.
  const results = await fx.group.all(async (_, r) => {
    await new Promise((resolve) => setTimeout(resolve, 7 * r));
    const [ia, ib] = inputs[r];
    const pa = fx.buffers[r].dispatch(ia.x, { topkIdx: ia.topkIdx, topkWeights: ia.topkWeights, numExperts: 16 });
    const pb = fx.buffers[r].dispatch(ib.x, {
      topkIdx: ib.topkIdx,
      topkWeights: ib.topkWeights,
      numExperts: 16,
      numWorstTokens: 120,
    });
    return await Promise.all([pa, pb]);
  });
  for (let r = 0; r < s0.ranks; r++) {
    const [da, db] = results[r] as [DispatchResult, DispatchResult];
    assertSameArray(bytesOf(await da.recvX.read()), ra[r].x, `rank ${r}: A`);
    const n = rb[r].rows.length;
    assertSameArray(bytesOf(await db.recvX.read()).subarray(0, n * s0.hidden * 2), rb[r].x, `rank ${r}: B`);
    da[Symbol.dispose]();
    db[Symbol.dispose]();
  }
  for (const pair of inputs) for (const u of pair) u[Symbol.dispose]();
});

Deno.test("a failed operation is reported by its own outputs only; later operations succeed", async () => {
  using fx = await fixture(2, 64, 8, 3000);
  const H = 64, T = 8;
  await fx.group.all(async (rank, r) => {
    using x = await Tensor.from(rank, randomBF16(T * H, r), { shape: [T, H] });
    using idx = await Tensor.from(rank, new BigInt64Array(T).fill(0n), { shape: [T, 1] });
    using w = await Tensor.from(rank, new Float32Array(T).fill(1), { shape: [T, 1] });
    const args = { topkIdx: idx, topkWeights: w, numExperts: 2 };
    // Too few worst-case rows for rank 0 (it receives 16): that dispatch fails...
    using bad = await fx.buffers[r].dispatch(x, { ...args, numWorstTokens: 4 });
    if (r === 0) {
      for (let i = 0; i < 2; i++) {
        await assert.rejects(
          () => bad.recvX.read(),
          (e: unknown) => e instanceof SwitchyardError && e.argument === "numWorstTokens",
        );
      }
      // ...combine refuses its handle instead of reading past the rows it has; a refused call
      // is still a collective call, so rank 1, combining its own, hears of it at once.
      await assert.rejects(() => fx.buffers[r].combine(bad.recvX, bad.handle), /its dispatch failed/);
    } else {
      assert.deepEqual(Array.from(await bad.recvCount.read()), [0]);
      using c = await fx.buffers[r].combine(bad.recvX, bad.handle);
      await assert.rejects(
        () => c.combinedX.read(),
        (e: unknown) => e instanceof SwitchyardError && e.code === "PEER_FAILED" && /rank 0 rejected/.test(e.message),
      );
    }
    // ...and the next operations on the same buffers are unaffected.
    for (let i = 0; i < 3; i++) {
      using ok = await fx.buffers[r].dispatch(x, args);
      assert.equal(ok.numRecvTokens, r === 0 ? 2 * T : 0);
      using back = await fx.buffers[r].combine(ok.recvX, ok.handle);
      await back.combinedX.read();
    }
  });
});
