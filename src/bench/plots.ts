/**
 * The benchmark's plots, drawn from its report: latency CDFs, bandwidth against tokens per rank,
 * time against ranks, a source-rank x expert heat map of routed tokens and a per-rank timeline of
 * one iteration's phases, plus an index.html that shows them together.
 *
 * @module
 */

import type { BenchReport, ScenarioReport } from "./report.ts";
import { cdfPoints, escapeXml, heatMap, lineChart, timeline } from "./svg.ts";

/** One plot: a file name and its SVG text. */
export interface Plot {
  readonly file: string;
  readonly caption: string;
  readonly svg: string;
}

const slug = (s: string) => s.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "");

function latencyCdf(s: ScenarioReport): Plot {
  return {
    file: `latency-cdf-${slug(s.scenario.name)}.svg`,
    caption: `${s.scenario.name}: distribution of each operation's time (slowest rank per iteration)`,
    svg: lineChart({
      title: `${s.scenario.name}: latency CDF`,
      xLabel: "time per call (ms, slowest rank)",
      yLabel: "fraction of iterations",
      step: true,
      series: s.operations.map((o) => ({
        name: o.op,
        points: cdfPoints(o.samplesMs[0].map((_, i) => Math.max(...o.samplesMs.map((row) => row[i])))),
      })),
    }),
  };
}

function routedHeatMap(s: ScenarioReport): Plot {
  return {
    file: `heatmap-${slug(s.scenario.name)}.svg`,
    caption: `${s.scenario.name}: tokens each source rank sends to each expert`,
    svg: heatMap({
      title: `${s.scenario.name}: tokens per source rank and expert`,
      xLabel: "expert",
      yLabel: "source rank",
      values: s.received.sentPerRankExpert,
      rowNames: s.received.sentPerRankExpert.map((_, r) => `rank ${r}`),
    }),
  };
}

// The last iteration's phases on every rank, each on its own clock from its first event: the
// operations run one after the other on the rank's stream.
function phaseTimeline(s: ScenarioReport): Plot {
  const ranks = s.operations[0].samplesMs.length;
  const rows = Array.from({ length: ranks }, (_, r) => {
    let at = 0;
    const bars: { start: number; end: number; label: string }[] = [];
    for (const o of s.operations) {
      const row = o.samplesMs[r], total = row[row.length - 1];
      if (o.sendMs) {
        const send = Math.min(o.sendMs[r].median, total);
        bars.push({ start: at, end: at + send, label: `${o.op}: send` });
        bars.push({ start: at + send, end: at + total, label: `${o.op}: receive` });
      } else {
        bars.push({ start: at, end: at + total, label: o.op });
      }
      at += total;
    }
    return { name: `rank ${r}`, bars };
  });
  return {
    file: `timeline-${slug(s.scenario.name)}.svg`,
    caption: `${s.scenario.name}: one iteration's operations per rank, in the order they ran (each rank's own clock; ` +
      `hook variants split into send and receive at the median send time)`,
    svg: timeline({
      title: `${s.scenario.name}: phases of the last iteration`,
      xLabel: "ms from the rank's start",
      rows,
    }),
  };
}

/** Every plot the report has data for. */
export function plotsOf(report: BenchReport): Plot[] {
  const plots: Plot[] = [];
  for (const s of report.scenarios) plots.push(latencyCdf(s), routedHeatMap(s), phaseTimeline(s));
  const tokens = report.sweeps?.tokens ?? [];
  if (tokens.length) {
    const ops = [...new Set(tokens.map((p) => p.op))];
    plots.push({
      file: "bandwidth-vs-tokens.svg",
      caption: `bandwidth (DeepEP's count, median rank) against tokens per rank, ${tokens[0].ranks} ranks`,
      svg: lineChart({
        title: "bandwidth vs tokens per rank",
        xLabel: "tokens per rank",
        yLabel: "GB/s per rank",
        logX: true,
        series: ops.map((op) => ({
          name: op,
          points: tokens.filter((p) => p.op === op).map((p) => [p.tokens, p.gbPerSecond] as const),
        })),
      }),
    });
  }
  const ranks = report.sweeps?.ranks ?? [];
  if (ranks.length) {
    const ops = [...new Set(ranks.map((p) => p.op))];
    plots.push({
      file: "time-vs-ranks.svg",
      caption: `median time per call against ranks, ${ranks[0].tokens} tokens per rank`,
      svg: lineChart({
        title: "time vs ranks",
        xLabel: "ranks",
        yLabel: "median ms (slowest rank)",
        series: ops.map((op) => ({
          name: op,
          points: ranks.filter((p) => p.op === op).map((p) => [p.ranks, p.medianMs] as const),
        })),
      }),
    });
  }
  return plots;
}

/** A page that shows the plots together (relative links to the SVG files next to it). */
export function indexHtml(report: BenchReport, plots: readonly Plot[]): string {
  const m = report.machine;
  return [
    "<!doctype html>",
    '<html lang="en"><head><meta charset="utf-8"><title>Switchyard benchmark</title>',
    "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:1em}</style></head><body>",
    `<h1>Switchyard benchmark</h1>`,
    `<p>${
      escapeXml(
        `${m.backend}${m.device ? ` (${m.device})` : ""}, ${m.cores} cores, ${m.cpu}; ` +
          `library ${m.libraryVersion}, Deno ${m.deno}; ${report.createdAt}`,
      )
    }</p>`,
    ...(m.executedOnCpu ? ["<p><b>CUDA backend executed on the CPU: the times say nothing about a GPU.</b></p>"] : []),
    ...plots.map((p) =>
      `<figure><img src="${escapeXml(p.file)}" alt="${escapeXml(p.caption)}"><figcaption>${
        escapeXml(p.caption)
      }</figcaption></figure>`
    ),
    `<p><a href="report.json">report.json</a></p>`,
    "</body></html>",
    "",
  ].join("\n");
}
