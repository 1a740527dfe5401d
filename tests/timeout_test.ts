/**
 * Failure behaviour: a rank that never shows up makes every other rank fail within a bounded
 * time with a SwitchyardTimeoutError naming it; nothing hangs; the library keeps working.
 */

import assert from "node:assert/strict";
import { type EpBuffer, type Rank, SwitchyardTimeoutError, Tensor } from "../mod.ts";
import { fixture, randomBF16 } from "./helpers.ts";

const H = 64, T = 6, K = 2, E = 8;

async function dispatchOn(rank: Rank, buf: EpBuffer, seed: number, worst = false) {
  using x = await Tensor.from(rank, randomBF16(T * H, seed), { shape: [T, H] });
  using idx = await Tensor.from(rank, new BigInt64Array(T * K).map((_, i) => BigInt((i + seed) % E)), {
    shape: [T, K],
  });
  using w = await Tensor.from(rank, new Float32Array(T * K).fill(1), { shape: [T, K] });
  return await buf.dispatch(x, { topkIdx: idx, topkWeights: w, numExperts: E, numWorstTokens: worst ? T * 4 : 0 });
}

Deno.test("a missing rank: the others time out naming it, then the buffers refuse further use", async () => {
  const timeoutMs = 400;
  using fx = await fixture(4, H, T, timeoutMs);
  const started = performance.now();
  const settled = await Promise.allSettled([0, 1, 2].map((r) => dispatchOn(fx.group.ranks[r], fx.buffers[r], r)));
  const elapsed = performance.now() - started;
  for (const [r, s] of settled.entries()) {
    assert.equal(s.status, "rejected", `rank ${r} must not succeed without rank 3`);
    const e = (s as PromiseRejectedResult).reason;
    assert.ok(e instanceof SwitchyardTimeoutError, String(e));
    assert.equal(e.peerRank, 3, e.message);
    assert.match(e.message, /rank 3/);
    console.log(`  rank ${r}: ${e.code} after ${elapsed.toFixed(0)} ms: ${e.message}`);
  }
  // Bounded: the protocol deadline plus the host's margin, not forever.
  assert.ok(elapsed < 3 * timeoutMs + 1500, `took ${elapsed.toFixed(0)} ms`);

  // The latecomer learns at once that the operation was abandoned.
  const lateStart = performance.now();
  const late = await dispatchOn(fx.group.ranks[3], fx.buffers[3], 3).catch((e) => e);
  assert.ok(late instanceof SwitchyardTimeoutError && late.code === "PEER_FAILED", String(late));
  assert.ok(performance.now() - lateStart < timeoutMs, "fails fast");

  // The library (and the host "device") survives: new buffers work.
  const fresh = await fx.group.createBuffers({ hidden: H, maxTokensPerRank: T });
  const ok = await fx.group.all((rank, r) => dispatchOn(rank, fresh[r], r));
  assert.ok(ok.every((d) => d.numRecvTokens !== null && d.numRecvTokens >= 0));
  for (const d of ok) d[Symbol.dispose]();
  for (const b of fresh) b[Symbol.dispose]();
});

Deno.test("worst-case mode: the timeout surfaces on the stream, which then recovers", async () => {
  const timeoutMs = 300;
  using fx = await fixture(2, H, T, timeoutMs);
  const rank = fx.group.ranks[0];
  using res = await dispatchOn(rank, fx.buffers[0], 0, true); // returns at once: no host wait
  const started = performance.now();
  const e = await res.recvX.read().catch((err) => err);
  assert.ok(e instanceof SwitchyardTimeoutError, String(e));
  assert.equal(e.peerRank, 1);
  assert.equal(e.role, "barrier");
  assert.ok(performance.now() - started < 4 * timeoutMs + 1500);
  // The failure was reported once; the stream runs new work.
  using t = await Tensor.from(rank, new Float32Array([1, 2, 3]), { shape: [3] });
  assert.deepEqual(Array.from(await t.read()), [1, 2, 3]);
});

Deno.test("a rank without a matching buffer is named", async () => {
  const timeoutMs = 300;
  using fx = await fixture(2, H, T, timeoutMs);
  // A second set: only rank 0 creates its buffer.
  using lonely = fx.group.ranks[0].createBuffer({ hidden: H, maxTokensPerRank: T });
  const e = await dispatchOn(fx.group.ranks[0], lonely, 0).catch((err) => err);
  assert.ok(e instanceof SwitchyardTimeoutError, String(e));
  assert.equal(e.role, "buffer-peers");
  assert.equal(e.peerRank, 1);
  assert.match(e.message, /ranks without a matching buffer: 1/);
});

Deno.test("awaiting ranks one by one in exact-size mode times out naming the rank not yet called", async () => {
  using fx = await fixture(2, H, T, 300);
  const e = await dispatchOn(fx.group.ranks[0], fx.buffers[0], 0).catch((err) => err);
  assert.ok(e instanceof SwitchyardTimeoutError, String(e));
  assert.equal(e.peerRank, 1);
});

Deno.test("a rank that abandons the buffer set (a peer failed before the first operation) ends the others' waits at once, naming that peer", async () => {
  // What Group.createBuffers does when the rendezvous loses a rank while the buffers are being
  // mapped: the peers already waiting in a first operation hear of it through their abort
  // records instead of timing out on this rank.
  const timeoutMs = 5000;
  using fx = await fixture(4, H, T, timeoutMs);
  const started = performance.now();
  // Rank 0 "failed" (it never calls); ranks 1 and 2 wait in a dispatch; rank 3 abandons.
  const waiting = [1, 2].map((r) => dispatchOn(fx.group.ranks[r], fx.buffers[r], r).catch((e) => e));
  await new Promise((r) => setTimeout(r, 50));
  fx.buffers[3].abandon(0);
  for (const e of await Promise.all(waiting)) {
    assert.ok(e instanceof SwitchyardTimeoutError, String(e));
    assert.equal(e.code, "PEER_FAILED", e.message);
    assert.equal(e.peerRank, 0, e.message);
    assert.match(e.message, /abandoned by rank 3 after rank 0 failed or could not be reached/);
  }
  const elapsed = performance.now() - started;
  assert.ok(elapsed < timeoutMs / 2, `took ${elapsed.toFixed(0)} ms: the abort, not the deadline, ended the waits`);
});
