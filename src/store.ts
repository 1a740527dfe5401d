/**
 * The rendezvous store of process groups: a small key-value service that rank 0 serves over TCP
 * (Deno's own networking) and every rank uses to find the others: set, get (waiting until the
 * key exists), and exchanges and barriers built on them. Every wait has a deadline.
 *
 * ## Wire format
 *
 * Frames of a 4-byte big-endian length and that many bytes of UTF-8 JSON, one flat object each.
 * Requests `{ id, seq, op, ... }`, replies `{ id, ok, value? | error?, timeout? }`. `seq` counts
 * the frames a connection has sent (0, 1, 2, ...): a frame out of sequence (a replay) is refused
 * and the connection dropped. The first frame must be `hello` (`{ rank, worldSize, token }`).
 *
 * ## Identity
 *
 * A hello binds the connection to its rank: the token (`SWITCHYARD_TOKEN`, compared in constant
 * time) must match when the store has one, and a rank already connected is refused. A store
 * bound to an address other than loopback must have a token.
 *
 * Keys are `<name>/<rank>` (what {@linkcode StoreClient.exchange} writes: `join/3`,
 * `buffer/0/3`, `buffer/0/mapped/3`, `nccl/id/3`, `user/<name>/<n>/3`): a key belongs to the
 * rank its last segment names, and only that rank's connection may set it. Every rank may read
 * every key. A key every rank has read is dropped (each exchange is read once by every rank), so
 * a long job's barriers do not accumulate.
 *
 * ## Bounds
 *
 * Nothing a client sends, and no way it disconnects, can stop the store: every per-connection
 * failure is caught, the connection dropped, and the failure logged at most once per peer.
 * Before hello a connection may hold one small frame ({@linkcode MAX_HELLO_FRAME_BYTES}) and
 * must say hello within {@linkcode HELLO_TIMEOUT_MS}; connections are capped
 * ({@linkcode CONNECTIONS_PER_RANK}, {@linkcode CONNECTION_MARGIN}), the oldest unauthenticated
 * one making room for a new one; a started frame must arrive within {@linkcode FRAME_TIMEOUT_MS};
 * frames are read into one buffer of their declared size (no copying per read), their nesting
 * checked before JSON parsing; keys, values, each rank's and all stored bytes, parked gets and
 * unread replies have quotas. A connected rank may stay idle as long as it likes: it holds one
 * connection and nothing else.
 *
 * @module
 */

import { SwitchyardError, SwitchyardTimeoutError } from "./errors.ts";

/** Largest frame accepted from a connection that has said hello, in bytes (and from the store, by clients). */
export const MAX_FRAME_BYTES = 1 << 20;
/** Largest frame accepted before hello, in bytes: a hello is small, so an unauthenticated peer holds little. */
export const MAX_HELLO_FRAME_BYTES = 2048;
/** Deepest JSON nesting a frame may have (requests are flat objects); checked before parsing. */
export const MAX_JSON_DEPTH = 2;
/** Longest `SWITCHYARD_TOKEN`, in characters. */
export const MAX_TOKEN_LENGTH = 256;
/** Longest key, in UTF-8 bytes. */
export const MAX_KEY_BYTES = 1024;
/** Largest value of one key, in UTF-8 bytes (buffer shares and NCCL ids are a few hundred). */
export const MAX_VALUE_BYTES = 64 << 10;
/** Most bytes (keys and values) one rank may have stored at once. */
export const MAX_RANK_STORED_BYTES = 1 << 20;
/** Most bytes (keys and values) the store holds at once, all ranks together. */
export const MAX_STORED_BYTES = 64 << 20;
/** Default deadline of a connection's hello, counted from its accept, in milliseconds. */
export const HELLO_TIMEOUT_MS = 5000;
/**
 * Default deadline of one frame, counted from its first byte (and of writing one reply), in
 * milliseconds: a peer that trickles a frame, or does not read its replies, is dropped.
 */
export const FRAME_TIMEOUT_MS = 10_000;
/** Connections allowed per rank of the group (bound and not yet bound together). */
export const CONNECTIONS_PER_RANK = 2;
/** Connections allowed beyond {@linkcode CONNECTIONS_PER_RANK} times the world size. */
export const CONNECTION_MARGIN = 8;
/** Gets one connection may have waiting, per rank of the group (an exchange waits for every rank). */
export const PARKED_GETS_PER_RANK = 2;
/** Gets one connection may have waiting beyond {@linkcode PARKED_GETS_PER_RANK} times the world size. */
export const PARKED_GETS_MARGIN = 16;
/** Most reply bytes queued for a connection that does not read them; beyond it the connection is dropped. */
export const MAX_QUEUED_REPLY_BYTES = 4 << 20;
/** Default longest wait of one get, in milliseconds. */
export const DEFAULT_MAX_WAIT_MS = 600_000;
/** Most peers whose failures are logged (each once); later ones are counted, not logged. */
const MAX_LOGGED_PEERS = 256;

interface Request {
  id: number;
  seq: number;
  op: "hello" | "set" | "get";
  key?: string;
  value?: string;
  rank?: number;
  worldSize?: number;
  token?: string;
  timeoutMs?: number;
}

interface Reply {
  id: number;
  ok: boolean;
  value?: string;
  error?: string;
  /** Set on a get that waited until its deadline. */
  timeout?: boolean;
  /** Rank 0 gave up on the group waiting for this rank (StoreServer.abandon): `error` says why. */
  abandonedFor?: number;
}

/** A reply, or what the client made of a connection that failed. */
interface Outcome extends Reply {
  /** The store connection is gone (not a refusal by the store). */
  lost?: boolean;
}

type Timer = ReturnType<typeof setTimeout>;

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

function frame(message: unknown): Uint8Array {
  const body = encoder.encode(JSON.stringify(message));
  const out = new Uint8Array(4 + body.length);
  new DataView(out.buffer).setUint32(0, body.length);
  out.set(body, 4);
  return out;
}

/** Bytes of `s` in UTF-8 (lone surrogates count as the replacement character they become). */
function utf8Length(s: string): number {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c < 0xdc00 && i + 1 < s.length) {
      const d = s.charCodeAt(i + 1);
      if (d >= 0xdc00 && d < 0xe000) {
        n += 4;
        i++;
      } else n += 3;
    } else n += 3;
  }
  return n;
}

/** A frame that is not one we accept (as opposed to a connection that failed). */
class FrameError extends Error {}

/** Why the server drops a connection after answering it (a refusal or a protocol fault). */
class Refused extends Error {}

/** Whether the JSON text in `bytes` nests at most `max` deep (a linear scan, before any parsing). */
function nestsWithin(bytes: Uint8Array, max: number): boolean {
  let depth = 0;
  let inString = false;
  let escaped = false;
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i];
    if (inString) {
      if (escaped) escaped = false;
      else if (b === 0x5c) escaped = true;
      else if (b === 0x22) inString = false;
    } else if (b === 0x22) inString = true;
    else if (b === 0x7b || b === 0x5b) {
      if (++depth > max) return false;
    } else if (b === 0x7d || b === 0x5d) depth--;
  }
  return true;
}

function parseFrame(body: Uint8Array): unknown {
  if (!nestsWithin(body, MAX_JSON_DEPTH)) throw new FrameError(`JSON nested deeper than ${MAX_JSON_DEPTH}`);
  try {
    return JSON.parse(decoder.decode(body));
  } catch (e) {
    throw new FrameError((e as Error).message);
  }
}

/**
 * Reads whole frames from a connection: the 4-byte length into a fixed buffer, checked against
 * the limit of the moment, then the body straight into one buffer of that size, so every byte is
 * copied once however it trickles in.
 */
class FrameReader {
  readonly #conn: Deno.Conn;
  readonly #head = new Uint8Array(4);
  readonly #limit: () => number;
  readonly #onStart: () => void;
  /** Bytes held for the frame being read. */
  buffered = 0;

  constructor(conn: Deno.Conn, limit: () => number, onStart: () => void = () => {}) {
    this.#conn = conn;
    this.#limit = limit;
    this.#onStart = onStart;
  }

  /** The next frame's body, or null at end of stream between frames. */
  async next(): Promise<Uint8Array | null> {
    let got = 0;
    while (got < 4) {
      const n = await this.#conn.read(this.#head.subarray(got));
      if (n === null) {
        if (got === 0) return null;
        throw new Error("the connection ended inside a frame");
      }
      if (got === 0) this.#onStart();
      got += n;
    }
    const size = new DataView(this.#head.buffer).getUint32(0);
    const limit = this.#limit();
    if (size > limit) throw new FrameError(`frame of ${size} bytes exceeds the ${limit}-byte limit`);
    const body = new Uint8Array(size);
    this.buffered = size;
    try {
      let off = 0;
      while (off < size) {
        const n = await this.#conn.read(body.subarray(off));
        if (n === null) throw new Error("the connection ended inside a frame");
        off += n;
      }
    } finally {
      this.buffered = 0;
    }
    return body;
  }
}

async function writeAll(conn: Deno.Conn, data: Uint8Array): Promise<void> {
  let off = 0;
  while (off < data.length) off += await conn.write(data.subarray(off));
}

function isRequest(v: unknown): v is Request {
  if (typeof v !== "object" || v === null || Array.isArray(v)) return false;
  const r = v as Record<string, unknown>;
  const count = (x: unknown) => Number.isSafeInteger(x) && (x as number) >= 0;
  return count(r.id) && count(r.seq) && (r.op === "hello" || r.op === "set" || r.op === "get") &&
    (r.key === undefined || typeof r.key === "string") &&
    (r.value === undefined || typeof r.value === "string") &&
    (r.token === undefined || (typeof r.token === "string" && r.token.length <= MAX_TOKEN_LENGTH)) &&
    (r.rank === undefined || Number.isSafeInteger(r.rank)) &&
    (r.worldSize === undefined || Number.isSafeInteger(r.worldSize)) &&
    (r.timeoutMs === undefined || count(r.timeoutMs));
}

/** The rank a key belongs to (its last segment), or undefined when it is not `<name>/<rank>`. */
function keyOwner(key: string): number | undefined {
  const slash = key.lastIndexOf("/");
  if (slash <= 0) return undefined;
  const tail = key.slice(slash + 1);
  return /^(0|[1-9][0-9]{0,8})$/.test(tail) ? Number(tail) : undefined;
}

/** SHA-256 of `s`, so that secrets of any length compare in the same time. */
async function digest(s: string): Promise<Uint8Array> {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", encoder.encode(s)));
}

/** Whether two digests are equal, looking at every byte whatever differs. */
function sameDigest(a: Uint8Array, b: Uint8Array): boolean {
  let diff = a.length ^ b.length;
  for (let i = 0; i < a.length && i < b.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}

/** Whether `hostname` names this host's loopback interface. */
export function isLoopback(hostname: string): boolean {
  const h = hostname.replace(/^\[(.*)\]$/, "$1").toLowerCase();
  return h === "localhost" || h === "::1" || h === "0:0:0:0:0:0:0:1" || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h);
}

/** Options of a {@linkcode StoreServer}. */
export interface StoreServerOptions {
  /** Address to listen on (default loopback; any other address needs `token`). */
  readonly hostname?: string;
  /** Port to listen on (0 = any free port). */
  readonly port: number;
  /** Ranks allowed to connect: 0..worldSize-1. */
  readonly worldSize: number;
  /** Required from every client when set (`SWITCHYARD_TOKEN`; at most {@linkcode MAX_TOKEN_LENGTH} characters). */
  readonly token?: string;
  /** Longest a `get` may wait, in milliseconds (default {@linkcode DEFAULT_MAX_WAIT_MS}). */
  readonly maxWaitMs?: number;
  /** Deadline of a connection's hello (default {@linkcode HELLO_TIMEOUT_MS}). */
  readonly helloTimeoutMs?: number;
  /** Deadline of one frame from its first byte, and of writing one reply (default {@linkcode FRAME_TIMEOUT_MS}). */
  readonly frameTimeoutMs?: number;
  /** Where the store says what went wrong with a connection (default: standard error). */
  readonly log?: (line: string) => void;
}

/** What a {@linkcode StoreServer} holds right now (for tests and diagnostics). */
export interface StoreStats {
  /** Open connections. */
  readonly connections: number;
  /** Connections that have not said hello yet. */
  readonly unauthenticated: number;
  /** Bytes held for frames being read, all connections together. */
  readonly bufferedBytes: number;
  /** Bytes of replies queued and not yet written, all connections together. */
  readonly queuedReplyBytes: number;
  /** Bytes of keys and values stored. */
  readonly storedBytes: number;
  /** Keys stored. */
  readonly keys: number;
  /** Gets waiting for a key. */
  readonly parkedGets: number;
}

interface Entry {
  readonly value: string;
  readonly owner: number;
  readonly bytes: number;
  readonly readers: Set<number>;
}

interface Waiter {
  readonly peer: Peer;
  readonly id: number;
  readonly key: string;
  readonly timer: Timer;
}

/** One connection as the server sees it. */
class Peer {
  readonly conn: Deno.Conn;
  readonly address: string;
  readonly reader: FrameReader;
  /** The rank it said hello as, or -1. */
  rank = -1;
  /** The `seq` its next frame must carry. */
  seq = 0;
  readonly parked = new Set<Waiter>();
  queuedBytes = 0;
  writing: Promise<void> = Promise.resolve();
  helloTimer: Timer | undefined;
  frameTimer: Timer | undefined;
  /** Why the server dropped it, when it did. */
  dropped: string | undefined;
  released = false;

  constructor(conn: Deno.Conn, limit: () => number, onStart: () => void) {
    this.conn = conn;
    const a = conn.remoteAddr as Deno.NetAddr;
    this.address = `${a.hostname}:${a.port}`;
    this.reader = new FrameReader(conn, limit, onStart);
  }

  /** Whom its failures are logged under: its rank once known, else its host. */
  get name(): string {
    return this.rank >= 0 ? `rank ${this.rank}` : (this.conn.remoteAddr as Deno.NetAddr).hostname;
  }
}

/** The store rank 0 serves. */
export class StoreServer {
  readonly #listener: Deno.TcpListener;
  readonly #worldSize: number;
  /** The token's digest (computed once; `undefined` when the store has no token). */
  readonly #tokenDigest: Promise<Uint8Array> | undefined;
  readonly #maxWaitMs: number;
  readonly #helloTimeoutMs: number;
  readonly #frameTimeoutMs: number;
  readonly #log: (line: string) => void;
  readonly #values = new Map<string, Entry>();
  readonly #waiters = new Map<string, Set<Waiter>>();
  readonly #peers = new Set<Peer>();
  /** Connections without hello, oldest first. */
  readonly #unauthenticated = new Set<Peer>();
  readonly #byRank = new Map<number, Peer>();
  readonly #rankBytes = new Map<number, number>();
  readonly #logged = new Set<string>();
  #unlogged = 0;
  #storedBytes = 0;
  #parkedGets = 0;
  #closed = false;
  /** Rendezvous rank 0 gave up (abandon), by name: the answer to every request of theirs. */
  readonly #abandoned = new Map<string, { error: string; abandonedFor: number }>();
  #idleTimer: Timer | undefined;
  #idlePoll: ReturnType<typeof setInterval> | undefined;

  private constructor(listener: Deno.TcpListener, options: StoreServerOptions, token: string | undefined) {
    this.#listener = listener;
    this.#worldSize = options.worldSize;
    this.#tokenDigest = token === undefined ? undefined : digest(token);
    this.#maxWaitMs = options.maxWaitMs ?? DEFAULT_MAX_WAIT_MS;
    this.#helloTimeoutMs = options.helloTimeoutMs ?? HELLO_TIMEOUT_MS;
    this.#frameTimeoutMs = options.frameTimeoutMs ?? FRAME_TIMEOUT_MS;
    this.#log = options.log ?? ((line) => console.error(line));
    this.#accept();
  }

  /**
   * Starts serving. Refuses a non-loopback address without a token, since anyone who can reach
   * the port could otherwise claim to be a rank.
   */
  static listen(options: StoreServerOptions): StoreServer {
    const hostname = options.hostname ?? "127.0.0.1";
    const ws = options.worldSize;
    if (!Number.isSafeInteger(ws) || ws < 1 || ws > 1 << 20) {
      throw new SwitchyardError("INVALID_ARGUMENT", `worldSize: expected 1..${1 << 20}, got ${ws}`, {
        argument: "worldSize",
      });
    }
    const token = options.token || undefined;
    if (token !== undefined && token.length > MAX_TOKEN_LENGTH) {
      throw new SwitchyardError(
        "INVALID_ARGUMENT",
        `SWITCHYARD_TOKEN: at most ${MAX_TOKEN_LENGTH} characters, got ${token.length}`,
        { argument: "SWITCHYARD_TOKEN" },
      );
    }
    if (token === undefined && !isLoopback(hostname)) {
      throw new SwitchyardError(
        "INVALID_ARGUMENT",
        `the rendezvous store would listen on ${hostname} (MASTER_ADDR), which is not loopback, without a token: ` +
          "anyone who reaches the port could join as a rank. Set SWITCHYARD_TOKEN to the same secret on every rank " +
          "(for example SWITCHYARD_TOKEN=$(openssl rand -hex 16)), or use MASTER_ADDR=127.0.0.1 for a single machine " +
          "(deno task launch sets a fresh token itself)",
        { argument: "SWITCHYARD_TOKEN" },
      );
    }
    const listener = Deno.listen({ hostname, port: options.port, transport: "tcp" });
    return new StoreServer(listener, options, token);
  }

  /** The port it listens on. */
  get port(): number {
    return this.#listener.addr.port;
  }

  /** What it holds right now. */
  stats(): StoreStats {
    let buffered = 0;
    let queued = 0;
    for (const p of this.#peers) {
      buffered += p.reader.buffered;
      queued += p.queuedBytes;
    }
    return {
      connections: this.#peers.size,
      unauthenticated: this.#unauthenticated.size,
      bufferedBytes: buffered,
      queuedReplyBytes: queued,
      storedBytes: this.#storedBytes,
      keys: this.#values.size,
      parkedGets: this.#parkedGets,
    };
  }

  /** Most connections at once: {@linkcode CONNECTIONS_PER_RANK} per rank plus {@linkcode CONNECTION_MARGIN}. */
  get maxConnections(): number {
    return CONNECTIONS_PER_RANK * this.#worldSize + CONNECTION_MARGIN;
  }

  /** Most gets one connection may have waiting. */
  get maxParkedGets(): number {
    return PARKED_GETS_PER_RANK * this.#worldSize + PARKED_GETS_MARGIN;
  }

  /** Logs `text` unless something about `who` was logged already. */
  #logOnce(who: string, text: string): void {
    if (this.#logged.has(who)) return;
    if (this.#logged.size >= MAX_LOGGED_PEERS) {
      if (this.#unlogged++ === 0) {
        this.#log(`switchyard store: failures of more than ${MAX_LOGGED_PEERS} peers; not logging more`);
      }
      return;
    }
    this.#logged.add(who);
    this.#log(`switchyard store: ${who}: ${text} (further failures of ${who} are not logged)`);
  }

  async #accept(): Promise<void> {
    while (!this.#closed) {
      let conn: Deno.Conn;
      try {
        conn = await this.#listener.accept();
      } catch (e) {
        if (this.#closed || e instanceof Deno.errors.BadResource || e instanceof Deno.errors.Interrupted) return;
        // Out of descriptors, or a connection reset before we took it: keep serving the others.
        this.#logOnce("accept", `accepting a connection failed: ${e}`);
        await new Promise((r) => setTimeout(r, 20));
        continue;
      }
      try {
        this.#admit(conn);
      } catch (e) {
        this.#logOnce("accept", `admitting a connection failed: ${e}`);
        try {
          conn.close();
        } catch { /* already closed */ }
      }
    }
  }

  #admit(conn: Deno.Conn): void {
    if (this.#closed) {
      conn.close();
      return;
    }
    if (this.#peers.size >= this.maxConnections) {
      const oldest = this.#unauthenticated.values().next().value;
      if (oldest === undefined) {
        conn.close();
        this.#logOnce("capacity", `refused a connection: ${this.maxConnections} connections are open`);
        return;
      }
      this.#drop(oldest, `dropped without hello to make room (${this.maxConnections} connections)`);
      this.#release(oldest);
    }
    const peer: Peer = new Peer(
      conn,
      () => (peer.rank < 0 ? MAX_HELLO_FRAME_BYTES : MAX_FRAME_BYTES),
      () => {
        peer.frameTimer = setTimeout(
          () => this.#drop(peer, `a frame took longer than ${this.#frameTimeoutMs} ms`),
          this.#frameTimeoutMs,
        );
      },
    );
    this.#peers.add(peer);
    this.#unauthenticated.add(peer);
    peer.helloTimer = setTimeout(
      () => this.#drop(peer, `no hello within ${this.#helloTimeoutMs} ms`),
      this.#helloTimeoutMs,
    );
    this.#serve(peer)
      .catch((e) => {
        if (this.#closed) return;
        const why = peer.dropped ?? (e instanceof Refused ? `dropped: ${e.message}` : `connection failed: ${e}`);
        this.#logOnce(peer.name, `${why} (${peer.address})`);
      })
      .finally(() => this.#release(peer));
  }

  /** Closes a peer's connection; its pending read then fails and its loop ends. */
  #drop(peer: Peer, why: string): void {
    peer.dropped ??= why;
    try {
      peer.conn.close();
    } catch { /* already closed */ }
  }

  /** Forgets a peer: its timers, parked gets, rank binding and connection. Idempotent. */
  #release(peer: Peer): void {
    if (peer.released) return;
    peer.released = true;
    clearTimeout(peer.helloTimer);
    clearTimeout(peer.frameTimer);
    for (const w of peer.parked) this.#unpark(w);
    this.#peers.delete(peer);
    this.#unauthenticated.delete(peer);
    if (peer.rank >= 0 && this.#byRank.get(peer.rank) === peer) this.#byRank.delete(peer.rank);
    try {
      peer.conn.close();
    } catch { /* already closed */ }
  }

  /** Queues a reply (replies of one connection are written one after the other, each with a deadline). */
  #send(peer: Peer, reply: Reply): Promise<void> {
    if (peer.released) return Promise.resolve();
    const bytes = frame(reply);
    if (peer.queuedBytes + bytes.length > MAX_QUEUED_REPLY_BYTES) {
      this.#drop(peer, `does not read its replies (${MAX_QUEUED_REPLY_BYTES} bytes queued)`);
      return Promise.resolve();
    }
    peer.queuedBytes += bytes.length;
    const done = peer.writing.then(async () => {
      if (peer.released) return;
      const timer = setTimeout(
        () => this.#drop(peer, `a reply took longer than ${this.#frameTimeoutMs} ms to write`),
        this.#frameTimeoutMs,
      );
      try {
        await writeAll(peer.conn, bytes);
      } finally {
        clearTimeout(timer);
      }
    }).catch((e) => {
      if (!this.#closed && !peer.released) {
        this.#logOnce(peer.name, `${peer.dropped ?? `writing failed: ${e}`} (${peer.address})`);
      }
      this.#drop(peer, `writing failed: ${e}`);
    }).finally(() => {
      peer.queuedBytes -= bytes.length;
    });
    peer.writing = done;
    return done;
  }

  async #serve(peer: Peer): Promise<void> {
    for (;;) {
      let msg: unknown;
      try {
        const body = await peer.reader.next();
        clearTimeout(peer.frameTimer);
        if (body === null) return;
        msg = parseFrame(body);
      } catch (e) {
        if (!(e instanceof FrameError)) throw e; // the connection failed: nobody to answer
        await this.#send(peer, { id: -1, ok: false, error: `malformed message: ${e.message}` });
        throw new Refused(`malformed message: ${e.message}`);
      }
      if (!isRequest(msg)) {
        await this.#send(peer, { id: -1, ok: false, error: "malformed request" });
        throw new Refused("malformed request");
      }
      if (msg.seq !== peer.seq) {
        const error = `frame out of sequence: expected seq ${peer.seq}, got ${msg.seq} (replayed or reordered)`;
        await this.#send(peer, { id: msg.id, ok: false, error });
        throw new Refused(error);
      }
      peer.seq++;
      if (peer.rank < 0 || msg.op === "hello") {
        const error = await this.#hello(peer, msg);
        await this.#send(peer, { id: msg.id, ok: !error, error });
        if (error) throw new Refused(`hello refused: ${error}`);
        continue;
      }
      this.#handle(peer, msg);
    }
  }

  /** Checks a hello and binds the connection to its rank; the reason when refused. */
  async #hello(peer: Peer, msg: Request): Promise<string | undefined> {
    if (peer.rank >= 0) return `this connection already said hello as rank ${peer.rank}`;
    if (msg.op !== "hello") return "the first message must be hello";
    if (this.#tokenDigest !== undefined) {
      const presented = await digest(msg.token ?? "");
      if (!sameDigest(presented, await this.#tokenDigest)) return "wrong SWITCHYARD_TOKEN";
    }
    const rank = msg.rank;
    if (rank === undefined || rank < 0 || rank >= this.#worldSize) {
      return `rank ${rank} is outside 0..${this.#worldSize - 1}`;
    }
    if (msg.worldSize !== undefined && msg.worldSize !== this.#worldSize) {
      return `rank ${rank} says the world has ${msg.worldSize} ranks; the store serves ${this.#worldSize}`;
    }
    if (peer.released) return "the connection was dropped";
    if (this.#byRank.has(rank)) return `rank ${rank} is already connected`;
    peer.rank = rank;
    this.#byRank.set(rank, peer);
    this.#unauthenticated.delete(peer);
    clearTimeout(peer.helloTimer);
    return undefined;
  }

  #handle(peer: Peer, msg: Request): void {
    const key = msg.key;
    const abandoned = key === undefined ? undefined : this.#abandoned.get(key.slice(0, key.lastIndexOf("/")));
    if (abandoned) {
      this.#send(peer, { id: msg.id, ok: false, ...abandoned });
      return;
    }
    if (key === undefined || (msg.op === "set" && msg.value === undefined)) {
      this.#send(peer, { id: msg.id, ok: false, error: `bad ${msg.op} request` });
      return;
    }
    const owner = keyOwner(key);
    const keyBytes = utf8Length(key);
    const badKey = keyBytes > MAX_KEY_BYTES
      ? `key of ${keyBytes} bytes exceeds the ${MAX_KEY_BYTES}-byte limit`
      : owner === undefined || owner >= this.#worldSize
      ? `key "${key}" is not <name>/<rank> with a rank in 0..${this.#worldSize - 1}`
      : undefined;
    if (badKey) {
      this.#send(peer, { id: msg.id, ok: false, error: badKey });
      return;
    }
    if (msg.op === "set") {
      const error = this.#set(peer.rank, key, owner!, keyBytes, msg.value!);
      this.#send(peer, { id: msg.id, ok: !error, error });
      return;
    }
    const have = this.#values.get(key);
    if (have !== undefined) {
      this.#send(peer, { id: msg.id, ok: true, value: have.value });
      this.#markRead(key, have, peer.rank);
      return;
    }
    if (peer.parked.size >= this.maxParkedGets) {
      this.#send(peer, {
        id: msg.id,
        ok: false,
        error: `too many waiting gets: ${this.maxParkedGets} on one connection`,
      });
      return;
    }
    const wait = Math.min(msg.timeoutMs ?? 0, this.#maxWaitMs);
    const waiter: Waiter = {
      peer,
      id: msg.id,
      key,
      timer: setTimeout(() => {
        this.#unpark(waiter);
        this.#send(peer, { id: msg.id, ok: false, error: `timeout waiting for ${key}`, timeout: true });
      }, wait),
    };
    peer.parked.add(waiter);
    this.#parkedGets++;
    let set = this.#waiters.get(key);
    if (!set) this.#waiters.set(key, set = new Set());
    set.add(waiter);
  }

  #unpark(w: Waiter): void {
    clearTimeout(w.timer);
    if (!w.peer.parked.delete(w)) return;
    this.#parkedGets--;
    const set = this.#waiters.get(w.key);
    set?.delete(w);
    if (set?.size === 0) this.#waiters.delete(w.key);
  }

  /** Stores a value for its owner within the quotas; the reason when refused. */
  #set(rank: number, key: string, owner: number, keyBytes: number, value: string): string | undefined {
    if (owner !== rank) {
      return `key "${key}" belongs to rank ${owner}; rank ${rank} may only set keys ending in /${rank}`;
    }
    const valueBytes = utf8Length(value);
    if (valueBytes > MAX_VALUE_BYTES) return `value of ${valueBytes} bytes exceeds the ${MAX_VALUE_BYTES}-byte limit`;
    const bytes = keyBytes + valueBytes;
    const old = this.#values.get(key)?.bytes ?? 0;
    const mine = (this.#rankBytes.get(rank) ?? 0) - old + bytes;
    if (mine > MAX_RANK_STORED_BYTES) {
      return `rank ${rank} would store ${mine} bytes, over its quota of ${MAX_RANK_STORED_BYTES}`;
    }
    if (this.#storedBytes - old + bytes > MAX_STORED_BYTES) {
      return `the store would hold ${this.#storedBytes - old + bytes} bytes, over its quota of ${MAX_STORED_BYTES}`;
    }
    const entry: Entry = { value, owner, bytes, readers: new Set() };
    this.#values.set(key, entry);
    this.#rankBytes.set(rank, mine);
    this.#storedBytes += bytes - old;
    for (const w of [...(this.#waiters.get(key) ?? [])]) {
      this.#unpark(w);
      this.#send(w.peer, { id: w.id, ok: true, value });
      entry.readers.add(w.peer.rank);
    }
    this.#markRead(key, entry, -1);
    return undefined;
  }

  /** Counts a rank's read; a key every rank has read is dropped. */
  #markRead(key: string, entry: Entry, rank: number): void {
    if (rank >= 0) entry.readers.add(rank);
    if (entry.readers.size < this.#worldSize || this.#values.get(key) !== entry) return;
    this.#values.delete(key);
    this.#storedBytes -= entry.bytes;
    this.#rankBytes.set(entry.owner, (this.#rankBytes.get(entry.owner) ?? 0) - entry.bytes);
  }

  /**
   * Rank 0 gave up the rendezvous `name` waiting for rank `peerRank` (`reason`: its error):
   * every get of it still waiting, and every request of it from now on, is answered with that
   * reason, so the other ranks fail at once naming `peerRank` instead of finding the store gone
   * and blaming rank 0. Other rendezvous are untouched. Resolves once those answers are written,
   * or after `flushMs`.
   */
  async abandon(name: string, peerRank: number, reason: string, flushMs = 1000): Promise<void> {
    if (this.#closed || this.#abandoned.has(name)) return;
    const answer = { error: reason, abandonedFor: peerRank };
    this.#abandoned.set(name, answer);
    const written: Promise<void>[] = [];
    for (const peer of this.#peers) {
      for (const w of [...peer.parked]) {
        if (w.key.slice(0, w.key.lastIndexOf("/")) !== name) continue;
        this.#unpark(w);
        written.push(this.#send(peer, { id: w.id, ok: false, ...answer }));
      }
    }
    let timer: Timer | undefined;
    await Promise.race([
      Promise.all(written),
      new Promise<void>((resolve) => timer = setTimeout(resolve, flushMs)),
    ]);
    clearTimeout(timer);
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
    if (this.#byRank.size === 0) return this.close();
    const timer = setTimeout(() => this.close(), graceMs);
    const poll = setInterval(() => {
      if (this.#byRank.size === 0) this.close();
    }, 20);
    this.#idleTimer = timer;
    this.#idlePoll = poll;
  }

  /** Stops serving and drops every connection. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#idleTimer);
    clearInterval(this.#idlePoll);
    try {
      this.#listener.close();
    } catch { /* already closed */ }
    for (const p of [...this.#peers]) this.#release(p);
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
  /** Deadline of every wait, in milliseconds (and of connecting, unless `connectTimeoutMs` says otherwise). */
  readonly timeoutMs: number;
  /** Deadline of connecting and saying hello, in milliseconds (default `timeoutMs`). */
  readonly connectTimeoutMs?: number;
}

/** Errors that carry rank 0's giving up (StoreServer.abandon): an exchange rethrows them as they are. */
const abandonedErrors = new WeakSet<Error>();

/** One rank's connection to the store. */
export class StoreClient {
  readonly #conn: Deno.Conn;
  readonly #reader: FrameReader;
  readonly #pending = new Map<number, (r: Outcome) => void>();
  #nextId = 1;
  #nextSeq = 0;
  #writing: Promise<void> = Promise.resolve();
  #closed = false;
  /** The store this process serves, if any (servedBy). */
  #server: StoreServer | undefined;
  /** Why the connection is gone, once it is. */
  #lost: string | undefined;
  readonly #where: string;
  /** This rank. */
  readonly rank: number;
  /** Ranks in the group. */
  readonly worldSize: number;
  /** Deadline of every wait, in milliseconds. */
  readonly timeoutMs: number;

  private constructor(conn: Deno.Conn, options: StoreClientOptions) {
    this.#conn = conn;
    this.#reader = new FrameReader(conn, () => MAX_FRAME_BYTES);
    this.#where = `${options.hostname}:${options.port}`;
    this.rank = options.rank;
    this.worldSize = options.worldSize;
    this.timeoutMs = options.timeoutMs;
  }

  /**
   * Connects and says hello, retrying until the deadline while rank 0 is not listening yet or
   * closes the connection before answering. Fails with a `SwitchyardTimeoutError` naming rank 0
   * when the store never answers, or with `INVALID_ARGUMENT` when it refuses this rank.
   */
  static async connect(options: StoreClientOptions): Promise<StoreClient> {
    const { rank } = options;
    const timeoutMs = options.connectTimeoutMs ?? options.timeoutMs;
    if (options.token !== undefined && options.token.length > MAX_TOKEN_LENGTH) {
      throw new SwitchyardError("INVALID_ARGUMENT", `SWITCHYARD_TOKEN: at most ${MAX_TOKEN_LENGTH} characters`, {
        argument: "SWITCHYARD_TOKEN",
        rank,
      });
    }
    const where = `${options.hostname}:${options.port}`;
    const deadline = performance.now() + timeoutMs;
    let failure: { code: "TIMEOUT" | "PEER_FAILED"; why: string } | undefined;
    for (;;) {
      const left = Math.round(deadline - performance.now());
      if (left <= 0 && failure) break;
      let conn: Deno.Conn;
      try {
        conn = await Deno.connect({ hostname: options.hostname, port: options.port, transport: "tcp" });
      } catch (e) {
        if (performance.now() >= deadline) {
          throw new SwitchyardTimeoutError(
            "TIMEOUT",
            `rank ${rank} could not reach the rendezvous store at ${where} within ${timeoutMs} ms (${e}); ` +
              "is rank 0 running, with the same MASTER_ADDR and MASTER_PORT?",
            StoreClient.#waitedForStore(timeoutMs),
            { rank },
          );
        }
        await new Promise((r) => setTimeout(r, Math.min(50, Math.max(1, deadline - performance.now()))));
        continue;
      }
      const client = new StoreClient(conn, options);
      client.#readLoop();
      const hello = await client.#request(
        { op: "hello", rank, worldSize: options.worldSize, token: options.token },
        Math.max(1, left),
        0,
      );
      if (hello.ok) return client;
      client.close();
      if (!hello.lost && !hello.timeout) {
        throw new SwitchyardError("INVALID_ARGUMENT", `rendezvous refused rank ${rank}: ${hello.error}`, {
          argument: hello.error?.includes("TOKEN") ? "SWITCHYARD_TOKEN" : "RANK",
          rank,
        });
      }
      failure = hello.timeout
        ? { code: "TIMEOUT", why: "did not answer hello" }
        : { code: "PEER_FAILED", why: `closed the connection before answering hello (${hello.error})` };
      if (performance.now() < deadline) {
        await new Promise((r) => setTimeout(r, Math.min(50, Math.max(1, deadline - performance.now()))));
      }
    }
    throw new SwitchyardTimeoutError(
      failure.code,
      `rank ${rank}: the rendezvous store at ${where} (rank 0) ${failure.why}, until the ${timeoutMs} ms deadline`,
      StoreClient.#waitedForStore(timeoutMs),
      { rank },
    );
  }

  static #waitedForStore(ms: number) {
    return {
      peerRank: 0,
      role: "rendezvous" as const,
      channel: -1,
      expected: 0n,
      observed: 0n,
      waitedSeconds: ms / 1e3,
    };
  }

  /** The error of an operation that found the store gone: rank 0 serves it. */
  #storeLost(what: string, why: string): SwitchyardTimeoutError {
    return new SwitchyardTimeoutError(
      "PEER_FAILED",
      `rank ${this.rank}: ${what}: the rendezvous store at ${this.#where} (rank 0) went away: ${why}`,
      StoreClient.#waitedForStore(0),
      { rank: this.rank },
    );
  }

  async #readLoop(): Promise<void> {
    let why = "the rendezvous store closed the connection";
    try {
      for (;;) {
        const body = await this.#reader.next();
        if (body === null) break;
        const msg = parseFrame(body) as Reply;
        if (typeof msg !== "object" || msg === null || typeof msg.id !== "number" || typeof msg.ok !== "boolean") {
          throw new Error("a malformed reply");
        }
        const done = this.#pending.get(msg.id);
        if (done) {
          this.#pending.delete(msg.id);
          done(msg);
        } else if (msg.id === -1) {
          // The store refuses the connection as a whole (it drops it next).
          for (const d of this.#pending.values()) d(msg);
          this.#pending.clear();
        }
      }
    } catch (e) {
      why = this.#closed ? "the store connection is closed" : `the store connection failed: ${e}`;
    }
    this.#lost = why;
    for (const d of this.#pending.values()) d({ id: -1, ok: false, error: why, lost: true });
    this.#pending.clear();
    try {
      this.#conn.close();
    } catch { /* already closed */ }
  }

  /** Sends a request and waits for its reply, at most `waitMs + slackMs`. */
  #request(req: Omit<Request, "id" | "seq">, waitMs: number, slackMs: number): Promise<Outcome> {
    if (this.#lost !== undefined) return Promise.resolve({ id: -1, ok: false, error: this.#lost, lost: true });
    if (this.#closed) {
      return Promise.resolve({ id: -1, ok: false, error: "the store connection is closed", lost: true });
    }
    const id = this.#nextId++;
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        resolve({ id, ok: false, error: `timeout waiting for ${req.key ?? req.op}`, timeout: true });
      }, waitMs + slackMs);
      this.#pending.set(id, (r) => {
        clearTimeout(timer);
        resolve(r);
      });
      // One frame at a time, numbered in the order written.
      this.#writing = this.#writing.then(() => writeAll(this.#conn, frame({ ...req, id, seq: this.#nextSeq++ })))
        .catch((e) => {
          const done = this.#pending.get(id);
          this.#pending.delete(id);
          done?.({ id, ok: false, error: `sending to the store failed: ${e}`, lost: true });
        });
    });
  }

  /**
   * The store this rank's process serves (rank 0's): when one of this client's exchanges times
   * out, the store abandons that rendezvous for the rank it lacked (StoreServer.abandon) before
   * the error is thrown, so the others learn whom rank 0 gave up on instead of losing the store.
   */
  servedBy(server: StoreServer): void {
    this.#server = server;
  }

  /** The error of a request the store answered with rank 0's giving up (StoreServer.abandon). */
  #abandonedError(what: string, r: Outcome): SwitchyardTimeoutError {
    const e = new SwitchyardTimeoutError(
      "PEER_FAILED",
      `rank ${this.rank}: ${what}: rank 0 gave up on the group: ${r.error}`,
      // The rank rank 0 gave up on, arriving late, learns that rank 0 has gone on without it.
      { ...StoreClient.#waitedForStore(0), peerRank: r.abandonedFor === this.rank ? 0 : r.abandonedFor! },
      { rank: this.rank },
    );
    abandonedErrors.add(e);
    return e;
  }

  /** Stores `value` under `key`, which must be `<name>/<this rank>`. */
  async set(key: string, value: string): Promise<void> {
    const bytes = utf8Length(value);
    if (bytes > MAX_VALUE_BYTES) {
      throw new SwitchyardError(
        "INVALID_ARGUMENT",
        `rendezvous set ${key}: value of ${bytes} bytes exceeds ${MAX_VALUE_BYTES}`,
        {
          argument: "value",
          rank: this.rank,
        },
      );
    }
    const r = await this.#request({ op: "set", key, value }, this.timeoutMs, 0);
    if (r.ok) return;
    if (r.abandonedFor !== undefined) throw this.#abandonedError(`rendezvous set ${key}`, r);
    if (r.lost) throw this.#storeLost(`rendezvous set ${key}`, r.error ?? "");
    if (r.timeout) {
      throw new SwitchyardTimeoutError(
        "TIMEOUT",
        `rank ${this.rank}: rendezvous set ${key}: the store at ${this.#where} (rank 0) did not answer within ${this.timeoutMs} ms`,
        StoreClient.#waitedForStore(this.timeoutMs),
        { rank: this.rank },
      );
    }
    throw new SwitchyardError("INVALID_ARGUMENT", `rendezvous refused set ${key}: ${r.error}`, {
      argument: "key",
      rank: this.rank,
    });
  }

  /** The value of `key`, waiting for it until the deadline; undefined if it never came. */
  async tryGet(key: string, timeoutMs = this.timeoutMs): Promise<string | undefined> {
    const r = await this.#request({ op: "get", key, timeoutMs }, timeoutMs, 1000);
    if (r.ok) return r.value;
    if (r.abandonedFor !== undefined) throw this.#abandonedError(`rendezvous get ${key}`, r);
    if (r.timeout) return undefined;
    if (r.lost) throw this.#storeLost(`rendezvous get ${key}`, r.error ?? "");
    throw new SwitchyardError("INVALID_ARGUMENT", `rendezvous refused get ${key}: ${r.error}`, {
      argument: "key",
      rank: this.rank,
    });
  }

  /**
   * Every rank sets `${name}/${rank}` and waits for all the others' (until `timeoutMs`, by
   * default the client's); the values come back by rank. Fails naming the ranks that never arrived.
   */
  async exchange(name: string, value: string, timeoutMs: number = this.timeoutMs): Promise<string[]> {
    await this.set(`${name}/${this.rank}`, value);
    const deadline = performance.now() + timeoutMs;
    const got = await Promise.allSettled(
      Array.from(
        { length: this.worldSize },
        (_, r) => this.tryGet(`${name}/${r}`, Math.max(0, Math.round(deadline - performance.now()))),
      ),
    );
    const refused = got.find((v) =>
      v.status === "rejected" && (!(v.reason instanceof SwitchyardTimeoutError) || abandonedErrors.has(v.reason))
    );
    if (refused) throw (refused as PromiseRejectedResult).reason;
    const missing = got.flatMap((v, r) => (v.status === "rejected" || v.value === undefined ? [r] : []));
    if (missing.length) {
      // The store gone without a word (rank 0 gives up through abandon) means rank 0 is gone.
      const lost = got.find((v) => v.status === "rejected") as PromiseRejectedResult | undefined;
      const ranks = `rank${missing.length > 1 ? "s" : ""} ${missing.join(", ")}`;
      const e = new SwitchyardTimeoutError(
        lost ? "PEER_FAILED" : "TIMEOUT",
        lost
          ? `rank ${this.rank}: the rendezvous store (rank 0) went away during "${name}" (waiting for ${ranks})`
          : `rank ${this.rank} timed out after ${timeoutMs} ms at rendezvous "${name}": missing ${ranks}`,
        {
          peerRank: lost ? 0 : missing[0],
          role: "rendezvous",
          channel: -1,
          expected: BigInt(this.worldSize),
          observed: BigInt(this.worldSize - missing.length),
          waitedSeconds: timeoutMs / 1e3,
        },
        { rank: this.rank, cause: lost?.reason },
      );
      if (!lost) await this.#server?.abandon(name, missing[0], e.message);
      throw e;
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
