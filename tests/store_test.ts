/**
 * The rendezvous store: exchanges and bounded waits; tokens, rank binding, key ownership and
 * sequence numbers; clients that reset or flood the store; a store that goes away. Loopback
 * only, bounded counts, and every test under a hard time limit.
 */

import assert from "node:assert/strict";
import net from "node:net";
import { SwitchyardError, SwitchyardTimeoutError } from "../mod.ts";
import {
  MAX_FRAME_BYTES,
  MAX_HELLO_FRAME_BYTES,
  MAX_RANK_STORED_BYTES,
  MAX_VALUE_BYTES,
  StoreClient,
  type StoreClientOptions,
  StoreServer,
} from "../src/store.ts";

/** Fails the test when `fn` runs past `ms`. */
function bounded(ms: number, fn: (t: Deno.TestContext) => Promise<void>): (t: Deno.TestContext) => Promise<void> {
  return async (t) => {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const limit = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`the test ran past its ${ms} ms limit`)), ms);
    });
    try {
      await Promise.race([fn(t), limit]);
    } finally {
      clearTimeout(timer);
    }
  };
}

/** Polls `cond` until it holds, failing after `ms`. */
async function until(cond: () => boolean, ms: number, what: string): Promise<void> {
  const end = performance.now() + ms;
  while (!cond()) {
    if (performance.now() > end) throw new Error(`not within ${ms} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

function frameOf(json: string): Uint8Array {
  const body = new TextEncoder().encode(json);
  const out = new Uint8Array(4 + body.length);
  new DataView(out.buffer).setUint32(0, body.length);
  out.set(body, 4);
  return out;
}

/** A hand-driven connection to the store: frames exactly as given, replies read one by one. */
class Raw {
  seq = 0;
  private constructor(readonly conn: Deno.Conn) {}

  static async open(port: number): Promise<Raw> {
    return new Raw(await Deno.connect({ hostname: "127.0.0.1", port }));
  }

  /** Sends a request with the next `seq` (unless it has one); returns the bytes sent. */
  async send(req: Record<string, unknown>): Promise<Uint8Array> {
    const bytes = frameOf(JSON.stringify({ seq: this.seq++, ...req }));
    await this.write(bytes);
    return bytes;
  }

  async write(bytes: Uint8Array): Promise<void> {
    let off = 0;
    while (off < bytes.length) off += await this.conn.write(bytes.subarray(off));
  }

  /** The next reply, or null when the store closed (or reset) the connection. */
  async reply(): Promise<Record<string, unknown> | null> {
    const head = new Uint8Array(4);
    if (!await this.#fill(head)) return null;
    const body = new Uint8Array(new DataView(head.buffer).getUint32(0));
    if (!await this.#fill(body)) return null;
    return JSON.parse(new TextDecoder().decode(body));
  }

  async #fill(buf: Uint8Array): Promise<boolean> {
    let off = 0;
    try {
      while (off < buf.length) {
        const n = await this.conn.read(buf.subarray(off));
        if (n === null) return false;
        off += n;
      }
    } catch {
      return false;
    }
    return true;
  }

  /** Everything the store sends until it closes the connection, as text. */
  async drain(): Promise<string> {
    const buf = new Uint8Array(4096);
    let text = "";
    try {
      for (;;) {
        const n = await this.conn.read(buf);
        if (n === null) break;
        text += new TextDecoder().decode(buf.subarray(0, n));
      }
    } catch { /* reset */ }
    return text;
  }

  close(): void {
    try {
      this.conn.close();
    } catch { /* already closed */ }
  }
}

async function rawExchange(port: number, bytes: Uint8Array): Promise<string> {
  const raw = await Raw.open(port);
  await raw.write(bytes);
  const text = await raw.drain();
  raw.close();
  return text;
}

function clientOf(server: StoreServer, rank: number, more: Partial<StoreClientOptions> = {}): Promise<StoreClient> {
  return StoreClient.connect({
    hostname: "127.0.0.1",
    port: server.port,
    rank,
    worldSize: 2,
    token: "s3cret",
    timeoutMs: 1000,
    ...more,
  });
}

const isStoreGone = (code: string) => (e: unknown) =>
  e instanceof SwitchyardTimeoutError && e.code === code && e.peerRank === 0 && e.role === "rendezvous";

Deno.test(
  "store: ranks exchange values; waits are bounded and name the missing ranks",
  bounded(10_000, async () => {
    const server = StoreServer.listen({ port: 0, worldSize: 3, token: "s3cret" });
    const connect = (rank: number) => clientOf(server, rank, { worldSize: 3, timeoutMs: 400 });
    const [a, b] = await Promise.all([connect(0), connect(1)]);
    try {
      const started = performance.now();
      const results = await Promise.allSettled([a.exchange("x", "A"), b.exchange("x", "B")]);
      const elapsed = performance.now() - started;
      for (const r of results) {
        const e = (r as PromiseRejectedResult).reason;
        assert.ok(e instanceof SwitchyardTimeoutError, String(e));
        assert.equal(e.peerRank, 2);
        assert.match(e.message, /missing rank 2/);
      }
      assert.ok(elapsed < 2000, `bounded: ${elapsed} ms`);
      const c = await connect(2);
      const got = await Promise.all([a.exchange("y", "A"), b.exchange("y", "B"), c.exchange("y", "C")]);
      assert.deepEqual(got, [["A", "B", "C"], ["A", "B", "C"], ["A", "B", "C"]]);
      // Every rank read every "y" key: they are gone; the unfinished "x" ones stay.
      assert.equal(server.stats().keys, 2);
      c.close();
    } finally {
      a.close();
      b.close();
      server.close();
    }
  }),
);

Deno.test(
  "store: a wrong token or rank is refused; malformed messages are answered and dropped",
  bounded(10_000, async () => {
    const server = StoreServer.listen({ port: 0, worldSize: 2, token: "right", log: () => {} });
    try {
      await assert.rejects(
        () => clientOf(server, 0, { token: "wrong" }),
        (e: unknown) =>
          e instanceof SwitchyardError && e.argument === "SWITCHYARD_TOKEN" && /wrong SWITCHYARD_TOKEN/.test(e.message),
      );
      await assert.rejects(() => clientOf(server, 5, { token: "right" }), /rank 5 is outside 0..1/);
      assert.match(await rawExchange(server.port, frameOf("{not json")), /malformed message/);
      assert.match(
        await rawExchange(server.port, frameOf(JSON.stringify({ id: 1, seq: 0, op: "drop tables" }))),
        /malformed request/,
      );
      const huge = new Uint8Array(4);
      new DataView(huge.buffer).setUint32(0, MAX_FRAME_BYTES + 1);
      assert.match(await rawExchange(server.port, huge), new RegExp(`exceeds the ${MAX_HELLO_FRAME_BYTES}-byte limit`));
      // Nesting is checked before JSON.parse sees the text.
      assert.match(await rawExchange(server.port, frameOf("[".repeat(1000) + "]".repeat(1000))), /nested deeper/);
      assert.match(
        await rawExchange(
          server.port,
          frameOf(JSON.stringify({ id: 1, seq: 0, op: "get", key: "k/0", timeoutMs: 10 })),
        ),
        /the first message must be hello/,
      );
      // The server still serves well-behaved ranks.
      const ok = await clientOf(server, 1, { token: "right" });
      await ok.set("k/1", "v");
      assert.equal(await ok.tryGet("k/1", 100), "v");
      assert.equal(await ok.tryGet("absent/0", 50), undefined);
      ok.close();
    } finally {
      server.close();
    }
  }),
);

Deno.test(
  "store: an unreachable rendezvous fails within the deadline, naming rank 0",
  bounded(5000, async () => {
    const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = l.addr.port;
    l.close(); // nobody listens there now
    const started = performance.now();
    await assert.rejects(
      () => StoreClient.connect({ hostname: "127.0.0.1", port, rank: 1, worldSize: 2, timeoutMs: 300 }),
      (e: unknown) =>
        e instanceof SwitchyardTimeoutError && e.peerRank === 0 && /could not reach the rendezvous/.test(e.message),
    );
    assert.ok(performance.now() - started < 1500);
  }),
);

Deno.test(
  "store: clients that say hello and reset the connection do not stop it; each peer is logged once",
  bounded(15_000, async () => {
    const logs: string[] = [];
    const server = StoreServer.listen({ port: 0, worldSize: 2, token: "s3cret", log: (l) => logs.push(l) });
    const zero = await clientOf(server, 0);
    try {
      await zero.set("big/0", "b".repeat(60 << 10));
      const hello = frameOf(JSON.stringify({ id: 1, seq: 0, op: "hello", rank: 1, worldSize: 2, token: "s3cret" }));
      const park = frameOf(JSON.stringify({ id: 2, seq: 1, op: "get", key: "k/0", timeoutMs: 5000 }));
      const bigGets = Array.from(
        { length: 40 },
        (_, i) => frameOf(JSON.stringify({ id: 2 + i, seq: 1 + i, op: "get", key: "big/0", timeoutMs: 5000 })),
      );
      // Reset before the store answers hello; after it parked a get; while it is still writing replies.
      const variants = [[hello], [hello, park], [hello, ...bigGets]];
      for (let i = 0; i < 12; i++) {
        const variant = i % 3;
        const bytes = new Uint8Array(variants[variant].flatMap((f) => [...f]));
        await new Promise<void>((resolve, reject) => {
          const timer = setTimeout(() => reject(new Error("the reset client hung")), 2000);
          const done = () => {
            clearTimeout(timer);
            resolve();
          };
          const s = net.connect(server.port, "127.0.0.1", () => {
            s.write(bytes, () => {
              if (variant === 0) s.resetAndDestroy();
              else s.once("data", () => s.resetAndDestroy());
            });
          });
          s.on("error", () => {});
          s.on("close", done);
        });
        await until(() => server.stats().connections === 1, 2000, "the reset connection is released");
      }
      assert.equal(server.stats().parkedGets, 0, "the reset clients' gets are forgotten");
      assert.equal(server.stats().queuedReplyBytes, 0, "and their unwritten replies");
      // A legitimate pair still completes, with rank 1 too.
      const started = performance.now();
      const one = await clientOf(server, 1);
      assert.deepEqual(await Promise.all([zero.exchange("after", "A"), one.exchange("after", "B")]), [
        ["A", "B"],
        ["A", "B"],
      ]);
      assert.ok(performance.now() - started < 1000);
      one.close();
      await until(() => server.stats().connections === 1, 2000, "rank 1 left");
      assert.ok(logs.length >= 1, "the failures are logged");
      assert.ok(logs.filter((l) => l.includes("rank 1:")).length <= 1, `logged once per peer: ${logs.join("\n")}`);
      assert.ok(logs.length <= 2, logs.join("\n"));
    } finally {
      zero.close();
      server.close();
    }
  }),
);

Deno.test(
  "store: identity (rank binding, key ownership, sequence numbers, tokens)",
  bounded(15_000, async (t) => {
    const server = StoreServer.listen({ port: 0, worldSize: 2, token: "s3cret", log: () => {} });
    const zero = await clientOf(server, 0);
    try {
      await t.step("a second hello as a connected rank is refused, on a new connection or the same", async () => {
        const one = await clientOf(server, 1);
        await assert.rejects(
          () => clientOf(server, 1),
          (e: unknown) =>
            e instanceof SwitchyardError && e.argument === "RANK" && /rank 1 is already connected/.test(e.message),
        );
        one.close();
        await until(() => server.stats().connections === 1, 2000, "rank 1 left");
        const raw = await Raw.open(server.port);
        await raw.send({ id: 1, op: "hello", rank: 1, worldSize: 2, token: "s3cret" });
        assert.equal((await raw.reply())?.ok, true, "rank 1 may come back once it left");
        await raw.send({ id: 2, op: "hello", rank: 0, worldSize: 2, token: "s3cret" });
        assert.match(String((await raw.reply())?.error), /already said hello as rank 1/);
        assert.equal(await raw.reply(), null, "and the connection is dropped");
        raw.close();
        await until(() => server.stats().connections === 1, 2000, "the raw connection is released");
      });

      await t.step("a rank may write only its own keys", async () => {
        const one = await clientOf(server, 1);
        await assert.rejects(
          () => one.set("x/0", "forged"),
          (e: unknown) => e instanceof SwitchyardError && /belongs to rank 0/.test(e.message),
        );
        await assert.rejects(() => one.set("no-rank", "v"), /not <name>\/<rank>/);
        await assert.rejects(() => one.set("x/2", "v"), /not <name>\/<rank>/);
        assert.equal(await zero.tryGet("x/0", 50), undefined, "the forged value was not stored");
        await one.set("x/1", "mine");
        assert.equal(await zero.tryGet("x/1", 50), "mine");
        one.close();
        await until(() => server.stats().connections === 1, 2000, "rank 1 left");
      });

      await t.step("a replayed frame is refused and the connection dropped", async () => {
        const raw = await Raw.open(server.port);
        await raw.send({ id: 1, op: "hello", rank: 1, worldSize: 2, token: "s3cret" });
        assert.equal((await raw.reply())?.ok, true);
        const first = await raw.send({ id: 2, op: "set", key: "r/1", value: "A" });
        assert.equal((await raw.reply())?.ok, true);
        await raw.send({ id: 3, op: "set", key: "r/1", value: "B" });
        assert.equal((await raw.reply())?.ok, true);
        await raw.write(first); // seq 1 again
        assert.match(String((await raw.reply())?.error), /out of sequence: expected seq 3, got 1/);
        assert.equal(await raw.reply(), null);
        raw.close();
        assert.equal(await zero.tryGet("r/1", 50), "B", "the replay had no effect");
        await until(() => server.stats().connections === 1, 2000, "the raw connection is released");
      });

      await t.step("a wrong, missing or longer token is refused", async () => {
        for (const token of ["s3creT", "", "s3cret-and-more", undefined]) {
          const raw = await Raw.open(server.port);
          await raw.send({ id: 1, op: "hello", rank: 1, worldSize: 2, token });
          const r = await raw.reply();
          assert.equal(r?.ok, false, `token ${token}`);
          assert.match(String(r?.error), /wrong SWITCHYARD_TOKEN/);
          assert.equal(await raw.reply(), null);
          raw.close();
        }
      });

      await t.step("a store off loopback without a token is refused, saying how to set one", () => {
        assert.throws(
          () => StoreServer.listen({ hostname: "0.0.0.0", port: 0, worldSize: 2 }),
          (e: unknown) =>
            e instanceof SwitchyardError && e.argument === "SWITCHYARD_TOKEN" &&
            /not loopback.*Set SWITCHYARD_TOKEN/.test(e.message),
        );
      });
    } finally {
      zero.close();
      server.close();
    }
  }),
);

Deno.test(
  "store: a flood of unauthenticated connections is bounded, and ranks still get through",
  bounded(20_000, async () => {
    const frameTimeoutMs = 1500;
    const server = StoreServer.listen({
      port: 0,
      worldSize: 2,
      token: "s3cret",
      helloTimeoutMs: 4000,
      frameTimeoutMs,
      log: () => {},
    });
    const zero = await clientOf(server, 0, { timeoutMs: 3000 });
    const raws: Raw[] = [];
    let trickling = true;
    const tricklers: Promise<void>[] = [];
    try {
      const rss0 = Deno.memoryUsage().rss;
      // 60 connections declare a 1 MiB frame and send 64 KiB of it; 40 trickle a frame a byte at a time.
      const partial = new Uint8Array(4 + (64 << 10));
      new DataView(partial.buffer).setUint32(0, MAX_FRAME_BYTES);
      for (let i = 0; i < 100; i++) {
        const raw = await Raw.open(server.port);
        raws.push(raw);
        if (i < 60) {
          await raw.write(partial).catch(() => {});
        } else {
          const head = new Uint8Array(4);
          new DataView(head.buffer).setUint32(0, MAX_HELLO_FRAME_BYTES);
          await raw.write(head).catch(() => {});
          tricklers.push((async () => {
            while (trickling) {
              await raw.write(new Uint8Array([0x20])).catch(() => trickling = false);
              await new Promise((r) => setTimeout(r, 25));
            }
          })());
        }
      }
      const during = server.stats();
      const rss = Deno.memoryUsage().rss - rss0;
      console.log(`  during the flood: ${JSON.stringify(during)}, rss +${(rss / 2 ** 20).toFixed(1)} MiB`);
      assert.ok(during.connections <= server.maxConnections, `connections ${during.connections}`);
      assert.ok(
        during.bufferedBytes <= server.maxConnections * MAX_HELLO_FRAME_BYTES,
        `buffered ${during.bufferedBytes} bytes`,
      );
      assert.ok(rss < 64 * 2 ** 20, `rss grew by ${rss} bytes`);

      // A connected rank is served at once; a rank joining now gets in (the oldest idle connection makes room).
      let started = performance.now();
      await zero.set("during/0", "v");
      assert.equal(await zero.tryGet("during/0", 500), "v");
      assert.ok(performance.now() - started < 500, `set and get took ${performance.now() - started} ms`);
      started = performance.now();
      const one = await clientOf(server, 1, { timeoutMs: 3000 });
      assert.deepEqual(await Promise.all([zero.exchange("flood", "A"), one.exchange("flood", "B")]), [
        ["A", "B"],
        ["A", "B"],
      ]);
      assert.ok(performance.now() - started < 1000, `joining took ${performance.now() - started} ms`);

      // The tricklers never finish their frame: the frame deadline drops them (well before the hello deadline).
      await until(() => server.stats().unauthenticated === 0, frameTimeoutMs + 1500, "tricklers dropped");
      one.close();
    } finally {
      trickling = false;
      await Promise.all(tricklers);
      for (const r of raws) r.close();
      zero.close();
      server.close();
    }
  }),
);

Deno.test(
  "store: hello deadline, quotas and the cap on parked gets",
  bounded(15_000, async (t) => {
    const server = StoreServer.listen({ port: 0, worldSize: 2, token: "s3cret", helloTimeoutMs: 200, log: () => {} });
    try {
      await t.step("a connection that never says hello is dropped", async () => {
        const started = performance.now();
        const raw = await Raw.open(server.port);
        assert.equal(await raw.reply(), null);
        raw.close();
        const ms = performance.now() - started;
        assert.ok(ms >= 150 && ms < 1500, `dropped after ${ms} ms`);
      });

      await t.step("values, a rank's stored bytes, and parked gets have limits", async () => {
        const raw = await Raw.open(server.port);
        await raw.send({ id: 1, op: "hello", rank: 1, worldSize: 2, token: "s3cret" });
        assert.equal((await raw.reply())?.ok, true);
        await raw.send({ id: 2, op: "set", key: "big/1", value: "x".repeat(MAX_VALUE_BYTES + 1) });
        assert.match(String((await raw.reply())?.error), /exceeds the 65536-byte limit/);
        const value = "y".repeat(MAX_VALUE_BYTES - 16);
        let stored = 0;
        for (let i = 0; i < 40; i++) {
          await raw.send({ id: 10 + i, op: "set", key: `q${i}/1`, value });
          const r = await raw.reply();
          if (!r?.ok) {
            assert.match(String(r?.error), /over its quota/);
            break;
          }
          stored++;
        }
        assert.equal(stored, Math.floor(MAX_RANK_STORED_BYTES / (MAX_VALUE_BYTES - 16 + 5)));
        assert.ok(server.stats().storedBytes <= MAX_RANK_STORED_BYTES);

        const cap = server.maxParkedGets;
        for (let i = 0; i < cap + 3; i++) {
          await raw.send({ id: 100 + i, op: "get", key: `never/${i % 2}`, timeoutMs: 10_000 });
        }
        for (let i = 0; i < 3; i++) assert.match(String((await raw.reply())?.error), /too many waiting gets/);
        assert.equal(server.stats().parkedGets, cap);
        raw.close();
        await until(() => server.stats().parkedGets === 0, 2000, "the parked gets of a closed connection are dropped");
      });

      await t.step("a client refuses an oversized value itself", async () => {
        const one = await clientOf(server, 1);
        await assert.rejects(() => one.set("big/1", "z".repeat(MAX_VALUE_BYTES + 1)), /exceeds 65536/);
        one.close();
      });
    } finally {
      server.close();
    }
  }),
);

Deno.test(
  "store: a store that goes away fails the ranks within the deadline, naming rank 0",
  bounded(15_000, async (t) => {
    /** A listener that does `onConn` with each connection it accepts. */
    const fakeStore = (onConn: (c: Deno.Conn) => void) => {
      const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      const held: Deno.Conn[] = [];
      const loop = (async () => {
        try {
          for await (const c of l) {
            held.push(c);
            onConn(c);
          }
        } catch { /* closed */ }
      })();
      return {
        port: l.addr.port,
        async close() {
          l.close();
          await loop;
          for (const c of held) {
            try {
              c.close();
            } catch { /* already closed */ }
          }
        },
      };
    };
    const connect = (port: number) =>
      StoreClient.connect({ hostname: "127.0.0.1", port, rank: 1, worldSize: 2, token: "s3cret", timeoutMs: 600 });

    await t.step("closing before answering hello: PEER_FAILED", async () => {
      const fake = fakeStore((c) => c.close());
      const started = performance.now();
      await assert.rejects(() => connect(fake.port), isStoreGone("PEER_FAILED"));
      const ms = performance.now() - started;
      assert.ok(ms < 1100, `${ms} ms`);
      await fake.close();
    });

    await t.step("never answering hello: TIMEOUT", async () => {
      const fake = fakeStore(() => {});
      const started = performance.now();
      await assert.rejects(() => connect(fake.port), isStoreGone("TIMEOUT"));
      const ms = performance.now() - started;
      assert.ok(ms < 1100, `${ms} ms`);
      await fake.close();
    });

    await t.step("closing after hello: set and exchange fail at once with PEER_FAILED", async () => {
      const server = StoreServer.listen({ port: 0, worldSize: 2, token: "s3cret" });
      const [early, late] = await Promise.all([0, 1].map((r) => clientOf(server, r, { timeoutMs: 3000 })));
      server.close();
      // One asks while the close is still on its way, one after it noticed (its requests must not wait 3 s).
      let started = performance.now();
      await assert.rejects(() => early.set("after/0", "v"), isStoreGone("PEER_FAILED"));
      assert.ok(performance.now() - started < 500, `${performance.now() - started} ms`);
      await new Promise((r) => setTimeout(r, 100));
      started = performance.now();
      await assert.rejects(() => late.set("after/1", "v"), isStoreGone("PEER_FAILED"));
      await assert.rejects(() => late.exchange("after", "v"), isStoreGone("PEER_FAILED"));
      await assert.rejects(() => late.tryGet("after/0"), isStoreGone("PEER_FAILED"));
      assert.ok(performance.now() - started < 500, `${performance.now() - started} ms`);
      early.close();
      late.close();
    });

    await t.step("rank 0 giving up: the others fail at once naming the rank it lacked, not rank 0", async () => {
      const server = StoreServer.listen({ port: 0, worldSize: 3, token: "s3cret" });
      const host = await clientOf(server, 0, { worldSize: 3, timeoutMs: 300 });
      host.servedBy(server);
      const other = await clientOf(server, 1, { worldSize: 3, timeoutMs: 5000 });
      const started = performance.now();
      const [mine, theirs] = await Promise.allSettled([host.exchange("join", "a"), other.exchange("join", "b")]);
      const e0 = (mine as PromiseRejectedResult).reason, e1 = (theirs as PromiseRejectedResult).reason;
      assert.ok(e0 instanceof SwitchyardTimeoutError && e0.code === "TIMEOUT" && e0.peerRank === 2, String(e0));
      assert.ok(e1 instanceof SwitchyardTimeoutError && e1.code === "PEER_FAILED" && e1.peerRank === 2, String(e1));
      assert.match(e1.message, /rank 0 gave up on the group: .*"join": missing rank 2/);
      assert.ok(performance.now() - started < 1500, `${performance.now() - started} ms, not rank 1's 5 s`);
      // From now on every request of that rendezvous gets that answer; the rank rank 0 gave up on,
      // arriving late, hears it named rank 0. Other rendezvous go on.
      await assert.rejects(() => other.tryGet("join/2"), (e: unknown) => {
        assert.ok(e instanceof SwitchyardTimeoutError && e.peerRank === 2, String(e));
        return true;
      });
      const late = await clientOf(server, 2, { worldSize: 3, timeoutMs: 5000 });
      await assert.rejects(() => late.exchange("join", "c"), (e: unknown) => {
        assert.ok(e instanceof SwitchyardTimeoutError && e.code === "PEER_FAILED" && e.peerRank === 0, String(e));
        return true;
      });
      await other.set("next/1", "v");
      late.close();
      host.close();
      other.close();
      server.close();
    });

    await t.step("closing while an exchange waits for ranks not yet there: PEER_FAILED naming rank 0", async () => {
      const server = StoreServer.listen({ port: 0, worldSize: 3, token: "s3cret" });
      const client = await clientOf(server, 1, { worldSize: 3, timeoutMs: 3000 });
      const waiting = client.exchange("join", "v"); // ranks 0 and 2 never arrive
      await new Promise((r) => setTimeout(r, 100));
      const started = performance.now();
      server.close();
      await assert.rejects(() => waiting, (e: unknown) => {
        assert.ok(isStoreGone("PEER_FAILED")(e), String(e));
        assert.match((e as Error).message, /went away during "join" \(waiting for ranks 0, 2\)/);
        return true;
      });
      assert.ok(performance.now() - started < 500, `${performance.now() - started} ms`);
      client.close();
    });
  }),
);
