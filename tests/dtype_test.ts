/**
 * The conversions the library performs (core/dtype.h) against the independent reference and
 * against hand-computed values, bit for bit.
 */

import assert from "node:assert/strict";
import { fromBF16, fromFP8E4M3, randomFloats, Rng, toBF16, toFP8E4M3 } from "../mod.ts";
import { bf16Round, bf16Value, fp8Round, fp8Value } from "./reference.ts";

function hex(v: number): string {
  return "0x" + v.toString(16).padStart(2, "0");
}

Deno.test("BF16: every encoding widens exactly", () => {
  const bits = new Uint16Array(65536).map((_, i) => i);
  const got = fromBF16(bits);
  for (let i = 0; i < 65536; i++) {
    const want = bf16Value(i);
    if (Number.isNaN(want)) assert.ok(Number.isNaN(got[i]), hex(i));
    else assert.ok(Object.is(got[i], want), `${hex(i)}: ${got[i]} vs ${want}`);
  }
});

Deno.test("BF16: rounding to nearest even matches the reference", () => {
  const special = [
    0,
    -0,
    1,
    -1,
    Infinity,
    -Infinity,
    NaN,
    3.4028234663852886e38,
    -3.4028234663852886e38,
    1e-40,
    -1e-45,
  ];
  // Exact ties: the midpoint between two neighbouring BF16 values.
  const ties = [1 + 2 ** -8, 1 + 3 * 2 ** -8, -(2 + 2 ** -7), 3.3961775292304957e38];
  const rng = new Rng(99);
  const random = Array.from({ length: 20000 }, () => {
    const f = new Float32Array(1);
    new Uint32Array(f.buffer)[0] = (rng.int(65536) << 16 | rng.int(65536)) >>> 0;
    return f[0];
  });
  const values = new Float32Array([...special, ...ties, ...random, ...randomFloats(5000, 7)]);
  const got = toBF16(values);
  for (let i = 0; i < values.length; i++) {
    assert.equal(got[i], bf16Round(values[i]), `${values[i]}: ${hex(got[i])} vs ${hex(bf16Round(values[i]))}`);
  }
  // By hand: 1 + 2^-8 is halfway between 1 (0x3f80) and 1 + 2^-7 (0x3f81): ties to even.
  assert.deepEqual(Array.from(toBF16(new Float32Array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1.5, Infinity]))), [
    0x3f80,
    0x3f82,
    0x3fc0,
    0x7f80,
  ]);
  assert.ok(Number.isNaN(bf16Value(toBF16(new Float32Array([NaN]))[0])), "NaN stays NaN");
});

Deno.test("FP8 E4M3: every encoding widens exactly", () => {
  const got = fromFP8E4M3(new Uint8Array(256).map((_, i) => i));
  for (let i = 0; i < 256; i++) {
    const want = fp8Value(i);
    if (Number.isNaN(want)) assert.ok(Number.isNaN(got[i]), hex(i));
    else assert.ok(Object.is(got[i], want) || (got[i] === 0 && want === 0), `${hex(i)}: ${got[i]} vs ${want}`);
  }
  assert.equal(fromFP8E4M3(new Uint8Array([0x7e]))[0], 448);
  assert.equal(fromFP8E4M3(new Uint8Array([0x01]))[0], 2 ** -9);
});

Deno.test("FP8 E4M3: hand-computed roundings", () => {
  const cases: [number, number][] = [
    [0, 0x00],
    [-0, 0x80],
    [1, 0x38], // 2^0: exponent 7, mantissa 0
    [1.0625, 0x38], // halfway between 1 and 1.125: even mantissa (0)
    [1.1875, 0x3a], // halfway between 1.125 and 1.25: even mantissa (2)
    [448, 0x7e], // the largest finite value
    [-448, 0xfe],
    [449, 0x7e], // saturates
    [464, 0x7e], // halfway to the (NaN) next code: saturates
    [1e9, 0x7e],
    [Infinity, 0x7e],
    [-Infinity, 0xfe],
    [NaN, 0x7f],
    [2 ** -6, 0x08], // smallest normal
    [2 ** -9, 0x01], // smallest subnormal
    [2 ** -10, 0x00], // halfway between 0 and 2^-9: even (0)
    [3 * 2 ** -10, 0x02], // halfway between 1 and 2 units: even (2)
    [7.5 * 2 ** -9, 0x08], // halfway between the largest subnormal and the smallest normal: even
    [1e-30, 0x00],
    [0.1, 0x1d], // 0.1015625 is the nearest
  ];
  const got = toFP8E4M3(new Float32Array(cases.map(([v]) => v)));
  cases.forEach(([v, want], i) => assert.equal(got[i], want, `${v}: ${hex(got[i])} vs ${hex(want)}`));
});

Deno.test("FP8 E4M3: every rounding boundary, its neighbours in float32, both signs", () => {
  // Each pair of adjacent finite codes has a midpoint where ties go to even; the float32 values
  // one unit either side of it must round down and up. Covers the subnormal range, the switch to
  // normals, every exponent's carry into the next, and the top of the range.
  const f = new Float32Array(1), bits = new Uint32Array(f.buffer);
  const near = (v: number, units: number) => {
    f[0] = v;
    bits[0] += units;
    return f[0];
  };
  const values: number[] = [];
  for (let code = 0; code < 0x7e; code++) {
    const mid = (fp8Value(code) + fp8Value(code + 1)) / 2; // exact in float32
    for (const units of [-1, 0, 1]) values.push(near(mid, units), -near(mid, units));
  }
  const got = toFP8E4M3(new Float32Array(values));
  values.forEach((v, i) => assert.equal(got[i], fp8Round(v), `${v}: ${hex(got[i])} vs ${hex(fp8Round(v))}`));
});

Deno.test("FP8 E4M3: rounding matches the reference across the range", () => {
  const rng = new Rng(5);
  const values = new Float32Array(30000);
  for (let i = 0; i < values.length; i++) values[i] = (rng.next() - 0.5) * 2 ** (rng.int(30) - 14);
  const got = toFP8E4M3(values);
  for (let i = 0; i < values.length; i++) {
    assert.equal(got[i], fp8Round(values[i]), `${values[i]}: ${hex(got[i])} vs ${hex(fp8Round(values[i]))}`);
  }
});
