/**
 * `deno task bench` (`switchyard bench`): dispatch and combine under named workloads, timed per
 * rank by the library's own events, with percentiles, the spread across ranks, bandwidth,
 * received tokens and imbalance; writes a schema-versioned JSON report, SVG plots and an
 * index.html, and prints a table.
 *
 * @module
 */

import { cpus } from "node:os";
import { parseArgs } from "node:util";
import { type Backend, backendInfo, Group, libraryVersion } from "../../mod.ts";
import { indexHtml, plotsOf } from "../bench/plots.ts";
import {
  type BenchReport,
  formatTable,
  type MachineInfo,
  REPORT_SCHEMA,
  scenarioReport,
  summarizeOperation,
  type SweepPoint,
} from "../bench/report.ts";
import { runScenario } from "../bench/run.ts";
import {
  DEFAULT_SCENARIOS,
  parseRouting,
  type Scenario,
  scenarioNamed,
  SCENARIOS,
  sizeFor,
} from "../bench/scenario.ts";

const USAGE = `deno task bench [options]

  --scenario a,b     scenarios to run (default ${DEFAULT_SCENARIOS.join(",")}); known:
${SCENARIOS.map((s) => `                       ${s.name}: ${s.about}`).join("\n")}
  --ranks N          override the scenarios' rank count
  --tokens N         override tokens per rank
  --ranks-per-node K virtual nodes of K ranks: two hops across the (emulated) network, next to the
                     hierarchical combine and the direct path (what the two hops save)
  --nic GBPS,US      the emulated NIC between nodes: GB/s per rank, one-way microseconds
  --routing R        uniform, zipf:S, hot:P (expert 0 in a share P of the tokens) or group:G:M
                     (DeepSeek-V3's group-limited routing: M of G expert groups per token)
  --payload P        bf16 or fp8 dispatch payload
  --iterations N     measured iterations (default 10), after --warmup N (default 2)
  --backend B        auto (default: CUDA when a GPU is usable), host or cuda
  --full             run shapes as named even where the machine is small
  --no-sweep         skip the sweeps over tokens per rank and ranks (plots)
  --out DIR          where report.json, the SVG plots and index.html go (default bench/out/report)
  --seed N           payload and routing seed (default 1)
  --quiet            no progress bar`;

const { values: opt } = parseArgs({
  options: {
    scenario: { type: "string" },
    ranks: { type: "string" },
    tokens: { type: "string" },
    "ranks-per-node": { type: "string" },
    nic: { type: "string" },
    routing: { type: "string" },
    payload: { type: "string" },
    iterations: { type: "string", default: "10" },
    warmup: { type: "string", default: "2" },
    backend: { type: "string", default: "auto" },
    full: { type: "boolean", default: false },
    "no-sweep": { type: "boolean", default: false },
    out: { type: "string", default: "bench/out/report" },
    seed: { type: "string", default: "1" },
    quiet: { type: "boolean", default: false },
    help: { type: "boolean", default: false },
  },
  strict: true,
});
if (opt.help) {
  console.log(USAGE);
  Deno.exit(0);
}

function positive(name: string, text: string | undefined, fallback: number): number {
  if (text === undefined) return fallback;
  const v = Number(text);
  if (!Number.isInteger(v) || v < 1) {
    console.error(`bench: --${name} expects a positive integer, got ${text}`);
    Deno.exit(2);
  }
  return v;
}

const iterations = positive("iterations", opt.iterations, 10);
const warmup = Math.max(0, Number(opt.warmup) | 0);
const seed = Number(opt.seed) | 0;
const cores = navigator.hardwareConcurrency;

function chooseBackend(): Backend {
  if (opt.backend === "host" || opt.backend === "cuda") return opt.backend;
  if (opt.backend !== "auto") {
    console.error(`bench: --backend expects auto, host or cuda, got ${opt.backend}`);
    Deno.exit(2);
  }
  const cuda = backendInfo("cuda");
  return cuda.available && cuda.dispatchSupported && !cuda.executedOnCpu ? "cuda" : "host";
}
const backend = chooseBackend();
const info = backendInfo(backend);
// Everything moves on the CPU unless a GPU does the work.
const onCpu = backend === "host" || info.executedOnCpu === true;

function machine(): MachineInfo {
  const cpu = cpus()[0]?.model?.trim() || Deno.build.arch;
  return {
    os: `${Deno.build.target} ${Deno.osRelease()}`,
    cpu,
    cores,
    memoryBytes: Deno.systemMemoryInfo().total,
    backend,
    device: backend === "cuda" ? info.deviceName : undefined,
    executedOnCpu: backend === "cuda" ? info.executedOnCpu === true : undefined,
    libraryVersion: libraryVersion(),
    deno: Deno.version.deno,
  };
}

function emulatedNic(): Scenario["emulatedNic"] {
  if (opt.nic === undefined) return undefined;
  const [gbPerSecond, latencyUs] = opt.nic.split(",").map(Number);
  if (!(gbPerSecond > 0) || !(latencyUs >= 0)) {
    console.error(`bench: --nic expects GBPS,US (for example 50,3), got ${opt.nic}`);
    Deno.exit(2);
  }
  return { gbPerSecond, latencyUs };
}

function configured(s: Scenario): Scenario {
  const ranks = positive("ranks", opt.ranks, s.ranks);
  const experts = Math.ceil(s.experts / ranks) * ranks;
  // One node unless asked: a sweep over ranks then stays on one node too.
  const ranksPerNode = opt["ranks-per-node"] === undefined
    ? undefined
    : positive("ranks-per-node", opt["ranks-per-node"], ranks);
  if (ranksPerNode !== undefined && ranks % ranksPerNode !== 0) {
    console.error(`bench: --ranks-per-node ${ranksPerNode} does not divide ${ranks} ranks into whole nodes`);
    Deno.exit(2);
  }
  return {
    ...s,
    ranks,
    experts,
    ranksPerNode,
    emulatedNic: emulatedNic(),
    tokens: positive("tokens", opt.tokens, s.tokens),
    routing: opt.routing ? parseRouting(opt.routing) : s.routing,
    payload: opt.payload === "fp8" || opt.payload === "bf16" ? opt.payload : s.payload,
  };
}

const progress = !opt.quiet && Deno.stderr.isTerminal();
const encoder = new TextEncoder();
function show(label: string, done: number, total: number): void {
  if (!progress) return;
  const width = 24, filled = Math.round(width * done / total);
  const bar = "#".repeat(filled) + ".".repeat(width - filled);
  Deno.stderr.writeSync(encoder.encode(`\r[${bar}] ${label} ${done}/${total}\x1b[K`));
  if (done === total) Deno.stderr.writeSync(encoder.encode("\r\x1b[K"));
}

async function measure(s: Scenario, label: string, runOptions: Parameters<typeof runScenario>[2] = {}) {
  // A sweep's rank count may not split into the nodes asked for: one node then.
  const ranksPerNode = s.ranksPerNode && s.ranks % s.ranksPerNode === 0 ? s.ranksPerNode : undefined;
  using group = Group.local({ ranks: s.ranks, backend, ranksPerNode, emulatedNic: s.emulatedNic });
  return await runScenario(group, s, {
    iterations,
    warmup,
    seed,
    onIteration: (done, total) => show(label, done, total),
    ...runOptions,
  });
}

if (opt.payload !== undefined && opt.payload !== "bf16" && opt.payload !== "fp8") {
  console.error(`bench: --payload expects bf16 or fp8, got ${opt.payload}`);
  Deno.exit(2);
}
const names = opt.scenario ? opt.scenario.split(",") : [...DEFAULT_SCENARIOS];
const scenarios = [];
for (const name of names) {
  const sized = opt.full || !onCpu
    ? { scenario: configured(scenarioNamed(name)) }
    : sizeFor(configured(scenarioNamed(name)), cores);
  if (sized.scaledDown) console.log(`${name}: scaled down, ${sized.scaledDown}`);
  const run = await measure(sized.scenario, name);
  scenarios.push(scenarioReport(run, sized.scaledDown));
}

// Sweeps for the plots, at fewer iterations: tokens per rank (quartering down to 16) and ranks
// (2, 4, 8) around the first normal-mode scenario, exact-size dispatch and combine.
const sweeps: { tokens: SweepPoint[]; ranks: SweepPoint[] } = { tokens: [], ranks: [] };
const base = scenarios.find((s) => s.scenario.mode === "normal")?.scenario;
if (base && !opt["no-sweep"]) {
  const point = async (s: Scenario, into: SweepPoint[], label: string) => {
    const run = await measure(s, label, { iterations: Math.min(iterations, 5), warmup: 1, variants: ["exact"] });
    for (const o of run.operations.map(summarizeOperation)) {
      into.push({
        ranks: s.ranks,
        tokens: s.tokens,
        op: o.op,
        medianMs: o.collectiveMs.median,
        gbPerSecond: o.gbPerSecond,
      });
    }
  };
  for (let tokens = base.tokens; tokens >= 16; tokens = Math.floor(tokens / 4)) {
    await point({ ...base, tokens }, sweeps.tokens, `sweep: ${tokens} tokens/rank`);
  }
  sweeps.tokens.sort((a, b) => a.tokens - b.tokens);
  for (const ranks of [2, 4, 8].filter((r) => base.experts % r === 0)) {
    await point({ ...base, ranks }, sweeps.ranks, `sweep: ${ranks} ranks`);
  }
}

const report: BenchReport = {
  schema: REPORT_SCHEMA,
  createdAt: new Date().toISOString(),
  machine: machine(),
  scenarios,
  sweeps,
};
console.log(formatTable(report));
const out = opt.out!;
await Deno.mkdir(out, { recursive: true });
// Indented, with arrays of numbers kept on one line each (thousands of samples and counts).
const json = JSON.stringify(report, null, 1).replace(/\[[-\d.e+,\s]*\]/g, (a) => a.replace(/\s+/g, ""));
await Deno.writeTextFile(`${out}/report.json`, json + "\n");
const plots = plotsOf(report);
for (const p of plots) await Deno.writeTextFile(`${out}/${p.file}`, p.svg);
await Deno.writeTextFile(`${out}/index.html`, indexHtml(report, plots));
console.log(`\nwrote ${out}/report.json, ${plots.length} plots and ${out}/index.html`);
