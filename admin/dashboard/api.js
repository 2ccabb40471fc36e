/*
 * The admin JSON API and the admin token.
 *
 * The token is typed into the form or passed once as `#token=...` (a fragment is never sent
 * to a server); it is kept in sessionStorage (this tab only), removed from the URL at once,
 * and sent only as `Authorization: Bearer <token>`.
 */

const TOKEN_KEY = "atlas.adminToken";

let token = null; // the token the API calls use; null when signed out

export const hasToken = () => token !== null;

/** Use `value` from now on, in this tab only. */
export function signIn(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
  token = value;
}

export function signOut() {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
}

/** Switches to the tab's stored token; true when that is a (different) token to load with. */
export function adoptStoredToken() {
  const stored = sessionStorage.getItem(TOKEN_KEY);
  if (!stored || stored === token) return false;
  token = stored;
  return true;
}

/** `#token=...` from the URL into sessionStorage, and out of the URL (and history) at once. */
export function takeTokenFromFragment() {
  const parts = location.hash.replace(/^#/, "").split("&").filter(Boolean);
  const rest = [];
  let found = null;
  for (const part of parts) {
    if (part.startsWith("token=")) found = decodeURIComponent(part.slice("token=".length));
    else rest.push(part);
  }
  if (found === null) return;
  const hash = rest.length ? `#${rest.join("&")}` : "";
  history.replaceState(null, "", location.pathname + location.search + hash);
  if (found) sessionStorage.setItem(TOKEN_KEY, found);
}

export class ApiError extends Error {
  /** `body` is the answer's JSON when it had one: FastAPI's {"detail": str | [errors]}. */
  constructor(path, status, detail, body = null) {
    super(status ? `HTTP ${status}${detail ? ` – ${detail}` : ""}` : detail);
    this.path = path;
    this.status = status;
    this.body = body;
  }
}

export const isUnauthorized = (err) => err instanceof ApiError && err.status === 401;

/** The JSON body of GET `path`; an ApiError for a network failure or a non-2xx answer. */
export const api = (path) => send("GET", path);

/** The answer to `method path` (with `body` as JSON): its JSON, or null for 204; an ApiError
 * for a network failure or a non-2xx answer. */
export async function send(method, path, body) {
  const res = await call(method, path, body, "application/json");
  return res.status === 204 ? null : res.json();
}

/** GET `path` (with the token, so not a plain link) and save the answer as `filename`. */
export async function download(path, filename) {
  const res = await call("GET", path, undefined, "*/*");
  const url = URL.createObjectURL(await res.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

async function call(method, path, body, accept) {
  const headers = { Authorization: `Bearer ${token}`, Accept: accept };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
  } catch (err) {
    throw new ApiError(path, 0, `the admin API is unreachable (${err.message})`);
  }
  if (!res.ok) {
    let detail = res.statusText;
    let json = null;
    try {
      json = await res.json();
      if (json && json.detail) {
        detail = typeof json.detail === "string" ? json.detail : JSON.stringify(json.detail);
      }
    } catch {
      // not JSON: the status text says enough
    }
    throw new ApiError(path, res.status, detail, json);
  }
  return res;
}

/** Runs `fn` over `items` with at most `limit` calls in flight; results in order. */
export async function mapLimit(items, limit, fn) {
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

/** A section that may fail without taking the page down: its problem goes to `problems`
 * (section -> {count, message}) and it yields null, but a 401 still stops everything (the
 * token is wrong for all of them). */
export function soft(promise, section, problems) {
  return promise.catch((err) => {
    if (isUnauthorized(err)) throw err;
    const seen = problems.get(section);
    problems.set(section, { count: (seen ? seen.count : 0) + 1, message: err.message });
    return null;
  });
}
