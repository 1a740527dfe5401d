/**
 * The demo (`deno task demo`): MoE dispatch and combine on virtual ranks with DeepSeek-V3-like
 * shapes sized for a CPU. Prints the routing (tokens per rank and per expert, with imbalance),
 * dispatch and combine times separately, and checks that combine(dispatch(x)) gives back x.
 * Exits 0 only when the check passes.
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  type Backend,
  backendInfo,
  bufferSizeHint,
  type DispatchResult,
  Group,
  libraryVersion,
  randomFloats,
  randomRouting,
  Tensor,
  toBF16,
} from "../../mod.ts";

const { values: opt } = parseArgs({
  options: {
    ranks: { type: "string", default: "8" },
    tokens: { type: "string", default: "256" },
    hidden: { type: "string", default: "7168" },
    experts: { type: "string", default: "256" },
    topk: { type: "string", default: "8" },
    zipf: { type: "string", default: "0.8" },
    "decode-tokens": { type: "string", default: "128" },
    iterations: { type: "string", default: "5" },
    backend: { type: "string", default: "auto" },
    seed: { type: "string", default: "1" },
    help: { type: "boolean", default: false },
  },
  strict: true,
});

if (opt.help) {
  console.log(
    "deno task demo [--ranks 8] [--tokens 256] [--hidden 7168] [--experts 256] [--topk 8] [--zipf 0.8]\n" +
      "               [--decode-tokens 128] [--iterations 5] [--backend auto|host|cuda] [--seed 1]",
  );
  Deno.exit(0);
}

const R = Number(opt.ranks), T = Number(opt.tokens), H = Number(opt.hidden);
const E = Number(opt.experts), K = Number(opt.topk), zipf = Number(opt.zipf);
const iterations = Math.max(1, Number(opt.iterations)), seed = Number(opt.seed);
const decodeTokens = Number(opt["decode-tokens"]);

function chooseBackend(): Backend {
  const cuda = backendInfo("cuda");
  if (opt.backend === "host" || opt.backend === "cuda") return opt.backend;
  if (cuda.available && cuda.dispatchSupported) return "cuda";
  const why = !cuda.available ? cuda.reason : "dispatch does not run on the CUDA backend in this build yet";
  console.log(`backend: host (${why})`);
  return "host";
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

const fmtMs = (ms: number) => `${ms.toFixed(2)} ms`;

/** BF16 bits as float32 values (exact: a BF16 value is a float32 with the low 16 bits zero). */
function bf16ToFloat32(bits: Uint16Array): Float32Array {
  const words = new Uint32Array(bits.length);
  for (let i = 0; i < bits.length; i++) words[i] = bits[i] << 16;
  return new Float32Array(words.buffer);
}
const backend = chooseBackend();
const backendName = backend === "cuda" && backendInfo("cuda").executedOnCpu
  ? "cuda (CUDA backend executed on the CPU, no GPU: times say nothing about a GPU)"
  : backend;
const plan = bufferSizeHint({ ranks: R, hidden: H, maxTokensPerRank: T });
console.log(
  `switchyard ${libraryVersion()}: ${R} ranks on ${backendName}, ${T} tokens/rank, hidden ${H}, ` +
    `${E} experts, top-${K}, zipf ${zipf}`,
);
console.log(`buffer per rank: ${(plan.totalBytes / 2 ** 20).toFixed(1)} MiB`);

using group = Group.local({ ranks: R, backend });
const buffers = await group.createBuffers({ hidden: H, maxTokensPerRank: T });

// Inputs: random BF16 tokens and a skewed top-k routing per rank.
const inputs = await group.all(async (rank, r) => {
  const routing = randomRouting({ tokens: T, experts: E, topk: K, seed: seed * 100 + r, zipf });
  const xBits = toBF16(randomFloats(T * H, seed * 1000 + r));
  return {
    xBits,
    x: await Tensor.from(rank, xBits, { shape: [T, H] }),
    topkIdx: await Tensor.from(rank, routing.topkIdx, { shape: [T, K] }),
    topkWeights: await Tensor.from(rank, routing.topkWeights, { shape: [T, K] }),
  };
});

// Routing statistics from every rank's layout.
const layouts = await group.all((_, r) => buffers[r].layout(inputs[r].topkIdx, { numExperts: E }));
const perRank = new Array<number>(R).fill(0);
const perExpert = new Array<number>(E).fill(0);
for (const l of layouts) {
  (await l.numTokensPerRank.read()).forEach((v, i) => (perRank[i] += v));
  (await l.numTokensPerExpert.read()).forEach((v, i) => (perExpert[i] += v));
}
const imbalance = (xs: number[]) => Math.max(...xs) / (xs.reduce((a, b) => a + b, 0) / xs.length);
console.log(`tokens received per rank: [${perRank.join(", ")}]  imbalance (max/mean) ${imbalance(perRank).toFixed(2)}`);
const hottest = perExpert.map((n, e) => [n, e]).sort((a, b) => b[0] - a[0]).slice(0, 5);
console.log(
  `tokens per expert: min ${Math.min(...perExpert)}, mean ${(K * T * R / E).toFixed(1)}, max ${
    Math.max(...perExpert)
  }` +
    `  imbalance ${imbalance(perExpert).toFixed(2)}  hottest: ${hottest.map(([n, e]) => `#${e}=${n}`).join(" ")}`,
);

// Timed rounds: dispatch, then combine, each until every rank's work has finished.
const dispatchMs: number[] = [], combineMs: number[] = [];
let last: DispatchResult[] = [];
let combined: Float32Array[] = [];
for (let it = 0; it <= iterations; it++) {
  for (const d of last) d[Symbol.dispose]();
  let t0 = performance.now();
  last = await group.all((_, r) =>
    buffers[r].dispatch(inputs[r].x, { topkIdx: inputs[r].topkIdx, topkWeights: inputs[r].topkWeights, numExperts: E })
  );
  await group.all((rank) => rank.stream.synchronize());
  const dispatchTime = performance.now() - t0;
  // The "experts" here return their input, so combine must reproduce x times the number of
  // ranks each token visited.
  t0 = performance.now();
  const backs = await group.all((_, r) => buffers[r].combine(last[r].recvX, last[r].handle));
  await group.all((rank) => rank.stream.synchronize());
  const combineTime = performance.now() - t0;
  if (it > 0) { // the first round warms up
    dispatchMs.push(dispatchTime);
    combineMs.push(combineTime);
  }
  if (it === iterations) combined = await Promise.all(backs.map((b) => b.combinedX.readFloat32())); // checked below
  for (const b of backs) b[Symbol.dispose]();
}

const recvRows = last.reduce((a, d) => a + (d.numRecvTokens ?? 0), 0);
const movedBytes = recvRows * H * 2;
const dMs = median(dispatchMs), cMs = median(combineMs);
console.log(`received rows: ${recvRows} (${(movedBytes / 2 ** 20).toFixed(1)} MiB of BF16 payload each way)`);
console.log(`dispatch: ${fmtMs(dMs)} median of ${iterations}  (${(movedBytes / dMs / 1e6).toFixed(2)} GB/s)`);
console.log(`combine:  ${fmtMs(cMs)} median of ${iterations}  (${(movedBytes / cMs / 1e6).toFixed(2)} GB/s)`);

// Check: per-expert counts add up, and combine(dispatch(x)) / (ranks visited) == x.
let ok = true;
const recvPerExpert = last.flatMap((d) => [...d.numRecvTokensPerExpert]);
if (recvPerExpert.join() !== perExpert.join()) {
  ok = false;
  console.log("per-expert received counts do not match the layout");
}
let maxRel = 0, bad = 0;
for (let r = 0; r < R; r++) {
  using inRankT = last[r].handle.isTokenInRank();
  const inRank = await inRankT.read();
  const x = bf16ToFloat32(inputs[r].xBits);
  for (let t = 0; t < T; t++) {
    let visits = 0;
    for (let q = 0; q < R; q++) visits += inRank[t * R + q];
    for (let c = 0; c < H; c++) {
      const want = x[t * H + c], got = combined[r][t * H + c] / visits;
      const rel = Math.abs(got - want) / Math.max(Math.abs(want), 1e-30);
      if (want !== 0 && rel > maxRel) maxRel = rel;
      // n copies of a BF16 value sum exactly in float32; one rounding to BF16 (8 significant
      // bits, round to nearest) is off by at most 2^-8 of the value.
      if (rel > 2 ** -8) bad++;
    }
  }
}
if (bad > 0) ok = false;
console.log(
  `round trip combine(dispatch(x)) == x: ${ok ? "OK" : "FAILED"} (max relative error ${maxRel.toExponential(2)}` +
    `, ${bad} channels beyond one BF16 rounding)`,
);

for (const d of last) d[Symbol.dispose]();
for (const l of layouts) l[Symbol.dispose]();
for (const i of inputs) for (const t of [i.x, i.topkIdx, i.topkWeights]) t[Symbol.dispose]();
for (const b of buffers) b[Symbol.dispose]();

// A decode step in the low-latency mode: fixed slots per (expert, source), a double buffer, no
// host waits. FP8 dispatch is timed; the check runs in BF16, where the "experts" return their
// input and combine must give x * sum(valid weights).
if (decodeTokens > 0) {
  const D = decodeTokens;
  const ll = await group.createBuffers({ hidden: H, maxTokensPerRank: D, lowLatency: { numExperts: E } });
  const step = await group.all(async (rank, r) => {
    const routing = randomRouting({ tokens: D, experts: E, topk: K, seed: seed * 300 + r, zipf });
    const xBits = toBF16(randomFloats(D * H, seed * 3000 + r));
    return {
      routing,
      xBits,
      x: await Tensor.from(rank, xBits, { shape: [D, H] }),
      topkIdx: await Tensor.from(rank, routing.topkIdx, { shape: [D, K] }),
      topkWeights: await Tensor.from(rank, routing.topkWeights, { shape: [D, K] }),
    };
  });
  const llDispatchMs: number[] = [], llCombineMs: number[] = [], llFp8Ms: number[] = [];
  let llOk = true, worst = 0;
  for (let it = 0; it <= iterations; it++) {
    let t0 = performance.now();
    const fp8 = await group.all((_, r) => ll[r].lowLatencyDispatch(step[r].x, step[r].topkIdx, { useFp8: true }));
    await group.all((rank) => rank.stream.synchronize());
    const fp8Time = performance.now() - t0;
    for (const d of fp8) d[Symbol.dispose]();
    t0 = performance.now();
    const sent = await group.all((_, r) => ll[r].lowLatencyDispatch(step[r].x, step[r].topkIdx, { useFp8: false }));
    await group.all((rank) => rank.stream.synchronize());
    const dispatchTime = performance.now() - t0;
    t0 = performance.now();
    const back = await group.all((_, r) =>
      ll[r].lowLatencyCombine(sent[r].recvX, step[r].topkIdx, step[r].topkWeights, sent[r].handle)
    );
    await group.all((rank) => rank.stream.synchronize());
    const combineTime = performance.now() - t0;
    if (it > 0) {
      llFp8Ms.push(fp8Time);
      llDispatchMs.push(dispatchTime);
      llCombineMs.push(combineTime);
    }
    if (it === iterations) {
      for (let r = 0; r < R; r++) {
        const got = await back[r].combinedX.readFloat32();
        const x = bf16ToFloat32(step[r].xBits);
        for (let t = 0; t < D; t++) {
          let sum = 0;
          for (let k = 0; k < K; k++) sum += step[r].routing.topkWeights[t * K + k];
          for (let c = 0; c < H; c++) {
            const want = x[t * H + c] * sum, err = Math.abs(got[t * H + c] - want);
            // Eight float32 products and sums, one BF16 rounding: within 2^-7 of the value.
            if (err > Math.abs(want) * 2 ** -7 + 1e-6) llOk = false;
            worst = Math.max(worst, err / Math.max(Math.abs(want), 1e-30));
          }
        }
      }
    }
    for (const b of back) b[Symbol.dispose]();
    for (const d of sent) d[Symbol.dispose]();
  }
  const decodeBytes = D * K * H * 2 * R;
  console.log(`decode step (low-latency mode): ${D} tokens/rank, top-${K}`);
  console.log(
    `  low-latency dispatch: ${fmtMs(median(llDispatchMs))} BF16, ${fmtMs(median(llFp8Ms))} FP8 ` +
      `(median of ${iterations}; ${(decodeBytes / 2 ** 20).toFixed(1)} MiB of BF16 rows)`,
  );
  console.log(`  low-latency combine:  ${fmtMs(median(llCombineMs))}`);
  console.log(
    `  round trip combine(dispatch(x)) == x * sum(w): ${llOk ? "OK" : "FAILED"} ` +
      `(max relative error ${worst.toExponential(2)})`,
  );
  if (!llOk) ok = false;
  for (const s of step) for (const t of [s.x, s.topkIdx, s.topkWeights]) t[Symbol.dispose]();
  for (const b of ll) b[Symbol.dispose]();
}
if (!ok) Deno.exit(1);
