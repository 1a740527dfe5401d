/**
 * Normal-mode layout and dispatch on the host backend against the TypeScript reference: the
 * checks of DeepEP's intranode test (layout equality, counts, per-expert lists, rank-constant
 * rows in prefix-matrix order, top-k remapping, worst-case prefix equality, cached dispatch),
 * plus bit-exact payloads, FP8 scales with any strides, and the expanded layout.
 */

import assert from "node:assert/strict";
import { type DispatchResult, type EpBuffer, Tensor, toBF16 } from "../mod.ts";
import {
  assertSameArray,
  bytesOf,
  fixture,
  generate,
  paddingZeroed,
  type Scenario,
  type ScenarioData,
  upload,
  type Uploaded,
} from "./helpers.ts";
import { type CompactExpectation, referenceDispatch, referenceExpanded, referenceLayout } from "./reference.ts";

function tokensFor(ranks: number, base: number, seed: number, emptyRank = -1): number[] {
  // Odd and uneven counts on purpose.
  return Array.from({ length: ranks }, (_, r) => (r === emptyRank ? 0 : base + ((seed * 7 + r * 13) % 17)));
}

async function checkCompact(res: DispatchResult, exp: CompactExpectation, s: Scenario, d: ScenarioData, r: number) {
  const K = d.shape.topk;
  assert.equal(res.numRecvTokens, exp.rows.length, `rank ${r}: received rows`);
  assert.equal(res.numRows, exp.rows.length);
  assertSameArray(bytesOf(await res.recvX.read()), exp.x, `rank ${r}: payload rows`);
  if (d.scaleCols) {
    assertSameArray(bytesOf(await res.recvXScales!.read()), bytesOf(exp.scales), `rank ${r}: scales`);
  }
  if (K > 0) {
    const idx = Array.from(await res.recvTopkIdx!.read() as BigInt64Array, Number);
    assertSameArray(idx, exp.topkLocal, `rank ${r}: local top-k ids`);
    assertSameArray(await res.recvTopkWeights!.read(), exp.weights, `rank ${r}: top-k weights`);
    // DeepEP: each local expert occurs in recvTopkIdx as often as the per-expert list says.
    const occurrences = new Array<number>(s.experts / s.ranks).fill(0);
    for (const e of idx) {
      assert.ok(e >= -1 && e < s.experts / s.ranks);
      if (e >= 0) occurrences[e]++;
    }
    assert.deepEqual(occurrences, exp.perExpert);
    assert.deepEqual([...res.numRecvTokensPerExpert], exp.perExpert, `rank ${r}: per-expert list`);
  } else {
    assert.equal(res.recvTopkIdx, undefined);
    assert.deepEqual([...res.numRecvTokensPerExpert], []);
  }
  assert.deepEqual(Array.from(await res.recvCount.read()), [exp.rows.length]);
  using prefix = res.handle.rankPrefixMatrix();
  assert.deepEqual(Array.from(await prefix.read()), exp.rankPrefix, `rank ${r}: rank prefix matrix`);
  using srcIdx = res.handle.recvSrcIdx();
  assert.deepEqual(Array.from(await srcIdx.read()), exp.rows.map((row) => row.token));
  using srcRank = res.handle.recvSrcRank();
  assert.deepEqual(Array.from(await srcRank.read()), exp.rows.map((row) => row.src));
}

/** Dispatches `s` on every rank (exact-size mode) and checks everything against the reference. */
async function checkScenario(s: Scenario): Promise<void> {
  const d = generate(s);
  const expected = referenceDispatch(d.inputs, d.shape);
  using fx = await fixture(s.ranks, s.hidden, Math.max(...s.tokens), 20000, {}, s.ranksPerNode);
  await fx.group.all(async (rank, r) => {
    using up = await upload(rank, s, d, r);
    const buf = fx.buffers[r];
    let layoutRouting;
    let layout;
    if (up.topkIdx) {
      layout = await buf.layout(up.topkIdx, { numExperts: s.experts });
      const ref = referenceLayout(d.inputs[r].topk!, d.inputs[r].tokens, s.topk, s.experts, s.ranks);
      assert.deepEqual(Array.from(await layout.numTokensPerRank.read()), ref.perRank, `rank ${r}: tokens per rank`);
      assert.deepEqual(Array.from(await layout.numTokensPerExpert.read()), ref.perExpert, `rank ${r}: per expert`);
      assertSameArray(await layout.isTokenInRank.read(), ref.inRank, `rank ${r}: token in rank`);
      layoutRouting = ref.perRank;
    }
    // DeepEP passes the layout's routing along; without top-k only the matrix routes.
    using res = await buf.dispatch(up.x, {
      xScales: up.scales,
      topkIdx: up.topkIdx,
      topkWeights: up.topkWeights,
      numExperts: up.topkIdx ? s.experts : undefined,
      layout,
      isTokenInRank: up.isTokenInRank,
    });
    layout?.[Symbol.dispose]();
    await checkCompact(res, expected[r], s, d, r);
    return layoutRouting;
  }).then((perRank) => {
    // DeepEP: what a rank receives equals the all-reduced layout count for it.
    if (perRank[0] === undefined) return;
    for (let r = 0; r < s.ranks; r++) {
      const sum = perRank.reduce((a, p) => a + p![r], 0);
      assert.equal(sum, expected[r].rows.length);
    }
  });
}

Deno.test("dispatch (exact size) matches the reference", async (t) => {
  const cases: [string, Partial<Scenario>][] = [
    ["uniform", {}],
    ["zipf-skewed", { zipf: 1.2 }],
    ["-1 masked", { drop: 0.3 }],
  ];
  for (const ranks of [1, 2, 4, 8]) {
    for (const [name, extra] of cases) {
      await t.step(`${ranks} ranks, ${name}`, async () => {
        const seed = ranks * 10 + name.length;
        const experts = ranks * 4;
        await checkScenario({
          ranks,
          tokens: tokensFor(ranks, 37, seed),
          hidden: 256,
          experts,
          topk: Math.min(4, experts),
          seed,
          ...extra,
        });
      });
    }
  }
  await t.step("a rank that receives nothing, a rank that sends nothing", () =>
    checkScenario({
      ranks: 4,
      tokens: tokensFor(4, 20, 3, 1),
      hidden: 128,
      experts: 16,
      topk: 3,
      seed: 5,
      starveLastRank: true,
    }));
  await t.step(
    "routing by isTokenInRank only (no top-k)",
    () =>
      checkScenario({
        ranks: 4,
        tokens: tokensFor(4, 25, 9),
        hidden: 64,
        experts: 8,
        topk: 2,
        seed: 9,
        routeWithoutTopk: true,
      }),
  );
  await t.step("FP8 payload, f32 scales column-major", () =>
    checkScenario({
      ranks: 4,
      tokens: tokensFor(4, 21, 4),
      hidden: 512,
      experts: 32,
      topk: 6,
      seed: 4,
      fp8: true,
      columnMajorScales: true,
    }));
  await t.step(
    "FP8 payload, packed UE8M0 scales row-major",
    () =>
      checkScenario({
        ranks: 2,
        tokens: tokensFor(2, 19, 6),
        hidden: 1024,
        experts: 8,
        topk: 3,
        seed: 6,
        fp8: true,
        ue8m0: true,
      }),
  );
  // Across virtual nodes the dispatch takes two hops (core/internode.h); what arrives is the same.
  for (const ranksPerNode of [4, 2]) {
    for (const [name, extra] of cases) {
      await t.step(
        `8 ranks as ${8 / ranksPerNode} nodes of ${ranksPerNode} (two hops), ${name}`,
        () =>
          checkScenario({
            ranks: 8,
            tokens: tokensFor(8, 31, ranksPerNode),
            hidden: 128,
            experts: 32,
            topk: 5,
            seed: 90 + ranksPerNode + name.length,
            ranksPerNode,
            ...extra,
          }),
      );
    }
  }
  await t.step("2 nodes of 2 (two hops), FP8 payload, packed UE8M0 scales column-major", () =>
    checkScenario({
      ranks: 4,
      tokens: tokensFor(4, 22, 7),
      hidden: 1024,
      experts: 16,
      topk: 6,
      seed: 13,
      fp8: true,
      ue8m0: true,
      columnMajorScales: true,
      drop: 0.2,
      ranksPerNode: 2,
    }));
  await t.step(
    "8 ranks, DeepSeek-like hidden 7168, 32 experts, top-8",
    () =>
      checkScenario({ ranks: 8, tokens: tokensFor(8, 9, 1), hidden: 7168, experts: 32, topk: 8, seed: 11, drop: 0.1 }),
  );
});

Deno.test("DeepEP check_data: rank-constant rows arrive in rank-prefix order", async () => {
  const R = 4, H = 64, E = 16, K = 4;
  const tokens = tokensFor(R, 30, 2);
  const s: Scenario = { ranks: R, tokens, hidden: H, experts: E, topk: K, seed: 2 };
  const d = generate(s);
  using fx = await fixture(R, H, Math.max(...tokens));
  await fx.group.all(async (rank, r) => {
    const T = tokens[r];
    using x = await Tensor.from(rank, toBF16(new Float32Array(T * H).fill(r)), { shape: [T, H] });
    using up = await upload(rank, s, d, r);
    using res = await fx.buffers[r].dispatch(x, { topkIdx: up.topkIdx, topkWeights: up.topkWeights, numExperts: E });
    const rows = await res.recvX.readFloat32();
    using prefixT = res.handle.rankPrefixMatrix();
    const prefix = await prefixT.read();
    let begin = 0;
    for (let src = 0; src < R; src++) {
      const end = prefix[src * R + r];
      for (let i = begin * H; i < end * H; i++) assert.equal(rows[i], src, `rank ${r}: row from rank ${src}`);
      begin = end;
    }
    assert.equal(begin, res.numRecvTokens);
  });
});

/**
 * Exact-size dispatch on every rank, then `enqueue` on each rank in turn (worst-case and cached
 * dispatch never wait on the host, so ranks may be called one by one), then `verify` per rank.
 */
async function exactThen<T extends Disposable>(
  s: Scenario,
  enqueue: (buf: EpBuffer, exact: DispatchResult, up: Uploaded, r: number) => Promise<T>,
  verify: (result: T, r: number) => Promise<void>,
): Promise<void> {
  const d = generate(s);
  using fx = await fixture(s.ranks, s.hidden, Math.max(...s.tokens), 20000, {}, s.ranksPerNode);
  const ups = await fx.group.all((rank, r) => upload(rank, s, d, r));
  const exact = await fx.group.all((_, r) =>
    fx.buffers[r].dispatch(ups[r].x, {
      xScales: ups[r].scales,
      topkIdx: ups[r].topkIdx,
      topkWeights: ups[r].topkWeights,
      numExperts: s.experts,
    })
  );
  const results: T[] = [];
  try {
    for (let r = 0; r < s.ranks; r++) results.push(await enqueue(fx.buffers[r], exact[r], ups[r], r));
    for (let r = 0; r < s.ranks; r++) await verify(results[r], r);
  } finally {
    for (const x of [...results, ...exact, ...ups]) x[Symbol.dispose]();
  }
}

Deno.test("worst-case dispatch: same prefix, -1 tail, no host counts", async (t) => {
  for (const ranksPerNode of [4, 2]) {
    await t.step(ranksPerNode === 4 ? "one node" : "2 nodes of 2 (two hops)", async () => {
      const s: Scenario = {
        ranks: 4,
        tokens: tokensFor(4, 23, 8),
        hidden: 128,
        experts: 16,
        topk: 4,
        seed: 8,
        drop: 0.2,
        fp8: true,
        ranksPerNode,
      };
      const d = generate(s);
      const expected = referenceDispatch(d.inputs, d.shape);
      await exactThen(
        s,
        (buf, _exact, up, r) =>
          buf.dispatch(up.x, {
            xScales: up.scales,
            topkIdx: up.topkIdx,
            topkWeights: up.topkWeights,
            numExperts: s.experts,
            numWorstTokens: s.tokens[r] * s.ranks,
          }),
        async (res, r) => {
          const n = expected[r].rows.length;
          const worst = s.tokens[r] * s.ranks;
          assert.equal(res.numRecvTokens, null);
          assert.equal(res.numRows, worst);
          assert.deepEqual([...res.numRecvTokensPerExpert], []);
          assert.deepEqual(Array.from(await res.recvCount.read()), [n]);
          const x = await res.recvX.read();
          assertSameArray(x.subarray(0, n * s.hidden), expected[r].x);
          const scales = await res.recvXScales!.read();
          assertSameArray(bytesOf(scales).subarray(0, n * d.scaleCols * 4), bytesOf(expected[r].scales));
          const idx = Array.from(await res.recvTopkIdx!.read() as BigInt64Array, Number);
          assertSameArray(idx.slice(0, n * s.topk), expected[r].topkLocal);
          assert.ok(idx.slice(n * s.topk).every((v) => v === -1), "tail rows have no expert");
          assert.equal(res.handle.info().numRecvTokens, n, "the handle learns the count once the work ran");
        },
      );
    });
  }
});

Deno.test("cached dispatch reuses the routing and reproduces the data", async (t) => {
  for (const ranksPerNode of [4, 2]) {
    await t.step(ranksPerNode === 4 ? "one node" : "2 nodes of 2 (two hops)", async () => {
      const s: Scenario = {
        ranks: 4,
        tokens: tokensFor(4, 27, 12),
        hidden: 96,
        experts: 8,
        topk: 2,
        seed: 12,
        drop: 0.1,
        ranksPerNode,
      };
      const d = generate(s);
      const expected = referenceDispatch(d.inputs, d.shape);
      await exactThen(
        s,
        (buf, exact, up) => buf.dispatch(up.x, { handle: exact.handle }),
        async (again, r) => {
          assert.equal(again.numRecvTokens, expected[r].rows.length);
          assertSameArray(bytesOf(await again.recvX.read()), expected[r].x);
          assert.equal(again.recvTopkIdx, undefined, "a cached dispatch returns no top-k");
          assert.deepEqual([...again.numRecvTokensPerExpert], expected[r].perExpert);
        },
      );
    });
  }
});

Deno.test("expanded layout: one row per (token, local expert), padded per expert", async (t) => {
  const variants = [[1, false, false, 4], [4, true, false, 4], [8, true, true, 4], [4, true, true, 2]] as const;
  for (const [alignment, zeroPadding, fp8, ranksPerNode] of variants) {
    const nodes = ranksPerNode < 4 ? `, 2 nodes of ${ranksPerNode} (two hops)` : "";
    await t.step(
      `alignment ${alignment}${zeroPadding ? ", zero padding" : ""}${fp8 ? ", fp8" : ""}${nodes}`,
      async () => {
        const s: Scenario = {
          ranks: 4,
          tokens: tokensFor(4, 19, alignment),
          hidden: 128,
          experts: 16,
          topk: 4,
          seed: 20 + alignment,
          drop: 0.2,
          fp8,
          columnMajorScales: fp8,
          ranksPerNode,
        };
        const d = generate(s);
        const compact = referenceDispatch(d.inputs, d.shape);
        using fx = await fixture(s.ranks, s.hidden, Math.max(...s.tokens), 20000, {}, s.ranksPerNode);
        await fx.group.all(async (rank, r) => {
          using up = await upload(rank, s, d, r);
          const exp = referenceExpanded(compact[r], d.shape, alignment);
          using res = await fx.buffers[r].dispatch(up.x, {
            xScales: up.scales,
            topkIdx: up.topkIdx,
            topkWeights: up.topkWeights,
            numExperts: s.experts,
            expand: true,
            expertAlignment: alignment,
            zeroPadding,
          });
          assert.equal(res.numRows, exp.numRows);
          assert.equal(res.numRecvTokens, compact[r].rows.length);
          assert.deepEqual([...res.numRecvTokensPerExpert], exp.perExpertAligned);
          assert.equal(res.recvTopkIdx, undefined);
          // Padding rows are zero only when asked for.
          const x = bytesOf(await res.recvX.read());
          assertSameArray(zeroPadding ? x : paddingZeroed(x, exp.rowOwner, d.shape.rowBytes), exp.x, `rank ${r}: rows`);
          if (fp8) assertSameArray(bytesOf(await res.recvXScales!.read()), bytesOf(exp.scales));
          assertSameArray(await res.recvTopkWeights!.read(), exp.weights);
          using rows = res.handle.expandedRow();
          assert.deepEqual(Array.from(await rows.read()), exp.expandedRow);
          assert.deepEqual(Array.from(await res.recvCount.read()), [exp.numRows]);
          // A cached expanded dispatch places the rows the same way.
          using again = await fx.buffers[r].dispatch(up.x, { xScales: up.scales, handle: res.handle, expand: true });
          const cachedRows = bytesOf(await again.recvX.read()).subarray(0, exp.numRows * d.shape.rowBytes);
          assertSameArray(paddingZeroed(cachedRows, exp.rowOwner, d.shape.rowBytes), exp.x);
        });
      },
    );
  }
});
