/*
 * The Keys tab: every key with its limits, and create (secret shown once), edit, rotate
 * (secret shown once), revoke and delete, all through /v1/admin/keys.
 */

import { api, send } from "./api.js";
import {
  KEY_LIMIT_FIELDS, buildForm, button, clearError, closeFormDialog, confirmAction,
  openFormDialog, rowAction, showError, showSecret,
} from "./forms.js";
import { compact, dateTime, int, toMs } from "./format.js";
import { $, el, tracked } from "./page.js";

const KEY_FIELDS = [
  { name: "name", label: "Name", type: "text", placeholder: "e.g. search-backend" },
  { name: "team", label: "Team", type: "text", createOnly: true, list: "team-ids",
    placeholder: "(none)", hint: "fixed for the key's life" },
  { name: "status", label: "Status", type: "select", options: ["active", "disabled"],
    editOnly: true },
  ...KEY_LIMIT_FIELDS,
];

const path = (id) => `/v1/admin/keys/${encodeURIComponent(id)}`;
let keys = [];
let onChange = () => {};

/** `changed` runs after every successful write (the overview is stale then). */
export function setUpKeyAdmin(changed) {
  onChange = changed;
  $("mkeys-new").addEventListener("click", () => openCreate());
  $("mkeys-reload").addEventListener("click", () => loadKeyAdmin());
}

export function loadKeyAdmin() {
  return tracked(async () => {
    const box = $("mkeys-error");
    try {
      const body = await api("/v1/admin/keys?limit=500");
      keys = body.items || [];
      clearError(box);
      render(body.total ?? keys.length);
    } catch (err) {
      showError(box, err);
    }
  });
}

function limitsText(k) {
  const parts = [`${compact(k.rate_per_sec)}/s, burst ${int(k.burst)}`];
  if (k.tokens_per_minute != null) parts.push(`${compact(k.tokens_per_minute)} tok/min`);
  return parts.join(" · ");
}

function render(total) {
  const rows = keys.map((k) => {
    const actions = el("td", { class: "actions" },
      button("Edit", () => openEdit(k), { write: true, data: { action: "edit" } }));
    if (!k.app) {
      actions.append(button("Rotate", () => rotate(k), { write: true, data: { action: "rotate" } }));
    }
    if (k.status === "active") {
      actions.append(button("Revoke", () => revoke(k),
        { write: true, kind: "btn-warn", data: { action: "revoke" } }));
    }
    if (!k.app) {
      actions.append(button("Delete", () => remove(k),
        { write: true, kind: "btn-danger", data: { action: "delete" } }));
    }
    return el("tr", { dataset: { keyId: k.id, status: k.status } },
      el("td", {}, el("span", { class: "key-name" }, k.name || "(unnamed)"),
        k.app ? el("span", { class: "pill" }, `app ${k.app}`) : null),
      el("td", {}, el("code", { class: "key-id" }, k.id),
        k.app ? null : el("div", { class: "muted small", title: "secret hint" }, k.secret_hint)),
      el("td", { class: "nowrap" }, k.team || "–"),
      el("td", {}, el("span", { class: `pill ${k.status}` }, k.status)),
      el("td", { class: "nowrap" }, el("span", { class: `pill prio-${k.priority}` }, k.priority),
        el("span", { class: "muted small" }, ` ≤ ${k.max_priority}`)),
      el("td", { class: "num", title: `${int(k.daily_limit)} / ${int(k.monthly_limit)}` },
        `${compact(k.daily_limit)} / ${compact(k.monthly_limit)}`),
      el("td", { class: "small" }, limitsText(k)),
      el("td", { class: "num" }, k.monthly_budget_usd == null ? "–" : `$${k.monthly_budget_usd}`),
      el("td", { class: "small" }, k.expires_at ? dateTime(toMs(k.expires_at)) : "never"),
      actions,
    );
  });
  if (!rows.length) {
    rows.push(el("tr", { class: "empty" }, el("td", { colspan: "10" }, "No API keys yet.")));
  }
  document.querySelector("#mkeys tbody").replaceChildren(...rows);
  $("mkeys-note").textContent = total > keys.length
    ? `showing ${int(keys.length)} of ${int(total)}` : `${int(total)} key${total === 1 ? "" : "s"}`;
}

function openCreate() {
  const form = buildForm("key-form", KEY_FIELDS.filter((f) => !f.editOnly), {}, {
    submitLabel: "Create key",
    onSubmit: async (body) => {
      const created = await send("POST", "/v1/admin/keys", body);
      showSecret(`Key ${created.name || created.id} created`,
        `Key id ${created.id}. This secret is shown once; only its hash is kept.`,
        created.api_key);
      await done();
    },
  });
  openFormDialog("New API key", form);
}

function openEdit(k) {
  const form = buildForm("key-form", KEY_FIELDS, k, {
    edit: true,
    submitLabel: "Save",
    onSubmit: async (body, _form, box) => {
      if (!Object.keys(body).length) {
        box.textContent = "Nothing changed.";
        box.hidden = false;
        return;
      }
      await send("PATCH", path(k.id), body);
      closeFormDialog();
      await done();
    },
  });
  openFormDialog(`Edit ${k.name || k.id}`, form);
}

async function rotate(k) {
  if (!(await confirmAction(`Rotate ${k.name || k.id}?`,
    "A new secret is issued and the old one stops working at once.", "Rotate"))) return;
  await act(async () => {
    const rotated = await send("POST", `${path(k.id)}/rotate`);
    showSecret(`New secret for ${rotated.name || rotated.id}`,
      `Key id ${rotated.id}. The old secret no longer works. Shown once.`, rotated.api_key);
  });
}

async function revoke(k) {
  if (!(await confirmAction(`Revoke ${k.name || k.id}?`,
    "The key is disabled everywhere within a second; it and its history are kept, and Edit " +
    "can set it active again.", "Revoke"))) return;
  await act(() => send("POST", `${path(k.id)}/revoke`));
}

async function remove(k) {
  if (!(await confirmAction(`Delete ${k.name || k.id}?`,
    "The key stops working at once and cannot be restored; its usage history stays until it " +
    "expires."))) return;
  await act(() => send("DELETE", path(k.id)));
}

/** A row action: its error shown above the table. */
const act = (work) => rowAction($("mkeys-error"), work, done);

async function done() {
  onChange();
  await loadKeyAdmin();
}
