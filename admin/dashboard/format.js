/* Numbers, dates and durations as the dashboard shows them. No DOM, no state. */

const compactFmt = new Intl.NumberFormat("en", { notation: "compact", maximumFractionDigits: 1 });
const intFmt = new Intl.NumberFormat("en");
const dateTimeFmt = new Intl.DateTimeFormat(undefined, {
  weekday: "short", day: "numeric", month: "short", hour: "2-digit", minute: "2-digit",
});
const timeFmt = new Intl.DateTimeFormat(undefined, {
  hour: "2-digit", minute: "2-digit", second: "2-digit",
});

export const compact = (n) => (n == null || Number.isNaN(n) ? "–" : compactFmt.format(n));
export const int = (n) => (n == null || Number.isNaN(n) ? "–" : intFmt.format(n));
export const dateTime = (ms) => dateTimeFmt.format(new Date(ms));
export const clockTime = (date) => timeFmt.format(date);

export function inHowLong(ms) {
  const min = Math.round((ms - Date.now()) / 60_000);
  if (min <= 0) return "now";
  if (min < 60) return `in ${min} min`;
  const h = Math.floor(min / 60);
  if (h < 48) return `in ${h} h ${min % 60} min`;
  return `in ${Math.floor(h / 24)} d ${h % 24} h`;
}

/** Milliseconds since the epoch from epoch seconds, epoch milliseconds or ISO 8601. */
export function toMs(v) {
  if (v == null) return NaN;
  if (typeof v === "number") return v > 1e12 ? v : v * 1000;
  return Date.parse(v);
}

/** "80% interval" from 0.8, 80, "80%" or {"level": 0.8}; the raw value otherwise. */
export function intervalText(interval, noun = "prediction interval") {
  let v = interval;
  if (v && typeof v === "object") v = v.level ?? v.confidence ?? v.coverage ?? null;
  if (typeof v === "number") return `${Math.round(v <= 1 ? v * 100 : v)}% ${noun}`;
  if (typeof v === "string" && v) return /%$/.test(v) ? `${v} ${noun}` : v;
  return noun;
}
