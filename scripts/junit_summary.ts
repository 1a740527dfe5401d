/**
 * Prints one plain line, `N passed, N failed` (tests, as Deno counts them: a test with steps is
 * one test), from a JUnit report of `deno task test --junit-path`, after one line per pass
 * with the steps too (`host: 62 passed (147 steps), 0 failed`; scripts/test.ts names each suite
 * "pass: file"). Exits 1 when anything failed or the report is missing.
 *
 * @module
 */

import { countCases, countsLine } from "./test.ts";

const path = Deno.args[0] ?? "junit.xml";
let xml: string;
try {
  xml = await Deno.readTextFile(path);
} catch {
  console.log("0 passed, 1 failed");
  Deno.exit(1);
}
const byPass = new Map<string, string>();
for (const suite of xml.match(/<testsuite\b[\s\S]*?<\/testsuite>/g) ?? []) {
  const pass = /name="([^":]+): /.exec(suite)?.[1] ?? "tests";
  byPass.set(pass, (byPass.get(pass) ?? "") + suite);
}
for (const [pass, suites] of byPass) {
  console.log(`${pass}: ${countsLine(countCases(suites))}`);
}
const total = countCases(xml);
if (total.passed + total.failed + total.skipped === 0) total.failed = 1;
// A failed step fails its test too; count it there if its test case did not say so.
if (total.stepsFailed > 0 && total.failed === 0) total.failed = 1;
console.log(`${total.passed} passed, ${total.failed} failed`);
Deno.exit(total.failed > 0 ? 1 : 0);
