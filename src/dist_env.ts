/**
 * Where a process stands in a distributed job, from the environment launchers set: torchrun's
 * `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, with
 * Slurm's `SLURM_*` variables as a fallback, and `SWITCHYARD_TOKEN`.
 *
 * @module
 */

import { SwitchyardError } from "./errors.ts";

/** This process's place in the job. */
export interface DistEnv {
  /** Global rank. */
  readonly rank: number;
  /** Ranks in the job. */
  readonly worldSize: number;
  /** Index on this node. */
  readonly localRank: number;
  /** Ranks on this node. */
  readonly localWorldSize: number;
  /** Host of rank 0's rendezvous store. */
  readonly masterAddr: string;
  /** Its port. */
  readonly masterPort: number;
  /** The shared secret every rank must present, if set. */
  readonly token?: string;
  /** Which convention the values came from. */
  readonly source: "torchrun" | "slurm";
}

/** Reads a variable; undefined when unset or when the permission is not granted. */
export type EnvReader = (name: string) => string | undefined;

/** Reads through `Deno.env` where `--allow-env` grants it. */
export function denoEnv(name: string): string | undefined {
  const state = Deno.permissions.querySync({ name: "env", variable: name }).state;
  return state === "granted" ? Deno.env.get(name) : undefined;
}

function int(get: EnvReader, name: string, min: number, max: number): number | undefined {
  const raw = get(name);
  if (raw === undefined || raw === "") return undefined;
  const v = Number(raw);
  if (!Number.isSafeInteger(v) || v < min || v > max) {
    throw new SwitchyardError("INVALID_ARGUMENT", `${name}: expected an integer in ${min}..${max}, got "${raw}"`, {
      argument: name,
    });
  }
  return v;
}

/** Slurm writes tasks per node as "8" or "8(x2),4". The first count is this job's per-node count. */
function slurmPerNode(get: EnvReader): number | undefined {
  const raw = get("SLURM_NTASKS_PER_NODE") ?? get("SLURM_TASKS_PER_NODE");
  const m = raw?.match(/^(\d+)/);
  return m ? Number(m[1]) : undefined;
}

/** The job as the environment describes it; a SwitchyardError names what is missing or wrong. */
export function readDistEnv(get: EnvReader = denoEnv): DistEnv {
  const torchrun = get("RANK") !== undefined || get("WORLD_SIZE") !== undefined;
  const source = torchrun ? "torchrun" : "slurm";
  const worldSize = torchrun ? int(get, "WORLD_SIZE", 1, 1 << 20) : int(get, "SLURM_NTASKS", 1, 1 << 20);
  const rank = torchrun ? int(get, "RANK", 0, 1 << 20) : int(get, "SLURM_PROCID", 0, 1 << 20);
  if (worldSize === undefined || rank === undefined) {
    throw new SwitchyardError(
      "INVALID_ARGUMENT",
      "RANK: not set; Group.fromEnv needs RANK and WORLD_SIZE (torchrun) or SLURM_PROCID and SLURM_NTASKS " +
        "(and --allow-env to read them); use `deno task launch --nproc N script.ts` to start ranks locally",
      { argument: torchrun ? "RANK" : "SLURM_PROCID" },
    );
  }
  if (rank >= worldSize) {
    throw new SwitchyardError("INVALID_ARGUMENT", `RANK: ${rank} is not below WORLD_SIZE ${worldSize}`, {
      argument: "RANK",
    });
  }
  const localWorldSize = (torchrun ? int(get, "LOCAL_WORLD_SIZE", 1, worldSize) : slurmPerNode(get)) ?? worldSize;
  const localRank =
    (torchrun ? int(get, "LOCAL_RANK", 0, localWorldSize - 1) : int(get, "SLURM_LOCALID", 0, localWorldSize - 1)) ??
      rank % localWorldSize;
  // Nodes come from the numbering: rank = node * localWorldSize + localRank, every node alike
  // (torchrun's numbering; Slurm's block distribution).
  if (worldSize % localWorldSize !== 0 || rank % localWorldSize !== localRank) {
    const names = torchrun ? ["LOCAL_WORLD_SIZE", "LOCAL_RANK"] : ["SLURM_NTASKS_PER_NODE", "SLURM_LOCALID"];
    throw new SwitchyardError(
      "INVALID_ARGUMENT",
      `${names[0]}: rank ${rank} of ${worldSize} as local rank ${localRank} of ${localWorldSize} is not node-major ` +
        `numbering (rank = node * ${names[0]} + ${names[1]}, the same ${names[0]} on every node), which ` +
        "Switchyard derives the nodes from",
      { argument: names[0] },
    );
  }
  const masterAddr = get("MASTER_ADDR") || get("SLURM_LAUNCH_NODE_IPADDR") || "127.0.0.1";
  const masterPort = int(get, "MASTER_PORT", 1, 65535) ?? 29500;
  const token = get("SWITCHYARD_TOKEN") || undefined;
  return { rank, worldSize, localRank, localWorldSize, masterAddr, masterPort, token, source };
}
