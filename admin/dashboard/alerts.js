/*
 * The Alerts tab: alerts that fired and how their delivery went (GET /v1/admin/alerts), and
 * the webhooks they go to (/v1/admin/alerts/webhooks). An admin without alerts answers 404:
 * the tab says so instead of failing.
 */

import { ApiError, api, send } from "./api.js";
import { button, clearError, confirmAction, showError } from "./forms.js";
import { dateTime, int, toMs } from "./format.js";
import { $, el, tracked } from "./page.js";

const WEBHOOKS = "/v1/admin/alerts/webhooks";

export function setUpAlerts() {
  $("alerts-reload").addEventListener("click", () => loadAlerts());
  $("webhook-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const box = $("webhook-error");
    clearError(box);
    const url = $("webhook-url").value.trim();
    try {
      await send("POST", WEBHOOKS, { url });
      $("webhook-url").value = "";
    } catch (err) {
      showError(box, err, $("webhook-form"));
      return;
    }
    await loadAlerts();
  });
}

const absent = (err) => err instanceof ApiError && err.status === 404;

export function loadAlerts() {
  return tracked(async () => {
    const box = $("alerts-error");
    clearError(box);
    let fired = null;
    let hooks = null;
    try {
      [fired, hooks] = await Promise.all([api("/v1/admin/alerts"), api(WEBHOOKS)]);
    } catch (err) {
      if (absent(err)) {
        $("alerts-absent").hidden = false;
        $("alerts-body").hidden = true;
        return;
      }
      showError(box, err);
      return;
    }
    $("alerts-absent").hidden = true;
    $("alerts-body").hidden = false;
    renderFired(fired.items || []);
    renderHooks(hooks.items || hooks.webhooks || []);
  });
}

const pick = (obj, ...names) => names.map((n) => obj[n]).find((v) => v != null);

/** Delivery as text, whether the API gives a string, an object or a list of attempts. */
function delivery(a) {
  const d = pick(a, "delivery", "deliveries", "delivery_status");
  if (d == null) return "–";
  if (typeof d === "string") return d;
  const list = Array.isArray(d) ? d : [d];
  return list.map((x) => (typeof x === "string" ? x
    : [x.webhook || x.url, x.status || x.state, x.code ?? x.http_status, x.error]
      .filter((v) => v != null && v !== "").join(" "))).join("; ");
}

function renderFired(alerts) {
  const rows = alerts.map((a) => {
    const at = pick(a, "at", "fired_at", "created_at");
    return el("tr", { dataset: { alertId: a.id || "" } },
      el("td", { class: "small nowrap" }, at ? dateTime(toMs(at)) : "–"),
      el("td", {}, el("code", {}, pick(a, "kind", "type", "rule") || "alert")),
      el("td", {}, el("code", { class: "key-id" }, pick(a, "key_id", "team", "subject", "scope") || "–")),
      el("td", { class: "small" }, pick(a, "message", "text", "summary") ||
        JSON.stringify(a.threshold ?? a.details ?? "")),
      el("td", { class: "small" }, delivery(a)),
    );
  });
  if (!rows.length) {
    rows.push(el("tr", { class: "empty" }, el("td", { colspan: "5" }, "No alerts have fired.")));
  }
  document.querySelector("#alerts tbody").replaceChildren(...rows);
  $("alerts-note").textContent = `${int(alerts.length)} fired`;
}

function renderHooks(hooks) {
  const rows = hooks.map((h) => el("li", { dataset: { webhookId: h.id || "" } },
    el("code", {}, h.url || h.id),
    h.last_status ? el("span", { class: "muted small" }, ` last: ${h.last_status}`) : null,
    button("Delete", () => removeHook(h), { write: true, kind: "btn-danger" })));
  if (!rows.length) rows.push(el("li", { class: "muted" }, "No webhooks."));
  $("webhooks").replaceChildren(...rows);
}

async function removeHook(h) {
  if (!(await confirmAction("Delete this webhook?", h.url || h.id))) return;
  const box = $("webhook-error");
  clearError(box);
  try {
    await send("DELETE", `${WEBHOOKS}/${encodeURIComponent(h.id)}`);
  } catch (err) {
    showError(box, err);
    return;
  }
  await loadAlerts();
}
