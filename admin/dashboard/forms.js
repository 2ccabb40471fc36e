/*
 * What the managing panels share: forms built from field lists, API errors shown next to the
 * form they came from (never alert()), the dialogs (a form, a secret shown once, a confirm),
 * and read-only mode once the token turns out to be a viewer's (a 403 on a write).
 */

import { ApiError } from "./api.js";
import { $, el } from "./page.js";

export const PRIORITIES = ["low", "normal", "high", "critical"];

/** The limits keys and apps share, in the order the forms show them. */
export const KEY_LIMIT_FIELDS = [
  { name: "daily_limit", label: "Daily tokens", type: "int", placeholder: "server default" },
  { name: "monthly_limit", label: "Monthly tokens", type: "int", placeholder: "server default" },
  { name: "rate_per_sec", label: "Requests/s", type: "num", placeholder: "server default" },
  { name: "burst", label: "Burst", type: "int", placeholder: "server default" },
  { name: "tokens_per_minute", label: "Tokens/min", type: "int", nullable: true,
    placeholder: "none" },
  { name: "monthly_budget_usd", label: "Budget, USD/month", type: "num", nullable: true,
    placeholder: "none" },
  { name: "priority", label: "Priority", type: "select", options: PRIORITIES },
  { name: "max_priority", label: "Max priority", type: "select", options: PRIORITIES },
  { name: "expires_at", label: "Expires", type: "datetime", nullable: true },
];

// ---- read-only (viewer) mode -----------------------------------------------------------------

/** True until a write was refused with 403. */
export const canWrite = () => document.body.dataset.readonly !== "true";

/** After a 403 on a write: every write control is disabled, now and when drawn later. */
export function becomeReadOnly(detail) {
  document.body.dataset.readonly = "true";
  $("readonly-note").hidden = false;
  $("readonly-note").title = detail || "this token may read but not change";
  for (const b of document.querySelectorAll("[data-write]")) b.disabled = true;
}

/** A button; `write` ones are disabled in read-only mode. */
export function button(label, onClick, { write = false, kind = "", title = null, data = {} } = {}) {
  const b = el("button", { type: "button", class: `btn btn-small ${kind}`.trim(), title, dataset: data },
    label);
  if (write) {
    b.dataset.write = "";
    b.disabled = !canWrite();
  }
  b.addEventListener("click", (ev) => {
    ev.stopPropagation();
    onClick(ev);
  });
  return b;
}

// ---- errors ----------------------------------------------------------------------------------

/** The lines an API error is shown as: one per FastAPI validation error, else its detail. */
export function errorLines(err) {
  if (!(err instanceof ApiError)) return [String(err && err.message ? err.message : err)];
  const detail = err.body && err.body.detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => {
      const where = (d.loc || []).filter((p) => p !== "body").join(".");
      return where ? `${where}: ${d.msg}` : d.msg;
    });
  }
  const text = typeof detail === "string" ? detail : err.message;
  return [err.status ? `${err.status}: ${text}` : text];
}

/** `err` in `box` (an element next to the form or panel); the form's fields it names marked. */
export function showError(box, err, form = null) {
  if (err instanceof ApiError && err.status === 403) becomeReadOnly(errorLines(err)[0]);
  if (form) {
    for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
    const detail = err instanceof ApiError && err.body && err.body.detail;
    if (Array.isArray(detail)) {
      for (const d of detail) {
        const name = (d.loc || []).filter((p) => p !== "body")[0];
        const input = name != null && form.elements.namedItem(String(name));
        if (input && input.setAttribute) input.setAttribute("aria-invalid", "true");
      }
    }
  }
  box.replaceChildren(...errorLines(err).map((line) => el("div", {}, line)));
  box.hidden = false;
}

export function clearError(box) {
  box.replaceChildren();
  box.hidden = true;
}

/** A table's row action: `work`, its error shown in `box` (then nothing more), else `after`. */
export async function rowAction(box, work, after) {
  clearError(box);
  try {
    await work();
  } catch (err) {
    return showError(box, err); // and not `after`
  }
  await after();
}

// ---- forms -----------------------------------------------------------------------------------

const pad = (n) => String(n).padStart(2, "0");

/** An ISO time as a datetime-local input's value, in local time. */
function localInput(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}` +
    `T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function inputFor(field, value, id) {
  const attrs = { id, name: field.name, title: field.hint || null };
  if (field.type === "select") {
    const options = [el("option", { value: "" }, field.blank || "(default)")];
    for (const o of field.options) options.push(el("option", { value: o }, o));
    const select = el("select", attrs, ...options);
    select.value = value ?? "";
    return select;
  }
  if (field.type === "check") {
    const box = el("input", { ...attrs, type: "checkbox" });
    box.checked = Boolean(value);
    return box;
  }
  if (field.type === "lines") {
    const area = el("textarea", { ...attrs, rows: "2", placeholder: field.placeholder || null,
      spellcheck: "false" });
    area.value = (value || []).join("\n");
    return area;
  }
  const type = { int: "number", num: "number", datetime: "datetime-local" }[field.type] || "text";
  const input = el("input", { ...attrs, type, placeholder: field.placeholder || null,
    autocomplete: "off", spellcheck: "false", list: field.list || null });
  if (type === "number") input.step = field.type === "int" ? "1" : "any";
  if (field.required) input.required = true;
  input.value = field.type === "datetime" ? localInput(value) : value ?? "";
  return input;
}

/** A form of `fields` filled from `values`; `onSubmit(body, form, errorBox)` gets what
 * `readForm` makes of it (only what changed from `values` when `edit`). */
export function buildForm(formId, fields, values, { edit = false, submitLabel, onSubmit }) {
  const shown = fields.filter((f) => !(edit && f.createOnly));
  const grid = el("div", { class: "form-grid" });
  for (const f of shown) {
    const id = `${formId}-${f.name}`;
    const wrap = el("div", { class: `field field-${f.type || "text"}${f.wide ? " wide" : ""}` },
      el("label", { for: id }, f.label), inputFor(f, values[f.name], id));
    grid.append(wrap);
  }
  const errorBox = el("div", { class: "form-error", role: "alert", id: `${formId}-error` });
  errorBox.hidden = true;
  const submit = el("button", { type: "submit", class: "btn btn-primary", "data-write": "" },
    submitLabel);
  submit.disabled = !canWrite();
  const cancel = el("button", { type: "button", class: "btn", value: "cancel" }, "Cancel");
  cancel.addEventListener("click", closeFormDialog);
  const form = el("form", { id: formId, class: "mform", autocomplete: "off", novalidate: "" },
    grid, errorBox, el("div", { class: "form-actions" }, cancel, submit));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearError(errorBox);
    submit.disabled = true;
    try {
      await onSubmit(readForm(form, shown, edit ? values : null), form, errorBox);
    } catch (err) {
      showError(errorBox, err, form);
    } finally {
      submit.disabled = !canWrite();
    }
  });
  return form;
}

/** The JSON body a form stands for. Creating: the filled fields. Editing (`original` given):
 * the fields that differ from it, an emptied nullable one as null (the limit removed). */
export function readForm(form, fields, original) {
  const body = {};
  for (const f of fields) {
    const input = form.elements.namedItem(f.name);
    let value;
    if (f.type === "check") value = input.checked;
    else if (f.type === "lines") value = input.value.split("\n").map((s) => s.trim()).filter(Boolean);
    else {
      const raw = input.value.trim();
      if (raw === "") value = null;
      else if (f.type === "int" || f.type === "num") value = Number(raw);
      else if (f.type === "datetime") value = new Date(raw).toISOString();
      else value = raw;
    }
    if (!original) {
      if (value !== null && !(f.type === "check" && !value && !f.sendFalse)) body[f.name] = value;
      continue;
    }
    const before = original[f.name] ?? null;
    const same = f.type === "datetime"
      ? localInput(before) === input.value
      : JSON.stringify(before) === JSON.stringify(value);
    if (same) continue;
    if (value === null && !f.nullable && f.type !== "text") continue; // cannot be unset
    body[f.name] = value === null && f.type === "text" && !f.nullable ? "" : value;
  }
  return body;
}

// ---- dialogs ---------------------------------------------------------------------------------

/** `content` (a form, or facts) in the form dialog, titled `title`. */
export function openFormDialog(title, content) {
  $("form-dialog-title").textContent = title;
  $("form-dialog-body").replaceChildren(content);
  const dialog = $("form-dialog");
  if (!dialog.open) dialog.showModal();
  const first = content.querySelector && content.querySelector("input, select, textarea");
  if (first) first.focus();
}

export function closeFormDialog() {
  const dialog = $("form-dialog");
  if (dialog.open) dialog.close();
  $("form-dialog-body").replaceChildren();
}

/** A secret that is shown once: in a dialog with a copy button. */
export function showSecret(title, note, secret) {
  closeFormDialog();
  $("secret-title").textContent = title;
  $("secret-note").textContent = note;
  $("secret-value").value = secret;
  $("secret-copied").textContent = "";
  $("secret-dialog").showModal();
  $("secret-value").select();
}

async function copySecret() {
  const input = $("secret-value");
  try {
    await navigator.clipboard.writeText(input.value);
    $("secret-copied").textContent = "Copied.";
  } catch {
    // No clipboard access (an insecure origin, or no permission): select it for Ctrl+C.
    input.focus();
    input.select();
    let copied = false;
    try {
      copied = document.execCommand("copy");
    } catch {
      copied = false;
    }
    $("secret-copied").textContent = copied ? "Copied." : "Selected: press Ctrl+C to copy.";
  }
}

let confirmAnswer = null;

/** Asks in a dialog (no window.confirm: it would block the page); true when confirmed. */
export function confirmAction(title, text, confirmLabel = "Delete") {
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = confirmLabel;
  $("confirm-dialog").showModal();
  return new Promise((resolve) => {
    confirmAnswer = resolve;
  });
}

function answerConfirm(yes) {
  const dialog = $("confirm-dialog");
  if (dialog.open) dialog.close();
  if (confirmAnswer) confirmAnswer(yes);
  confirmAnswer = null;
}

export function setUpDialogs() {
  $("secret-copy").addEventListener("click", copySecret);
  $("secret-done").addEventListener("click", () => {
    $("secret-value").value = "";
    $("secret-dialog").close();
  });
  $("secret-dialog").addEventListener("close", () => {
    $("secret-value").value = "";
  });
  $("confirm-ok").addEventListener("click", () => answerConfirm(true));
  $("confirm-cancel").addEventListener("click", () => answerConfirm(false));
  $("confirm-dialog").addEventListener("close", () => answerConfirm(false));
  $("form-dialog-close").addEventListener("click", closeFormDialog);
}

/** A small definition list of `pairs` ([label, value]). */
export function facts(pairs) {
  const dl = el("dl", { class: "facts" });
  for (const [k, v] of pairs) dl.append(el("dt", {}, k), el("dd", {}, v ?? "–"));
  return dl;
}
