/* The API keys panel: one row per key with its quotas, and the chart scope picker. */

import { compact, dateTime, inHowLong, int, toMs } from "./format.js";
import { $, el, state } from "./page.js";

export function keyName(id) {
  const key = state.keys.find((k) => k.id === id);
  return key ? key.name || key.id : id;
}

/** What the charts show: the selected key's name, or all keys. */
export function scopeName() {
  return state.scope ? keyName(state.scope) : "all keys";
}

function quotaCell(win, fallbackLimit) {
  const used = win ? win.used : null;
  const limit = win ? win.limit : fallbackLimit;
  const reserved = win ? win.reserved || 0 : 0;
  const pct = limit > 0 ? (used / limit) * 100 : used > 0 ? 100 : 0;
  const bar = el("div", { class: "bar" });
  const usedBar = el("span", { class: "used" });
  const reservedBar = el("span", { class: "reserved" });
  if (win) {
    usedBar.style.width = `${Math.min(100, pct)}%`;
    reservedBar.style.left = `${Math.min(100, pct)}%`;
    reservedBar.style.width = `${limit > 0 ? Math.min(100 - Math.min(100, pct), (reserved / limit) * 100) : 0}%`;
    if (pct >= 95) bar.classList.add("bad");
    else if (pct >= 80) bar.classList.add("warn");
  }
  bar.append(usedBar, reservedBar);
  const text = el("div", { class: "quota-text" },
    `${compact(used)} / ${compact(limit)} `,
    el("span", { class: "muted" }, win ? `${Math.round(pct)}%` : ""));
  const title = win
    ? `${int(used)} of ${int(limit)} tokens used, ${int(reserved)} reserved, ` +
      `${int(win.remaining)} remaining; ${int(win.requests)} requests; ` +
      `resets ${dateTime(toMs(win.resets_at))}`
    : "usage unavailable";
  return el("td", { title }, el("div", { class: "quota" }, text, bar));
}

export function renderKeys(keysBody) {
  const tbody = document.querySelector("#keys tbody");
  const rows = state.keys.map((key) => {
    const usage = state.usage.get(key.id);
    const warns = state.warnings.get(key.id) || [];
    const nameCell = el("td", {}, el("span", { class: "key-name" }, key.name || "(unnamed)"));
    if (warns.length) {
      const windows = [...new Set(warns.map((w) => w.window))].join(" + ");
      const first = Math.min(...warns.map((w) => w.exhaustsMs));
      nameCell.append(el("span", {
        class: "badge-warn",
        title: `Forecast to use up its ${windows} quota ${inHowLong(first)} (${dateTime(first)}), before it resets`,
      }, `! ${windows} quota`));
    }
    const tr = el("tr", { tabindex: "0", dataset: { keyId: key.id } },
      nameCell,
      el("td", {}, el("code", { class: "key-id" }, key.id)),
      el("td", {}, el("span", { class: `pill ${key.status}` }, key.status)),
      el("td", {}, el("span", {
        class: `pill prio-${key.priority}`, title: `may ask up to ${key.max_priority}`,
      }, key.priority)),
      quotaCell(usage && usage.daily, key.daily_limit),
      quotaCell(usage && usage.monthly, key.monthly_limit),
      el("td", { class: "num" }, usage ? int(usage.open_reservations) : "–"),
    );
    if (warns.length) tr.dataset.warning = "true";
    return tr;
  });
  if (!rows.length) {
    rows.push(el("tr", { class: "empty" }, el("td", { colspan: "7" },
      "No API keys yet. Create one in the Keys tab (or POST /v1/admin/keys).")));
  }
  tbody.replaceChildren(...rows);
  const total = keysBody.total ?? state.keys.length;
  $("keys-note").textContent = total > state.keys.length
    ? `showing ${int(state.keys.length)} of ${int(total)}`
    : `${int(total)} key${total === 1 ? "" : "s"} · click one to chart it`;
  markSelectedRow();
}

export function markSelectedRow() {
  for (const tr of document.querySelectorAll("#keys tbody tr[data-key-id]")) {
    tr.classList.toggle("selected", tr.dataset.keyId === state.scope);
  }
}

export function renderScopeOptions() {
  const select = $("scope");
  const options = [el("option", { value: "" }, "All keys")];
  for (const key of state.keys) {
    options.push(el("option", { value: key.id }, `${key.name || "(unnamed)"} · ${key.id}`));
  }
  select.replaceChildren(...options);
  select.value = state.scope;
}
