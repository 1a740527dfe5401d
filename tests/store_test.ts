/** The rendezvous store: tokens, rank checks, malformed and oversized messages, bounded waits. */

import assert from "node:assert/strict";
import { SwitchyardError, SwitchyardTimeoutError } from "../mod.ts";
import { MAX_FRAME_BYTES, StoreClient, StoreServer } from "../src/store.ts";

async function rawExchange(port: number, bytes: Uint8Array): Promise<string> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  await conn.write(bytes);
  const buf = new Uint8Array(4096);
  let text = "";
  for (;;) {
    const n = await conn.read(buf);
    if (n === null) break;
    text += new TextDecoder().decode(buf.subarray(0, n));
  }
  conn.close();
  return text;
}

function frameOf(json: string): Uint8Array {
  const body = new TextEncoder().encode(json);
  const out = new Uint8Array(4 + body.length);
  new DataView(out.buffer).setUint32(0, body.length);
  out.set(body, 4);
  return out;
}

Deno.test("store: ranks exchange values; waits are bounded and name the missing ranks", async () => {
  const server = StoreServer.listen({ port: 0, worldSize: 3, token: "s3cret" });
  const connect = (rank: number) =>
    StoreClient.connect({
      hostname: "127.0.0.1",
      port: server.port,
      rank,
      worldSize: 3,
      token: "s3cret",
      timeoutMs: 400,
    });
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
    c.close();
  } finally {
    a.close();
    b.close();
    server.close();
  }
});

Deno.test("store: a wrong token or rank is refused; malformed messages are answered and dropped", async () => {
  const server = StoreServer.listen({ port: 0, worldSize: 2, token: "right" });
  try {
    await assert.rejects(
      () =>
        StoreClient.connect({
          hostname: "127.0.0.1",
          port: server.port,
          rank: 0,
          worldSize: 2,
          token: "wrong",
          timeoutMs: 500,
        }),
      (e: unknown) =>
        e instanceof SwitchyardError && e.argument === "SWITCHYARD_TOKEN" && /wrong SWITCHYARD_TOKEN/.test(e.message),
    );
    await assert.rejects(
      () =>
        StoreClient.connect({
          hostname: "127.0.0.1",
          port: server.port,
          rank: 5,
          worldSize: 2,
          token: "right",
          timeoutMs: 500,
        }),
      /rank 5 is outside 0..1/,
    );
    assert.match(await rawExchange(server.port, frameOf("{not json")), /malformed message/);
    assert.match(
      await rawExchange(server.port, frameOf(JSON.stringify({ id: 1, op: "drop tables" }))),
      /malformed request/,
    );
    const huge = new Uint8Array(4);
    new DataView(huge.buffer).setUint32(0, MAX_FRAME_BYTES + 1);
    assert.match(await rawExchange(server.port, huge), /exceeds the 1048576-byte limit/);
    assert.match(
      await rawExchange(server.port, frameOf(JSON.stringify({ id: 1, op: "get", key: "k", timeoutMs: 10 }))),
      /the first message must be hello/,
    );
    // The server still serves well-behaved ranks.
    const ok = await StoreClient.connect({
      hostname: "127.0.0.1",
      port: server.port,
      rank: 1,
      worldSize: 2,
      token: "right",
      timeoutMs: 500,
    });
    await ok.set("k", "v");
    assert.equal(await ok.tryGet("k", 100), "v");
    assert.equal(await ok.tryGet("absent", 50), undefined);
    ok.close();
  } finally {
    server.close();
  }
});

Deno.test("store: an unreachable rendezvous fails within the deadline, naming rank 0", async () => {
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
});
