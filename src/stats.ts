/**
 * Summaries of measurements: percentiles, imbalance and the spread across ranks, computed one
 * way everywhere (the benchmark, the demo, and users' own timing loops).
 *
 * @module
 */

import { SwitchyardError } from "./errors.ts";

/** Order statistics of a sample. */
export interface Summary {
  /** Number of values. */
  readonly count: number;
  /** Smallest value. */
  readonly min: number;
  /** Arithmetic mean. */
  readonly mean: number;
  /** 50th percentile. */
  readonly median: number;
  /** 90th percentile. */
  readonly p90: number;
  /** 99th percentile. */
  readonly p99: number;
  /** Largest value. */
  readonly max: number;
}

function finiteValues(values: ArrayLike<number>, what: string): number[] {
  const xs = Array.from(values);
  if (xs.length === 0) throw new SwitchyardError("INVALID_ARGUMENT", `${what}: no values`);
  for (const x of xs) {
    if (!Number.isFinite(x)) throw new SwitchyardError("INVALID_ARGUMENT", `${what}: ${x} is not a finite number`);
  }
  return xs;
}

/**
 * The `q` quantile (0 <= q <= 1) of `values`, interpolated linearly between the two nearest
 * order statistics (rank `q * (n - 1)`, as NumPy's default and R's type 7), so the median of an
 * even count is the mean of the middle two.
 */
export function quantile(values: ArrayLike<number>, q: number): number {
  if (!(q >= 0 && q <= 1)) throw new SwitchyardError("INVALID_ARGUMENT", `q: expected 0 <= q <= 1, got ${q}`);
  const xs = finiteValues(values, "values").sort((a, b) => a - b);
  return quantileOfSorted(xs, q);
}

function quantileOfSorted(xs: number[], q: number): number {
  const at = q * (xs.length - 1);
  const lo = Math.floor(at), hi = Math.ceil(at);
  return xs[lo] + (xs[hi] - xs[lo]) * (at - lo);
}

/** Count, min, mean, median, p90, p99 and max of `values` (at least one, all finite). */
export function summarize(values: ArrayLike<number>): Summary {
  const xs = finiteValues(values, "values").sort((a, b) => a - b);
  let sum = 0;
  for (const x of xs) sum += x;
  return {
    count: xs.length,
    min: xs[0],
    mean: sum / xs.length,
    median: quantileOfSorted(xs, 0.5),
    p90: quantileOfSorted(xs, 0.9),
    p99: quantileOfSorted(xs, 0.99),
    max: xs[xs.length - 1],
  };
}

/**
 * Load imbalance, max / mean: 1 when every rank (or expert) gets the same, `n` when one gets
 * everything. 1 for all zeros.
 */
export function imbalance(values: ArrayLike<number>): number {
  const xs = finiteValues(values, "values");
  const mean = xs.reduce((a, b) => a + b, 0) / xs.length;
  return mean === 0 ? 1 : Math.max(...xs) / mean;
}

/**
 * The straggler cost, max / median: how much longer the slowest rank took than the typical one
 * (a collective finishes with its slowest rank). 1 when the median is 0 and so is the max.
 */
export function spread(values: ArrayLike<number>): number {
  const xs = finiteValues(values, "values");
  const median = quantile(xs, 0.5), max = Math.max(...xs);
  if (median === 0) return max === 0 ? 1 : Infinity;
  return max / median;
}
