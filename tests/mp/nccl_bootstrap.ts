/**
 * One rank of the NCCL bootstrap check (run through the launcher on the CUDA backend): meets the
 * others with Group.fromEnv, prints `nccl_bootstrap {...}` with what `group.nccl` says, and exits
 * 1 unless it matches `--expect`: `enabled` (a communicator exists), `disabled` (NCCL is off, with
 * a reason), or `disabled:TEXT` (off, and the reason contains TEXT). NCCL is the one found by
 * `SWITCHYARD_NCCL` or the standard places.
 */

import { parseArgs } from "node:util";
import { Group } from "../../mod.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: { expect: { type: "string", default: "enabled" }, timeout: { type: "string", default: "20000" } },
});
using group = await Group.fromEnv({ backend: "cuda", timeoutMs: Number(values.timeout) });
const nccl = group.nccl;
console.log(`nccl_bootstrap ${JSON.stringify({ rank: Number(Deno.env.get("RANK")), size: group.size, nccl })}`);
const [want, text] = values.expect.split(/:(.*)/s);
const ok = want === "enabled"
  ? nccl.enabled && (nccl.version ?? 0) > 0
  : !nccl.enabled && !!nccl.reason && (!text || nccl.reason.includes(text));
if (!ok) {
  console.error(`nccl_bootstrap: expected ${values.expect}, got ${JSON.stringify(nccl)}`);
  Deno.exit(1);
}
