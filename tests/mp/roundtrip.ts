/**
 * One rank of a multi-process test (run through the launcher): meets the others with
 * Group.fromEnv, dispatches and combines, and checks the round trip against the reference.
 * Arguments: [rounds] [--die-at ROUND --die-rank R [--die-phase PHASE] [--die-delay MS]]
 * [--refuse-at ROUND --refuse-rank R] [--timeout MS] [--join-timeout MS (default: --timeout)].
 * With --refuse-at, rank R passes an f32 x to round ROUND's first dispatch and to the first
 * low-latency dispatch: each must be refused there (INVALID_ARGUMENT naming x) and fail on every
 * other rank within milliseconds (PEER_FAILED naming R); then the call runs normally everywhere.
 * Rank R kills itself (SIGKILL) `MS` milliseconds into PHASE: `join` (before meeting the
 * others), `buffers` (before creating the buffers), `dispatch` or `combine` (inside that
 * collective of round ROUND), `low-latency` (inside the low-latency dispatch).
 */

import { parseArgs } from "node:util";
import { Group, SwitchyardError, SwitchyardTimeoutError, Tensor } from "../../mod.ts";
import { generate, type Scenario, upload } from "../helpers.ts";
import { referenceCombine, referenceDispatch } from "../reference.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    rounds: { type: "string", default: "3" },
    "die-at": { type: "string", default: "-1" },
    "die-rank": { type: "string", default: "-1" },
    "die-phase": { type: "string", default: "dispatch" },
    "die-delay": { type: "string", default: "20" },
    "refuse-at": { type: "string", default: "-1" },
    "refuse-rank": { type: "string", default: "-1" },
    timeout: { type: "string", default: "20000" },
    "join-timeout": { type: "string" },
  },
});
const rounds = Number(values.rounds), dieAt = Number(values["die-at"]), dieRank = Number(values["die-rank"]);
const started = performance.now();
const me = Number(Deno.env.get("RANK"));
const diePhase = me === dieRank ? values["die-phase"] : "";

/** Dies `--die-delay` ms from now if this rank dies in `phase` (with `work` in flight). */
async function dieIn(phase: string, work?: () => unknown): Promise<void> {
  if (phase !== diePhase) return;
  work?.();
  await new Promise((r) => setTimeout(r, Number(values["die-delay"])));
  console.log(`rank ${me} kills itself in ${phase}`);
  Deno.kill(Deno.pid, "SIGKILL");
}

try {
  await dieIn("join");
  using group = await Group.fromEnv({
    timeoutMs: Number(values.timeout),
    joinTimeoutMs: Number(values["join-timeout"] ?? values.timeout),
  });
  const R = group.size;
  await dieIn("buffers");
  const [buffer] = await group.createBuffers({ hidden: 128, maxTokensPerRank: 40, lowLatency: { numExperts: 2 * R } });
  const rank = group.ranks[0];
  console.log(`joined as rank ${me} of ${R}`);
  if (group.nccl.enabled || !/host backend/.test(group.nccl.reason ?? "")) throw new Error("NCCL status unexpected");
  for (let round = 0; round < rounds; round++) {
    const s: Scenario = {
      ranks: R,
      tokens: Array.from({ length: R }, (_, r) => 20 + ((round * 3 + r * 7) % 17)),
      hidden: 128,
      experts: 4 * R,
      topk: 3,
      seed: 40 + round,
      drop: 0.1,
    };
    const d = generate(s);
    const expected = referenceDispatch(d.inputs, d.shape);
    const want = referenceCombine(expected, expected.map((e) => new Uint16Array(e.x.buffer)), s.hidden, s.tokens);
    using up = await upload(rank, s, d, me);
    if (round === Number(values["refuse-at"])) {
      const refusing = Number(values["refuse-rank"]);
      using bad = await Tensor.from(rank, new Float32Array(up.x.numel), { shape: [...up.x.shape] });
      const t0 = performance.now();
      const e = await buffer.dispatch(me === refusing ? bad : up.x, {
        topkIdx: up.topkIdx,
        topkWeights: up.topkWeights,
        numExperts: s.experts,
      }).then((d) => (d[Symbol.dispose](), undefined), (err) => err);
      const ms = Math.round(performance.now() - t0);
      const want = me === refusing
        ? e instanceof SwitchyardError && e.code === "INVALID_ARGUMENT" && e.argument === "x"
        : e instanceof SwitchyardTimeoutError && e.code === "PEER_FAILED" && e.peerRank === refusing;
      if (!want) throw new Error(`round ${round}: the refused dispatch ended with ${e}`);
      console.log(`rank ${me} saw the refusal of rank ${refusing} after ${ms} ms: ${e.code}`);
    }
    if (round === dieAt) {
      // Die with the peers inside the dispatch's collective.
      await dieIn(
        "dispatch",
        () => buffer.dispatch(up.x, { topkIdx: up.topkIdx, topkWeights: up.topkWeights, numExperts: s.experts }),
      );
    }
    using sent = await buffer.dispatch(up.x, {
      topkIdx: up.topkIdx,
      topkWeights: up.topkWeights,
      numExperts: s.experts,
    });
    if (round === dieAt) await dieIn("combine", () => buffer.combine(sent.recvX, sent.handle));
    using back = await buffer.combine(sent.recvX, sent.handle);
    const got = await back.combinedX.read();
    if (got.length !== want[me].length || got.some((v, i) => v !== want[me][i])) {
      throw new Error(`round ${round}: combine(dispatch(x)) differs from the reference`);
    }
  }
  // A low-latency round trip too.
  {
    const T = 8, K = 2, E = 2 * R, H = 128;
    using x = await Tensor.from(rank, new Uint16Array(T * H).fill(0x3f80), { shape: [T, H] });
    using idx = await Tensor.from(rank, new BigInt64Array(T * K).map((_, i) => BigInt((i + me) % E)), {
      shape: [T, K],
    });
    using w = await Tensor.from(rank, new Float32Array(T * K).fill(0.5), { shape: [T, K] });
    await dieIn("low-latency", () => buffer.lowLatencyDispatch(x, idx, { useFp8: false }));
    const refusing = Number(values["refuse-rank"]);
    if (Number(values["refuse-at"]) >= 0) { // rank R's low-latency dispatch is refused as well
      using bad = await Tensor.from(rank, new Float32Array(T * H), { shape: [T, H] });
      const t0 = performance.now();
      const e = await buffer.lowLatencyDispatch(me === refusing ? bad : x, idx, { useFp8: false }).then(
        async (d) => {
          using _ = d;
          await d.recvCount.read();
        },
        (err) => err,
      ).catch((err) => err);
      const ms = Math.round(performance.now() - t0);
      const want = me === refusing
        ? e instanceof SwitchyardError && e.code === "INVALID_ARGUMENT" && e.argument === "x"
        : e instanceof SwitchyardError && e.code === "PEER_FAILED" && /rank \d+ rejected its input/.test(e.message);
      if (!want) throw new Error(`the refused low-latency dispatch ended with ${e}`);
      console.log(`rank ${me} saw the low-latency refusal of rank ${refusing} after ${ms} ms: ${e.code}`);
    }
    using sent = await buffer.lowLatencyDispatch(x, idx, { useFp8: false });
    using back = await buffer.lowLatencyCombine(sent.recvX, idx, w, sent.handle);
    const got = await back.combinedX.readFloat32();
    if (got.some((v) => v !== 1)) throw new Error("low-latency round trip: expected 1.0 * (0.5 + 0.5) everywhere");
  }
  await group.barrier("done");
  console.log(`rank ${me} ok`);
} catch (e) {
  const ms = (performance.now() - started).toFixed(0);
  if (e instanceof SwitchyardTimeoutError) {
    console.log(`rank ${me} failed after ${ms} ms: ${e.code} peerRank=${e.peerRank}: ${e.message}`);
  } else {
    console.log(`rank ${me} failed after ${ms} ms: ${e}`);
  }
  Deno.exit(3);
}
