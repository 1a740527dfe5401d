/**
 * Events: points in a stream that other streams or the host can wait for.
 *
 * @module
 */

import { Status } from "../ffi/symbols.ts";
import { check, instanceArg, integerArg, native, NativeResource, OutHandle } from "./native.ts";
import type { Rank } from "./rank.ts";
import { Stream } from "./stream.ts";

/** A point in a stream's work that other streams, or the host, can wait for. */
export class Event extends NativeResource {
  /** The rank the event belongs to. */
  readonly rank: Rank;

  /** Wraps an owned `sy_event` handle. */
  constructor(pointer: Deno.PointerObject, rank: Rank) {
    super(pointer, (p) => native().sy_event_destroy(p), "event");
    this.rank = rank;
  }

  /** Creates an event on `rank` (not yet recorded: waiting on it does nothing). */
  static create(rank: Rank): Event {
    const out = new OutHandle();
    check(native().sy_event_create(rank.pointer, out.cell), rank.pointer, "event create");
    return new Event(out.take(), rank);
  }

  /** Captures the work enqueued on `stream` so far. */
  record(stream: Stream): void {
    instanceArg("stream", stream, Stream, "Stream");
    check(native().sy_event_record(this.pointer, stream.pointer), this.pointer, "event record");
  }

  /** True once complete; throws the failure of the work it follows, if any. */
  query(): boolean {
    const p = this.pointer;
    const rc = native().sy_event_query(p);
    if (rc === Status.NOT_READY) return false;
    check(rc, p, "event query");
    return true;
  }

  /** Resolves once the captured work has run; rejects with its failure. */
  async synchronize(timeoutMs = 0): Promise<void> {
    const p = this.pointer;
    check(
      await native().sy_event_synchronize(p, BigInt(integerArg("timeoutMs", timeoutMs, 0, 2 ** 40))),
      p,
      "event synchronize",
    );
  }

  /**
   * Milliseconds from this event's completion to `end`'s, by the backend's own clock (the GPU's
   * event timer on CUDA, the stream thread's clock on the host backend), not the JS clock: record
   * one event before an operation and one after it on the same stream to time what the stream
   * ran. Both must be recorded and complete (see {@linkcode Event.synchronize}); `undefined`
   * while either is still pending. Negative when `end` completed first.
   */
  elapsedMs(end: Event): number | undefined {
    const p = this.pointer;
    const other = instanceArg("end", end, Event, "Event");
    const ms = new Float64Array(1);
    const rc = native().sy_event_elapsed(p, other.pointer, ms);
    if (rc === Status.NOT_READY) return undefined;
    check(rc, p, "event elapsed");
    return ms[0];
  }

  /** Makes `stream` (by default the rank's compute stream) wait for this event. */
  wait(stream: Stream = this.rank.stream): void {
    stream.waitEvent(this);
  }
}
