/*
 * The providers panel: one table with a row per upstream provider and a sub-row per pool
 * member, from GET /v1/admin/providers. It answers "is an upstream in trouble right now?":
 * state (cooling, ejected, breaker open), error rate, latency, rate-limit headroom, spend.
 *
 * Names, URLs and reasons come from the providers file, so everything goes in as text
 * (page.el never parses markup).
 */

import { compact, dateTime, inHowLong, int, toMs } from "./format.js";
import { $, el } from "./page.js";

const PROVIDERS_WINDOW_S = 900;
export const providersPath = () => `/v1/admin/providers?window_s=${PROVIDERS_WINDOW_S}`;

const COLUMNS = 9;
// "until 14:03:27": 24-hour clock whatever the locale, so it reads like a log line.
const untilFmt = new Intl.DateTimeFormat(undefined, {
  hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
});
const usdFmt = new Intl.NumberFormat("en", {
  style: "currency", currency: "USD", minimumFractionDigits: 2, maximumFractionDigits: 4,
});
// Badge colour by state: the words come from the API, the tone is ours.
const TONE = {
  active: "ok", closed: "ok", cooling: "warn", over_limit: "warn", ejected: "bad", open: "bad",
};

/** "120", "1.2s", "–": short enough for three quantiles in one cell. */
function duration(ms) {
  if (ms == null || Number.isNaN(ms)) return "–";
  if (ms < 1000) return `${Math.round(ms)}`;
  return `${(ms / 1000).toFixed(ms < 10_000 ? 1 : 0)}s`;
}

function quantilesCell(q, what) {
  const p = q || {};
  const text = [p.p50, p.p95, p.p99].map(duration).join(" · ");
  const title = `${what} p50 ${duration(p.p50)}, p95 ${duration(p.p95)}, p99 ${duration(p.p99)}`
    + " (ms unless marked s)";
  return el("td", { class: "num quantiles", title }, text);
}

function badge(state, cls = "state", label = null) {
  const word = state || "unknown";
  return el("span", { class: `${cls} pill tone-${TONE[word] || "none"}` }, label || word);
}

/** The state badge (its text is exactly the state), then why and until when. */
function stateCell(item, extra = []) {
  const details = [];
  if (item.state === "cooling" && item.cooling_until != null) {
    const ms = toMs(item.cooling_until);
    details.push(el("span", { title: `${dateTime(ms)}, ${inHowLong(ms)}` },
      `until ${untilFmt.format(new Date(ms))}`));
  }
  if (item.cooling_reason) details.push(`reason ${item.cooling_reason}`);
  details.push(...extra);
  const detail = details.length
    ? el("span", { class: "state-detail" }, ...details.flatMap((d, i) => (i ? [" · ", d] : [d])))
    : null;
  return el("td", { class: "col-state" }, badge(item.state), detail);
}

function hostNotes(p) {
  const notes = [];
  if (p.circuit_breaker === "open") notes.push(badge("open", "breaker", "breaker open"));
  const ejected = p.ejected_hosts || 0;
  if (ejected) notes.push(`${int(ejected)} host${ejected === 1 ? "" : "s"} ejected`);
  if (p.healthy_hosts === 0) notes.push("no healthy host");
  return notes;
}

function errorCell(item) {
  const rate = item.error_rate;
  const limited = item.rate_limited ? `, ${int(item.rate_limited)} of them 429` : "";
  const title = `${int(item.errors)} of ${int(item.requests)} failed (429, 401/403, 5xx, none)`
    + limited;
  const cell = el("td", { class: "num", title },
    item.requests ? `${(rate * 100).toFixed(1)}%` : "–");
  if (item.requests && rate >= 0.2) cell.classList.add("bad");
  else if (item.requests && rate >= 0.05) cell.classList.add("warn");
  return cell;
}

/** "12 / 500" and a bar; the limit may be unknown (null: the member sets none). */
function limitCell(win, unit) {
  if (!win) return el("td", { class: "num muted" }, "–");
  const { used, limit } = win;
  const text = `${compact(used)} / ${limit == null ? "∞" : compact(limit)}`;
  const title = limit == null
    ? `${int(used)} ${unit} in the last minute, no limit set`
    : `${int(used)} of ${int(limit)} ${unit} in the last minute`;
  const cell = el("td", { class: "num", title }, el("div", { class: "limit-text" }, text));
  if (limit > 0) {
    const pct = Math.min(100, ((used || 0) / limit) * 100);
    const bar = el("div", { class: "bar" }, el("span", { class: "used" }));
    bar.firstChild.style.width = `${pct}%`;
    if (pct >= 95) bar.classList.add("bad");
    else if (pct >= 80) bar.classList.add("warn");
    cell.append(bar);
  }
  return cell;
}

/** A provider's headroom: its members' used and limits added up (no limit if any has none). */
function pooled(members, field) {
  if (!members.length) return null;
  const wins = members.map((m) => m[field] || { used: 0, limit: null });
  const used = wins.reduce((s, w) => s + (w.used || 0), 0);
  const limit = wins.some((w) => w.limit == null) ? null : wins.reduce((s, w) => s + w.limit, 0);
  return { used, limit };
}

function spendCell(usage) {
  if (!usage) return el("td", { class: "num muted" }, "–");
  const title = `${int(usage.requests)} settled requests, ${int(usage.prompt_tokens)} prompt + ` +
    `${int(usage.completion_tokens)} completion tokens`;
  return el("td", { class: "num", title }, usdFmt.format(usage.spend_usd || 0));
}

function figures(item, members) {
  return [
    el("td", { class: "num", title: `${int(item.requests)} requests` }, compact(item.requests)),
    errorCell(item),
    quantilesCell(item.latency_ms, "latency"),
    quantilesCell(item.ttfb_ms, "time to first byte"),
    limitCell(members ? pooled(members, "rpm") : item.rpm, "requests"),
    limitCell(members ? pooled(members, "tpm") : item.tpm, "tokens"),
    spendCell(item.usage),
  ];
}

function providerRow(p) {
  const name = el("td", { class: "col-name" },
    el("span", { class: "provider-name" }, p.name),
    el("span", { class: "provider-where", title: p.base_url || "" },
      [p.api, p.base_url].filter(Boolean).join(" · ")));
  const tr = el("tr", { class: "provider", dataset: { provider: p.name } },
    name, stateCell(p, hostNotes(p)), ...figures(p, p.members || []));
  tr.dataset.state = p.state || "unknown";
  return tr;
}

function memberRow(p, m) {
  const tr = el("tr", { class: "member", dataset: { member: m.id, memberOf: p.name } },
    el("td", { class: "col-name" }, el("code", { class: "member-id" }, m.id)),
    stateCell(m), ...figures(m, null));
  tr.dataset.state = m.state || "unknown";
  return tr;
}

function note(body, providers) {
  const members = providers.reduce((s, p) => s + (p.members || []).length, 0);
  const minutes = Math.round((body.window_s || PROVIDERS_WINDOW_S) / 60);
  const parts = [`${int(providers.length)} provider${providers.length === 1 ? "" : "s"}`];
  if (members) parts.push(`${int(members)} pool member${members === 1 ? "" : "s"}`);
  parts.push(`last ${int(minutes)} min`);
  return parts.join(" · ");
}

/** Draws the panel from the API's answer; `body` null (the call failed) keeps what is shown. */
export function renderProviders(body) {
  const panel = $("providers");
  if (!body) {
    if (panel.dataset.configured) {
      $("providers-note").textContent = "unavailable now: figures from the last refresh";
    }
    return;
  }
  const providers = body.providers || [];
  panel.dataset.configured = body.configured ? "true" : "false";
  $("providers-empty").hidden = Boolean(body.configured);
  $("providers-table").hidden = !body.configured;
  $("providers-note").textContent = body.configured ? note(body, providers) : "";
  const rows = [];
  for (const p of providers) {
    rows.push(providerRow(p));
    for (const m of p.members || []) rows.push(memberRow(p, m));
  }
  if (body.configured && !rows.length) {
    rows.push(el("tr", { class: "empty" }, el("td", { colspan: String(COLUMNS) },
      "The providers file lists no providers.")));
  }
  document.querySelector("#providers-table tbody").replaceChildren(...rows);
}

export function clearProviders() {
  delete $("providers").dataset.configured;
  document.querySelector("#providers-table tbody").replaceChildren();
  $("providers-note").textContent = "";
}
