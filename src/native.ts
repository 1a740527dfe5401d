/**
 * The bridge to the native library: loading, status checks that turn failures into
 * SwitchyardErrors, out-parameter handles, and the base class of every native resource.
 *
 * @module
 */

import { loadLibrary } from "../ffi/library.ts";
import { ErrorInfo } from "../ffi/structs.ts";
import { Status, type Symbols } from "../ffi/symbols.ts";
import { type ErrorCode, SwitchyardError, SwitchyardTimeoutError, waitRoleName } from "./errors.ts";

let lib: Symbols | undefined;

/** The library's functions; throws a SwitchyardError when it cannot be loaded. */
export function native(): Symbols {
  if (lib) return lib;
  const result = loadLibrary();
  if (!result.ok) throw new SwitchyardError(result.failure.code, result.failure.message);
  lib = result.symbols;
  return lib;
}

const CODES: Record<number, ErrorCode> = {
  [Status.INVALID_ARGUMENT]: "INVALID_ARGUMENT",
  [Status.WRONG_HANDLE]: "WRONG_HANDLE",
  [Status.DISPOSED]: "DISPOSED",
  [Status.OUT_OF_MEMORY]: "OUT_OF_MEMORY",
  [Status.NO_DEVICE]: "NO_DEVICE",
  [Status.UNSUPPORTED]: "UNSUPPORTED",
  [Status.TIMEOUT]: "TIMEOUT",
  [Status.PEER_FAILED]: "PEER_FAILED",
  [Status.CUDA]: "CUDA",
  [Status.ABI_MISMATCH]: "ABI_MISMATCH",
  [Status.INTERNAL]: "INTERNAL",
};

/**
 * The error for a failed call: the details recorded on `handle` (or on this thread when
 * `handle` is null, which only sync calls may rely on).
 */
export function errorFor(status: number, handle: Deno.PointerObject | null, op: string): SwitchyardError {
  const info = ErrorInfo.create();
  const rc = native().sy_last_error(handle, info.bytes);
  const code = CODES[status] ?? "INTERNAL";
  let message = `${op} failed with status ${status}`;
  let argument: string | undefined;
  let rank: number | undefined;
  // The record must be this failure's: same status (a later failure may have replaced it).
  const matches = rc === Status.OK && info.number("status") === status;
  if (matches) {
    message = info.string("message") || message;
    argument = info.string("argument") || undefined;
    rank = info.number("rank");
  }
  if ((code === "TIMEOUT" || code === "PEER_FAILED") && matches) {
    return new SwitchyardTimeoutError(code, message, {
      peerRank: info.number("peer_rank"),
      role: waitRoleName(info.number("role")),
      channel: info.number("channel"),
      expected: info.bigint("expected"),
      observed: info.bigint("observed"),
      waitedSeconds: info.number("waited_seconds"),
    }, { argument, rank });
  }
  return new SwitchyardError(code, message, { argument, rank });
}

/** Throws the SwitchyardError for `status` unless it is OK. */
export function check(status: number, handle: Deno.PointerObject | null, op: string): void {
  if (status !== Status.OK) throw errorFor(status, handle, op);
}

/** An 8-byte out-parameter for a handle. */
export class OutHandle {
  /** The buffer handed to C. */
  readonly cell: BigUint64Array = new BigUint64Array(1);
  /** The handle C wrote (throws if it wrote NULL). */
  take(): Deno.PointerObject {
    const p = Deno.UnsafePointer.create(this.cell[0]);
    if (p === null) throw new SwitchyardError("INTERNAL", "the library returned a NULL handle");
    return p;
  }
}

type Destroy = (p: Deno.PointerObject) => number;

interface Held {
  pointer: Deno.PointerObject;
  destroy: Destroy;
}

// A backstop only: releases handles whose owners were dropped without being disposed.
const leaked = new FinalizationRegistry<Held>((held) => {
  held.destroy(held.pointer);
});

/**
 * A reference to one native object. Disposing releases the reference (idempotently); the
 * native object lives on while in-flight work still uses it. Use after dispose throws a
 * `SwitchyardError` with code `"DISPOSED"`.
 */
export abstract class NativeResource implements Disposable {
  #pointer: Deno.PointerObject | null;
  readonly #destroy: Destroy;
  readonly #what: string;
  // Calls made but not yet handed to the library that use this object (`borrow`); a dispose in
  // the meantime ends the reference at once and destroys the native handle at the last release.
  #borrows = 0;
  #doomed: Deno.PointerObject | null = null;

  /** Takes ownership of `pointer`, released with `destroy`. */
  protected constructor(pointer: Deno.PointerObject, destroy: Destroy, what: string) {
    this.#pointer = pointer;
    this.#destroy = destroy;
    this.#what = what;
    leaked.register(this, { pointer, destroy }, this);
  }

  /** The native handle; throws once disposed. */
  get pointer(): Deno.PointerObject {
    if (this.#pointer === null) {
      throw new SwitchyardError("DISPOSED", `this ${this.#what} was disposed`);
    }
    return this.#pointer;
  }

  /**
   * Whether `v` really is one of these objects (not merely an object whose prototype claims
   * so): only real ones hold a native handle.
   */
  static isGenuine(v: unknown): boolean {
    return typeof v === "object" && v !== null && #pointer in v;
  }

  /** Whether this reference has been released. */
  get disposed(): boolean {
    return this.#pointer === null;
  }

  /**
   * The native handle for a call that reaches the library later (operations queue behind
   * earlier ones): it stays valid, even if this object is disposed meanwhile, until
   * {@linkcode NativeResource.release}. Throws once disposed.
   */
  borrow(): Deno.PointerObject {
    const p = this.pointer;
    this.#borrows++;
    return p;
  }

  /** Ends a {@linkcode NativeResource.borrow}; the last one after a dispose destroys the handle. */
  release(): void {
    if (this.#borrows === 0) return;
    this.#borrows--;
    const p = this.#doomed;
    if (this.#borrows > 0 || p === null) return;
    this.#doomed = null;
    check(this.#destroy(p), null, `${this.#what} dispose`);
  }

  /** Releases the native reference. Calling it again does nothing. */
  [Symbol.dispose](): void {
    const p = this.#pointer;
    if (p === null) return;
    this.#pointer = null;
    leaked.unregister(this);
    this.disposeChildren();
    if (this.#borrows > 0) {
      this.#doomed = p; // a call made before the dispose still uses it
      return;
    }
    check(this.#destroy(p), null, `${this.#what} dispose`);
  }

  /** Subclasses release what they own before their own handle goes. */
  protected disposeChildren(): void {}
}

/**
 * The objects one call borrowed when it was made (inputs, handle, streams, events), released
 * together once the library has them: disposing them right after the call is safe.
 */
export class Borrowed {
  #held: NativeResource[] = [];

  /**
   * `r`'s native handle, kept valid until {@linkcode Borrowed.release}; a disposed `r` is a
   * `DISPOSED` error naming `argument`.
   */
  take(r: NativeResource, argument?: string): Deno.PointerObject {
    if (r.disposed && argument !== undefined) {
      throw new SwitchyardError("DISPOSED", `${argument}: this object was disposed`, { argument });
    }
    const p = r.borrow();
    this.#held.push(r);
    return p;
  }

  /** Releases everything taken. */
  release(): void {
    for (const r of this.#held.splice(0)) r.release();
  }
}

/** Validates an integer argument before it crosses the FFI (which would truncate it). */
export function integerArg(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value < min || value > max) {
    const got = typeof value === "string" ? `the string ${JSON.stringify(value)}` : String(value);
    throw new SwitchyardError("INVALID_ARGUMENT", `${name}: expected an integer in ${min}..${max}, got ${got}`, {
      argument: name,
    });
  }
  return value;
}

/**
 * Validates a string argument that names one of `choices` (undefined: the first) and returns its
 * index, the value the C ABI's enum gives it.
 */
export function choiceArg(name: string, value: unknown, choices: readonly string[]): number {
  if (value === undefined) return 0;
  const i = typeof value === "string" ? choices.indexOf(value) : -1;
  if (i < 0) {
    const got = typeof value === "string" ? JSON.stringify(value) : String(value);
    throw new SwitchyardError(
      "INVALID_ARGUMENT",
      `${name}: expected ${choices.map((c) => `"${c}"`).join(" or ")}, got ${got}`,
      {
        argument: name,
      },
    );
  }
  return i;
}

/** Validates that `value` is an instance of `type` (and names the argument if not). */
export function instanceArg<T>(
  name: string,
  value: unknown,
  type: abstract new (...args: never[]) => T,
  typeName: string,
): T {
  if (!(value instanceof type) || (value instanceof NativeResource && !NativeResource.isGenuine(value))) {
    const what = value instanceof type ? `an imitation (an object with the ${typeName} prototype)` : describe(value);
    throw new SwitchyardError("WRONG_HANDLE", `${name}: expected a ${typeName}, got ${what}`, {
      argument: name,
    });
  }
  return value;
}

function describe(v: unknown): string {
  if (v === null) return "null";
  if (typeof v === "object") return (v as object).constructor?.name ?? "an object";
  return typeof v;
}

/** The library's version string. */
export function libraryVersion(): string {
  const p = native().sy_version_string();
  return p === null ? "" : Deno.UnsafePointerView.getCString(p);
}
