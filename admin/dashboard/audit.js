/*
 * The Audit tab: admin changes, newest first (GET /v1/admin/audit), optionally for one key,
 * a page at a time.
 */

import { api } from "./api.js";
import { clearError, showError } from "./forms.js";
import { dateTime, int, toMs } from "./format.js";
import { $, el, tracked } from "./page.js";

const PAGE = 50;
let pages = []; // the `before` cursor of each page shown so far ("" = newest)
let next = null;

export function setUpAudit() {
  $("audit-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    loadAudit();
  });
  $("audit-older").addEventListener("click", () => {
    if (next) loadAudit(next);
  });
  $("audit-newer").addEventListener("click", () => {
    pages.pop();
    loadAudit(pages.pop() || "");
  });
}

/** The page before `before` ("" = the newest). */
export function loadAudit(before = "") {
  return tracked(async () => {
    const box = $("audit-error");
    const params = new URLSearchParams({ limit: String(PAGE) });
    const keyId = $("audit-key").value.trim();
    if (keyId) params.set("key_id", keyId);
    if (before) params.set("before", before);
    try {
      const body = await api(`/v1/admin/audit?${params}`);
      clearError(box);
      if (!before) pages = [];
      pages.push(before);
      next = body.next_before;
      render(body.entries || []);
    } catch (err) {
      showError(box, err);
    }
  });
}

/** The fields a change touched, as "field: before → after". */
function changes(entry) {
  const b = entry.before || {};
  const a = entry.after || {};
  if (!entry.before) return "created";
  if (!entry.after) return "deleted";
  const out = [];
  for (const k of new Set([...Object.keys(b), ...Object.keys(a)])) {
    if (k === "updated_at") continue;
    if (JSON.stringify(b[k]) !== JSON.stringify(a[k])) {
      out.push(`${k}: ${JSON.stringify(b[k] ?? null)} → ${JSON.stringify(a[k] ?? null)}`);
    }
  }
  return out.join("; ") || "no field changed";
}

function render(entries) {
  const rows = entries.map((e) => el("tr", { dataset: { entryId: e.id, action: e.action } },
    el("td", { class: "small nowrap" }, e.at ? dateTime(toMs(e.at)) : "–"),
    el("td", {}, el("code", {}, e.action)),
    el("td", {}, el("code", { class: "key-id" }, e.key_id || e.subject || "–")),
    el("td", { class: "small" }, typeof e.actor === "string" ? e.actor : JSON.stringify(e.actor)),
    el("td", { class: "small" }, e.client || "–"),
    el("td", { class: "small changes" }, changes(e)),
  ));
  if (!rows.length) {
    rows.push(el("tr", { class: "empty" }, el("td", { colspan: "6" }, "No entries.")));
  }
  document.querySelector("#audit tbody").replaceChildren(...rows);
  $("audit-older").disabled = !next;
  $("audit-newer").disabled = pages.length < 2;
  $("audit-note").textContent = `page ${int(pages.length)} · ${int(entries.length)} entries`;
}
