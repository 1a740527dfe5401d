/**
 * Configurations under which the CUDA backend's kernels could deadlock or race are refused
 * before anything is launched, naming why; the others complete. Each case runs a child process
 * (tests/mp/cuda_virtual_ranks.ts) whose environment is set before its CUDA context exists,
 * with a hard time limit:
 *
 *   - hardware queues: CUDA_DEVICE_MAX_CONNECTIONS set by the user (Megatron sets 1), or a
 *     context made before the library could set it (then the driver's default, 8, counts): ranks
 *     that share a GPU must not share a queue, where a kernel waiting for a peer holds up the
 *     peer's kernel behind it. The CUDA backend executed on the CPU models the queues, so a
 *     missing refusal shows up there as a deadlock (a timeout), as it would on a GPU.
 *   - peers without native atomics (GPUs joined by PCIe; modelled on the CPU executor).
 */

import assert from "node:assert/strict";
import { backendInfo } from "../mod.ts";

const cuda = backendInfo("cuda");
const ignore = !cuda.available;
const onCpu = cuda.executedOnCpu;
const child = new URL("./mp/cuda_virtual_ranks.ts", import.meta.url).pathname;

/** Runs the child with `ranks` virtual ranks and extra environment; its last result line. */
async function run(ranks: number, env: Record<string, string>, unset: string[] = []): Promise<string> {
  return (await rounds(ranks, 1, env, unset))[0];
}

/** Runs the child for `n` rounds (`mode` and `timeoutMs`: its dispatches'); one result line per round. */
async function rounds(
  ranks: number,
  n: number,
  env: Record<string, string>,
  unset: string[] = [],
  mode: "worst" | "exact" = "worst",
  timeoutMs = 3000,
  ranksPerNode?: number,
): Promise<string[]> {
  const environment = { ...Deno.env.toObject(), ...env };
  for (const name of unset) delete environment[name];
  const command = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-ffi",
      "--allow-env",
      "--allow-read",
      child,
      String(ranks),
      String(n),
      mode,
      String(timeoutMs),
      ...(ranksPerNode ? [String(ranksPerNode)] : []),
    ],
    env: environment,
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(60_000),
  });
  const out = await command.output();
  const text = new TextDecoder().decode(out.stdout).trim();
  const lines = text.split("\n").filter((l) => /^(ok|error) /.test(l));
  const why = `exit ${out.code}: ${text}\n${new TextDecoder().decode(out.stderr)}`;
  assert.ok(out.success && (lines.length === n || lines.at(-1)?.startsWith("error -")), why);
  return lines;
}

const queues = "CUDA_DEVICE_MAX_CONNECTIONS";

Deno.test({ name: "cuda config: shared hardware queues", ignore }, async (t) => {
  await t.step("4 queues, 3 ranks on one GPU: refused, naming the variable", async () => {
    const line = await run(3, { [queues]: "4", SY_CUDA_CPU_DEVICES: "1" });
    assert.match(line, /^error \d UNSUPPORTED .*share its 4 hardware queues \(CUDA_DEVICE_MAX_CONNECTIONS=4\)/);
    assert.match(line, /Set CUDA_DEVICE_MAX_CONNECTIONS=32/);
  });
  await t.step("1 queue, 1 rank: nobody to wait for, it completes", async () => {
    assert.match(await run(1, { [queues]: "1", SY_CUDA_CPU_DEVICES: "1" }), /^ok \d+/);
  });
  await t.step("32 queues, 3 ranks: it completes", async () => {
    assert.match(await run(3, { [queues]: "32", SY_CUDA_CPU_DEVICES: "1" }), /^ok \d+/);
  });
  await t.step({
    name: "a context older than the library: the default 8 queues count (4 ranks refused, 2 complete)",
    ignore: !onCpu, // the CPU executor can pretend someone else made the context
    fn: async () => {
      const env = { SY_CUDA_CPU_CONTEXT_BEFORE: "1", SY_CUDA_CPU_DEVICES: "1" };
      assert.match(
        await run(4, env, [queues]),
        /^error \d UNSUPPORTED .*8 hardware queues \(the driver's default of 8: a CUDA context existed/,
      );
      assert.match(await run(2, env, [queues]), /^ok \d+/);
    },
  });
});

Deno.test(
  { name: "cuda config: peers on GPUs without native atomics are refused", ignore: ignore || !onCpu },
  async () => {
    const line = await run(2, { SY_CUDA_CPU_DEVICES: "2", SY_CUDA_CPU_P2P_ATOMICS: "0" });
    assert.match(line, /^error \d UNSUPPORTED .*rank 1 is on GPU 1.*no native atomics/);
    assert.match(await run(2, { SY_CUDA_CPU_DEVICES: "2" }), /^ok \d+/);
  },
);

Deno.test({
  name: "cuda config: a launch that fails on one rank fails the operation everywhere at once; the next one works",
  ignore: ignore || !onCpu, // the CPU executor injects the failure
}, async (t) => {
  const env = (kernel: string) => ({ SY_CUDA_CPU_DEVICES: "1", SY_CUDA_CPU_FAIL_LAUNCH: kernel });
  // Rank r's error line: code and milliseconds.
  const errorOf = (line: string, r: number) => {
    const m = line.match(new RegExp(`error ${r} (\\w+) \\S+ (\\d+): ([^|]*)`));
    return m ? { code: m[1], ms: Number(m[2]), message: m[3] } : undefined;
  };
  // A dispatch whose route kernel (the exchange still runs, as a rejection) or exchange kernel
  // (the refusal takes its place) fails to launch: the peer hears of it in milliseconds.
  for (const kernel of ["route_kernel", "dispatch_exchange_kernel"]) {
    await t.step(`${kernel}: the peer fails in milliseconds, naming the rank`, async () => {
      const [first, second] = await rounds(2, 2, env(kernel));
      const failed = [0, 1].find((r) => /LaunchOutOfResources/.test(errorOf(first, r)?.message ?? ""));
      assert.ok(failed !== undefined, first);
      const peer = errorOf(first, 1 - failed);
      assert.equal(peer?.code, "PEER_FAILED", first);
      assert.match(peer!.message, new RegExp(`rank ${failed} rejected its input`));
      assert.ok(peer!.ms < 2000, first);
      assert.match(second, /^ok \d+/, `the epochs stayed in step: ${second}`);
    });
  }
  // Two hops, 4 ranks as 2 nodes of 2: the peers' network hops wait for this rank's, which never
  // runs. In dispatch every peer waits for it; in combine only the chains that pass through it do,
  // and a rank whose tokens do not need it (another column) may finish its combine first.
  for (const op of ["dispatch", "combine"]) {
    await t.step(
      `${op}_network_kernel (two hops): the peers fail in milliseconds; the buffers are given up`,
      async () => {
        const [first, second] = await rounds(4, 2, env(`${op}_network_kernel`), [], "worst", 3000, 2);
        const failed = [0, 1, 2, 3].find((r) => /LaunchOutOfResources/.test(errorOf(first, r)?.message ?? ""));
        assert.ok(failed !== undefined, first);
        if (op === "combine") assert.match(errorOf(first, failed)!.message, /combine: launching its kernels/, first);
        const peers = [0, 1, 2, 3].filter((r) => r !== failed && (op === "dispatch" || errorOf(first, r)));
        assert.ok(peers.length > 0, first);
        for (const r of peers) {
          const peer = errorOf(first, r);
          assert.equal(peer?.code, "PEER_FAILED", first);
          assert.match(peer!.message, new RegExp(`abandoned by rank ${failed}`));
          assert.ok(peer!.ms < 2000, first);
        }
        // The network rings' counters are out of step now: every rank fails the next operation.
        for (const r of [0, 1, 2, 3]) {
          assert.match(errorOf(second, r)?.message ?? "", /cannot be used again|counters out of step/, second);
        }
      },
    );
  }
  await t.step("combine_reduce_kernel: the end handshake still runs; the peer's combine completes", async () => {
    const [first, second] = await rounds(2, 2, env("combine_reduce_kernel"));
    const failed = [0, 1].filter((r) => errorOf(first, r) !== undefined);
    assert.equal(failed.length, 1, first);
    assert.match(errorOf(first, failed[0])!.message, /combine: launching its kernels.*LaunchOutOfResources/);
    assert.match(second, /^ok \d+/, `the epochs stayed in step: ${second}`);
  });
});

// 4 ranks as 2 nodes of 2, a 300 ms deadline; one rank's network kernel of `op` starts 2.5 s late
// (the first launch of it in the process: whichever rank got there first). The peers wait for it
// directly or through what it holds up; a waiter names it and the network hop (the one it never
// started, whatever the waiter waited in), and the others hear from a waiter, which names it too.
for (const op of ["dispatch", "combine"]) {
  const kernel = `${op}_network_kernel`;
  Deno.test({
    name: `cuda config: a rank late for the network hop of a two-hop ${op} fails every peer, naming it and the hop`,
    ignore: ignore || !onCpu, // the CPU executor holds the kernel back
  }, async () => {
    const env = { SY_CUDA_CPU_DEVICES: "1", SY_CUDA_CPU_DELAY_START: `${kernel}:2500:1` };
    const [line] = await rounds(4, 1, env, [], "worst", 300, 2);
    const errors = line.split(" | ").map((e) => e.match(/^error (\d) (\w+) \S+ (\d+): (.*)$/));
    assert.equal(errors.filter((e) => e).length, 4, line);
    const named = line.match(new RegExp(`waiting for rank (\\d) in two-hop ${op}`));
    assert.ok(named, line);
    const late = Number(named[1]);
    for (const e of errors) {
      const [, r, code, ms, message] = e!;
      if (Number(r) === late) continue;
      assert.ok(code === "TIMEOUT" || code === "PEER_FAILED", line);
      assert.match(message, new RegExp(`rank ${late} in two-hop ${op}, the network hop`));
      assert.ok(Number(ms) < 2000, `rank ${r} took ${ms} ms: ${line}`);
    }
  });
}

Deno.test({
  name: "cuda config: the host's wait for the received counts runs from the exchange kernel's start",
  ignore: ignore || !onCpu, // the CPU executor holds the kernel back
}, async () => {
  // Work queued before the exchange (as a long GEMM on the compute stream would be) holds it for
  // 2.5 s; the timeout is 300 ms, so the host's wait (2 * 300 + 1000 ms) would run out first if it
  // counted from the call. It must not: the exchange, once it runs, completes.
  const env = { SY_CUDA_CPU_DEVICES: "1", SY_CUDA_CPU_DELAY_START: "dispatch_exchange_kernel:2500" };
  const [line] = await rounds(2, 1, env, [], "exact", 300);
  assert.match(line, /^ok \d+/);
});
