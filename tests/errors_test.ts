/**
 * Bad input is a SwitchyardError that names the argument: never a crash, a hang or a silent
 * truncation. Checked on the TypeScript side, in the C ABI (also called directly, bypassing the
 * TypeScript checks), and inside the operations (data the host cannot see at enqueue time).
 */

import assert from "node:assert/strict";
import { DispatchArgs, DispatchResult as DispatchStruct } from "../ffi/structs.ts";
import { backendInfo, type ErrorCode, Group, Stream, SwitchyardError, SwitchyardTimeoutError, Tensor } from "../mod.ts";
import { errorFor, native } from "../src/native.ts";
import { Status } from "../ffi/symbols.ts";
import { fixture, randomBF16 } from "./helpers.ts";

/** Asserts that `fn` throws or rejects with `code` naming `argument`. */
async function expectError(fn: () => unknown, code: ErrorCode, argument?: string): Promise<SwitchyardError> {
  let caught: unknown;
  try {
    await fn();
  } catch (e) {
    caught = e;
  }
  assert.ok(caught instanceof SwitchyardError, `expected a SwitchyardError, got ${caught}`);
  assert.equal(caught.code, code, caught.message);
  if (argument !== undefined) {
    assert.equal(caught.argument, argument, caught.message);
    assert.ok(caught.message.includes(argument), `the message names ${argument}: ${caught.message}`);
  }
  return caught;
}

const H = 64, T = 8, E = 8, K = 2;

Deno.test("bad inputs are rejected with errors that name the argument", async (t) => {
  using fx = await fixture(2, H, 16, 2000);
  const [rank0, rank1] = fx.group.ranks;
  const buf = fx.buffers[0];
  using x = await Tensor.from(rank0, randomBF16(T * H, 1), { shape: [T, H] });
  using topkIdx = await Tensor.from(rank0, new BigInt64Array(T * K).map((_, i) => BigInt(i % E)), { shape: [T, K] });
  using weights = await Tensor.from(rank0, new Float32Array(T * K).fill(0.5), { shape: [T, K] });
  const ok = { topkIdx, topkWeights: weights, numExperts: E };
  using x1 = await Tensor.from(rank1, randomBF16(T * H, 2), { shape: [T, H] });
  using idx1 = await Tensor.from(rank1, new BigInt64Array(T * K).map((_, i) => BigInt(i % K)), { shape: [T, K] });
  using w1 = await Tensor.from(rank1, new Float32Array(T * K), { shape: [T, K] });
  const ok1 = { topkIdx: idx1, topkWeights: w1, numExperts: E };
  // A call refused on rank 0 is still a collective call: rank 1 makes its own and hears of
  // the refusal at once (PEER_FAILED naming rank 0); the next pair lines up again.
  const refused = async (
    call: () => Promise<unknown>,
    peer: () => Promise<unknown>,
    code: ErrorCode,
    argument?: string,
  ): Promise<SwitchyardError> => {
    const [mine, theirs] = await Promise.allSettled([expectError(call, code, argument), peer()]);
    if (mine.status === "rejected") throw mine.reason;
    const e = theirs.status === "rejected" ? theirs.reason : undefined;
    assert.ok(e instanceof SwitchyardError && e.code === "PEER_FAILED", `rank 1: ${e}`);
    assert.match(e.message, /rank 0 rejected its input/);
    return mine.value;
  };
  const refusedDispatch = (call: () => Promise<unknown>, code: ErrorCode, argument?: string) =>
    refused(call, () => fx.buffers[1].dispatch(x1, ok1), code, argument);

  await t.step("x: wrong dtype", async () => {
    using bad = Tensor.empty(rank0, { dtype: "f32", shape: [T, H] });
    await refusedDispatch(() => buf.dispatch(bad, ok), "INVALID_ARGUMENT", "x");
  });
  await t.step("x: wrong hidden size", async () => {
    using bad = Tensor.empty(rank0, { dtype: "bf16", shape: [T, H / 2] });
    await refusedDispatch(() => buf.dispatch(bad, ok), "INVALID_ARGUMENT", "x");
  });
  await t.step("x: more tokens than maxTokensPerRank", async () => {
    using bad = Tensor.empty(rank0, { dtype: "bf16", shape: [17, H] });
    const e = await refusedDispatch(() => buf.dispatch(bad, ok), "INVALID_ARGUMENT", "x");
    assert.match(e.message, /17 tokens exceed the buffer's maxTokensPerRank \(16\)/);
  });
  await t.step("x: not contiguous along hidden", async () => {
    using bad = Tensor.empty(rank0, { dtype: "bf16", shape: [T, H], strides: [1, T] });
    await refusedDispatch(() => buf.dispatch(bad, ok), "INVALID_ARGUMENT", "x");
  });
  await t.step("topkIdx: wrong dtype", async () => {
    using bad = Tensor.empty(rank0, { dtype: "f32", shape: [T, K] });
    await refusedDispatch(() => buf.dispatch(x, { ...ok, topkIdx: bad }), "INVALID_ARGUMENT", "topkIdx");
  });
  await t.step("topkIdx: rows differ from x", async () => {
    using bad = Tensor.empty(rank0, { dtype: "i64", shape: [T - 1, K] });
    await refusedDispatch(() => buf.dispatch(x, { ...ok, topkIdx: bad }), "INVALID_ARGUMENT", "topkIdx");
  });
  await t.step("topkIdx: more than 32 entries per token", async () => {
    using bad = Tensor.empty(rank0, { dtype: "i64", shape: [T, 33] });
    await refusedDispatch(() => buf.dispatch(x, { ...ok, topkIdx: bad }), "INVALID_ARGUMENT", "topkIdx");
  });
  await t.step("topkWeights: missing", async () => {
    await refusedDispatch(() => buf.dispatch(x, { topkIdx, numExperts: E }), "INVALID_ARGUMENT", "topkWeights");
  });
  await t.step("topkWeights: wrong shape", async () => {
    using bad = Tensor.empty(rank0, { dtype: "f32", shape: [T, K + 1] });
    await refusedDispatch(() => buf.dispatch(x, { ...ok, topkWeights: bad }), "INVALID_ARGUMENT", "topkWeights");
  });
  await t.step("numExperts: not divisible by the ranks", async () => {
    await refusedDispatch(() => buf.dispatch(x, { ...ok, numExperts: 7 }), "INVALID_ARGUMENT", "numExperts");
    await expectError(() => buf.layout(topkIdx, { numExperts: 7 }), "INVALID_ARGUMENT", "numExperts");
  });
  await t.step("numExperts: not an integer", async () => {
    await refusedDispatch(() => buf.dispatch(x, { ...ok, numExperts: 1.5 }), "INVALID_ARGUMENT", "numExperts");
  });
  await t.step("xScales: missing for FP8, wrong shape, or given for BF16", async () => {
    using fp8 = Tensor.empty(rank0, { dtype: "fp8_e4m3", shape: [T, H] });
    await refusedDispatch(() => buf.dispatch(fp8, ok), "INVALID_ARGUMENT", "xScales");
    using badScales = Tensor.empty(rank0, { dtype: "f32", shape: [T, 2] });
    await refusedDispatch(() => buf.dispatch(fp8, { ...ok, xScales: badScales }), "INVALID_ARGUMENT", "xScales");
    using scales = Tensor.empty(rank0, { dtype: "f32", shape: [T, 1] });
    await refusedDispatch(() => buf.dispatch(x, { ...ok, xScales: scales }), "INVALID_ARGUMENT", "xScales");
  });
  await t.step("expertAlignment and numWorstTokens: out of range", async () => {
    await refusedDispatch(() => buf.dispatch(x, { ...ok, expertAlignment: 0 }), "INVALID_ARGUMENT", "expertAlignment");
    await refusedDispatch(() => buf.dispatch(x, { ...ok, numWorstTokens: -1 }), "INVALID_ARGUMENT", "numWorstTokens");
  });
  await t.step("allocateOnCommStream: without previousEvent and asyncFinish", async () => {
    await refusedDispatch(
      () => buf.dispatch(x, { ...ok, allocateOnCommStream: true }),
      "INVALID_ARGUMENT",
      "allocateOnCommStream",
    );
  });
  await t.step("a disposed tensor", async () => {
    const gone = Tensor.empty(rank0, { dtype: "bf16", shape: [T, H] });
    gone[Symbol.dispose]();
    gone[Symbol.dispose](); // idempotent
    await refusedDispatch(() => buf.dispatch(gone, ok), "DISPOSED");
    await expectError(() => gone.read(), "DISPOSED");
  });
  await t.step("a handle of the wrong kind", async () => {
    using s = Stream.create(rank0);
    await refusedDispatch(() => buf.dispatch(s as unknown as Tensor, ok), "WRONG_HANDLE", "x");
    await refusedDispatch(() => buf.dispatch(x, { ...ok, handle: x as never }), "WRONG_HANDLE", "handle");
    // An object that only claims to be a tensor (its prototype) is named, not a raw TypeError.
    const imitation = Object.create(Tensor.prototype) as Tensor;
    const e = await refusedDispatch(() => buf.dispatch(imitation, ok), "WRONG_HANDLE", "x");
    assert.match(e.message, /an imitation/);
    // A number given as a string is reported as the string it is.
    const s8 = await refusedDispatch(
      () => buf.dispatch(x, { ...ok, numExperts: "8" as unknown as number }),
      "INVALID_ARGUMENT",
      "numExperts",
    );
    assert.match(s8.message, /got the string "8"/);
  });
  await t.step("a tensor or stream of another rank", async () => {
    using other = Tensor.empty(rank1, { dtype: "bf16", shape: [T, H] });
    const e = await refusedDispatch(() => buf.dispatch(other, ok), "WRONG_HANDLE", "x");
    assert.match(e.message, /rank 1/);
    await refusedDispatch(() => buf.dispatch(x, { ...ok, stream: rank1.stream }), "WRONG_HANDLE", "stream");
  });
  await t.step("cached dispatch with top-k", async () => {
    // A real handle first: both ranks dispatch.
    const [d0, d1] = await Promise.all([buf.dispatch(x, ok), fx.buffers[1].dispatch(x1, ok1)]);
    const refusedCombine = (call: () => Promise<unknown>, code: ErrorCode, argument?: string) =>
      // (a combine reports a failure when its output is read)
      refused(call, () => fx.buffers[1].combine(d1.recvX, d1.handle).then((c) => c.combinedX.read()), code, argument);
    await refusedDispatch(() => buf.dispatch(x, { ...ok, handle: d0.handle }), "INVALID_ARGUMENT", "topkIdx");
    // combine: a handle of another buffer, rows that do not match, a bias of the wrong shape.
    await refusedCombine(() => buf.combine(d0.recvX, d1.handle), "WRONG_HANDLE");
    using short = Tensor.empty(rank0, { dtype: "bf16", shape: [(d0.numRecvTokens ?? 0) + 1, H] });
    await refusedCombine(() => buf.combine(short, d0.handle), "INVALID_ARGUMENT", "x");
    using bias = Tensor.empty(rank0, { dtype: "bf16", shape: [T + 1, H] });
    await refusedCombine(() => buf.combine(d0.recvX, d0.handle, { bias }), "INVALID_ARGUMENT", "bias");
    await refusedCombine(
      () => buf.combine(d0.recvX, d0.handle, { bias: [bias, bias, bias] as unknown as [Tensor, Tensor] }),
      "INVALID_ARGUMENT",
      "bias",
    );
    d0[Symbol.dispose]();
    d1[Symbol.dispose]();
  });
  await t.step("Group.local and buffers: bad options", async () => {
    await expectError(() => Group.local({ ranks: 0 }), "INVALID_ARGUMENT", "ranks");
    await expectError(() => Group.local({ ranks: 65 }), "INVALID_ARGUMENT", "ranks");
    await expectError(() => Group.local({ ranks: 2, backend: "tpu" as never }), "INVALID_ARGUMENT", "backend");
    using g = Group.local({ ranks: 1 });
    await expectError(() => g.createBuffers({ hidden: 60, maxTokensPerRank: 4 }), "INVALID_ARGUMENT", "hidden");
    await expectError(
      () => g.createBuffers({ hidden: 64, maxTokensPerRank: 0 }),
      "INVALID_ARGUMENT",
      "maxTokensPerRank",
    );
    await expectError(
      () => g.createBuffers({ hidden: 64, maxTokensPerRank: 4, numSms: 3 }),
      "INVALID_ARGUMENT",
      "numSms",
    );
  });
  await t.step("tensors: sizes that would overflow are refused, not wrapped", async () => {
    await expectError(
      () => Tensor.empty(rank0, { dtype: "f32", shape: [4097], strides: [2 ** 52] }),
      "INVALID_ARGUMENT",
      "strides",
    );
    await expectError(
      () => Tensor.empty(rank0, { dtype: "f32", shape: [2 ** 21, 2 ** 21] }),
      "INVALID_ARGUMENT",
      "shape",
    );
  });
  await t.step("tensors: bad shapes, strides and data", async () => {
    await expectError(() => Tensor.empty(rank0, { dtype: "f32", shape: [-1] }), "INVALID_ARGUMENT", "shape");
    await expectError(
      () => Tensor.empty(rank0, { dtype: "f32", shape: [4, 4], strides: [1, 1] }),
      "INVALID_ARGUMENT",
      "strides",
    );
    await expectError(() => Tensor.from(rank0, new Float32Array(3), { shape: [4] }), "INVALID_ARGUMENT", "data");
    await expectError(() => Tensor.from(rank0, new Uint8Array(4), { shape: [4] }), "INVALID_ARGUMENT", "dtype");
    using i32 = Tensor.empty(rank0, { dtype: "i32", shape: [2] });
    await expectError(() => i32.write(new Float32Array(2)), "INVALID_ARGUMENT", "data");
  });
  await t.step("the CUDA backend without a GPU", async () => {
    const info = backendInfo("cuda");
    if (info.available) {
      console.log(`  (the CUDA backend is available here, on ${info.deviceName}: the no-device error cannot be shown)`);
      return;
    }
    const e = await expectError(
      () => Group.local({ ranks: 2, backend: "cuda" }),
      info.compiled ? "NO_DEVICE" : "UNSUPPORTED",
      "backend",
    );
    assert.match(e.message, /CUDA/);
    if (info.compiled) {
      // "No device" first; a driver/runtime mismatch is news only where an NVIDIA driver exists.
      assert.match(e.message, /no CUDA device/);
      let driver = true;
      try {
        Deno.statSync("/proc/driver/nvidia");
      } catch {
        driver = false;
      }
      if (!driver) {
        assert.doesNotMatch(e.message, /insufficient/);
        assert.match(info.reason, /^no CUDA device \(no NVIDIA driver is loaded/);
      }
    }
  });
});

/** The error the last failed direct call left on `handle`. */
function expectLast(handle: Deno.PointerObject, code: ErrorCode, argument: string): void {
  const e = errorFor(Status[code as keyof typeof Status], handle, "direct call");
  assert.equal(e.code, code, e.message);
  assert.equal(e.argument, argument, e.message);
}

Deno.test("copyFrom copies in stream order and refuses what it cannot copy", async (t) => {
  using fx = await fixture(2, H, 16, 2000);
  const [r0, r1] = fx.group.ranks;
  await t.step("the bytes arrive in stream order: after the writes before, before the writes after", async () => {
    const data = randomBF16(4 * 33, 5);
    using src = await Tensor.from(r0, randomBF16(4 * 33, 4), { shape: [4, 33] });
    using dst = Tensor.empty(r0, { dtype: "bf16", shape: [132] });
    await src.write(data);
    dst.copyFrom(src);
    await src.write(randomBF16(4 * 33, 6)); // after the copy in stream order: must not reach dst
    assert.deepEqual(await dst.read(), data);
    // On another stream, ordered by an event.
    using side = Stream.create(r0);
    const other = randomBF16(4 * 33, 7);
    await src.write(other);
    side.waitEvent(r0.stream.record());
    dst.copyFrom(src, { stream: side });
    await side.synchronize();
    assert.deepEqual(await dst.read(), other);
  });
  await t.step("refusals name the argument", async () => {
    using src = Tensor.empty(r0, { dtype: "bf16", shape: [4, 33] });
    using f32 = Tensor.empty(r0, { dtype: "f32", shape: [132] });
    using short = Tensor.empty(r0, { dtype: "bf16", shape: [131] });
    using elsewhere = Tensor.empty(r1, { dtype: "bf16", shape: [132] });
    using strided = Tensor.empty(r0, { dtype: "bf16", shape: [4, 33], strides: [40, 1] });
    await expectError(() => f32.copyFrom(src as unknown as Tensor<"f32">), "INVALID_ARGUMENT", "dst");
    await expectError(() => short.copyFrom(src), "INVALID_ARGUMENT", "dst");
    await expectError(() => elsewhere.copyFrom(src), "WRONG_HANDLE", "src");
    await expectError(() => strided.copyFrom(src), "INVALID_ARGUMENT", "dst");
    await expectError(() => src.copyFrom(strided), "INVALID_ARGUMENT", "src");
    await expectError(() => src.copyFrom({} as Tensor<"bf16">), "WRONG_HANDLE", "src");
  });
});

Deno.test("the C ABI validates what reaches it directly", async (t) => {
  using fx = await fixture(1, H, 16, 2000);
  const buf = fx.buffers[0];
  const stream = fx.group.ranks[0].stream;
  const lib = native();
  await t.step("NULL x names x", () => {
    const args = DispatchArgs.create().set("num_experts", E).setPointer("compute_stream", stream.pointer);
    assert.equal(lib.sy_dispatch(buf.pointer, args.bytes, DispatchStruct.create().bytes), Status.INVALID_ARGUMENT);
    expectLast(buf.pointer, "INVALID_ARGUMENT", "x");
  });
  await t.step("a struct_size smaller than the library's names args", () => {
    const args = DispatchArgs.create().set("struct_size", 8);
    assert.equal(lib.sy_dispatch(buf.pointer, args.bytes, DispatchStruct.create().bytes), Status.INVALID_ARGUMENT);
    expectLast(buf.pointer, "INVALID_ARGUMENT", "args");
  });
  await t.step("sy_tensor_copy checks ranks, dtypes and sizes itself", () => {
    using a = Tensor.empty(fx.group.ranks[0], { dtype: "f32", shape: [4] });
    using b = Tensor.empty(fx.group.ranks[0], { dtype: "i32", shape: [4] });
    using c = Tensor.empty(fx.group.ranks[0], { dtype: "f32", shape: [5] });
    assert.equal(lib.sy_tensor_copy(a.pointer, b.pointer, stream.pointer), Status.INVALID_ARGUMENT);
    expectLast(a.pointer, "INVALID_ARGUMENT", "dst");
    assert.equal(lib.sy_tensor_copy(a.pointer, c.pointer, stream.pointer), Status.INVALID_ARGUMENT);
    assert.equal(lib.sy_tensor_copy(a.pointer, null, stream.pointer), Status.INVALID_ARGUMENT);
    expectLast(a.pointer, "INVALID_ARGUMENT", "src");
    assert.equal(lib.sy_tensor_copy(a.pointer, a.pointer, null), Status.INVALID_ARGUMENT);
    expectLast(a.pointer, "INVALID_ARGUMENT", "stream");
  });
  await t.step("a destroyed handle stays destroyed when a new object is created", () => {
    const a = Tensor.empty(fx.group.ranks[0], { dtype: "f32", shape: [1] });
    const raw = a.pointer;
    a[Symbol.dispose]();
    using b = Tensor.empty(fx.group.ranks[0], { dtype: "f32", shape: [2] });
    assert.notEqual(Deno.UnsafePointer.value(b.pointer), Deno.UnsafePointer.value(raw));
    assert.equal(lib.sy_tensor_destroy(raw), Status.DISPOSED);
    assert.equal(b.shape[0], 2, "the new tensor is untouched");
  });
  await t.step("a destroyed handle is reported, not dereferenced", () => {
    const tensor = Tensor.empty(fx.group.ranks[0], { dtype: "f32", shape: [1] });
    const raw = tensor.pointer;
    tensor[Symbol.dispose]();
    assert.equal(lib.sy_tensor_destroy(raw), Status.DISPOSED);
    const args = DispatchArgs.create().setPointer("x", raw).setPointer("compute_stream", stream.pointer);
    assert.equal(lib.sy_dispatch(buf.pointer, args.bytes, DispatchStruct.create().bytes), Status.DISPOSED);
    expectLast(buf.pointer, "DISPOSED", "x");
  });
  await t.step("events answered through a status of their own still report a destroyed handle", () => {
    const a = fx.group.ranks[0].createEvent(), b = fx.group.ranks[0].createEvent();
    const raw = a.pointer;
    a[Symbol.dispose]();
    // sy_event_query and sy_event_elapsed answer NOT_READY as a status: a failure to resolve the
    // handle must not be lost behind it.
    assert.equal(lib.sy_event_query(raw), Status.DISPOSED);
    assert.equal(lib.sy_event_elapsed(raw, b.pointer, new Float64Array(1)), Status.DISPOSED);
    assert.equal(lib.sy_event_elapsed(b.pointer, raw, new Float64Array(1)), Status.DISPOSED);
    b[Symbol.dispose]();
  });
});

Deno.test("bad data inside an operation fails every rank fast, naming the culprit", async (t) => {
  await t.step(
    "an expert id out of range: INVALID_ARGUMENT here, PEER_FAILED at the peers, buffers usable",
    async () => {
      using fx = await fixture(3, H, 16, 5000);
      const run = (bad: boolean) =>
        Promise.allSettled(fx.group.ranks.map(async (rank, r) => {
          const ids = new BigInt64Array(T * K).map((_, i) => BigInt(i % 9));
          if (bad && r === 1) ids[5] = 300n;
          using x = await Tensor.from(rank, randomBF16(T * H, r), { shape: [T, H] });
          using idx = await Tensor.from(rank, ids, { shape: [T, K] });
          using w = await Tensor.from(rank, new Float32Array(T * K), { shape: [T, K] });
          return await fx.buffers[r].dispatch(x, { topkIdx: idx, topkWeights: w, numExperts: 9 });
        }));
      const started = performance.now();
      const results = await run(true);
      const elapsed = performance.now() - started;
      const [e0, e1, e2] = results.map((r) => (r as PromiseRejectedResult).reason);
      assert.ok(
        e1 instanceof SwitchyardError && e1.code === "INVALID_ARGUMENT" && e1.argument === "topkIdx",
        String(e1),
      );
      assert.match(e1.message, /token 2, entry 1 holds expert 300, outside \[0, 9\)/);
      for (const e of [e0, e2]) {
        assert.ok(e instanceof SwitchyardTimeoutError, String(e));
        assert.equal(e.code, "PEER_FAILED");
        assert.equal(e.peerRank, 1);
        assert.match(e.message, /rank 1 rejected its input for dispatch/);
      }
      assert.ok(elapsed < 2000, `failed fast: ${elapsed.toFixed(0)} ms`);
      console.log(`  rank 0 saw: ${e0.message} (${elapsed.toFixed(0)} ms)`);
      // Nobody ran it, so the buffers are fine: the next dispatch works everywhere.
      const again = await run(false);
      assert.ok(again.every((r) => r.status === "fulfilled"), JSON.stringify(again.map((r) => r.status)));
      for (const r of again) (r as PromiseFulfilledResult<{ [Symbol.dispose](): void }>).value[Symbol.dispose]();
    },
  );
  await t.step("an expert listed twice", async () => {
    using fx = await fixture(1, H, 16, 2000);
    const rank = fx.group.ranks[0];
    using x = await Tensor.from(rank, randomBF16(T * H, 1), { shape: [T, H] });
    using idx = await Tensor.from(rank, new BigInt64Array(T * K).fill(3n), { shape: [T, K] });
    using w = await Tensor.from(rank, new Float32Array(T * K), { shape: [T, K] });
    const e = await expectError(
      () => fx.buffers[0].dispatch(x, { topkIdx: idx, topkWeights: w, numExperts: E }),
      "INVALID_ARGUMENT",
      "topkIdx",
    );
    assert.match(e.message, /lists expert 3 more than once/);
    // layout reports it in stream order: on the read of its outputs.
    using layout = await fx.buffers[0].layout(idx, { numExperts: E });
    await expectError(() => layout.numTokensPerRank.read(), "INVALID_ARGUMENT", "topkIdx");
  });
  await t.step("numWorstTokens smaller than what arrives: reported, not truncated", async () => {
    using fx = await fixture(1, H, 16, 2000);
    const rank = fx.group.ranks[0];
    using x = await Tensor.from(rank, randomBF16(T * H, 1), { shape: [T, H] });
    using idx = await Tensor.from(rank, new BigInt64Array(T * K).map((_, i) => BigInt(i % K)), { shape: [T, K] });
    using w = await Tensor.from(rank, new Float32Array(T * K), { shape: [T, K] });
    using res = await fx.buffers[0].dispatch(x, { topkIdx: idx, topkWeights: w, numExperts: E, numWorstTokens: T - 3 });
    await expectError(() => res.recvX.read(), "INVALID_ARGUMENT", "numWorstTokens");
    // The stream reported the failure once and works again.
    assert.deepEqual(await x.read(), await x.read());
  });
  await t.step("ranks passing different parameters are told which, and the buffers stay usable", async () => {
    using fx = await fixture(2, H, 16, 3000);
    const made = await fx.group.all(async (rank, r) => ({
      x: await Tensor.from(rank, randomBF16(T * H, r), { shape: [T, H] }),
      idx: await Tensor.from(rank, new BigInt64Array(T * K).map((_, i) => BigInt(i % E)), { shape: [T, K] }),
      w: await Tensor.from(rank, new Float32Array(T * K).fill(1), { shape: [T, K] }),
    }));
    // Rank 1 routes with top-k, rank 0 only with an explicit matrix: their records would differ.
    using inRank = await Tensor.from(fx.group.ranks[0], new Uint8Array(T * 2).fill(1), {
      dtype: "bool",
      shape: [T, 2],
    });
    const settled = await Promise.allSettled([
      fx.buffers[0].dispatch(made[0].x, { isTokenInRank: inRank }),
      fx.buffers[1].dispatch(made[1].x, { topkIdx: made[1].idx, topkWeights: made[1].w, numExperts: E }),
    ]);
    for (const s of settled) {
      const e = (s as PromiseRejectedResult).reason;
      assert.ok(e instanceof SwitchyardError && e.argument === "operation", String(e));
      assert.match(e.message, /with different top-k widths \((2 vs 0|0 vs 2)\)/);
    }
    const again = await fx.group.all((_, r) =>
      fx.buffers[r].dispatch(made[r].x, { topkIdx: made[r].idx, topkWeights: made[r].w, numExperts: E })
    );
    assert.ok(again.every((d) => d.numRecvTokens !== null));
    for (const d of again) d[Symbol.dispose]();
    // A rank that is done with the failed operation goes straight on to the next (worst case:
    // nothing waits on the host in between) and publishes its parameters while the other may
    // still be comparing the failed one's; they must not overwrite them (core::op_slot). Round
    // after round: the failed call fails on both with the mismatch, the next works on both.
    for (let round = 0; round < 8; round++) {
      const results = await Promise.allSettled([0, 1].map(async (r) => {
        const bad = r === 0
          ? fx.buffers[0].dispatch(made[0].x, { isTokenInRank: inRank, numWorstTokens: 2 * T })
          : fx.buffers[1].dispatch(made[1].x, {
            topkIdx: made[1].idx,
            topkWeights: made[1].w,
            numExperts: E,
            numWorstTokens: 2 * T,
          });
        // Worst case: the failure surfaces when the outputs are read.
        const failed = await bad.then((d) => d.recvCount.read().then(() => d)).catch((e) => e);
        const good = await fx.buffers[r].dispatch(made[r].x, {
          topkIdx: made[r].idx,
          topkWeights: made[r].w,
          numExperts: E,
          numWorstTokens: 2 * T,
        });
        const count = (await good.recvCount.read())[0];
        good[Symbol.dispose]();
        return { failed, count };
      }));
      for (const [r, s] of results.entries()) {
        assert.equal(s.status, "fulfilled", `round ${round}, rank ${r}: ${(s as PromiseRejectedResult).reason}`);
        const { failed, count } = (s as PromiseFulfilledResult<{ failed: unknown; count: number }>).value;
        assert.ok(failed instanceof SwitchyardError && failed.argument === "operation", `round ${round}: ${failed}`);
        assert.match(failed.message, /with different top-k widths/);
        assert.ok(count > 0, `round ${round}, rank ${r}: ${count} rows`);
      }
    }
    for (const m of made) for (const v of Object.values(m)) v[Symbol.dispose]();
  });
  await t.step("mismatched collectives name the operation; the buffers stay usable", async () => {
    using fx = await fixture(2, H, 16, 3000);
    const ups = await fx.group.all(async (rank, r) => ({
      x: await Tensor.from(rank, randomBF16(T * H, r), { shape: [T, H] }),
      idx: await Tensor.from(rank, new BigInt64Array(T * K).map((_, i) => BigInt((i + r) % E)), { shape: [T, K] }),
      w: await Tensor.from(rank, new Float32Array(T * K).fill(1), { shape: [T, K] }),
    }));
    const args = (r: number) => ({ topkIdx: ups[r].idx, topkWeights: ups[r].w, numExperts: E });
    const first = await fx.group.all((_, r) => fx.buffers[r].dispatch(ups[r].x, args(r)));
    const [a, b] = await Promise.allSettled([
      fx.buffers[0].dispatch(ups[0].x, args(0)),
      fx.buffers[1].combine(first[1].recvX, first[1].handle).then((c) => c.combinedX.read()),
    ]);
    for (const s of [a, b]) {
      assert.equal(s.status, "rejected");
      const e = (s as PromiseRejectedResult).reason;
      assert.ok(e instanceof SwitchyardError && e.argument === "operation", String(e));
      assert.match(e.message, /called (dispatch|combine) as operation .* but rank \d called (dispatch|combine)/);
    }
    const again = await fx.group.all((_, r) => fx.buffers[r].combine(first[r].recvX, first[r].handle));
    for (const c of again) c[Symbol.dispose]();
    for (const f of first) f[Symbol.dispose]();
    for (const u of ups) for (const v of Object.values(u)) v[Symbol.dispose]();
  });
});

Deno.test("a call refused on one rank fails every rank within milliseconds; the buffers stay usable", async (t) => {
  const timeoutMs = 5000;
  using fx = await fixture(2, H, 16, timeoutMs);
  const inputs = await fx.group.all(async (rank, r) => ({
    x: await Tensor.from(rank, randomBF16(T * H, r), { shape: [T, H] }),
    xf: await Tensor.from(rank, new Float32Array(T * H), { shape: [T, H] }),
    idx: await Tensor.from(rank, new BigInt64Array(T * K).map((_, i) => BigInt((i + r) % E)), { shape: [T, K] }),
    w: await Tensor.from(rank, new Float32Array(T * K).fill(0.5), { shape: [T, K] }),
  }));
  const good = (r: number) => ({ topkIdx: inputs[r].idx, topkWeights: inputs[r].w, numExperts: E });
  // Rank 1 makes the refused call, rank 0 a good one; then both a good one.
  const round = async (refused: () => Promise<unknown>, code: ErrorCode, argument: string) => {
    const started = performance.now();
    const [a, b] = await Promise.allSettled([fx.buffers[0].dispatch(inputs[0].x, good(0)), refused()]);
    const ms = performance.now() - started;
    const e0 = (a as PromiseRejectedResult).reason, e1 = (b as PromiseRejectedResult).reason;
    assert.ok(e1 instanceof SwitchyardError && e1.code === code && e1.argument === argument, String(e1));
    assert.ok(e0 instanceof SwitchyardTimeoutError && e0.code === "PEER_FAILED", String(e0));
    assert.equal(e0.peerRank, 1);
    assert.match(e0.message, /rank 1 rejected its input for dispatch/);
    assert.ok(ms < timeoutMs / 2, `the peer failed after ${ms.toFixed(0)} ms, not at once`);
    const again = await fx.group.all((_, r) => fx.buffers[r].dispatch(inputs[r].x, good(r)));
    assert.ok(again.every((d) => d.numRecvTokens !== null && d.numRecvTokens > 0));
    for (const d of again) d[Symbol.dispose]();
  };
  await t.step(
    "refused by the library: an f32 x",
    () => round(() => fx.buffers[1].dispatch(inputs[1].xf, good(1)), "INVALID_ARGUMENT", "x"),
  );
  await t.step("refused by the binding: numExperts as a string", () =>
    round(
      () => fx.buffers[1].dispatch(inputs[1].x, { ...good(1), numExperts: "8" as unknown as number }),
      "INVALID_ARGUMENT",
      "numExperts",
    ));
  await t.step("refused by the binding: a disposed tensor, named", async () => {
    const gone = await Tensor.from(fx.group.ranks[1], new BigInt64Array(T * K), { shape: [T, K] });
    gone[Symbol.dispose]();
    await round(() => fx.buffers[1].dispatch(inputs[1].x, { ...good(1), topkIdx: gone }), "DISPOSED", "topkIdx");
  });
  await t.step("combine refused on one rank: the other fails at once, the next combine works", async () => {
    const sent = await fx.group.all((_, r) => fx.buffers[r].dispatch(inputs[r].x, good(r)));
    const started = performance.now();
    const [a, b] = await Promise.allSettled([
      fx.buffers[0].combine(sent[0].recvX, sent[0].handle).then((c) => c.combinedX.read()),
      fx.buffers[1].combine(inputs[1].x, sent[1].handle), // rows of x, not of the dispatch output
    ]);
    const e0 = (a as PromiseRejectedResult).reason, e1 = (b as PromiseRejectedResult).reason;
    assert.ok(e1 instanceof SwitchyardError && e1.argument === "x", String(e1));
    assert.ok(e0 instanceof SwitchyardError && e0.code === "PEER_FAILED", String(e0));
    assert.match(e0.message, /rank 1 rejected its input for combine/);
    assert.ok(performance.now() - started < timeoutMs / 2);
    const back = await fx.group.all(async (_, r) => {
      using c = await fx.buffers[r].combine(sent[r].recvX, sent[r].handle);
      return (await c.combinedX.read()).length;
    });
    assert.deepEqual(back, [T * H, T * H]);
    for (const d of sent) d[Symbol.dispose]();
  });
  await t.step("inputs are taken when the call is made: disposing them right after is safe", async () => {
    const results = await fx.group.all(async (rank, r) => {
      using x = await Tensor.from(rank, randomBF16(T * H, 10 + r), { shape: [T, H] });
      // Not awaited here: x is disposed when this function returns, before the call runs.
      return fx.buffers[r].dispatch(x, good(r));
    });
    assert.ok(results.every((d) => d.numRecvTokens !== null && d.numRecvTokens > 0));
    for (const d of results) d[Symbol.dispose]();
  });
  for (const i of inputs) for (const v of Object.values(i)) v[Symbol.dispose]();
});
