/** The demo (`deno task demo`) runs, prints what it promises, and exits 0 on a correct round trip. */

import assert from "node:assert/strict";

Deno.test("the demo reports routing, timings and a passing round trip", async () => {
  const demo = new URL("../src/cli/demo.ts", import.meta.url).pathname;
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-ffi",
      "--allow-env",
      "--allow-read",
      demo,
      "--tokens",
      "48",
      "--hidden",
      "1024",
      "--iterations",
      "2",
      // 16 decode tokens, not 128: the same low-latency steps, in a fraction of a sanitizer run's time.
      "--decode-tokens",
      "16",
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 0, text);
  for (
    const line of [
      /8 ranks on (host|cuda|cuda \(CUDA backend executed on the CPU[^)]*\)), 48 tokens\/rank, hidden 1024, 256 experts, top-8/,
      /tokens received per rank: \[[\d, ]+\]\s+imbalance \(max\/mean\) \d+\.\d\d/,
      /tokens per expert: min \d+, mean 12\.0, max \d+\s+imbalance \d+\.\d\d/,
      /dispatch: [\d.]+ ms median of 2/,
      /combine: +[\d.]+ ms median of 2/,
      /round trip combine\(dispatch\(x\)\) == x: OK/,
      /decode step \(low-latency mode\): 16 tokens\/rank, top-8/,
      /round trip combine\(dispatch\(x\)\) == x \* sum\(w\): OK/,
    ]
  ) assert.match(text, line);
});

Deno.test("the MoE layer example matches the dense layer, in the normal and the low-latency mode", async () => {
  const example = new URL("../examples/moe_layer.ts", import.meta.url).pathname;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-ffi", "--allow-env", "--allow-read", example, "--ranks", "4", "--tokens", "24"],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => child.kill("SIGKILL"), 60_000);
  const out = await child.output();
  clearTimeout(timer);
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 0, text);
  for (
    const line of [
      /normal mode: \d+ tokens\/s; dispatch [\d.]+ ms \(\d+%\), experts [\d.]+ ms \(\d+%\), combine [\d.]+ ms \(\d+%\); against the dense layer: max error [\d.e+-]+ of the token's scale OK/,
      /low-latency, one micro-batch: [\d.]+ ms .* OK/,
      /low-latency, two, overlapped with the hook: [\d.]+ ms .* OK/,
      /overlap gain: [\d.]+x/,
    ]
  ) assert.match(text, line);
});
