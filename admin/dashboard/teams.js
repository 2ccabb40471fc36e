/*
 * The Teams tab: teams (limits over all their keys) through /v1/admin/teams: create, edit,
 * delete (refused while a team has keys), and a team's usage.
 */

import { api, send } from "./api.js";
import {
  buildForm, button, clearError, closeFormDialog, confirmAction, facts, openFormDialog,
  rowAction, showError,
} from "./forms.js";
import { compact, dateTime, int, toMs } from "./format.js";
import { $, el, tracked } from "./page.js";

const TEAM_FIELDS = [
  { name: "id", label: "Team id", type: "text", createOnly: true, required: true,
    placeholder: "research", hint: "lowercase letters, digits and '-', up to 32" },
  { name: "name", label: "Name", type: "text" },
  { name: "daily_limit", label: "Daily tokens", type: "int", nullable: true },
  { name: "monthly_limit", label: "Monthly tokens", type: "int", nullable: true },
  { name: "rate_per_sec", label: "Requests/s", type: "num", nullable: true },
  { name: "burst", label: "Burst", type: "int", nullable: true },
  { name: "tokens_per_minute", label: "Tokens/min", type: "int", nullable: true },
  { name: "monthly_budget_usd", label: "Budget, USD/month", type: "num", nullable: true },
  { name: "window_timezone", label: "Time zone", type: "text", placeholder: "(server's)",
    nullable: true,
    hint: "IANA zone of the windows; fixed once the team has keys" },
];

const path = (id) => `/v1/admin/teams/${encodeURIComponent(id)}`;
let onChange = () => {};

export function setUpTeams(changed) {
  onChange = changed;
  $("teams-new").addEventListener("click", openCreate);
  $("teams-reload").addEventListener("click", () => loadTeams());
}

export function loadTeams() {
  return tracked(async () => {
    const box = $("teams-error");
    try {
      const body = await api("/v1/admin/teams?limit=500");
      clearError(box);
      render(body.items || []);
    } catch (err) {
      showError(box, err);
    }
  });
}

const orNone = (v, fmt = compact) => (v == null ? "–" : fmt(v));

function render(teams) {
  // Also what the key and app forms offer for their team field.
  $("team-ids").replaceChildren(...teams.map((t) => el("option", { value: t.id }, t.name)));
  const rows = teams.map((t) => el("tr", { dataset: { teamId: t.id } },
    el("td", {}, el("code", {}, t.id)),
    el("td", {}, t.name || "–"),
    el("td", { class: "num" }, int(t.keys)),
    el("td", { class: "num" }, `${orNone(t.daily_limit)} / ${orNone(t.monthly_limit)}`),
    el("td", { class: "small" }, [
      t.rate_per_sec != null ? `${compact(t.rate_per_sec)}/s` : null,
      t.burst != null ? `burst ${int(t.burst)}` : null,
      t.tokens_per_minute != null ? `${compact(t.tokens_per_minute)} tok/min` : null,
    ].filter(Boolean).join(" · ") || "–"),
    el("td", { class: "num" }, t.monthly_budget_usd == null ? "–" : `$${t.monthly_budget_usd}`),
    el("td", { class: "small" }, t.window_timezone || "(server's)"),
    el("td", { class: "actions" },
      button("Usage", () => showUsage(t), { data: { action: "usage" } }),
      button("Edit", () => openEdit(t), { write: true, data: { action: "edit" } }),
      button("Delete", () => remove(t),
        { write: true, kind: "btn-danger", data: { action: "delete" } })),
  ));
  if (!rows.length) {
    rows.push(el("tr", { class: "empty" }, el("td", { colspan: "8" },
      "No teams yet. A team's limits apply over all of its keys.")));
  }
  document.querySelector("#teams tbody").replaceChildren(...rows);
  $("teams-note").textContent = `${int(teams.length)} team${teams.length === 1 ? "" : "s"}`;
}

function openCreate() {
  openFormDialog("New team", buildForm("team-form", TEAM_FIELDS, {}, {
    submitLabel: "Create team",
    onSubmit: async (body) => {
      await send("POST", "/v1/admin/teams", body);
      closeFormDialog();
      await done();
    },
  }));
}

function openEdit(t) {
  openFormDialog(`Edit team ${t.id}`, buildForm("team-form", TEAM_FIELDS, t, {
    edit: true,
    submitLabel: "Save",
    onSubmit: async (body) => {
      await send("PATCH", path(t.id), body);
      closeFormDialog();
      await done();
    },
  }));
}

async function showUsage(t) {
  const box = $("teams-error");
  clearError(box);
  try {
    const u = await api(`${path(t.id)}/usage`);
    const win = (w) => `${int(w.used)} of ${int(w.limit)} tokens (${int(w.reserved)} reserved), ` +
      `${int(w.requests)} requests, $${w.spend_usd.toFixed(4)}; resets ${dateTime(toMs(w.resets_at))}`;
    openFormDialog(`Team ${t.id}: usage`, facts([
      ["Today", win(u.daily)],
      ["This month", win(u.monthly)],
      ["Budget", u.monthly_budget_usd == null ? "none" : `$${u.monthly_budget_usd}/month`],
      ["Keys", u.key_ids.length ? u.key_ids.join(", ") : "none"],
    ]));
  } catch (err) {
    showError(box, err);
  }
}

async function remove(t) {
  if (!(await confirmAction(`Delete team ${t.id}?`,
    "Only a team without keys can be deleted."))) return;
  await rowAction($("teams-error"), () => send("DELETE", path(t.id)), done);
}

async function done() {
  onChange();
  await loadTeams();
}
