/**
 * The measurement layer: percentiles on known data, the benchmark's counts and bytes against
 * the routing recomputed here, summaries against hand-made samples, the SVG plots parsed by an
 * XML checker of this file's own, and the CLI end to end.
 */

import assert from "node:assert/strict";
import { bufferSizeHint, Group, imbalance, quantile, spread, summarize, SwitchyardError } from "../mod.ts";
import { plotsOf } from "../src/bench/plots.ts";
import {
  type BenchReport,
  formatTable,
  REPORT_SCHEMA,
  scenarioReport,
  summarizeOperation,
} from "../src/bench/report.ts";
import { rowBytes, runScenario } from "../src/bench/run.ts";
import { parseRouting, routeTokens, type Scenario, sizeFor } from "../src/bench/scenario.ts";
import { escapeXml, heatMap, lineChart, niceTicks } from "../src/bench/svg.ts";
import { testBackend } from "./helpers.ts";

const invalid = (e: unknown) => e instanceof SwitchyardError && e.code === "INVALID_ARGUMENT";

Deno.test("percentiles, imbalance and spread on known data", () => {
  const xs = [10, 1, 9, 2, 8, 3, 7, 4, 6, 5]; // 1..10, shuffled
  // Rank q * (n - 1) between order statistics: the median of 1..10 is 5.5, p90 is 9 + 0.1.
  assert.equal(quantile(xs, 0.5), 5.5);
  assert.equal(quantile(xs, 0), 1);
  assert.equal(quantile(xs, 1), 10);
  assert.ok(Math.abs(quantile(xs, 0.9) - 9.1) < 1e-12);
  assert.ok(Math.abs(quantile(xs, 0.99) - 9.91) < 1e-12);
  const s = summarize(xs);
  assert.deepEqual({ ...s, p90: 0, p99: 0 }, { count: 10, min: 1, mean: 5.5, median: 5.5, p90: 0, p99: 0, max: 10 });
  assert.equal(summarize([7]).p99, 7);
  assert.equal(summarize([3, 1, 2]).median, 2);
  assert.equal(imbalance([1, 1, 2, 0]), 2); // max 2, mean 1
  assert.equal(imbalance([0, 0]), 1);
  assert.equal(spread([1, 2, 3, 10]), 4); // 10 / median 2.5
  assert.throws(() => summarize([]), invalid);
  assert.throws(() => quantile([1, NaN], 0.5), invalid);
  assert.throws(() => quantile([1], 1.5), invalid);
});

Deno.test("an operation's summary: the slowest rank per iteration, the straggler, bytes over time", () => {
  const report = summarizeOperation({
    op: "combine",
    rankMs: [[1, 4, 2], [3, 1, 1], [2, 2, 8]], // rank medians 2, 1, 2
    wallMs: [5, 5, 9],
    rankBytes: [2e6, 1e6, 4e6],
  });
  assert.deepEqual(report.collectiveMs.median, 4); // per iteration: max(1,3,2)=3, 4, 8
  assert.equal(report.collectiveMs.max, 8);
  assert.equal(report.collectiveMs.min, 3);
  assert.equal(report.rankSpread, 1); // max median 2 over median of medians 2
  // Per rank: 2e6 B / 2 ms = 1 GB/s, 1e6 / 1 ms = 1, 4e6 / 2 ms = 2; the median is 1.
  assert.equal(report.gbPerSecond, 1);
  assert.equal(report.readWriteGbPerSecond, 2);
  assert.deepEqual(report.rankReadWriteBytes, [4e6, 2e6, 8e6]);
});

const small: Scenario = {
  name: "small",
  about: "a test shape",
  mode: "normal",
  ranks: 4,
  tokens: 24,
  hidden: 256,
  experts: 16,
  topk: 4,
  routing: { kind: "zipf", s: 1.2 },
  payload: "bf16",
};

// What every rank receives, recomputed from the routing: tokens (normal mode) or token-expert
// pairs (low-latency mode) per destination rank, tokens per expert, and per source and expert.
function expected(s: Scenario, seed: number, ranksPerNode = s.ranks) {
  const EL = s.experts / s.ranks;
  const node = (r: number) => Math.floor(r / ranksPerNode);
  // Across nodes, per rank: dispatch records in two hops (token, other node) and directly (token,
  // rank of another node); the hierarchical combine's partials (sent by the rank of each other
  // node with the source's local index) and the direct combine's rows (token received from a
  // source on another node).
  const otherNodes = new Array(s.ranks).fill(0), otherRanks = new Array(s.ranks).fill(0);
  const partials = new Array(s.ranks).fill(0), rowsBack = new Array(s.ranks).fill(0);
  const perRank = new Array(s.ranks).fill(0), pairs = new Array(s.ranks).fill(0);
  const perExpert = new Array(s.experts).fill(0);
  const sent = Array.from({ length: s.ranks }, () => new Array(s.experts).fill(0));
  for (let src = 0; src < s.ranks; src++) {
    const { topkIdx } = routeTokens(s, src, seed);
    for (let t = 0; t < s.tokens; t++) {
      const dests = new Set<number>();
      for (let k = 0; k < s.topk; k++) {
        const e = Number(topkIdx[t * s.topk + k]);
        if (e < 0) continue;
        perExpert[e]++;
        sent[src][e]++;
        pairs[Math.floor(e / EL)]++;
        dests.add(Math.floor(e / EL));
      }
      for (const d of dests) perRank[d]++;
      for (const d of dests) {
        if (node(d) === node(src)) continue;
        otherRanks[src]++;
        rowsBack[d]++;
      }
      const nodes = new Set([...dests].map(node));
      nodes.delete(node(src));
      otherNodes[src] += nodes.size;
      for (const n of nodes) partials[n * ranksPerNode + (src % ranksPerNode)]++;
    }
  }
  return { perRank, pairs, perExpert, sent, otherNodes, otherRanks, partials, rowsBack };
}

Deno.test("the benchmark counts what the operations moved", async (t) => {
  for (const s of [small, { ...small, payload: "fp8" as const, routing: { kind: "hot" as const, share: 0.5 } }]) {
    await t.step(`normal mode, ${s.payload}, ${s.routing.kind}`, async () => {
      using group = Group.local({ ranks: s.ranks, backend: testBackend(), timeoutMs: 20000 });
      const run = await runScenario(group, s, { iterations: 3, warmup: 1, seed: 5 });
      const want = expected(s, 5);
      assert.deepEqual(run.receivedPerRank, want.perRank);
      assert.deepEqual(run.receivedPerExpert, want.perExpert);
      assert.deepEqual(run.sentPerRankExpert, want.sent);
      assert.deepEqual(run.operations.map((o) => o.op), [
        "dispatch (exact)",
        "dispatch (worst-case)",
        "dispatch (cached)",
        "combine",
      ]);
      for (const o of run.operations) {
        assert.equal(o.rankMs.length, s.ranks);
        assert.ok(o.rankMs.every((row) => row.length === 3 && row.every((ms) => ms > 0 && ms < 20000)), o.op);
        const width = o.op === "combine" ? 2 * s.hidden : rowBytes(s.payload, s.hidden);
        assert.deepEqual(o.rankBytes, want.perRank.map((n) => n * width), o.op);
      }
    });
  }
  await t.step("low-latency mode, with and without the receive hook", async () => {
    const s: Scenario = { ...small, mode: "low-latency", payload: "fp8", tokens: 8, hidden: 128 };
    using group = Group.local({ ranks: s.ranks, backend: testBackend(), timeoutMs: 20000 });
    const run = await runScenario(group, s, { iterations: 2, warmup: 1, seed: 9 });
    const want = expected(s, 9);
    assert.deepEqual(run.receivedPerRank, want.pairs);
    assert.deepEqual(run.receivedPerExpert, want.perExpert);
    const ops = run.operations.map((o) => o.op);
    assert.deepEqual(ops, [
      "low-latency dispatch",
      "low-latency combine",
      "low-latency dispatch (hook)",
      "low-latency combine (hook)",
    ]);
    const hooked = run.operations[2];
    assert.ok(hooked.sendMs!.every((row, r) => row.every((ms, i) => ms >= 0 && ms <= hooked.rankMs[r][i])));
    assert.deepEqual(run.operations[0].rankBytes, want.pairs.map((n) => n * (128 + 4)));
    assert.equal(run.dispatchWaitNs!.length, s.ranks);
    assert.ok(run.dispatchWaitNs!.every((row) => row.length === s.ranks && row.every((ns) => ns >= 0)));
  });
});

Deno.test("across nodes: the benchmark counts what crossed the network, two hops (and the direct path on the host backend)", async () => {
  const s: Scenario = { ...small, ranks: 4, ranksPerNode: 2 };
  using group = Group.local({ ranks: 4, ranksPerNode: 2, backend: testBackend(), timeoutMs: 20000 });
  const run = await runScenario(group, s, { iterations: 1, warmup: 0, seed: 7, variants: ["exact"] });
  const want = expected(s, 7, 2);
  assert.ok(want.otherNodes.some((n) => n > 0));
  // The CUDA backend has no direct path over the NIC (no baseline).
  const host = testBackend() === "host";
  assert.deepEqual(run.operations.map((o) => o.op), [
    "dispatch (exact)",
    "combine",
    "combine (hierarchical)",
    ...(host ? ["dispatch (exact, direct)", "combine (direct)"] : []),
  ]);
  assert.ok(run.network, "a run across nodes reports the network");
  assert.deepEqual(run.network.expectedDispatchRecordsPerRank, { twoHop: want.otherNodes, direct: want.otherRanks });
  const plan = bufferSizeHint({ ranks: 4, hidden: s.hidden, maxTokensPerRank: s.tokens, ranksPerNode: 2 });
  const counted = (op: string) => run.network!.perOperation.find((o) => o.op === op)!;
  const expectations: (readonly [string, number[], number])[] = [
    ["dispatch (exact)", want.otherNodes, plan.networkRecordBytes],
    ["combine (hierarchical)", want.partials, plan.networkResultBytes],
  ];
  if (host) {
    expectations.push(
      ["dispatch (exact, direct)", want.otherRanks, plan.recordBytes],
      ["combine (direct)", want.rowsBack, plan.combineRowBytes],
    );
  }
  for (const [op, records, bytes] of expectations) {
    assert.deepEqual(counted(op).recordsPerRank, records, op);
    assert.deepEqual(counted(op).bytesPerRank, records.map((x) => x * bytes), op);
    // One put per entry on the host backend; the CUDA backend puts runs of consecutive entries.
    const puts = counted(op).putsPerRank;
    if (host) assert.deepEqual(puts, records, op);
    else assert.ok(puts.every((n, r) => n <= records[r] && (records[r] === 0) === (n === 0)), op);
  }
  // The chain's count is topology_test's; here: it moves something, the float partials.
  assert.ok(counted("combine").recordsPerRank.some((n) => n > 0));
  const table = formatTable({
    schema: REPORT_SCHEMA,
    createdAt: "",
    machine: { os: "", cpu: "", cores: 2, memoryBytes: 0, backend: "host", libraryVersion: "", deno: "" },
    scenarios: [scenarioReport(run)],
  });
  assert.match(table, /2 nodes of 2: two hops/);
  assert.match(table, new RegExp(`dispatch \\(exact\\) +${want.otherNodes.join(" ")};`));
  if (host) {
    const ratio = (a: number[], b: number[]) => (a.reduce((x, y) => x + y) / b.reduce((x, y) => x + y)).toFixed(2);
    assert.match(table, new RegExp(`the layouts: ${ratio(want.otherRanks, want.otherNodes)}x the records`));
  }
});

Deno.test("routings and sizes", () => {
  assert.deepEqual(parseRouting("zipf:0.8"), { kind: "zipf", s: 0.8 });
  assert.deepEqual(parseRouting("hot:1"), { kind: "hot", share: 1 });
  assert.deepEqual(parseRouting("group:8:4"), { kind: "group", groups: 8, perToken: 4 });
  for (const bad of ["zipf", "zipf:-1", "hot:2", "uniform:3", "normal", "group:4:5", "group:4", "group:4:2:1"]) {
    assert.throws(() => parseRouting(bad), invalid);
  }
  // Group-limited: every token's experts are distinct and lie in at most 2 of the 4 groups.
  const grouped = routeTokens({ ...small, routing: { kind: "group", groups: 4, perToken: 2 } }, 1, 3);
  const size = small.experts / 4, reached = new Set<number>();
  for (let t = 0; t < small.tokens; t++) {
    const row = Array.from(grouped.topkIdx.subarray(t * small.topk, (t + 1) * small.topk), Number);
    assert.equal(new Set(row).size, small.topk, `token ${t}: distinct experts`);
    assert.ok(new Set(row.map((e) => Math.floor(e / size))).size <= 2, `token ${t}: ${row}`);
    const w = grouped.topkWeights.subarray(t * small.topk, (t + 1) * small.topk);
    assert.ok(Math.abs(w.reduce((a, b) => a + b, 0) - 1) < 1e-5);
    row.forEach((e) => reached.add(e));
  }
  assert.ok(reached.size > small.experts / 2, "the groups vary between tokens");
  assert.throws(
    () => routeTokens({ ...small, routing: { kind: "group", groups: 4, perToken: 1 }, topk: 5 }, 0, 1),
    invalid,
  );
  const hot = routeTokens({ ...small, routing: { kind: "hot", share: 1 } }, 2, 1);
  for (let t = 0; t < small.tokens; t++) {
    const row = Array.from(hot.topkIdx.subarray(t * small.topk, (t + 1) * small.topk), Number);
    assert.ok(row.includes(0), `token ${t}: ${row}`);
    assert.equal(new Set(row).size, small.topk, `token ${t}: distinct experts`);
  }
  const big = { ...small, tokens: 4096, hidden: 7168 };
  // 2 cores x 8 MiB: at most 1170 tokens of 14 KiB, so 1024.
  assert.equal(sizeFor(big, 2).scenario.tokens, 1024);
  assert.match(sizeFor(big, 2).scaledDown!, /4096 -> 1024 tokens per rank/);
  assert.equal(sizeFor(small, 2).scaledDown, undefined);
  assert.equal(sizeFor({ ...big, mode: "low-latency" }, 2).scenario.tokens, 4096);
});

// A well-formedness check of our own (the runtime has no XML parser): every tag closes in order,
// attributes are quoted, text holds no raw `<` or stray `&`. Returns the elements it saw.
function checkXml(text: string): { name: string; attrs: Record<string, string>; text: string }[] {
  const seen: { name: string; attrs: Record<string, string>; text: string }[] = [];
  const stack: number[] = [];
  const token = /<(\/?)([A-Za-z][\w:-]*)((?:\s+[\w:-]+="[^"<]*")*)\s*(\/?)>|([^<]+)/gy;
  let last = 0;
  for (let m = token.exec(text); m; m = token.exec(text)) {
    last = token.lastIndex;
    if (m[5] !== undefined) {
      assert.ok(!/&(?!(amp|lt|gt|quot|#39);)/.test(m[5]), `stray & in text: ${m[5]}`);
      if (stack.length) seen[stack[stack.length - 1]].text += m[5];
      continue;
    }
    const [, close, name, attrText, selfClose] = m;
    if (close) {
      const open = stack.pop();
      assert.equal(open !== undefined ? seen[open].name : undefined, name, `</${name}> closes nothing open`);
      continue;
    }
    const attrs: Record<string, string> = {};
    for (const a of attrText.matchAll(/([\w:-]+)="([^"]*)"/g)) {
      assert.ok(!(a[1] in attrs), `attribute ${a[1]} twice`);
      assert.ok(!/&(?!(amp|lt|gt|quot|#39);)/.test(a[2]), `stray & in ${a[1]}`);
      attrs[a[1]] = a[2];
    }
    seen.push({ name, attrs, text: "" });
    if (!selfClose) stack.push(seen.length - 1);
  }
  assert.equal(text.slice(last).trim(), "", "the document ends in something that is not a tag");
  assert.deepEqual(stack, [], "unclosed elements");
  return seen;
}

Deno.test("SVG plots are well-formed and carry their series and labels", async (t) => {
  await t.step("the checker itself refuses broken documents", () => {
    assert.throws(() => checkXml("<svg><g></svg>"));
    assert.throws(() => checkXml('<svg><text x="1">a < b</text></svg>'));
    assert.throws(() => checkXml('<svg><text x="1">R&D</text></svg>'));
    assert.throws(() => checkXml("<svg x=1></svg>"));
  });
  await t.step("a line chart with awkward names", () => {
    const svg = lineChart({
      title: "t <1>",
      xLabel: "tokens & more",
      yLabel: 'GB/s "rw"',
      logX: true,
      series: [{ name: "dispatch <exact>", points: [[16, 1], [64, 2], [256, 3]] }, { name: "a'b", points: [] }],
    });
    const els = checkXml(svg);
    assert.equal(els[0].name, "svg");
    assert.deepEqual(
      els.filter((e) => e.name === "g" && e.attrs.class === "series").map((e) => e.attrs["data-name"]),
      [escapeXml("dispatch <exact>"), escapeXml("a'b")],
    );
    assert.equal(els.find((e) => e.attrs.class === "x-label")!.text, escapeXml("tokens & more"));
    assert.equal(els.find((e) => e.attrs.class === "y-label")!.text, escapeXml('GB/s "rw"'));
    // Log axis ticks at powers of two: 16, 32, ..., 256.
    const ticks = els.filter((e) => e.name === "text" && e.attrs["text-anchor"] === "middle" && /^\d+$/.test(e.text));
    assert.deepEqual(ticks.map((e) => e.text), ["16", "32", "64", "128", "256"]);
  });
  await t.step("a heat map has one cell per value", () => {
    const els = checkXml(heatMap({ title: "h", xLabel: "expert", yLabel: "rank", values: [[1, 2, 3], [0, 5, 1]] }));
    const cells = els.filter((e) => e.name === "rect" && e.attrs.width === "1");
    assert.deepEqual(cells.map((e) => `${e.attrs.y},${e.attrs.x}`), ["0,0", "0,1", "0,2", "1,0", "1,1", "1,2"]);
    // Darker is more: the largest value (5) is the darkest cell, a zero is white.
    const shade = (e: { attrs: Record<string, string> }) => parseInt(e.attrs.fill.slice(1, 3), 16);
    assert.equal(Math.min(...cells.map(shade)), shade(cells[4]));
    assert.equal(cells[3].attrs.fill, "#ffffff");
  });
  await t.step("tick values", () => {
    assert.deepEqual(niceTicks(0, 10), [0, 2, 4, 6, 8, 10]);
    assert.deepEqual(niceTicks(0.3, 0.95), [0.4, 0.6, 0.8]);
  });
});

Deno.test("deno task bench writes a report, plots and a page, and its numbers are the run's", async () => {
  const out = await Deno.makeTempDir({ prefix: "switchyard-bench-" });
  try {
    const cmd = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--allow-ffi",
        "--allow-env",
        "--allow-read",
        "--allow-write",
        "--allow-sys=osRelease,systemMemoryInfo,cpus",
        new URL("../src/cli/bench.ts", import.meta.url).pathname,
        "--scenario",
        "deepseek-v3-prefill,deepseek-v3-decode-1",
        "--ranks",
        "2",
        "--tokens",
        "16",
        "--iterations",
        "3",
        "--warmup",
        "1",
        "--backend",
        testBackend(),
        "--out",
        out,
        "--quiet",
      ],
      stdout: "piped",
      stderr: "piped",
    });
    const child = cmd.spawn();
    const timer = setTimeout(() => child.kill("SIGKILL"), 120_000);
    const res = await child.output();
    clearTimeout(timer);
    const stdout = new TextDecoder().decode(res.stdout);
    assert.equal(res.code, 0, stdout + new TextDecoder().decode(res.stderr));
    assert.match(stdout, /dispatch \(exact\)/);
    const report: BenchReport = JSON.parse(await Deno.readTextFile(`${out}/report.json`));
    assert.equal(report.schema, REPORT_SCHEMA);
    assert.deepEqual(report.scenarios.map((s) => s.scenario.name), ["deepseek-v3-prefill", "deepseek-v3-decode-1"]);
    const prefill = report.scenarios[0];
    assert.equal(prefill.scenario.ranks, 2);
    assert.equal(prefill.scenario.tokens, 16);
    const want = expected(prefill.scenario, 1);
    assert.deepEqual(prefill.received.perRank, want.perRank);
    assert.deepEqual(prefill.received.perExpert, want.perExpert);
    for (const o of prefill.operations) {
      assert.equal(o.samplesMs.length, 2);
      assert.ok(o.samplesMs.every((row) => row.length === 3));
      assert.equal(o.collectiveMs.count, 3);
    }
    assert.deepEqual([...new Set(report.sweeps!.ranks!.map((p) => p.ranks))], [2, 4, 8]);
    const page = await Deno.readTextFile(`${out}/index.html`);
    for (const p of plotsOf(report)) {
      checkXml(await Deno.readTextFile(`${out}/${p.file}`));
      assert.ok(page.includes(`src="${p.file}"`), p.file);
    }
    assert.ok(plotsOf(report).some((p) => p.file === "time-vs-ranks.svg"));
  } finally {
    await Deno.remove(out, { recursive: true });
  }
});
