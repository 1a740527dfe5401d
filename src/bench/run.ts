/**
 * Runs one benchmark scenario on a group and records what happened: every rank's time per
 * operation and iteration from the library's own events (the GPU's clock on CUDA), the wall
 * time around each collective call, the bytes it moved and the tokens each rank and expert got.
 *
 * @module
 */

import type { EpBuffer } from "../buffer.ts";
import { toBF16, toFP8E4M3 } from "../dtype.ts";
import { SwitchyardError } from "../errors.ts";
import type { Event } from "../event.ts";
import type { Group } from "../group.ts";
import type { Rank } from "../rank.ts";
import { Tensor } from "../tensor.ts";
import { randomFloats } from "../workload.ts";
import { routeTokens, type Scenario } from "./scenario.ts";

/** The operations a scenario measures. */
export type OperationName =
  | "dispatch (exact)"
  | "dispatch (worst-case)"
  | "dispatch (cached)"
  | "combine"
  | "combine (hierarchical)"
  | "dispatch (exact, direct)"
  | "combine (direct)"
  | "low-latency dispatch"
  | "low-latency combine"
  | "low-latency dispatch (hook)"
  | "low-latency combine (hook)";

/** One operation's measurements. */
export interface OperationTimes {
  /** What ran. */
  readonly op: OperationName;
  /** Per rank, per measured iteration: milliseconds between events recorded on the rank's stream
   * before the call and after it (for hook variants, after `hook.run()`). */
  readonly rankMs: number[][];
  /** Hook variants: per rank and iteration, the part before `hook.run()` (the send). */
  readonly sendMs?: number[][];
  /** Per measured iteration: JS wall time from the first rank's call to the last rank's end. */
  readonly wallMs: number[];
  /** Payload bytes each rank received per call, as DeepEP counts them (rows x row bytes, scales included). */
  readonly rankBytes: number[];
}

/** What a scenario run measured. */
export interface ScenarioRun {
  /** The scenario as it ran. */
  readonly scenario: Scenario;
  /** Warm-up iterations (not measured). */
  readonly warmup: number;
  /** Measured iterations. */
  readonly iterations: number;
  /** Rows each rank receives per dispatch (tokens in normal mode; token-expert pairs in low-latency mode). */
  readonly receivedPerRank: number[];
  /** `[source rank][expert]`: tokens each rank sends to each expert (its layout's counts). */
  readonly sentPerRankExpert: number[][];
  /** Tokens each expert receives per dispatch (summed over sources). */
  readonly receivedPerExpert: number[];
  /** The measured operations. */
  readonly operations: OperationTimes[];
  /** Low-latency mode: `[rank][source]` nanoseconds each rank waited for each source, summed over all dispatch calls. */
  readonly dispatchWaitNs?: number[][];
  /**
   * Normal mode across nodes: what one call of each operation put on the network, per rank
   * (`buffer.networkStats()` around it), and what the layouts say one dispatch puts there.
   */
  readonly network?: NetworkUse;
}

/** What crossed the (emulated) network in a run across nodes. */
export interface NetworkUse {
  /**
   * Per operation that ran: records, bytes and the puts that carried them (a NIC's work requests)
   * one call put on the network, per rank.
   */
  readonly perOperation: readonly {
    readonly op: OperationName;
    readonly recordsPerRank: number[];
    readonly bytesPerRank: number[];
    readonly putsPerRank: number[];
  }[];
  /**
   * From the layouts, what one dispatch puts on the network per rank: in two hops a record per
   * (token, other node), directly one per (token, rank of another node).
   */
  readonly expectedDispatchRecordsPerRank: { readonly twoHop: number[]; readonly direct: number[] };
}

/** Options of {@linkcode runScenario}. */
export interface RunOptions {
  /** Measured iterations (default 10). */
  readonly iterations?: number;
  /** Unmeasured iterations first (default 2). */
  readonly warmup?: number;
  /** Seed of the payload and the routing (default 1). */
  readonly seed?: number;
  /**
   * Normal mode: dispatch variants to run (default all three); combine always runs. Across nodes
   * the direct path (exact dispatch, combine) runs too, on a second set of buffers (what the two
   * hops save) on the host backend, and the hierarchical combine wherever combine takes two hops
   * (not between CUDA-backend processes).
   */
  readonly variants?: readonly ("exact" | "worst-case" | "cached")[];
  /** Low-latency mode: also run the receive-hook variant (default true). */
  readonly hook?: boolean;
  /** Called after each iteration (for a progress bar). */
  readonly onIteration?: (done: number, total: number) => void;
}

/** Payload bytes of one received row: BF16, or FP8 with one f32 scale per 128 channels. */
export function rowBytes(payload: "bf16" | "fp8", hidden: number): number {
  return payload === "bf16" ? 2 * hidden : hidden + 4 * Math.ceil(hidden / 128);
}

// Milliseconds between two events of one rank, once the later one has completed.
async function between(start: Event, end: Event): Promise<number> {
  await end.synchronize();
  const ms = start.elapsedMs(end);
  if (ms === undefined) throw new SwitchyardError("INTERNAL", "an event completed but has no time");
  return ms;
}

// Runs `call` on every rank; if any rank's call fails, the others' results are released and the
// first failure is thrown.
async function onEveryRank<T extends Disposable>(group: Group, call: (r: number) => Promise<T>): Promise<T[]> {
  const settled = await Promise.allSettled(group.ranks.map((_, r) => call(r)));
  const failed = settled.find((s) => s.status === "rejected");
  if (!failed) return settled.map((s) => (s as PromiseFulfilledResult<T>).value);
  for (const s of settled) if (s.status === "fulfilled") s.value[Symbol.dispose]();
  throw (failed as PromiseRejectedResult).reason;
}

function newTimes(op: OperationName, ranks: number, hook = false): OperationTimes {
  return {
    op,
    rankMs: Array.from({ length: ranks }, () => []),
    sendMs: hook ? Array.from({ length: ranks }, () => []) : undefined,
    wallMs: [],
    rankBytes: new Array(ranks).fill(0),
  };
}

function push(times: OperationTimes, rankMs: number[], wallMs: number, sendMs?: number[]): void {
  rankMs.forEach((ms, r) => times.rankMs[r].push(ms));
  if (sendMs) sendMs.forEach((ms, r) => times.sendMs![r].push(ms));
  times.wallMs.push(wallMs);
}

/**
 * Times one collective call on every rank: events on the rank's stream right before its call and
 * right after it returns (each rank its own, so a fast rank is not charged for a slow one).
 * Returns each rank's results and milliseconds between its events (the GPU's clock on the CUDA
 * backend), and the wall time of the whole.
 */
export async function timeOnEveryRank<T extends Disposable>(
  group: Group,
  call: (r: number) => Promise<T>,
): Promise<{ out: T[]; ms: number[]; wall: number }> {
  const events: Event[] = [];
  try {
    const t0 = performance.now();
    const marks: [Event, Event][] = [];
    const out = await onEveryRank(group, async (r) => {
      const stream = group.ranks[r].stream;
      const start = stream.record();
      events.push(start);
      const res = await call(r);
      const end = stream.record();
      events.push(end);
      marks[r] = [start, end];
      return res;
    });
    const ms = await Promise.all(marks.map(([start, end]) => between(start, end)));
    return { out, ms, wall: performance.now() - t0 };
  } finally {
    for (const e of events) e[Symbol.dispose]();
  }
}

interface Inputs {
  readonly x: Tensor;
  readonly xScales?: Tensor;
  readonly xBf16: Tensor;
  readonly topkIdx: Tensor;
  readonly topkWeights: Tensor;
}

async function makeInputs(s: Scenario, rank: Rank, r: number, seed: number): Promise<Inputs> {
  const routing = routeTokens(s, r, seed);
  const values = randomFloats(s.tokens * s.hidden, seed * 7919 + r);
  const xBf16 = await Tensor.from(rank, toBF16(values), { shape: [s.tokens, s.hidden] });
  let x: Tensor = xBf16, xScales: Tensor | undefined;
  if (s.payload === "fp8" && s.mode === "normal") {
    // Pre-quantised input, as DeepEP's normal mode takes it: values scaled into E4M3's range
    // per 128 channels, with the inverse scales.
    const blocks = Math.ceil(s.hidden / 128);
    const scales = new Float32Array(s.tokens * blocks);
    const scaled = new Float32Array(values.length);
    for (let t = 0; t < s.tokens; t++) {
      for (let b = 0; b < blocks; b++) {
        let amax = 1e-4;
        const from = t * s.hidden + b * 128, to = Math.min(from + 128, (t + 1) * s.hidden);
        for (let i = from; i < to; i++) amax = Math.max(amax, Math.abs(values[i]));
        for (let i = from; i < to; i++) scaled[i] = values[i] * (448 / amax);
        scales[t * blocks + b] = amax / 448;
      }
    }
    x = await Tensor.from(rank, toFP8E4M3(scaled), { dtype: "fp8_e4m3", shape: [s.tokens, s.hidden] });
    xScales = await Tensor.from(rank, scales, { shape: [s.tokens, blocks] });
  }
  return {
    x,
    xScales,
    xBf16,
    topkIdx: await Tensor.from(rank, routing.topkIdx, { shape: [s.tokens, s.topk] }),
    topkWeights: await Tensor.from(rank, routing.topkWeights, { shape: [s.tokens, s.topk] }),
  };
}

function release(inputs: (Inputs | undefined)[]): void {
  for (const i of inputs) {
    if (!i) continue;
    for (const t of new Set([i.x, i.xScales, i.xBf16, i.topkIdx, i.topkWeights])) t?.[Symbol.dispose]();
  }
}

/**
 * Runs scenario `s` on `group` (whose size must be `s.ranks`): buffers sized for it, seeded
 * inputs, `warmup` + `iterations` rounds of every operation, each timed on every rank.
 */
export async function runScenario(group: Group, s: Scenario, options: RunOptions = {}): Promise<ScenarioRun> {
  if (group.size !== s.ranks) {
    throw new SwitchyardError("INVALID_ARGUMENT", `group: ${group.size} ranks, scenario ${s.name} needs ${s.ranks}`);
  }
  const iterations = options.iterations ?? 10, warmup = options.warmup ?? 2, seed = options.seed ?? 1;
  const buffers = await group.createBuffers({
    hidden: s.hidden,
    maxTokensPerRank: s.tokens,
    lowLatency: s.mode === "low-latency" ? { numExperts: s.experts } : undefined,
  });
  const acrossNodes = s.mode === "normal" && group.ranks[0].ranksPerNode < group.size;
  const inputs: Inputs[] = [];
  let direct: EpBuffer[] | undefined;
  try {
    // The direct path crosses the emulated NIC on the host backend only (the CUDA backend pulls
    // across nodes in one hop there): the baseline runs where it means something.
    if (acrossNodes && group.backend === "host") {
      direct = await group.createBuffers({ hidden: s.hidden, maxTokensPerRank: s.tokens, internodePath: "direct" });
    }
    await group.all(async (rank, r) => (inputs[r] = await makeInputs(s, rank, r, seed)));
    // Who sends what where, from each rank's own layout.
    const layouts = await group.all(async (rank, r) => {
      using layout = await buffers[r].layout(inputs[r].topkIdx, { numExperts: s.experts });
      const perNode = Array.from(await layout.numTokensPerNode.read());
      const perRank = Array.from(await layout.numTokensPerRank.read());
      return {
        perExpert: Array.from(await layout.numTokensPerExpert.read()),
        otherNodes: perNode.reduce((a, n, node) => a + (node === rank.node ? 0 : n), 0),
        otherNodeRanks: perRank.reduce((a, n, d) => a + (Math.floor(d / rank.ranksPerNode) === rank.node ? 0 : n), 0),
      };
    });
    const sentPerRankExpert = layouts.map((l) => l.perExpert);
    const receivedPerExpert = new Array(s.experts).fill(0);
    for (const row of sentPerRankExpert) row.forEach((n, e) => (receivedPerExpert[e] += n));
    const setup: Setup = { group, s, buffers, direct, acrossNodes, inputs, iterations, warmup, options };
    const run = s.mode === "normal" ? await runNormal(setup) : await runLowLatency(setup);
    const network: NetworkUse | undefined = run.network && {
      perOperation: run.network,
      expectedDispatchRecordsPerRank: {
        twoHop: layouts.map((l) => l.otherNodes),
        direct: layouts.map((l) => l.otherNodeRanks),
      },
    };
    return { scenario: s, warmup, iterations, sentPerRankExpert, receivedPerExpert, ...run, network };
  } finally {
    release(inputs);
    for (const b of [...buffers, ...direct ?? []]) b[Symbol.dispose]();
  }
}

type Measured = Pick<ScenarioRun, "receivedPerRank" | "operations" | "dispatchWaitNs"> & {
  network?: NetworkUse["perOperation"][number][];
};

// What one mode's run works with: the group, the scenario, its buffers and inputs, the rounds.
interface Setup {
  readonly group: Group;
  readonly s: Scenario;
  readonly buffers: EpBuffer[];
  /** Across nodes, normal mode, host backend: buffers on the direct path, the baseline. */
  readonly direct?: EpBuffer[];
  /** Normal mode across nodes: what each operation puts on the network is counted. */
  readonly acrossNodes: boolean;
  readonly inputs: Inputs[];
  readonly iterations: number;
  readonly warmup: number;
  readonly options: RunOptions;
}

async function runNormal(
  { group, s, buffers, direct, acrossNodes, inputs, iterations, warmup, options }: Setup,
): Promise<Measured> {
  const R = s.ranks;
  const variants = options.variants ?? ["exact", "worst-case", "cached"];
  const routed = (r: number) => ({
    topkIdx: inputs[r].topkIdx,
    topkWeights: inputs[r].topkWeights,
    numExperts: s.experts,
  });
  const payload = (r: number) => ({ xScales: inputs[r].xScales });
  // The routing every variant reuses: one exact-size dispatch, kept for cached mode and combine
  // (and one on the direct path, for its combine).
  const first = await onEveryRank(group, (r) => buffers[r].dispatch(inputs[r].x, { ...payload(r), ...routed(r) }));
  const firstDirect = direct &&
    await onEveryRank(group, (r) => direct[r].dispatch(inputs[r].x, { ...payload(r), ...routed(r) }));
  // Over before anything is counted or timed (a CUDA dispatch returns before its network hop ends).
  await group.all((rank) => rank.stream.synchronize());
  const receivedPerRank = first.map((d) => d.numRecvTokens ?? 0);
  // Combine sends BF16 expert outputs back: the received rows themselves when they are BF16
  // (the direct path receives the same rows, so it sends the same tensors back).
  const combineInput: Tensor[] = [];
  const ops = new Map<OperationName, OperationTimes>();
  const network = new Map<OperationName, NetworkUse["perOperation"][number]>();
  // Times one collective on every rank; the first time, across nodes, also counts what it put
  // on the network (the operation is over once its end event is).
  const measure = async <T extends Disposable>(
    op: OperationName,
    on: EpBuffer[],
    it: number,
    call: (r: number) => Promise<T>,
  ) => {
    const before = acrossNodes && !network.has(op) ? on.map((b) => b.networkStats()) : undefined;
    const { out, ms, wall } = await timeOnEveryRank(group, call);
    for (const o of out) o[Symbol.dispose]();
    if (before) {
      const after = on.map((b) => b.networkStats());
      network.set(op, {
        op,
        recordsPerRank: after.map((a, r) => a.records - before[r].records),
        bytesPerRank: after.map((a, r) => a.bytes - before[r].bytes),
        putsPerRank: after.map((a, r) => a.puts - before[r].puts),
      });
    }
    if (it < warmup) return;
    if (!ops.has(op)) ops.set(op, newTimes(op, R));
    push(ops.get(op)!, ms, wall);
  };
  try {
    for (const [r, d] of first.entries()) {
      combineInput.push(
        s.payload === "bf16"
          ? d.recvX
          : Tensor.empty(group.ranks[r], { dtype: "bf16", shape: [Math.max(d.numRows, 1), s.hidden] }),
      );
    }
    for (let it = 0; it < warmup + iterations; it++) {
      for (const v of variants) {
        await measure(`dispatch (${v})`, buffers, it, (r) =>
          buffers[r].dispatch(inputs[r].x, {
            ...payload(r),
            ...(v === "cached" ? { handle: first[r].handle } : routed(r)),
            ...(v === "worst-case" ? { numWorstTokens: R * s.tokens } : {}),
          }));
      }
      await measure("combine", buffers, it, (r) => buffers[r].combine(combineInput[r], first[r].handle));
      if (acrossNodes) { // two hops: combine can reduce hierarchically too
        await measure(
          "combine (hierarchical)",
          buffers,
          it,
          (r) => buffers[r].combine(combineInput[r], first[r].handle, { internodeReduction: "hierarchical" }),
        );
      }
      if (direct && firstDirect) {
        await measure(
          "dispatch (exact, direct)",
          direct,
          it,
          (r) => direct[r].dispatch(inputs[r].x, { ...payload(r), ...routed(r) }),
        );
        await measure("combine (direct)", direct, it, (r) => direct[r].combine(combineInput[r], firstDirect[r].handle));
      }
      options.onIteration?.(it + 1, warmup + iterations);
    }
  } finally {
    if (s.payload !== "bf16") { for (const t of combineInput) t[Symbol.dispose](); }
    for (const d of [...first, ...firstDirect ?? []]) d[Symbol.dispose]();
  }
  const dispatchBytes = receivedPerRank.map((n) => n * rowBytes(s.payload, s.hidden));
  const combineBytes = receivedPerRank.map((n) => n * rowBytes("bf16", s.hidden));
  const operations = [...ops.values()].map((o) => ({
    ...o,
    rankBytes: o.op.startsWith("combine") ? combineBytes : dispatchBytes,
  }));
  return { receivedPerRank, operations, network: acrossNodes ? [...network.values()] : undefined };
}

async function runLowLatency({ group, s, buffers, inputs, iterations, warmup, options }: Setup): Promise<Measured> {
  const R = s.ranks, useFp8 = s.payload === "fp8";
  const hook = options.hook ?? true;
  // BF16 rows in the dispatch's layout, as the experts' outputs that combine sends back.
  const expertOut = await onEveryRank(
    group,
    (r) => buffers[r].lowLatencyDispatch(inputs[r].xBf16, inputs[r].topkIdx, { useFp8: false }),
  );
  const waitStats: Tensor[] = [];
  const names: OperationName[] = ["low-latency dispatch", "low-latency combine"];
  if (hook) names.push("low-latency dispatch (hook)", "low-latency combine (hook)");
  const ops = new Map(names.map((n) => [n, newTimes(n, R, n.endsWith("(hook)"))]));
  try {
    const receivedPerRank = await group.all(async (_, r) =>
      Array.from(await expertOut[r].recvCount.read()).reduce((a, b) => a + b, 0)
    );
    await group.all(async (rank, r) => (waitStats[r] = await Tensor.from(rank, new BigInt64Array(R), { shape: [R] })));
    for (let it = 0; it < warmup + iterations; it++) {
      const measured = it >= warmup;
      const d = await timeOnEveryRank(group, (r) =>
        buffers[r].lowLatencyDispatch(inputs[r].x, inputs[r].topkIdx, {
          useFp8,
          dispatchWaitRecvCostStats: measured ? waitStats[r] : undefined,
        }));
      const c = await timeOnEveryRank(
        group,
        (r) =>
          buffers[r].lowLatencyCombine(expertOut[r].recvX, inputs[r].topkIdx, inputs[r].topkWeights, d.out[r].handle),
      );
      if (measured) {
        push(ops.get("low-latency dispatch")!, d.ms, d.wall);
        push(ops.get("low-latency combine")!, c.ms, c.wall);
      }
      for (const x of [...c.out, ...d.out]) x[Symbol.dispose]();
      if (hook) {
        // Send, then receive when the hook runs: the part in between is free for compute.
        const dh = await hooked(
          group,
          (r) => buffers[r].lowLatencyDispatch(inputs[r].x, inputs[r].topkIdx, { useFp8, returnRecvHook: true }),
        );
        const ch = await hooked(
          group,
          (r) =>
            buffers[r].lowLatencyCombine(
              expertOut[r].recvX,
              inputs[r].topkIdx,
              inputs[r].topkWeights,
              dh.out[r].handle,
              {
                returnRecvHook: true,
              },
            ),
        );
        if (measured) {
          push(ops.get("low-latency dispatch (hook)")!, dh.ms, dh.wall, dh.sendMs);
          push(ops.get("low-latency combine (hook)")!, ch.ms, ch.wall, ch.sendMs);
        }
        for (const x of [...ch.out, ...dh.out]) x[Symbol.dispose]();
      }
      options.onIteration?.(it + 1, warmup + iterations);
    }
    const dispatchWaitNs = await group.all(async (_, r) => Array.from(await waitStats[r].read(), Number));
    const dispatchBytes = receivedPerRank.map((n) => n * rowBytes(s.payload, s.hidden));
    const combineBytes = receivedPerRank.map((n) => n * rowBytes("bf16", s.hidden));
    const operations = [...ops.values()].map((o) => ({
      ...o,
      rankBytes: o.op.includes("combine") ? combineBytes : dispatchBytes,
    }));
    return { receivedPerRank, operations, dispatchWaitNs };
  } finally {
    for (const t of waitStats) t?.[Symbol.dispose]();
    for (const e of expertOut) e[Symbol.dispose]();
  }
}

// A low-latency call with a receive hook: events on each rank's stream before the call, after it
// (the send), and after `hook.run()` (the receive).
async function hooked<T extends Disposable & { readonly hook?: { run(): void } }>(
  group: Group,
  call: (r: number) => Promise<T>,
): Promise<{ out: T[]; ms: number[]; sendMs: number[]; wall: number }> {
  const events: Event[] = [];
  try {
    const t0 = performance.now();
    const marks: Event[][] = [];
    const out = await onEveryRank(group, async (r) => {
      const stream = group.ranks[r].stream;
      const mark = () => {
        const e = stream.record();
        events.push(e);
        return e;
      };
      const start = mark();
      const res = await call(r);
      const sent = mark();
      res.hook!.run();
      marks[r] = [start, sent, mark()];
      return res;
    });
    const sendMs = await Promise.all(marks.map(([start, sent]) => between(start, sent)));
    const ms = await Promise.all(marks.map(([start, , done]) => between(start, done)));
    return { out, ms, sendMs, wall: performance.now() - t0 };
  } finally {
    for (const e of events) e[Symbol.dispose]();
  }
}
