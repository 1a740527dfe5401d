/**
 * The README's test command, `deno task test`: the suite in passes, each a `deno test` run on one
 * build of the library, then one line per pass and a total.
 *
 *   host          every test file but the CUDA tests, and the doc examples, on `build/`
 *   host-nodes    the normal-mode suite again with its groups split into virtual nodes of two
 *                 ranks (the two-hop dispatch), on `build/`
 *   cuda-gpu      where a GPU can run them: the CUDA tests, the normal-mode suite and the
 *                 process-group jobs with SWITCHYARD_TEST_BACKEND=cuda, on `build/`
 *   cuda-on-cpu   the same on the CUDA backend executed on CPU threads (`build-cuda-cpu/`, built
 *                 first: `scripts/build.ts --cuda-cpu`), so the kernels run on every machine with
 *                 the CUDA toolkit's headers, GPU or not
 *   cuda-on-cpu-nodes  the normal-mode suite there with its groups split into virtual nodes of
 *                 two ranks (the CUDA backend's two-hop dispatch through its proxy)
 *   cuda-on-cpu-ibverbs  the two-hop tests there with the proxy's ibverbs engine on the software
 *                 NIC (tests/native/soft_verbs.cpp) instead of the emulated NIC
 *
 * Arguments go to every `deno test` (`--filter`, ...). `--junit-path=P` writes one JUnit report
 * of all passes, each suite named after its pass. `SWITCHYARD_TEST_PASSES=host,cuda-on-cpu`
 * chooses passes, `SWITCHYARD_TEST_IGNORE=tests/a_test.ts,...` leaves files out of every pass;
 * `SWITCHYARD_LIBRARY` replaces `build/` and `SWITCHYARD_CUDA_ON_CPU_LIBRARY`
 * replaces `build-cuda-cpu/` (nothing is built then: the sanitizer runs of .ci/sanitize.sh). The
 * library build (`deno task build`) comes first; the task does that.
 *
 * @module
 */

import { backendInfo } from "../src/backend.ts";
import { cudaIncludeDir } from "./build.ts";

const root = new URL("..", import.meta.url).pathname;
const deno = Deno.execPath();
const permissions = ["--allow-ffi", "--allow-env", "--allow-read", "--allow-run", "--allow-write", "--allow-net"];

/** The files that run unchanged on either backend through the shared fixture (tests/helpers.ts). */
export const NORMAL_MODE_SUITE = [
  "tests/dispatch_test.ts",
  "tests/combine_test.ts",
  "tests/sequence_test.ts",
  "tests/timeout_test.ts",
  "tests/errors_test.ts",
  "tests/property_test.ts",
  "tests/resources_test.ts",
  "tests/topology_test.ts",
];

/** What the CUDA passes run: the CUDA tests, the normal-mode suite, one rank per process. */
const CUDA_SUITE = [
  "tests/cuda_test.ts",
  "tests/cuda_config_test.ts",
  "tests/bench_test.ts",
  "tests/multiprocess_test.ts",
  "tests/low_latency_test.ts",
  ...NORMAL_MODE_SUITE,
];

/** Fewer fault-injection jobs where each takes longer (unless the caller chose). */
function faultJobs(jobs: number, timeoutMs: number): Record<string, string> {
  return {
    SWITCHYARD_FAULT_JOBS: Deno.env.get("SWITCHYARD_FAULT_JOBS") ?? String(jobs),
    SWITCHYARD_FAULT_TIMEOUT_MS: Deno.env.get("SWITCHYARD_FAULT_TIMEOUT_MS") ?? String(timeoutMs),
  };
}

interface Pass {
  readonly name: string;
  readonly what: string;
  readonly files: string[];
  readonly env: Record<string, string>;
}

/** Outcomes of a JUnit report's cases, counted as Deno counts them: tests, and their steps apart. */
export interface Counts {
  passed: number;
  failed: number;
  skipped: number;
  stepsPassed: number;
  stepsFailed: number;
}

/**
 * The tests and steps of a JUnit report by outcome. Deno writes a step as a case named
 * `test > step`, so a name with " > " is a step.
 */
export function countCases(xml: string): Counts {
  const counts = { passed: 0, failed: 0, skipped: 0, stepsPassed: 0, stepsFailed: 0 };
  for (const c of xml.match(/<testcase\b[^>]*?(\/>|>[\s\S]*?<\/testcase>)/g) ?? []) {
    const step = / &gt; /.test(/name="([^"]*)"/.exec(c)?.[1] ?? "");
    const failed = /<(failure|error)\b/.test(c);
    if (step) {
      if (failed) counts.stepsFailed++;
      else counts.stepsPassed++;
    } else if (failed) counts.failed++;
    else if (/<skipped\b/.test(c)) counts.skipped++;
    else counts.passed++;
  }
  return counts;
}

/** One pass's line, as Deno words it: `62 passed (147 steps), 0 failed`. */
export function countsLine(c: Counts): string {
  const steps = (n: number) => n ? ` (${n} step${n === 1 ? "" : "s"})` : "";
  return `${c.passed} passed${steps(c.stepsPassed)}, ${c.failed} failed${steps(c.stepsFailed)}` +
    (c.skipped ? `, ${c.skipped} skipped` : "");
}

function parseArgs(args: string[]): { junit?: string; rest: string[] } {
  const rest: string[] = [];
  let junit: string | undefined;
  for (let i = 0; i < args.length; i++) {
    if (args[i].startsWith("--junit-path=")) junit = args[i].slice("--junit-path=".length);
    else if (args[i] === "--junit-path") junit = args[++i];
    else rest.push(args[i]);
  }
  return { junit, rest };
}

async function buildCudaOnCpu(): Promise<boolean> {
  const { code } = await new Deno.Command(deno, {
    args: ["run", "--allow-run", "--allow-read", "--allow-env", `${root}scripts/build.ts`, "--cuda-cpu"],
    env: { SWITCHYARD_BUILD_DIR: "" }, // the pass loads build-cuda-cpu/: build exactly that
    stdout: "inherit",
    stderr: "inherit",
  }).output();
  return code === 0;
}

function fileExists(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}

/** A CPU-executed build given by the caller (then nothing is built). */
function cudaOnCpuLibrary(): string | undefined {
  return Deno.env.get("SWITCHYARD_CUDA_ON_CPU_LIBRARY") || undefined;
}

/** Test files the caller leaves out (`SWITCHYARD_TEST_IGNORE`, comma-separated). */
function ignored(): string[] {
  return (Deno.env.get("SWITCHYARD_TEST_IGNORE") ?? "").split(",").filter((f) => f);
}

/** A pass's list of files without those the caller leaves out. */
function kept(files: string[]): string[] {
  return files.filter((f) => !ignored().includes(f));
}

function passes(): Pass[] {
  const chosen = (Deno.env.get("SWITCHYARD_TEST_PASSES") ??
    "host,host-nodes,cuda-gpu,cuda-on-cpu,cuda-on-cpu-nodes,cuda-on-cpu-ibverbs")
    .split(",");
  const cuda = backendInfo("cuda");
  const gpu = cuda.available && !cuda.executedOnCpu;
  const out: Pass[] = [];
  if (chosen.includes("host")) {
    out.push({
      name: "host",
      what: `every test file but the CUDA tests, on ${Deno.env.get("SWITCHYARD_LIBRARY") || "build/"}`,
      files: [
        "tests/",
        "--doc",
        "mod.ts",
        "README.md",
        `--ignore=${["tests/cuda_test.ts", "tests/cuda_config_test.ts", ...ignored()].join(",")}`,
      ],
      env: {},
    });
  }
  if (chosen.includes("host-nodes")) {
    out.push({
      name: "host-nodes",
      what: "the normal-mode suite with every group of more than two ranks split into virtual nodes of two, " +
        "their network rings 3 entries long (two hops that wrap their rings: the results must not change)",
      files: kept(NORMAL_MODE_SUITE),
      env: { SWITCHYARD_TEST_RANKS_PER_NODE: "2", SWITCHYARD_TEST_NETWORK_RING: "3", ...faultJobs(10, 400) },
    });
  }
  if (chosen.includes("cuda-gpu")) {
    if (gpu) {
      out.push({
        name: "cuda-gpu",
        what: `the CUDA tests, the normal-mode suite and the process groups on ${cuda.deviceName}`,
        files: kept(CUDA_SUITE),
        // Processes sharing one GPU take turns on it (no MPS): longer deadlines for the faults.
        env: { SWITCHYARD_TEST_BACKEND: "cuda", ...faultJobs(4, 2000) },
      });
    } else {
      console.log(`cuda-gpu: no GPU here (${cuda.reason || "this build has no CUDA backend"})`);
    }
  }
  if (chosen.includes("cuda-on-cpu")) {
    const library = cudaOnCpuLibrary() ?? `${root}build-cuda-cpu/libswitchyard.so`;
    out.push({
      name: "cuda-on-cpu",
      what: `the CUDA tests, the normal-mode suite and the process groups on the CUDA backend executed on the CPU ` +
        `(${library})`,
      files: kept(CUDA_SUITE),
      env: { SWITCHYARD_TEST_BACKEND: "cuda", SWITCHYARD_LIBRARY: library, ...faultJobs(10, 400) },
    });
  }
  if (chosen.includes("cuda-on-cpu-nodes")) {
    const library = cudaOnCpuLibrary() ?? `${root}build-cuda-cpu/libswitchyard.so`;
    out.push({
      name: "cuda-on-cpu-nodes",
      what: "the normal-mode suite on the CUDA backend executed on the CPU, every group of more than two ranks split " +
        "into virtual nodes of two with network rings of 3 entries (its dispatch takes two hops through the proxy)",
      files: kept(NORMAL_MODE_SUITE),
      env: {
        SWITCHYARD_TEST_BACKEND: "cuda",
        SWITCHYARD_LIBRARY: library,
        SWITCHYARD_TEST_RANKS_PER_NODE: "2",
        SWITCHYARD_TEST_NETWORK_RING: "3",
        ...faultJobs(10, 400),
      },
    });
  }
  const softVerbs = (cudaOnCpuLibrary() ?? `${root}build-cuda-cpu/libswitchyard.so`).replace(
    /[^/]*$/,
    "libsoft_verbs.so",
  );
  if (chosen.includes("cuda-on-cpu-ibverbs")) {
    const library = cudaOnCpuLibrary() ?? `${root}build-cuda-cpu/libswitchyard.so`;
    out.push({
      name: "cuda-on-cpu-ibverbs",
      what: "the two-hop dispatch and combine on the CUDA backend executed on the CPU, virtual nodes of two with " +
        "network rings of 3 entries, their puts as RDMA writes through the ibverbs engine on the software NIC " +
        "(tests/native/soft_verbs.cpp, with up to 20 us of jitter per work request)",
      files: kept(["tests/topology_test.ts", "tests/dispatch_test.ts", "tests/combine_test.ts"]),
      env: {
        SWITCHYARD_TEST_BACKEND: "cuda",
        SWITCHYARD_LIBRARY: library,
        SWITCHYARD_TEST_RANKS_PER_NODE: "2",
        SWITCHYARD_TEST_NETWORK_RING: "3",
        SWITCHYARD_NIC: "ibverbs",
        SWITCHYARD_IBVERBS_LIBRARY: softVerbs,
        SOFT_VERBS_JITTER_US: "20",
      },
    });
  }
  return out;
}

/** Runs one pass; returns its JUnit report ("" if deno test wrote none). */
async function runPass(p: Pass, rest: string[], dir: string): Promise<{ code: number; xml: string }> {
  console.log(`\n--- ${p.name}: ${p.what}`);
  const junit = `${dir}/${p.name}.xml`;
  const { code } = await new Deno.Command(deno, {
    args: ["test", ...permissions, `--junit-path=${junit}`, ...rest, ...p.files],
    cwd: root,
    env: p.env,
    stdout: "inherit",
    stderr: "inherit",
  }).output();
  let xml = "";
  try {
    xml = await Deno.readTextFile(junit);
  } catch {
    // the run died before writing its report: counted as a failure below
  }
  return { code, xml };
}

/**
 * One report of every pass: each pass's suites, renamed "pass: file". A pass that failed outside
 * any test case (its process died, or it failed to load) gets a failing case of its own, so the
 * report never says less than the exit status.
 */
function mergeReports(reports: { name: string; xml: string; failedOutside: boolean }[]): string {
  const suites = reports.map(({ name, xml, failedOutside }) =>
    (xml.match(/<testsuite\b[\s\S]*?<\/testsuite>/g) ?? []).map((s) => s.replace(/name="/, `name="${name}: `))
      .concat(
        failedOutside
          ? [
            `<testsuite name="${name}: deno test" tests="1" failures="1"><testcase name="the pass exited with an ` +
            `error outside any test" classname="${name}"><failure message="see the log"/></testcase></testsuite>`,
          ]
          : [],
      ).join("\n")
  );
  return `<?xml version="1.0" encoding="UTF-8"?>\n<testsuites name="switchyard">\n${
    suites.join("\n")
  }\n</testsuites>\n`;
}

if (import.meta.main) {
  const { junit, rest } = parseArgs(Deno.args);
  const dir = await Deno.makeTempDir({ prefix: "switchyard-test-" });
  const reports: { name: string; xml: string; failedOutside: boolean }[] = [];
  const lines: string[] = [];
  let ok = true;
  let built = false; // build-cuda-cpu/, once for both of its passes
  for (const p of passes()) {
    if (p.name.startsWith("cuda-on-cpu") && !cudaOnCpuLibrary()) {
      if (!cudaIncludeDir()) {
        lines.push(`${p.name}: skipped (no CUDA toolkit headers here; set CUDA_HOME to run the kernels on the CPU)`);
        continue;
      }
      if (!built && !await buildCudaOnCpu()) {
        lines.push(`${p.name}: the build failed`);
        ok = false;
        continue;
      }
      built = true;
    }
    const softVerbs = p.env.SWITCHYARD_IBVERBS_LIBRARY;
    if (softVerbs && !fileExists(softVerbs)) {
      // Built without the ibverbs headers: a skip when the pass came by default, a failure when asked for.
      lines.push(`${p.name}: skipped (no ${softVerbs}: the ibverbs headers come from bash .ci/fetch-headers.sh)`);
      ok = ok && !Deno.env.get("SWITCHYARD_TEST_PASSES");
      continue;
    }
    const { code, xml } = await runPass(p, rest, dir);
    const c = countCases(xml);
    const failedOutside = code !== 0 && c.failed === 0; // deno test failed outside any test case
    if (failedOutside) c.failed = 1;
    ok = ok && code === 0;
    reports.push({ name: p.name, xml, failedOutside });
    lines.push(`${p.name}: ${countsLine(c)}`);
  }
  await Deno.remove(dir, { recursive: true });
  if (junit) await Deno.writeTextFile(junit, mergeReports(reports));
  console.log(`\n${lines.join("\n")}`);
  Deno.exit(ok ? 0 : 1);
}
