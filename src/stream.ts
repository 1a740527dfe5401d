/**
 * Streams: ordered queues of work on one rank, with CUDA semantics on both backends.
 *
 * @module
 */

import { Event } from "./event.ts";
import { check, instanceArg, integerArg, native, NativeResource, OutHandle } from "./native.ts";
import type { Rank } from "./rank.ts";

/** An ordered queue of work on one rank (a CUDA stream, or a worker thread on the host). */
export class Stream extends NativeResource {
  /** The rank the stream belongs to. */
  readonly rank: Rank;

  /** Wraps an owned `sy_stream` handle. */
  constructor(pointer: Deno.PointerObject, rank: Rank) {
    super(pointer, (p) => native().sy_stream_destroy(p), "stream");
    this.rank = rank;
  }

  /** Creates a new stream on `rank`. */
  static create(rank: Rank): Stream {
    const out = new OutHandle();
    check(native().sy_stream_create(rank.pointer, out.cell), rank.pointer, "stream create");
    return new Stream(out.take(), rank);
  }

  /** Makes later work on this stream wait until `event` has completed. */
  waitEvent(event: Event): void {
    instanceArg("event", event, Event, "Event");
    check(native().sy_stream_wait_event(this.pointer, event.pointer), this.pointer, "stream waitEvent");
  }

  /** Records an event after the work enqueued so far. */
  record(): Event {
    const event = Event.create(this.rank);
    try {
      event.record(this);
    } catch (e) {
      event[Symbol.dispose]();
      throw e;
    }
    return event;
  }

  /**
   * Resolves once all work enqueued so far has run; rejects with the first failure of that
   * work (for example a SwitchyardTimeoutError naming the rank a dispatch waited for).
   */
  async synchronize(timeoutMs = 0): Promise<void> {
    const p = this.pointer;
    check(
      await native().sy_stream_synchronize(p, BigInt(integerArg("timeoutMs", timeoutMs, 0, 2 ** 40))),
      p,
      "stream synchronize",
    );
  }

  /**
   * The backend's own stream, for ordering another library's GPU work with Switchyard's: the
   * `cudaStream_t` on the CUDA backend (valid while this stream lives). Throws `UNSUPPORTED` on
   * the host backend, whose streams are threads.
   */
  nativeHandle(): Deno.PointerValue {
    const cell = new BigUint64Array(1);
    check(native().sy_stream_native(this.pointer, cell), this.pointer, "stream nativeHandle");
    return Deno.UnsafePointer.create(cell[0]);
  }
}
