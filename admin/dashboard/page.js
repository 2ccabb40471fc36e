/*
 * What every panel shares: the page's data, element helpers, the banner, and the
 * data-ready flag on <body> (set once every fetch of the latest refresh has finished).
 */

export const $ = (id) => document.getElementById(id);

export const state = {
  keys: [],
  usage: new Map(), // key id -> usage body
  warnings: new Map(), // key id -> [warning]
  warningsKnown: false, // the quota forecast answered
  globalHistory: null,
  scope: "", // "" = all keys
  inflight: 0,
  chartsGen: 0,
  refreshGen: 0,
};

export function el(tag, attrs = {}, ...children) {
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

export function setReady(ready) {
  document.body.dataset.ready = ready ? "true" : "false";
}

/** Runs `work` with the page marked busy until it and every other tracked job are done. */
export async function tracked(work) {
  state.inflight += 1;
  setReady(false);
  try {
    return await work();
  } finally {
    state.inflight -= 1;
    if (state.inflight === 0) setReady(true);
  }
}

export function showBanner(title, text) {
  $("banner-title").textContent = title;
  $("banner-text").textContent = text;
  $("banner").hidden = false;
}

export function hideBanner() {
  $("banner").hidden = true;
}

/** The sections that failed (see api.soft) in the banner, or no banner when none did. */
export function showProblems(problems) {
  if (problems.size === 0) {
    hideBanner();
    return;
  }
  const parts = [...problems].map(([section, p]) =>
    p.count > 1 ? `${section} (${p.count} calls): ${p.message}` : `${section}: ${p.message}`);
  showBanner("Some data could not be loaded.", parts.join(" · "));
}
