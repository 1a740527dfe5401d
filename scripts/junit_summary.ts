/**
 * Prints one plain line, `N passed, N failed`, from a JUnit report of `deno test --junit-path`
 * (every test and every step is one test case). Exits 1 when anything failed or the report is
 * missing.
 *
 * @module
 */

const path = Deno.args[0] ?? "junit.xml";
let xml: string;
try {
  xml = await Deno.readTextFile(path);
} catch {
  console.log("0 passed, 1 failed");
  Deno.exit(1);
}
const cases = xml.match(/<testcase\b[^>]*?(\/>|>[\s\S]*?<\/testcase>)/g) ?? [];
let passed = 0, failed = 0, skipped = 0;
for (const c of cases) {
  if (/<(failure|error)\b/.test(c)) failed++;
  else if (/<skipped\b/.test(c)) skipped++;
  else passed++;
}
if (cases.length === 0) failed = 1;
if (skipped) console.log(`${skipped} skipped (no GPU here, or a test marked ignore)`);
console.log(`${passed} passed, ${failed} failed`);
Deno.exit(failed > 0 ? 1 : 0);
