/**
 * Groups: the set of ranks that exchange tokens. `Group.local` places every rank in this
 * process (virtual ranks); `Group.fromEnv` makes this process one rank of a job whose ranks are
 * processes that meet at a rendezvous store (the production shape).
 *
 * @module
 */

import { GroupOptions, ProcessGroupOptions as ProcessGroupOptionsStruct } from "../ffi/structs.ts";
import { EpBuffer, type EpBufferOptions } from "./buffer.ts";
import { denoEnv, type DistEnv, type EnvReader, readDistEnv } from "./dist_env.ts";
import { SwitchyardError, SwitchyardTimeoutError } from "./errors.ts";
import { type JobSecretPlace, jobSecretPlace, readJobSecret, removeJobSecret, writeJobSecret } from "./job_secret.ts";
import { check, integerArg, native, NativeResource, OutHandle } from "./native.ts";
import { Rank } from "./rank.ts";
import { findNccl, ncclNotFound, type NcclStatus, ncclVersionString } from "./nccl.ts";
import { isLoopback, StoreClient, StoreServer } from "./store.ts";

/** Where the ranks' memory and work live. */
export type Backend = "host" | "cuda";

/** Options of {@linkcode Group.local}. */
export interface LocalGroupOptions {
  /** Number of virtual ranks in this process (1..64). */
  readonly ranks: number;
  /** `"host"` (CPU memory and threads, the default) or `"cuda"`. */
  readonly backend?: Backend;
  /** Deadline of every wait, in milliseconds (default 20000). */
  readonly timeoutMs?: number;
  /** CUDA: the first device; ranks spread round-robin over the devices from there. */
  readonly firstDevice?: number;
  /**
   * Virtual nodes: ranks `[n * ranksPerNode, (n + 1) * ranksPerNode)` form node `n` (default:
   * one node of every rank). Must divide `ranks`. Layouts count tokens per node.
   */
  readonly ranksPerNode?: number;
  /**
   * The host backend's emulated NIC (the network hop across virtual nodes): a link of
   * `gbPerSecond` (10^9 bytes per second) per rank and `latencyUs` one way, so that what the
   * network costs shows in the timings (default: copies at memory speed).
   */
  readonly emulatedNic?: EmulatedNicModel;
}

/** A modelled network link: see {@linkcode LocalGroupOptions.emulatedNic}. */
export interface EmulatedNicModel {
  /** Bandwidth per rank, in GB/s (10^9 bytes per second), 0.001..10^6; 0 or absent: memory speed. */
  readonly gbPerSecond?: number;
  /** One-way latency in microseconds, 0..10^6. */
  readonly latencyUs?: number;
}

/** Options of {@linkcode Group.fromEnv}. */
export interface ProcessGroupOptions {
  /** `"host"` (the default) or `"cuda"`; every rank must choose the same. */
  readonly backend?: Backend;
  /** Deadline of every wait, in milliseconds (default 20000). */
  readonly timeoutMs?: number;
  /**
   * Deadline of meeting the other ranks (reaching rank 0's store, and every rank's arrival), in
   * milliseconds (default `timeoutMs`). Processes start at different times: give it room.
   */
  readonly joinTimeoutMs?: number;
  /** CUDA: the device of this process (default: LOCAL_RANK). */
  readonly device?: number;
  /** The host backend's emulated NIC between the job's nodes (see {@linkcode LocalGroupOptions.emulatedNic}). */
  readonly emulatedNic?: EmulatedNicModel;
  /** Where to read the variables (default: `Deno.env`, as far as `--allow-env` grants). */
  readonly env?: EnvReader;
}

const MAX_LOCAL_RANKS = 64;
const DEFAULT_TIMEOUT_MS = 20000;

function backendArg(backend: unknown): Backend {
  if (backend !== "host" && backend !== "cuda") {
    throw new SwitchyardError("INVALID_ARGUMENT", `backend: expected "host" or "cuda", got ${String(backend)}`, {
      argument: "backend",
    });
  }
  return backend;
}

/** `ranksPerNode` of Group.local: divides `ranks` (0 to the library: one node). */
function ranksPerNodeArg(value: unknown, ranks: number): number {
  if (value === undefined) return 0;
  const perNode = integerArg("ranksPerNode", value, 1, ranks);
  if (ranks % perNode !== 0) {
    throw new SwitchyardError(
      "INVALID_ARGUMENT",
      `ranksPerNode: ${perNode} does not divide the ${ranks} ranks into whole nodes`,
      { argument: "ranksPerNode" },
    );
  }
  return perNode;
}

/** Validates an emulated NIC model and writes it into a group options struct. */
function setNicModel(
  opts: { set(field: "emulated_nic_bytes_per_second" | "emulated_nic_latency_ns", value: number): unknown },
  nic: EmulatedNicModel = {},
): void {
  const gbPerSecond = nic.gbPerSecond ?? 0;
  if (typeof gbPerSecond !== "number" || !(gbPerSecond === 0 || (gbPerSecond >= 1e-3 && gbPerSecond <= 1e6))) {
    throw new SwitchyardError(
      "INVALID_ARGUMENT",
      `emulatedNic.gbPerSecond: expected 0 or 0.001..1000000, got ${String(gbPerSecond)}`,
      { argument: "emulatedNic.gbPerSecond" },
    );
  }
  const latencyUs = nic.latencyUs ?? 0;
  if (typeof latencyUs !== "number" || !(latencyUs >= 0 && latencyUs <= 1e6)) {
    throw new SwitchyardError(
      "INVALID_ARGUMENT",
      `emulatedNic.latencyUs: expected 0..1000000, got ${String(latencyUs)}`,
      { argument: "emulatedNic.latencyUs" },
    );
  }
  opts.set("emulated_nic_bytes_per_second", gbPerSecond * 1e9);
  opts.set("emulated_nic_latency_ns", Math.round(latencyUs * 1000));
}

/** How a process group met (undefined for virtual ranks). */
interface Rendezvous {
  readonly env: DistEnv;
  readonly store: StoreClient;
  readonly server?: StoreServer;
  // Rank 0 of a job without SWITCHYARD_TOKEN: the secret's file, removed with the group.
  readonly secret?: JobSecretPlace;
  nccl: NcclStatus;
}

/**
 * Connects to the store with the job's token, or, without one on a loopback store, with the
 * secret rank 0 wrote for the job (job_secret.ts): read until the deadline, and read again if
 * the store refuses it (the file may be an earlier job's until rank 0 has written this one's).
 */
async function connectToStore(
  env: DistEnv,
  get: EnvReader,
  timeoutMs: number,
  joinTimeoutMs: number,
): Promise<StoreClient> {
  const options = {
    hostname: env.masterAddr,
    port: env.masterPort,
    rank: env.rank,
    worldSize: env.worldSize,
    timeoutMs,
  };
  if (env.token !== undefined || !isLoopback(env.masterAddr)) {
    return StoreClient.connect({ ...options, token: env.token, connectTimeoutMs: joinTimeoutMs });
  }
  const place = jobSecretPlace(get, env.masterPort);
  const deadline = performance.now() + joinTimeoutMs;
  for (;;) {
    const left = Math.max(1, Math.round(deadline - performance.now()));
    const secret = readJobSecret(place);
    try {
      if (secret !== undefined) {
        return await StoreClient.connect({ ...options, token: secret, connectTimeoutMs: left });
      }
    } catch (e) {
      if (!(e instanceof SwitchyardError && e.argument === "SWITCHYARD_TOKEN") || performance.now() > deadline) throw e;
    }
    if (performance.now() > deadline) {
      throw new SwitchyardTimeoutError(
        "TIMEOUT",
        `rank ${env.rank}: no secret for this job at ${place.file} within ${joinTimeoutMs} ms; rank 0 writes it when it ` +
          "starts (without SWITCHYARD_TOKEN, the ranks of one host share a secret there): is rank 0 running, as " +
          "this user, with the same MASTER_PORT?",
        {
          peerRank: 0,
          role: "rendezvous",
          channel: -1,
          expected: 0n,
          observed: 0n,
          waitedSeconds: joinTimeoutMs / 1e3,
        },
        { rank: env.rank },
      );
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Brings up NCCL for a process group on the CUDA backend: every rank must have a usable NCCL,
 * rank 0's unique id travels through the store, every rank joins the communicator. Within one
 * node nothing needs NCCL, so a bootstrap NCCL refuses (several processes on one GPU: "Duplicate
 * GPU detected") turns it off on every rank, with the reason and the rank that hit it, instead
 * of failing the group: each rank's outcome goes through the store, so all ranks agree.
 */
async function bootstrapNccl(pointer: Deno.PointerObject, backend: Backend, store: StoreClient): Promise<NcclStatus> {
  if (backend === "host") {
    return { enabled: false, reason: "the host backend moves data through shared memory and does not use NCCL" };
  }
  const { found, tried } = findNccl();
  const all = await store.exchange("nccl/found", found ? found.path : "");
  const without = all.findIndex((p) => p === "");
  if (!found || without >= 0) {
    return { enabled: false, reason: found ? `rank ${without} has no usable NCCL` : ncclNotFound(tried) };
  }
  const message = (e: unknown) => (e instanceof Error ? e.message : String(e)).replace(/\s+/g, " ");
  const path = new TextEncoder().encode(found.path + "\0");
  // Rank 0 posts the unique id, or "!" and why it has none.
  let posted = "";
  if (store.rank === 0) {
    const id = new Uint8Array(128);
    try {
      check(native().sy_group_nccl_unique_id(pointer, path, id), pointer, "NCCL unique id");
      posted = btoa(String.fromCharCode(...id));
    } catch (e) {
      posted = `!${message(e)}`;
    }
  }
  const root = (await store.exchange("nccl/id", posted))[0];
  if (root.startsWith("!")) return { enabled: false, reason: `rank 0: ${root.slice(1)}` };
  let failure = "";
  try {
    const rootId = Uint8Array.from(atob(root), (c) => c.charCodeAt(0));
    check(await native().sy_group_nccl_init(pointer, path, rootId), pointer, "NCCL communicator");
  } catch (e) {
    failure = message(e) || "failed";
  }
  const outcomes = await store.exchange("nccl/init", failure);
  const failed = outcomes.findIndex((o) => o !== "");
  // A rank whose own init succeeded while another's failed keeps its (unused) communicator until
  // the group is disposed: destroying it here could wait on peers that never joined.
  if (failed >= 0) return { enabled: false, reason: `rank ${failed}: ${outcomes[failed]}` };
  return { enabled: true, version: found.version, path: found.path };
}

/**
 * A group of ranks.
 *
 * @example
 * ```ts
 * import { Group } from "@switchyard/ep";
 * using group = Group.local({ ranks: 4 });
 * console.log(group.size); // 4
 * ```
 */
export class Group extends NativeResource {
  /** The ranks that live in this process, by slot (all of them for `Group.local`, one for `Group.fromEnv`). */
  readonly ranks: readonly Rank[];
  /** The backend the group runs on. */
  readonly backend: Backend;
  /** Ranks in the whole group. */
  readonly size: number;
  readonly #rendezvous: Rendezvous | undefined;
  #buffersCreated = 0;
  readonly #barriers = new Map<string, number>();

  private constructor(
    pointer: Deno.PointerObject,
    backend: Backend,
    size: number,
    localCount: number,
    rv?: Rendezvous,
  ) {
    super(pointer, (p) => native().sy_group_destroy(p), "group");
    this.backend = backend;
    this.size = size;
    this.#rendezvous = rv;
    const ranks: Rank[] = [];
    try {
      for (let i = 0; i < localCount; i++) {
        const out = new OutHandle();
        check(native().sy_group_rank(pointer, i, out.cell), pointer, "group rank");
        ranks.push(new Rank(out.take(), this));
      }
    } catch (e) {
      for (const r of ranks) r[Symbol.dispose]();
      throw e;
    }
    this.ranks = Object.freeze(ranks);
  }

  /** A group of `ranks` virtual ranks in this process. */
  static local(options: LocalGroupOptions): Group {
    const ranks = integerArg("ranks", options?.ranks, 1, MAX_LOCAL_RANKS);
    const backend = backendArg(options.backend ?? "host");
    const opts = GroupOptions.create()
      .set("backend", backend === "host" ? 0 : 1)
      .set("ranks", ranks)
      .set("first_device", integerArg("firstDevice", options.firstDevice ?? 0, 0, 65536))
      .set("timeout_ms", integerArg("timeoutMs", options.timeoutMs ?? 0, 0, 2 ** 40))
      .set("ranks_per_node", ranksPerNodeArg(options.ranksPerNode, ranks));
    setNicModel(opts, options.emulatedNic);
    const out = new OutHandle();
    check(native().sy_group_create_local(opts.bytes, out.cell), null, "Group.local");
    return new Group(out.take(), backend, ranks, ranks);
  }

  /**
   * This process as one rank of a job: reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
   * `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` (or Slurm's variables), meets the other
   * ranks at the rendezvous store rank 0 serves (loopback unless MASTER_ADDR says otherwise;
   * `SWITCHYARD_TOKEN` checked when set), and fails naming the ranks that never arrive.
   * Needs `--allow-net` besides `--allow-ffi`, `--allow-env` and `--allow-read`.
   */
  static async fromEnv(options: ProcessGroupOptions = {}): Promise<Group> {
    const get = options.env ?? denoEnv;
    let env = readDistEnv(get);
    const backend = backendArg(options.backend ?? "host");
    const timeoutMs = integerArg("timeoutMs", options.timeoutMs ?? DEFAULT_TIMEOUT_MS, 1, 2 ** 40);
    const joinTimeoutMs = integerArg("joinTimeoutMs", options.joinTimeoutMs ?? timeoutMs, 1, 2 ** 40);
    // Without SWITCHYARD_TOKEN on a loopback store, rank 0 makes the job's secret (job_secret.ts).
    const secret = env.rank === 0 && env.token === undefined && isLoopback(env.masterAddr)
      ? jobSecretPlace(get, env.masterPort)
      : undefined;
    if (secret) env = { ...env, token: writeJobSecret(secret) };
    let server: StoreServer | undefined;
    let store: StoreClient | undefined;
    try {
      server = env.rank === 0
        ? StoreServer.listen({
          hostname: env.masterAddr,
          port: env.masterPort,
          worldSize: env.worldSize,
          token: env.token,
        })
        : undefined;
      store = await connectToStore(env, get, timeoutMs, joinTimeoutMs);
      if (server) store.servedBy(server);
      // Everyone arrives, and agrees on what the group is.
      const mine = JSON.stringify({ backend, worldSize: env.worldSize });
      const all = await store.exchange("join", mine, joinTimeoutMs);
      const odd = all.findIndex((v) => v !== mine);
      if (odd >= 0) {
        throw new SwitchyardError(
          "INVALID_ARGUMENT",
          `backend: rank ${odd} joined with ${all[odd]}, rank ${env.rank} with ${mine}; every rank must agree`,
          { argument: "backend", rank: env.rank },
        );
      }
      const opts = ProcessGroupOptionsStruct.create()
        .set("backend", backend === "host" ? 0 : 1)
        .set("world_size", env.worldSize)
        .set("rank", env.rank)
        .set("local_rank", env.localRank)
        .set("local_world_size", env.localWorldSize)
        .set("device", integerArg("device", options.device ?? -1, -1, 65536))
        .set("timeout_ms", timeoutMs);
      setNicModel(opts, options.emulatedNic);
      const out = new OutHandle();
      check(native().sy_group_create_process(opts.bytes, out.cell), null, "Group.fromEnv");
      const rv: Rendezvous = { env, store, server, secret, nccl: { enabled: false } };
      const group = new Group(out.take(), backend, env.worldSize, 1, rv);
      try {
        rv.nccl = await bootstrapNccl(group.pointer, backend, store);
      } catch (e) {
        group[Symbol.dispose]();
        throw e;
      }
      return group;
    } catch (e) {
      store?.close();
      // The ranks still connected may have answers on their way (a rendezvous rank 0 gave up).
      server?.closeWhenIdle(Math.min(timeoutMs, 2000));
      if (secret) removeJobSecret(secret);
      throw e;
    }
  }

  /** Whether the ranks are separate processes (`Group.fromEnv`). */
  get isProcessGroup(): boolean {
    return this.#rendezvous !== undefined;
  }

  /** Whether the group uses NCCL (process groups on the CUDA backend), and if not, why. */
  get nccl(): NcclStatus {
    return this.#rendezvous?.nccl ??
      { enabled: false, reason: "virtual ranks in one process share memory directly and need no NCCL" };
  }

  /** The NCCL version in use, as text ("2.29.7"), or undefined. */
  get ncclVersion(): string | undefined {
    const v = this.nccl.version;
    return v === undefined ? undefined : ncclVersionString(v);
  }

  /** The job's environment, for a process group. */
  get distEnv(): DistEnv | undefined {
    return this.#rendezvous?.env;
  }

  /**
   * One communication buffer per rank of this process, created together: collective, so every
   * rank of the group creates its buffers with the same options in the same order. In a process
   * group the ranks then map each other's buffers through the rendezvous.
   */
  async createBuffers(options: EpBufferOptions): Promise<EpBuffer[]> {
    const made: EpBuffer[] = [];
    try {
      for (const r of this.ranks) made.push(EpBuffer.create(r, options));
      const rv = this.#rendezvous;
      if (rv) {
        const n = this.#buffersCreated++;
        const buffer = made[0];
        const shares = await rv.store.exchange(`buffer/${n}`, buffer.exportShare());
        shares.forEach((share, r) => {
          if (r !== rv.env.rank) buffer.importShare(share);
        });
        try {
          await rv.store.barrier(`buffer/${n}/mapped`);
        } catch (e) {
          // Every peer's buffer is mapped here, and the fastest peers may already wait in a first
          // operation: they learn at once that this rank gave up, and why, instead of timing out.
          if (e instanceof SwitchyardTimeoutError && e.peerRank >= 0) {
            try {
              buffer.abandon(e.peerRank);
            } catch {
              // the failure to report is the rendezvous's; the peers then time out on their own
            }
          }
          throw e;
        }
        buffer.seal(); // every peer has mapped it: its name can go
      }
    } catch (e) {
      for (const b of made) b[Symbol.dispose]();
      throw e;
    }
    return made;
  }

  /** Runs `fn` for every rank of this process concurrently and collects the results in rank order. */
  all<T>(fn: (rank: Rank, index: number) => Promise<T> | T): Promise<T[]> {
    return Promise.all(this.ranks.map((r, i) => fn(r, i)));
  }

  /** Process groups: waits until every rank reached `name` (deadline-bounded, names the missing). */
  async barrier(name: string): Promise<void> {
    const rv = this.#rendezvous;
    if (!rv) throw new SwitchyardError("INVALID_ARGUMENT", "barrier: only process groups meet at a rendezvous");
    const n = this.#barriers.get(name) ?? 0;
    this.#barriers.set(name, n + 1);
    await rv.store.barrier(`user/${name}/${n}`);
  }

  /** Releases the ranks (and their compute streams) and the rendezvous with the group. */
  protected override disposeChildren(): void {
    for (const r of this.ranks) r[Symbol.dispose]();
    this.#rendezvous?.store.close();
    this.#rendezvous?.server?.closeWhenIdle(this.#rendezvous.store.timeoutMs);
    if (this.#rendezvous?.secret) removeJobSecret(this.#rendezvous.secret);
  }
}
