/**
 * A whole Mixture-of-Experts layer on virtual ranks: router (gating matmul, softmax, top-k),
 * dispatch, every local expert's FFN (a plain blocked float32 matmul here: correct, not fast),
 * combine. Checked against the same layer computed densely without expert parallelism, and timed:
 * tokens per second and the share of dispatch, expert compute and combine. Then the decode path in
 * the low-latency mode, twice: one micro-batch after the other, and two micro-batches overlapped
 * with the receive hook (the experts of one run while the other's tokens are in flight).
 *
 * Run: deno run --allow-ffi --allow-env --allow-read examples/moe_layer.ts [--ranks 4] [--tokens 64]
 *      [--hidden 128] [--ffn 256] [--experts 16] [--topk 4] [--backend host|cuda]
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  type Backend,
  type EpBuffer,
  Group,
  type LowLatencyDispatchResult,
  randomFloats,
  Tensor,
  toBF16,
} from "../mod.ts";

const { values: opt } = parseArgs({
  options: {
    ranks: { type: "string", default: "4" },
    tokens: { type: "string", default: "64" },
    hidden: { type: "string", default: "128" },
    ffn: { type: "string", default: "256" },
    experts: { type: "string", default: "16" },
    topk: { type: "string", default: "4" },
    backend: { type: "string", default: "host" },
  },
  strict: true,
});
const R = Number(opt.ranks), T = Number(opt.tokens), H = Number(opt.hidden), F = Number(opt.ffn);
const E = Number(opt.experts), K = Number(opt.topk), EL = E / R;
if (!Number.isInteger(EL) || K > E || H % 128 !== 0) {
  console.error("moe_layer: experts must be a multiple of ranks, topk <= experts, hidden a multiple of 128");
  Deno.exit(2);
}

// ---- the layer's math, in float32 (the dense reference uses the same functions) -------------

/** `out[n, m] = sum_k a[n, k] * b[k, m]`, blocked over k for the cache. */
function matmul(a: Float32Array, b: Float32Array, n: number, k: number, m: number): Float32Array {
  const out = new Float32Array(n * m);
  const block = 64;
  for (let k0 = 0; k0 < k; k0 += block) {
    const k1 = Math.min(k0 + block, k);
    for (let i = 0; i < n; i++) {
      const row = out.subarray(i * m, (i + 1) * m);
      for (let kk = k0; kk < k1; kk++) {
        const v = a[i * k + kk];
        if (v === 0) continue;
        const brow = b.subarray(kk * m, (kk + 1) * m);
        for (let j = 0; j < m; j++) row[j] += v * brow[j];
      }
    }
  }
  return out;
}

const silu = (x: number) => x / (1 + Math.exp(-x));

/** Expert `e`'s weights, the same on every rank (seeded by the expert id). */
const expertWeights = Array.from({ length: E }, (_, e) => ({
  w1: randomFloats(H * F, 1000 + e, 1 / Math.sqrt(H)),
  w2: randomFloats(F * H, 2000 + e, 1 / Math.sqrt(F)),
}));
const gate = randomFloats(H * E, 7, 1 / Math.sqrt(H));

/** The FFN of expert `e` on `n` rows: `silu(x W1) W2`. */
function ffn(e: number, x: Float32Array, n: number): Float32Array {
  const h = matmul(x, expertWeights[e].w1, n, H, F);
  for (let i = 0; i < h.length; i++) h[i] = silu(h[i]);
  return matmul(h, expertWeights[e].w2, n, F, H);
}

/** Router: logits = x Wg, softmax, the top-k experts with their probabilities renormalised. */
function route(x: Float32Array, n: number): { idx: BigInt64Array; weights: Float32Array } {
  const logits = matmul(x, gate, n, H, E);
  const idx = new BigInt64Array(n * K), weights = new Float32Array(n * K);
  for (let t = 0; t < n; t++) {
    const l = logits.subarray(t * E, (t + 1) * E);
    const max = Math.max(...l);
    const p = Array.from(l, (v) => Math.exp(v - max));
    const order = p.map((_, e) => e).sort((a, b) => p[b] - p[a] || a - b).slice(0, K);
    const sum = order.reduce((s, e) => s + p[e], 0);
    order.forEach((e, k) => {
      idx[t * K + k] = BigInt(e);
      weights[t * K + k] = p[e] / sum;
    });
  }
  return { idx, weights };
}

/** BF16-rounded copies of the inputs, as the layer sees them. */
const bf16Round = (v: Float32Array) => {
  const bits = toBF16(v), out = new Float32Array(v.length), words = new Uint32Array(out.buffer);
  for (let i = 0; i < v.length; i++) words[i] = bits[i] << 16;
  return out;
};

// ---- the layer, expert-parallel ---------------------------------------------------------------

using group = Group.local({ ranks: R, backend: opt.backend as Backend });
const inputs = Array.from({ length: R }, (_, r) => {
  const x = bf16Round(randomFloats(T * H, 100 + r));
  return { x, ...route(x, T) };
});

/** The dense reference: every token through its top-k experts, weighted, in float64. */
function dense(r: number): Float64Array {
  const { x, idx, weights } = inputs[r];
  const out = new Float64Array(T * H);
  for (let t = 0; t < T; t++) {
    for (let k = 0; k < K; k++) {
      const y = ffn(Number(idx[t * K + k]), x.subarray(t * H, (t + 1) * H), 1);
      for (let c = 0; c < H; c++) out[t * H + c] += weights[t * K + k] * y[c];
    }
  }
  return out;
}

/** Largest |got - want| relative to the token's scale, over all ranks. */
function worstError(got: Float32Array[], want: Float64Array[]): number {
  let worst = 0;
  for (let r = 0; r < R; r++) {
    for (let t = 0; t < T; t++) {
      let scale = 1e-6;
      for (let c = 0; c < H; c++) scale = Math.max(scale, Math.abs(want[r][t * H + c]));
      for (let c = 0; c < H; c++) worst = Math.max(worst, Math.abs(got[r][t * H + c] - want[r][t * H + c]) / scale);
    }
  }
  return worst;
}

async function normalMode(buffers: EpBuffer[]) {
  const tensors = await group.all(async (rank, r) => ({
    x: await Tensor.fromFloat32(rank, inputs[r].x, { dtype: "bf16", shape: [T, H] }),
    idx: await Tensor.from(rank, inputs[r].idx, { shape: [T, K] }),
    w: await Tensor.from(rank, inputs[r].weights, { shape: [T, K] }),
  }));
  const t0 = performance.now();
  const sent = await group.all((_, r) =>
    buffers[r].dispatch(tensors[r].x, { topkIdx: tensors[r].idx, topkWeights: tensors[r].w, numExperts: E })
  );
  await group.all((rank) => rank.stream.synchronize());
  const t1 = performance.now();
  // Each received row: the sum over its local experts of weight * FFN(row); combine sums ranks.
  const outputs = await group.all(async (rank, r) => {
    const rows = sent[r].numRecvTokens!;
    const x = await sent[r].recvX.readFloat32();
    const idx = await sent[r].recvTopkIdx!.read() as BigInt64Array;
    const w = await sent[r].recvTopkWeights!.read();
    const y = new Float32Array(Math.max(rows, 1) * H); // a rank may receive nothing: one zero row
    for (let l = 0; l < EL; l++) {
      const mine: number[] = [], weight: number[] = [];
      for (let n = 0; n < rows; n++) {
        for (let k = 0; k < K; k++) {
          if (Number(idx[n * K + k]) === l) mine.push(n), weight.push(w[n * K + k]);
        }
      }
      if (!mine.length) continue;
      const xs = new Float32Array(mine.length * H);
      mine.forEach((n, i) => xs.set(x.subarray(n * H, (n + 1) * H), i * H));
      const out = ffn(r * EL + l, xs, mine.length);
      mine.forEach((n, i) => {
        for (let c = 0; c < H; c++) y[n * H + c] += weight[i] * out[i * H + c];
      });
    }
    return await Tensor.fromFloat32(rank, y, { dtype: "bf16", shape: [Math.max(rows, 1), H] });
  });
  const t2 = performance.now();
  const back = await group.all((_, r) => buffers[r].combine(outputs[r], sent[r].handle));
  const got = await Promise.all(back.map((b) => b.combinedX.readFloat32()));
  const t3 = performance.now();
  for (const d of [...back, ...sent, ...outputs]) d[Symbol.dispose]();
  for (const t of tensors) for (const v of Object.values(t)) v[Symbol.dispose]();
  return { got, dispatchMs: t1 - t0, expertMs: t2 - t1, combineMs: t3 - t2 };
}

// The decode path: rows arrive grouped by local expert, the FFN runs per expert on its rows, and
// combine applies the weights. `overlap`: two micro-batches, the second's tokens in flight (sent,
// hook not yet run) while the first's experts compute.
async function lowLatency(buffers: EpBuffer[], overlap: boolean) {
  const half = T / 2;
  const batches = overlap ? [[0, half], [half, T]] : [[0, T]];
  const got = Array.from({ length: R }, () => new Float32Array(T * H));
  const t0 = performance.now();
  const tensors = await group.all((rank, r) =>
    Promise.all(batches.map(async ([a, b]) => ({
      x: await Tensor.fromFloat32(rank, inputs[r].x.subarray(a * H, b * H), { dtype: "bf16", shape: [b - a, H] }),
      idx: await Tensor.from(rank, inputs[r].idx.subarray(a * K, b * K), { shape: [b - a, K] }),
      w: await Tensor.from(rank, inputs[r].weights.subarray(a * K, b * K), { shape: [b - a, K] }),
    })))
  );
  const experts = async (r: number, recvX: Tensor, counts: Tensor<"i32">) => {
    const x = await recvX.readFloat32(), n = await counts.read();
    const y = new Float32Array(x.length);
    for (let l = 0; l < EL; l++) {
      if (!n[l]) continue;
      const base = l * R * T * H; // [EL, R * maxTokens, H]
      y.set(ffn(r * EL + l, x.subarray(base, base + n[l] * H), n[l]), base);
    }
    return y;
  };
  // Send every batch's dispatch now; receive and compute batch by batch.
  const sends: LowLatencyDispatchResult[][] = [];
  for (let b = 0; b < batches.length; b++) {
    sends.push(
      await group.all((_, r) =>
        buffers[r].lowLatencyDispatch(tensors[r][b].x, tensors[r][b].idx, { useFp8: false, returnRecvHook: true })
      ),
    );
  }
  let expertMs = 0;
  for (let b = 0; b < batches.length; b++) {
    for (const d of sends[b]) d.hook!.run();
    const e0 = performance.now();
    const ys = await group.all(async (rank, r) => {
      const y = await experts(r, sends[b][r].recvX, sends[b][r].recvCount);
      return await Tensor.fromFloat32(rank, y, { dtype: "bf16", shape: [EL, R * T, H] });
    });
    expertMs += performance.now() - e0;
    const back = await group.all((_, r) =>
      buffers[r].lowLatencyCombine(ys[r], tensors[r][b].idx, tensors[r][b].w, sends[b][r].handle)
    );
    const outs = await Promise.all(back.map((c) => c.combinedX.readFloat32()));
    outs.forEach((o, r) => got[r].set(o, batches[b][0] * H));
    for (const x of [...back, ...ys]) x[Symbol.dispose]();
  }
  const totalMs = performance.now() - t0;
  for (const s of sends) for (const d of s) d[Symbol.dispose]();
  for (const per of tensors) for (const t of per) for (const v of Object.values(t)) v[Symbol.dispose]();
  return { got, totalMs, expertMs };
}

const want = inputs.map((_, r) => dense(r));
const buffers = await group.createBuffers({ hidden: H, maxTokensPerRank: T, lowLatency: { numExperts: E } });
let ok = true;
// BF16 expert outputs and one BF16 rounding of the sum: within a few 2^-8 of the token's scale.
const tolerance = 2 ** -6;

await normalMode(buffers); // warm-up: first touches of the buffers
const n = await normalMode(buffers);
const errN = worstError(n.got, want);
const total = n.dispatchMs + n.expertMs + n.combineMs;
const share = (ms: number) => `${(100 * ms / total).toFixed(0)}%`;
console.log(
  `MoE layer: ${R} ranks x ${T} tokens, hidden ${H}, FFN ${F}, top-${K} of ${E} experts, ${group.backend} backend`,
);
console.log(
  `normal mode: ${(R * T / (total / 1000)).toFixed(0)} tokens/s; dispatch ${n.dispatchMs.toFixed(1)} ms ` +
    `(${share(n.dispatchMs)}), experts ${n.expertMs.toFixed(1)} ms (${share(n.expertMs)}), combine ` +
    `${n.combineMs.toFixed(1)} ms (${share(n.combineMs)}); against the dense layer: max error ` +
    `${errN.toExponential(2)} of the token's scale ${errN <= tolerance ? "OK" : "FAILED"}`,
);
if (!(errN <= tolerance)) ok = false;

if (T % 2 === 0) {
  await lowLatency(buffers, false); // warm-up
  const one = await lowLatency(buffers, false);
  const two = await lowLatency(buffers, true);
  for (const [name, res] of [["one micro-batch", one], ["two, overlapped with the hook", two]] as const) {
    const err = worstError(res.got, want);
    if (!(err <= tolerance)) ok = false;
    console.log(
      `low-latency, ${name}: ${res.totalMs.toFixed(1)} ms (${(R * T / (res.totalMs / 1000)).toFixed(0)} tokens/s), ` +
        `experts ${res.expertMs.toFixed(1)} ms; max error ${err.toExponential(2)} ${
          err <= tolerance ? "OK" : "FAILED"
        }`,
    );
  }
  console.log(
    `overlap gain: ${(one.totalMs / two.totalMs).toFixed(2)}x ` +
      `(${group.backend === "host" ? "on the host backend the transfers use the same cores as the experts" : "GPU"})`,
  );
}
for (const b of buffers) b[Symbol.dispose]();
if (!ok) Deno.exit(1);
