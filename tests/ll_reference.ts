/**
 * An independent reference of the low-latency semantics: FP8 quantisation per 128 channels,
 * the per-expert receive layout, LogFMT-10, and the weighted combine. Plain arithmetic in
 * doubles rounded to float32 where the library computes in float32; no code from `csrc/`.
 */

import { addF32, bf16Round, bf16Value, fp8Round, fp8Value } from "./reference.ts";

/** The smallest power of two >= v (v > 0), by doubling and halving. */
export function pow2AtLeast(v: number): number {
  let p = 1;
  while (p < v) p *= 2;
  while (p / 2 >= v) p /= 2;
  return p;
}

/** One 128-channel block quantised: FP8 codes and the dequantisation scale. */
export function quantizeBlock(bits: ArrayLike<number>, roundScale: boolean): { codes: number[]; scaleInv: number } {
  let amax = 0;
  for (let i = 0; i < bits.length; i++) {
    const v = Math.abs(bf16Value(bits[i]));
    if (v > amax) amax = v; // NaN never compares greater
  }
  const a = Math.max(amax, Math.fround(1e-4));
  let scale: number, scaleInv: number;
  if (roundScale) {
    scaleInv = pow2AtLeast(Math.fround(a / 448));
    scale = 1 / scaleInv;
  } else {
    scale = Math.fround(448 / a);
    scaleInv = Math.fround(a / 448);
  }
  const codes = Array.from(bits, (b) => fp8Round(Math.fround(bf16Value(b) * scale)));
  return { codes, scaleInv };
}

/** What one rank receives for one local expert. */
export interface ExpertExpectation {
  /** (source rank, token) of each received row, sources ascending, then token order. */
  readonly rows: { src: number; token: number }[];
  /** Per source rank: [begin, count]. */
  readonly ranges: [number, number][];
}

/** Every rank's receive layout: `[rank][local expert]`. Masked ranks send and receive nothing. */
export function llLayout(
  topk: readonly (readonly number[])[],
  tokens: readonly number[],
  k: number,
  experts: number,
  masked: ReadonlySet<number> = new Set(),
): ExpertExpectation[][] {
  const R = tokens.length, EL = experts / R;
  return Array.from({ length: R }, (_, me) =>
    Array.from({ length: EL }, (_, l) => {
      const e = me * EL + l;
      const rows: { src: number; token: number }[] = [];
      const ranges: [number, number][] = [];
      for (let s = 0; s < R; s++) {
        const begin = rows.length;
        if (!masked.has(s) && !masked.has(me)) {
          for (let t = 0; t < tokens[s]; t++) {
            for (let j = 0; j < k; j++) if (topk[s][t * k + j] === e) rows.push({ src: s, token: t });
          }
        }
        ranges.push([begin, rows.length - begin]);
      }
      return { rows, ranges };
    }));
}

/** LogFMT-10 round trip of a 128-channel block of BF16 bits (the format of core/logfmt.h). */
export function logfmtRoundTrip(block: ArrayLike<number>): number[] {
  const mags = Array.from(block, (b) => b & 0x7fff);
  const mMax = Math.max(...mags);
  if (mMax >= 0x3f80) return Array.from(block); // |v| >= 1 somewhere (or inf/NaN): BF16 fallback
  const nonzero = mags.filter((m) => m !== 0);
  // At most 16 binades (16 * 128 magnitude steps) below the largest value.
  const mMin = nonzero.length ? Math.max(Math.min(...nonzero), mMax - 2048) : 0;
  const step = Math.max(1, Math.ceil((mMax - (mMax === 0 ? 0 : mMin)) / 510));
  return Array.from(block, (b) => {
    const m = b & 0x7fff;
    if (m === 0 || m < mMin) return b & 0x8000;
    const q = Math.min(511, 1 + Math.floor((m - mMin + Math.floor(step / 2)) / step));
    return (b & 0x8000) | ((mMin + (q - 1) * step) & 0x7fff);
  });
}

/**
 * Low-latency combine for rank `me`: out[t] = sum over valid top-k entries, in order, of
 * w * y, each product and sum rounded to float32; one BF16 rounding. `row(e, t)` returns the
 * BF16 row expert `e` sent back for this rank's token `t`.
 */
export function llCombine(
  topk: readonly number[],
  weights: Float32Array,
  tokens: number,
  k: number,
  hidden: number,
  ownerMasked: (expert: number) => boolean,
  row: (expert: number, token: number) => ArrayLike<number>,
): Uint16Array {
  const out = new Uint16Array(tokens * hidden);
  for (let t = 0; t < tokens; t++) {
    const acc = new Float32Array(hidden);
    for (let j = 0; j < k; j++) {
      const e = topk[t * k + j];
      if (e < 0 || ownerMasked(e)) continue;
      const w = weights[t * k + j];
      const y = row(e, t);
      for (let c = 0; c < hidden; c++) acc[c] = addF32(acc[c], Math.fround(w * bf16Value(y[c])));
    }
    for (let c = 0; c < hidden; c++) out[t * hidden + c] = bf16Round(acc[c]);
  }
  return out;
}

export { fp8Value };
