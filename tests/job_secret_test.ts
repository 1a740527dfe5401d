/**
 * Jobs started without `SWITCHYARD_TOKEN` (torchrun or Slurm style) still authenticate every
 * rank: rank 0 writes a per-job secret into a user-only directory and the other ranks read it
 * (src/job_secret.ts). A directory or file that someone else could read or replace is refused;
 * a client without the secret is refused by the store; two real processes meet this way. Every
 * child process has a hard time limit.
 */

import assert from "node:assert/strict";
import { SwitchyardError } from "../mod.ts";
import { jobSecretPlace, readJobSecret, removeJobSecret, writeJobSecret } from "../src/job_secret.ts";
import { StoreClient, StoreServer } from "../src/store.ts";

const runtimeDir = (): string => Deno.makeTempDirSync({ prefix: "switchyard-runtime-" });
const envOf = (vars: Record<string, string>) => (name: string) => vars[name];
const mode = (path: string) => (Deno.lstatSync(path).mode ?? 0) & 0o777;

function refusedFor(fn: () => unknown, pattern: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof SwitchyardError && e.argument === "SWITCHYARD_TOKEN", String(e));
    assert.match(e.message, pattern);
    return true;
  });
}

Deno.test("the job's secret: user-only directory and file, refused when others could get at it", async (t) => {
  const root = runtimeDir();
  try {
    const place = jobSecretPlace(envOf({ XDG_RUNTIME_DIR: root, SLURM_JOB_ID: "42" }), 29555);
    assert.equal(place.file, `${root}/switchyard/job-29555-42.token`);
    await t.step("rank 0 writes it: directory 0700, file 0600; the others read the same secret", () => {
      assert.equal(readJobSecret(place), undefined, "nothing before rank 0 wrote it");
      const secret = writeJobSecret(place);
      assert.match(secret, /^[0-9a-f]{64}$/);
      assert.equal(mode(place.dir), 0o700);
      assert.equal(mode(place.file), 0o600);
      assert.equal(readJobSecret(place), secret);
      assert.notEqual(writeJobSecret(place), secret, "every job start makes a fresh one");
    });
    await t.step("a directory others may enter is refused", () => {
      Deno.chmodSync(place.dir, 0o755);
      refusedFor(() => readJobSecret(place), /mode 0755/);
      refusedFor(() => writeJobSecret(place), /mode 0755/);
      Deno.chmodSync(place.dir, 0o700);
    });
    await t.step("a secret file others may read is refused", () => {
      Deno.chmodSync(place.file, 0o644);
      refusedFor(() => readJobSecret(place), /mode 0600/);
      Deno.chmodSync(place.file, 0o600);
    });
    await t.step("a link in place of the file is refused", () => {
      const elsewhere = `${root}/planted`;
      Deno.writeTextFileSync(elsewhere, "0".repeat(64), { mode: 0o600 });
      removeJobSecret(place);
      Deno.symlinkSync(elsewhere, place.file);
      refusedFor(() => readJobSecret(place), /not a file of this user/);
      removeJobSecret(place);
    });
    await t.step("the store refuses a client without the secret", async () => {
      const secret = writeJobSecret(place);
      const server = StoreServer.listen({ port: 0, worldSize: 2, token: secret });
      try {
        await assert.rejects(
          () =>
            StoreClient.connect({ hostname: "127.0.0.1", port: server.port, rank: 1, worldSize: 2, timeoutMs: 2000 }),
          (e: unknown) => e instanceof SwitchyardError && e.argument === "SWITCHYARD_TOKEN",
        );
        const ok = await StoreClient.connect({
          hostname: "127.0.0.1",
          port: server.port,
          rank: 1,
          worldSize: 2,
          token: readJobSecret(place),
          timeoutMs: 2000,
        });
        ok.close();
      } finally {
        server.close();
      }
    });
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

Deno.test("two processes without SWITCHYARD_TOKEN meet through the job's secret", async () => {
  const root = runtimeDir();
  const port = (() => {
    const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const p = l.addr.port;
    l.close();
    return p;
  })();
  const script = new URL("./mp/roundtrip.ts", import.meta.url).pathname;
  try {
    const start = (rank: number) => {
      const env: Record<string, string> = {
        ...Deno.env.toObject(),
        RANK: String(rank),
        WORLD_SIZE: "2",
        LOCAL_RANK: String(rank),
        LOCAL_WORLD_SIZE: "2",
        MASTER_ADDR: "127.0.0.1",
        MASTER_PORT: String(port),
        XDG_RUNTIME_DIR: root,
      };
      delete env.SWITCHYARD_TOKEN;
      return new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "--allow-ffi",
          "--allow-env",
          "--allow-read",
          "--allow-write",
          "--allow-net",
          script,
          "--rounds",
          "1",
        ],
        env,
        clearEnv: true,
        stdout: "piped",
        stderr: "piped",
        signal: AbortSignal.timeout(60_000),
      }).output();
    };
    // Rank 1 first: it waits for the secret rank 0 has yet to write.
    const one = start(1);
    await new Promise((r) => setTimeout(r, 300));
    const outs = await Promise.all([start(0), one]);
    for (const [rank, o] of outs.entries()) {
      const text = new TextDecoder().decode(o.stdout) + new TextDecoder().decode(o.stderr);
      assert.equal(o.code, 0, text);
      assert.match(text, new RegExp(`rank ${rank} ok`));
    }
    assert.deepEqual([...Deno.readDirSync(`${root}/switchyard`)].map((e) => e.name), [], "rank 0 removed the secret");
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});
