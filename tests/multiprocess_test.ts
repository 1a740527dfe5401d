/**
 * One rank per process: jobs of 2 and 4 processes started by the launcher do the full round trip
 * through shared buffers (POSIX shared memory on the host backend, CUDA IPC on the CUDA backend,
 * `SWITCHYARD_TEST_BACKEND=cuda`); a process killed inside a dispatch, a rank that never arrives
 * and a wrong token make the others fail within a bounded time, naming the rank. Every job has a
 * hard time limit. Both backends run the low-latency parts too.
 */

import assert from "node:assert/strict";
import { backendInfo, Rng } from "../mod.ts";
import { launch } from "../src/cli/launch.ts";
import { softVerbsBuilt, softVerbsLibrary, testBackend } from "./helpers.ts";

const script = new URL("./mp/roundtrip.ts", import.meta.url).pathname;
const backend = testBackend();

async function job(
  nproc: number,
  args: string[],
  graceSeconds = 15,
  env: Record<string, string> = {},
  nprocPerNode = nproc,
) {
  const lines: string[] = [];
  const started = performance.now();
  const result = await launch({
    nproc,
    nprocPerNode,
    script,
    env,
    args: [...args, "--backend", backend],
    graceSeconds,
    timeoutSeconds: 60,
    write: (_, line) => lines.push(line),
  });
  return { ...result, lines, ms: performance.now() - started };
}

/** The shared memory segments these processes left (Deno reads /dev/shm only with --allow-all). */
function segmentsOf(pids: number[]): string[] {
  const ls = new Deno.Command("ls", { args: ["/dev/shm"], stdout: "piped" }).outputSync();
  assert.ok(ls.success, "ls /dev/shm");
  return new TextDecoder().decode(ls.stdout).split("\n").filter((n) =>
    pids.some((p) => n.startsWith(`switchyard-${p}-`))
  );
}

for (const [nproc, perNode] of [[2, 2], [4, 4], [4, 2]]) {
  const nodes = nproc / perNode;
  // Across nodes, network rings of 4 entries: the processes wait on each other's credit (and the
  // CUDA dispatch puts runs of two records).
  const rings = nodes > 1 ? ", rings of 4" : "";
  Deno.test(`${nproc} processes (${nodes} node${nodes > 1 ? "s" : ""} of ${perNode}${rings}) on the ${backend} backend: round trips through the launcher`, async () => {
    const r = await job(nproc, ["--rounds", "3", ...(nodes > 1 ? ["--network-ring", "4"] : [])], 15, {}, perNode);
    assert.equal(r.code, 0, r.lines.join("\n"));
    for (let rank = 0; rank < nproc; rank++) {
      assert.ok(r.lines.includes(`[rank ${rank}] rank ${rank} ok`), r.lines.join("\n"));
      const node = Math.floor(rank / perNode);
      assert.ok(r.lines.includes(`[rank ${rank}] rank ${rank} is on node ${node} of ${nodes}`), r.lines.join("\n"));
      if (nodes > 1) {
        assert.ok(r.lines.includes(`[rank ${rank}] rank ${rank}: the hierarchical combine ran`), r.lines.join("\n"));
      }
    }
    assert.deepEqual(segmentsOf(r.exits.map((e) => e.pid)), []);
  });
}

// The CUDA backend's network hop through the proxy's ibverbs engine, between processes: each
// process's software NIC (tests/native/soft_verbs.cpp) carries the RDMA writes to the others
// through shared memory, the queue pairs connected from the endpoints the buffers' shares carry.
const softVerbs = softVerbsBuilt() && backendInfo("cuda").executedOnCpu && backend === "cuda";
const ibverbsEnv = (): Record<string, string> => ({
  SWITCHYARD_NIC: "ibverbs",
  SWITCHYARD_IBVERBS_LIBRARY: softVerbsLibrary(),
  SOFT_VERBS_JITTER_US: "20",
});
Deno.test({
  name: "4 processes (2 nodes of 2, rings of 4) on the CUDA backend, the network hop through ibverbs over RoCE, " +
    "GPU memory registered through dma-buf: round trips",
  ignore: !softVerbs,
}, async () => {
  // Each process's NIC a RoCE port on a routed fabric (only RoCE v2 arrives: each engine must
  // choose such a GID by itself) on a host without nvidia-peermem (only dma-buf registers).
  const env = { ...ibverbsEnv(), SOFT_VERBS_LINK_LAYER: "ethernet", SOFT_VERBS_PEERMEM: "0" };
  const r = await job(4, ["--rounds", "3", "--network-ring", "4"], 15, env, 2);
  assert.equal(r.code, 0, r.lines.join("\n"));
  for (let rank = 0; rank < 4; rank++) {
    assert.ok(r.lines.includes(`[rank ${rank}] rank ${rank} ok`), r.lines.join("\n"));
    assert.ok(r.lines.includes(`[rank ${rank}] rank ${rank}: the hierarchical combine ran`), r.lines.join("\n"));
  }
  assert.deepEqual(segmentsOf(r.exits.map((e) => e.pid)), []);
});

Deno.test({
  name: "RoCE v1 set on a routed fabric (SWITCHYARD_IBVERBS_GID_INDEX=0): every process fails as soon as its NIC " +
    "gives up, naming a peer and the NIC's status, long before the deadline",
  ignore: !softVerbs,
}, async () => {
  // Every queue pair's packets are dropped: each NIC fails its first put after the transport
  // timeout (4.096 us * 2^10 * 8 tries, about 34 ms); the kernels see their proxy's refusal
  // while they wait for the peers, not only when they post.
  const env = {
    ...ibverbsEnv(),
    SOFT_VERBS_LINK_LAYER: "ethernet",
    SWITCHYARD_IBVERBS_GID_INDEX: "0",
    SWITCHYARD_IBVERBS_TIMEOUT: "10",
  };
  const r = await job(4, ["--rounds", "1", "--network-ring", "4", "--timeout", "20000"], 30, env, 2);
  const report = r.lines.join("\n");
  assert.equal(r.code, 1, report);
  for (let rank = 0; rank < 4; rank++) {
    const line = r.lines.find((l) => l.startsWith(`[rank ${rank}] rank ${rank} failed after`));
    assert.ok(line, report);
    console.log(`  ${line}`);
    assert.match(line!, /PEER_FAILED peerRank=\d/);
    assert.ok(Number(line!.match(/failed after (\d+) ms/)![1]) < 5000, report);
  }
  assert.ok(r.lines.some((l) => /ibverbs: a put failed: transport retry counter exceeded/.test(l)), report);
});

Deno.test({
  name: "the processes really take the ibverbs engine: with no provider library there, the job fails saying so",
  ignore: !softVerbs,
}, async () => {
  const env = { ...ibverbsEnv(), SWITCHYARD_IBVERBS_LIBRARY: "/nonexistent/libibverbs.so.1" };
  const r = await job(4, ["--rounds", "1", "--network-ring", "4"], 15, env, 2);
  const report = r.lines.join("\n");
  assert.notEqual(r.code, 0, report);
  // The first to fail says why; the others may see it go first (the rendezvous, the barrier).
  const said = /rank \d: ibverbs: cannot open \/nonexistent\/libibverbs\.so\.1/;
  assert.ok(r.lines.some((l) => said.test(l)), report);
  assert.ok(r.exits.every((e) => e.code !== 0), report);
});

Deno.test({
  name: "SWITCHYARD_NIC=gin where the library has no NCCL device API (the CPU-executed build): every process " +
    "refuses it when it creates its buffer, saying why",
  ignore: !(backend === "cuda" && backendInfo("cuda").executedOnCpu),
}, async () => {
  const r = await job(4, ["--rounds", "1", "--network-ring", "4"], 15, { SWITCHYARD_NIC: "gin" }, 2);
  const report = r.lines.join("\n");
  assert.notEqual(r.code, 0, report);
  assert.ok(r.exits.every((e) => e.code !== 0), report);
  // The first to fail says why; the others may see it go first (the rendezvous of the shares).
  const said = /rank \d: SWITCHYARD_NIC=gin: this library was built without NCCL's device API/;
  assert.ok(r.lines.some((l) => said.test(l)), report);
});

for (const [nproc, perNode, nic] of [[3, 3, ""], [4, 2, ""], [4, 2, "ibverbs"]] as const) {
  const where = (perNode < nproc ? ` (${nproc / perNode} nodes of ${perNode}: two hops)` : "") +
    (nic ? ", the network hop through ibverbs" : "");
  Deno.test({
    name: `a process killed inside a dispatch${where}: the others fail within the deadline, naming it`,
    ignore: nic === "ibverbs" && !softVerbs,
  }, async () => {
    const timeoutMs = 1500;
    const args = ["--rounds", "5", "--die-at", "2", "--die-rank", "2", "--timeout", String(timeoutMs)];
    const r = await job(nproc, args, 15, nic ? ibverbsEnv() : {}, perNode);
    const report = r.lines.join("\n");
    assert.equal(r.code, 1, report);
    assert.equal(r.firstFailure?.rank, 2);
    assert.equal(r.firstFailure?.signal, "SIGKILL");
    for (let rank = 0; rank < nproc; rank++) {
      if (rank === 2) continue;
      const line = r.lines.find((l) => l.startsWith(`[rank ${rank}] rank ${rank} failed after`));
      assert.ok(line, report);
      assert.match(line!, /(TIMEOUT|PEER_FAILED) peerRank=2/);
      const ms = Number(line!.match(/failed after (\d+) ms/)![1]);
      console.log(`  ${line}`);
      assert.ok(ms < 4 * timeoutMs + 3000, `rank ${rank} took ${ms} ms`);
    }
    assert.ok(r.exits.every((e) => e.code !== 0), "nobody pretends to have finished");
    // The segments were unlinked once every peer had mapped them, so even the killed rank's are gone.
    assert.deepEqual(segmentsOf(r.exits.map((e) => e.pid)), []);
  });
}

for (const phase of ["dispatch", "combine"]) {
  Deno.test(`a process killed on the network hop of a ${phase} (3 nodes of 1): the others fail naming it and the hop`, async () => {
    // Rank 2 dies 250 ms into its operation, while records or partial sums are on a link with
    // 1 s of latency: past the barrier, before its flags. In a dispatch ranks 0 and 1 forward
    // for it and wait for its records; in a combine they wait for its partials and results.
    const timeoutMs = 2500; // the link's latency must stay under half of it (buffer creation checks)
    const args = [
      ...["--rounds", "4", "--die-at", "1", "--die-rank", "2", "--die-phase", phase],
      ...["--die-delay", "250", "--nic-latency-ms", "1000"],
    ];
    const r = await job(3, [...args, "--timeout", String(timeoutMs)], 15, {}, 1);
    const report = r.lines.join("\n");
    assert.equal(r.code, 1, report);
    assert.equal(r.firstFailure?.rank, 2, report);
    for (const rank of [0, 1]) {
      const line = r.lines.find((l) => l.startsWith(`[rank ${rank}] rank ${rank} failed after`));
      assert.ok(line, report);
      console.log(`  ${line}`);
      assert.match(line!, /(TIMEOUT|PEER_FAILED) peerRank=2/);
      assert.match(line!, new RegExp(`waiting for rank 2 in two-hop ${phase}, the network hop`));
      const ms = Number(line!.match(/failed after (\d+) ms/)![1]);
      assert.ok(ms < 2000 + 4 * timeoutMs + 3000, `rank ${rank} took ${ms} ms`);
    }
  });
}

Deno.test("a rank that never arrives, and a rank with the wrong token, are named", async (t) => {
  const port = (() => {
    const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const p = l.addr.port;
    l.close();
    return p;
  })();
  const start = (rank: number, token: string, world: number) =>
    new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--allow-ffi",
        "--allow-env",
        "--allow-read",
        "--allow-net",
        script,
        "--timeout",
        "800",
        "--backend",
        backend,
      ],
      env: {
        RANK: String(rank),
        WORLD_SIZE: String(world),
        LOCAL_RANK: String(rank),
        LOCAL_WORLD_SIZE: String(world),
        MASTER_ADDR: "127.0.0.1",
        MASTER_PORT: String(port),
        SWITCHYARD_TOKEN: token,
      },
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(30000),
    }).output();
  const text = (o: Deno.CommandOutput) => new TextDecoder().decode(o.stdout) + new TextDecoder().decode(o.stderr);

  await t.step("world of 3, only ranks 0 and 1 start", async () => {
    const started = performance.now();
    const outs = await Promise.all([start(0, "t", 3), start(1, "t", 3)]);
    for (const [rank, o] of outs.entries()) {
      assert.equal(o.code, 3, text(o));
      // Rank 0 gives up first and takes its store with it; rank 1 then knows whom it still lacked.
      assert.match(text(o), /"join".*(missing|waiting for) rank 2/);
      assert.match(text(o), new RegExp(`rank ${rank} failed after \\d+ ms: (TIMEOUT|PEER_FAILED) peerRank=2`));
    }
    assert.ok(performance.now() - started < 10000);
  });
  await t.step("rank 1 presents the wrong token", async () => {
    const outs = await Promise.all([start(0, "right", 2), start(1, "wrong", 2)]);
    assert.match(text(outs[1]), /rendezvous refused rank 1: wrong SWITCHYARD_TOKEN/);
    assert.match(text(outs[0]), /missing rank 1/);
  });
});

// 30 jobs in the suite; the sanitizer run of CI, where every process is instrumented, runs fewer
// with longer deadlines (an instrumented Deno takes longer to start than 400 ms allow on a busy machine).
const faultJobs = Number(Deno.env.get("SWITCHYARD_FAULT_JOBS") ?? "30");
const faultTimeoutMs = Number(Deno.env.get("SWITCHYARD_FAULT_TIMEOUT_MS") ?? "400");

Deno.test(`fault injection: SIGKILL of a random rank at a random point, ${faultJobs} jobs, nothing hangs`, async () => {
  // Short deadlines, tiny sizes: each job is 3 ranks, 2 rounds; one rank kills itself at a
  // seeded random phase and delay. Every survivor must fail on its own (the launcher's grace
  // would stop a hung one, leaving no line) with a SwitchyardTimeoutError naming the dead rank.
  const rng = new Rng(2026);
  const phases = ["join", "buffers", "dispatch", "combine", "low-latency"];
  const timeoutMs = faultTimeoutMs;
  const toFailure: number[] = [];
  for (let trial = 0; trial < faultJobs; trial++) {
    const dead = rng.int(3), phase = phases[rng.int(phases.length)], delay = rng.int(30), round = rng.int(2);
    const what = `job ${trial}: rank ${dead} dies ${delay} ms into ${phase} (round ${round})`;
    const r = await job(3, [
      "--rounds",
      "2",
      "--die-at",
      String(round),
      "--die-rank",
      String(dead),
      "--die-phase",
      phase,
      "--die-delay",
      String(delay),
      "--timeout",
      String(timeoutMs),
      // Meeting gets room: three processes starting on a busy machine can take longer than the
      // operations' deadline, and a rank still starting is not the one that died.
      "--join-timeout",
      String(Math.max(timeoutMs, 2500)),
    ], 10);
    const report = `${what}\n${r.lines.join("\n")}`;
    assert.notEqual(r.code, 0, report);
    assert.equal(r.firstFailure?.rank, dead, report);
    assert.equal(r.firstFailure?.signal, "SIGKILL", report);
    for (const rank of [0, 1, 2].filter((q) => q !== dead)) {
      const line = r.lines.find((l) => l.startsWith(`[rank ${rank}] rank ${rank} failed after`));
      assert.ok(line, `rank ${rank} never reported (hung?): ${report}`);
      assert.match(line!, new RegExp(`(TIMEOUT|PEER_FAILED) peerRank=${dead}:`), report);
      toFailure.push(Number(line!.match(/failed after (\d+) ms/)![1]));
    }
    assert.deepEqual(segmentsOf(r.exits.map((e) => e.pid)), [], report);
  }
  toFailure.sort((a, b) => a - b);
  const p50 = toFailure[Math.floor(toFailure.length / 2)], max = toFailure[toFailure.length - 1];
  console.log(`  time to failure of the survivors (from their start): p50 ${p50} ms, max ${max} ms`);
  assert.ok(max < 20 * timeoutMs + 5000, `max ${max} ms`);
});

Deno.test("a dispatch (and a low-latency dispatch) refused in one process fails in the others within milliseconds; the job goes on", async () => {
  const r = await job(3, ["--rounds", "2", "--refuse-at", "1", "--refuse-rank", "2", "--timeout", "5000"]);
  const report = r.lines.join("\n");
  assert.equal(r.code, 0, report);
  for (let rank = 0; rank < 3; rank++) {
    const line = r.lines.find((l) => l.startsWith(`[rank ${rank}] rank ${rank} saw the refusal of rank 2`));
    assert.ok(line, report);
    assert.match(line!, rank === 2 ? /INVALID_ARGUMENT$/ : /PEER_FAILED$/);
    assert.ok(Number(line!.match(/after (\d+) ms/)![1]) < 2500, line); // not the 5 s deadline
    const ll = r.lines.find((l) => l.startsWith(`[rank ${rank}] rank ${rank} saw the low-latency refusal of rank 2`));
    assert.ok(ll, report);
    assert.match(ll!, rank === 2 ? /INVALID_ARGUMENT$/ : /PEER_FAILED$/);
    assert.ok(Number(ll!.match(/after (\d+) ms/)![1]) < 2500, ll);
    assert.ok(r.lines.includes(`[rank ${rank}] rank ${rank} ok`), report);
  }
});

Deno.test({
  name: "processes on GPUs without native atomics between them are refused on every rank, naming the peer",
  // The CPU executor plays two GPUs whose peer access lacks native atomics (PCIe); a process's
  // GPU is its LOCAL_RANK's, and a peer's is where its buffer, opened by IPC handle, lives.
  ignore: backend !== "cuda" || !backendInfo("cuda").executedOnCpu,
}, async () => {
  const r = await job(2, ["--rounds", "1", "--timeout", "5000"], 15, {
    SY_CUDA_CPU_DEVICES: "2",
    SY_CUDA_CPU_P2P_ATOMICS: "0",
  });
  const report = r.lines.join("\n");
  assert.notEqual(r.code, 0, report);
  for (const [rank, peer] of [[0, 1], [1, 0]]) {
    const line = r.lines.find((l) => l.startsWith(`[rank ${rank}] rank ${rank} failed after`));
    assert.ok(line, report);
    // Rank 0 refuses as soon as its buffers are mapped and exits, taking the rendezvous store
    // with it: rank 1 may still be finishing that rendezvous, and then fails naming rank 0.
    const refused = new RegExp(`rank ${peer} is on GPU ${peer}.*no native atomics`);
    assert.ok(
      refused.test(line!) || (rank === 1 && /PEER_FAILED peerRank=0: .*store \(rank 0\) went away/.test(line!)),
      report,
    );
    assert.ok(Number(line!.match(/failed after (\d+) ms/)![1]) < 4000, line); // refused, not timed out
  }
});
