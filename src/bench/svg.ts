/**
 * A small plotting module: self-contained SVG documents (no scripts, no external fonts or
 * styles) for line charts, heat maps and per-rank timelines, so a benchmark's plots open in any
 * browser or image viewer.
 *
 * @module
 */

/** One line of a line chart. */
export interface Series {
  /** Legend entry. */
  readonly name: string;
  /** `[x, y]` points, drawn in the order given. */
  readonly points: readonly (readonly [number, number])[];
}

/** A line chart. */
export interface LineChart {
  readonly title: string;
  readonly xLabel: string;
  readonly yLabel: string;
  readonly series: readonly Series[];
  /** Logarithmic x axis (base 2), for sizes that double. */
  readonly logX?: boolean;
  /** Draw steps (for cumulative distributions) instead of straight segments. */
  readonly step?: boolean;
}

/** A heat map: `values[row][column]`. */
export interface HeatMap {
  readonly title: string;
  readonly xLabel: string;
  readonly yLabel: string;
  readonly values: readonly (readonly number[])[];
  /** Row names (default: the row index). */
  readonly rowNames?: readonly string[];
}

/** A timeline: one row per rank, bars from `start` to `end`. */
export interface Timeline {
  readonly title: string;
  readonly xLabel: string;
  readonly rows: readonly {
    readonly name: string;
    readonly bars: readonly { readonly start: number; readonly end: number; readonly label: string }[];
  }[];
}

const W = 820, H = 420, M = { left: 78, right: 260, top: 44, bottom: 58 };
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/** Text safe inside an SVG element or a double-quoted attribute. */
export function escapeXml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]!);
}

const num = (v: number) => Number.isInteger(v) ? String(v) : v.toFixed(2);

function label(v: number): string {
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(1);
  return Number(v.toPrecision(4)).toString();
}

/** Tick values spanning [lo, hi]: multiples of 1, 2 or 5 times a power of ten. */
export function niceTicks(lo: number, hi: number, count = 6): number[] {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((f) => f * mag).find((s) => s >= raw)!;
  const ticks: number[] = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

function frame(title: string, body: string[], width = W, height = H): string {
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" ` +
    `font-family="sans-serif" font-size="12">`,
    `<title>${escapeXml(title)}</title>`,
    `<rect width="${width}" height="${height}" fill="white"/>`,
    `<text x="${width / 2}" y="24" text-anchor="middle" font-size="15" font-weight="bold">${escapeXml(title)}</text>`,
    ...body,
    "</svg>",
    "",
  ].join("\n");
}

function axes(
  xTicks: number[],
  yTicks: number[],
  sx: (v: number) => number,
  sy: (v: number) => number,
  xLabel: string,
  yLabel: string,
  xText = label,
): string[] {
  const x0 = M.left, x1 = W - M.right, y0 = H - M.bottom, y1 = M.top;
  const out = [
    `<g class="axes" stroke="#333" fill="none">`,
    `<line x1="${x0}" y1="${y0}" x2="${x1}" y2="${y0}"/>`,
    `<line x1="${x0}" y1="${y0}" x2="${x0}" y2="${y1}"/>`,
    `</g>`,
  ];
  for (const t of xTicks) {
    const x = num(sx(t));
    out.push(
      `<line x1="${x}" y1="${y0}" x2="${x}" y2="${y0 + 5}" stroke="#333"/>`,
      `<text x="${x}" y="${y0 + 18}" text-anchor="middle">${escapeXml(xText(t))}</text>`,
    );
  }
  for (const t of yTicks) {
    const y = num(sy(t));
    out.push(
      `<line x1="${x0}" y1="${y}" x2="${x1}" y2="${y}" stroke="#ddd"/>`,
      `<text x="${x0 - 8}" y="${y}" text-anchor="end" dominant-baseline="middle">${escapeXml(label(t))}</text>`,
    );
  }
  out.push(
    `<text class="x-label" x="${(x0 + x1) / 2}" y="${H - 16}" text-anchor="middle">${escapeXml(xLabel)}</text>`,
    `<text class="y-label" x="18" y="${(y0 + y1) / 2}" text-anchor="middle" ` +
      `transform="rotate(-90 18 ${(y0 + y1) / 2})">${escapeXml(yLabel)}</text>`,
  );
  return out;
}

/** A line chart as an SVG document. */
export function lineChart(c: LineChart): string {
  const pts = c.series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  const tx = (x: number) => c.logX ? Math.log2(x) : x;
  const xs = pts.map(([x]) => tx(x)), ys = pts.map(([, y]) => y);
  let xlo = Math.min(...xs, Infinity), xhi = Math.max(...xs, -Infinity);
  if (!Number.isFinite(xlo)) [xlo, xhi] = [0, 1];
  if (xhi === xlo) [xlo, xhi] = [xlo - 1, xhi + 1];
  const yhi0 = Math.max(...ys, 0), ylo = Math.min(0, ...ys);
  const yTicks = niceTicks(ylo, yhi0 > ylo ? yhi0 : ylo + 1);
  const yhi = Math.max(yTicks[yTicks.length - 1], yhi0);
  const sx = (v: number) => M.left + (v - xlo) / (xhi - xlo) * (W - M.left - M.right);
  const sy = (v: number) => H - M.bottom - (v - ylo) / (yhi - ylo || 1) * (H - M.top - M.bottom);
  const xTicks = c.logX
    ? Array.from({ length: Math.floor(xhi) - Math.ceil(xlo) + 1 }, (_, i) => Math.ceil(xlo) + i)
    : niceTicks(xlo, xhi);
  const body = axes(xTicks, yTicks, sx, sy, c.xLabel, c.yLabel, c.logX ? (v) => label(2 ** v) : label);
  c.series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const p = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y)).map(([x, y]) => [sx(tx(x)), sy(y)]);
    let d = "";
    p.forEach(([x, y], j) => {
      if (j === 0) d += `M${num(x)},${num(y)}`;
      else if (c.step) d += `H${num(x)}V${num(y)}`;
      else d += `L${num(x)},${num(y)}`;
    });
    body.push(
      `<g class="series" data-name="${escapeXml(s.name)}">`,
      `<path d="${d}" fill="none" stroke="${color}" stroke-width="2"/>`,
      ...(c.step || p.length > 40
        ? []
        : p.map(([x, y]) => `<circle cx="${num(x)}" cy="${num(y)}" r="3" fill="${color}"/>`)),
      `</g>`,
    );
    const ly = M.top + 14 + 18 * i;
    body.push(
      `<line x1="${W - M.right + 14}" y1="${ly}" x2="${
        W - M.right + 34
      }" y2="${ly}" stroke="${color}" stroke-width="3"/>`,
      `<text class="legend" x="${W - M.right + 40}" y="${ly}" dominant-baseline="middle">${escapeXml(s.name)}</text>`,
    );
  });
  return frame(c.title, body);
}

/** Empirical cumulative distribution of `values`: points `[value, fraction <= value]`. */
export function cdfPoints(values: readonly number[]): [number, number][] {
  const xs = [...values].sort((a, b) => a - b);
  return xs.map((v, i) => [v, (i + 1) / xs.length]);
}

/** A heat map as an SVG document: darker is more. */
export function heatMap(h: HeatMap): string {
  const rows = h.values.length, cols = Math.max(0, ...h.values.map((r) => r.length));
  const max = Math.max(0, ...h.values.flat());
  const x0 = M.left, y0 = M.top, w = W - M.left - M.right, ht = H - M.top - M.bottom;
  const cw = cols ? w / cols : w, ch = rows ? ht / rows : ht;
  // One unit square per value, scaled into place: a 8 x 256 map stays a few dozen kilobytes.
  const body: string[] = [
    `<g class="cells" shape-rendering="crispEdges" transform="translate(${x0} ${y0}) scale(${num(cw)} ${num(ch)})">`,
  ];
  const hex = (v: number) => v.toString(16).padStart(2, "0");
  h.values.forEach((row, r) =>
    row.forEach((v, c) => {
      const t = max > 0 ? v / max : 0;
      const shade = hex(Math.round(255 - 200 * t)), blue = hex(Math.round(255 - 90 * t));
      body.push(`<rect x="${c}" y="${r}" width="1" height="1" fill="#${shade}${shade}${blue}"/>`);
    })
  );
  body.push(`</g>`);
  h.values.forEach((_, r) =>
    body.push(
      `<text x="${x0 - 6}" y="${num(y0 + (r + 0.5) * ch)}" text-anchor="end" dominant-baseline="middle">` +
        `${escapeXml(h.rowNames?.[r] ?? String(r))}</text>`,
    )
  );
  for (const c of niceTicks(0, Math.max(cols - 1, 1))) {
    if (c >= cols) continue;
    body.push(`<text x="${num(x0 + (c + 0.5) * cw)}" y="${y0 + ht + 16}" text-anchor="middle">${c}</text>`);
  }
  body.push(
    `<text class="x-label" x="${x0 + w / 2}" y="${H - 16}" text-anchor="middle">${escapeXml(h.xLabel)}</text>`,
    `<text class="y-label" x="18" y="${y0 + ht / 2}" text-anchor="middle" ` +
      `transform="rotate(-90 18 ${y0 + ht / 2})">${escapeXml(h.yLabel)}</text>`,
    `<text class="legend" x="${W - M.right + 14}" y="${M.top + 14}">darkest: ${escapeXml(label(max))}</text>`,
  );
  return frame(h.title, body);
}

/** Per-rank bars on a shared time axis, as an SVG document. */
export function timeline(t: Timeline): string {
  const labels = [...new Set(t.rows.flatMap((r) => r.bars.map((b) => b.label)))];
  const end = Math.max(0, ...t.rows.flatMap((r) => r.bars.map((b) => b.end)));
  const xTicks = niceTicks(0, end || 1);
  const xhi = Math.max(end, xTicks[xTicks.length - 1]);
  const sx = (v: number) => M.left + v / (xhi || 1) * (W - M.left - M.right);
  const rowH = (H - M.top - M.bottom) / Math.max(t.rows.length, 1);
  const body = axes(xTicks, [], sx, () => 0, t.xLabel, "rank");
  t.rows.forEach((row, r) => {
    const y = M.top + r * rowH;
    body.push(
      `<text x="${M.left - 8}" y="${num(y + rowH / 2)}" text-anchor="end" dominant-baseline="middle">` +
        `${escapeXml(row.name)}</text>`,
    );
    for (const b of row.bars) {
      const color = COLORS[labels.indexOf(b.label) % COLORS.length];
      body.push(
        `<rect class="bar" data-label="${escapeXml(b.label)}" x="${num(sx(b.start))}" y="${num(y + rowH * 0.15)}" ` +
          `width="${num(Math.max(sx(b.end) - sx(b.start), 0.5))}" height="${num(rowH * 0.7)}" fill="${color}">` +
          `<title>${escapeXml(`${row.name} ${b.label}: ${label(b.start)} to ${label(b.end)}`)}</title></rect>`,
      );
    }
  });
  labels.forEach((l, i) => {
    const ly = M.top + 14 + 18 * i;
    body.push(
      `<rect x="${W - M.right + 14}" y="${ly - 6}" width="20" height="12" fill="${COLORS[i % COLORS.length]}"/>`,
      `<text class="legend" x="${W - M.right + 40}" y="${ly}" dominant-baseline="middle">${escapeXml(l)}</text>`,
    );
  });
  return frame(t.title, body);
}
