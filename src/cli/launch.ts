/**
 * The launcher: starts N Deno processes of one script as the ranks of a job, on this machine.
 *
 *     deno task launch --nproc 4 script.ts [args...]
 *     deno run -A src/cli/launch.ts --nproc 4 [--nproc-per-node 2] [--grace 5] [--timeout 600] [--flags "-A"] script.ts [args...]
 *
 * Each rank gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE` (`--nproc-per-node K`
 * numbers them as K ranks on each of nproc/K nodes, node-major, as torchrun does), `MASTER_ADDR`
 * (loopback), a free `MASTER_PORT` and a fresh `SWITCHYARD_TOKEN` (unless one is set), so
 * `Group.fromEnv()` finds the others. Output lines are prefixed with the rank; SIGINT and
 * SIGTERM are forwarded. When a rank fails (non-zero exit or a signal), the others get `--grace`
 * seconds to fail or finish on their own (a collective they wait in fails with an error naming
 * the missing rank), then are stopped; the launcher exits non-zero, naming the rank that failed
 * first.
 *
 * @module
 */

import { parseArgs } from "node:util";

/** How one rank ended. */
export interface RankExit {
  /** The rank. */
  readonly rank: number;
  /** Its process id. */
  readonly pid: number;
  /** Exit code (128 + signal number when killed). */
  readonly code: number;
  /** The signal that ended it, if any. */
  readonly signal: string | null;
  /** Milliseconds since the launch. */
  readonly atMs: number;
}

/** Options of {@linkcode launch}. */
export interface LaunchOptions {
  /** Ranks to start. */
  readonly nproc: number;
  /**
   * Ranks per (simulated) node, as torchrun's `--nproc-per-node` (default `nproc`, one node):
   * `LOCAL_RANK = RANK % nprocPerNode`, `LOCAL_WORLD_SIZE = nprocPerNode`. Must divide `nproc`.
   */
  readonly nprocPerNode?: number;
  /** The script every rank runs, and its arguments. */
  readonly script: string;
  /** Arguments after the script. */
  readonly args?: readonly string[];
  /** Deno flags before the script (default: the permissions Switchyard needs). */
  readonly denoFlags?: readonly string[];
  /** Seconds the others get after the first failure before they are stopped (default 5). */
  readonly graceSeconds?: number;
  /** Seconds before the whole job is stopped (default: none). */
  readonly timeoutSeconds?: number;
  /** Extra environment for every rank. */
  readonly env?: Readonly<Record<string, string>>;
  /** Where output lines go (default: this process's stdout/stderr). */
  readonly write?: (stream: "stdout" | "stderr", line: string) => void;
}

/** How the job ended. */
export interface LaunchResult {
  /** 0 when every rank exited 0. */
  readonly code: number;
  /** The rank that failed first, if any. */
  readonly firstFailure?: RankExit;
  /** Every rank's end, by rank. */
  readonly exits: readonly RankExit[];
}

const DEFAULT_FLAGS = ["--allow-ffi", "--allow-env", "--allow-read", "--allow-net"];

function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = l.addr.port;
  l.close();
  return port;
}

function randomToken(): string {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function pipeLines(
  stream: ReadableStream<Uint8Array>,
  prefix: string,
  out: (line: string) => void,
): Promise<void> {
  const decoder = new TextDecoder();
  let rest = "";
  for await (const chunk of stream) {
    rest += decoder.decode(chunk, { stream: true });
    let nl;
    while ((nl = rest.indexOf("\n")) >= 0) {
      out(prefix + rest.slice(0, nl));
      rest = rest.slice(nl + 1);
    }
  }
  if (rest) out(prefix + rest);
}

/** Runs the job and reports how it ended (it does not exit the process). */
export async function launch(options: LaunchOptions): Promise<LaunchResult> {
  const n = options.nproc;
  const perNode = options.nprocPerNode ?? n;
  if (!Number.isInteger(perNode) || perNode < 1 || n % perNode !== 0) {
    throw new RangeError(`nprocPerNode: ${perNode} does not divide the ${n} ranks into whole nodes`);
  }
  const encoder = new TextEncoder();
  const write = options.write ??
    ((stream, line) => (stream === "stdout" ? Deno.stdout : Deno.stderr).writeSync(encoder.encode(line + "\n")));
  const port = freePort();
  const token = options.env?.SWITCHYARD_TOKEN ?? Deno.env.get("SWITCHYARD_TOKEN") ?? randomToken();
  const started = performance.now();
  const children = Array.from({ length: n }, (_, rank) =>
    new Deno.Command(Deno.execPath(), {
      args: ["run", ...(options.denoFlags ?? DEFAULT_FLAGS), options.script, ...(options.args ?? [])],
      env: {
        ...options.env,
        RANK: String(rank),
        WORLD_SIZE: String(n),
        LOCAL_RANK: String(rank % perNode),
        LOCAL_WORLD_SIZE: String(perNode),
        MASTER_ADDR: "127.0.0.1",
        MASTER_PORT: String(port),
        SWITCHYARD_TOKEN: token,
      },
      stdout: "piped",
      stderr: "piped",
      stdin: "null",
    }).spawn());
  const alive = new Set(children.map((_, r) => r));
  const kill = (rank: number, signal: Deno.Signal) => {
    if (!alive.has(rank)) return;
    try {
      children[rank].kill(signal);
    } catch { /* already gone */ }
  };
  const forward = (signal: Deno.Signal) => () => {
    for (const r of alive) kill(r, signal);
  };
  const handlers = (["SIGINT", "SIGTERM"] as const).map((s) => [s, forward(s)] as const);
  for (const [s, h] of handlers) Deno.addSignalListener(s, h);

  let firstFailure: RankExit | undefined;
  let stopTimer: ReturnType<typeof setTimeout> | undefined;
  const stopOthers = (why: string) => {
    if (stopTimer !== undefined) return;
    stopTimer = setTimeout(() => {
      if (alive.size) write("stderr", `launch: ${why}; stopping ranks ${[...alive].join(", ")}`);
      for (const r of alive) kill(r, "SIGTERM");
      setTimeout(() => {
        for (const r of alive) kill(r, "SIGKILL");
      }, 2000);
    }, (options.graceSeconds ?? 5) * 1000);
  };
  const deadline = options.timeoutSeconds === undefined ? undefined : setTimeout(() => {
    write("stderr", `launch: the job ran past ${options.timeoutSeconds} s`);
    for (const r of alive) kill(r, "SIGKILL");
  }, options.timeoutSeconds * 1000);

  const exits = await Promise.all(children.map(async (child, rank) => {
    const pumps = [
      pipeLines(child.stdout, `[rank ${rank}] `, (l) => write("stdout", l)),
      pipeLines(child.stderr, `[rank ${rank}] `, (l) => write("stderr", l)),
    ];
    const status = await child.status;
    alive.delete(rank);
    await Promise.all(pumps);
    const exit: RankExit = {
      rank,
      pid: child.pid,
      code: status.code,
      signal: status.signal,
      atMs: performance.now() - started,
    };
    if (exit.code !== 0 && !firstFailure) {
      firstFailure = exit;
      stopOthers(`rank ${rank} failed`);
    }
    return exit;
  }));
  clearTimeout(stopTimer);
  clearTimeout(deadline);
  for (const [s, h] of handlers) Deno.removeSignalListener(s, h);
  return { code: firstFailure ? 1 : 0, firstFailure, exits };
}

/** Splits the launcher's own options from the script and its arguments. */
function parseCommandLine(argv: readonly string[]) {
  const args = argv[0] === "--" ? argv.slice(1) : argv; // `deno task launch -- ...`
  const withValue = new Set(["--nproc", "-n", "--nproc-per-node", "--grace", "--timeout", "--flags"]);
  let i = 0;
  while (i < args.length && args[i].startsWith("-")) {
    const [flag] = args[i].split("=", 1);
    i += withValue.has(flag) && !args[i].includes("=") ? 2 : 1;
  }
  const { values } = parseArgs({
    args: args.slice(0, i),
    options: {
      nproc: { type: "string", short: "n" },
      "nproc-per-node": { type: "string" },
      grace: { type: "string", default: "5" },
      timeout: { type: "string" },
      flags: { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
  });
  return { values, script: args[i], scriptArgs: args.slice(i + 1) };
}

if (import.meta.main) {
  const { values, script, scriptArgs } = parseCommandLine(Deno.args);
  const nproc = Number(values.nproc);
  const perNode = Number(values["nproc-per-node"] ?? nproc);
  if (
    values.help || !Number.isInteger(nproc) || nproc < 1 || !Number.isInteger(perNode) || perNode < 1 ||
    nproc % perNode !== 0 || script === undefined
  ) {
    console.error(
      "usage: deno task launch --nproc N [--nproc-per-node K, dividing N] [--grace S] [--timeout S] " +
        '[--flags "-A"] script.ts [args...]',
    );
    Deno.exit(values.help ? 0 : 2);
  }
  const result = await launch({
    nproc,
    nprocPerNode: perNode,
    script,
    args: scriptArgs,
    graceSeconds: Number(values.grace),
    timeoutSeconds: values.timeout === undefined ? undefined : Number(values.timeout),
    denoFlags: values.flags?.split(/\s+/).filter(Boolean),
  });
  const f = result.firstFailure;
  if (f) {
    const how = f.signal ? `killed by ${f.signal}` : `exit code ${f.code}`;
    console.error(`launch: rank ${f.rank} failed first (${how}, after ${(f.atMs / 1000).toFixed(2)} s)`);
  }
  Deno.exit(result.code);
}
