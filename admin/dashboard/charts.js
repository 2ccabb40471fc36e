/*
 * What both charts share: uPlot options, the charts on the page and their sizing.
 *
 * Charts: uPlot v1.6.32 (MIT, https://github.com/leeoniya/uPlot), vendored unchanged from the
 * npm registry package "uplot@1.6.32" (dist/uPlot.iife.min.js) in vendor/; see vendor/README.md.
 * It is a classic script that defines the global `uPlot`; index.html loads it before the
 * modules, and deferred classic scripts and module scripts run in document order.
 */

import { dateTime, compact } from "./format.js";
import { el } from "./page.js";

export const COLORS = {
  prompt: "#2f6fe4",
  completion: "#f08c2e",
  actual: "#1c2433",
  forecast: "#7c3aed",
  axis: "#667085",
  grid: "#eef1f5",
};
const FONT = "system-ui, 'DejaVu Sans', sans-serif";

const charts = []; // the uPlot instances on the page

export const chartLibraryLoaded = () => typeof uPlot !== "undefined";

/** A uPlot chart in `container`, kept so that it is resized and destroyed with the others. */
export function draw(opts, data, container) {
  const chart = new uPlot(opts, data, container);
  charts.push(chart);
  return chart;
}

export function destroyCharts() {
  for (const chart of charts) chart.destroy();
  charts.length = 0;
}

// Charts follow their container's width (window resizes, the table growing, ...).
const resizer = new ResizeObserver(() => {
  for (const chart of charts) {
    const width = Math.max(320, chart.root.parentElement.clientWidth);
    if (Math.abs(width - chart.width) > 1) chart.setSize({ width, height: chart.height });
  }
});

export function followWidth(container) {
  resizer.observe(container);
}

export function empty(container, text) {
  container.replaceChildren(el("div", { class: "chart-empty" }, text));
}

const compactAxis = (u, splits) => splits.map((v) => (v == null ? "" : compact(v)));

export function axes(yLabel) {
  const common = {
    stroke: COLORS.axis,
    grid: { stroke: COLORS.grid, width: 1 },
    ticks: { stroke: COLORS.grid, width: 1 },
    font: `12px ${FONT}`,
    labelFont: `12px ${FONT}`,
  };
  return [
    { ...common },
    { ...common, values: compactAxis, size: 60, label: yLabel, labelSize: 22 },
  ];
}

export function chartSize(container) {
  return { width: Math.max(320, container.clientWidth), height: 300 };
}

/** Options both charts use: drag to zoom on x, y from 0 with some room above the peak. */
export function baseOptions(container) {
  return {
    ...chartSize(container),
    cursor: { drag: { x: true, y: false } },
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(10, max * 1.08)] } },
    axes: axes("tokens / hour"),
  };
}

export const stepped = () => uPlot.paths.stepped({ align: 1 });
export const timeValue = (u, v) => (v == null ? "–" : dateTime(v * 1000));

/** The hours that are over (history rows are oldest first; the last may be running). */
export function completeHours(hours) {
  const now = Date.now() / 1000;
  let end = hours.length;
  while (end > 0 && hours[end - 1].ts + 3600 > now) end -= 1;
  return hours.slice(0, end);
}

/** A dashed vertical line labelled "now" at `ts` (epoch seconds). */
export function nowMarker(ts) {
  return {
    hooks: {
      draw: [(u) => {
        const x = Math.round(u.valToPos(ts, "x", true));
        const { ctx } = u;
        const dpr = window.devicePixelRatio || 1;
        ctx.save();
        ctx.strokeStyle = "#98a2b3";
        ctx.lineWidth = dpr;
        ctx.setLineDash([4 * dpr, 4 * dpr]);
        ctx.beginPath();
        ctx.moveTo(x, u.bbox.top);
        ctx.lineTo(x, u.bbox.top + u.bbox.height);
        ctx.stroke();
        ctx.fillStyle = "#667085";
        ctx.font = `${11 * dpr}px ${FONT}`;
        ctx.fillText("now", x + 6 * dpr, u.bbox.top + 14 * dpr);
        ctx.restore();
      }],
    },
  };
}
