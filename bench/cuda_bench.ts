/**
 * Dispatch and combine on the CUDA backend under `deno bench`, normal and low-latency mode, each
 * group with a device-to-device copy of the same bytes as its baseline (`Tensor.copyFrom`).
 *
 * - On a GPU: 8 virtual ranks on it; normal mode at DeepSeek-V3 prefill shape (4096 tokens per
 *   rank, hidden 7168, top-8 of 256 experts), low-latency mode at decode shape (128 tokens).
 * - On the CUDA backend executed on the CPU (`SWITCHYARD_LIBRARY=build-cuda-cpu/libswitchyard.so`):
 *   4 ranks at small sizes, every name labelled "CPU-executed". It shows the benchmark works; it
 *   measures nothing about a GPU.
 * - Without a CUDA backend: nothing is registered and one line says why.
 *
 * Two clocks. `deno bench`'s own table times one call on every rank up to the end of its work
 * (launches, host waits and the synchronisation included), with its JavaScript clock. The table
 * printed after it is the GPU's: per operation, the time between CUDA events recorded on each
 * rank's stream before and after the call (the slowest rank of each iteration), median, p90,
 * p99 and max over the iterations, and the rank's bytes over the median. "Bytes" are the BF16
 * rows a rank receives (dispatch) or sends back (combine); the copy moves the same number.
 *
 * Run: deno bench --allow-ffi --allow-env --allow-read bench/cuda_bench.ts
 */

import { backendInfo, type EpBuffer, Group, randomFloats, randomRouting, Tensor, toBF16 } from "../mod.ts";
import { timeOnEveryRank } from "../src/bench/run.ts";
import { summarize } from "../src/stats.ts";

const cuda = backendInfo("cuda");
const onCpu = cuda.available && cuda.executedOnCpu;
const shape = onCpu
  ? { ranks: 4, tokens: 64, decode: 16, hidden: 1024, experts: 32, topk: 4, n: 5, warmup: 1 }
  : { ranks: 8, tokens: 4096, decode: 128, hidden: 7168, experts: 256, topk: 8, n: 30, warmup: 5 };
const label = onCpu ? " [CPU-executed]" : "";

/** The GPU's times of each benchmark, in milliseconds (slowest rank per iteration), and its bytes per rank. */
const gpuTimes = new Map<string, { ms: number[]; bytes: number }>();

interface Sampled extends Disposable {
  readonly bytes: number;
}

if (!cuda.available) {
  console.log(`cuda_bench: nothing to run: no CUDA backend (${cuda.reason || "this build has none"})`);
} else {
  await register();
}

async function register(): Promise<void> {
  const { ranks: R, tokens: T, decode: D, hidden: H, experts: E, topk: K } = shape;
  const group = Group.local({ ranks: R, backend: "cuda" });
  const normal = await group.createBuffers({ hidden: H, maxTokensPerRank: T });
  const decode = await group.createBuffers({ hidden: H, maxTokensPerRank: D, lowLatency: { numExperts: E } });
  const inputs = await group.all(async (rank, r) => {
    const routing = randomRouting({ tokens: T, experts: E, topk: K, seed: 11 + r });
    const decodeRouting = randomRouting({ tokens: D, experts: E, topk: K, seed: 101 + r });
    return {
      x: await Tensor.from(rank, toBF16(randomFloats(T * H, r)), { shape: [T, H] }),
      topkIdx: await Tensor.from(rank, routing.topkIdx, { shape: [T, K] }),
      topkWeights: await Tensor.from(rank, routing.topkWeights, { shape: [T, K] }),
      xDecode: await Tensor.from(rank, toBF16(randomFloats(D * H, 50 + r)), { shape: [D, H] }),
      idxDecode: await Tensor.from(rank, decodeRouting.topkIdx, { shape: [D, K] }),
      wDecode: await Tensor.from(rank, decodeRouting.topkWeights, { shape: [D, K] }),
    };
  });
  const routed = (r: number) => ({
    topkIdx: inputs[r].topkIdx,
    topkWeights: inputs[r].topkWeights,
    numExperts: E,
  });
  // One dispatch of each mode whose handles and rows the others reuse.
  const first = await group.all((_, r) => normal[r].dispatch(inputs[r].x, routed(r)));
  const firstDecode = await group.all((_, r) =>
    decode[r].lowLatencyDispatch(inputs[r].xDecode, inputs[r].idxDecode, { useFp8: false })
  );
  const decodeRows = await Promise.all(
    firstDecode.map(async (d) => (await d.recvCount.read()).reduce((a, n) => a + n, 0)),
  );
  const normalBytes = first.map((d) => d.numRows * H * 2);
  const decodeBytes = decodeRows.map((n) => n * H * 2);
  const copies = (bytes: number[]) =>
    bytes.map((b, r) => ({
      src: Tensor.empty(group.ranks[r], { dtype: "bf16", shape: [Math.max(b / 2, 1)] }),
      dst: Tensor.empty(group.ranks[r], { dtype: "bf16", shape: [Math.max(b / 2, 1)] }),
    }));
  const normalCopy = copies(normalBytes), decodeCopy = copies(decodeBytes);
  const shapeText = `${R} ranks x ${T} tokens x ${H}, top-${K} of ${E}`;
  const decodeText = `${R} ranks x ${D} tokens x ${H}, top-${K} of ${E}`;

  // One iteration of benchmark `name`: `call` on every rank between CUDA events.
  const sample = async (name: string, bytes: number[], call: (r: number) => Promise<Disposable>) => {
    const { out, ms } = await timeOnEveryRank(group, call);
    for (const o of out) o[Symbol.dispose]();
    const entry = gpuTimes.get(name) ?? { ms: [], bytes: Math.max(...bytes) };
    entry.ms.push(Math.max(...ms));
    gpuTimes.set(name, entry);
  };
  const copy = (pairs: { src: Tensor; dst: Tensor }[]) => (r: number) => {
    pairs[r].dst.copyFrom(pairs[r].src);
    return Promise.resolve({ [Symbol.dispose]() {} });
  };
  const opts = (group: string, baseline = false) => ({ group, baseline, n: shape.n, warmup: shape.warmup });

  const normalGroup = `normal mode, ${shapeText}${label}`;
  const copyName = `device copy of the same bytes${label}`;
  Deno.bench(`${copyName} (normal)`, opts(normalGroup, true), async () => {
    await sample(`${copyName} (normal)`, normalBytes, copy(normalCopy));
  });
  Deno.bench(`dispatch, exact size${label}`, opts(normalGroup), async () => {
    await sample(`dispatch, exact size${label}`, normalBytes, (r) => normal[r].dispatch(inputs[r].x, routed(r)));
  });
  Deno.bench(`dispatch, cached${label}`, opts(normalGroup), async () => {
    await sample(
      `dispatch, cached${label}`,
      normalBytes,
      (r) => normal[r].dispatch(inputs[r].x, { handle: first[r].handle }),
    );
  });
  Deno.bench(`combine${label}`, opts(normalGroup), async () => {
    await sample(`combine${label}`, normalBytes, (r) => normal[r].combine(first[r].recvX, first[r].handle));
  });

  const decodeGroup = `low-latency mode, ${decodeText}${label}`;
  Deno.bench(`${copyName} (decode)`, opts(decodeGroup, true), async () => {
    await sample(`${copyName} (decode)`, decodeBytes, copy(decodeCopy));
  });
  for (const useFp8 of [false, true]) {
    const name = `lowLatencyDispatch, ${useFp8 ? "FP8" : "BF16"}${label}`;
    Deno.bench(name, opts(decodeGroup), async () => {
      await sample(
        name,
        decodeBytes,
        (r) => decode[r].lowLatencyDispatch(inputs[r].xDecode, inputs[r].idxDecode, { useFp8 }),
      );
    });
  }
  Deno.bench(`lowLatencyCombine${label}`, opts(decodeGroup), async () => {
    await sample(
      `lowLatencyCombine${label}`,
      decodeBytes,
      (r) =>
        decode[r].lowLatencyCombine(
          firstDecode[r].recvX,
          inputs[r].idxDecode,
          inputs[r].wDecode,
          firstDecode[r].handle,
        ),
    );
  });

  globalThis.addEventListener("unload", () => {
    console.log(`\nGPU time (CUDA events on each rank's stream, slowest rank per iteration)${label}`);
    console.log(["benchmark", "iterations", "median ms", "p90 ms", "p99 ms", "max ms", "GB/s"].join(" | "));
    for (const [name, { ms: all, bytes }] of gpuTimes) {
      const ms = all.length > shape.warmup ? all.slice(shape.warmup) : all; // deno bench's warm-up first
      const s = summarize(ms);
      const gbs = bytes / (s.median * 1e-3) / 1e9;
      console.log(
        [name, ms.length, s.median.toFixed(3), s.p90.toFixed(3), s.p99.toFixed(3), s.max.toFixed(3), gbs.toFixed(1)]
          .join(" | "),
      );
    }
    for (const d of [...first, ...firstDecode]) d[Symbol.dispose]();
    for (const { src, dst } of [...normalCopy, ...decodeCopy]) {
      src[Symbol.dispose]();
      dst[Symbol.dispose]();
    }
    for (const i of inputs) for (const t of Object.values(i)) t[Symbol.dispose]();
    for (const b of [...normal, ...decode] as EpBuffer[]) b[Symbol.dispose]();
    group[Symbol.dispose]();
  });
}
