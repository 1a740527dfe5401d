/**
 * The JSR path, end to end and without the network: the files `deno publish --dry-run` lists are
 * copied out of the repository and served over local HTTP, as JSR would serve them; a separate
 * tiny project imports the package through its import map, is told how to build the library,
 * builds it with that command into a private cache, and runs a dispatch and combine whose
 * results are checked against values computed here.
 */

import assert from "node:assert/strict";
import { nativeSourceFiles, packageVersion } from "../scripts/native_sources.ts";
import { NATIVE_SOURCES, PACKAGE_VERSION } from "../ffi/native_sources.ts";

const root = new URL("..", import.meta.url).pathname;
const decode = (b: Uint8Array) => new TextDecoder().decode(b);

Deno.test("the native source list and version match the tree (scripts/native_sources.ts regenerates them)", () => {
  assert.deepEqual([...NATIVE_SOURCES], nativeSourceFiles());
  assert.equal(PACKAGE_VERSION, packageVersion());
  const cmake = Deno.readTextFileSync(`${root}CMakeLists.txt`);
  assert.match(cmake, new RegExp(`project\\(switchyard VERSION ${PACKAGE_VERSION.replaceAll(".", "\\.")} `));
});

/** The files `deno publish --dry-run` would upload, relative to the repository root. */
async function publishedFiles(): Promise<string[]> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["publish", "--dry-run", "--allow-dirty"],
    cwd: root,
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(120_000),
  }).output();
  const text = decode(out.stdout) + decode(out.stderr);
  assert.ok(out.success, text);
  const files = [...text.matchAll(/^\s+(file:\/\/\S+) \(/gm)].map((m) => decodeURIComponent(new URL(m[1]).pathname));
  assert.ok(files.length > 0, text);
  return files.map((f) => f.slice(root.length));
}

const contentType = (path: string) =>
  path.endsWith(".ts") ? "application/typescript" : path.endsWith(".json") ? "application/json" : "text/plain";

/** A tiny project outside the repository: two virtual ranks, one dispatch and one combine. */
const APP = `import { Group, Tensor } from "@switchyard/ep";

using group = Group.local({ ranks: 2 });
const buffers = await group.createBuffers({ hidden: 128, maxTokensPerRank: 4 });
const results = await group.all(async (rank, r) => {
  using x = await Tensor.from(rank, new Uint16Array(4 * 128).fill(0x3f80 + 0x40 * r), { shape: [4, 128], dtype: "bf16" });
  using topkIdx = await Tensor.from(rank, new BigInt64Array([0n, 1n, 2n, 3n, 1n, 2n, 3n, 0n]), { shape: [4, 2] });
  using topkWeights = await Tensor.from(rank, new Float32Array(8).fill(1), { shape: [4, 2] });
  using d = await buffers[r].dispatch(x, { topkIdx, topkWeights, numExperts: 4 });
  using c = await buffers[r].combine(d.recvX, d.handle);
  const y = await c.combinedX.readFloat32();
  return { rows: d.numRecvTokens, y: [0, 1, 2, 3].map((t) => y[t * 128 + 77]) };
});
console.log("result " + JSON.stringify(results));
for (const b of buffers) b[Symbol.dispose]();
`;

Deno.test({
  name: "JSR path: a project outside the repository imports the published files, builds as told, dispatches",
  sanitizeResources: false, // the HTTP server's connections close after the test's last request
  sanitizeOps: false,
}, async (t) => {
  const tmp = await Deno.makeTempDir({ prefix: "switchyard-jsr-" });
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, async (req) => {
    const path = decodeURIComponent(new URL(req.url).pathname);
    if (path.split("/").includes("..")) return new Response("bad path", { status: 400 });
    try {
      return new Response(await Deno.readFile(`${tmp}/pkg${path}`), { headers: { "content-type": contentType(path) } });
    } catch {
      return new Response("not found", { status: 404 });
    }
  });
  const base = `http://127.0.0.1:${server.addr.port}/`;
  // Only what the child needs: no SWITCHYARD_LIBRARY or sanitizer preload from this run.
  const env = {
    PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
    HOME: `${tmp}/home`,
    DENO_DIR: `${tmp}/deno`,
    SWITCHYARD_CACHE_DIR: `${tmp}/cache`,
  };
  const deno = async (args: string[], cwd: string) => {
    const out = await new Deno.Command(Deno.execPath(), {
      args,
      cwd,
      env,
      clearEnv: true,
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(300_000),
    }).output();
    return { ok: out.success, text: decode(out.stdout) + decode(out.stderr) };
  };
  const runApp = () =>
    deno([
      "run",
      `--allow-import=127.0.0.1:${server.addr.port}`,
      "--allow-ffi",
      "--allow-read",
      "--allow-env",
      "main.ts",
    ], `${tmp}/app`);
  try {
    await t.step("the published files, served over HTTP", async () => {
      const files = await publishedFiles();
      for (const need of ["mod.ts", "deno.json", "CMakeLists.txt", "src/cli/build.ts", ...NATIVE_SOURCES]) {
        assert.ok(files.includes(need), `${need} is not published`);
      }
      assert.ok(!files.some((f) => f.startsWith("tests/") || f.startsWith("scripts/")), files.join("\n"));
      for (const f of files) {
        await Deno.mkdir(`${tmp}/pkg/${f}`.replace(/\/[^/]*$/, ""), { recursive: true });
        await Deno.copyFile(`${root}${f}`, `${tmp}/pkg/${f}`);
      }
      await Deno.mkdir(`${tmp}/app`, { recursive: true });
      await Deno.mkdir(`${tmp}/home`, { recursive: true });
      await Deno.writeTextFile(
        `${tmp}/app/deno.json`,
        JSON.stringify({ imports: { "@switchyard/ep": `${base}mod.ts` } }),
      );
      await Deno.writeTextFile(`${tmp}/app/main.ts`, APP);
    });
    const builder = `${base}src/cli/build.ts`;
    await t.step("before the build: one line says how to build", async () => {
      const r = await runApp();
      assert.ok(!r.ok, r.text);
      assert.match(r.text, /LIBRARY_NOT_FOUND|libswitchyard not found/, r.text);
      assert.ok(r.text.includes(`deno run -A ${builder}`), r.text);
    });
    await t.step("the build, as told (host backend: --cuda off), into the cache", async () => {
      const r = await deno(["run", "-A", builder, "--cuda", "off"], `${tmp}/app`);
      assert.ok(r.ok, r.text);
      const lib = `${tmp}/cache/${PACKAGE_VERSION}-abi`;
      assert.match(r.text, new RegExp(`built ${lib.replaceAll(".", "\\.")}\\d+/host/libswitchyard\\.so`), r.text);
    });
    await t.step("after it: the dispatch and combine, checked here", async () => {
      const r = await runApp();
      assert.ok(r.ok, r.text);
      const got = JSON.parse(r.text.match(/^result (.*)$/m)?.[1] ?? "null");
      // Rank r's rows hold 1 + r/2 (bf16 0x3f80 + 0x40 r); experts 0, 1 live on rank 0 and 2, 3 on
      // rank 1. Combine sums one copy per rank a token reached: tokens 0 and 1 reach one rank,
      // tokens 2 and 3 both, so each rank receives 3 tokens from each of the 2 ranks.
      const want = [0, 1].map((r) => ({ rows: 6, y: [1, 1, 2, 2].map((n) => n * (1 + r / 2)) }));
      assert.deepEqual(got, want, r.text);
    });
  } finally {
    await server.shutdown();
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
  }
});
