/**
 * Element types, their sizes and the typed arrays that hold them on the JS side, plus host-side
 * conversions that use the library's own rounding rules.
 *
 * @module
 */

import { SwitchyardError } from "./errors.ts";
import { check, native } from "./native.ts";

/** An element type. `bf16` and `fp8_e4m3` are held as raw bits (Uint16Array / Uint8Array). */
export type DType = "bf16" | "fp8_e4m3" | "f32" | "i32" | "i64" | "bool";

/** The typed array that holds each dtype's elements. */
export interface DTypeArray {
  /** Raw BF16 bits. */
  bf16: Uint16Array;
  /** Raw FP8 E4M3 bits. */
  fp8_e4m3: Uint8Array;
  /** 32-bit floats. */
  f32: Float32Array;
  /** 32-bit integers. */
  i32: Int32Array;
  /** 64-bit integers. */
  i64: BigInt64Array;
  /** 0 or 1 per element. */
  bool: Uint8Array;
}

/** Any typed array a tensor can be filled from or read into. */
export type TensorArray = DTypeArray[DType];

const CODES: Record<DType, number> = { bf16: 1, fp8_e4m3: 2, f32: 3, i32: 4, i64: 5, bool: 6 };
const SIZES: Record<DType, number> = { bf16: 2, fp8_e4m3: 1, f32: 4, i32: 4, i64: 8, bool: 1 };
const NAMES: readonly DType[] = ["bf16", "fp8_e4m3", "f32", "i32", "i64", "bool"];

/** The `sy_dtype` code of a dtype. */
export function dtypeCode(dtype: DType): number {
  return CODES[dtype];
}

/** The dtype of a `sy_dtype` code. */
export function dtypeFromCode(code: number): DType {
  const d = NAMES[code - 1];
  if (!d) throw new SwitchyardError("INTERNAL", `unknown dtype code ${code}`);
  return d;
}

/** Bytes per element. */
export function dtypeSize(dtype: DType): number {
  return SIZES[dtype];
}

/** Whether `value` names a dtype. */
export function isDType(value: unknown): value is DType {
  return typeof value === "string" && value in CODES;
}

/** A new zeroed array for `n` elements of `dtype`. */
export function newArray<D extends DType>(dtype: D, n: number): DTypeArray[D] {
  switch (dtype) {
    case "bf16":
      return new Uint16Array(n) as DTypeArray[D];
    case "f32":
      return new Float32Array(n) as DTypeArray[D];
    case "i32":
      return new Int32Array(n) as DTypeArray[D];
    case "i64":
      return new BigInt64Array(n) as DTypeArray[D];
    default:
      return new Uint8Array(n) as DTypeArray[D];
  }
}

/** The dtype a typed array implies, when it implies exactly one. */
export function impliedDType(array: ArrayBufferView): DType | undefined {
  if (array instanceof Float32Array) return "f32";
  if (array instanceof Int32Array) return "i32";
  if (array instanceof BigInt64Array) return "i64";
  if (array instanceof Uint16Array) return "bf16";
  return undefined;
}

/** Whether `array` is the typed array kind that holds `dtype`. */
export function arrayFits(dtype: DType, array: ArrayBufferView): boolean {
  switch (dtype) {
    case "bf16":
      return array instanceof Uint16Array;
    case "f32":
      return array instanceof Float32Array;
    case "i32":
      return array instanceof Int32Array;
    case "i64":
      return array instanceof BigInt64Array;
    default:
      return array instanceof Uint8Array;
  }
}

function convert(from: DType, src: ArrayBufferView, to: DType, dst: ArrayBufferView, n: number): void {
  check(native().sy_convert(dtypeCode(from), src, dtypeCode(to), dst, BigInt(n)), null, "convert");
}

/** Rounds floats to BF16 (nearest, ties to even; NaN stays NaN). */
export function toBF16(values: Float32Array): Uint16Array {
  const out = new Uint16Array(values.length);
  if (values.length) convert("f32", values, "bf16", out, values.length);
  return out;
}

/** Widens BF16 bits to floats (exact). */
export function fromBF16(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  if (bits.length) convert("bf16", bits, "f32", out, bits.length);
  return out;
}

/** Rounds floats to FP8 E4M3 (nearest, ties to even; saturating at +-448; NaN to 0x7f). */
export function toFP8E4M3(values: Float32Array): Uint8Array {
  const out = new Uint8Array(values.length);
  if (values.length) convert("f32", values, "fp8_e4m3", out, values.length);
  return out;
}

/** Widens FP8 E4M3 bits to floats (exact). */
export function fromFP8E4M3(bits: Uint8Array): Float32Array {
  const out = new Float32Array(bits.length);
  if (bits.length) convert("fp8_e4m3", bits, "f32", out, bits.length);
  return out;
}
