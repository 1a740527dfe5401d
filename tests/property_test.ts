/**
 * Random scenarios: rank counts, token counts (including 0), hidden sizes, top-k, skew, masked
 * entries, FP8 or BF16, compact or expanded. Dispatch and combine must match the reference
 * bit for bit in every one.
 */

import assert from "node:assert/strict";
import { Rng, Tensor } from "../mod.ts";
import {
  assertSameArray,
  bytesOf,
  fixture,
  generate,
  orderSensitiveBF16,
  paddingZeroed,
  type Scenario,
  upload,
} from "./helpers.ts";
import { reduceExpanded, referenceCombine, referenceDispatch, referenceExpanded } from "./reference.ts";

function randomScenario(seed: number): Scenario & { expand: boolean; alignment: number } {
  const rng = new Rng(seed);
  const ranks = 1 + rng.int(8);
  const perRank = 1 + rng.int(5);
  const experts = ranks * perRank;
  return {
    ranks,
    tokens: Array.from({ length: ranks }, () => (rng.next() < 0.15 ? 0 : rng.int(40))),
    hidden: 16 * (1 + rng.int(12)),
    experts,
    topk: 1 + rng.int(Math.min(8, experts)),
    seed,
    zipf: rng.next() < 0.5 ? 0 : 2 * rng.next(),
    drop: rng.next() < 0.5 ? 0 : 0.5 * rng.next(),
    fp8: rng.next() < 0.3,
    columnMajorScales: rng.next() < 0.5,
    expand: rng.next() < 0.3,
    alignment: 1 + rng.int(8),
  };
}

Deno.test("random scenarios: dispatch and combine match the reference", async (t) => {
  for (let seed = 1; seed <= 40; seed++) {
    const s = randomScenario(seed);
    const label = `seed ${seed}: ${s.ranks} ranks, tokens [${s.tokens}], hidden ${s.hidden}, ` +
      `${s.experts} experts, top-${s.topk}${s.fp8 ? ", fp8" : ""}${s.expand ? `, expanded/${s.alignment}` : ""}`;
    await t.step(label, async () => {
      const d = generate(s);
      const compact = referenceDispatch(d.inputs, d.shape);
      const expanded = compact.map((c) => referenceExpanded(c, d.shape, s.alignment));
      const y = s.expand
        ? expanded.map((e, r) => orderSensitiveBF16(e.numRows * s.hidden, seed * 100 + r))
        : compact.map((c, r) => orderSensitiveBF16(c.rows.length * s.hidden, seed * 100 + r));
      const returned = s.expand
        ? compact.map((c, r) => reduceExpanded(y[r], expanded[r], c.rows.length, s.topk, s.hidden))
        : y;
      const want = referenceCombine(compact, returned, s.hidden, s.tokens);
      using fx = await fixture(s.ranks, s.hidden, Math.max(1, ...s.tokens));
      await fx.group.all(async (rank, r) => {
        using up = await upload(rank, s, d, r);
        using sent = await fx.buffers[r].dispatch(up.x, {
          xScales: up.scales,
          topkIdx: up.topkIdx,
          topkWeights: up.topkWeights,
          numExperts: s.experts,
          expand: s.expand,
          expertAlignment: s.alignment,
        });
        const x = bytesOf(await sent.recvX.read());
        if (s.expand) {
          assert.equal(sent.numRows, expanded[r].numRows);
          assertSameArray(paddingZeroed(x, expanded[r].rowOwner, d.shape.rowBytes), expanded[r].x);
        } else {
          assertSameArray(x, compact[r].x);
        }
        using yt = await Tensor.from(rank, y[r], { shape: [sent.numRows, s.hidden] });
        using back = await fx.buffers[r].combine(yt, sent.handle);
        assertSameArray(await back.combinedX.read(), want[r]);
      });
    });
  }
});
