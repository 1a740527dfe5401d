/**
 * Ranks: one participant of a group, with its device, compute stream and buffers.
 *
 * @module
 */

import { RankInfo } from "../ffi/structs.ts";
import { EpBuffer, type EpBufferOptions } from "./buffer.ts";
import { Event } from "./event.ts";
import { SwitchyardError } from "./errors.ts";
import type { Group } from "./group.ts";
import { check, native, NativeResource } from "./native.ts";
import { Stream } from "./stream.ts";

/** One rank of a group. Owned by its {@linkcode Group}; disposed with it. */
export class Rank extends NativeResource {
  /** The group this rank belongs to. */
  readonly group: Group;
  /** Position in the group, 0..size-1. */
  readonly index: number;
  /** CUDA device ordinal, -1 on the host backend. */
  readonly device: number;
  /** Deadline of this rank's waits, in milliseconds. */
  readonly timeoutMs: number;
  /** The node this rank belongs to: `index / ranksPerNode`. */
  readonly node: number;
  /** Ranks per node: `ranksPerNode` of a local group, `LOCAL_WORLD_SIZE` of a process group. */
  readonly ranksPerNode: number;
  #stream: Stream | undefined;

  /** Wraps an owned `sy_rank` handle of `group`. */
  constructor(pointer: Deno.PointerObject, group: Group) {
    super(pointer, (p) => native().sy_rank_destroy(p), "rank");
    this.group = group;
    const info = RankInfo.create();
    check(native().sy_rank_info_get(pointer, info.bytes), pointer, "rank info");
    this.index = info.number("rank");
    this.device = info.number("device");
    this.timeoutMs = info.number("timeout_ms");
    this.node = info.number("node");
    this.ranksPerNode = info.number("ranks_per_node");
  }

  /** The rank's compute stream: the default stream of its operations and copies. */
  get stream(): Stream {
    this.pointer; // throws once disposed
    this.#stream ??= Stream.create(this);
    return this.#stream;
  }

  /** A new stream on this rank. */
  createStream(): Stream {
    return Stream.create(this);
  }

  /** A new (unrecorded) event on this rank. */
  createEvent(): Event {
    return Event.create(this);
  }

  /**
   * This rank's communication buffer (virtual ranks). Collective: every rank of the group
   * creates its buffers with the same options in the same order. Process groups use
   * {@linkcode Group.createBuffers}, which also maps the peers' buffers.
   */
  createBuffer(options: EpBufferOptions): EpBuffer {
    if (this.group.isProcessGroup) {
      throw new SwitchyardError(
        "INVALID_ARGUMENT",
        "createBuffer: in a process group the ranks must exchange their buffers; use await group.createBuffers(options)",
        { argument: "createBuffer" },
      );
    }
    return EpBuffer.create(this, options);
  }

  /** Releases the compute stream with the rank. */
  protected override disposeChildren(): void {
    this.#stream?.[Symbol.dispose]();
  }
}
