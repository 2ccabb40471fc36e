/*
 * Atlas admin dashboard, the entry module: sign-in, refreshes and the page's controls.
 * Plain JavaScript modules, no build step, no network access beyond the admin API of the
 * origin that served it.
 *
 *   api.js       fetch and the admin token     format.js  numbers and dates
 *   page.js      shared state, banner, ready   charts.js  uPlot plumbing
 *   keys.js      the API keys table            usage.js   tiles and the usage chart
 *   forecast.js  forecast chart, quota warnings and capacity
 *   providers.js upstream providers and pool members: state, errors, latency, spend
 *   forms.js     forms, API errors beside them, dialogs, read-only mode after a 403
 *   keyadmin.js  the Keys tab (create, edit, rotate, revoke, delete)
 *   teams.js     the Teams tab               apps.js    the Apps tab
 *   requests.js  the request log and its exports
 *   audit.js     the audit log               alerts.js  fired alerts and webhooks
 *
 * The tabs other than the overview load when they are opened (and after their own writes).
 * For tests and people alike, <body> carries data-ready="true" once every fetch of the latest
 * refresh has finished and the page shows its outcome, and data-state = ok | partial | error |
 * unauthorized | signed-out, and data-tab names the tab shown.
 */

import {
  adoptStoredToken, api, hasToken, isUnauthorized, mapLimit, signIn, signOut, soft,
  takeTokenFromFragment,
} from "./api.js";
import { loadAlerts, setUpAlerts } from "./alerts.js";
import { setUpApps, loadApps } from "./apps.js";
import { loadAudit, setUpAudit } from "./audit.js";
import { destroyCharts, followWidth } from "./charts.js";
import {
  forecastPath, quotaWarnings, renderForecast, renderWarnings,
} from "./forecast.js";
import { clockTime } from "./format.js";
import { setUpDialogs } from "./forms.js";
import { loadKeyAdmin, setUpKeyAdmin } from "./keyadmin.js";
import { markSelectedRow, renderKeys, renderScopeOptions, scopeName } from "./keys.js";
import {
  $, hideBanner, setReady, showBanner, showProblems, state, tracked,
} from "./page.js";
import { clearProviders, providersPath, renderProviders } from "./providers.js";
import { loadRequests, setUpRequests, showingRequests } from "./requests.js";
import { loadTeams, setUpTeams } from "./teams.js";
import { HISTORY_HOURS, historyPath, renderTiles, renderUsage } from "./usage.js";

const TABS = {
  overview: () => (overviewStale ? refreshAll() : null),
  keys: () => Promise.all([loadKeyAdmin(), loadTeams()]), // teams: the form's team choices
  teams: () => loadTeams(),
  apps: () => Promise.all([loadApps(), loadTeams()]),
  requests: () => loadRequests(),
  audit: () => loadAudit(),
  alerts: () => loadAlerts(),
};
let overviewStale = false; // a write since the overview's last refresh

function showTab(name) {
  if (!(name in TABS)) return;
  document.body.dataset.tab = name;
  for (const b of document.querySelectorAll("#tabs [data-tab]")) {
    b.setAttribute("aria-selected", String(b.dataset.tab === name));
  }
  for (const tab of Object.keys(TABS)) $(`tab-${tab}`).hidden = tab !== name;
  showingRequests(name === "requests");
  TABS[name]();
}

const REFRESH_MS = 60_000;
const USAGE_CONCURRENCY = 6; // per-key usage calls in flight at once

function clearData() {
  state.keys = [];
  state.usage = new Map();
  state.warnings = new Map();
  state.globalHistory = null;
  destroyCharts();
  document.querySelector("#keys tbody").replaceChildren();
  $("warnings").replaceChildren();
  $("usage-chart").replaceChildren();
  $("forecast-chart").replaceChildren();
  clearProviders();
  $("content").hidden = true;
  delete document.body.dataset.readonly; // the next token may write
  $("readonly-note").hidden = true;
  for (const b of document.querySelectorAll("[data-write]")) b.disabled = false;
  for (const tab of Object.keys(TABS)) $(`tab-${tab}`).hidden = tab !== "overview";
  document.body.dataset.tab = "overview";
  showingRequests(false);
  $("refresh").hidden = true;
  $("signout").hidden = true;
  $("updated").textContent = "";
}

function signedOut(reason) {
  signOut();
  state.refreshGen += 1; // answers still on their way are for the old token
  state.chartsGen += 1;
  clearData();
  $("signin").hidden = false;
  $("token-input").value = "";
  if (reason) {
    showBanner("The admin token was rejected.", reason);
    document.body.dataset.state = "unauthorized";
  } else {
    hideBanner();
    document.body.dataset.state = "signed-out";
  }
  $("token-input").focus();
}

function failed(err) {
  if (isUnauthorized(err)) {
    signedOut(`The admin API answered ${err.message}. Enter a valid admin token.`);
  } else {
    const shown = $("content").hidden ? "" : " The figures below are from the last refresh.";
    showBanner("The dashboard could not load its data.", `${err.message}.${shown}`);
    document.body.dataset.state = "error";
  }
}

function refreshAll() {
  const gen = ++state.refreshGen;
  return tracked(async () => {
    const problems = new Map();
    try {
      const keysBody = await api("/v1/admin/keys?limit=500");
      const keys = keysBody.items || [];
      const [capacity, globalHistory, providers, usages] = await Promise.all([
        soft(api("/v1/forecasting/capacity-recommendations"), "Quota forecast", problems),
        soft(api(`/v1/admin/history?hours=${HISTORY_HOURS}`), "Usage history", problems),
        soft(api(providersPath()), "Providers", problems),
        mapLimit(keys, USAGE_CONCURRENCY, (k) =>
          soft(api(`/v1/admin/keys/${encodeURIComponent(k.id)}/usage`), "Key usage", problems)),
      ]);
      if (gen !== state.refreshGen) return;
      overviewStale = false;
      state.keys = keys;
      state.usage = new Map(keys.map((k, i) => [k.id, usages[i]]));
      state.globalHistory = globalHistory;
      state.warnings = quotaWarnings(capacity);
      if (state.scope && !keys.some((k) => k.id === state.scope)) state.scope = "";

      $("signin").hidden = true;
      $("content").hidden = false;
      $("refresh").hidden = false;
      $("signout").hidden = false;
      renderTiles(keysBody, globalHistory);
      renderKeys(keysBody);
      renderWarnings(capacity);
      renderProviders(providers);
      renderScopeOptions();
      await loadCharts(problems, globalHistory);
      if (gen !== state.refreshGen) return;
      $("updated").textContent = `Updated ${clockTime(new Date())}`;
      showProblems(problems);
      document.body.dataset.state = problems.size ? "partial" : "ok";
    } catch (err) {
      if (gen === state.refreshGen) failed(err);
    }
  });
}

function selectScope(scope) {
  if (scope === state.scope) return;
  state.scope = scope;
  $("scope").value = scope;
  markSelectedRow();
  document.body.dataset.selected = scope;
  tracked(async () => {
    const problems = new Map();
    try {
      await loadCharts(problems, null);
      showProblems(problems);
      document.body.dataset.state = problems.size ? "partial" : "ok";
    } catch (err) {
      failed(err);
    }
  });
}

/** History and forecast of the selected scope; both charts drawn together. */
async function loadCharts(problems, globalHistory) {
  const gen = ++state.chartsGen;
  const scope = state.scope;
  const [history, forecast] = await Promise.all([
    !scope && globalHistory
      ? globalHistory
      : soft(api(historyPath(scope)), "Usage history", problems),
    soft(api(forecastPath(scope)), "Forecast", problems),
  ]);
  if (gen !== state.chartsGen) return;
  document.body.dataset.selected = scope;
  destroyCharts();
  const name = scopeName();
  renderUsage(name, history);
  renderForecast(name, forecast, history ? history.hours || [] : []);
}

function start() {
  $("tz").textContent = Intl.DateTimeFormat().resolvedOptions().timeZone || "local";
  followWidth($("usage-chart"));
  followWidth($("forecast-chart"));

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = $("token-input").value.trim();
    if (!token) return;
    signIn(token);
    $("token-input").value = "";
    hideBanner();
    refreshAll();
  });
  $("refresh").addEventListener("click", () => {
    const tab = document.body.dataset.tab || "overview";
    if (tab === "overview") refreshAll();
    else TABS[tab]();
  });
  $("tabs").addEventListener("click", (ev) => {
    const b = ev.target.closest("[data-tab]");
    if (b) showTab(b.dataset.tab);
  });
  const changed = () => {
    overviewStale = true;
  };
  setUpDialogs();
  setUpKeyAdmin(changed);
  setUpTeams(changed);
  setUpApps(changed);
  setUpRequests();
  setUpAudit();
  setUpAlerts();
  $("signout").addEventListener("click", () => signedOut(null));
  $("scope").addEventListener("change", (ev) => selectScope(ev.target.value));
  const pick = (ev) => {
    const row = ev.target.closest("[data-key-id]");
    if (row) selectScope(row.dataset.keyId);
  };
  for (const id of ["keys", "warnings"]) {
    $(id).addEventListener("click", pick);
    $(id).addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") {
        ev.preventDefault();
        pick(ev);
      }
    });
  }
  window.addEventListener("hashchange", () => {
    takeTokenFromFragment();
    if (adoptStoredToken()) refreshAll();
  });
  setInterval(() => {
    if (hasToken() && state.inflight === 0 && document.visibilityState === "visible" &&
        (document.body.dataset.tab || "overview") === "overview") {
      refreshAll();
    }
  }, REFRESH_MS);

  takeTokenFromFragment();
  if (adoptStoredToken()) {
    refreshAll();
  } else {
    signedOut(null);
    setReady(true);
  }
}

start();
