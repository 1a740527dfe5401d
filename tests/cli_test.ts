/** The command-line tools: doctor reports every area, the launcher refuses bad usage. */

import assert from "node:assert/strict";
import { ABI_VERSION } from "../ffi/symbols.ts";

const root = new URL("..", import.meta.url).pathname;
const run = (args: string[]) =>
  new Deno.Command(Deno.execPath(), {
    args,
    stdout: "piped",
    stderr: "piped",
    cwd: root,
    signal: AbortSignal.timeout(60000),
  })
    .output();
const text = (o: Deno.CommandOutput) => new TextDecoder().decode(o.stdout) + new TextDecoder().decode(o.stderr);

Deno.test("doctor: one verdict per line, covering the library, backends, NCCL and shared memory", async () => {
  const o = await run([
    "run",
    "--allow-ffi",
    "--allow-env",
    "--allow-read",
    "--allow-run",
    "--allow-net",
    "src/cli/doctor.ts",
  ]);
  const lines = text(o).trim().split("\n");
  assert.ok(lines.every((l) => /^(OK|NOTE|FIX) +\S/.test(l)), text(o));
  for (
    const topic of [
      new RegExp(`^OK +libswitchyard .* ABI ${ABI_VERSION}`),
      /^OK +host backend/,
      /CUDA/,
      /NCCL/,
      /\/dev\/shm/,
      /^OK +rendezvous: /,
    ]
  ) {
    assert.ok(lines.some((l) => topic.test(l)), `${topic} in:\n${text(o)}`);
  }
  assert.equal(o.code, lines.some((l) => l.startsWith("FIX")) ? 1 : 0);
});

Deno.test("launch: usage errors exit 2 with the usage line", async () => {
  const o = await run([
    "run",
    "--allow-run",
    "--allow-env",
    "--allow-net",
    "--allow-read",
    "src/cli/launch.ts",
    "--nproc",
    "0",
    "x.ts",
  ]);
  assert.equal(o.code, 2);
  assert.match(text(o), /usage: deno task launch --nproc N/);
});

Deno.test("CI's summary counts tests and their steps apart, as Deno does", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const c = (name: string, failed = false) =>
      `<testcase name="${name}" classname="x">${failed ? "<failure>boom</failure>" : ""}</testcase>`;
    const xml =
      `<testsuites><testsuite name="host: ./a.ts">${c("one")}${c("two")}${c("two &gt; s1")}${c("two &gt; s2")}` +
      `</testsuite><testsuite name="cuda-on-cpu: ./a.ts">${c("three", true)}${
        c("three &gt; s", true)
      }</testsuite></testsuites>`;
    await Deno.writeTextFile(`${dir}/junit.xml`, xml);
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--allow-read",
        new URL("../scripts/junit_summary.ts", import.meta.url).pathname,
        `${dir}/junit.xml`,
      ],
      stdout: "piped",
    }).output();
    assert.equal(out.code, 1);
    assert.deepEqual(new TextDecoder().decode(out.stdout).trim().split("\n"), [
      "host: 2 passed (2 steps), 0 failed",
      "cuda-on-cpu: 0 passed, 1 failed (1 step)",
      "2 passed, 1 failed",
    ]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
