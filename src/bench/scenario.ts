/**
 * Benchmark scenarios named after the workloads they stand for, their routings, and how they
 * shrink to fit a small machine.
 *
 * @module
 */

import { SwitchyardError } from "../errors.ts";
import { randomRouting, Rng, type Routing } from "../workload.ts";

/** How tokens pick their experts. */
export type RoutingKind =
  | { readonly kind: "uniform" }
  /** Expert popularity ~ 1 / rank^s. */
  | { readonly kind: "zipf"; readonly s: number }
  /** Expert 0 is in every token's top-k with probability `share`; the rest uniform. */
  | { readonly kind: "hot"; readonly share: number }
  /**
   * DeepSeek-V3's group-limited routing: the experts form `groups` contiguous groups (a group per
   * node, or per rank), each token picks `perToken` groups, and its top-k only among their experts,
   * so a token reaches at most `perToken` groups.
   */
  | { readonly kind: "group"; readonly groups: number; readonly perToken: number };

/** One workload: shape, routing, payload and the operations measured. */
export interface Scenario {
  /** Name, as `--scenario` takes it. */
  readonly name: string;
  /** What it stands for. */
  readonly about: string;
  /** `normal` (dispatch exact / worst-case / cached, combine) or `low-latency` (decode). */
  readonly mode: "normal" | "low-latency";
  /** Ranks. */
  readonly ranks: number;
  /** Tokens per rank. */
  readonly tokens: number;
  /** Hidden size (channels per token). */
  readonly hidden: number;
  /** Experts in total (a multiple of `ranks`). */
  readonly experts: number;
  /** Experts per token. */
  readonly topk: number;
  /** Routing of every rank's tokens. */
  readonly routing: RoutingKind;
  /** Dispatch payload; combine is BF16 always, as in DeepEP. */
  readonly payload: "bf16" | "fp8";
  /** Virtual nodes of this many ranks (default: one node); dispatch takes two hops across them. */
  readonly ranksPerNode?: number;
  /** The host backend's emulated NIC between the nodes (default: memory speed). */
  readonly emulatedNic?: { readonly gbPerSecond: number; readonly latencyUs: number };
}

const DEEPSEEK = { hidden: 7168, experts: 256, topk: 8 } as const;
const UNIFORM: RoutingKind = { kind: "uniform" };

/** The named scenarios (shapes from the models' published configurations). */
export const SCENARIOS: readonly Scenario[] = [
  {
    name: "deepseek-v3-prefill",
    about: "DeepSeek-V3 prefill/training: 4096 tokens per rank, hidden 7168, top-8 of 256 experts",
    mode: "normal",
    ranks: 8,
    tokens: 4096,
    ...DEEPSEEK,
    routing: UNIFORM,
    payload: "bf16",
  },
  {
    name: "deepseek-v3-decode",
    about: "DeepSeek-V3 decode: 128 tokens per rank, FP8 dispatch, BF16 combine (low-latency mode)",
    mode: "low-latency",
    ranks: 8,
    tokens: 128,
    ...DEEPSEEK,
    routing: UNIFORM,
    payload: "fp8",
  },
  {
    name: "deepseek-v3-decode-1",
    about: "DeepSeek-V3 decode of one token per rank (low-latency mode): the latency floor",
    mode: "low-latency",
    ranks: 8,
    tokens: 1,
    ...DEEPSEEK,
    routing: UNIFORM,
    payload: "fp8",
  },
  {
    name: "qwen3-moe-prefill",
    about: "Qwen3-235B-A22B-like prefill: 4096 tokens per rank, hidden 4096, top-8 of 128 experts",
    mode: "normal",
    ranks: 8,
    tokens: 4096,
    hidden: 4096,
    experts: 128,
    topk: 8,
    routing: UNIFORM,
    payload: "bf16",
  },
  {
    name: "mixtral-prefill",
    about: "Mixtral-8x7B-like prefill: 4096 tokens per rank, hidden 4096, top-2 of 8 experts",
    mode: "normal",
    ranks: 8,
    tokens: 4096,
    hidden: 4096,
    experts: 8,
    topk: 2,
    routing: UNIFORM,
    payload: "bf16",
  },
];

/** What `deno task bench` runs without `--scenario`. */
export const DEFAULT_SCENARIOS: readonly string[] = [
  "deepseek-v3-prefill",
  "deepseek-v3-decode",
  "deepseek-v3-decode-1",
];

/** The scenario called `name`; throws naming the known ones. */
export function scenarioNamed(name: string): Scenario {
  const s = SCENARIOS.find((x) => x.name === name);
  if (!s) {
    throw new SwitchyardError(
      "INVALID_ARGUMENT",
      `scenario: no scenario ${name}; known: ${SCENARIOS.map((x) => x.name).join(", ")}`,
    );
  }
  return s;
}

/** Parses `uniform`, `zipf:S` (S > 0), `hot:P` (0 < P <= 1) or `group:G:M` (M of G groups). */
export function parseRouting(text: string): RoutingKind {
  const [kind, arg, arg2, ...rest] = text.split(":");
  const value = Number(arg), second = Number(arg2);
  if (rest.length === 0 && arg2 === undefined) {
    if (kind === "uniform" && arg === undefined) return UNIFORM;
    if (kind === "zipf" && value > 0) return { kind: "zipf", s: value };
    if (kind === "hot" && value > 0 && value <= 1) return { kind: "hot", share: value };
  }
  if (kind === "group" && rest.length === 0 && Number.isInteger(value) && Number.isInteger(second)) {
    if (value >= 1 && second >= 1 && second <= value) return { kind: "group", groups: value, perToken: second };
  }
  throw new SwitchyardError(
    "INVALID_ARGUMENT",
    `routing: expected uniform, zipf:S (S > 0), hot:P (0 < P <= 1) or group:G:M (1 <= M <= G), got ${text}`,
  );
}

/** `routing` as text, as parseRouting reads it. */
export function routingName(routing: RoutingKind): string {
  switch (routing.kind) {
    case "uniform":
      return "uniform";
    case "zipf":
      return `zipf:${routing.s}`;
    case "hot":
      return `hot:${routing.share}`;
    case "group":
      return `group:${routing.groups}:${routing.perToken}`;
  }
}

/** The top-k routing of rank `rank`'s tokens in scenario `s` (seeded by `seed` and the rank). */
export function routeTokens(s: Scenario, rank: number, seed: number): Routing {
  const spec = { tokens: s.tokens, experts: s.experts, topk: s.topk, seed: seed * 1009 + rank };
  if (s.routing.kind === "uniform") return randomRouting(spec);
  if (s.routing.kind === "zipf") return randomRouting({ ...spec, zipf: s.routing.s });
  if (s.routing.kind === "group") return groupLimited(s, s.routing.groups, s.routing.perToken, spec.seed);
  // Hot expert: uniform, then expert 0 takes the last slot of a `share` of the tokens that lack it.
  const r = randomRouting(spec);
  const rng = new Rng(spec.seed ^ 0x5bd1e995);
  for (let t = 0; t < s.tokens; t++) {
    const row = r.topkIdx.subarray(t * s.topk, (t + 1) * s.topk);
    if (row.includes(0n) || rng.next() >= s.routing.share) continue;
    row[s.topk - 1] = 0n;
  }
  return r;
}

// Group-limited routing: `perToken` distinct groups, then top-k distinct experts among theirs,
// uniformly; weights positive and normalised per token, as randomRouting's.
function groupLimited(s: Scenario, groups: number, perToken: number, seed: number): Routing {
  const size = s.experts / groups;
  if (!Number.isInteger(size) || perToken * size < s.topk) {
    throw new SwitchyardError(
      "INVALID_ARGUMENT",
      `routing: group:${groups}:${perToken} needs experts (${s.experts}) divisible by the groups and top-${s.topk} ` +
        `within ${perToken} groups of ${size}`,
    );
  }
  const rng = new Rng(seed);
  const topkIdx = new BigInt64Array(s.tokens * s.topk), topkWeights = new Float32Array(s.tokens * s.topk);
  const pick = (n: number, k: number) => { // k distinct of 0..n-1 (partial Fisher-Yates)
    const all = Array.from({ length: n }, (_, i) => i);
    for (let i = 0; i < k; i++) {
      const j = i + rng.int(n - i);
      [all[i], all[j]] = [all[j], all[i]];
    }
    return all.slice(0, k);
  };
  for (let t = 0; t < s.tokens; t++) {
    const chosen = pick(groups, perToken);
    const experts = pick(perToken * size, s.topk).map((i) => chosen[Math.floor(i / size)] * size + (i % size));
    let sum = 0;
    experts.forEach((e, k) => {
      topkIdx[t * s.topk + k] = BigInt(e);
      sum += topkWeights[t * s.topk + k] = 0.1 + rng.next();
    });
    for (let k = 0; k < s.topk; k++) topkWeights[t * s.topk + k] /= sum;
  }
  return { topkIdx, topkWeights };
}

/** A scenario resized for this machine, and why (undefined when it runs as named). */
export interface Sized {
  /** The scenario as it will run. */
  readonly scenario: Scenario;
  /** Why and how it was scaled down, if it was. */
  readonly scaledDown?: string;
}

/**
 * Shrinks a normal-mode scenario's tokens per rank so that one rank's input stays within
 * `bytesPerCore` times the cores (halving, down to 16 tokens at the least): the host backend and the
 * CPU-executed CUDA backend move every byte with CPU copies. Low-latency scenarios (at most a
 * few hundred tokens) run as named.
 */
export function sizeFor(s: Scenario, cores: number, bytesPerCore = 8 * 2 ** 20): Sized {
  if (s.mode !== "normal") return { scenario: s };
  const budget = Math.max(1, cores) * bytesPerCore;
  let tokens = s.tokens;
  while (tokens > 16 && tokens * s.hidden * 2 > budget) tokens = Math.max(16, Math.floor(tokens / 2));
  if (tokens === s.tokens) return { scenario: s };
  return {
    scenario: { ...s, tokens },
    scaledDown: `${s.tokens} -> ${tokens} tokens per rank (${cores} cores moving every byte on the CPU; ` +
      `--full runs it as named)`,
  };
}
