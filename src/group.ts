/**
 * Groups: the set of ranks that exchange tokens.
 *
 * @module
 */

import { GroupOptions } from "../ffi/structs.ts";
import type { EpBuffer, EpBufferOptions } from "./buffer.ts";
import { SwitchyardError } from "./errors.ts";
import { check, integerArg, native, NativeResource, OutHandle } from "./native.ts";
import { Rank } from "./rank.ts";

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
}

const MAX_LOCAL_RANKS = 64;

/**
 * A group of ranks. `Group.local` places every rank in this process: threads on the host
 * backend, one or more GPUs on the CUDA backend.
 *
 * @example
 * ```ts
 * import { Group } from "@switchyard/ep";
 * using group = Group.local({ ranks: 4 });
 * console.log(group.size); // 4
 * ```
 */
export class Group extends NativeResource {
  /** The ranks, by index. */
  readonly ranks: readonly Rank[];
  /** The backend the group runs on. */
  readonly backend: Backend;

  private constructor(pointer: Deno.PointerObject, backend: Backend, size: number) {
    super(pointer, (p) => native().sy_group_destroy(p), "group");
    this.backend = backend;
    const ranks: Rank[] = [];
    try {
      for (let i = 0; i < size; i++) {
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
    const backend = options.backend ?? "host";
    if (backend !== "host" && backend !== "cuda") {
      throw new SwitchyardError("INVALID_ARGUMENT", `backend: expected "host" or "cuda", got ${String(backend)}`, {
        argument: "backend",
      });
    }
    const opts = GroupOptions.create()
      .set("backend", backend === "host" ? 0 : 1)
      .set("ranks", ranks)
      .set("first_device", integerArg("firstDevice", options.firstDevice ?? 0, 0, 65536))
      .set("timeout_ms", integerArg("timeoutMs", options.timeoutMs ?? 0, 0, 2 ** 40));
    const out = new OutHandle();
    check(native().sy_group_create_local(opts.bytes, out.cell), null, "Group.local");
    return new Group(out.take(), backend, ranks);
  }

  /** Number of ranks. */
  get size(): number {
    return this.ranks.length;
  }

  /** One communication buffer per rank, created together (they form one set). */
  createBuffers(options: EpBufferOptions): EpBuffer[] {
    const made: EpBuffer[] = [];
    try {
      for (const r of this.ranks) made.push(r.createBuffer(options));
    } catch (e) {
      for (const b of made) b[Symbol.dispose]();
      throw e;
    }
    return made;
  }

  /** Runs `fn` for every rank concurrently and collects the results in rank order. */
  all<T>(fn: (rank: Rank, index: number) => Promise<T> | T): Promise<T[]> {
    return Promise.all(this.ranks.map((r, i) => fn(r, i)));
  }

  /** Releases the ranks (and their compute streams) with the group. */
  protected override disposeChildren(): void {
    for (const r of this.ranks) r[Symbol.dispose]();
  }
}
