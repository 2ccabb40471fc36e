/*
 * Atlas admin dashboard. Plain JavaScript, no build step, no network access beyond the
 * admin API of the origin that served it.
 *
 * Charts: uPlot v1.6.32 (MIT, https://github.com/leeoniya/uPlot), vendored unchanged from the
 * npm registry package "uplot@1.6.32" (dist/uPlot.iife.min.js) in vendor/; see vendor/README.md.
 *
 * Everything shown comes from the admin JSON API, called with `Authorization: Bearer <token>`.
 * The token is typed into the form or passed once as `#token=...` (a fragment is never sent
 * to a server); it is kept in sessionStorage (this tab only) and removed from the URL at once.
 *
 * For tests and people alike, <body> carries data-ready="true" once every fetch of the latest
 * refresh has finished and the page shows its outcome, and data-state = ok | partial | error |
 * unauthorized | signed-out.
 */
"use strict";

(() => {
  const TOKEN_KEY = "atlas.adminToken";
  const HISTORY_HOURS = 168;
  const FORECAST_HOURS = 48;
  const FORECAST_CONTEXT_HOURS = 96; // history shown before the forecast, so it stays readable
  const REFRESH_MS = 60_000;
  const USAGE_CONCURRENCY = 6; // per-key usage calls in flight at once
  const COLORS = {
    prompt: "#2f6fe4",
    completion: "#f08c2e",
    actual: "#1c2433",
    forecast: "#7c3aed",
    axis: "#667085",
    grid: "#eef1f5",
  };

  const $ = (id) => document.getElementById(id);
  const state = {
    token: null,
    keys: [],
    usage: new Map(), // key id -> usage body
    warnings: new Map(), // key id -> [warning]
    warningsKnown: false, // the quota forecast answered
    globalHistory: null,
    scope: "", // "" = all keys
    charts: [],
    inflight: 0,
    chartsGen: 0,
    refreshGen: 0,
  };

  // ---- formatting -------------------------------------------------------------------------
  const compactFmt = new Intl.NumberFormat("en", { notation: "compact", maximumFractionDigits: 1 });
  const intFmt = new Intl.NumberFormat("en");
  const dateTimeFmt = new Intl.DateTimeFormat(undefined, {
    weekday: "short", day: "numeric", month: "short", hour: "2-digit", minute: "2-digit",
  });
  const timeFmt = new Intl.DateTimeFormat(undefined, {
    hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
  const compact = (n) => (n == null || Number.isNaN(n) ? "–" : compactFmt.format(n));
  const int = (n) => (n == null || Number.isNaN(n) ? "–" : intFmt.format(n));
  const dateTime = (ms) => dateTimeFmt.format(new Date(ms));

  function inHowLong(ms) {
    const min = Math.round((ms - Date.now()) / 60_000);
    if (min <= 0) return "now";
    if (min < 60) return `in ${min} min`;
    const h = Math.floor(min / 60);
    if (h < 48) return `in ${h} h ${min % 60} min`;
    return `in ${Math.floor(h / 24)} d ${h % 24} h`;
  }

  /** Milliseconds since the epoch from epoch seconds, epoch milliseconds or ISO 8601. */
  function toMs(v) {
    if (v == null) return NaN;
    if (typeof v === "number") return v > 1e12 ? v : v * 1000;
    return Date.parse(v);
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v == null) continue;
      if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v);
    }
    // Text only, never markup: key names and notes come from users.
    for (const c of children) if (c != null) node.append(c);
    return node;
  }

  // ---- API --------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(path, status, detail) {
      super(status ? `HTTP ${status}${detail ? ` – ${detail}` : ""}` : detail);
      this.path = path;
      this.status = status;
    }
  }

  async function api(path) {
    let res;
    try {
      res = await fetch(path, {
        headers: { Authorization: `Bearer ${state.token}`, Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
      });
    } catch (err) {
      throw new ApiError(path, 0, `the admin API is unreachable (${err.message})`);
    }
    if (!res.ok) {
      let detail = res.statusText;
      try {
        const body = await res.json();
        if (body && body.detail) {
          detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
        }
      } catch {
        // not JSON: the status text says enough
      }
      throw new ApiError(path, res.status, detail);
    }
    return res.json();
  }

  /** Runs `fn` over `items` with at most `limit` calls in flight; results in order. */
  async function mapLimit(items, limit, fn) {
    const out = new Array(items.length);
    let next = 0;
    const worker = async () => {
      while (next < items.length) {
        const i = next++;
        out[i] = await fn(items[i], i);
      }
    };
    await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
    return out;
  }

  /** A section that may fail without taking the page down: its problem goes to the banner,
   * but a 401 still stops everything (the token is wrong for all of them). */
  function soft(promise, section, problems) {
    return promise.catch((err) => {
      if (err instanceof ApiError && err.status === 401) throw err;
      const seen = problems.get(section);
      problems.set(section, { count: (seen ? seen.count : 0) + 1, message: err.message });
      return null;
    });
  }

  // ---- page state ------------------------------------------------------------------------
  function setReady(ready) {
    document.body.dataset.ready = ready ? "true" : "false";
  }

  async function tracked(work) {
    state.inflight += 1;
    setReady(false);
    try {
      return await work();
    } finally {
      state.inflight -= 1;
      if (state.inflight === 0) setReady(true);
    }
  }

  function showBanner(title, text) {
    $("banner-title").textContent = title;
    $("banner-text").textContent = text;
    $("banner").hidden = false;
  }

  function hideBanner() {
    $("banner").hidden = true;
  }

  function showProblems(problems) {
    if (problems.size === 0) {
      hideBanner();
      return;
    }
    const parts = [...problems].map(([section, p]) =>
      p.count > 1 ? `${section} (${p.count} calls): ${p.message}` : `${section}: ${p.message}`);
    showBanner("Some data could not be loaded.", parts.join(" · "));
  }

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
    $("content").hidden = true;
    $("refresh").hidden = true;
    $("signout").hidden = true;
    $("updated").textContent = "";
  }

  function signedOut(reason) {
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
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
    if (err instanceof ApiError && err.status === 401) {
      signedOut(`The admin API answered ${err.message}. Enter a valid admin token.`);
    } else {
      const shown = $("content").hidden ? "" : " The figures below are from the last refresh.";
      showBanner("The dashboard could not load its data.", `${err.message}.${shown}`);
      document.body.dataset.state = "error";
    }
  }

  // ---- token -----------------------------------------------------------------------------
  /** `#token=...` from the URL into sessionStorage, and out of the URL (and history) at once. */
  function takeTokenFromFragment() {
    const parts = location.hash.replace(/^#/, "").split("&").filter(Boolean);
    const rest = [];
    let token = null;
    for (const part of parts) {
      if (part.startsWith("token=")) token = decodeURIComponent(part.slice("token=".length));
      else rest.push(part);
    }
    if (token === null) return;
    const hash = rest.length ? `#${rest.join("&")}` : "";
    history.replaceState(null, "", location.pathname + location.search + hash);
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
  }

  // ---- refresh ---------------------------------------------------------------------------
  function refreshAll() {
    const gen = ++state.refreshGen;
    return tracked(async () => {
      const problems = new Map();
      try {
        const keysBody = await api("/v1/admin/keys?limit=500");
        const keys = keysBody.items || [];
        const [capacity, globalHistory, usages] = await Promise.all([
          soft(api("/v1/forecasting/capacity-recommendations"), "Quota forecast", problems),
          soft(api(`/v1/admin/history?hours=${HISTORY_HOURS}`), "Usage history", problems),
          mapLimit(keys, USAGE_CONCURRENCY, (k) =>
            soft(api(`/v1/admin/keys/${encodeURIComponent(k.id)}/usage`), "Key usage", problems)),
        ]);
        if (gen !== state.refreshGen) return;
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
        renderScopeOptions();
        await loadCharts(problems, globalHistory);
        if (gen !== state.refreshGen) return;
        $("updated").textContent = `Updated ${timeFmt.format(new Date())}`;
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
    const key = encodeURIComponent(scope);
    const historyPath = scope
      ? `/v1/admin/keys/${key}/history?hours=${HISTORY_HOURS}`
      : `/v1/admin/history?hours=${HISTORY_HOURS}`;
    const forecastPath = scope
      ? `/v1/forecasting/forecast?key_id=${key}&horizon_hours=${FORECAST_HOURS}`
      : `/v1/forecasting/forecast?horizon_hours=${FORECAST_HOURS}`;
    const [history, forecast] = await Promise.all([
      !scope && globalHistory ? globalHistory : soft(api(historyPath), "Usage history", problems),
      soft(api(forecastPath), "Forecast", problems),
    ]);
    if (gen !== state.chartsGen) return;
    document.body.dataset.selected = scope;
    renderCharts(history, forecast);
  }

  // ---- tiles, table, warnings ------------------------------------------------------------
  function sumLast(hours, n, field, skip = 0) {
    const end = hours.length - skip;
    return hours.slice(Math.max(0, end - n), end).reduce((s, h) => s + (h[field] || 0), 0);
  }

  function change(now, before) {
    if (!before) return "";
    const pct = Math.round(((now - before) / before) * 100);
    return `${pct >= 0 ? "+" : ""}${pct}% vs previous 24 h`;
  }

  function renderTiles(keysBody, globalHistory) {
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

  /** Key id -> warnings for quotas forecast to run out before their window resets. */
  function quotaWarnings(capacity) {
    state.warningsKnown = capacity != null;
    const out = new Map();
    for (const rec of (capacity && capacity.keys) || []) {
      const at = toMs(rec.exhausts_at);
      if (Number.isNaN(at) || rec.will_exhaust === false) continue;
      const usage = state.usage.get(rec.key_id);
      const win = usage && usage[rec.window];
      const resets = toMs(rec.resets_at ?? (win && win.resets_at));
      if (!Number.isNaN(resets) && at > resets) continue; // the reset comes first
      const list = out.get(rec.key_id) || [];
      list.push({ ...rec, exhaustsMs: at, resetsMs: resets });
      out.set(rec.key_id, list);
    }
    return out;
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

  function renderKeys(keysBody) {
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
        "No API keys yet. Create one with POST /v1/admin/keys.")));
    }
    tbody.replaceChildren(...rows);
    const total = keysBody.total ?? state.keys.length;
    $("keys-note").textContent = total > state.keys.length
      ? `showing ${int(state.keys.length)} of ${int(total)}`
      : `${int(total)} key${total === 1 ? "" : "s"} · click one to chart it`;
    markSelectedRow();
  }

  function markSelectedRow() {
    for (const tr of document.querySelectorAll("#keys tbody tr[data-key-id]")) {
      tr.classList.toggle("selected", tr.dataset.keyId === state.scope);
    }
  }

  function keyName(id) {
    const key = state.keys.find((k) => k.id === id);
    return key ? key.name || key.id : id;
  }

  function renderCapacity(capacity) {
    const box = $("capacity");
    const c = capacity && capacity.capacity;
    if (!c || typeof c !== "object" || c.forecast_peak_tokens_per_s == null) {
      box.hidden = true;
      return;
    }
    const peakAt = toMs(c.forecast_peak_at);
    const facts = [
      `Forecast peak ${compact(c.forecast_peak_tokens_per_s)} tokens/s` +
        (Number.isNaN(peakAt) ? "" : ` (${dateTime(peakAt)})`),
      c.configured_tokens_per_s ? `upstream capacity ${compact(c.configured_tokens_per_s)}/s` : null,
      c.headroom_pct != null ? `headroom ${c.headroom_pct}%` : null,
    ].filter(Boolean);
    $("capacity-facts").textContent = `${facts.join(" · ")}.`;
    $("capacity-advice").textContent = c.advice || "";
    box.title = c.basis || "";
    box.hidden = false;
  }

  function renderWarnings(capacity) {
    const list = $("warnings");
    renderCapacity(capacity);
    if (capacity == null) {
      list.replaceChildren(el("li", { class: "unknown" }, "The quota forecast is unavailable."));
      return;
    }
    const all = [...state.warnings.values()].flat().sort((a, b) => a.exhaustsMs - b.exhaustsMs);
    if (!all.length) {
      list.replaceChildren(el("li", { class: "none" },
        "No key is forecast to use up a quota before it resets."));
      return;
    }
    list.replaceChildren(...all.map((w) => {
      const reset = Number.isNaN(w.resetsMs) ? "" : `, before the reset at ${dateTime(w.resetsMs)}`;
      const suggested = w.suggested_limit != null ? ` Suggested limit: ${compact(w.suggested_limit)}.` : "";
      const li = el("li", { tabindex: "0", dataset: { keyId: w.key_id } },
        el("div", { class: "warn-head" },
          el("span", {}, `${w.name || keyName(w.key_id)} · ${w.window} quota`),
          el("span", { class: "warn-when" }, inHowLong(w.exhaustsMs))),
        el("div", { class: "warn-body" },
          `Runs out around ${dateTime(w.exhaustsMs)}${reset}. ` +
          `Used ${compact(w.used)} of ${compact(w.limit)}; ` +
          `forecast ${compact(w.forecast_total)} for the window.${suggested}`));
      li.title = `${int(w.used)} used of ${int(w.limit)}; forecast ${int(w.forecast_total)}`;
      return li;
    }));
  }

  function renderScopeOptions() {
    const select = $("scope");
    const options = [el("option", { value: "" }, "All keys")];
    for (const key of state.keys) {
      options.push(el("option", { value: key.id }, `${key.name || "(unnamed)"} · ${key.id}`));
    }
    select.replaceChildren(...options);
    select.value = state.scope;
  }

  // ---- charts ----------------------------------------------------------------------------
  function destroyCharts() {
    for (const chart of state.charts) chart.destroy();
    state.charts = [];
  }

  function empty(container, text) {
    container.replaceChildren(el("div", { class: "chart-empty" }, text));
  }

  const compactAxis = (u, splits) => splits.map((v) => (v == null ? "" : compact(v)));

  function axes(yLabel) {
    const common = {
      stroke: COLORS.axis,
      grid: { stroke: COLORS.grid, width: 1 },
      ticks: { stroke: COLORS.grid, width: 1 },
      font: "12px system-ui, 'DejaVu Sans', sans-serif",
      labelFont: "12px system-ui, 'DejaVu Sans', sans-serif",
    };
    return [
      { ...common },
      { ...common, values: compactAxis, size: 60, label: yLabel, labelSize: 22 },
    ];
  }

  function chartSize(container) {
    return { width: Math.max(320, container.clientWidth), height: 300 };
  }

  const stepped = () => uPlot.paths.stepped({ align: 1 });
  const timeValue = (u, v) => (v == null ? "–" : dateTime(v * 1000));

  function usageChart(container, hours) {
    const xs = hours.map((h) => h.ts);
    const prompt = hours.map((h) => h.prompt || 0);
    const completion = hours.map((h) => h.completion || 0);
    // Stacked: completion is drawn on top of prompt; the legend shows each part itself.
    const top = prompt.map((p, i) => p + completion[i]);
    // Away from the cursor the legend shows the last complete hour rather than dashes.
    const rest = Math.max(0, completeHours(hours).length - 1);
    const raw = (arr) => (u, v, si, i) => int(arr[i ?? rest]);
    return new uPlot({
      ...chartSize(container),
      cursor: { drag: { x: true, y: false } },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(10, max * 1.08)] } },
      axes: axes("tokens / hour"),
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

  /** The hours that are over (history rows are oldest first; the last may be running). */
  function completeHours(hours) {
    const now = Date.now() / 1000;
    let end = hours.length;
    while (end > 0 && hours[end - 1].ts + 3600 > now) end -= 1;
    return hours.slice(0, end);
  }

  /** Forecast points as [ts seconds, value, lower, upper], sorted. */
  function forecastPoints(forecast) {
    return (forecast.points || [])
      .map((p) => [toMs(p.ts) / 1000, p.value, p.lower ?? p.value, p.upper ?? p.value])
      .filter((p) => !Number.isNaN(p[0]))
      .sort((a, b) => a[0] - b[0]);
  }

  function nowMarker(ts) {
    return {
      hooks: {
        draw: [(u) => {
          const x = Math.round(u.valToPos(ts, "x", true));
          const { ctx } = u;
          const dpr = window.devicePixelRatio || 1;
          ctx.save();
          ctx.strokeStyle = "#98a2b3";
          ctx.lineWidth = dpr;
          ctx.setLineDash([4 * dpr, 4 * dpr]);
          ctx.beginPath();
          ctx.moveTo(x, u.bbox.top);
          ctx.lineTo(x, u.bbox.top + u.bbox.height);
          ctx.stroke();
          ctx.fillStyle = "#667085";
          ctx.font = `${11 * dpr}px system-ui, 'DejaVu Sans', sans-serif`;
          ctx.fillText("now", x + 6 * dpr, u.bbox.top + 14 * dpr);
          ctx.restore();
        }],
      },
    };
  }

  function forecastChart(container, hours, forecast) {
    // The hour in progress is only partly counted: drawn as actual it would dive towards
    // zero right at "now". The actual line stops at the last complete hour.
    const past = completeHours(hours).slice(-FORECAST_CONTEXT_HOURS);
    const ahead = forecastPoints(forecast);
    const last = past[past.length - 1];
    const lastTs = last ? last.ts : null;
    const future = ahead.filter((p) => lastTs == null || p[0] > lastTs);
    const xs = [...past.map((h) => h.ts), ...future.map((p) => p[0])];
    const n = past.length;
    const pad = (arr, before) => [...before, ...arr];
    const actual = pad(future.map(() => null), past.map((h) => h.total || 0));
    // The forecast continues the history line: it starts at the last actual point, and so
    // does its interval band, which then fans out.
    const lead = past.map((h, i) => (i === n - 1 ? h.total || 0 : null));
    const value = pad(future.map((p) => p[1]), lead);
    const lower = pad(future.map((p) => p[2]), lead);
    const upper = pad(future.map((p) => p[3]), lead);
    const intervalLabel = intervalText(forecast.interval, "interval");
    // Away from the cursor the legend shows the last complete hour.
    const rest = Math.max(0, n - 1);
    const data = [xs, actual, value, lower, upper];
    const fmtVal = (u, v, si, i) => {
      const shown = data[si][i ?? rest];
      return shown == null ? "–" : int(Math.round(shown));
    };
    return new uPlot({
      ...chartSize(container),
      cursor: { drag: { x: true, y: false } },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(10, max * 1.08)] } },
      axes: axes("tokens / hour"),
      series: [
        { label: "Hour", value: (u, v, si, i) => timeValue(u, xs[i ?? rest]) },
        { label: "Actual", stroke: COLORS.actual, width: 1.5, points: { show: false }, value: fmtVal },
        {
          label: "Forecast", stroke: COLORS.forecast, width: 2, dash: [6, 4],
          points: { show: false }, value: fmtVal,
        },
        {
          label: `Lower (${intervalLabel})`, stroke: `${COLORS.forecast}66`, width: 1,
          points: { show: false }, value: fmtVal,
        },
        {
          label: `Upper (${intervalLabel})`, stroke: `${COLORS.forecast}66`, width: 1,
          points: { show: false }, value: fmtVal,
        },
      ],
      bands: [{ series: [4, 3], fill: `${COLORS.forecast}22` }],
      plugins: future.length ? [nowMarker(Date.now() / 1000)] : [],
    }, data, container);
  }

  /** "80% interval" from 0.8, 80, "80%" or {"level": 0.8}; the raw value otherwise. */
  function intervalText(interval, noun = "prediction interval") {
    let v = interval;
    if (v && typeof v === "object") v = v.level ?? v.confidence ?? v.coverage ?? null;
    if (typeof v === "number") return `${Math.round(v <= 1 ? v * 100 : v)}% ${noun}`;
    if (typeof v === "string" && v) return /%$/.test(v) ? `${v} ${noun}` : v;
    return noun;
  }

  function scopeName() {
    return state.scope ? keyName(state.scope) : "all keys";
  }

  function renderCharts(history, forecast) {
    destroyCharts();
    const usageEl = $("usage-chart");
    const forecastEl = $("forecast-chart");
    usageEl.replaceChildren();
    forecastEl.replaceChildren();
    $("usage-title").textContent = `Usage · ${scopeName()} · last ${HISTORY_HOURS / 24} days`;
    $("forecast-title").textContent = `Forecast · ${scopeName()} · next ${FORECAST_HOURS} h`;
    if (typeof uPlot === "undefined") {
      const msg = "The chart library did not load.";
      empty(usageEl, msg);
      empty(forecastEl, msg);
      return;
    }
    const hours = history ? history.hours || [] : null;
    if (!hours) {
      $("usage-sub").textContent = "";
      empty(usageEl, "Usage history unavailable.");
    } else if (!hours.length) {
      $("usage-sub").textContent = "";
      empty(usageEl, "No usage recorded yet.");
    } else {
      const sum = (f) => hours.reduce((s, h) => s + (h[f] || 0), 0);
      const spend = sum("spend_usd") > 0 ? `, $${sum("spend_usd").toFixed(2)} spent` : "";
      $("usage-sub").textContent =
        `${compact(sum("total"))} tokens (prompt ${compact(sum("prompt"))}, completion ` +
        `${compact(sum("completion"))}) and ${int(sum("requests"))} requests in ` +
        `${hours.length} hours${spend}. Tokens per hour, prompt and completion stacked; ` +
        "drag to zoom, double-click to reset.";
      state.charts.push(usageChart(usageEl, hours));
    }
    if (!forecast) {
      $("forecast-sub").textContent = "";
      empty(forecastEl, "Forecast unavailable.");
    } else if (!(forecast.points || []).length) {
      $("forecast-sub").textContent = forecast.note || "";
      empty(forecastEl, "Not enough history to forecast yet.");
    } else {
      const pts = forecastPoints(forecast);
      const total = forecast.total || {};
      const expected = total.value ?? pts.reduce((s, p) => s + (p[1] || 0), 0);
      const range = total.lower != null && total.upper != null
        ? ` (${compact(total.lower)}–${compact(total.upper)})` : "";
      const bits = [
        `About ${compact(expected)} tokens${range} expected over the next ` +
          `${forecast.horizon_hours ?? FORECAST_HOURS} h`,
        forecast.method ? `method: ${forecast.method}` : null,
        `shaded: ${intervalText(forecast.interval)}`,
      ].filter(Boolean);
      $("forecast-sub").textContent = `${bits.join(" · ")}.${forecast.note ? ` ${forecast.note}` : ""}`;
      state.charts.push(forecastChart(forecastEl, hours || [], forecast));
    }
  }

  // Charts follow their container's width (window resizes, the table growing, ...).
  const resizer = new ResizeObserver(() => {
    for (const chart of state.charts) {
      const width = Math.max(320, chart.root.parentElement.clientWidth);
      if (Math.abs(width - chart.width) > 1) chart.setSize({ width, height: chart.height });
    }
  });

  // ---- start -----------------------------------------------------------------------------
  function start() {
    $("tz").textContent = Intl.DateTimeFormat().resolvedOptions().timeZone || "local";
    resizer.observe($("usage-chart"));
    resizer.observe($("forecast-chart"));

    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const token = $("token-input").value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      state.token = token;
      $("token-input").value = "";
      hideBanner();
      refreshAll();
    });
    $("refresh").addEventListener("click", () => refreshAll());
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
      const token = sessionStorage.getItem(TOKEN_KEY);
      if (token && token !== state.token) {
        state.token = token;
        refreshAll();
      }
    });
    setInterval(() => {
      if (state.token && state.inflight === 0 && document.visibilityState === "visible") {
        refreshAll();
      }
    }, REFRESH_MS);

    takeTokenFromFragment();
    state.token = sessionStorage.getItem(TOKEN_KEY);
    if (state.token) {
      refreshAll();
    } else {
      signedOut(null);
      setReady(true);
    }
  }

  start();
})();
