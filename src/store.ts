/**
 * The rendezvous store of process groups: a small key-value service that rank 0 serves over TCP
 * (Deno's own networking) and every rank uses to find the others: set, get (waiting until the
 * key exists), and barriers. Every wait has a deadline; a shared token (`SWITCHYARD_TOKEN`) is
 * checked when set; malformed or oversized messages are refused, never trusted.
 *
 * Wire format: frames of a 4-byte big-endian length and that many bytes of UTF-8 JSON.
 * Requests `{ id, op, ... }`, replies `{ id, ok, value? | error? }`. A connection must open with
 * `hello` (`{ rank, token }`) before anything else.
 *
 * @module
 */

import { SwitchyardError, SwitchyardTimeoutError } from "./errors.ts";

/** Largest frame accepted, in bytes. */
export const MAX_FRAME_BYTES = 1 << 20;

interface Request {
  id: number;
  op: "hello" | "set" | "get";
  key?: string;
  value?: string;
  rank?: number;
  token?: string;
  timeoutMs?: number;
}

interface Reply {
  id: number;
  ok: boolean;
  value?: string;
  error?: string;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

function frame(message: unknown): Uint8Array {
  const body = encoder.encode(JSON.stringify(message));
  const out = new Uint8Array(4 + body.length);
  new DataView(out.buffer).setUint32(0, body.length);
  out.set(body, 4);
  return out;
}

/** Reads whole frames from a connection; rejects oversized or malformed ones. */
class FrameReader {
  #buf = new Uint8Array(0);
  constructor(private readonly conn: Deno.Conn) {}

  /** The next frame's JSON, or null at end of stream. */
  async next(): Promise<unknown | null> {
    for (;;) {
      if (this.#buf.length >= 4) {
        const n = new DataView(this.#buf.buffer, this.#buf.byteOffset).getUint32(0);
        if (n > MAX_FRAME_BYTES) throw new Error(`frame of ${n} bytes exceeds the ${MAX_FRAME_BYTES}-byte limit`);
        if (this.#buf.length >= 4 + n) {
          const body = this.#buf.slice(4, 4 + n);
          this.#buf = this.#buf.slice(4 + n);
          return JSON.parse(decoder.decode(body));
        }
      }
      const chunk = new Uint8Array(64 * 1024);
      const got = await this.conn.read(chunk);
      if (got === null) return null;
      const merged = new Uint8Array(this.#buf.length + got);
      merged.set(this.#buf);
      merged.set(chunk.subarray(0, got), this.#buf.length);
      this.#buf = merged;
    }
  }
}

async function writeAll(conn: Deno.Conn, data: Uint8Array): Promise<void> {
  let off = 0;
  while (off < data.length) off += await conn.write(data.subarray(off));
}

function isRequest(v: unknown): v is Request {
  if (typeof v !== "object" || v === null) return false;
  const r = v as Record<string, unknown>;
  return Number.isSafeInteger(r.id) && (r.op === "hello" || r.op === "set" || r.op === "get") &&
    (r.key === undefined || (typeof r.key === "string" && r.key.length <= 1024)) &&
    (r.value === undefined || typeof r.value === "string") &&
    (r.token === undefined || typeof r.token === "string") &&
    (r.rank === undefined || Number.isSafeInteger(r.rank)) &&
    (r.timeoutMs === undefined || (Number.isSafeInteger(r.timeoutMs) && (r.timeoutMs as number) >= 0));
}

/** Options of a {@linkcode StoreServer}. */
export interface StoreServerOptions {
  /** Address to listen on (default loopback). */
  readonly hostname?: string;
  /** Port to listen on (0 = any free port). */
  readonly port: number;
  /** Ranks allowed to connect: 0..worldSize-1. */
  readonly worldSize: number;
  /** Required from every client when set. */
  readonly token?: string;
  /** Longest a `get` may wait, in milliseconds. */
  readonly maxWaitMs?: number;
}

/** The store rank 0 serves. */
export class StoreServer {
  readonly #listener: Deno.TcpListener;
  readonly #values = new Map<string, string>();
  readonly #waiters = new Map<string, Set<(value: string) => void>>();
  readonly #conns = new Set<Deno.Conn>();
  readonly #options: StoreServerOptions;
  #closed = false;

  private constructor(listener: Deno.TcpListener, options: StoreServerOptions) {
    this.#listener = listener;
    this.#options = options;
    this.#accept();
  }

  /** Starts serving. */
  static listen(options: StoreServerOptions): StoreServer {
    const listener = Deno.listen({ hostname: options.hostname ?? "127.0.0.1", port: options.port, transport: "tcp" });
    return new StoreServer(listener, options);
  }

  /** The port it listens on. */
  get port(): number {
    return this.#listener.addr.port;
  }

  async #accept(): Promise<void> {
    try {
      for await (const conn of this.#listener) {
        this.#conns.add(conn);
        this.#serve(conn).finally(() => {
          this.#conns.delete(conn);
          try {
            conn.close();
          } catch { /* already closed */ }
        });
      }
    } catch (e) {
      if (!this.#closed) console.error(`switchyard store: stopped accepting: ${e}`);
    }
  }

  async #serve(conn: Deno.Conn): Promise<void> {
    const reader = new FrameReader(conn);
    let hello = false;
    for (;;) {
      let msg: unknown;
      try {
        msg = await reader.next();
      } catch (e) {
        // Not a frame we can trust: say why and drop the connection.
        await writeAll(conn, frame({ id: -1, ok: false, error: `malformed message: ${(e as Error).message}` }))
          .catch(() => {});
        return;
      }
      if (msg === null) return;
      if (!isRequest(msg)) {
        await writeAll(conn, frame({ id: -1, ok: false, error: "malformed request" })).catch(() => {});
        return;
      }
      if (!hello) {
        const error = this.#checkHello(msg);
        await writeAll(conn, frame({ id: msg.id, ok: !error, error } satisfies Reply));
        if (error) return;
        hello = true;
        continue;
      }
      // Requests on one connection are answered as they complete (a get may wait).
      this.#handle(msg).then((reply) => writeAll(conn, frame(reply))).catch(() => {});
    }
  }

  #checkHello(msg: Request): string | undefined {
    if (msg.op !== "hello") return "the first message must be hello";
    if (this.#options.token !== undefined && msg.token !== this.#options.token) {
      return "wrong SWITCHYARD_TOKEN";
    }
    if (msg.rank === undefined || msg.rank < 0 || msg.rank >= this.#options.worldSize) {
      return `rank ${msg.rank} is outside 0..${this.#options.worldSize - 1}`;
    }
    return undefined;
  }

  #handle(msg: Request): Promise<Reply> {
    if (msg.op === "set" && msg.key !== undefined && msg.value !== undefined) {
      this.#values.set(msg.key, msg.value);
      for (const wake of this.#waiters.get(msg.key) ?? []) wake(msg.value);
      this.#waiters.delete(msg.key);
      return Promise.resolve({ id: msg.id, ok: true });
    }
    if (msg.op === "get" && msg.key !== undefined) {
      const key = msg.key;
      const have = this.#values.get(key);
      if (have !== undefined) return Promise.resolve({ id: msg.id, ok: true, value: have });
      const wait = Math.min(msg.timeoutMs ?? 0, this.#options.maxWaitMs ?? 600_000);
      return new Promise((resolve) => {
        const wake = (value: string) => {
          clearTimeout(timer);
          resolve({ id: msg.id, ok: true, value });
        };
        const timer = setTimeout(() => {
          this.#waiters.get(key)?.delete(wake);
          resolve({ id: msg.id, ok: false, error: `timeout waiting for ${key}` });
        }, wait);
        let set = this.#waiters.get(key);
        if (!set) this.#waiters.set(key, set = new Set());
        set.add(wake);
      });
    }
    return Promise.resolve({ id: msg.id, ok: false, error: `bad ${msg.op} request` });
  }

  /**
   * Stops accepting, and closes once the connected ranks have left (or after `graceMs`): rank 0
   * may finish before the others have read their last answers.
   */
  closeWhenIdle(graceMs: number): void {
    if (this.#closed) return;
    try {
      this.#listener.close();
    } catch { /* already closed */ }
    if (this.#conns.size === 0) return this.close();
    const timer = setTimeout(() => this.close(), graceMs);
    const poll = setInterval(() => {
      if (this.#conns.size === 0) {
        clearTimeout(timer);
        clearInterval(poll);
        this.close();
      }
    }, 20);
  }

  /** Stops serving and drops every connection. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.#listener.close();
    } catch { /* already closed */ }
    for (const c of this.#conns) {
      try {
        c.close();
      } catch { /* already closed */ }
    }
  }
}

/** Options of {@linkcode StoreClient.connect}. */
export interface StoreClientOptions {
  /** Where the store is. */
  readonly hostname: string;
  /** Its port. */
  readonly port: number;
  /** This rank. */
  readonly rank: number;
  /** Ranks in the group. */
  readonly worldSize: number;
  /** The shared secret, when the store requires one. */
  readonly token?: string;
  /** Deadline of connecting and of every wait, in milliseconds. */
  readonly timeoutMs: number;
}

/** One rank's connection to the store. */
export class StoreClient {
  readonly #conn: Deno.Conn;
  readonly #reader: FrameReader;
  readonly #pending = new Map<number, (r: Reply) => void>();
  #nextId = 1;
  #closed = false;
  /** This rank. */
  readonly rank: number;
  /** Ranks in the group. */
  readonly worldSize: number;
  /** Deadline of every wait, in milliseconds. */
  readonly timeoutMs: number;

  private constructor(conn: Deno.Conn, options: StoreClientOptions) {
    this.#conn = conn;
    this.#reader = new FrameReader(conn);
    this.rank = options.rank;
    this.worldSize = options.worldSize;
    this.timeoutMs = options.timeoutMs;
  }

  /** Connects (retrying until the deadline: rank 0 may not be listening yet) and says hello. */
  static async connect(options: StoreClientOptions): Promise<StoreClient> {
    const deadline = performance.now() + options.timeoutMs;
    let conn: Deno.Conn | undefined;
    let last: unknown;
    while (!conn) {
      try {
        conn = await Deno.connect({ hostname: options.hostname, port: options.port, transport: "tcp" });
      } catch (e) {
        last = e;
        if (performance.now() > deadline) {
          throw new SwitchyardTimeoutError(
            "TIMEOUT",
            `rank ${options.rank} could not reach the rendezvous store at ${options.hostname}:${options.port} ` +
              `within ${options.timeoutMs} ms (${last}); is rank 0 running, with the same MASTER_ADDR and MASTER_PORT?`,
            {
              peerRank: 0,
              role: "rendezvous",
              channel: -1,
              expected: 0n,
              observed: 0n,
              waitedSeconds: options.timeoutMs / 1e3,
            },
            { rank: options.rank },
          );
        }
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    const client = new StoreClient(conn, options);
    client.#readLoop();
    const hello = await client.#request({ op: "hello", rank: options.rank, token: options.token }, options.timeoutMs);
    if (!hello.ok) {
      client.close();
      throw new SwitchyardError("INVALID_ARGUMENT", `rendezvous refused rank ${options.rank}: ${hello.error}`, {
        argument: hello.error?.includes("TOKEN") ? "SWITCHYARD_TOKEN" : "RANK",
        rank: options.rank,
      });
    }
    return client;
  }

  async #readLoop(): Promise<void> {
    try {
      for (;;) {
        const msg = await this.#reader.next() as Reply | null;
        if (msg === null) break;
        const done = this.#pending.get(msg.id);
        if (done) {
          this.#pending.delete(msg.id);
          done(msg);
        } else if (msg.id === -1) {
          for (const d of this.#pending.values()) d(msg);
          this.#pending.clear();
        }
      }
    } catch { /* connection dropped */ }
    for (const d of this.#pending.values()) {
      d({ id: -1, ok: false, error: "the rendezvous store closed the connection" });
    }
    this.#pending.clear();
  }

  #request(req: Omit<Request, "id">, waitMs: number): Promise<Reply> {
    if (this.#closed) return Promise.resolve({ id: -1, ok: false, error: "the store connection is closed" });
    const id = this.#nextId++;
    return new Promise((resolve) => {
      // The client's own deadline, a little beyond the server's, so a lost connection cannot hang.
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        resolve({ id, ok: false, error: `timeout waiting for ${req.key ?? req.op}` });
      }, waitMs + 1000);
      this.#pending.set(id, (r) => {
        clearTimeout(timer);
        resolve(r);
      });
      writeAll(this.#conn, frame({ ...req, id })).catch((e) => {
        clearTimeout(timer);
        this.#pending.delete(id);
        resolve({ id, ok: false, error: `sending to the store failed: ${e}` });
      });
    });
  }

  /** Stores `value` under `key`. */
  async set(key: string, value: string): Promise<void> {
    const r = await this.#request({ op: "set", key, value }, this.timeoutMs);
    if (!r.ok) throw new SwitchyardError("INTERNAL", `rendezvous set ${key} failed: ${r.error}`, { rank: this.rank });
  }

  /** The value of `key`, waiting for it until the deadline; undefined if it never came. */
  async tryGet(key: string, timeoutMs = this.timeoutMs): Promise<string | undefined> {
    const r = await this.#request({ op: "get", key, timeoutMs }, timeoutMs);
    if (!r.ok && r.error && !r.error.startsWith("timeout")) {
      throw new SwitchyardTimeoutError("PEER_FAILED", `rank ${this.rank}: rendezvous lost: ${r.error}`, {
        peerRank: 0,
        role: "rendezvous",
        channel: -1,
        expected: 0n,
        observed: 0n,
        waitedSeconds: 0,
      }, { rank: this.rank });
    }
    return r.ok ? r.value : undefined;
  }

  /**
   * Every rank sets `${name}/${rank}` and waits for all the others' (deadline-bounded); the
   * values come back by rank. Fails naming the ranks that never arrived.
   */
  async exchange(name: string, value: string): Promise<string[]> {
    await this.set(`${name}/${this.rank}`, value);
    const deadline = performance.now() + this.timeoutMs;
    const got = await Promise.allSettled(
      Array.from(
        { length: this.worldSize },
        (_, r) => this.tryGet(`${name}/${r}`, Math.max(0, Math.round(deadline - performance.now()))),
      ),
    );
    const missing = got.flatMap((v, r) => (v.status === "rejected" || v.value === undefined ? [r] : []));
    if (missing.length) {
      const lost = got.find((v) => v.status === "rejected") as PromiseRejectedResult | undefined;
      const who = `missing rank${missing.length > 1 ? "s" : ""} ${missing.join(", ")}`;
      throw new SwitchyardTimeoutError(
        lost ? "PEER_FAILED" : "TIMEOUT",
        lost
          ? `rank ${this.rank}: the rendezvous store (rank 0) went away during "${name}"; ${who}`
          : `rank ${this.rank} timed out after ${this.timeoutMs} ms at rendezvous "${name}": ${who}`,
        {
          peerRank: missing[0],
          role: "rendezvous",
          channel: -1,
          expected: BigInt(this.worldSize),
          observed: BigInt(this.worldSize - missing.length),
          waitedSeconds: this.timeoutMs / 1e3,
        },
        { rank: this.rank, cause: lost?.reason },
      );
    }
    return got.map((v) => (v as PromiseFulfilledResult<string>).value);
  }

  /** Waits until every rank reached `name`. */
  async barrier(name: string): Promise<void> {
    await this.exchange(name, "");
  }

  /** Closes the connection. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.#conn.close();
    } catch { /* already closed */ }
  }
}
