/**
 * Normal-mode dispatch and combine with the ranks either virtual (all in this process) or one per
 * process (started by the launcher), with everything else equal, so the two figures compare: the
 * same routing, sizes and timing per rank. Each round is: every rank dispatches (exact size) and
 * waits for its stream, then combines the rows it received and waits again; a round's time is the
 * wall clock of that rank around each call, and the report is the median and maximum over rounds
 * (after one warm-up round) per rank, plus the bytes a rank moved per call. The first round's
 * round trip is checked: with experts that return their input, combine gives x times the number of
 * ranks the token went to, within one BF16 rounding.
 *
 *   deno run -A bench/process_bench.ts --mode virtual --ranks 8 [options]
 *   deno task launch --nproc 8 bench/process_bench.ts --mode processes [options]
 *
 * Options: --backend host|cuda (cuda), --tokens 4096, --hidden 7168, --experts 256, --topk 8,
 * --iterations 10, --timeout 60000 (ms). Output: one line per rank, `process_bench {json}`.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { type Backend, Group, randomRouting, type Rank, Tensor } from "../mod.ts";
import type { EpBuffer } from "../mod.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    mode: { type: "string", default: "virtual" },
    ranks: { type: "string", default: "8" },
    backend: { type: "string", default: "cuda" },
    tokens: { type: "string", default: "4096" },
    hidden: { type: "string", default: "7168" },
    experts: { type: "string", default: "256" },
    topk: { type: "string", default: "8" },
    iterations: { type: "string", default: "10" },
    timeout: { type: "string", default: "60000" },
  },
});
const mode = values.mode === "processes" ? "processes" : "virtual";
const backend: Backend = values.backend === "host" ? "host" : "cuda";
const T = Number(values.tokens), H = Number(values.hidden), E = Number(values.experts), K = Number(values.topk);
const iterations = Math.max(1, Number(values.iterations));
const timeoutMs = Number(values.timeout);

using group = mode === "processes"
  ? await Group.fromEnv({ backend, timeoutMs, joinTimeoutMs: timeoutMs })
  : Group.local({ ranks: Number(values.ranks), backend, timeoutMs });
const R = group.size;
const buffers = await group.createBuffers({ hidden: H, maxTokensPerRank: T });

/** The global index of the rank in slot `slot` of this process. */
const globalRank = (rank: Rank) => rank.index;

/** Rank r's tokens: BF16 values of a few significant bits, so x * n (n <= 8 ranks) is near exact. */
function tokensOf(r: number): Uint16Array {
  const bits = new Uint16Array(T * H);
  for (let i = 0; i < bits.length; i++) bits[i] = 0x3f80 + (((i * 7 + r * 13) % 64) << 1); // 1.0 .. 1.49
  return bits;
}

interface Timings {
  dispatch: number[];
  combine: number[];
  recvRows: number;
  checked: string;
}

async function runRank(rank: Rank, buffer: EpBuffer): Promise<Timings> {
  const r = globalRank(rank);
  const routing = randomRouting({ tokens: T, experts: E, topk: K, seed: 7000 + r });
  const xBits = tokensOf(r);
  using x = await Tensor.from(rank, xBits, { shape: [T, H] });
  using topkIdx = await Tensor.from(rank, routing.topkIdx, { shape: [T, K] });
  using topkWeights = await Tensor.from(rank, routing.topkWeights, { shape: [T, K] });
  const out: Timings = { dispatch: [], combine: [], recvRows: 0, checked: "" };
  for (let it = 0; it <= iterations; it++) {
    if (mode === "processes") await group.barrier(`round-${it}`);
    let t0 = performance.now();
    using sent = await buffer.dispatch(x, { topkIdx, topkWeights, numExperts: E });
    await rank.stream.synchronize();
    const d = performance.now() - t0;
    t0 = performance.now();
    using back = await buffer.combine(sent.recvX, sent.handle);
    await rank.stream.synchronize();
    const c = performance.now() - t0;
    if (it > 0) {
      out.dispatch.push(d);
      out.combine.push(c);
    }
    if (it === 0) {
      out.recvRows = sent.recvX.shape[0];
      // Combine of the received rows: x times the number of ranks each token went to.
      using inRank = sent.handle.isTokenInRank();
      const dest = await inRank.read();
      const got = await back.combinedX.readFloat32();
      const words = new Uint32Array(xBits.length);
      for (let i = 0; i < words.length; i++) words[i] = xBits[i] << 16; // BF16 bits as float32
      const xs = new Float32Array(words.buffer);
      let worst = 0;
      for (let t = 0; t < T; t++) {
        let n = 0;
        for (let q = 0; q < R; q++) n += dest[t * R + q];
        for (let c2 = 0; c2 < H; c2++) {
          const want = xs[t * H + c2] * n;
          worst = Math.max(worst, Math.abs(got[t * H + c2] - want) / Math.max(Math.abs(want), 1e-30));
        }
      }
      out.checked = worst <= 2 ** -8 ? "ok" : `FAILED (relative error ${worst})`;
    }
  }
  return out;
}

const quantile = (xs: number[], q: number) =>
  [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(q * xs.length))];
const results = await group.all((rank, slot) => runRank(rank, buffers[slot]));
let failed = false;
for (const [slot, t] of results.entries()) {
  const rank = globalRank(group.ranks[slot]);
  // Bytes a rank moves per call, counted as DeepEP does: received rows times the BF16 row.
  const bytes = t.recvRows * H * 2;
  const report = {
    schema: 1,
    mode,
    backend,
    ranks: R,
    rank,
    tokens: T,
    hidden: H,
    experts: E,
    topk: K,
    iterations,
    recv_rows: t.recvRows,
    dispatch_ms: { p50: quantile(t.dispatch, 0.5), max: Math.max(...t.dispatch) },
    combine_ms: { p50: quantile(t.combine, 0.5), max: Math.max(...t.combine) },
    dispatch_gbps: bytes / quantile(t.dispatch, 0.5) / 1e6,
    combine_gbps: bytes / quantile(t.combine, 0.5) / 1e6,
    round_trip: t.checked,
  };
  console.log(`process_bench ${JSON.stringify(report)}`);
  if (t.checked !== "ok") failed = true;
}
for (const b of buffers) b[Symbol.dispose]();
if (mode === "processes") await group.barrier("done");
if (failed) Deno.exit(1);
