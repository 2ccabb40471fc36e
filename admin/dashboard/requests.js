/*
 * The Requests tab: the request log (GET /v1/admin/requests), filtered, newest first, paged
 * by cursor, polled while the tab is open; exports (CSV, JSON lines) fetched with the token
 * and saved as a download. Token counts the upstream reported are "exact"; the others are
 * Atlas's estimates and are marked so.
 */

import { ApiError, api, download } from "./api.js";
import { clearError, showError } from "./forms.js";
import { clockTime, dateTime, int, toMs } from "./format.js";
import { $, el, tracked } from "./page.js";

const POLL_MS = 3000;
const TEXT_FILTERS = ["key_id", "team", "app", "end_user", "model", "provider", "status",
  "outcome"];

let items = [];
let cursor = null;
let busy = false;
let active = false; // the tab is shown
let cursorUsed = false; // a later page is shown

export function setUpRequests() {
  $("req-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    loadRequests();
  });
  $("req-refresh").addEventListener("click", () => loadRequests());
  $("req-more").addEventListener("click", () => loadRequests({ more: true }));
  $("req-csv").addEventListener("click", () => exportAs("csv"));
  $("req-jsonl").addEventListener("click", () => exportAs("jsonl"));
  setInterval(() => {
    // Only the first page is polled: a reader paging back is not pulled to the top.
    if (active && !busy && $("req-live").checked && !cursorUsed &&
        document.visibilityState === "visible") {
      loadRequests({ quiet: true });
    }
  }, POLL_MS);
}

export function showingRequests(shown) {
  active = shown;
}

/** The filters as query parameters (without limit and cursor). */
function filters() {
  const params = new URLSearchParams();
  for (const name of ["since", "until"]) {
    const v = $(`req-${name}`).value;
    if (v) params.set(name, new Date(v).toISOString());
  }
  for (const name of TEXT_FILTERS) {
    const v = $(`req-${name.replace("_", "-")}`).value.trim();
    if (v) params.set(name, v);
  }
  return params;
}

/** The first page for the filters; `more`: the next page after those shown. `quiet` (a
 * poll) does not mark the page busy, so a test's "settled" is not held up by polling. */
export async function loadRequests({ more = false, quiet = false } = {}) {
  const work = async () => {
    busy = true;
    const box = $("req-error");
    const params = filters();
    params.set("limit", $("req-limit").value || "100");
    if (more && cursor) params.set("cursor", cursor);
    try {
      const body = await api(`/v1/admin/requests?${params}`);
      clearError(box);
      $("req-absent").hidden = true;
      items = more ? items.concat(body.items || []) : body.items || [];
      cursor = body.next_cursor || null;
      cursorUsed = more;
      render();
      $("req-updated").textContent = `updated ${clockTime(new Date())}`;
    } catch (err) {
      if (err instanceof ApiError && err.status === 404 && !more) {
        $("req-absent").hidden = false; // this admin has no request log (yet)
        $("req-live").checked = false;
      } else {
        showError(box, err);
      }
    } finally {
      busy = false;
    }
  };
  return quiet ? work() : tracked(work);
}

function tokens(r) {
  const cell = el("td", { class: `num tokens ${r.exact ? "exact" : "estimated"}`,
    title: r.exact ? "reported by the upstream" : "estimated by Atlas (the upstream reported none)" },
  `${int(r.prompt_tokens)} + ${int(r.completion_tokens)}`);
  if (r.cached_tokens) cell.append(el("span", { class: "muted small" }, ` (${int(r.cached_tokens)} cached)`));
  cell.append(el("span", { class: `pill ${r.exact ? "tone-ok" : "tone-warn"}` },
    r.exact ? "exact" : "est."));
  return cell;
}

function usd(v) {
  if (v == null) return "–";
  const n = Number(v);
  if (n === 0) return "$0";
  return n < 0.01 ? `$${n.toPrecision(2)}` : `$${n.toFixed(4)}`;
}

const tone = (outcome) => ({ completed: "tone-ok", released: "", refused: "tone-warn" }[outcome]
  ?? "tone-bad");

function render() {
  const rows = items.map((r) => el("tr", { dataset: { requestId: r.request_id || "", keyId: r.key_id || "",
    outcome: r.outcome, exact: String(Boolean(r.exact)) } },
    el("td", { class: "small nowrap", title: r.at }, dateTime(toMs(r.at))),
    el("td", {}, el("code", { class: "key-id" }, r.key_id || "–"),
      r.request_id ? el("div", { class: "muted small mono" }, r.request_id) : null),
    el("td", { class: "small" }, [r.team, r.app, r.end_user].map((v) => v || "–").join(" / ")),
    el("td", { class: "small" }, r.model || "–",
      r.provider ? el("div", { class: "muted" }, r.provider) : null),
    el("td", { class: "num" }, r.status == null ? "–" : String(r.status)),
    el("td", {}, el("span", { class: `pill ${tone(r.outcome)}` }, r.outcome),
      r.reason ? el("div", { class: "muted small" }, r.reason) : null),
    tokens(r),
    el("td", { class: "num", title: r.spend_usd == null ? null : `$${r.spend_usd}` },
      usd(r.spend_usd)),
    el("td", { class: "num" }, r.latency_ms == null ? "–" : `${int(Math.round(r.latency_ms))} ms`),
    el("td", { class: "small" }, `${r.priority || "–"}${r.stream ? " · stream" : ""}`),
  ));
  if (!rows.length) {
    rows.push(el("tr", { class: "empty" }, el("td", { colspan: "10" },
      "No requests match these filters.")));
  }
  document.querySelector("#requests tbody").replaceChildren(...rows);
  $("req-more").hidden = !cursor;
  const estimated = items.filter((r) => !r.exact).length;
  $("req-note").textContent = `${int(items.length)} shown${cursor ? " (more below)" : ""}` +
    (estimated ? ` · ${int(estimated)} with estimated tokens` : "");
}

function exportAs(format) {
  const params = filters();
  params.set("format", format);
  const box = $("req-error");
  clearError(box);
  return tracked(async () => {
    try {
      const stamp = new Date().toISOString().replace(/[:.]/g, "-");
      await download(`/v1/admin/requests/export?${params}`, `atlas-requests-${stamp}.${format}`);
    } catch (err) {
      showError(box, err);
    }
  });
}
