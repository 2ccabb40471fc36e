/*
 * The Apps tab: internal apps, known by their mTLS principals and/or a shared secret,
 * through /v1/admin/apps: create (the shared secret shown once), edit, rotate the secret,
 * delete.
 */

import { api, send } from "./api.js";
import {
  KEY_LIMIT_FIELDS, buildForm, button, clearError, closeFormDialog, confirmAction,
  openFormDialog, rowAction, showError, showSecret,
} from "./forms.js";
import { compact, int } from "./format.js";
import { $, el, tracked } from "./page.js";

const APP_FIELDS = [
  { name: "id", label: "App id", type: "text", createOnly: true, required: true,
    placeholder: "checkout", hint: "a slug: what x-atlas-app-id names" },
  { name: "name", label: "Name", type: "text" },
  { name: "team", label: "Team", type: "text", createOnly: true, list: "team-ids",
    placeholder: "(none)" },
  { name: "status", label: "Status", type: "select", options: ["active", "disabled"],
    editOnly: true },
  { name: "principals", label: "mTLS principals, one a line", type: "lines", wide: true,
    placeholder: "spiffe://cluster.local/ns/shop/sa/checkout" },
  { name: "shared_secret", label: "Issue a shared secret", type: "check", createOnly: true },
  ...KEY_LIMIT_FIELDS,
];

const path = (id) => `/v1/admin/apps/${encodeURIComponent(id)}`;
let onChange = () => {};

export function setUpApps(changed) {
  onChange = changed;
  $("apps-new").addEventListener("click", openCreate);
  $("apps-reload").addEventListener("click", () => loadApps());
}

export function loadApps() {
  return tracked(async () => {
    const box = $("apps-error");
    try {
      const body = await api("/v1/admin/apps?limit=500");
      clearError(box);
      render(body.items || []);
    } catch (err) {
      showError(box, err);
    }
  });
}

function render(apps) {
  const rows = apps.map((a) => el("tr", { dataset: { appId: a.app, keyId: a.id } },
    el("td", {}, el("code", {}, a.app), a.name ? el("div", { class: "small" }, a.name) : null),
    el("td", {}, el("code", { class: "key-id" }, a.id)),
    el("td", {}, a.team || "–"),
    el("td", {}, el("span", { class: `pill ${a.status}` }, a.status)),
    el("td", { class: "small principals" },
      ...(a.principals.length ? a.principals.map((p) => el("div", {}, p)) : ["–"])),
    el("td", {}, a.has_shared_secret ? "yes" : "no"),
    el("td", { class: "num" }, `${compact(a.daily_limit)} / ${compact(a.monthly_limit)}`),
    el("td", { class: "small" }, `${compact(a.rate_per_sec)}/s, burst ${int(a.burst)}`),
    el("td", { class: "actions" },
      button("Edit", () => openEdit(a), { write: true, data: { action: "edit" } }),
      button(a.has_shared_secret ? "Rotate secret" : "Issue secret", () => rotate(a),
        { write: true, data: { action: "rotate" } }),
      button("Delete", () => remove(a),
        { write: true, kind: "btn-danger", data: { action: "delete" } })),
  ));
  if (!rows.length) {
    rows.push(el("tr", { class: "empty" }, el("td", { colspan: "9" },
      "No apps yet. An app is a service known by its mTLS identity or a shared secret.")));
  }
  document.querySelector("#apps tbody").replaceChildren(...rows);
  $("apps-note").textContent = `${int(apps.length)} app${apps.length === 1 ? "" : "s"}`;
}

function openCreate() {
  const fields = APP_FIELDS.filter((f) => !f.editOnly);
  openFormDialog("New app", buildForm("app-form", fields, {}, {
    submitLabel: "Create app",
    onSubmit: async (body) => {
      const created = await send("POST", "/v1/admin/apps", body);
      if (created.app_secret) {
        showSecret(`App ${created.app} created`,
          `Send it as x-atlas-app-secret with x-atlas-app-id: ${created.app}. Shown once.`,
          created.app_secret);
      } else {
        closeFormDialog();
      }
      await done();
    },
  }));
}

function openEdit(a) {
  openFormDialog(`Edit app ${a.app}`, buildForm("app-form", APP_FIELDS, a, {
    edit: true,
    submitLabel: "Save",
    onSubmit: async (body) => {
      await send("PATCH", path(a.app), body);
      closeFormDialog();
      await done();
    },
  }));
}

async function rotate(a) {
  if (a.has_shared_secret && !(await confirmAction(`Rotate the secret of ${a.app}?`,
    "The old shared secret stops working at once.", "Rotate"))) return;
  await act(async () => {
    const rotated = await send("POST", `${path(a.app)}/rotate-secret`);
    showSecret(`New shared secret for ${rotated.app}`,
      `Send it as x-atlas-app-secret with x-atlas-app-id: ${rotated.app}. Shown once.`,
      rotated.app_secret);
  });
}

async function remove(a) {
  if (!(await confirmAction(`Delete app ${a.app}?`,
    "Its principals and secret stop identifying anything at once."))) return;
  await act(() => send("DELETE", path(a.app)));
}

/** A row action: its error shown above the table. */
const act = (work) => rowAction($("apps-error"), work, done);

async function done() {
  onChange();
  await loadApps();
}
