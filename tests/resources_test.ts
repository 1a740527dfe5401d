/**
 * Streams, events and the lifetime of native handles: stream order, event semantics,
 * idempotent dispose, use after dispose, and outputs that outlive their handles.
 */

import assert from "node:assert/strict";
import { Group, SwitchyardError, Tensor } from "../mod.ts";
import { fixture, randomBF16 } from "./helpers.ts";

Deno.test("ranks and groups describe themselves", () => {
  using g = Group.local({ ranks: 3, timeoutMs: 1234 });
  assert.equal(g.size, 3);
  assert.equal(g.backend, "host");
  assert.deepEqual(g.ranks.map((r) => r.index), [0, 1, 2]);
  assert.ok(g.ranks.every((r) => r.device === -1 && r.timeoutMs === 1234 && r.group === g));
});

Deno.test("events order work across streams", async () => {
  using g = Group.local({ ranks: 1 });
  const rank = g.ranks[0];
  using side = rank.createStream();
  using t = Tensor.empty(rank, { dtype: "f32", shape: [4] });
  const unrecorded = rank.createEvent();
  assert.equal(unrecorded.query(), true, "an unrecorded event counts as complete");
  await unrecorded.synchronize();
  unrecorded[Symbol.dispose]();

  await t.write(new Float32Array([1, 2, 3, 4]), { stream: side });
  using done = side.record();
  done.wait(); // the compute stream waits for the side stream
  assert.deepEqual(Array.from(await t.read()), [1, 2, 3, 4]);
  assert.equal(done.query(), true);
  await side.synchronize();
  await rank.stream.synchronize();
  // Host streams are threads: there is no native stream to hand out.
  assert.throws(() => side.nativeHandle(), (e: unknown) => e instanceof SwitchyardError && e.code === "UNSUPPORTED");
});

Deno.test("events time what a stream ran, by the backend's clock", async (t) => {
  // Rank 0 records `start`, dispatches (worst case: the call returns at once) and records `end`
  // on its compute stream; the dispatch cannot finish before rank 1 joins, `delayMs` later by
  // the JS clock. So end - start is at least about delayMs, and at most the JS time around it.
  using fx = await fixture(2, 32, 4);
  const delayMs = 150;
  const [r0, r1] = fx.group.ranks;
  const inputs = await fx.group.all(async (rank) => ({
    x: await Tensor.from(rank, randomBF16(4 * 32, rank.index), { shape: [4, 32] }),
    idx: await Tensor.from(rank, new BigInt64Array([0n, 1n, 0n, 1n]), { shape: [4, 1] }),
    w: await Tensor.from(rank, new Float32Array(4).fill(1), { shape: [4, 1] }),
  }));
  const dispatch = (r: number) =>
    fx.buffers[r].dispatch(inputs[r].x, {
      topkIdx: inputs[r].idx,
      topkWeights: inputs[r].w,
      numExperts: 2,
      numWorstTokens: 8,
    });
  const t0 = performance.now();
  using start = r0.stream.record();
  const first = await dispatch(0); // enqueued; its work waits for rank 1
  using end = r0.stream.record();
  await t.step("pending: no answer yet", async () => {
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(end.elapsedMs(start), undefined);
    assert.equal(start.elapsedMs(end), undefined);
  });
  await new Promise((resolve) => setTimeout(resolve, delayMs - 20));
  const second = dispatch(1);
  await end.synchronize();
  const wallMs = performance.now() - t0;
  const elapsed = start.elapsedMs(end)!;
  assert.ok(elapsed >= delayMs - 30 && elapsed <= wallMs, `elapsed ${elapsed} ms, wall ${wallMs} ms`);
  assert.equal(end.elapsedMs(start), -elapsed, "reversed: the same time, negative");
  for (const res of [first, await second]) res[Symbol.dispose]();
  await t.step("refusals name the argument", () => {
    using never = r0.createEvent();
    assert.throws(
      () => start.elapsedMs(never),
      (e: unknown) =>
        e instanceof SwitchyardError && e.code === "INVALID_ARGUMENT" && /end: never recorded/.test(e.message),
    );
    using other = r1.stream.record();
    assert.throws(
      () => start.elapsedMs(other),
      (e: unknown) => e instanceof SwitchyardError && e.code === "WRONG_HANDLE",
    );
  });
  for (const i of inputs) for (const x of [i.x, i.idx, i.w]) x[Symbol.dispose]();
});

Deno.test("dispose is idempotent and use after dispose is a DISPOSED error", async () => {
  const g = Group.local({ ranks: 2 });
  const [buf0, buf1] = await g.createBuffers({ hidden: 32, maxTokensPerRank: 4 });
  const rank = g.ranks[0];
  const t = Tensor.empty(rank, { dtype: "bf16", shape: [2, 32] });
  const s = rank.createStream();
  const e = rank.createEvent();
  for (const r of [t, s, e, buf0, buf1]) {
    r[Symbol.dispose]();
    r[Symbol.dispose]();
    assert.equal(r.disposed, true);
  }
  assert.throws(() => t.pointer, (err: unknown) => err instanceof SwitchyardError && err.code === "DISPOSED");
  await assert.rejects(() => t.read(), (err: unknown) => err instanceof SwitchyardError && err.code === "DISPOSED");
  assert.throws(() => buf0.commStream, (err: unknown) => err instanceof SwitchyardError && err.code === "DISPOSED");
  assert.throws(() => e.query(), (err: unknown) => err instanceof SwitchyardError && err.code === "DISPOSED");
  g[Symbol.dispose]();
  g[Symbol.dispose]();
  assert.throws(() => rank.stream, (err: unknown) => err instanceof SwitchyardError && err.code === "DISPOSED");
  assert.throws(
    () => Tensor.empty(rank, { dtype: "f32", shape: [1] }),
    (err: unknown) => err instanceof SwitchyardError && err.code === "DISPOSED",
  );
});

Deno.test("inputs may be disposed while queued work still reads them", async () => {
  const hidden = 32, tokens = 5;
  using fx = await fixture(2, hidden, tokens);
  const xs = [randomBF16(tokens * hidden, 0), randomBF16(tokens * hidden, 1)];
  const results = await fx.group.all(async (rank, r) => {
    // Worst-case mode returns before the work has run; the inputs go out of scope at once.
    using x = await Tensor.from(rank, xs[r], { shape: [tokens, hidden] });
    using idx = await Tensor.from(rank, new BigInt64Array(tokens).fill(0n), { shape: [tokens, 1] });
    using w = await Tensor.from(rank, new Float32Array(tokens).fill(1), { shape: [tokens, 1] });
    return await fx.buffers[r].dispatch(x, { topkIdx: idx, topkWeights: w, numExperts: 2, numWorstTokens: 2 * tokens });
  });
  // Every token went to expert 0 on rank 0: rank 0 holds rank 0's rows, then rank 1's.
  const rows = await results[0].recvX.read();
  assert.deepEqual(rows, new Uint16Array([...xs[0], ...xs[1]]));
  assert.deepEqual(Array.from(await results[1].recvCount.read()), [0]);
  for (const res of results) res[Symbol.dispose]();
});

Deno.test("a tensor that outlives its group is DISPOSED for reads, and safe to release", async () => {
  let kept: Tensor;
  {
    using g = Group.local({ ranks: 1 });
    kept = await Tensor.from(g.ranks[0], new Int32Array([7]), { shape: [1] });
  }
  await assert.rejects(() => kept.read(), (e: unknown) => e instanceof SwitchyardError && e.code === "DISPOSED");
  kept[Symbol.dispose]();
});
