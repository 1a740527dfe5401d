/**
 * The README's example runs as written, with the command the README gives, from a directory
 * outside the repository that maps `@switchyard/ep` to this clone's `mod.ts` (the import map
 * line the README shows). The child process has a hard time limit.
 */

import assert from "node:assert/strict";

Deno.test("the README's example runs as written from outside the repository", async () => {
  const readme = await Deno.readTextFile(new URL("../README.md", import.meta.url));
  const example = readme.split("## Example")[1]?.match(/```ts\n([\s\S]*?)```/)?.[1];
  assert.ok(example, "the README has an example");
  const dir = await Deno.makeTempDir({ prefix: "switchyard-example-" });
  try {
    await Deno.writeTextFile(`${dir}/example.ts`, example);
    const mod = new URL("../mod.ts", import.meta.url).pathname;
    await Deno.writeTextFile(`${dir}/deno.json`, JSON.stringify({ imports: { "@switchyard/ep": mod } }));
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-ffi", "--allow-env", "--allow-read", "example.ts"],
      cwd: dir,
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(60_000),
    }).output();
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 0, text);
    // Four ranks, each with what it received: 4 numbers that sum to the routed (token, rank) pairs.
    const received = JSON.parse(new TextDecoder().decode(out.stdout).trim().split("\n").at(-1)!);
    assert.equal(received.length, 4, text);
    assert.ok(received.every((n: number) => Number.isInteger(n) && n > 0 && n <= 4 * 32), text);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
