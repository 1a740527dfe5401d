/** Shared test fixtures: scenarios, their inputs, and uploading them to ranks. */

import assert from "node:assert/strict";

import {
  type EpBuffer,
  type EpBufferOptions,
  Group,
  randomFloats,
  randomRouting,
  type Rank,
  Rng,
  Tensor,
  toBF16,
} from "../mod.ts";
import type { RankInput, Shape } from "./reference.ts";
import { candidatePaths } from "../ffi/library.ts";

/** A dispatch scenario: every rank's tokens and routing. */
export interface Scenario {
  readonly ranks: number;
  readonly tokens: readonly number[];
  readonly hidden: number;
  readonly experts: number;
  readonly topk: number;
  readonly seed: number;
  readonly zipf?: number;
  readonly drop?: number;
  readonly fp8?: boolean;
  /** FP8 scales: packed UE8M0 words instead of f32. */
  readonly ue8m0?: boolean;
  /** FP8 scales stored column-major (stride 1 along tokens). */
  readonly columnMajorScales?: boolean;
  /** Route no token to the last rank. */
  readonly starveLastRank?: boolean;
  /** Route by an explicit token-in-rank matrix only (no top-k). */
  readonly routeWithoutTopk?: boolean;
  /** `x` rows padded by 16 bytes (a row stride larger than the row). */
  readonly paddedRows?: boolean;
  /** Virtual nodes of this many ranks (default: one node): the two-hop dispatch. */
  readonly ranksPerNode?: number;
}

/** The generated per-rank data, in host arrays. */
export interface ScenarioData {
  readonly shape: Shape;
  readonly inputs: RankInput[];
  readonly topkIdx: BigInt64Array[];
  readonly scaleCols: number;
}

/** Payload bytes per row. */
export function rowBytes(s: Scenario): number {
  return s.hidden * (s.fp8 ? 1 : 2);
}

/** Generates every rank's data for `s`. */
export function generate(s: Scenario): ScenarioData {
  const scaleCols = !s.fp8 ? 0 : s.ue8m0 ? Math.ceil(s.hidden / 512) : Math.ceil(s.hidden / 128);
  const perRank = s.experts / s.ranks;
  const usable = s.starveLastRank ? s.experts - perRank : s.experts;
  const inputs: RankInput[] = [];
  const topkIdx: BigInt64Array[] = [];
  for (let r = 0; r < s.ranks; r++) {
    const T = s.tokens[r];
    const routing = randomRouting({
      tokens: T,
      experts: usable,
      topk: s.topk,
      seed: s.seed * 1000 + r,
      zipf: s.zipf,
      dropProbability: s.drop,
    });
    topkIdx.push(routing.topkIdx);
    const rng = new Rng(s.seed * 7919 + r);
    let x: Uint8Array;
    if (s.fp8) {
      x = new Uint8Array(T * s.hidden);
      for (let i = 0; i < x.length; i++) x[i] = rng.int(256);
    } else {
      const bits = toBF16(randomFloats(T * s.hidden, s.seed * 31 + r));
      x = new Uint8Array(bits.buffer);
    }
    const scales = new Uint32Array(T * scaleCols);
    for (let i = 0; i < scales.length; i++) scales[i] = (rng.int(0x10000) << 16) | rng.int(0x10000);
    const topk = Array.from(routing.topkIdx, Number);
    let isTokenInRank: Uint8Array | undefined;
    if (s.routeWithoutTopk) {
      isTokenInRank = new Uint8Array(T * s.ranks);
      for (let i = 0; i < isTokenInRank.length; i++) isTokenInRank[i] = rng.next() < 0.4 ? 1 : 0;
    }
    inputs.push({
      tokens: T,
      x,
      scales: scaleCols ? scales : undefined,
      topk: s.routeWithoutTopk ? undefined : topk,
      weights: s.routeWithoutTopk ? undefined : routing.topkWeights,
      isTokenInRank,
    });
  }
  return {
    shape: {
      ranks: s.ranks,
      experts: s.experts,
      topk: s.routeWithoutTopk ? 0 : s.topk,
      rowBytes: rowBytes(s),
      scales: scaleCols,
    },
    inputs,
    topkIdx,
    scaleCols,
  };
}

/** One rank's inputs as tensors. */
export interface Uploaded extends Disposable {
  readonly x: Tensor;
  readonly scales?: Tensor;
  readonly topkIdx?: Tensor;
  readonly topkWeights?: Tensor;
  readonly isTokenInRank?: Tensor;
}

/** Uploads rank `r`'s inputs of `d` to `rank`. */
export async function upload(rank: Rank, s: Scenario, d: ScenarioData, r: number): Promise<Uploaded> {
  const input = d.inputs[r];
  const T = input.tokens;
  const data = s.fp8 ? input.x : new Uint16Array(input.x.buffer, input.x.byteOffset, T * s.hidden);
  const dtype = s.fp8 ? "fp8_e4m3" : "bf16";
  let x: Tensor;
  if (s.paddedRows) {
    // Rows start 16-byte aligned (the library requires it) but are further apart than a row.
    const stride = s.fp8 ? Math.ceil(s.hidden / 16) * 16 + 16 : s.hidden + 8;
    x = Tensor.empty(rank, { dtype, shape: [T, s.hidden], strides: [stride, 1] });
    await x.write(data);
  } else {
    x = await Tensor.from(rank, data, { dtype, shape: [T, s.hidden] });
  }
  let scales: Tensor | undefined;
  if (input.scales) {
    const dtype = s.ue8m0 ? "i32" : "f32";
    const strides = s.columnMajorScales ? [1, Math.max(T, 1)] : undefined;
    scales = Tensor.empty(rank, { dtype, shape: [T, d.scaleCols], strides });
    const data = s.ue8m0
      ? new Int32Array(input.scales.buffer.slice(0))
      : new Float32Array(input.scales.buffer.slice(0));
    await scales.write(data);
  }
  const topkIdx = input.topk ? await Tensor.from(rank, d.topkIdx[r], { shape: [T, s.topk] }) : undefined;
  const topkWeights = input.weights ? await Tensor.from(rank, input.weights, { shape: [T, s.topk] }) : undefined;
  const isTokenInRank = input.isTokenInRank
    ? await Tensor.from(rank, input.isTokenInRank, { dtype: "bool", shape: [T, s.ranks] })
    : undefined;
  return {
    x,
    scales,
    topkIdx,
    topkWeights,
    isTokenInRank,
    [Symbol.dispose]() {
      for (const t of [x, scales, topkIdx, topkWeights, isTokenInRank]) t?.[Symbol.dispose]();
    },
  };
}

/** A group with one buffer per rank; disposing releases all. */
export interface Fixture extends Disposable {
  readonly group: Group;
  readonly buffers: EpBuffer[];
}

/**
 * The backend the shared fixture runs on: the host backend, unless `SWITCHYARD_TEST_BACKEND`
 * says `cuda` (bench/gpu-check.sh runs the normal-mode suite that way on a GPU).
 */
export function testBackend(): "host" | "cuda" {
  const v = Deno.env.get("SWITCHYARD_TEST_BACKEND") ?? "host";
  if (v !== "host" && v !== "cuda") throw new Error(`SWITCHYARD_TEST_BACKEND: expected host or cuda, got ${v}`);
  return v;
}

/**
 * The nodes the shared fixture splits its groups into when a test does not say:
 * `SWITCHYARD_TEST_RANKS_PER_NODE=K` makes nodes of K ranks wherever K divides a group of more
 * than K ranks (the `host-nodes` pass of scripts/test.ts runs the normal-mode suite so); one node
 * otherwise.
 */
export function testRanksPerNode(ranks: number): number | undefined {
  const k = Number(Deno.env.get("SWITCHYARD_TEST_RANKS_PER_NODE") ?? 0);
  return Number.isInteger(k) && k > 0 && ranks > k && ranks % k === 0 ? k : undefined;
}

/**
 * The network rings' entries the shared fixture's buffers take: `SWITCHYARD_TEST_NETWORK_RING`
 * (the `host-nodes` pass of scripts/test.ts sets a few, so that the rings wrap and senders wait
 * for credit in every test), else the library's default.
 */
export function testNetworkRingEntries(): number | undefined {
  const n = Number(Deno.env.get("SWITCHYARD_TEST_NETWORK_RING") ?? 0);
  return Number.isInteger(n) && n > 0 ? n : undefined;
}

/**
 * Creates a group of `ranks` (on {@linkcode testBackend}, in nodes of `ranksPerNode`, by default
 * {@linkcode testRanksPerNode}'s) with
 * buffers sized for `maxTokens` tokens of `hidden`, and the `extra` buffer options (low-latency
 * mode, masking).
 */
export async function fixture(
  ranks: number,
  hidden: number,
  maxTokens: number,
  timeoutMs = 20000,
  extra: Omit<EpBufferOptions, "hidden" | "maxTokensPerRank"> = {},
  ranksPerNode?: number,
): Promise<Fixture> {
  const group = Group.local({
    ranks,
    backend: testBackend(),
    timeoutMs,
    ranksPerNode: ranksPerNode ?? testRanksPerNode(ranks),
  });
  const buffers = await group.createBuffers({
    networkRingEntries: testNetworkRingEntries(),
    ...extra,
    hidden,
    maxTokensPerRank: Math.max(maxTokens, 1),
  });
  return {
    group,
    buffers,
    [Symbol.dispose]() {
      for (const b of buffers) b[Symbol.dispose]();
      group[Symbol.dispose]();
    },
  };
}

/** An array of numbers as the comparisons below read it. */
type Numbers = ArrayLike<number> | ArrayLike<bigint>;

/**
 * Asserts that two arrays hold the same elements, naming how many differ and the first one.
 * (assert.deepEqual renders a diff of the whole array: for the megabytes a failing kernel
 * produces, that takes minutes and can exhaust the machine's memory.)
 */
export function assertSameArray(got: Numbers, want: Numbers, what = "arrays"): void {
  let first = -1, count = 0;
  const n = Math.max(got.length, want.length);
  for (let i = 0; i < n; i++) {
    if (i < got.length && i < want.length && Object.is(got[i], want[i])) continue;
    if (first < 0) first = i;
    count++;
  }
  if (count === 0) return;
  throw new assert.AssertionError({
    message: `${what}: ${count} of ${n} elements differ (lengths ${got.length} and ${want.length}); first at ` +
      `${first}: got ${String(got[first])}, want ${String(want[first])}`,
    actual: got[first],
    expected: want[first],
    operator: "assertSameArray",
  });
}

/** Bytes of a typed array, for bit-exact comparisons. */
export function bytesOf(a: ArrayBufferView): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/** Random BF16 bits, seeded. */
export function randomBF16(n: number, seed: number, scale = 1): Uint16Array {
  return toBF16(randomFloats(n, seed, scale));
}

/**
 * Values whose float32 sum depends on the order of addition, for every test of a reduction:
 * one in eight is exactly +-2^20 or +-2^12, the rest are normal samples. A small value added
 * after a large one loses its low bits (the float32 step at 2^20 is 1/8), and a large pair of
 * opposite signs cancels exactly, so the lost bits show in the BF16 result. (Values in [-1, 1)
 * alone sum exactly in float32 in any order: such data cannot tell one order from another.)
 */
export function orderSensitiveFloats(n: number, seed: number): Float32Array {
  const rng = new Rng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const pick = rng.int(16);
    out[i] = pick === 0
      ? 2 ** 20
      : pick === 1
      ? -(2 ** 20)
      : pick === 2
      ? 2 ** 12
      : pick === 3
      ? -(2 ** 12)
      : rng.normal();
  }
  return out;
}

/** {@linkcode orderSensitiveFloats} as BF16 bits. */
export function orderSensitiveBF16(n: number, seed: number): Uint16Array {
  return toBF16(orderSensitiveFloats(n, seed));
}

/**
 * The payload rows of an expanded dispatch with the padding rows (no owner) zeroed, as the
 * reference has them: without `zeroPadding` their payload is not defined (outputs are not
 * zero-filled when allocated), so only the rows that hold a token are compared.
 */
export function paddingZeroed(
  x: Uint8Array,
  rowOwner: readonly (unknown | null)[],
  rowBytes: number,
): Uint8Array {
  const out = x.slice();
  rowOwner.forEach((owner, row) => {
    if (owner === null) out.fill(0, row * rowBytes, (row + 1) * rowBytes);
  });
  return out;
}

/** The path of `name` in the folder of the library under test (where CMake builds the native tests). */
export function besideLibrary(name: string): string {
  return `${candidatePaths()[0].replace(/[^/]*$/, "")}${name}`;
}

/** The software ibverbs NIC (tests/native/soft_verbs.cpp), built beside the library. */
export const softVerbsLibrary = (): string => besideLibrary("libsoft_verbs.so");

/** Whether the software ibverbs NIC was built. */
export function softVerbsBuilt(): boolean {
  try {
    return Deno.statSync(softVerbsLibrary()).isFile;
  } catch {
    return false;
  }
}

/**
 * Runs a native test program built next to the library under test (CMakeLists.txt) and returns
 * its output; fails the test if it exits with a failure.
 */
export async function nativeProgram(
  name: string,
  args: string[] = [],
  env: Record<string, string> = {},
): Promise<string> {
  const binary = besideLibrary(name);
  const out = await new Deno.Command(binary, { args, env, stdout: "piped", stderr: "piped" }).output().catch((e) => {
    throw new Error(`${binary}: ${e.message}; build it with 'deno task build'`);
  });
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.ok(out.success, text);
  return text;
}
