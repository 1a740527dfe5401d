/**
 * Prints one plain line, `N passed, N failed`, from a JUnit report of `deno task test
 * --junit-path` (every test and every step is one test case), after one line per pass when the
 * report has several (scripts/test.ts names each suite "pass: file"). Exits 1 when anything
 * failed or the report is missing.
 *
 * @module
 */

import { countCases } from "./test.ts";

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
  const c = countCases(suites);
  console.log(`${pass}: ${c.passed} passed, ${c.failed} failed${c.skipped ? `, ${c.skipped} skipped` : ""}`);
}
const total = countCases(xml);
if (total.passed + total.failed + total.skipped === 0) total.failed = 1;
console.log(`${total.passed} passed, ${total.failed} failed`);
Deno.exit(total.failed > 0 ? 1 : 0);
