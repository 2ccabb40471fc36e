/* Usage: the summary tiles and the hourly usage chart of the selected scope. */

import {
  COLORS, baseOptions, chartLibraryLoaded, completeHours, draw, empty, stepped, timeValue,
} from "./charts.js";
import { compact, int } from "./format.js";
import { $, state } from "./page.js";

export const HISTORY_HOURS = 168;

/** The admin API path of the history the usage chart shows for `scope` ("" = all keys). */
export function historyPath(scope) {
  return scope
    ? `/v1/admin/keys/${encodeURIComponent(scope)}/history?hours=${HISTORY_HOURS}`
    : `/v1/admin/history?hours=${HISTORY_HOURS}`;
}

// ---- tiles --------------------------------------------------------------------------------
function sumLast(hours, n, field, skip = 0) {
  const end = hours.length - skip;
  return hours.slice(Math.max(0, end - n), end).reduce((s, h) => s + (h[field] || 0), 0);
}

function change(now, before) {
  if (!before) return "";
  const pct = Math.round(((now - before) / before) * 100);
  return `${pct >= 0 ? "+" : ""}${pct}% vs previous 24 h`;
}

export function renderTiles(keysBody, globalHistory) {
  const active = state.keys.filter((k) => k.status === "active").length;
  $("tile-keys").textContent = int(keysBody.total ?? state.keys.length);
  $("tile-keys-sub").textContent = `${int(active)} active · ${int(state.keys.length - active)} disabled`;
  // Whole hours only: the running hour would make "last 24 h" look like a slump.
  const hours = globalHistory ? completeHours(globalHistory.hours || []) : null;
  if (hours) {
    const tokens = sumLast(hours, 24, "total");
    const requests = sumLast(hours, 24, "requests");
    $("tile-tokens").textContent = compact(tokens);
    $("tile-tokens").title = `${int(tokens)} tokens`;
    $("tile-tokens-sub").textContent = change(tokens, sumLast(hours, 24, "total", 24));
    $("tile-requests").textContent = compact(requests);
    $("tile-requests").title = `${int(requests)} requests`;
    $("tile-requests-sub").textContent = change(requests, sumLast(hours, 24, "requests", 24));
  } else {
    for (const id of ["tile-tokens", "tile-requests"]) $(id).textContent = "–";
    for (const id of ["tile-tokens-sub", "tile-requests-sub"]) $(id).textContent = "unavailable";
  }
  const atRisk = state.warnings.size;
  $("tile-warnings").textContent = state.warningsKnown ? int(atRisk) : "–";
  $("tile-warnings").classList.toggle("warn", atRisk > 0);
  $("tile-warnings-sub").textContent = !state.warningsKnown
    ? "forecast unavailable"
    : atRisk ? `key${atRisk > 1 ? "s" : ""} may run out before reset` : "no key at risk";
}

// ---- chart --------------------------------------------------------------------------------
function usageChart(container, hours) {
  const xs = hours.map((h) => h.ts);
  const prompt = hours.map((h) => h.prompt || 0);
  const completion = hours.map((h) => h.completion || 0);
  // Stacked: completion is drawn on top of prompt; the legend shows each part itself.
  const top = prompt.map((p, i) => p + completion[i]);
  // Away from the cursor the legend shows the last complete hour rather than dashes.
  const rest = Math.max(0, completeHours(hours).length - 1);
  const raw = (arr) => (u, v, si, i) => int(arr[i ?? rest]);
  return draw({
    ...baseOptions(container),
    series: [
      { label: "Hour", value: (u, v, si, i) => timeValue(u, xs[i ?? rest]) },
      {
        label: "Prompt tokens", stroke: COLORS.prompt, width: 1.5,
        fill: `${COLORS.prompt}40`, paths: stepped(), points: { show: false },
        value: raw(prompt),
      },
      {
        label: "Completion tokens", stroke: COLORS.completion, width: 1.5,
        paths: stepped(), points: { show: false }, value: raw(completion),
      },
    ],
    bands: [{ series: [2, 1], fill: `${COLORS.completion}55` }],
  }, [xs, prompt, top], container);
}

/** The usage card for `scopeName` from `history` (null: it could not be loaded). */
export function renderUsage(scopeName, history) {
  const container = $("usage-chart");
  container.replaceChildren();
  $("usage-title").textContent = `Usage · ${scopeName} · last ${HISTORY_HOURS / 24} days`;
  if (!chartLibraryLoaded()) {
    empty(container, "The chart library did not load.");
    return;
  }
  const hours = history ? history.hours || [] : null;
  if (!hours) {
    $("usage-sub").textContent = "";
    empty(container, "Usage history unavailable.");
  } else if (!hours.length) {
    $("usage-sub").textContent = "";
    empty(container, "No usage recorded yet.");
  } else {
    const sum = (f) => hours.reduce((s, h) => s + (h[f] || 0), 0);
    const spend = sum("spend_usd") > 0 ? `, $${sum("spend_usd").toFixed(2)} spent` : "";
    $("usage-sub").textContent =
      `${compact(sum("total"))} tokens (prompt ${compact(sum("prompt"))}, completion ` +
      `${compact(sum("completion"))}) and ${int(sum("requests"))} requests in ` +
      `${hours.length} hours${spend}. Tokens per hour, prompt and completion stacked; ` +
      "drag to zoom, double-click to reset.";
    usageChart(container, hours);
  }
}
