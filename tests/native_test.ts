/**
 * The C ABI as a binding sees it: version, struct layouts, the buffer plan (checked against
 * the layout documented in csrc/core/plan.h, recomputed here), and the tuning defaults.
 */

import assert from "node:assert/strict";
import { ALL_STRUCTS } from "../ffi/structs.ts";
import { ABI_VERSION } from "../ffi/symbols.ts";
import { backendInfo, bufferSizeHint, defaultConfig, libraryVersion } from "../mod.ts";
import { native } from "../src/native.ts";
import { ginReadiness, type NcclProbe, probeNccl } from "../src/nccl.ts";
import { Group } from "../mod.ts";
import { nativeProgram } from "./helpers.ts";

Deno.test("the library speaks this binding's ABI", () => {
  const lib = native();
  assert.equal(lib.sy_abi_version(), ABI_VERSION);
  const sizes = new Uint32Array(ALL_STRUCTS.length);
  assert.equal(lib.sy_struct_sizes(sizes, sizes.length), 0);
  ALL_STRUCTS.forEach((s, i) => assert.equal(sizes[i], s.size, s.name));
  assert.match(libraryVersion(), /^\d+\.\d+\.\d+$/);
  const host = backendInfo("host");
  assert.equal(host.available, true);
  assert.equal(host.dispatchSupported, true);
});

const align = (v: number, a: number) => Math.ceil(v / a) * a;

Deno.test("buffer size hints follow the documented plan", () => {
  for (const [ranks, hidden, maxTokensPerRank] of [[8, 7168, 4096], [2, 64, 1], [5, 200, 37], [1, 8, 1]]) {
    const plan = bufferSizeHint({ ranks, hidden, maxTokensPerRank });
    // A record: payload (BF16 width), f32 scales per 128 channels, 32 ids, 32 weights, source index.
    const record = align(2 * hidden, 16) + align(4 * Math.ceil(hidden / 128), 16) + 128 + 128 + 16;
    const row = align(2 * hidden, 16) + 128;
    assert.equal(plan.recordBytes, record);
    assert.equal(plan.combineRowBytes, row);
    assert.equal(plan.dispatchRegionBytes, ranks * maxTokensPerRank * record);
    assert.equal(plan.combineRegionBytes, ranks * maxTokensPerRank * row);
    assert.equal(plan.maxRecvRows, ranks * maxTokensPerRank);
    // Count matrices and the mask words fit in the header.
    assert.ok(plan.headerBytes >= 4 * ranks * (ranks + 1024 + 1), String(plan.headerBytes));
    // Then the staging regions, padded to a page.
    const regions = plan.headerBytes + align(plan.dispatchRegionBytes, 128) + align(plan.combineRegionBytes, 128);
    assert.equal(plan.totalBytes, align(regions, 4096));
    assert.equal(plan.lowLatencyHalfBytes, 0);
  }
  // DeepSeek-V3 training shape on 8 ranks: just under 0.9 GiB per rank.
  const v3 = bufferSizeHint({ ranks: 8, hidden: 7168, maxTokensPerRank: 4096 });
  assert.ok(v3.totalBytes > 0.85 * 2 ** 30 && v3.totalBytes < 0.9 * 2 ** 30, String(v3.totalBytes));
});

Deno.test("default configs follow DeepEP's table", () => {
  assert.deepEqual(defaultConfig(8), {
    numSms: 20,
    nvlChunkSend: 6,
    nvlChunkRecv: 256,
    rdmaChunkSend: 6,
    rdmaChunkRecv: 128,
  });
  assert.deepEqual(defaultConfig(2).nvlChunkSend, 24);
  assert.deepEqual(defaultConfig(16), {
    numSms: 20,
    nvlChunkSend: 36,
    nvlChunkRecv: 288,
    rdmaChunkSend: 20,
    rdmaChunkRecv: 128,
  });
  assert.deepEqual(defaultConfig(5), defaultConfig(8), "between table rows: the next larger size");
  assert.deepEqual(defaultConfig(512), defaultConfig(160));
});

Deno.test("NCCL is probed by absolute path and refused with a reason", () => {
  const missing = probeNccl("/nonexistent/libnccl.so.2");
  assert.equal(missing.loaded, false);
  assert.match(missing.error, /cannot be loaded: .*No such file/);
  assert.match(probeNccl("libnccl.so.2").error, /not an absolute path/);
  const notNccl = probeNccl("/lib/x86_64-linux-gnu/libm.so.6");
  assert.equal(notNccl.loaded, false);
  assert.match(notNccl.error, /is not an NCCL library/);
  using g = Group.local({ ranks: 2 });
  assert.equal(g.nccl.enabled, false);
  assert.match(g.nccl.reason!, /virtual ranks/);
});

Deno.test("SWITCHYARD_NIC=gin's version rule: the headers' NCCL exactly before 2.31, at least it after", () => {
  const nccl = (version: number, deviceApi = true): NcclProbe => ({
    path: "/opt/nccl/lib/libnccl.so.2",
    loaded: true,
    version,
    deviceApi,
    headerVersion: 22907,
    error: "",
  });
  const ready = (found: NcclProbe | undefined, headers: number) => ginReadiness(found, headers).ready;
  assert.equal(ready(nccl(22907), 22907), true);
  assert.equal(ready(nccl(22908), 22907), false); // newer, but GIN kernels need the same version before 2.31
  assert.equal(ready(nccl(22906), 22907), false);
  assert.equal(ready(nccl(23102), 23100), true); // from 2.31 on, a newer runtime takes older headers
  assert.equal(ready(nccl(23000), 23100), false);
  assert.equal(ready(nccl(22907, false), 22907), false);
  assert.equal(ready(undefined, 22907), false);
  assert.equal(ready(nccl(22907), 0), false);
  assert.match(ginReadiness(nccl(23004), 22907).text, /NCCL 2\.30\.4 at .*headers are 2\.29\.7: before NCCL 2\.31/);
  assert.match(ginReadiness(nccl(22907), 0).text, /built without NCCL's headers/);
});

Deno.test("the barrier's parameter slots survive a fast rank and name a rank that moved on (native)", async () => {
  // The slow rank is played step by step there.
  const text = await nativeProgram("switchyard_barrier_slots");
  assert.match(text, /ok: parity/);
  assert.match(text, /ok: stamp/);
});

Deno.test("counts a peer announces are bounded before they index a buffer (native)", async () => {
  // Rank 1 is played there, announcing counts no honest rank could (tests/native/hostile_counts.cpp).
  const text = await nativeProgram("switchyard_hostile_counts");
  assert.match(text, /ok: more tokens for a rank than a buffer holds: .*announced 1000000 tokens for rank 0/);
  assert.match(text, /ok: a negative count for a rank/);
  assert.match(text, /ok: more tokens for a local expert than a buffer holds/);
  assert.match(text, /ok: honest counts are accepted/);
  assert.match(text, /hostile_counts: every case passed/);
});

Deno.test("a peer's segment is mapped only if it is this user's, mode 0600 (native)", async () => {
  const text = await nativeProgram("switchyard_segment_checks");
  assert.match(text, /ok: a segment anyone may write is refused/);
  assert.match(text, /ok: this user's 0600 segment is mapped/);
  assert.match(text, /ok: a new segment's name ends in 128 random bits/);
});
