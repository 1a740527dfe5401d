/**
 * Low-latency mode (on the host backend, or with SWITCHYARD_TEST_BACKEND=cuda on the CUDA
 * backend), after DeepEP's low-latency test: rank-valued rows with
 * token ids in the last 128 columns, random -1 entries, per-expert counts and layout ranges,
 * source indices, FP8 (plain, power-of-two, UE8M0) against a reference quantiser, the weighted
 * combine bit for bit (and x * sum(w) within DeepEP's tolerances), hooks, zero copy, LogFMT,
 * double buffering, statistics, masking, and bad inputs.
 */

import assert from "node:assert/strict";
import {
  Group,
  type LowLatencyDispatchResult,
  type LowLatencyHandle,
  randomRouting,
  type Rank,
  Rng,
  SwitchyardError,
  SwitchyardTimeoutError,
  Tensor,
  toBF16,
} from "../mod.ts";
import { LLDispatchArgs, LLDispatchResult } from "../ffi/structs.ts";
import { Status } from "../ffi/symbols.ts";
import { native } from "../src/native.ts";
import { bytesOf, type Fixture, fixture, orderSensitiveBF16, randomBF16 } from "./helpers.ts";
import { llCombine, llLayout, logfmtRoundTrip, quantizeBlock } from "./ll_reference.ts";
import { bf16Round, bf16Value, calcDiff, fp8Value } from "./reference.ts";

interface Case {
  ranks: number;
  tokens: number[];
  maxTokens: number;
  hidden: number;
  experts: number;
  topk: number;
  seed: number;
  fp8?: boolean;
  roundScale?: boolean;
  ue8m0?: boolean;
  hook?: boolean;
  zeroCopy?: boolean;
  logfmt?: boolean;
  /** Ranks that do not take part; the others mask them. */
  masked?: number[];
  /** Virtual nodes of this many ranks (the low-latency mode is the same across them). */
  ranksPerNode?: number;
}

interface Inputs {
  x: Uint16Array;
  topk: number[];
  topkIdx: BigInt64Array;
  weights: Float32Array;
}

/** DeepEP's data: (rank - 128) everywhere but the last 128 columns, which hold the token id. */
function makeInputs(c: Case): Inputs[] {
  return c.tokens.map((T, r) => {
    const routing = randomRouting({ tokens: T, experts: c.experts, topk: c.topk, seed: c.seed * 100 + r });
    const rng = new Rng(c.seed * 7 + r);
    for (let i = 0; i < Math.min(10, T * c.topk); i++) routing.topkIdx[rng.int(T * c.topk)] = -1n; // random -1 slots
    const f = new Float32Array(T * c.hidden);
    for (let t = 0; t < T; t++) {
      for (let h = 0; h < c.hidden; h++) {
        f[t * c.hidden + h] = h >= c.hidden - 128 ? t : (r - 128) + (rng.next() - 0.5) * (c.fp8 ? 8 : 0);
      }
    }
    return {
      x: toBF16(f),
      topk: Array.from(routing.topkIdx, Number),
      topkIdx: routing.topkIdx,
      weights: routing.topkWeights,
    };
  });
}

function llFixture(c: Case, timeoutMs = 5000, enableMasking = false): Promise<Fixture> {
  return fixture(c.ranks, c.hidden, c.maxTokens, timeoutMs, {
    lowLatency: { numExperts: c.experts },
    enableMasking: enableMasking || !!c.masked?.length,
  }, c.ranksPerNode);
}

/** The expected received row bytes and scale words of (source, token) under the case's format. */
function expectedRow(c: Case, x: Uint16Array, token: number): { bytes: Uint8Array; scales: number[] } {
  const row = x.subarray(token * c.hidden, (token + 1) * c.hidden);
  if (!c.fp8) return { bytes: new Uint8Array(row.slice().buffer), scales: [] };
  const codes = new Uint8Array(c.hidden);
  const blocks: number[] = [];
  for (let b = 0; b < c.hidden / 128; b++) {
    const q = quantizeBlock(row.subarray(b * 128, (b + 1) * 128), !!c.roundScale);
    codes.set(q.codes, b * 128);
    blocks.push(q.scaleInv);
  }
  if (!c.ue8m0) return { bytes: codes, scales: blocks.map((s) => new Uint32Array(new Float32Array([s]).buffer)[0]) };
  const words = new Array<number>(Math.ceil(blocks.length / 4)).fill(0);
  blocks.forEach((s, b) => (words[b >> 2] |= (Math.log2(s) + 127) << (8 * (b % 4))));
  return { bytes: codes, scales: words.map((w) => w >>> 0) };
}

async function checkDispatch(c: Case, res: LowLatencyDispatchResult, inputs: Inputs[], r: number) {
  const layout = llLayout(inputs.map((i) => i.topk), c.tokens, c.topk, c.experts, new Set(c.masked))[r];
  const EL = c.experts / c.ranks, N = c.ranks * c.maxTokens, H = c.hidden;
  const counts = Array.from(await res.recvCount.read());
  assert.deepEqual(counts, layout.map((l) => l.rows.length), `rank ${r}: received per local expert`);
  using rangeT = res.handle.layoutRange();
  const ranges = await rangeT.read();
  using srcT = res.handle.srcInfo();
  const src = await srcT.read();
  const x = bytesOf(await res.recvX.read());
  const scales = res.recvXScales ? new Uint32Array((await res.recvXScales.read()).buffer) : undefined;
  const words = c.fp8 ? (c.ue8m0 ? Math.ceil(H / 512) : H / 128) : 0;
  if (res.recvXScales) {
    // DeepEP's layout: [E_local, N, S] with the token dimension contiguous (column-major scales).
    assert.deepEqual(res.recvXScales.shape, [EL, N, words]);
    assert.deepEqual(res.recvXScales.strides, [N * words, 1, N]);
  }
  const rowBytes = c.fp8 ? H : 2 * H;
  for (let l = 0; l < EL; l++) {
    const e = layout[l];
    for (let s = 0; s < c.ranks; s++) {
      const [begin, count] = e.ranges[s];
      assert.equal(
        ranges[l * c.ranks + s],
        (BigInt(begin) << 32n) | BigInt(count),
        `rank ${r}, expert ${l}, source ${s}`,
      );
    }
    e.rows.forEach(({ src: s, token }, i) => {
      const row = l * N + i;
      assert.equal(src[row], token, `rank ${r}, expert ${l}, row ${i}: source token`);
      const want = expectedRow(c, inputs[s].x, token);
      assert.deepEqual(
        x.subarray(row * rowBytes, (row + 1) * rowBytes),
        want.bytes,
        `rank ${r}, expert ${l}, row ${i}`,
      );
      // The returned scales are dense [E_local, N, S] after the strided read: (l, i, j).
      for (let j = 0; j < words; j++) assert.equal(scales![(l * N + i) * words + j], want.scales[j]);
      if (!c.fp8) {
        // DeepEP: the last 128 columns carry the token id.
        const last = bf16Value(new Uint16Array(x.buffer, x.byteOffset + row * rowBytes, H)[H - 1]);
        assert.equal(last, token);
      }
    });
  }
}

/**
 * Expert outputs: random BF16 rows. For LogFMT every 128-column block gets its own magnitude
 * (1e-3 to 1e2), so the encoding's range per block and its clipping are exercised.
 */
function expertOutputs(rows: number, hidden: number, seed: number, mixed: boolean): Uint16Array {
  if (!mixed) return orderSensitiveBF16(rows * hidden, seed);
  const rng = new Rng(seed);
  const f = new Float32Array(rows * hidden);
  for (let b = 0; b < f.length / 128; b++) {
    const scale = 10 ** (rng.next() * 5 - 3);
    for (let i = b * 128; i < (b + 1) * 128; i++) f[i] = (rng.next() * 2 - 1) * scale;
  }
  return toBF16(f);
}

/** LogFMT-10 loses at most half a step of the 7-bit mantissa per value (core/logfmt.h): under 2%. */
const LOGFMT_RELATIVE_ERROR = 0.02;

async function runCase(c: Case): Promise<void> {
  using fx = await llFixture(c);
  await Promise.all(fx.group.ranks.map(async (_rank: Rank, r: number) => {
    if (c.masked?.includes(r)) return;
    for (const m of c.masked ?? []) await fx.buffers[r].updateMask(m);
  }));
  await roundTrip(c, fx);
}

/**
 * One dispatch and combine on every rank that takes part (or on `ranks`), each checked against
 * the reference; several rounds may run on one fixture.
 */
async function roundTrip(c: Case, fx: Fixture): Promise<void> {
  const inputs = makeInputs(c);
  const active = new Set(Array.from({ length: c.ranks }, (_, r) => r).filter((r) => !c.masked?.includes(r)));
  const layout = llLayout(inputs.map((i) => i.topk), c.tokens, c.topk, c.experts, new Set(c.masked));
  const EL = c.experts / c.ranks, N = c.ranks * c.maxTokens, H = c.hidden;
  // Expert outputs: random BF16 rows (mixed magnitudes for LogFMT); only the received rows travel back.
  const y = Array.from({ length: c.ranks }, (_, r) => expertOutputs(EL * N, H, c.seed * 31 + r, !!c.logfmt));
  await Promise.all(fx.group.ranks.map(async (rank: Rank, r: number) => {
    if (!active.has(r)) return;
    const buf = fx.buffers[r];
    using x = await Tensor.from(rank, inputs[r].x, { shape: [c.tokens[r], H] });
    using idx = await Tensor.from(rank, inputs[r].topkIdx, { shape: [c.tokens[r], c.topk] });
    using w = await Tensor.from(rank, inputs[r].weights, { shape: [c.tokens[r], c.topk] });
    using sent = await buf.lowLatencyDispatch(x, idx, {
      useFp8: !!c.fp8,
      roundScale: c.roundScale,
      useUe8m0: c.ue8m0,
      returnRecvHook: c.hook,
    });
    assert.equal(!!sent.hook, !!c.hook);
    sent.hook?.run();
    await checkDispatch(c, sent, inputs, r);

    let yt: Tensor;
    if (c.zeroCopy) {
      yt = buf.nextCombineBuffer(sent.handle);
      await yt.write(y[r]);
    } else {
      yt = await Tensor.from(rank, y[r], { shape: [EL, N, H] });
    }
    using back = await buf.lowLatencyCombine(c.zeroCopy ? undefined : yt, idx, w, sent.handle, {
      zeroCopy: c.zeroCopy,
      useLogfmt: c.logfmt,
      returnRecvHook: c.hook,
    });
    back.hook?.run();
    const combine = (encoded: boolean) =>
      llCombine(
        inputs[r].topk,
        inputs[r].weights,
        c.tokens[r],
        c.topk,
        H,
        (e) => !active.has(Math.floor(e / EL)),
        (e, t) => {
          const owner = Math.floor(e / EL), l = e % EL;
          const i = layout[owner][l].rows.findIndex((row) => row.src === r && row.token === t);
          const yr = y[owner].subarray((l * N + i) * H, (l * N + i + 1) * H);
          if (!encoded) return yr;
          const out: number[] = [];
          for (let b = 0; b < H / 128; b++) out.push(...logfmtRoundTrip(yr.subarray(b * 128, (b + 1) * 128)));
          return out;
        },
      );
    const got = await back.combinedX.read() as Uint16Array;
    assert.deepEqual(got, combine(!!c.logfmt), `rank ${r}: combined`);
    if (c.logfmt) {
      // The encoding itself, against the BF16 combine: relative L2 error of every block of 128
      // channels of every token (the blocks differ in magnitude by up to 1e5).
      const exact = combine(false);
      let worst = 0;
      for (let b = 0; b < got.length / 128; b++) {
        let err = 0, norm = 0;
        for (let i = b * 128; i < (b + 1) * 128; i++) {
          const a = bf16Value(got[i]), e = bf16Value(exact[i]);
          err += (a - e) ** 2;
          norm += e * e;
        }
        if (norm > 0) worst = Math.max(worst, Math.sqrt(err / norm));
      }
      assert.ok(worst < LOGFMT_RELATIVE_ERROR, `rank ${r}: LogFMT-10 error ${worst} in a block`);
    }
    yt[Symbol.dispose]();
  }));
}

Deno.test("low-latency dispatch and combine match the reference", async (t) => {
  const base = { hidden: 256, seed: 1 };
  for (const ranks of [1, 2, 4, 8]) {
    const experts = ranks * 3;
    for (const fmt of ["bf16", "fp8", "fp8 round-scale", "fp8 ue8m0"]) {
      const hook = (ranks + fmt.length) % 2 === 0;
      await t.step(`${ranks} ranks, ${fmt}, hook ${hook ? "on" : "off"}`, () =>
        runCase({
          ...base,
          ranks,
          experts,
          topk: Math.min(4, experts),
          tokens: Array.from({ length: ranks }, (_, r) => 9 + ((r * 5) % 7)),
          maxTokens: 16,
          seed: ranks * 10 + fmt.length,
          fp8: fmt !== "bf16",
          roundScale: fmt.includes("round") || fmt.includes("ue8m0"),
          ue8m0: fmt.includes("ue8m0"),
          hook,
        }));
    }
  }
  await t.step(
    "zero copy",
    () => runCase({ ...base, ranks: 4, experts: 8, topk: 3, tokens: [7, 12, 3, 16], maxTokens: 16, zeroCopy: true }),
  );
  await t.step(
    "LogFMT-10, with rows below and above 1.0",
    () =>
      runCase({
        ...base,
        ranks: 4,
        experts: 8,
        topk: 3,
        tokens: [7, 12, 3, 16],
        maxTokens: 16,
        logfmt: true,
        hook: true,
      }),
  );
  await t.step(
    "masked ranks (1 and 3 of 6 never take part)",
    () =>
      runCase({
        ...base,
        ranks: 6,
        experts: 12,
        topk: 4,
        tokens: [5, 6, 7, 8, 9, 10],
        maxTokens: 12,
        masked: [1, 3],
        fp8: true,
      }),
  );
  await t.step(
    "3 nodes of 2 (a buffer with the two-hop network region), masked rank 4, hook",
    () =>
      runCase({
        ...base,
        ranks: 6,
        experts: 12,
        topk: 4,
        tokens: [5, 6, 7, 8, 9, 10],
        maxTokens: 12,
        masked: [4],
        hook: true,
        ranksPerNode: 2,
      }),
  );
  await t.step(
    "DeepSeek-like hidden 7168, top-8",
    () => runCase({ ranks: 2, hidden: 7168, experts: 16, topk: 8, tokens: [5, 3], maxTokens: 8, seed: 3, fp8: true }),
  );
});

Deno.test("DeepEP: combine(dispatch(x)) with identity experts ~ x * sum(valid weights)", async (t) => {
  for (const fp8 of [false, true]) {
    await t.step(fp8 ? "fp8 (calc_diff < 9e-4)" : "bf16 (calc_diff < 1e-5)", async () => {
      const c: Case = {
        ranks: 4,
        hidden: 512,
        experts: 32,
        topk: 8,
        tokens: [16, 16, 16, 16],
        maxTokens: 16,
        seed: 9,
        fp8,
      };
      const inputs = makeInputs(c);
      using fx = await llFixture(c);
      await fx.group.all(async (rank, r) => {
        const buf = fx.buffers[r];
        using x = await Tensor.from(rank, inputs[r].x, { shape: [16, c.hidden] });
        using idx = await Tensor.from(rank, inputs[r].topkIdx, { shape: [16, c.topk] });
        using w = await Tensor.from(rank, inputs[r].weights, { shape: [16, c.topk] });
        using sent = await buf.lowLatencyDispatch(x, idx, { useFp8: fp8 });
        // The "experts" dequantise their input and return it.
        let y: Uint16Array;
        if (fp8) {
          const codes = await sent.recvX.read() as Uint8Array;
          const scales = await sent.recvXScales!.readFloat32();
          y = new Uint16Array(codes.length);
          const S = c.hidden / 128;
          for (let i = 0; i < codes.length; i++) {
            const row = Math.floor(i / c.hidden), block = Math.floor((i % c.hidden) / 128);
            y[i] = bf16Round(fp8Value(codes[i]) * scales[row * S + block]);
          }
        } else {
          y = await sent.recvX.read() as Uint16Array;
        }
        using yt = await Tensor.from(rank, y, { shape: sent.recvX.shape as number[] });
        using back = await buf.lowLatencyCombine(yt, idx, w, sent.handle);
        const got = await back.combinedX.readFloat32();
        assert.ok(got.every((v) => !Number.isNaN(v)), "no NaN");
        const want = new Float64Array(got.length);
        for (let tok = 0; tok < 16; tok++) {
          let sum = 0;
          for (let k = 0; k < c.topk; k++) {
            if (inputs[r].topk[tok * c.topk + k] >= 0) sum += inputs[r].weights[tok * c.topk + k];
          }
          for (let h = 0; h < c.hidden; h++) {
            want[tok * c.hidden + h] = bf16Value(inputs[r].x[tok * c.hidden + h]) * sum;
          }
        }
        const diff = calcDiff(got, want);
        assert.ok(diff < (fp8 ? 9e-4 : 1e-5), `rank ${r}: calc_diff ${diff}`);
      });
    });
  }
});

/** One rank, one expert, one token of 128 channels: what the quantiser makes of `values`. */
async function quantizeOne(values: number[] | Uint16Array, opts: { roundScale?: boolean; ue8m0?: boolean } = {}) {
  using g = Group.local({ ranks: 1 });
  using buf = g.ranks[0].createBuffer({ hidden: 128, maxTokensPerRank: 1, lowLatency: { numExperts: 1 } });
  const bits = values instanceof Uint16Array ? values : toBF16(new Float32Array(values));
  using x = await Tensor.from(g.ranks[0], bits, { shape: [1, 128] });
  using idx = await Tensor.from(g.ranks[0], new BigInt64Array([0n]), { shape: [1, 1] });
  using res = await buf.lowLatencyDispatch(x, idx, { roundScale: opts.roundScale, useUe8m0: opts.ue8m0 });
  const codes = (await res.recvX.read() as Uint8Array).subarray(0, 128);
  const scale = new Uint32Array((await res.recvXScales!.read()).buffer)[0];
  return { codes: Array.from(codes), scaleBits: scale, scale: new Float32Array(new Uint32Array([scale]).buffer)[0] };
}

Deno.test("FP8 quantisation: hand-computed values", async (t) => {
  await t.step("amax 0: the 1e-4 floor, codes 0", async () => {
    const q = await quantizeOne(new Array(128).fill(0));
    assert.ok(q.codes.every((c) => c === 0));
    assert.equal(q.scale, Math.fround(Math.fround(1e-4) / 448)); // 2.2321428e-7
  });
  await t.step("values at +-448: scale 1, codes 0x7e / 0xfe", async () => {
    const v = new Array(128).fill(0).map((_, i) => (i % 3 === 0 ? 448 : i % 3 === 1 ? -448 : 1));
    const q = await quantizeOne(v);
    assert.equal(q.scale, 1);
    assert.equal(q.codes[0], 0x7e);
    assert.equal(q.codes[1], 0xfe);
    assert.equal(q.codes[2], 0x38); // 1.0
  });
  await t.step("subnormal BF16 inputs fall under the floor and quantise to 0", async () => {
    const bits = new Uint16Array(128).fill(0x0001); // the smallest BF16 subnormal, ~9.2e-41
    const q = await quantizeOne(bits);
    assert.ok(q.codes.every((c) => c === 0));
    assert.equal(q.scale, Math.fround(Math.fround(1e-4) / 448));
  });
  await t.step("NaN: that channel encodes NaN (0x7f), the scale ignores it", async () => {
    const v = new Array(128).fill(2);
    v[5] = NaN;
    const q = await quantizeOne(v);
    assert.equal(q.codes[5], 0x7f);
    assert.equal(q.scale, Math.fround(2 / 448));
    assert.equal(q.codes[0], 0x7e); // 2 * (448 / 2) = 448
  });
  await t.step("round scale: amax 300 -> scale 1; amax 1 -> scale 2^-8", async () => {
    const a = await quantizeOne(new Array(128).fill(0).map((_, i) => (i === 7 ? 300 : 0.5)), { roundScale: true });
    assert.equal(a.scale, 1);
    assert.equal(a.codes[7], 0x79); // 300 -> 288 = 256 * 1.125, the nearest e4m3
    const b = await quantizeOne(new Array(128).fill(1), { roundScale: true });
    assert.equal(b.scale, 2 ** -8);
    assert.equal(b.codes[0], 0x78); // 256
  });
  await t.step("UE8M0 packs the exponent byte of the power-of-two scale", async () => {
    const q = await quantizeOne(new Array(128).fill(1), { roundScale: true, ue8m0: true });
    assert.equal(q.scaleBits, 127 - 8); // 2^-8: biased exponent 119, one block in byte 0
  });
});

Deno.test("double buffering: two results in flight; the third call voids the first hook", async () => {
  const c: Case = { ranks: 2, hidden: 128, experts: 4, topk: 2, tokens: [4, 4], maxTokens: 4, seed: 5 };
  const inputs = makeInputs(c);
  using fx = await llFixture(c);
  await fx.group.all(async (rank, r) => {
    const buf = fx.buffers[r];
    using x = await Tensor.from(rank, inputs[r].x, { shape: [4, 128] });
    using idx = await Tensor.from(rank, inputs[r].topkIdx, { shape: [4, 2] });
    using w = await Tensor.from(rank, inputs[r].weights, { shape: [4, 2] });
    using a = await buf.lowLatencyDispatch(x, idx, { returnRecvHook: true, useFp8: false });
    using b = await buf.lowLatencyDispatch(x, idx, { returnRecvHook: true, useFp8: false });
    using c3 = await buf.lowLatencyDispatch(x, idx, { returnRecvHook: true, useFp8: false });
    assert.throws(
      () => a.hook!.run(),
      (e: unknown) => e instanceof SwitchyardError && /reused the half/.test(e.message),
    );
    b.hook!.run();
    c3.hook!.run();
    assert.throws(() => b.hook!.run(), /already run/);
    await checkDispatch(c, c3, inputs, r);
    // Combining a dispatch whose receive phase never ran is refused.
    await assert.rejects(() => buf.lowLatencyCombine(x, idx, w, a.handle), /has not been run/);
    // The zero-copy buffer handed out for the next call is void once another call takes its half.
    const view = buf.nextCombineBuffer(c3.handle);
    using d = await buf.lowLatencyDispatch(x, idx, { useFp8: false });
    await assert.rejects(
      () => view.read(),
      (e: unknown) => e instanceof SwitchyardError && /reused its half/.test(e.message),
    );
    view[Symbol.dispose]();
    void d;
  });
});

Deno.test("statistics: received tokens per expert accumulate; the slow rank shows in the wait times", async () => {
  const c: Case = { ranks: 4, hidden: 128, experts: 8, topk: 3, tokens: [6, 6, 6, 6], maxTokens: 6, seed: 6 };
  const inputs = makeInputs(c);
  const layout = llLayout(inputs.map((i) => i.topk), c.tokens, c.topk, c.experts);
  using fx = await llFixture(c);
  const waits = await fx.group.all(async (rank, r) => {
    const buf = fx.buffers[r];
    using x = await Tensor.from(rank, inputs[r].x, { shape: [6, 128] });
    using idx = await Tensor.from(rank, inputs[r].topkIdx, { shape: [6, 3] });
    using stats = Tensor.empty(rank, { dtype: "i32", shape: [2] });
    using wait = Tensor.empty(rank, { dtype: "i64", shape: [4] });
    for (let i = 0; i < 2; i++) {
      if (r === 2) await new Promise((resolve) => setTimeout(resolve, 150)); // the slow rank
      using d = await buf.lowLatencyDispatch(x, idx, {
        cumulativeLocalExpertRecvStats: stats,
        dispatchWaitRecvCostStats: wait,
      });
      await d.recvCount.read();
    }
    assert.deepEqual(Array.from(await stats.read()), layout[r].map((l) => 2 * l.rows.length));
    return Array.from(await wait.read(), Number);
  });
  for (const [r, w] of waits.entries()) {
    if (r === 2) continue;
    const slowest = w.indexOf(Math.max(...w));
    assert.equal(slowest, 2, `rank ${r} waited longest for rank 2: ${w}`);
    assert.ok(w[2] > 100e6, `rank ${r} waited ${w[2]} ns for rank 2`);
  }
});

Deno.test("masking: a rank missing at the deadline is masked, not fatal", async () => {
  const c: Case = { ranks: 4, hidden: 128, experts: 8, topk: 3, tokens: [5, 5, 5, 5], maxTokens: 5, seed: 8 };
  const inputs = makeInputs(c);
  using fx = await llFixture(c, 300, true);
  const started = performance.now();
  await Promise.all([0, 1, 2].map(async (r) => {
    const rank = fx.group.ranks[r], buf = fx.buffers[r];
    using x = await Tensor.from(rank, inputs[r].x, { shape: [5, 128] });
    using idx = await Tensor.from(rank, inputs[r].topkIdx, { shape: [5, 3] });
    using sent = await buf.lowLatencyDispatch(x, idx, { useFp8: false });
    await checkDispatch({ ...c, masked: [3] }, sent, inputs, r);
    assert.deepEqual(buf.queryMask(), [0, 0, 0, 1]);
    await buf.cleanMask();
    assert.deepEqual(buf.queryMask(), [0, 0, 0, 0]);
  }));
  assert.ok(performance.now() - started < 2000);
});

Deno.test("without masking, ranks missing at the deadline fail the call, every one of them named", async () => {
  const c: Case = { ranks: 4, hidden: 128, experts: 8, topk: 3, tokens: [5, 5, 5, 5], maxTokens: 5, seed: 9 };
  const inputs = makeInputs(c);
  using fx = await llFixture(c, 300);
  // Ranks 1 and 3 never call: rank 0's and rank 2's receive phases wait for them.
  await Promise.all([0, 2].map(async (r) => {
    const rank = fx.group.ranks[r];
    using x = await Tensor.from(rank, inputs[r].x, { shape: [5, 128] });
    using idx = await Tensor.from(rank, inputs[r].topkIdx, { shape: [5, 3] });
    const e = await failureOf(async () => {
      using sent = await fx.buffers[r].lowLatencyDispatch(x, idx, { useFp8: false });
      await sent.recvCount.read();
    });
    assert.ok(e instanceof SwitchyardTimeoutError, e.message);
    assert.equal(e.peerRank, 1, e.message);
    if (e.code === "TIMEOUT") {
      assert.match(e.message, /missing: ranks 1, 3\b/);
    } else {
      // The other waiter timed out first and told this rank, naming whom it waited for.
      assert.equal(e.code, "PEER_FAILED", e.message);
      assert.match(e.message, /timed out waiting for rank 1/);
    }
  }));
});

Deno.test("low-latency bad inputs name the argument", async (t) => {
  using g = Group.local({ ranks: 1 });
  const rank = g.ranks[0];
  using buf = rank.createBuffer({ hidden: 256, maxTokensPerRank: 4, lowLatency: { numExperts: 4 } });
  using plain = rank.createBuffer({ hidden: 256, maxTokensPerRank: 4 });
  using x = Tensor.empty(rank, { dtype: "bf16", shape: [4, 256] });
  using idx = await Tensor.from(rank, new BigInt64Array([0n, 1n, 2n, 3n]), { shape: [4, 1] });
  const expect = async (fn: () => unknown, argument: string, message?: RegExp) => {
    try {
      await fn();
    } catch (e) {
      assert.ok(e instanceof SwitchyardError, String(e));
      assert.equal(e.argument, argument, e.message);
      if (message) assert.match(e.message, message);
      return;
    }
    assert.fail("expected a SwitchyardError");
  };
  await t.step("tokens beyond maxTokensPerRank (both numbers named)", async () => {
    using big = Tensor.empty(rank, { dtype: "bf16", shape: [5, 256] });
    using idx5 = Tensor.empty(rank, { dtype: "i64", shape: [5, 1] });
    await expect(() => buf.lowLatencyDispatch(big, idx5), "x", /5 tokens exceed maxTokensPerRank 4/);
  });
  await t.step("top-k beyond 32 (the limit named)", async () => {
    using wide = Tensor.empty(rank, { dtype: "i64", shape: [4, 33] });
    await expect(() => buf.lowLatencyDispatch(x, wide), "topkIdx", /1 to 32 experts per token/);
  });
  await t.step(
    "hidden not a multiple of 128",
    () =>
      expect(() => rank.createBuffer({ hidden: 200, maxTokensPerRank: 4, lowLatency: { numExperts: 4 } }), "hidden"),
  );
  await t.step("a buffer without a low-latency region", () => expect(() => plain.lowLatencyDispatch(x, idx), "buffer"));
  await t.step(
    "UE8M0 without roundScale",
    () => expect(() => buf.lowLatencyDispatch(x, idx, { useUe8m0: true }), "useUe8m0"),
  );
  await t.step(
    "roundScale with BF16",
    () => expect(() => buf.lowLatencyDispatch(x, idx, { useFp8: false, roundScale: true }), "roundScale"),
  );
  await t.step(
    "hook and asyncFinish together",
    () => expect(() => buf.lowLatencyDispatch(x, idx, { returnRecvHook: true, asyncFinish: true }), "returnRecvHook"),
  );
  await t.step("x must be bf16", async () => {
    using f = Tensor.empty(rank, { dtype: "f32", shape: [4, 256] });
    await expect(() => buf.lowLatencyDispatch(f, idx), "x");
  });
  await t.step("combine: zero copy with LogFMT, wrong expert-output shape, wrong weights", async () => {
    using sent = await buf.lowLatencyDispatch(x, idx, { useFp8: false });
    using w = Tensor.empty(rank, { dtype: "f32", shape: [4, 1] });
    await expect(
      () => buf.lowLatencyCombine(undefined, idx, w, sent.handle, { zeroCopy: true, useLogfmt: true }),
      "zeroCopy",
    );
    await expect(() => buf.lowLatencyCombine(undefined, idx, w, sent.handle, { zeroCopy: true }), "zeroCopy");
    await expect(() => buf.lowLatencyCombine(x, idx, w, sent.handle), "x");
    using w2 = Tensor.empty(rank, { dtype: "f32", shape: [4, 2] });
    using y = Tensor.empty(rank, { dtype: "bf16", shape: [4, 4, 256] });
    await expect(() => buf.lowLatencyCombine(y, idx, w2, sent.handle), "topkWeights");
  });
  await t.step("stats tensors of the wrong shape", async () => {
    using s = Tensor.empty(rank, { dtype: "i32", shape: [3] });
    await expect(
      () => buf.lowLatencyDispatch(x, idx, { cumulativeLocalExpertRecvStats: s }),
      "cumulativeLocalExpertRecvStats",
    );
  });
  await t.step("masking on a buffer without it", () => expect(() => buf.updateMask(0), "buffer"));
});

Deno.test("cleanLowLatencyBuffer restarts the double buffer on every rank", async () => {
  const c: Case = { ranks: 2, hidden: 128, experts: 4, topk: 2, tokens: [3, 4], maxTokens: 4, seed: 12 };
  const inputs = makeInputs(c);
  using fx = await llFixture(c);
  await fx.group.all(async (rank, r) => {
    const buf = fx.buffers[r];
    using x = await Tensor.from(rank, inputs[r].x, { shape: [c.tokens[r], 128] });
    using idx = await Tensor.from(rank, inputs[r].topkIdx, { shape: [c.tokens[r], 2] });
    for (let i = 0; i < 3; i++) (await buf.lowLatencyDispatch(x, idx))[Symbol.dispose]();
    await buf.cleanLowLatencyBuffer();
    using again = await buf.lowLatencyDispatch(x, idx);
    assert.equal(again.handle.info().call, 1, "numbering restarted");
    await checkDispatch({ ...c, fp8: true }, again, inputs, r);
  });
});

/** The SwitchyardError `run` fails with (the call itself or reading its outputs). */
async function failureOf(run: () => Promise<unknown>): Promise<SwitchyardError> {
  try {
    await run();
  } catch (e) {
    assert.ok(e instanceof SwitchyardError, String(e));
    return e;
  }
  return assert.fail("expected a SwitchyardError");
}

Deno.test("masking after a full round: the masked rank's stale data in the double buffer is ignored", async () => {
  const c: Case = { ranks: 4, hidden: 128, experts: 8, topk: 3, tokens: [6, 5, 6, 4], maxTokens: 6, seed: 21 };
  using fx = await llFixture(c, 5000, true);
  await roundTrip({ ...c, fp8: true }, fx); // calls 1 and 2: rank 3 writes into both halves
  // Rank 3 leaves. The others mask it: calls 3 to 6 reuse halves that still hold its counts and rows.
  for (const r of [0, 1, 2]) await fx.buffers[r].updateMask(3);
  for (let round = 0; round < 2; round++) await roundTrip({ ...c, seed: 22 + round, masked: [3] }, fx);
});

Deno.test("a fast rank waits until the slow one has read a half before reusing it", async () => {
  const c: Case = { ranks: 2, hidden: 128, experts: 4, topk: 2, tokens: [4, 4], maxTokens: 4, seed: 30 };
  const rounds = Array.from({ length: 4 }, (_, i) => ({ ...c, seed: 30 + i }));
  const inputs = rounds.map(makeInputs);
  using fx = await llFixture(c);
  await fx.group.all(async (rank, r) => {
    const buf = fx.buffers[r];
    // Both ranks keep two calls in flight; rank 1 reads each one late. Rank 0 runs ahead until
    // the call after next, whose send must wait for rank 1 to have read the half it reuses.
    const pending: { round: number; res: LowLatencyDispatchResult; disposables: Tensor[] }[] = [];
    const receiveOldest = async () => {
      const { round, res, disposables } = pending.shift()!;
      if (r === 1) await new Promise((resolve) => setTimeout(resolve, 150));
      res.hook!.run();
      await checkDispatch(rounds[round], res, inputs[round], r);
      res[Symbol.dispose]();
      for (const d of disposables) d[Symbol.dispose]();
    };
    for (let i = 0; i < rounds.length; i++) {
      const x = await Tensor.from(rank, inputs[i][r].x, { shape: [4, 128] });
      const idx = await Tensor.from(rank, inputs[i][r].topkIdx, { shape: [4, 2] });
      const res = await buf.lowLatencyDispatch(x, idx, { useFp8: false, returnRecvHook: true });
      pending.push({ round: i, res, disposables: [x, idx] });
      if (pending.length === 2) await receiveOldest();
    }
    while (pending.length) await receiveOldest();
  });
});

Deno.test("a hook's outputs are refused until it runs; handle tensors are read-only", async () => {
  const c: Case = { ranks: 2, hidden: 128, experts: 4, topk: 2, tokens: [3, 4], maxTokens: 4, seed: 40, fp8: true };
  const inputs = makeInputs(c);
  using fx = await llFixture(c);
  await fx.group.all(async (rank, r) => {
    const buf = fx.buffers[r];
    using x = await Tensor.from(rank, inputs[r].x, { shape: [c.tokens[r], 128] });
    using idx = await Tensor.from(rank, inputs[r].topkIdx, { shape: [c.tokens[r], 2] });
    using sent = await buf.lowLatencyDispatch(x, idx, { useFp8: true, returnRecvHook: true });
    const early = await failureOf(() => sent.recvCount.read());
    assert.equal(early.argument, "hook", early.message);
    assert.match(early.message, /hook\.run\(\)/);
    sent.hook!.run();
    await checkDispatch(c, sent, inputs, r);
    using src = sent.handle.srcInfo();
    const write = await failureOf(() => src.write(new Int32Array(src.numel)));
    assert.match(write.message, /read-only/);
    await checkDispatch(c, sent, inputs, r); // the routing is intact
  });
});

Deno.test("zero copy: the view takes no writes once its combine is queued", async () => {
  const c: Case = { ranks: 1, hidden: 128, experts: 2, topk: 2, tokens: [3], maxTokens: 4, seed: 41 };
  const inputs = makeInputs(c);
  using fx = await llFixture(c);
  const [rank, buf] = [fx.group.ranks[0], fx.buffers[0]];
  using x = await Tensor.from(rank, inputs[0].x, { shape: [3, 128] });
  using idx = await Tensor.from(rank, inputs[0].topkIdx, { shape: [3, 2] });
  using w = await Tensor.from(rank, inputs[0].weights, { shape: [3, 2] });
  using sent = await buf.lowLatencyDispatch(x, idx, { useFp8: false });
  using view = buf.nextCombineBuffer(sent.handle);
  const y = randomBF16(view.numel, 41);
  await view.write(y);
  using back = await buf.lowLatencyCombine(undefined, idx, w, sent.handle, { zeroCopy: true });
  const late = await failureOf(() => view.write(y));
  assert.match(late.message, /being sent by its zero-copy combine/);
  await back.combinedX.read();
});

Deno.test("bad routing fails the call on every rank, and the buffers stay usable", async (t) => {
  const c: Case = { ranks: 3, hidden: 128, experts: 6, topk: 2, tokens: [4, 4, 4], maxTokens: 4, seed: 50 };
  const inputs = makeInputs(c);
  using fx = await llFixture(c);
  await t.step("dispatch: rank 1 routes to expert 99", async () => {
    await fx.group.all(async (rank, r) => {
      const topk = inputs[r].topkIdx.slice();
      if (r === 1) topk[3] = 99n;
      using x = await Tensor.from(rank, inputs[r].x, { shape: [4, 128] });
      using idx = await Tensor.from(rank, topk, { shape: [4, 2] });
      const e = await failureOf(async () => {
        using d = await fx.buffers[r].lowLatencyDispatch(x, idx);
        await d.recvCount.read();
      });
      if (r === 1) {
        assert.equal(e.code, "INVALID_ARGUMENT");
        assert.equal(e.argument, "topkIdx");
        assert.match(e.message, /token 1, entry 1 holds expert 99, outside \[0, 6\)/);
      } else {
        assert.equal(e.code, "PEER_FAILED", e.message);
        assert.match(e.message, /rank 1 rejected its input/);
      }
    });
    await roundTrip({ ...c, seed: 51 }, fx);
  });
  await t.step(
    "combine with the handles of that failed dispatch: refused on every rank, naming its failure",
    async () => {
      await fx.group.all(async (rank, r) => {
        const topk = inputs[r].topkIdx.slice();
        if (r === 1) topk[3] = 99n;
        using x = await Tensor.from(rank, inputs[r].x, { shape: [4, 128] });
        using idx = await Tensor.from(rank, topk, { shape: [4, 2] });
        using w = await Tensor.from(rank, inputs[r].weights, { shape: [4, 2] });
        using sent = await fx.buffers[r].lowLatencyDispatch(x, idx, { useFp8: false });
        await failureOf(() => sent.recvCount.read());
        using y = Tensor.empty(rank, { dtype: "bf16", shape: sent.recvX.shape as number[] });
        const e = await failureOf(async () => {
          using back = await fx.buffers[r].lowLatencyCombine(y, idx, w, sent.handle);
          await back.combinedX.read();
        });
        assert.match(e.message, /handle: its low-latency dispatch \(call \d+\) failed: /, e.message);
        assert.equal(e.code, r === 1 ? "INVALID_ARGUMENT" : "PEER_FAILED", e.message);
      });
      // Every rank refused it at once and acknowledged the half: the next calls go on.
      await roundTrip({ ...c, seed: 53 }, fx);
      await roundTrip({ ...c, seed: 54 }, fx);
    },
  );
  await t.step("combine: rank 0 passes other routing than its dispatch", async () => {
    await fx.group.all(async (rank, r) => {
      const buf = fx.buffers[r];
      using x = await Tensor.from(rank, inputs[r].x, { shape: [4, 128] });
      using idx = await Tensor.from(rank, inputs[r].topkIdx, { shape: [4, 2] });
      using w = await Tensor.from(rank, inputs[r].weights, { shape: [4, 2] });
      using sent = await buf.lowLatencyDispatch(x, idx, { useFp8: false });
      using y = await Tensor.from(rank, await sent.recvX.read(), { shape: sent.recvX.shape as number[] });
      const other = inputs[r].topkIdx.slice().reverse();
      using idx2 = await Tensor.from(rank, other, { shape: [4, 2] });
      const run = async () => {
        using back = await buf.lowLatencyCombine(y, r === 0 ? idx2 : idx, w, sent.handle);
        return await back.combinedX.read();
      };
      if (r === 0) {
        const e = await failureOf(run);
        assert.equal(e.argument, "topkIdx", e.message);
        assert.match(e.message, /differs from the routing low-latency call \d+ dispatched with/);
      } else {
        await run(); // the others' results do not depend on rank 0's routing
      }
    });
    await roundTrip({ ...c, seed: 52 }, fx);
  });
});

Deno.test("a low-latency call refused on one rank fails every rank within milliseconds; the buffers stay usable", async (t) => {
  const timeoutMs = 5000;
  const c: Case = { ranks: 3, hidden: 128, experts: 6, topk: 2, tokens: [4, 4, 4], maxTokens: 4, seed: 70 };
  const inputs = makeInputs(c);
  using fx = await llFixture(c, timeoutMs);
  const made = await fx.group.all(async (rank, r) => ({
    x: await Tensor.from(rank, inputs[r].x, { shape: [4, 128] }),
    xf: Tensor.empty(rank, { dtype: "f32", shape: [4, 128] }),
    idx: await Tensor.from(rank, inputs[r].topkIdx, { shape: [4, 2] }),
    w: await Tensor.from(rank, inputs[r].weights, { shape: [4, 2] }),
  }));
  // Rank 1's call is `refused`; the others make a good one (with a receive hook when `hook`)
  // and must fail it at once naming rank 1. Then a whole round trip on every rank.
  const round = async (
    op: "dispatch" | "combine",
    refused: (sent: LowLatencyDispatchResult | undefined) => Promise<unknown>,
    code: string,
    argument: string,
    hook = false,
  ) => {
    const started = performance.now();
    const sent = op === "combine"
      ? await fx.group.all((_, r) => fx.buffers[r].lowLatencyDispatch(made[r].x, made[r].idx, { useFp8: false }))
      : undefined;
    const settled = await Promise.allSettled(fx.group.ranks.map(async (_, r) => {
      if (r === 1) return await refused(sent?.[1]);
      const buf = fx.buffers[r];
      if (op === "dispatch") {
        using d = await buf.lowLatencyDispatch(made[r].x, made[r].idx, { returnRecvHook: hook });
        d.hook?.run();
        return await d.recvCount.read();
      }
      using back = await buf.lowLatencyCombine(sent![r].recvX, made[r].idx, made[r].w, sent![r].handle, {
        returnRecvHook: hook,
      });
      back.hook?.run();
      return await back.combinedX.read();
    }));
    const ms = performance.now() - started;
    for (const d of sent ?? []) d[Symbol.dispose]();
    for (const [r, s] of settled.entries()) {
      assert.equal(s.status, "rejected", `rank ${r} succeeded`);
      const e = (s as PromiseRejectedResult).reason;
      assert.ok(e instanceof SwitchyardError, String(e));
      if (r === 1) {
        assert.equal(e.code, code, e.message);
        assert.equal(e.argument, argument, e.message);
      } else {
        assert.equal(e.code, "PEER_FAILED", e.message);
        assert.match(e.message, new RegExp(`rank 1 rejected its input for low-latency ${op}`));
      }
    }
    assert.ok(ms < timeoutMs / 2, `the peers failed after ${ms.toFixed(0)} ms, not at once`);
    await roundTrip({ ...c, seed: c.seed + 1 }, fx);
  };
  await t.step(
    "dispatch refused by the library: an f32 x",
    () => round("dispatch", () => fx.buffers[1].lowLatencyDispatch(made[1].xf, made[1].idx), "INVALID_ARGUMENT", "x"),
  );
  await t.step("dispatch refused by the binding: a disposed top-k tensor, the peers with hooks", async () => {
    const gone = Tensor.empty(fx.group.ranks[1], { dtype: "i64", shape: [4, 2] });
    gone[Symbol.dispose]();
    await round("dispatch", () => fx.buffers[1].lowLatencyDispatch(made[1].x, gone), "DISPOSED", "topkIdx", true);
  });
  await t.step("dispatch refused by the binding: useFp8 as a string", () =>
    round(
      "dispatch",
      () => fx.buffers[1].lowLatencyDispatch(made[1].x, made[1].idx, { useFp8: "yes" as unknown as boolean }),
      "INVALID_ARGUMENT",
      "useFp8",
    ));
  await t.step("combine refused by the library: x of the dispatch's input shape", () =>
    round(
      "combine",
      (d) => fx.buffers[1].lowLatencyCombine(made[1].x, made[1].idx, made[1].w, d!.handle),
      "INVALID_ARGUMENT",
      "x",
    ));
  await t.step("combine refused by the binding: a handle that is not one, the peers with hooks", () =>
    round(
      "combine",
      (d) => fx.buffers[1].lowLatencyCombine(d!.recvX, made[1].idx, made[1].w, {} as LowLatencyHandle),
      "WRONG_HANDLE",
      "handle",
      true,
    ));
  await t.step("refused by the C ABI itself: a destroyed tensor handle passed directly", async () => {
    const gone = Tensor.empty(fx.group.ranks[1], { dtype: "bf16", shape: [4, 128] });
    const raw = gone.pointer;
    gone[Symbol.dispose]();
    const started = performance.now();
    const peers = [0, 2].map(async (r) => {
      using d = await fx.buffers[r].lowLatencyDispatch(made[r].x, made[r].idx);
      return await d.recvCount.read();
    });
    const args = LLDispatchArgs.create().setPointer("x", raw).setPointer("topk_idx", made[1].idx.pointer)
      .setPointer("compute_stream", fx.group.ranks[1].stream.pointer);
    assert.equal(
      native().sy_ll_dispatch(fx.buffers[1].pointer, args.bytes, LLDispatchResult.create().bytes),
      Status.DISPOSED,
    );
    for (const s of await Promise.allSettled(peers)) {
      const e = (s as PromiseRejectedResult).reason;
      assert.ok(e instanceof SwitchyardError && e.code === "PEER_FAILED", String(e));
      assert.match(e.message, /rank 1 rejected its input for low-latency dispatch/);
    }
    assert.ok(performance.now() - started < timeoutMs / 2, `${performance.now() - started} ms`);
    await roundTrip({ ...c, seed: c.seed + 2 }, fx);
  });
  await t.step("three refusals in a row cycle both halves; then the round trip", async () => {
    for (let i = 0; i < 3; i++) {
      await round("dispatch", () => fx.buffers[1].lowLatencyDispatch(made[1].xf, made[1].idx), "INVALID_ARGUMENT", "x");
    }
  });
  for (const m of made) for (const v of Object.values(m)) v[Symbol.dispose]();
});

Deno.test("cleanLowLatencyBuffer with a dead rank masked", async () => {
  const c: Case = { ranks: 4, hidden: 128, experts: 8, topk: 3, tokens: [5, 5, 5, 5], maxTokens: 5, seed: 60 };
  using fx = await llFixture(c, 400, true);
  const started = performance.now();
  await Promise.all([0, 1, 2].map(async (r) => {
    await fx.buffers[r].updateMask(3);
    await fx.buffers[r].cleanLowLatencyBuffer();
  }));
  assert.ok(performance.now() - started < 400, "nobody waited for the masked rank");
  await roundTrip({ ...c, masked: [3] }, fx);
});

Deno.test("low-latency inputs are taken when the call is made: disposing them right after is safe", async () => {
  const c: Case = { ranks: 2, hidden: 128, experts: 4, topk: 2, tokens: [4, 4], maxTokens: 4, seed: 6 };
  const inputs = makeInputs(c);
  using fx = await llFixture(c);
  await fx.group.all(async (rank, r) => {
    const buf = fx.buffers[r];
    using w = await Tensor.from(rank, inputs[r].weights, { shape: [4, 2] });
    using idx = await Tensor.from(rank, inputs[r].topkIdx, { shape: [4, 2] });
    const call = async () => {
      using x = await Tensor.from(rank, inputs[r].x, { shape: [4, 128] });
      return buf.lowLatencyDispatch(x, idx, { useFp8: false }); // x is disposed before the call runs
    };
    using sent = await call();
    await checkDispatch(c, sent, inputs, r);
    const back = async () => {
      using i2 = await Tensor.from(rank, inputs[r].topkIdx, { shape: [4, 2] });
      return buf.lowLatencyCombine(sent.recvX, i2, w, sent.handle); // so is this top-k tensor
    };
    using combined = await back();
    assert.equal((await combined.combinedX.read()).length, 4 * 128);
  });
});
