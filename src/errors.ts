/**
 * The error classes of Switchyard. Every failure the library reports is a `SwitchyardError`
 * with a machine-readable `code`; failed waits are `SwitchyardTimeoutError`s that name the
 * rank that was waited for.
 *
 * @module
 */

/** What kind of failure a {@linkcode SwitchyardError} is. */
export type ErrorCode =
  | "INVALID_ARGUMENT"
  | "WRONG_HANDLE"
  | "DISPOSED"
  | "OUT_OF_MEMORY"
  | "NO_DEVICE"
  | "UNSUPPORTED"
  | "TIMEOUT"
  | "PEER_FAILED"
  | "CUDA"
  | "ABI_MISMATCH"
  | "INTERNAL"
  | "LIBRARY_NOT_FOUND";

/** Details a {@linkcode SwitchyardError} may carry. */
export interface SwitchyardErrorOptions {
  /** The argument at fault, spelled as in the API (e.g. `"topkIdx"`). */
  readonly argument?: string;
  /** The rank that reported the failure. */
  readonly rank?: number;
  /** The underlying error. */
  readonly cause?: unknown;
}

/** Any failure reported by Switchyard. */
export class SwitchyardError extends Error {
  /** What kind of failure this is. */
  readonly code: ErrorCode;
  /** The argument at fault, when the failure is about one. */
  readonly argument?: string;
  /** The rank that reported the failure, when known. */
  readonly rank?: number;

  /** Creates an error of kind `code`. */
  constructor(code: ErrorCode, message: string, options: SwitchyardErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    if (options.argument) this.argument = options.argument;
    if (options.rank !== undefined && options.rank >= 0) this.rank = options.rank;
  }
}

/** What a failed wait was waiting for. */
export type WaitRole =
  | "none"
  | "barrier"
  | "dispatch"
  | "combine"
  | "host-counter"
  | "event"
  | "stream"
  | "buffer-peers"
  | "low-latency-dispatch"
  | "low-latency-combine"
  | "dispatch-network"
  | "dispatch-forward"
  | "combine-network"
  | "rendezvous";

const ROLES: readonly WaitRole[] = [
  "none",
  "barrier",
  "dispatch",
  "combine",
  "host-counter",
  "event",
  "stream",
  "buffer-peers",
  "low-latency-dispatch",
  "low-latency-combine",
  "dispatch-network",
  "dispatch-forward",
  "combine-network",
];

/** Maps `sy_wait_role` to its name. */
export function waitRoleName(role: number): WaitRole {
  return ROLES[role] ?? "none";
}

/** Details of a failed wait. */
export interface WaitDetails {
  /** The rank that was waited for (-1 if none). */
  readonly peerRank: number;
  /** What the wait belonged to. */
  readonly role: WaitRole;
  /** The channel or slot of the wait (-1 if none). */
  readonly channel: number;
  /** The counter value waited for. */
  readonly expected: bigint;
  /** The counter value seen at the deadline. */
  readonly observed: bigint;
  /** How long the wait lasted. */
  readonly waitedSeconds: number;
}

/**
 * A wait that hit its deadline (`code` `"TIMEOUT"`), or an operation another rank abandoned
 * after its own wait failed (`code` `"PEER_FAILED"`). `peerRank` names the rank that never
 * arrived.
 */
export class SwitchyardTimeoutError extends SwitchyardError implements WaitDetails {
  /** The rank that was waited for (-1 if none). */
  readonly peerRank: number;
  /** What the wait belonged to. */
  readonly role: WaitRole;
  /** The channel or slot of the wait (-1 if none). */
  readonly channel: number;
  /** The counter value waited for. */
  readonly expected: bigint;
  /** The counter value seen at the deadline. */
  readonly observed: bigint;
  /** How long the wait lasted. */
  readonly waitedSeconds: number;

  /** Creates a timeout error. */
  constructor(
    code: "TIMEOUT" | "PEER_FAILED",
    message: string,
    details: WaitDetails,
    options: SwitchyardErrorOptions = {},
  ) {
    super(code, message, options);
    this.peerRank = details.peerRank;
    this.role = details.role;
    this.channel = details.channel;
    this.expected = details.expected;
    this.observed = details.observed;
    this.waitedSeconds = details.waitedSeconds;
  }
}
