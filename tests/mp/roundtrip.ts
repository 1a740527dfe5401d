/**
 * One rank of a multi-process test (run through the launcher): meets the others with
 * Group.fromEnv, dispatches and combines, and checks the round trip against the reference.
 * Arguments: [rounds] [--die-at ROUND --die-rank R [--die-phase PHASE] [--die-delay MS]]
 * [--refuse-at ROUND --refuse-rank R] [--timeout MS] [--join-timeout MS (default: --timeout)]
 * [--backend host|cuda] [--nic-latency-ms MS] [--network-ring N (entries of each network ring
 * across nodes; 0: the default)]. Both backends run the low-latency parts too.
 * Rounds cycle through three variants, each checked bit for bit against the reference
 * (tests/reference.ts): BF16 rows with a padded stride into worst-case sized outputs (compact;
 * received rows, top-k and weights; combine of order-sensitive rows with the top-k weights summed
 * back); FP8 with packed UE8M0 scales stored column-major; the expanded layout (alignment 4, zero
 * padding) whose combine reduces each token's rows first, then a cached dispatch with its handle.
 * With --refuse-at, rank R passes an f32 x to round ROUND's first dispatch and to the first
 * low-latency dispatch: each must be refused there (INVALID_ARGUMENT naming x) and fail on every
 * other rank within milliseconds (PEER_FAILED naming R); then the call runs normally everywhere.
 * Rank R kills itself (SIGKILL) `MS` milliseconds into PHASE: `join` (before meeting the
 * others), `buffers` (before creating the buffers), `dispatch` or `combine` (inside that
 * collective of round ROUND), `low-latency` (inside the low-latency dispatch).
 */

import { parseArgs } from "node:util";
import { Group, SwitchyardError, SwitchyardTimeoutError, Tensor, toBF16 } from "../../mod.ts";
import { bytesOf, generate, orderSensitiveBF16, type Scenario, upload } from "../helpers.ts";
import {
  reduceExpanded,
  referenceCombine,
  referenceCombineWeights,
  referenceDispatch,
  referenceExpanded,
  referenceHierarchicalCombine,
  referenceLayout,
} from "../reference.ts";

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
    "nic-latency-ms": { type: "string", default: "0" },
    "network-ring": { type: "string", default: "0" },
    "join-timeout": { type: "string" },
    backend: { type: "string", default: "host" },
  },
});
const backend = values.backend === "cuda" ? "cuda" : "host";
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
    backend,
    timeoutMs: Number(values.timeout),
    joinTimeoutMs: Number(values["join-timeout"] ?? values.timeout),
    emulatedNic: { latencyUs: Number(values["nic-latency-ms"]) * 1000 },
  });
  const R = group.size;
  await dieIn("buffers");
  const [buffer] = await group.createBuffers({
    hidden: 128,
    maxTokensPerRank: 40,
    lowLatency: { numExperts: 2 * R },
    networkRingEntries: Number(values["network-ring"]) || undefined,
  });
  const rank = group.ranks[0];
  console.log(`joined as rank ${me} of ${R} on the ${backend} backend`);
  console.log(`rank ${me} is on node ${rank.node} of ${R / rank.ranksPerNode}`);
  if (backend === "host" && (group.nccl.enabled || !/host backend/.test(group.nccl.reason ?? ""))) {
    throw new Error("NCCL status unexpected");
  }
  /** Fails the round unless `got` equals `want` element for element. */
  const same = (round: number, what: string, got: ArrayLike<number | bigint>, want: ArrayLike<number | bigint>) => {
    const n = Math.max(got.length, want.length);
    for (let i = 0; i < n; i++) {
      if (got[i] !== want[i]) throw new Error(`round ${round}: ${what} differs at ${i}: ${got[i]} != ${want[i]}`);
    }
  };
  for (let round = 0; round < rounds; round++) {
    const variant = ["bf16", "fp8", "expanded"][round % 3];
    const s: Scenario = {
      ranks: R,
      tokens: Array.from({ length: R }, (_, r) => 20 + ((round * 3 + r * 7) % 17)),
      hidden: 128,
      experts: 4 * R,
      topk: 3,
      seed: 40 + round,
      drop: 0.1,
      paddedRows: variant === "bf16",
      fp8: variant === "fp8",
      ue8m0: variant === "fp8",
      columnMajorScales: variant === "fp8",
    };
    const d = generate(s);
    const expected = referenceDispatch(d.inputs, d.shape);
    const mine = expected[me];
    const alignment = 4;
    const expanded = variant === "expanded" ? referenceExpanded(mine, d.shape, alignment) : undefined;
    // What this rank's experts return: values whose float sum depends on the order (and, in the
    // expanded layout, one row per (token, expert), reduced per token before the ranks' sum).
    const rowsBack = expanded ? expanded.numRows : mine.rows.length;
    const ys = expected.map((e, r) =>
      orderSensitiveBF16((r === me ? rowsBack : e.rows.length) * s.hidden, 700 + 10 * round + r)
    );
    const returned = ys.map((y, r) =>
      r === me && expanded ? reduceExpanded(y, expanded, mine.rows.length, s.topk, s.hidden) : y
    );
    // Every rank computes every rank's returned rows; only the expanded one differs in shape.
    if (variant === "expanded") {
      for (let r = 0; r < R; r++) {
        if (r === me) continue;
        const e = referenceExpanded(expected[r], d.shape, alignment);
        returned[r] = reduceExpanded(
          orderSensitiveBF16(e.numRows * s.hidden, 700 + 10 * round + r),
          e,
          expected[r].rows.length,
          s.topk,
          s.hidden,
        );
      }
    }
    const want = referenceCombine(expected, returned, s.hidden, s.tokens);
    const wantWeights = referenceCombineWeights(expected, expected.map((e) => e.weights), s.topk, s.tokens);
    using up = await upload(rank, s, d, me);
    // Across nodes, the network records this rank's dispatch puts: one per (token, other node it
    // goes to), counted by the emulated NIC (both backends take two hops).
    let wantRecords = 0;
    if (round === 0) {
      // The nodes the launcher numbered shape the layout's per-node counts.
      const ref = referenceLayout(d.inputs[me].topk!, s.tokens[me], s.topk, s.experts, R, rank.ranksPerNode);
      using layout = await buffer.layout(up.topkIdx!, { numExperts: s.experts });
      same(round, "tokens per node", await layout.numTokensPerNode.read(), ref.perNode);
      same(round, "token in node", await layout.isTokenInNode.read(), ref.inNode);
      const nodes = R / rank.ranksPerNode;
      ref.inNode.forEach((v, i) => wantRecords += v !== 0 && i % nodes !== rank.node ? 1 : 0);
    }
    const recordsBefore = buffer.networkStats().records;
    const options = {
      xScales: up.scales,
      topkIdx: up.topkIdx,
      topkWeights: up.topkWeights,
      numExperts: s.experts,
      ...(expanded ? { expand: true, expertAlignment: alignment, zeroPadding: true } : {}),
      ...(variant === "bf16" ? { numWorstTokens: s.tokens.reduce((a, b) => a + b) } : {}),
    };
    if (round === Number(values["refuse-at"])) {
      const refusing = Number(values["refuse-rank"]);
      using bad = await Tensor.from(rank, new Float32Array(up.x.numel), { shape: [...up.x.shape] });
      const t0 = performance.now();
      const e = await buffer.dispatch(me === refusing ? bad : up.x, options).then(
        (d) => (d[Symbol.dispose](), undefined),
        (err) => err,
      );
      const ms = Math.round(performance.now() - t0);
      const want = me === refusing
        ? e instanceof SwitchyardError && e.code === "INVALID_ARGUMENT" && e.argument === "x"
        : e instanceof SwitchyardTimeoutError && e.code === "PEER_FAILED" && e.peerRank === refusing;
      if (!want) throw new Error(`round ${round}: the refused dispatch ended with ${e}`);
      console.log(`rank ${me} saw the refusal of rank ${refusing} after ${ms} ms: ${e.code}`);
    }
    if (round === dieAt) {
      // Die with the peers inside the dispatch's collective.
      await dieIn("dispatch", () => buffer.dispatch(up.x, options));
    }
    using sent = await buffer.dispatch(up.x, options);
    if (round === 0) {
      // The CUDA proxy counts a put once it has arrived, which its sender does not wait for: the
      // count may trail the dispatch by a little (bounded here; too many fails at once).
      await sent.recvX.read();
      const deadline = performance.now() + 5000;
      while (buffer.networkStats().records - recordsBefore < wantRecords && performance.now() < deadline) {
        await new Promise((r) => setTimeout(r, 5));
      }
      same(round, "network records put", [buffer.networkStats().records - recordsBefore], [wantRecords]);
    }
    const rows = mine.rows.length;
    if (expanded) {
      same(
        round,
        "expanded rows",
        bytesOf(await sent.recvX.read()).subarray(0, expanded.numRows * 2 * s.hidden),
        expanded.x,
      );
      // A cached dispatch with the handle: the same rows again.
      using again = await buffer.dispatch(up.x, {
        xScales: up.scales,
        handle: sent.handle,
        expand: true,
        zeroPadding: true,
      });
      same(round, "cached expanded rows", bytesOf(await again.recvX.read()).subarray(0, expanded.x.length), expanded.x);
    } else {
      const rowBytes = d.shape.rowBytes;
      same(round, "received rows", bytesOf(await sent.recvX.read()).subarray(0, rows * rowBytes), mine.x);
      if (sent.recvXScales) {
        const scales = bytesOf(await sent.recvXScales.read()).subarray(0, rows * d.scaleCols * 4);
        same(round, "received scales", scales, bytesOf(mine.scales));
      }
      const entries = rows * s.topk; // worst-case outputs hold more rows than arrived
      same(
        round,
        "received top-k",
        Array.from(await sent.recvTopkIdx!.read(), Number).slice(0, entries),
        mine.topkLocal,
      );
      same(round, "received weights", (await sent.recvTopkWeights!.read()).subarray(0, entries), mine.weights);
    }
    // As many rows as the dispatch's output (worst-case outputs have more than arrived).
    const outRows = sent.recvX.shape[0];
    const yRows = new Uint16Array(outRows * s.hidden);
    yRows.set(ys[me]);
    using y = await Tensor.from(rank, yRows, { shape: [outRows, s.hidden] });
    const combineOptions = expanded ? {} : { topkWeights: sent.recvTopkWeights };
    if (round === dieAt) await dieIn("combine", () => buffer.combine(y, sent.handle, combineOptions));
    using back = await buffer.combine(y, sent.handle, combineOptions);
    same(round, "combine", await back.combinedX.read(), want[me]);
    if (!expanded) same(round, "combined weights", await back.combinedTopkWeights!.read(), wantWeights[me]);
    if (round === 0 && rank.ranksPerNode < R) {
      // The hierarchical reduction (each node's part rounded, then home's sum): its own reference,
      // which differs from the chain's whenever a token's nodes round differently.
      const hier = referenceHierarchicalCombine(
        expected,
        returned,
        expected.map((e) => e.weights),
        s.hidden,
        s.topk,
        s.tokens,
        [],
        rank.ranksPerNode,
      );
      using h = await buffer.combine(y, sent.handle, { ...combineOptions, internodeReduction: "hierarchical" });
      same(round, "hierarchical combine", await h.combinedX.read(), hier.rows[me]);
      same(round, "hierarchical combined weights", await h.combinedTopkWeights!.read(), hier.weights[me]);
      console.log(`rank ${me}: the hierarchical combine ran`);
    }
    console.log(`rank ${me} round ${round} (${variant}) ok`);
  }
  // A low-latency round trip too: every token's row distinct (exact in BF16, and so are its
  // halves), two experts of weight 0.5 each, the expert outputs the received rows: each token
  // must come back as itself, so a row delivered to the wrong token or slot shows.
  {
    const T = 8, K = 2, E = 2 * R, H = 128;
    const rows = new Float32Array(T * H).map((_, i) => (me * 8 + Math.floor(i / H) + 1) * 2 ** (i % 4));
    using x = await Tensor.from(rank, toBF16(rows), { shape: [T, H] });
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
    const wrong = got.findIndex((v, i) => v !== rows[i]);
    if (wrong >= 0) {
      throw new Error(`low-latency round trip: element ${wrong} is ${got[wrong]}, expected ${rows[wrong]}`);
    }
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
