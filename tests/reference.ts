/**
 * An independent reference for the tests: the normal-mode semantics (DESIGN.md §4) written
 * plainly in TypeScript, without the library. It shares no code with `csrc/`; where the library
 * uses bit tricks, it searches or compares values in double precision.
 */

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** The float value of BF16 bits. */
export function bf16Value(bits: number): number {
  u32[0] = (bits & 0xffff) << 16;
  return f32[0];
}

/** Nearest BF16 to `value` (a float32), ties to the even encoding; NaN stays NaN. */
export function bf16Round(value: number): number {
  f32[0] = value;
  const v = f32[0]; // the float32 value (bf16Value below reuses the scratch)
  const bits = u32[0];
  if (Number.isNaN(v)) return ((bits >>> 16) | 0x40) & 0xffff;
  const lower = bits >>> 16;
  if ((bits & 0xffff) === 0) return lower;
  const upper = (lower + 1) & 0xffff;
  // Past the largest finite BF16 the next step is infinity, which rounds like 2^128 would.
  let high = bf16Value(upper);
  if (!Number.isFinite(high)) high = Math.sign(v) * 2 ** 128;
  // Distances in double: exact for values this close together.
  const dLow = Math.abs(v - bf16Value(lower));
  const dHigh = Math.abs(high - v);
  if (dLow < dHigh) return lower;
  if (dHigh < dLow) return upper;
  return (lower & 1) === 0 ? lower : upper;
}

/** Float value of FP8 E4M3 bits (the "fn" variant: no infinity, 0x7f/0xff NaN). */
export function fp8Value(bits: number): number {
  const sign = bits & 0x80 ? -1 : 1;
  const e = (bits >> 3) & 0xf;
  const m = bits & 0x7;
  if (e === 0xf && m === 0x7) return NaN;
  if (e === 0) return sign * m * 2 ** -9;
  return sign * (1 + m / 8) * 2 ** (e - 7);
}

const FP8_POSITIVE = Array.from({ length: 0x7f }, (_, i) => fp8Value(i)); // codes 0..0x7e, increasing

/** Nearest FP8 E4M3 to `value`, ties to the even code, saturating at +-448, NaN to 0x7f. */
export function fp8Round(value: number): number {
  if (Number.isNaN(value)) return 0x7f;
  const sign = value < 0 || Object.is(value, -0) ? 0x80 : 0;
  const a = Math.abs(value);
  if (a >= 448) return sign | 0x7e;
  let lo = 0, hi = FP8_POSITIVE.length - 1;
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (FP8_POSITIVE[mid] <= a) lo = mid;
    else hi = mid;
  }
  const dLo = a - FP8_POSITIVE[lo], dHi = FP8_POSITIVE[hi] - a;
  const code = dLo < dHi ? lo : dHi < dLo ? hi : (lo % 2 === 0 ? lo : hi);
  return sign | code;
}

/** Adds in float32, like the library's accumulators. */
export function addF32(acc: number, v: number): number {
  return Math.fround(acc + v);
}

/** DeepEP's calc_diff: 1 - 2 sum(xy) / sum(x^2 + y^2) over x+1, y+1, in double. */
export function calcDiff(x: ArrayLike<number>, y: ArrayLike<number>): number {
  let num = 0, den = 0;
  for (let i = 0; i < x.length; i++) {
    const a = x[i] + 1, b = y[i] + 1;
    num += a * b;
    den += a * a + b * b;
  }
  return den === 0 ? 0 : 1 - (2 * num) / den;
}

/** One rank's dispatch input, as the tests generate it. */
export interface RankInput {
  /** Tokens. */
  readonly tokens: number;
  /** Raw payload rows, `tokens * rowBytes` bytes. */
  readonly x: Uint8Array;
  /** Raw 4-byte scale words, `[tokens, S]` row-major (FP8 only). */
  readonly scales?: Uint32Array;
  /** `[tokens, K]` expert ids, -1 = none (absent: routing only by isTokenInRank). */
  readonly topk?: readonly number[];
  /** `[tokens, K]` weights. */
  readonly weights?: Float32Array;
  /** `[tokens, R]` explicit destinations (0/1); overrides the top-k owners. */
  readonly isTokenInRank?: Uint8Array;
}

/** The problem shape shared by all ranks. */
export interface Shape {
  readonly ranks: number;
  readonly experts: number;
  readonly topk: number;
  readonly rowBytes: number;
  readonly scales: number;
}

/** Layout of one rank's top-k: tokens per rank (deduplicated), per expert, token-in-rank. */
export function referenceLayout(
  topk: readonly number[],
  tokens: number,
  k: number,
  experts: number,
  ranks: number,
  ranksPerNode = ranks,
) {
  const nodes = ranks / ranksPerNode;
  const perRank = new Array<number>(ranks).fill(0);
  const perExpert = new Array<number>(experts).fill(0);
  const perNode = new Array<number>(nodes).fill(0);
  const inRank = new Uint8Array(tokens * ranks);
  const inNode = new Uint8Array(tokens * nodes);
  const perRankExperts = experts / ranks;
  for (let t = 0; t < tokens; t++) {
    const hit = new Set<number>();
    for (let j = 0; j < k; j++) {
      const e = topk[t * k + j];
      if (e < 0) continue;
      perExpert[e]++;
      hit.add(Math.floor(e / perRankExperts));
    }
    for (const r of hit) {
      perRank[r]++;
      inRank[t * ranks + r] = 1;
    }
    for (const n of new Set([...hit].map((r) => Math.floor(r / ranksPerNode)))) {
      perNode[n]++;
      inNode[t * nodes + n] = 1;
    }
  }
  return { perRank, perExpert, inRank, perNode, inNode };
}

/** The ranks token `t` of `input` goes to, ascending. */
export function destinations(input: RankInput, t: number, shape: Shape): number[] {
  const out: number[] = [];
  if (input.isTokenInRank) {
    for (let r = 0; r < shape.ranks; r++) if (input.isTokenInRank[t * shape.ranks + r]) out.push(r);
    return out;
  }
  const perRank = shape.experts / shape.ranks;
  for (let r = 0; r < shape.ranks; r++) {
    for (let j = 0; j < shape.topk; j++) {
      const e = input.topk![t * shape.topk + j];
      if (e >= 0 && Math.floor(e / perRank) === r) {
        out.push(r);
        break;
      }
    }
  }
  return out;
}

/** One received row of the compact layout. */
export interface RecvRow {
  readonly src: number;
  readonly token: number;
}

/** What one rank receives in the compact layout. */
export interface CompactExpectation {
  readonly rows: RecvRow[];
  readonly x: Uint8Array;
  readonly scales: Uint32Array;
  /** `[rows, K]` local ids or -1. */
  readonly topkLocal: number[];
  /** `[rows, K]`, 0 where not local. */
  readonly weights: Float32Array;
  /** Received tokens per local expert (not aligned). */
  readonly perExpert: number[];
  /** `[R, R]` inclusive prefix over source ranks of tokens sent to each rank. */
  readonly rankPrefix: number[];
}

/** Every rank's compact dispatch result: sources ascending, each source's tokens in order. */
export function referenceDispatch(inputs: readonly RankInput[], shape: Shape): CompactExpectation[] {
  const { ranks: R, topk: K, rowBytes, scales: S } = shape;
  const perRankExperts = shape.experts / R;
  const sent: number[][] = inputs.map((input) => {
    const counts = new Array<number>(R).fill(0);
    for (let t = 0; t < input.tokens; t++) for (const d of destinations(input, t, shape)) counts[d]++;
    return counts;
  });
  const rankPrefix = new Array<number>(R * R).fill(0);
  for (let j = 0; j < R; j++) {
    let acc = 0;
    for (let i = 0; i < R; i++) rankPrefix[i * R + j] = acc += sent[i][j];
  }
  return Array.from({ length: R }, (_, me) => {
    const rows: RecvRow[] = [];
    for (let s = 0; s < R; s++) {
      for (let t = 0; t < inputs[s].tokens; t++) {
        if (destinations(inputs[s], t, shape).includes(me)) rows.push({ src: s, token: t });
      }
    }
    const x = new Uint8Array(rows.length * rowBytes);
    const scales = new Uint32Array(rows.length * S);
    const topkLocal: number[] = [];
    const weights = new Float32Array(rows.length * K);
    const perExpert = new Array<number>(perRankExperts).fill(0);
    rows.forEach(({ src, token }, n) => {
      const input = inputs[src];
      x.set(input.x.subarray(token * rowBytes, (token + 1) * rowBytes), n * rowBytes);
      if (S) scales.set(input.scales!.subarray(token * S, (token + 1) * S), n * S);
      for (let j = 0; j < K && input.topk; j++) {
        const e = input.topk[token * K + j];
        const local = e >= 0 && Math.floor(e / perRankExperts) === me ? e - me * perRankExperts : -1;
        topkLocal.push(local);
        weights[n * K + j] = local >= 0 ? input.weights![token * K + j] : 0;
        if (local >= 0) perExpert[local]++;
      }
    });
    return { rows, x, scales, topkLocal, weights, perExpert, rankPrefix };
  });
}

/** What one rank receives in the expanded layout. */
export interface ExpandedExpectation {
  /** Rows in use (groups padded to the alignment). */
  readonly numRows: number;
  /** `(token, k)` of each used row, or null for padding. */
  readonly rowOwner: ({ n: number; k: number } | null)[];
  readonly x: Uint8Array;
  readonly scales: Uint32Array;
  readonly weights: Float32Array;
  /** `[N, K]` row of each (received token, top-k entry), -1 if not local. */
  readonly expandedRow: number[];
  readonly perExpertAligned: number[];
}

/** The expanded layout of one rank's compact expectation. */
export function referenceExpanded(c: CompactExpectation, shape: Shape, alignment: number): ExpandedExpectation {
  const { topk: K, rowBytes, scales: S } = shape;
  const E = shape.experts / shape.ranks;
  const groups: { n: number; k: number }[][] = Array.from({ length: E }, () => []);
  c.rows.forEach((_, n) => {
    for (let k = 0; k < K; k++) {
      const local = c.topkLocal[n * K + k];
      if (local >= 0) groups[local].push({ n, k });
    }
  });
  const aligned = groups.map((g) => Math.ceil(g.length / alignment) * alignment);
  const numRows = aligned.reduce((a, b) => a + b, 0);
  const rowOwner: ({ n: number; k: number } | null)[] = new Array(numRows).fill(null);
  const expandedRow = new Array<number>(c.rows.length * K).fill(-1);
  const x = new Uint8Array(numRows * rowBytes);
  const scales = new Uint32Array(numRows * S);
  const weights = new Float32Array(numRows);
  let base = 0;
  groups.forEach((g, e) => {
    g.forEach(({ n, k }, i) => {
      const row = base + i;
      rowOwner[row] = { n, k };
      expandedRow[n * K + k] = row;
      x.set(c.x.subarray(n * rowBytes, (n + 1) * rowBytes), row * rowBytes);
      if (S) scales.set(c.scales.subarray(n * S, (n + 1) * S), row * S);
      weights[row] = c.weights[n * K + k];
    });
    base += aligned[e];
  });
  return { numRows, rowOwner, x, scales, weights, expandedRow, perExpertAligned: aligned };
}

/**
 * Combine: for each source rank s and token t, float32 sum of bias0, bias1, then the returned
 * rows of every rank t went to, ranks ascending; one BF16 rounding.
 * `returned[r][n]` is the BF16 row rank r sends back for its n-th received token.
 */
export function referenceCombine(
  expectations: readonly CompactExpectation[],
  returned: readonly Uint16Array[],
  hidden: number,
  tokensPerRank: readonly number[],
  bias: readonly (readonly Uint16Array[])[] = [],
): Uint16Array[] {
  const R = expectations.length;
  return Array.from({ length: R }, (_, s) => {
    const T = tokensPerRank[s];
    const acc = new Float32Array(T * hidden);
    for (const b of bias) for (let i = 0; i < T * hidden; i++) acc[i] = addF32(acc[i], bf16Value(b[s][i]));
    for (let r = 0; r < R; r++) {
      expectations[r].rows.forEach(({ src, token }, n) => {
        if (src !== s) return;
        for (let c = 0; c < hidden; c++) {
          acc[token * hidden + c] = addF32(acc[token * hidden + c], bf16Value(returned[r][n * hidden + c]));
        }
      });
    }
    const out = new Uint16Array(T * hidden);
    for (let i = 0; i < out.length; i++) out[i] = bf16Round(acc[i]);
    return out;
  });
}

/**
 * Hierarchical combine across nodes of `ranksPerNode` (DeepEP's way): each node sums the returned
 * rows of its ranks, ascending, in float32 from zero and rounds once to BF16; the source then sums
 * bias0, bias1 and those partials in node order in float32 and rounds again. The top-k weights
 * likewise, with float32 partials. Returns the rows and the weights.
 */
export function referenceHierarchicalCombine(
  expectations: readonly CompactExpectation[],
  returned: readonly Uint16Array[],
  returnedWeights: readonly Float32Array[],
  hidden: number,
  k: number,
  tokensPerRank: readonly number[],
  bias: readonly (readonly Uint16Array[])[],
  ranksPerNode: number,
): { rows: Uint16Array[]; weights: Float32Array[] } {
  const R = expectations.length, N = R / ranksPerNode;
  const rows: Uint16Array[] = [], weights: Float32Array[] = [];
  for (let s = 0; s < R; s++) {
    const T = tokensPerRank[s];
    // Per node: the float partials of every token of s, and whether the node saw it.
    const part = Array.from({ length: N }, () => new Float32Array(T * hidden));
    const partW = Array.from({ length: N }, () => new Float32Array(T * k));
    const seen = Array.from({ length: N }, () => new Uint8Array(T));
    for (let r = 0; r < R; r++) {
      const node = Math.floor(r / ranksPerNode);
      expectations[r].rows.forEach(({ src, token }, n) => {
        if (src !== s) return;
        seen[node][token] = 1;
        for (let c = 0; c < hidden; c++) {
          part[node][token * hidden + c] = addF32(
            part[node][token * hidden + c],
            bf16Value(returned[r][n * hidden + c]),
          );
        }
        for (let j = 0; j < k; j++) {
          partW[node][token * k + j] = addF32(partW[node][token * k + j], returnedWeights[r][n * k + j]);
        }
      });
    }
    const acc = new Float32Array(T * hidden), accW = new Float32Array(T * k);
    for (const b of bias) for (let i = 0; i < T * hidden; i++) acc[i] = addF32(acc[i], bf16Value(b[s][i]));
    for (let node = 0; node < N; node++) {
      for (let t = 0; t < T; t++) {
        if (!seen[node][t]) continue;
        for (let c = 0; c < hidden; c++) {
          const i = t * hidden + c;
          acc[i] = addF32(acc[i], bf16Value(bf16Round(part[node][i])));
        }
        for (let j = 0; j < k; j++) accW[t * k + j] = addF32(accW[t * k + j], partW[node][t * k + j]);
      }
    }
    const out = new Uint16Array(T * hidden);
    for (let i = 0; i < out.length; i++) out[i] = bf16Round(acc[i]);
    rows.push(out);
    weights.push(accW);
  }
  return { rows, weights };
}

/** Combined top-k weights: the returned weights summed over ranks ascending, in float32. */
export function referenceCombineWeights(
  expectations: readonly CompactExpectation[],
  returned: readonly Float32Array[],
  k: number,
  tokensPerRank: readonly number[],
): Float32Array[] {
  return tokensPerRank.map((T, s) => {
    const out = new Float32Array(T * k);
    expectations.forEach((e, r) => {
      e.rows.forEach(({ src, token }, n) => {
        if (src !== s) return;
        for (let j = 0; j < k; j++) out[token * k + j] = addF32(out[token * k + j], returned[r][n * k + j]);
      });
    });
    return out;
  });
}

/** The expanded rows of one received token reduced in top-k order (float32), rounded to BF16. */
export function reduceExpanded(y: Uint16Array, exp: ExpandedExpectation, numTokens: number, k: number, hidden: number) {
  const out = new Uint16Array(numTokens * hidden);
  for (let n = 0; n < numTokens; n++) {
    const acc = new Float32Array(hidden);
    for (let j = 0; j < k; j++) {
      const row = exp.expandedRow[n * k + j];
      if (row < 0) continue;
      for (let c = 0; c < hidden; c++) acc[c] = addF32(acc[c], bf16Value(y[row * hidden + c]));
    }
    for (let c = 0; c < hidden; c++) out[n * hidden + c] = bf16Round(acc[c]);
  }
  return out;
}
