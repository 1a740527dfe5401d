/**
 * The benchmark's report: a schema-versioned JSON document (machine, backend, versions, and per
 * scenario and operation the per-rank times, percentiles, spread across ranks, bytes, GB/s and
 * received tokens with imbalance) and the terminal table printed from it.
 *
 * @module
 */

import { imbalance, spread, summarize, type Summary } from "../stats.ts";
import type { NetworkUse, OperationTimes, ScenarioRun } from "./run.ts";
import { routingName, type Scenario } from "./scenario.ts";

/** Version of the JSON layout below; bumped on any incompatible change. */
export const REPORT_SCHEMA = 2;

/** Where the numbers came from. */
export interface MachineInfo {
  /** `Deno.build.target`, OS release, CPU model and count, memory. */
  readonly os: string;
  readonly cpu: string;
  readonly cores: number;
  readonly memoryBytes: number;
  /** `host`, or `cuda` with the device's name (and whether it was executed on the CPU). */
  readonly backend: string;
  readonly device?: string;
  readonly executedOnCpu?: boolean;
  /** Library, binding and Deno versions. */
  readonly libraryVersion: string;
  readonly deno: string;
}

/** One operation of one scenario, summarized. */
export interface OperationReport {
  readonly op: string;
  /** Per iteration, the slowest rank's time (a collective ends with its slowest rank), in ms. */
  readonly collectiveMs: Summary;
  /** Per rank: its times over the iterations, in ms. */
  readonly rankMs: Summary[];
  /** Hook variants: per rank, the send part (before `hook.run()`), in ms. */
  readonly sendMs?: Summary[];
  /** max / median of the ranks' median times: the straggler cost. */
  readonly rankSpread: number;
  /** JS wall time around the collective call, per iteration, in ms. */
  readonly wallMs: Summary;
  /** Payload bytes each rank received per call, as DeepEP counts them. */
  readonly rankBytes: number[];
  /** Bytes each rank's call read and wrote at least: every received byte read once and written once. */
  readonly rankReadWriteBytes: number[];
  /** Median over ranks of bytes / median time, in GB/s (1e9 bytes per second), DeepEP's way. */
  readonly gbPerSecond: number;
  /** The same counted as read + written bytes. */
  readonly readWriteGbPerSecond: number;
  /** Raw per-rank, per-iteration times, for plots and your own statistics. */
  readonly samplesMs: number[][];
}

/** One scenario's report. */
export interface ScenarioReport {
  readonly scenario: Scenario & { readonly routingName: string };
  readonly scaledDown?: string;
  readonly warmup: number;
  readonly iterations: number;
  readonly received: {
    readonly perRank: number[];
    readonly perRankImbalance: number;
    readonly perExpert: number[];
    readonly perExpertImbalance: number;
    /** `[source rank][expert]`. */
    readonly sentPerRankExpert: number[][];
  };
  readonly operations: OperationReport[];
  /** Low-latency mode: `[rank][source]` mean microseconds waited per dispatch call. */
  readonly dispatchWaitUsPerCall?: number[][];
  /** Normal mode across nodes: what one call of each operation put on the network, per rank, and what the layouts expect. */
  readonly network?: ScenarioRun["network"];
}

/** The whole document. */
export interface BenchReport {
  readonly schema: typeof REPORT_SCHEMA;
  readonly createdAt: string;
  readonly machine: MachineInfo;
  readonly scenarios: ScenarioReport[];
  /** Optional sweeps for the plots: bandwidth vs tokens per rank, time vs ranks. */
  readonly sweeps?: {
    readonly tokens?: SweepPoint[];
    readonly ranks?: SweepPoint[];
  };
}

/** One point of a sweep: a scenario variant's summarized dispatch and combine. */
export interface SweepPoint {
  readonly ranks: number;
  readonly tokens: number;
  readonly op: string;
  readonly medianMs: number;
  readonly gbPerSecond: number;
}

const median = (xs: number[]) => summarize(xs).median;

/** Summarizes one operation's measurements. */
export function summarizeOperation(o: OperationTimes): OperationReport {
  const ranks = o.rankMs.length, iterations = o.rankMs[0].length;
  const collective = Array.from({ length: iterations }, (_, i) => Math.max(...o.rankMs.map((row) => row[i])));
  const rankMs = o.rankMs.map((row) => summarize(row));
  const rankMedians = rankMs.map((s) => s.median);
  const gb = (bytes: number[]) => median(bytes.map((b, r) => b / (rankMedians[r] * 1e6)));
  const rw = o.rankBytes.map((b) => 2 * b);
  return {
    op: o.op,
    collectiveMs: summarize(collective),
    rankMs,
    sendMs: o.sendMs?.map((row) => summarize(row)),
    rankSpread: spread(rankMedians),
    wallMs: summarize(o.wallMs),
    rankBytes: [...o.rankBytes],
    rankReadWriteBytes: rw,
    gbPerSecond: ranks ? gb(o.rankBytes) : 0,
    readWriteGbPerSecond: ranks ? gb(rw) : 0,
    samplesMs: o.rankMs.map((row) => [...row]),
  };
}

/** Summarizes one scenario run. */
export function scenarioReport(run: ScenarioRun, scaledDown?: string): ScenarioReport {
  return {
    scenario: { ...run.scenario, routingName: routingName(run.scenario.routing) },
    scaledDown,
    warmup: run.warmup,
    iterations: run.iterations,
    received: {
      perRank: run.receivedPerRank,
      perRankImbalance: imbalance(run.receivedPerRank),
      perExpert: run.receivedPerExpert,
      perExpertImbalance: imbalance(run.receivedPerExpert),
      sentPerRankExpert: run.sentPerRankExpert,
    },
    operations: run.operations.map(summarizeOperation),
    dispatchWaitUsPerCall: run.dispatchWaitNs?.map((row) => row.map((ns) => ns / 1000 / run.iterations)),
    network: run.network,
  };
}

const pad = (s: string, n: number, right = false) => right ? s.padStart(n) : s.padEnd(n);
const fmt = (ms: number) => ms >= 100 ? ms.toFixed(0) : ms >= 10 ? ms.toFixed(1) : ms.toFixed(2);

const total = (xs: readonly number[]) => xs.reduce((a, b) => a + b, 0);

// What crossed the network per call, and what the two hops save against the direct path.
function networkLines(n: NetworkUse): string[] {
  const lines = [
    "  on the network per call (records per rank; the most bytes one rank sent; puts that carried the records, all ranks):",
  ];
  for (const o of n.perOperation) {
    const mib = (Math.max(...o.bytesPerRank) / 2 ** 20).toFixed(2);
    lines.push(`    ${pad(o.op, 26)} ${o.recordsPerRank.join(" ")}; ${mib} MiB; ${total(o.putsPerRank ?? [])} puts`);
  }
  const bytes = (op: string) => total(n.perOperation.find((o) => o.op === op)?.bytesPerRank ?? []);
  const ratio = (a: number, b: number) => b > 0 ? `${(a / b).toFixed(2)}x` : "n/a";
  const e = n.expectedDispatchRecordsPerRank;
  if (!n.perOperation.some((o) => o.op.endsWith("direct)"))) return lines; // no baseline ran (the CUDA backend)
  lines.push(
    `  the direct path puts ${ratio(bytes("dispatch (exact, direct)"), bytes("dispatch (exact)"))} the two hops' ` +
      `dispatch bytes on the network (the layouts: ${ratio(total(e.direct), total(e.twoHop))} the records), ` +
      `${ratio(bytes("combine (direct)"), bytes("combine"))} the chain's combine bytes, ` +
      `${ratio(bytes("combine (direct)"), bytes("combine (hierarchical)"))} the hierarchical combine's`,
  );
  return lines;
}

/** The report as a terminal table: one block per scenario, one row per operation. */
export function formatTable(report: BenchReport): string {
  const m = report.machine;
  const lines = [
    `switchyard ${m.libraryVersion} on ${m.backend}${m.device ? ` (${m.device})` : ""}, ${m.cores} cores, ` +
    `${m.cpu}, Deno ${m.deno}`,
  ];
  if (m.executedOnCpu) lines.push("CUDA backend executed on the CPU: these times say nothing about a GPU");
  for (const s of report.scenarios) {
    const sc = s.scenario;
    lines.push(
      "",
      `${sc.name}: ${sc.ranks} ranks x ${sc.tokens} tokens, hidden ${sc.hidden}, top-${sc.topk} of ${sc.experts}, ` +
        `${sc.payload}, routing ${sc.routingName}; ${s.iterations} iterations after ${s.warmup} warm-up`,
    );
    if (sc.ranksPerNode && sc.ranksPerNode < sc.ranks) {
      const nic = sc.emulatedNic
        ? `emulated NIC ${sc.emulatedNic.gbPerSecond} GB/s, ${sc.emulatedNic.latencyUs} us`
        : "emulated NIC at memory speed";
      lines.push(`  ${sc.ranks / sc.ranksPerNode} nodes of ${sc.ranksPerNode}: two hops, ${nic}`);
    }
    if (s.network) lines.push(...networkLines(s.network));
    if (s.scaledDown) lines.push(`  scaled down: ${s.scaledDown}`);
    lines.push(
      `  received per rank: ${s.received.perRank.join(" ")} (imbalance ${s.received.perRankImbalance.toFixed(2)}); ` +
        `per expert max/mean ${s.received.perExpertImbalance.toFixed(2)}`,
    );
    const head = ["operation", "median", "p90", "p99", "max", "rank spread", "GB/s", "GB/s r+w"];
    const widths = [30, 9, 9, 9, 9, 12, 8, 9];
    lines.push("  " + head.map((h, i) => pad(h, widths[i], i > 0)).join(" ") + "   (ms: slowest rank per iteration)");
    for (const o of s.operations) {
      const c = o.collectiveMs;
      const row = [
        o.op,
        fmt(c.median),
        fmt(c.p90),
        fmt(c.p99),
        fmt(c.max),
        o.rankSpread.toFixed(2),
        o.gbPerSecond.toFixed(2),
        o.readWriteGbPerSecond.toFixed(2),
      ];
      lines.push("  " + row.map((v, i) => pad(v, widths[i], i > 0)).join(" "));
      if (o.sendMs) {
        const send = median(o.sendMs.map((x) => x.median));
        lines.push(`  ${pad("", widths[0])} send ${fmt(send)} ms of it (median rank); the rest after hook.run()`);
      }
    }
    if (s.dispatchWaitUsPerCall) {
      const perSource = s.dispatchWaitUsPerCall[0].map((_, src) =>
        median(s.dispatchWaitUsPerCall!.map((row) => row[src]))
      );
      const worst = perSource.indexOf(Math.max(...perSource));
      lines.push(
        `  waited per dispatch for each source (median over receivers, us): ${
          perSource.map((v) => v.toFixed(0)).join(" ")
        }` +
          `; longest for rank ${worst}`,
      );
    }
  }
  return lines.join("\n");
}
