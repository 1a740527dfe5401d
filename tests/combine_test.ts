/**
 * Normal-mode combine on the host backend: bit-exact against the reference (float32 sum in
 * ascending rank order after the biases, one BF16 rounding), DeepEP's tolerance checks on the
 * identity round trip, the top-k weight sum, the expanded layout, `out`, worst-case handles and
 * the event options.
 */

import assert from "node:assert/strict";
import { Tensor } from "../mod.ts";
import {
  assertSameArray,
  fixture,
  generate,
  orderSensitiveBF16,
  orderSensitiveFloats,
  type Scenario,
  upload,
} from "./helpers.ts";
import {
  bf16Round,
  bf16Value,
  calcDiff,
  reduceExpanded,
  referenceCombine,
  referenceCombineWeights,
  referenceDispatch,
  referenceExpanded,
  referenceHierarchicalCombine,
} from "./reference.ts";

function tokensFor(ranks: number, base: number, seed: number): number[] {
  return Array.from({ length: ranks }, (_, r) => base + ((seed * 5 + r * 11) % 13));
}

/** Across nodes of `ranksPerNode`, reducing as `internodeReduction` says (the reference follows). */
interface Across {
  readonly ranksPerNode: number;
  readonly internodeReduction?: "chain" | "hierarchical";
}

async function checkCombine(s: Scenario, biases: number, across?: Across): Promise<void> {
  const d = generate(s);
  const expected = referenceDispatch(d.inputs, d.shape);
  const H = s.hidden, K = s.topk;
  // What each rank sends back: rows, weights and biases whose sums depend on the order of
  // addition, so every row matters and so does the reduction order.
  const returned = expected.map((e, r) => orderSensitiveBF16(e.rows.length * H, 100 + r + s.seed));
  const returnedWeights = expected.map((e, r) => orderSensitiveFloats(e.rows.length * K, 300 + r + s.seed));
  const bias = Array.from(
    { length: biases },
    (_, b) => s.tokens.map((T, r) => orderSensitiveBF16(T * H, 500 + 10 * b + r)),
  );
  const hierarchical = across?.internodeReduction === "hierarchical";
  const { rows: want, weights: wantWeights } = hierarchical
    ? referenceHierarchicalCombine(expected, returned, returnedWeights, H, K, s.tokens, bias, across.ranksPerNode)
    : {
      rows: referenceCombine(expected, returned, H, s.tokens, bias),
      weights: referenceCombineWeights(expected, returnedWeights, K, s.tokens),
    };

  using fx = await fixture(s.ranks, H, Math.max(...s.tokens), 20000, {}, across?.ranksPerNode);
  await fx.group.all(async (rank, r) => {
    using up = await upload(rank, s, d, r);
    using sent = await fx.buffers[r].dispatch(up.x, {
      topkIdx: up.topkIdx,
      topkWeights: up.topkWeights,
      numExperts: s.experts,
    });
    const n = expected[r].rows.length;
    using y = await Tensor.from(rank, returned[r], { shape: [n, H] });
    using w = await Tensor.from(rank, returnedWeights[r], { shape: [n, K] });
    const biasTensors = await Promise.all(bias.map((b) => Tensor.from(rank, b[r], { shape: [s.tokens[r], H] })));
    try {
      using back = await fx.buffers[r].combine(y, sent.handle, {
        topkWeights: w,
        bias: biasTensors as [Tensor] | [Tensor, Tensor],
        internodeReduction: across?.internodeReduction,
      });
      assert.deepEqual(back.combinedX.shape, [s.tokens[r], H]);
      assertSameArray(await back.combinedX.read(), want[r], `rank ${r}: combined rows`);
      assertSameArray(await back.combinedTopkWeights!.read(), wantWeights[r], `rank ${r}: combined weights`);
    } finally {
      for (const t of biasTensors) t[Symbol.dispose]();
    }
  });
}

Deno.test("combine is bit-exact against the reference", async (t) => {
  for (const ranks of [1, 2, 4, 8]) {
    for (const [name, extra] of [["uniform", {}], ["zipf", { zipf: 1.5 }], ["-1 masked", { drop: 0.3 }]] as const) {
      const biases = (ranks + name.length) % 3;
      await t.step(`${ranks} ranks, ${name}, ${biases} biases`, () =>
        checkCombine({
          ranks,
          tokens: tokensFor(ranks, 29, ranks),
          hidden: 192,
          experts: 4 * ranks,
          topk: Math.min(3, 4 * ranks),
          seed: ranks + name.length,
          ...extra,
        }, biases));
    }
  }
  await t.step(
    "hidden 7168, 8 ranks, two biases",
    () => checkCombine({ ranks: 8, tokens: tokensFor(8, 5, 3), hidden: 7168, experts: 64, topk: 8, seed: 3 }, 2),
  );
});

Deno.test("across nodes, 8 ranks as 2x4, 4x2 and 8x1: the chain and the hierarchical combine against their references", async (t) => {
  // The chain must fold as the one-node reference does (it knows no nodes); the hierarchical
  // reference rounds each node's sum first, so a one-pass reduction would differ from it.
  for (const internodeReduction of ["chain", "hierarchical"] as const) {
    for (const ranksPerNode of [4, 2, 1]) {
      for (const biases of internodeReduction === "chain" ? [0, 1, 2] : [0, 2]) {
        const seed = (internodeReduction === "chain" ? 40 : 50) + ranksPerNode + biases;
        await t.step(`${internodeReduction}, 8 ranks in nodes of ${ranksPerNode}, ${biases} biases`, () =>
          checkCombine(
            {
              ranks: 8,
              tokens: tokensFor(8, 23, ranksPerNode + biases),
              hidden: 128,
              experts: 32,
              topk: 6,
              seed,
              drop: 0.15,
            },
            biases,
            { ranksPerNode, internodeReduction },
          ));
      }
    }
    // Top-2 of 8 experts: about a third of the tokens stay on their node (the grid's part of
    // the two-hop combine, rounded per node in the hierarchical reduction), some go nowhere.
    await t.step(`${internodeReduction}, 8 ranks in nodes of 4, top-2 of 8, 2 biases`, () =>
      checkCombine(
        { ranks: 8, tokens: tokensFor(8, 23, 7), hidden: 128, experts: 8, topk: 2, seed: 61, drop: 0.2 },
        2,
        { ranksPerNode: 4, internodeReduction },
      ));
  }
});

Deno.test("DeepEP round trip: combine(dispatch(x)) / receiving ranks == x, weights restored", async () => {
  const s: Scenario = { ranks: 8, tokens: tokensFor(8, 40, 1), hidden: 512, experts: 64, topk: 8, seed: 77 };
  const d = generate(s);
  using fx = await fixture(s.ranks, s.hidden, Math.max(...s.tokens));
  await fx.group.all(async (rank, r) => {
    using up = await upload(rank, s, d, r);
    using sent = await fx.buffers[r].dispatch(up.x, {
      topkIdx: up.topkIdx,
      topkWeights: up.topkWeights,
      numExperts: s.experts,
    });
    using back = await fx.buffers[r].combine(sent.recvX, sent.handle, { topkWeights: sent.recvTopkWeights });
    const combined = await back.combinedX.readFloat32();
    using inRankT = sent.handle.isTokenInRank();
    const inRank = await inRankT.read();
    const x = await up.x.readFloat32();
    const scaled = new Float32Array(combined.length);
    for (let t = 0; t < s.tokens[r]; t++) {
      let count = 0;
      for (let q = 0; q < s.ranks; q++) count += inRank[t * s.ranks + q];
      for (let c = 0; c < s.hidden; c++) scaled[t * s.hidden + c] = combined[t * s.hidden + c] / count;
    }
    assert.ok(calcDiff(scaled, x) < 5e-6, `rank ${r}: calc_diff ${calcDiff(scaled, x)}`);
    const weights = await back.combinedTopkWeights!.read();
    const original = d.inputs[r].weights!;
    for (let i = 0; i < weights.length; i++) assert.ok(Math.abs(weights[i] - original[i]) <= 1e-9);
  });
});

Deno.test("expanded combine reduces each token's expert rows first", async () => {
  const s: Scenario = { ranks: 4, tokens: tokensFor(4, 21, 6), hidden: 160, experts: 16, topk: 4, seed: 6, drop: 0.2 };
  const alignment = 4;
  const d = generate(s);
  const compact = referenceDispatch(d.inputs, d.shape);
  const expanded = compact.map((c) => referenceExpanded(c, d.shape, alignment));
  const y = expanded.map((e, r) => orderSensitiveBF16(e.numRows * s.hidden, 900 + r));
  const reduced = compact.map((c, r) => reduceExpanded(y[r], expanded[r], c.rows.length, s.topk, s.hidden));
  const want = referenceCombine(compact, reduced, s.hidden, s.tokens);
  using fx = await fixture(s.ranks, s.hidden, Math.max(...s.tokens));
  await fx.group.all(async (rank, r) => {
    using up = await upload(rank, s, d, r);
    using sent = await fx.buffers[r].dispatch(up.x, {
      topkIdx: up.topkIdx,
      topkWeights: up.topkWeights,
      numExperts: s.experts,
      expand: true,
      expertAlignment: alignment,
    });
    using yt = await Tensor.from(rank, y[r], { shape: [expanded[r].numRows, s.hidden] });
    using out = Tensor.empty(rank, { dtype: "bf16", shape: [s.tokens[r], s.hidden] });
    using back = await fx.buffers[r].combine(yt, sent.handle, { out });
    assert.equal(back.combinedTopkWeights, undefined);
    assertSameArray(await out.read(), want[r], `rank ${r}: written into out`);
    assertSameArray(await back.combinedX.read(), want[r]);
  });
});

Deno.test("combine after worst-case dispatch uses only the received rows", async () => {
  const s: Scenario = { ranks: 4, tokens: tokensFor(4, 17, 2), hidden: 64, experts: 8, topk: 2, seed: 2 };
  const d = generate(s);
  const expected = referenceDispatch(d.inputs, d.shape);
  const want = referenceCombine(expected, expected.map((e) => new Uint16Array(e.x.buffer)), s.hidden, s.tokens);
  using fx = await fixture(s.ranks, s.hidden, Math.max(...s.tokens));
  await fx.group.all(async (rank, r) => {
    using up = await upload(rank, s, d, r);
    const worst = s.tokens[r] * s.ranks;
    using sent = await fx.buffers[r].dispatch(up.x, {
      topkIdx: up.topkIdx,
      topkWeights: up.topkWeights,
      numExperts: s.experts,
      numWorstTokens: worst,
    });
    using back = await fx.buffers[r].combine(sent.recvX, sent.handle);
    assertSameArray(await back.combinedX.read(), want[r]);
  });
});

Deno.test("previousEvent and asyncFinish chain dispatch and combine without the compute stream", async () => {
  const s: Scenario = { ranks: 2, tokens: [33, 20], hidden: 64, experts: 4, topk: 2, seed: 4 };
  const d = generate(s);
  const expected = referenceDispatch(d.inputs, d.shape);
  const want = referenceCombine(expected, expected.map((e) => new Uint16Array(e.x.buffer)), s.hidden, s.tokens);
  using fx = await fixture(s.ranks, s.hidden, 40);
  await fx.group.all(async (rank, r) => {
    using up = await upload(rank, s, d, r);
    using start = rank.stream.record();
    using sent = await fx.buffers[r].dispatch(up.x, {
      topkIdx: up.topkIdx,
      topkWeights: up.topkWeights,
      numExperts: s.experts,
      previousEvent: start,
      asyncFinish: true,
      allocateOnCommStream: true,
    });
    assert.ok(sent.event, "asyncFinish returns an event");
    using back = await fx.buffers[r].combine(sent.recvX, sent.handle, { previousEvent: sent.event, asyncFinish: true });
    await back.event!.synchronize();
    assert.equal(back.event!.query(), true);
    back.event!.wait(rank.stream);
    const got = await back.combinedX.read();
    assertSameArray(got, want[r]);
    // Spot-check the reference itself: a token sent to one rank comes back unchanged.
    const inRank = expected.map((e) => e.rows.filter((row) => row.src === r && row.token === 0).length);
    if (inRank.reduce((a, b) => a + b, 0) === 1) {
      assert.equal(bf16Round(bf16Value(got[0])), got[0]);
    }
  });
});
