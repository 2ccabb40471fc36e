/* Forecasts: the forecast chart, the quota warnings and the upstream capacity advice. */

import {
  COLORS, baseOptions, chartLibraryLoaded, completeHours, draw, empty, nowMarker, timeValue,
} from "./charts.js";
import { compact, dateTime, inHowLong, int, intervalText, toMs } from "./format.js";
import { keyName } from "./keys.js";
import { $, el, state } from "./page.js";

export const FORECAST_HOURS = 48;
const FORECAST_CONTEXT_HOURS = 96; // history shown before the forecast, so it stays readable

/** The admin API path of the forecast for `scope` ("" = all keys). */
export function forecastPath(scope) {
  return scope
    ? `/v1/forecasting/forecast?key_id=${encodeURIComponent(scope)}&horizon_hours=${FORECAST_HOURS}`
    : `/v1/forecasting/forecast?horizon_hours=${FORECAST_HOURS}`;
}

// ---- chart --------------------------------------------------------------------------------
/** Forecast points as [ts seconds, value, lower, upper], sorted. */
function forecastPoints(forecast) {
  return (forecast.points || [])
    .map((p) => [toMs(p.ts) / 1000, p.value, p.lower ?? p.value, p.upper ?? p.value])
    .filter((p) => !Number.isNaN(p[0]))
    .sort((a, b) => a[0] - b[0]);
}

function forecastChart(container, hours, forecast) {
  // The hour in progress is only partly counted: drawn as actual it would dive towards
  // zero right at "now". The actual line stops at the last complete hour.
  const past = completeHours(hours).slice(-FORECAST_CONTEXT_HOURS);
  const ahead = forecastPoints(forecast);
  const last = past[past.length - 1];
  const lastTs = last ? last.ts : null;
  const future = ahead.filter((p) => lastTs == null || p[0] > lastTs);
  const xs = [...past.map((h) => h.ts), ...future.map((p) => p[0])];
  const n = past.length;
  const pad = (arr, before) => [...before, ...arr];
  const actual = pad(future.map(() => null), past.map((h) => h.total || 0));
  // The forecast continues the history line: it starts at the last actual point, and so
  // does its interval band, which then fans out.
  const lead = past.map((h, i) => (i === n - 1 ? h.total || 0 : null));
  const value = pad(future.map((p) => p[1]), lead);
  const lower = pad(future.map((p) => p[2]), lead);
  const upper = pad(future.map((p) => p[3]), lead);
  const intervalLabel = intervalText(forecast.interval, "interval");
  // Away from the cursor the legend shows the last complete hour.
  const rest = Math.max(0, n - 1);
  const data = [xs, actual, value, lower, upper];
  const fmtVal = (u, v, si, i) => {
    const shown = data[si][i ?? rest];
    return shown == null ? "–" : int(Math.round(shown));
  };
  return draw({
    ...baseOptions(container),
    series: [
      { label: "Hour", value: (u, v, si, i) => timeValue(u, xs[i ?? rest]) },
      { label: "Actual", stroke: COLORS.actual, width: 1.5, points: { show: false }, value: fmtVal },
      {
        label: "Forecast", stroke: COLORS.forecast, width: 2, dash: [6, 4],
        points: { show: false }, value: fmtVal,
      },
      {
        label: `Lower (${intervalLabel})`, stroke: `${COLORS.forecast}66`, width: 1,
        points: { show: false }, value: fmtVal,
      },
      {
        label: `Upper (${intervalLabel})`, stroke: `${COLORS.forecast}66`, width: 1,
        points: { show: false }, value: fmtVal,
      },
    ],
    bands: [{ series: [4, 3], fill: `${COLORS.forecast}22` }],
    plugins: future.length ? [nowMarker(Date.now() / 1000)] : [],
  }, data, container);
}

/** The forecast card for `scopeName`: `forecast` (null: it could not be loaded) after the
 * recent `hours` of history. */
export function renderForecast(scopeName, forecast, hours) {
  const container = $("forecast-chart");
  container.replaceChildren();
  $("forecast-title").textContent = `Forecast · ${scopeName} · next ${FORECAST_HOURS} h`;
  if (!chartLibraryLoaded()) {
    empty(container, "The chart library did not load.");
    return;
  }
  if (!forecast) {
    $("forecast-sub").textContent = "";
    empty(container, "Forecast unavailable.");
  } else if (!(forecast.points || []).length) {
    $("forecast-sub").textContent = forecast.note || "";
    empty(container, "Not enough history to forecast yet.");
  } else {
    const pts = forecastPoints(forecast);
    const total = forecast.total || {};
    const expected = total.value ?? pts.reduce((s, p) => s + (p[1] || 0), 0);
    const range = total.lower != null && total.upper != null
      ? ` (${compact(total.lower)}–${compact(total.upper)})` : "";
    const bits = [
      `About ${compact(expected)} tokens${range} expected over the next ` +
        `${forecast.horizon_hours ?? FORECAST_HOURS} h`,
      forecast.method ? `method: ${forecast.method}` : null,
      `shaded: ${intervalText(forecast.interval)}`,
    ].filter(Boolean);
    $("forecast-sub").textContent = `${bits.join(" · ")}.${forecast.note ? ` ${forecast.note}` : ""}`;
    forecastChart(container, hours, forecast);
  }
}

// ---- quota warnings and capacity ----------------------------------------------------------
/** Key id -> warnings for quotas forecast to run out before their window resets. */
export function quotaWarnings(capacity) {
  state.warningsKnown = capacity != null;
  const out = new Map();
  for (const rec of (capacity && capacity.keys) || []) {
    const at = toMs(rec.exhausts_at);
    if (Number.isNaN(at) || rec.will_exhaust === false) continue;
    const usage = state.usage.get(rec.key_id);
    const win = usage && usage[rec.window];
    const resets = toMs(rec.resets_at ?? (win && win.resets_at));
    if (!Number.isNaN(resets) && at > resets) continue; // the reset comes first
    const list = out.get(rec.key_id) || [];
    list.push({ ...rec, exhaustsMs: at, resetsMs: resets });
    out.set(rec.key_id, list);
  }
  return out;
}

function renderCapacity(capacity) {
  const box = $("capacity");
  const c = capacity && capacity.capacity;
  if (!c || typeof c !== "object" || c.forecast_peak_tokens_per_s == null) {
    box.hidden = true;
    return;
  }
  const peakAt = toMs(c.forecast_peak_at);
  const facts = [
    `Forecast peak ${compact(c.forecast_peak_tokens_per_s)} tokens/s` +
      (Number.isNaN(peakAt) ? "" : ` (${dateTime(peakAt)})`),
    c.configured_tokens_per_s ? `upstream capacity ${compact(c.configured_tokens_per_s)}/s` : null,
    c.headroom_pct != null ? `headroom ${c.headroom_pct}%` : null,
  ].filter(Boolean);
  $("capacity-facts").textContent = `${facts.join(" · ")}.`;
  $("capacity-advice").textContent = c.advice || "";
  box.title = c.basis || "";
  box.hidden = false;
}

export function renderWarnings(capacity) {
  const list = $("warnings");
  renderCapacity(capacity);
  if (capacity == null) {
    list.replaceChildren(el("li", { class: "unknown" }, "The quota forecast is unavailable."));
    return;
  }
  const all = [...state.warnings.values()].flat().sort((a, b) => a.exhaustsMs - b.exhaustsMs);
  if (!all.length) {
    list.replaceChildren(el("li", { class: "none" },
      "No key is forecast to use up a quota before it resets."));
    return;
  }
  list.replaceChildren(...all.map((w) => {
    const reset = Number.isNaN(w.resetsMs) ? "" : `, before the reset at ${dateTime(w.resetsMs)}`;
    const suggested = w.suggested_limit != null ? ` Suggested limit: ${compact(w.suggested_limit)}.` : "";
    const li = el("li", { tabindex: "0", dataset: { keyId: w.key_id } },
      el("div", { class: "warn-head" },
        el("span", {}, `${w.name || keyName(w.key_id)} · ${w.window} quota`),
        el("span", { class: "warn-when" }, inHowLong(w.exhaustsMs))),
      el("div", { class: "warn-body" },
        `Runs out around ${dateTime(w.exhaustsMs)}${reset}. ` +
        `Used ${compact(w.used)} of ${compact(w.limit)}; ` +
        `forecast ${compact(w.forecast_total)} for the window.${suggested}`));
    li.title = `${int(w.used)} used of ${int(w.limit)}; forecast ${int(w.forecast_total)}`;
    return li;
  }));
}
