/**
 * The README's first command on a fresh machine: the repository's files (as a clone has them, no
 * build, no `.tools/`) in a temporary directory, and a PATH without Deno. `./switchyard demo`
 * must install the pinned Deno into the copy, build the library and run the demo. (The install
 * comes from npm, which serves it from its cache once CI's own install has fetched it.)
 */

import assert from "node:assert/strict";

const root = new URL("..", import.meta.url).pathname;
const decode = (b: Uint8Array) => new TextDecoder().decode(b);

/** The files a clone of this checkout would have (tracked, plus new ones not ignored). */
async function cloneFiles(): Promise<string[] | undefined> {
  try {
    const out = await new Deno.Command("git", {
      args: ["ls-files", "--cached", "--others", "--exclude-standard", "-z"],
      cwd: root,
      stdout: "piped",
      stderr: "null",
    }).output();
    return out.success ? decode(out.stdout).split("\0").filter((f) => f) : undefined;
  } catch {
    return undefined;
  }
}

/** PATH without the directories that hold a `deno`. */
function pathWithoutDeno(): string {
  return (Deno.env.get("PATH") ?? "").split(":").filter((dir) => {
    try {
      Deno.statSync(`${dir}/deno`);
      return false;
    } catch {
      return true;
    }
  }).join(":");
}

const files = await cloneFiles();

Deno.test({
  name: "fresh clone, no Deno on PATH: ./switchyard demo installs Deno, builds and runs the demo",
  ignore: files === undefined, // not a git checkout
}, async () => {
  const tmp = await Deno.makeTempDir({ prefix: "switchyard-fresh-" });
  try {
    for (const f of files!) {
      const to = `${tmp}/${f}`;
      await Deno.mkdir(to.replace(/\/[^/]*$/, ""), { recursive: true });
      try {
        await Deno.copyFile(`${root}${f}`, to);
      } catch (e) {
        if (!(e instanceof Deno.errors.NotFound)) throw e; // deleted in the working tree
      }
    }
    const path = pathWithoutDeno();
    const which = await new Deno.Command("bash", { args: ["-c", "command -v deno"], env: { PATH: path } }).output();
    assert.ok(!which.success, "a deno is still on the test's PATH");
    const out = await new Deno.Command("bash", {
      args: ["./switchyard", "demo", "--tokens", "32", "--hidden", "256", "--iterations", "1"],
      cwd: tmp,
      env: { PATH: path, HOME: Deno.env.get("HOME") ?? tmp }, // HOME: npm's cache
      clearEnv: true,
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(300_000),
    }).output();
    const text = decode(out.stdout) + decode(out.stderr);
    assert.ok(out.success, text);
    assert.match(text, /installing the pinned one into \.tools\/deno/);
    assert.match(text, /round trip combine\(dispatch\(x\)\) == x: OK/);
    Deno.statSync(`${tmp}/.tools/deno/deno`);
    Deno.statSync(`${tmp}/build/libswitchyard.so`);
  } finally {
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
  }
});
