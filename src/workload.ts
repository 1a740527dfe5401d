/**
 * Workload generators: seeded top-k routings (uniform, Zipf-skewed, with dropped entries) and
 * payloads, for demos, benchmarks and tests of MoE routing code.
 *
 * @module
 */

import { SwitchyardError } from "./errors.ts";

/** A small, fast, seeded generator (SplitMix32-style); same seed, same sequence. */
export class Rng {
  #state: number;

  /** Seeds the generator. */
  constructor(seed: number) {
    this.#state = seed >>> 0;
  }

  /** A uniform float in [0, 1). */
  next(): number {
    let z = (this.#state = (this.#state + 0x9e3779b9) >>> 0);
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return ((z ^ (z >>> 16)) >>> 0) / 4294967296;
  }

  /** A uniform integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  /** A standard normal sample (Box-Muller). */
  normal(): number {
    const u = 1 - this.next();
    const v = this.next();
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
  }
}

/** What {@linkcode randomRouting} generates. */
export interface RoutingSpec {
  /** Tokens to route. */
  readonly tokens: number;
  /** Experts in total. */
  readonly experts: number;
  /** Experts per token (distinct). */
  readonly topk: number;
  /** Seed of the generator. */
  readonly seed: number;
  /** Zipf exponent of expert popularity; 0 (default) is uniform. */
  readonly zipf?: number;
  /** Probability that a top-k entry is dropped (-1). */
  readonly dropProbability?: number;
}

/** A top-k routing: `[tokens, topk]` expert ids (-1 = none) and weights. */
export interface Routing {
  /** Expert ids, row-major `[tokens, topk]`. */
  readonly topkIdx: BigInt64Array;
  /** Weights, row-major `[tokens, topk]`, positive, summing to 1 per token before drops. */
  readonly topkWeights: Float32Array;
}

/**
 * Draws every token's top-k distinct experts, uniformly or by Zipf popularity (the most popular
 * expert is a random one, so skew does not always hit rank 0).
 */
export function randomRouting(spec: RoutingSpec): Routing {
  const { tokens, experts, topk, seed } = spec;
  if (topk > experts) {
    throw new SwitchyardError("INVALID_ARGUMENT", `topk: ${topk} distinct experts out of ${experts} is impossible`, {
      argument: "topk",
    });
  }
  const rng = new Rng(seed);
  const s = spec.zipf ?? 0;
  const order = Array.from({ length: experts }, (_, i) => i);
  for (let i = experts - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  const cumulative = new Float64Array(experts);
  let total = 0;
  for (let i = 0; i < experts; i++) {
    total += s === 0 ? 1 : 1 / Math.pow(i + 1, s);
    cumulative[i] = total;
  }
  const draw = (): number => {
    const u = rng.next() * total;
    let lo = 0, hi = experts - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (cumulative[mid] > u) hi = mid;
      else lo = mid + 1;
    }
    return order[lo];
  };
  const topkIdx = new BigInt64Array(tokens * topk);
  const topkWeights = new Float32Array(tokens * topk);
  const chosen = new Set<number>();
  for (let t = 0; t < tokens; t++) {
    chosen.clear();
    // Rejection keeps the draw exact; with heavy skew fall back to any unused expert.
    let tries = 0;
    while (chosen.size < topk) {
      const e = tries++ < 64 * topk ? draw() : rng.int(experts);
      chosen.add(e);
    }
    let k = 0;
    let sum = 0;
    for (const e of chosen) {
      topkIdx[t * topk + k] = BigInt(e);
      const w = 0.1 + rng.next();
      topkWeights[t * topk + k] = w;
      sum += w;
      k++;
    }
    for (let j = 0; j < topk; j++) {
      topkWeights[t * topk + j] /= sum;
      if (spec.dropProbability && rng.next() < spec.dropProbability) topkIdx[t * topk + j] = -1n;
    }
  }
  return { topkIdx, topkWeights };
}

/** `n` normal samples scaled by `scale`. */
export function randomFloats(n: number, seed: number, scale = 1): Float32Array {
  const rng = new Rng(seed);
  const out = new Float32Array(n);
  // Marsaglia's polar method: two samples per accepted pair, no trigonometry. A demo's payload
  // is millions of samples, where Box-Muller's log, root and cosine per sample took a second.
  for (let i = 0; i < n;) {
    const u = 2 * rng.next() - 1, v = 2 * rng.next() - 1, s = u * u + v * v;
    if (s >= 1 || s === 0) continue;
    const m = Math.sqrt(-2 * Math.log(s) / s) * scale;
    out[i++] = u * m;
    if (i < n) out[i++] = v * m;
  }
  return out;
}
