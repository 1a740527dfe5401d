/**
 * The CUDA backend where a GPU exists: device memory, streams, events, copies (dense and
 * strided, larger than the pinned staging chunks), rank masks, the layout kernel, normal-mode
 * and low-latency dispatch and combine on virtual ranks, each compared bit for bit with the
 * host backend on the same inputs; failures (a missing rank, bad
 * routing on one rank, too many ranks per GPU) end in the errors the host backend raises, and
 * the CUDA context survives them. `deno task test` runs them on the GPU where there is one
 * (pass cuda-gpu) and on the CUDA backend executed on CPU threads everywhere (pass cuda-on-cpu,
 * tests/cuda_on_cpu); on a library with neither they are skipped, and say so.
 * (`SWITCHYARD_TEST_BACKEND=cuda` also runs the normal-mode and low-latency suites on the CUDA
 * backend.)
 */

import assert from "node:assert/strict";
import {
  type Backend,
  backendInfo,
  type DispatchResult,
  Group,
  randomRouting,
  Rng,
  SwitchyardError,
  SwitchyardTimeoutError,
  Tensor,
  toBF16,
} from "../mod.ts";
import {
  assertSameArray,
  bytesOf,
  generate,
  nativeProgram,
  orderSensitiveBF16,
  paddingZeroed,
  randomBF16,
  type Scenario,
  softVerbsBuilt,
  upload,
} from "./helpers.ts";

const cuda = backendInfo("cuda");
const ignore = !cuda.available;
if (ignore) console.log(`cuda_test: skipped, no usable CUDA backend (${cuda.reason || "not compiled"})`);

Deno.test({ name: "cuda: tensors round-trip through device memory, dense and strided", ignore }, async () => {
  using g = Group.local({ ranks: 2, backend: "cuda" });
  const rank = g.ranks[1];
  assert.ok(rank.device >= 0);
  const data = new Float32Array(6 * 5).map((_, i) => i * 0.5);
  using dense = await Tensor.from(rank, data, { shape: [6, 5] });
  assert.deepEqual(await dense.read(), data);
  using strided = Tensor.empty(rank, { dtype: "f32", shape: [6, 5], strides: [1, 6] });
  await strided.write(data);
  assert.deepEqual(await strided.read(), data);
  using side = rank.createStream();
  await dense.write(data.map((v) => -v), { stream: side });
  using ev = side.record();
  ev.wait();
  assert.deepEqual(await dense.read(), data.map((v) => -v));
  assert.equal(ev.query(), true);
  assert.notEqual(side.nativeHandle(), null, "a CUDA stream hands out its cudaStream_t");
});

Deno.test({ name: "cuda: tensors larger than the pinned staging chunks round-trip exactly", ignore }, async () => {
  // Copies go through 1 MiB pinned chunks, two at a time: 2.6 MiB (not a whole number of chunks)
  // takes both chunks twice and a partial third; every element is distinct, so a chunk written at
  // the wrong offset, or one refilled before its copy completed, shows.
  using g = Group.local({ ranks: 1, backend: "cuda" });
  const rank = g.ranks[0];
  const n = Math.floor(2.6 * (1 << 20) / 4) + 3;
  const data = new Float32Array(n).map((_, i) => i + 0.25);
  using dense = await Tensor.from(rank, data, { shape: [n] });
  assert.deepEqual(await dense.read(), data);
  // Strided: the span (rows x cols, column-major) is staged both ways around the host scatter.
  const rows = 1031, cols = 667;
  const grid = new Float32Array(rows * cols).map((_, i) => -i);
  using strided = Tensor.empty(rank, { dtype: "f32", shape: [rows, cols], strides: [1, rows] });
  await strided.write(grid);
  assert.deepEqual(await strided.read(), grid);
});

Deno.test({ name: "cuda: rank masks live in device memory, written and read in stream order", ignore }, async () => {
  // The mask is in the buffer's header, which a GPU holds in device memory: the host may not
  // touch it directly (a segfault on a GPU; the executor would not notice), only through copies.
  using g = Group.local({ ranks: 3, backend: "cuda" });
  const bufs = await g.createBuffers({ hidden: 128, maxTokensPerRank: 4, enableMasking: true });
  try {
    assert.deepEqual(bufs[1].queryMask(), [0, 0, 0]);
    await bufs[1].updateMask(2);
    await bufs[1].updateMask(0);
    assert.deepEqual(bufs[1].queryMask(), [1, 0, 1]);
    await bufs[1].updateMask(0, false);
    assert.deepEqual(bufs[1].queryMask(), [0, 0, 1]);
    assert.deepEqual(bufs[0].queryMask(), [0, 0, 0], "each rank has its own view");
    await bufs[1].cleanMask();
    assert.deepEqual(bufs[1].queryMask(), [0, 0, 0]);
  } finally {
    for (const b of bufs) b[Symbol.dispose]();
  }
});

Deno.test({ name: "cuda: the layout kernel agrees with the host backend", ignore }, async (t) => {
  for (
    const [ranks, experts, topk, tokens, zipf, drop] of [
      [8, 256, 8, 4096, 0, 0],
      [8, 256, 8, 4096, 1.2, 0.1],
      [4, 16, 4, 777, 0, 0.3],
      [16, 16384, 6, 513, 0.5, 0], // more experts than the shared-memory histogram holds
    ]
  ) {
    await t.step(`${ranks} ranks, ${experts} experts, top-${topk}, ${tokens} tokens`, async () => {
      using host = Group.local({ ranks, backend: "host" });
      using gpu = Group.local({ ranks, backend: "cuda" });
      const hb = host.ranks[0].createBuffer({ hidden: 128, maxTokensPerRank: tokens });
      const gb = gpu.ranks[0].createBuffer({ hidden: 128, maxTokensPerRank: tokens });
      const routing = randomRouting({ tokens, experts, topk, seed: tokens, zipf, dropProbability: drop });
      using hi = await Tensor.from(host.ranks[0], routing.topkIdx, { shape: [tokens, topk] });
      using gi = await Tensor.from(gpu.ranks[0], routing.topkIdx, { shape: [tokens, topk] });
      using hl = await hb.layout(hi, { numExperts: experts });
      using gl = await gb.layout(gi, { numExperts: experts });
      assert.deepEqual(await gl.numTokensPerRank.read(), await hl.numTokensPerRank.read());
      assert.deepEqual(await gl.numTokensPerExpert.read(), await hl.numTokensPerExpert.read());
      assert.deepEqual(await gl.isTokenInRank.read(), await hl.isTokenInRank.read());
      hb[Symbol.dispose]();
      gb[Symbol.dispose]();
    });
  }
});

Deno.test({ name: "cuda: a bad expert id is reported from the kernel, and the context survives", ignore }, async () => {
  using g = Group.local({ ranks: 2, backend: "cuda" });
  using buf = g.ranks[0].createBuffer({ hidden: 128, maxTokensPerRank: 4 });
  using idx = await Tensor.from(g.ranks[0], new BigInt64Array([0n, 1n, 2n, 99n]), { shape: [2, 2] });
  using layout = await buf.layout(idx, { numExperts: 4 });
  await assert.rejects(
    () => layout.numTokensPerRank.read(),
    (e: unknown) => e instanceof SwitchyardError && e.argument === "topkIdx" && /token 1, entry 1/.test(e.message),
  );
  using ok = await Tensor.from(g.ranks[0], new Int32Array([5]), { shape: [1] });
  assert.deepEqual(Array.from(await ok.read()), [5]);
});

/** How one comparison run dispatches. */
interface Mode {
  readonly expand?: boolean;
  readonly alignment?: number;
  readonly worst?: boolean;
  readonly zeroPadding?: boolean;
  readonly cached?: boolean;
  readonly biases?: 0 | 1 | 2;
}

/** Every output of one dispatch and its combine on one rank, as bytes. */
type Outcome = Record<string, Uint8Array>;

async function outputsOf(res: DispatchResult, expand: boolean): Promise<Outcome> {
  const out: Outcome = {};
  const rows = res.numRows;
  // Worst-case rows past the received ones hold whatever the allocation held: compare the used
  // part. So do expanded padding rows (zeroed only on request, compared apart): only the rows
  // the handle maps a (token, expert) pair to are compared.
  const used = (await res.recvCount.read())[0];
  let owned: (number | null)[] = new Array(used).fill(0);
  if (expand) {
    using map = res.handle.expandedRow();
    const real = new Set(await map.read());
    owned = owned.map((_, row) => real.has(row) ? row : null);
  }
  const x = bytesOf(await res.recvX.read());
  const rowBytes = x.length / Math.max(rows, 1);
  out.recvX = paddingZeroed(x.subarray(0, rowBytes * used), owned, rowBytes);
  if (res.recvXScales) {
    const sc = bytesOf(await res.recvXScales.read());
    const scaleBytes = sc.length / Math.max(rows, 1);
    out.recvXScales = paddingZeroed(sc.subarray(0, scaleBytes * used), owned, scaleBytes);
  }
  if (res.recvTopkIdx) out.recvTopkIdx = bytesOf(await res.recvTopkIdx.read());
  if (res.recvTopkWeights) {
    const w = bytesOf(await res.recvTopkWeights.read());
    out.recvTopkWeights = res.recvTopkIdx ? w : w.subarray(0, 4 * used);
  }
  out.recvCount = bytesOf(await res.recvCount.read());
  using prefix = res.handle.rankPrefixMatrix();
  out.rankPrefix = bytesOf(await prefix.read());
  using srcIdx = res.handle.recvSrcIdx();
  out.srcIdx = bytesOf(await srcIdx.read());
  using srcRank = res.handle.recvSrcRank();
  out.srcRank = bytesOf(await srcRank.read());
  return out;
}

/** Dispatches `s` in `mode` on `backend`, combines random expert outputs back, returns everything. */
async function runOn(backend: Backend, s: Scenario, mode: Mode): Promise<Outcome[]> {
  const d = generate(s);
  using g = Group.local({ ranks: s.ranks, backend, timeoutMs: 20000 });
  const bufs = await g.createBuffers({ hidden: s.hidden, maxTokensPerRank: Math.max(...s.tokens, 1) });
  try {
    return await g.all(async (rank, r) => {
      using up = await upload(rank, s, d, r);
      const T = s.tokens[r];
      // Enough rows for everything any rank could send here (and, expanded, every local expert).
      const allTokens = s.tokens.reduce((a, b) => a + b, 0);
      const worst = mode.worst ? allTokens * (mode.expand ? s.topk : 1) + 3 : 0;
      using first = await bufs[r].dispatch(up.x, {
        xScales: up.scales,
        topkIdx: up.topkIdx,
        topkWeights: up.topkWeights,
        numExperts: up.topkIdx ? s.experts : undefined,
        isTokenInRank: up.isTokenInRank,
        expand: mode.expand,
        expertAlignment: mode.alignment,
        zeroPadding: mode.zeroPadding,
        numWorstTokens: worst,
      });
      if (mode.worst) await first.recvCount.read(); // a worst-case handle is reusable once complete
      using again = mode.cached
        ? await bufs[r].dispatch(up.x, {
          xScales: up.scales,
          handle: first.handle,
          expand: mode.expand,
          zeroPadding: mode.zeroPadding,
        })
        : undefined;
      const res = again ?? first;
      const out = await outputsOf(res, mode.expand ?? false);
      if (mode.expand && mode.zeroPadding) out.recvXAll = bytesOf(await res.recvX.read());
      // Combine: expert outputs and biases whose sums depend on the order of addition, so every
      // row and the reduction order matter.
      using y = await Tensor.from(rank, orderSensitiveBF16(res.numRows * s.hidden, 900 + r), {
        shape: [res.numRows, s.hidden],
      });
      const biases = await Promise.all(
        Array.from(
          { length: mode.biases ?? 0 },
          (_, b) => Tensor.from(rank, orderSensitiveBF16(T * s.hidden, 700 + 10 * b + r), { shape: [T, s.hidden] }),
        ),
      );
      try {
        using back = await bufs[r].combine(y, res.handle, {
          topkWeights: mode.expand ? undefined : res.recvTopkWeights,
          bias: biases.length ? biases as [Tensor] | [Tensor, Tensor] : undefined,
        });
        out.combined = bytesOf(await back.combinedX.read());
        if (back.combinedTopkWeights) out.combinedWeights = bytesOf(await back.combinedTopkWeights.read());
      } finally {
        for (const b of biases) b[Symbol.dispose]();
      }
      return out;
    });
  } finally {
    for (const b of bufs) b[Symbol.dispose]();
  }
}

Deno.test(
  { name: "cuda: normal-mode dispatch and combine agree bit for bit with the host backend", ignore },
  async (t) => {
    const tokens = (ranks: number, base: number) => Array.from({ length: ranks }, (_, r) => base + ((r * 13) % 17));
    const cases: [string, Scenario, Mode][] = [
      ["2 ranks, BF16, compact", { ranks: 2, tokens: tokens(2, 40), hidden: 256, experts: 8, topk: 4, seed: 1 }, {}],
      [
        "4 ranks, BF16, -1 entries, two biases",
        { ranks: 4, tokens: tokens(4, 33), hidden: 512, experts: 16, topk: 4, seed: 2, drop: 0.3 },
        { biases: 2 },
      ],
      [
        "8 ranks, hidden 7168, top-8, Zipf, one bias",
        { ranks: 8, tokens: tokens(8, 64), hidden: 7168, experts: 64, topk: 8, seed: 3, zipf: 1.2 },
        { biases: 1 },
      ],
      [
        "4 ranks, FP8 + column-major f32 scales",
        {
          ranks: 4,
          tokens: tokens(4, 29),
          hidden: 512,
          experts: 32,
          topk: 6,
          seed: 4,
          fp8: true,
          columnMajorScales: true,
        },
        {},
      ],
      [
        "2 ranks, FP8 + packed UE8M0 scales",
        { ranks: 2, tokens: tokens(2, 19), hidden: 1024, experts: 8, topk: 3, seed: 5, fp8: true, ue8m0: true },
        {},
      ],
      [
        "4 ranks, routed by isTokenInRank only",
        { ranks: 4, tokens: tokens(4, 25), hidden: 64, experts: 8, topk: 2, seed: 6, routeWithoutTopk: true },
        {},
      ],
      [
        "4 ranks, a rank that receives nothing",
        { ranks: 4, tokens: tokens(4, 20), hidden: 128, experts: 16, topk: 3, seed: 7, starveLastRank: true },
        {},
      ],
      ["8 ranks, worst case", { ranks: 8, tokens: tokens(8, 30), hidden: 256, experts: 32, topk: 4, seed: 8 }, {
        worst: true,
      }],
      ["4 ranks, cached", { ranks: 4, tokens: tokens(4, 27), hidden: 96, experts: 8, topk: 2, seed: 9, drop: 0.1 }, {
        cached: true,
      }],
      [
        "4 ranks, expanded, alignment 4, zero padding",
        { ranks: 4, tokens: tokens(4, 31), hidden: 256, experts: 16, topk: 4, seed: 10, drop: 0.2 },
        { expand: true, alignment: 4, zeroPadding: true },
      ],
      [
        "8 ranks, expanded FP8, worst case",
        { ranks: 8, tokens: tokens(8, 24), hidden: 512, experts: 64, topk: 8, seed: 11, fp8: true },
        { expand: true, alignment: 8, worst: true },
      ],
      [
        // x rows further apart than a row: the kernels must step by the stride, not the row size
        "4 ranks, BF16 in padded rows, one bias",
        { ranks: 4, tokens: tokens(4, 23), hidden: 136, experts: 16, topk: 4, seed: 13, paddedRows: true },
        { biases: 1 },
      ],
      [
        "2 ranks, FP8 in padded rows, expanded",
        { ranks: 2, tokens: tokens(2, 17), hidden: 256, experts: 8, topk: 3, seed: 14, fp8: true, paddedRows: true },
        { expand: true, alignment: 2 },
      ],
      [
        // a cached expanded dispatch writes only the rows that hold a token: padding zeroed on request
        "3 ranks, FP8 expanded, cached, zero padding",
        { ranks: 3, tokens: tokens(3, 20), hidden: 256, experts: 12, topk: 3, seed: 17, fp8: true },
        { expand: true, alignment: 4, zeroPadding: true, cached: true },
      ],
      [
        "2 ranks, expanded, cached",
        { ranks: 2, tokens: tokens(2, 22), hidden: 128, experts: 8, topk: 3, seed: 12 },
        { expand: true, cached: true },
      ],
    ];
    for (const [name, s, mode] of cases) {
      await t.step(name, async () => {
        const host = await runOn("host", s, mode);
        const gpu = await runOn("cuda", s, mode);
        for (let r = 0; r < s.ranks; r++) {
          assert.deepEqual(Object.keys(gpu[r]).sort(), Object.keys(host[r]).sort(), `rank ${r}: outputs`);
          for (const key of Object.keys(host[r])) assertSameArray(gpu[r][key], host[r][key], `rank ${r}: ${key}`);
        }
      });
    }
  },
);

const H = 64, T = 6, K = 2, E = 8;

Deno.test({ name: "cuda: a missing rank times out naming it; the context survives", ignore }, async () => {
  const timeoutMs = 500;
  using g = Group.local({ ranks: 2, backend: "cuda", timeoutMs });
  const bufs = await g.createBuffers({ hidden: H, maxTokensPerRank: T });
  const rank = g.ranks[0];
  using x = await Tensor.from(rank, randomBF16(T * H, 1), { shape: [T, H] });
  using idx = await Tensor.from(rank, new BigInt64Array(T * K).map((_, i) => BigInt(i % E)), { shape: [T, K] });
  using w = await Tensor.from(rank, new Float32Array(T * K).fill(1), { shape: [T, K] });
  const started = performance.now();
  const e = await bufs[0].dispatch(x, { topkIdx: idx, topkWeights: w, numExperts: E }).catch((err) => err);
  const elapsed = performance.now() - started;
  assert.ok(e instanceof SwitchyardTimeoutError, String(e));
  assert.equal(e.peerRank, 1, e.message);
  assert.match(e.message, /rank 1/);
  assert.ok(elapsed < 3 * timeoutMs + 2000, `took ${elapsed.toFixed(0)} ms`);
  for (const b of bufs) b[Symbol.dispose]();
  // The kernel left without trapping: the device still works, and fresh buffers dispatch.
  const fresh = await g.createBuffers({ hidden: H, maxTokensPerRank: T });
  const ok = await g.all(async (rk, r) => {
    using xr = await Tensor.from(rk, randomBF16(T * H, r), { shape: [T, H] });
    using ir = await Tensor.from(rk, new BigInt64Array(T * K).map((_, i) => BigInt((i + r) % E)), { shape: [T, K] });
    using wr = await Tensor.from(rk, new Float32Array(T * K).fill(1), { shape: [T, K] });
    using res = await fresh[r].dispatch(xr, { topkIdx: ir, topkWeights: wr, numExperts: E });
    return res.numRecvTokens;
  });
  assert.ok(ok.every((n) => n !== null && n > 0));
  for (const b of fresh) b[Symbol.dispose]();
});

Deno.test(
  { name: "cuda: bad routing on one rank fails the dispatch everywhere, buffers stay usable", ignore },
  async () => {
    using g = Group.local({ ranks: 2, backend: "cuda", timeoutMs: 5000 });
    const bufs = await g.createBuffers({ hidden: H, maxTokensPerRank: T });
    const attempt = (bad: boolean) =>
      g.all(async (rk, r) => {
        using xr = await Tensor.from(rk, randomBF16(T * H, r), { shape: [T, H] });
        const ids = new BigInt64Array(T * K).map((_, i) => BigInt((i + r) % E));
        if (bad && r === 1) ids[3] = 99n;
        using ir = await Tensor.from(rk, ids, { shape: [T, K] });
        using wr = await Tensor.from(rk, new Float32Array(T * K).fill(1), { shape: [T, K] });
        try {
          using res = await bufs[r].dispatch(xr, { topkIdx: ir, topkWeights: wr, numExperts: E });
          return res.numRecvTokens;
        } catch (e) {
          return e;
        }
      });
    const failed = await attempt(true);
    assert.ok(failed[1] instanceof SwitchyardError && failed[1].argument === "topkIdx", String(failed[1]));
    assert.match((failed[1] as Error).message, /token 1, entry 1/);
    assert.ok(failed[0] instanceof SwitchyardError && failed[0].code === "PEER_FAILED", String(failed[0]));
    assert.match((failed[0] as Error).message, /rank 1 rejected its input/);
    const good = await attempt(false);
    assert.ok(good.every((n) => typeof n === "number" && n > 0), String(good));
    for (const b of bufs) b[Symbol.dispose]();
  },
);

Deno.test(
  { name: "cuda: more ranks on one GPU than can wait at once are refused before any launch", ignore },
  async () => {
    if (cuda.deviceCount !== 1) return; // spread over several GPUs, 17 ranks fit
    using g = Group.local({ ranks: 17, backend: "cuda" });
    const bufs = await g.createBuffers({ hidden: H, maxTokensPerRank: T });
    const rank = g.ranks[0];
    using x = await Tensor.from(rank, randomBF16(T * H, 1), { shape: [T, H] });
    using idx = await Tensor.from(rank, new BigInt64Array(T).fill(0n), { shape: [T, 1] });
    using w = await Tensor.from(rank, new Float32Array(T).fill(1), { shape: [T, 1] });
    await assert.rejects(
      () => bufs[0].dispatch(x, { topkIdx: idx, topkWeights: w, numExperts: 17 }),
      (e: unknown) => e instanceof SwitchyardError && e.argument === "ranks" && /share GPU/.test(e.message),
    );
    for (const b of bufs) b[Symbol.dispose]();
  },
);

Deno.test({ name: "cuda: an SM budget larger than the GPU is refused, naming numSms", ignore }, async () => {
  using g = Group.local({ ranks: 2, backend: "cuda" });
  const bufs = await g.createBuffers({ hidden: H, maxTokensPerRank: T, numSms: 1024 });
  const rank = g.ranks[0];
  using x = await Tensor.from(rank, randomBF16(T * H, 1), { shape: [T, H] });
  using idx = await Tensor.from(rank, new BigInt64Array(T).fill(0n), { shape: [T, 1] });
  using w = await Tensor.from(rank, new Float32Array(T).fill(1), { shape: [T, 1] });
  await assert.rejects(
    () => bufs[0].dispatch(x, { topkIdx: idx, topkWeights: w, numExperts: 2 }),
    (e: unknown) => e instanceof SwitchyardError && e.argument === "numSms" && /exceeds the \d+ SMs/.test(e.message),
  );
  for (const b of bufs) b[Symbol.dispose]();
});

Deno.test({ name: "cuda: device memory is shared between two processes by IPC handle (native)", ignore }, async () => {
  // The child reads what the parent wrote and the parent what the child wrote; handles of freed,
  // pooled or interior memory, forged handles and double closes are refused (tests/native/cuda_ipc.cu).
  const text = await nativeProgram("switchyard_cuda_ipc");
  assert.match(text, /ok: child: reads all the parent wrote, to the last byte/);
  assert.match(text, /ok: the child's writes are in this process's memory, to the last byte/);
  assert.match(text, /ok: child: the handle of memory freed before it was opened is refused/);
  assert.match(text, /^all ok$/m);
});

Deno.test({ name: "cuda: the CPU proxy carries kernels' puts and signals in order (native)", ignore }, async () => {
  // Four ranks' kernels put odd-sized messages through their proxies' wrapping rings, with and
  // without a link model; a wait nobody answers times out naming the source; a put past the
  // peer's window is refused and the proxy recovers (tests/native/rdma_transport.cu); on the CPU
  // executor again through the ibverbs engine on the software NIC.
  const text = await nativeProgram("switchyard_rdma_transport");
  assert.match(text, /ok: exchange: every wait succeeded and every signal came after its data/);
  assert.match(text, /ok: link model: every window holds exactly the messages put into it/);
  assert.match(text, /ok: a wait for a signal nobody sends times out naming the source/);
  assert.match(text, /ok: after a refusal and reset\(\): the signals and what the NIC carried match/);
  if (cuda.executedOnCpu && softVerbsBuilt()) {
    // The same through the ibverbs engine on the software NIC built beside the program (with the
    // ibverbs headers: .ci/fetch-headers.sh).
    assert.match(text, /ok: ibverbs: exchange: every wait succeeded and every signal came after its data/);
    assert.match(text, /ok: ibverbs: after a refusal and reset\(\): the signals and what the NIC carried match/);
    assert.match(text, /ok: ibverbs: a signal of \d+ and a put with a signal of \d+ \(more than one immediate/);
    assert.match(text, /ok: ibverbs: a proxy going away waits for a peer's put in flight to it/);
    assert.match(text, /ok: ibverbs: the proxy's error names the ranks and the NIC's status/);
    assert.match(text, /ok: ibverbs: a receive that fails stops the receiver's proxy on no descriptor/);
    assert.match(text, /ok: ibverbs: a refusal of a signal to a rank gone, then the NIC failing: the failure is what/);
    // The window registered through dma-buf (also from inside its allocation), as peer memory,
    // and neither: the error says why each way failed.
    assert.match(
      text,
      /ok: ibverbs: windows 4288 bytes into their allocations, registered through dma-buf only: every window holds exactly/,
    );
    assert.match(
      text,
      /ok: ibverbs: windows registered as peer memory only \(ibv_reg_mr\): every window holds exactly/,
    );
    assert.match(text, /ok: ibverbs: no peer memory on the host: the default registers through dma-buf: every wait/);
    assert.match(text, /ok: ibverbs: peer memory only, on a host without it: the error says why/);
    assert.match(text, /ok: ibverbs: dma-buf only, of memory the driver cannot export: the error says why/);
    // Two hops' queue pairs: only to the ranks of the other nodes with the rank's local index.
    assert.match(text, /ok: ibverbs: two hops: one queue pair per rank, to the rank of the other node/);
    assert.match(text, /ok: ibverbs: two hops: a put to the other node's rank goes/);
    assert.match(text, /ok: ibverbs: two hops: a rank of its own node's endpoint is taken, one that offers it a queue/);
  }
  assert.match(text, /^all ok$/m);
});

Deno.test({
  name: "cuda: the ibverbs engine over RoCE chooses a RoCE v2 GID by itself (native)",
  ignore: ignore || !cuda.executedOnCpu || !softVerbsBuilt(),
}, async () => {
  // The software NIC as a RoCE port on a routed fabric (tests/native/soft_verbs.cpp): GIDs of
  // RoCE v1 and v2, of a link-local and an IPv4 address, and RoCE v1 frames dropped.
  const text = await nativeProgram("switchyard_rdma_transport", ["--roce"], { SOFT_VERBS_LINK_LAYER: "ethernet" });
  assert.match(text, /ok: ibverbs: RoCE: exchange: every window holds exactly the messages put into it/);
  assert.match(text, /ok: ibverbs: RoCE: ranks apart, connected by the endpoints they exchanged as text: every wait/);
  assert.match(text, /ok: ibverbs: RoCE: the GID chosen is the RoCE v2 one of an IPv4 address/);
  assert.match(text, /ok: ibverbs: RoCE: a peer's GID of the other address family is refused/);
  assert.match(
    text,
    /ok: ibverbs: RoCE: a put from GID 0 \(RoCE v1\) fails at the transport timeout, naming the ranks/,
  );
  assert.match(text, /^all ok$/m);
});

/** One low-latency round on one backend: every rank's outputs (the rows its counts cover). */
interface LLCase {
  ranks: number;
  tokens: number[];
  hidden: number;
  experts: number;
  topk: number;
  seed: number;
  fp8?: boolean;
  roundScale?: boolean;
  ue8m0?: boolean;
  logfmt?: boolean;
  hook?: boolean;
}

async function lowLatencyOn(backend: Backend, c: LLCase): Promise<Outcome[]> {
  const maxTokens = Math.max(...c.tokens);
  const EL = c.experts / c.ranks, N = c.ranks * maxTokens, H = c.hidden;
  using g = Group.local({ ranks: c.ranks, backend, timeoutMs: 20000 });
  const bufs = await g.createBuffers({ hidden: H, maxTokensPerRank: maxTokens, lowLatency: { numExperts: c.experts } });
  try {
    return await g.all(async (rank, r) => {
      const T = c.tokens[r];
      const routing = randomRouting({
        tokens: T,
        experts: c.experts,
        topk: c.topk,
        seed: c.seed * 10 + r,
        dropProbability: 0.1,
      });
      // Expert outputs whose sum shows the order of addition through the BF16 result: +2^20,
      // -2^20 or a small value, each a third of the time, with weights 1 (so the large ones
      // cancel exactly, and a small one added while a large one is pending is lost). LogFMT's
      // blocks instead get magnitudes from 1e-3 to 1e2, so both of its encodings travel.
      const rng = new Rng(c.seed * 77 + r);
      const expertRows = (n: number) => {
        const f = new Float32Array(n);
        if (!c.logfmt) {
          for (let i = 0; i < n; i++) {
            const u = rng.next();
            f[i] = u < 1 / 3 ? 2 ** 20 : u < 2 / 3 ? -(2 ** 20) : rng.next() * 2 - 1;
          }
          return toBF16(f);
        }
        for (let b = 0; b < n / 128; b++) {
          const scale = 10 ** (rng.next() * 5 - 3);
          for (let i = b * 128; i < (b + 1) * 128; i++) f[i] = (rng.next() * 2 - 1) * scale;
        }
        return toBF16(f);
      };
      const weights = c.logfmt ? routing.topkWeights : routing.topkWeights.map(() => 1);
      using x = await Tensor.from(rank, orderSensitiveBF16(T * H, 40 + r), { shape: [T, H] });
      using idx = await Tensor.from(rank, routing.topkIdx, { shape: [T, c.topk] });
      using w = await Tensor.from(rank, weights, { shape: [T, c.topk] });
      using stats = await Tensor.from(rank, new Int32Array(EL).fill(3), { shape: [EL] });
      using sent = await bufs[r].lowLatencyDispatch(x, idx, {
        useFp8: !!c.fp8,
        roundScale: c.roundScale,
        useUe8m0: c.ue8m0,
        returnRecvHook: c.hook,
        cumulativeLocalExpertRecvStats: stats,
      });
      sent.hook?.run();
      const out: Outcome = {};
      const counts = await sent.recvCount.read() as Int32Array;
      out.recvCount = bytesOf(counts);
      const rowBytes = c.fp8 ? H : 2 * H;
      const xs = bytesOf(await sent.recvX.read());
      const scaleWords = sent.recvXScales ? sent.recvXScales.shape[2] : 0;
      const scales = sent.recvXScales ? new Uint32Array((await sent.recvXScales.read()).buffer) : undefined;
      using srcT = sent.handle.srcInfo();
      const src = await srcT.read() as Int32Array;
      for (let l = 0; l < EL; l++) {
        // Only the rows the counts cover are written (the rest of the worst-case output is not).
        out[`recvX ${l}`] = xs.slice(l * N * rowBytes, (l * N + counts[l]) * rowBytes);
        out[`srcInfo ${l}`] = bytesOf(src.slice(l * N, l * N + counts[l]));
        if (scales) out[`scales ${l}`] = bytesOf(scales.slice(l * N * scaleWords, (l * N + counts[l]) * scaleWords));
      }
      using rangeT = sent.handle.layoutRange();
      out.layoutRange = bytesOf(await rangeT.read());
      out.expertStats = bytesOf(await stats.read());
      using y = await Tensor.from(rank, expertRows(EL * N * H), { shape: [EL, N, H] });
      using back = await bufs[r].lowLatencyCombine(y, idx, w, sent.handle, {
        useLogfmt: c.logfmt,
        returnRecvHook: c.hook,
      });
      back.hook?.run();
      out.combined = bytesOf(await back.combinedX.read());
      return out;
    });
  } finally {
    for (const b of bufs) b[Symbol.dispose]();
  }
}

Deno.test(
  { name: "cuda: low-latency dispatch and combine agree bit for bit with the host backend", ignore },
  async (t) => {
    const tokens = (ranks: number, base: number) => Array.from({ length: ranks }, (_, r) => base + ((r * 5) % 7));
    const cases: [string, LLCase][] = [
      ["2 ranks, BF16", { ranks: 2, tokens: tokens(2, 12), hidden: 256, experts: 8, topk: 3, seed: 1 }],
      ["4 ranks, FP8 f32 scales, hooks", {
        ranks: 4,
        tokens: tokens(4, 9),
        hidden: 512,
        experts: 16,
        topk: 4,
        seed: 2,
        fp8: true,
        hook: true,
      }],
      ["4 ranks, FP8 round scale, LogFMT", {
        ranks: 4,
        tokens: tokens(4, 7),
        hidden: 256,
        experts: 8,
        topk: 2,
        seed: 3,
        fp8: true,
        roundScale: true,
        logfmt: true,
      }],
      ["8 ranks, FP8 UE8M0 (5 scale blocks)", {
        ranks: 8,
        tokens: tokens(8, 6),
        hidden: 640,
        experts: 32,
        topk: 5,
        seed: 4,
        fp8: true,
        roundScale: true,
        ue8m0: true,
      }],
    ];
    for (const [name, c] of cases) {
      await t.step(name, async () => {
        const host = await lowLatencyOn("host", c);
        const gpu = await lowLatencyOn("cuda", c);
        for (let r = 0; r < c.ranks; r++) {
          for (const key of Object.keys(host[r])) assertSameArray(gpu[r][key], host[r][key], `rank ${r}: ${key}`);
        }
      });
    }
  },
);
