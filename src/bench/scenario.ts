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
  | { readonly kind: "hot"; readonly share: number };

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

/** Parses `uniform`, `zipf:S` (S > 0) or `hot:P` (0 < P <= 1). */
export function parseRouting(text: string): RoutingKind {
  const [kind, arg] = text.split(":");
  const value = Number(arg);
  if (kind === "uniform" && arg === undefined) return UNIFORM;
  if (kind === "zipf" && value > 0) return { kind: "zipf", s: value };
  if (kind === "hot" && value > 0 && value <= 1) return { kind: "hot", share: value };
  throw new SwitchyardError(
    "INVALID_ARGUMENT",
    `routing: expected uniform, zipf:S (S > 0) or hot:P (0 < P <= 1), got ${text}`,
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
  }
}

/** The top-k routing of rank `rank`'s tokens in scenario `s` (seeded by `seed` and the rank). */
export function routeTokens(s: Scenario, rank: number, seed: number): Routing {
  const spec = { tokens: s.tokens, experts: s.experts, topk: s.topk, seed: seed * 1009 + rank };
  if (s.routing.kind === "uniform") return randomRouting(spec);
  if (s.routing.kind === "zipf") return randomRouting({ ...spec, zipf: s.routing.s });
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
