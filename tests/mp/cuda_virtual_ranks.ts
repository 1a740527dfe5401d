/**
 * One process with virtual ranks on the CUDA backend, configured by its environment (hardware
 * queues, devices, peer atomics, injected launch failures): every rank dispatches (worst case,
 * so nothing waits on the host between kernels) and combines, for a number of rounds on the
 * same buffers. Prints one line per round: `ok N` (rows received in all) or, per rank that
 * failed, `error RANK CODE ARGUMENT MS: MESSAGE` (MS: how long its round took).
 * Arguments: the number of ranks, the number of rounds (default 1), the dispatch mode (`worst`,
 * the default, or `exact`: the host waits for the received counts), the timeout in ms (3000), the
 * ranks per node (default: one node; fewer: the dispatch takes two hops).
 */

import { Group, SwitchyardError, Tensor } from "../../mod.ts";

const ranks = Number(Deno.args[0] ?? "2");
const rounds = Number(Deno.args[1] ?? "1");
const exact = Deno.args[2] === "exact";
const timeoutMs = Number(Deno.args[3] ?? "3000");
const ranksPerNode = Deno.args[4] ? Number(Deno.args[4]) : undefined;
const H = 64, T = 8, K = 2, E = 4 * ranks;

try {
  using g = Group.local({ ranks, backend: "cuda", timeoutMs, ranksPerNode });
  const bufs = await g.createBuffers({ hidden: H, maxTokensPerRank: T });
  for (let round = 0; round < rounds; round++) {
    const outcomes = await Promise.all(g.ranks.map(async (rk, r) => {
      const started = performance.now();
      try {
        using x = await Tensor.from(rk, new Uint16Array(T * H).fill(0x3f80 + r), { shape: [T, H], dtype: "bf16" });
        using idx = await Tensor.from(rk, new BigInt64Array(T * K).map((_, i) => BigInt((i * 3 + r) % E)), {
          shape: [T, K],
        });
        using w = await Tensor.from(rk, new Float32Array(T * K).fill(0.5), { shape: [T, K] });
        using d = await bufs[r].dispatch(x, {
          topkIdx: idx,
          topkWeights: w,
          numExperts: E,
          numWorstTokens: exact ? undefined : ranks * T,
        });
        const rows = (await d.recvCount.read())[0];
        using c = await bufs[r].combine(d.recvX, d.handle);
        await c.combinedX.read();
        return rows;
      } catch (e) {
        if (!(e instanceof SwitchyardError)) throw e;
        const ms = Math.round(performance.now() - started);
        return `error ${r} ${e.code} ${e.argument ?? "-"} ${ms}: ${e.message}`;
      }
    }));
    const failed = outcomes.filter((o) => typeof o === "string");
    console.log(
      failed.length ? failed.join(" | ") : `ok ${outcomes.reduce((a: number, b) => a + (b as number), 0)}`,
    );
  }
  for (const b of bufs) b[Symbol.dispose]();
} catch (e) {
  if (!(e instanceof SwitchyardError)) throw e;
  console.log(`error - ${e.code} ${e.argument ?? "-"} 0: ${e.message}`);
}
