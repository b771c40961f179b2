// The device app's page: suggestions as you type, the privacy lock, the provenance, the ledger.
// Everything it shows comes from this machine's server (/api/...); text goes into the page
// through textContent only, never as markup.
"use strict";

const DEBOUNCE_MS = 120; // a keystroke burst asks once, after the typing pauses
const LEDGER_POLL_MS = 15000; // the device may send while the page is open

const $ = (id) => document.getElementById(id);
const text = $("text");
let pending = null; // the in-flight suggestion request (aborted when a newer one starts)
let timer = null;

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function formatBytes(n) {
  if (n < 1000) return `${n} B`;
  const units = ["kB", "MB", "GB"];
  let value = n / 1000;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

function formatTime(seconds) {
  if (seconds === null || seconds === undefined) return "unknown";
  const date = new Date(seconds * 1000);
  const clock = date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  if (date.toDateString() === new Date().toDateString()) return `today ${clock}`;
  return `${date.toLocaleDateString(undefined, { year: "numeric", month: "short", day: "numeric" })} ${clock}`;
}

// an ISO date from a record ("2026-11-28T10:00:00Z"), shown like the ledger's times
function formatWhen(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : formatTime(date.getTime() / 1000);
}

async function getJSON(url, options = {}) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    // one retry when the connection failed (not when aborted): every request here is safe to repeat
    if (err.name === "AbortError") throw err;
    response = await fetch(url, options);
  }
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

// --- suggestions -------------------------------------------------------------------------------

function textBeforeCursor() {
  return text.value.slice(0, text.selectionStart ?? text.value.length);
}

function scheduleSuggest(delay = DEBOUNCE_MS) {
  clearTimeout(timer);
  timer = setTimeout(fetchSuggestions, delay);
}

async function fetchSuggestions() {
  if (pending) pending.abort();
  const controller = new AbortController();
  pending = controller;
  const asked = textBeforeCursor();
  try {
    const data = await getJSON(`/api/suggest?text=${encodeURIComponent(asked)}`, { signal: controller.signal });
    if (controller !== pending || data.stale) return; // a newer request is on its way
    showChips(data.words);
    const n = data.words.length;
    $("timing").textContent = n
      ? `${n} suggestion${n === 1 ? "" : "s"} in ${Math.round(data.ms)} ms, made by the model on this device`
      : "no suggestion for this text";
    if (data.lock_ok !== lockState.ok) refreshLock(); // the lock changed since the page last looked
  } catch (err) {
    if (err.name !== "AbortError") $("timing").textContent = `suggestions unavailable: ${err.message}`;
  } finally {
    if (pending === controller) pending = null;
  }
}

function showChips(words) {
  const chips = $("chips");
  chips.replaceChildren(...words.map((word) => {
    const chip = el("button", { class: "chip", type: "button", text: word });
    chip.addEventListener("click", () => insertWord(word));
    return chip;
  }));
}

// The chip replaces the word being typed (the letters after the last space) and adds a space.
function insertWord(word) {
  const cursor = text.selectionStart ?? text.value.length;
  const before = text.value.slice(0, cursor);
  const start = cursor - before.match(/\S*$/)[0].length;
  const insert = `${word} `;
  text.value = text.value.slice(0, start) + insert + text.value.slice(cursor);
  const caret = start + insert.length;
  text.focus();
  text.setSelectionRange(caret, caret);
  scheduleSuggest(0);
}

// --- the privacy lock and provenance ---------------------------------------------------------

let lockState = { ok: null };

function fact(dl, term, value, cls) {
  dl.append(el("dt", { text: term }), el("dd", cls ? { class: cls } : {}, [value]));
}

function signatureNode(lock) {
  const check = lock.checks.find((c) => c.name === "signature");
  const by = lock.release && lock.release.signed_by;
  const node = el("span");
  if (check && check.ok) node.append(el("span", { class: "yes", text: "verified" }));
  else node.append(el("span", { class: "no", text: check ? `not verified: ${check.detail}` : "not checked" }));
  if (by) node.append(" · key ", el("span", { class: "mono", text: by }));
  return node;
}

function personalText(personal) {
  if (!personal) return "none yet: suggestions come from the federated model alone";
  const parts = [];
  if (personal.date) parts.push(`trained ${formatWhen(personal.date)}`);
  if (typeof personal.gain === "number") {
    // gain = 1 - exp(L_personal - L_global): the relative drop of perplexity on this device's
    // held-out text against the federated model (pocketfed.device.personal)
    const pct = (personal.gain * 100).toFixed(1);
    parts.push(personal.gain >= 0 ? `${pct}% lower perplexity than the federated model on your held-out text`
      : `${pct}% perplexity change on your held-out text`);
  }
  return parts.join("; ") || "present";
}

function showLock(lock) {
  lockState = lock;
  const state = lock.ok ? "ok" : "failed";
  $("lock").dataset.state = state;
  $("lock-tip").textContent = lock.hover;
  $("lock").setAttribute("aria-label", lock.ok ? `privacy lock: ${lock.hover}` : lock.hover);
  $("warning").hidden = lock.ok;
  $("warning-text").textContent = lock.ok ? "" : lock.line;
  const line = $("lockline");
  line.textContent = lock.ok ? `Privacy lock: ${lock.line}` : lock.line;
  line.classList.toggle("failed", !lock.ok);

  const release = lock.release || {};
  const dl = $("provenance");
  dl.replaceChildren();
  fact(dl, "Release", release.version !== undefined ? `version ${release.version}` : "none installed");
  if (release.created) fact(dl, "Signed", formatWhen(release.created));
  fact(dl, "Signature", signatureNode(lock));
  const signed = lock.checks.some((c) => c.name === "signature" && c.ok);
  if (!signed) {
    fact(dl, "Privacy", "unknown: read only from a verified release");
  } else if (release.epsilon !== undefined && release.epsilon !== null) {
    const delta = release.delta !== undefined && release.delta !== null ? `, δ = ${Number(release.delta).toExponential(0)}` : "";
    fact(dl, "Privacy", `trained with DP, ε = ${Number(Number(release.epsilon).toPrecision(3))}${delta} (signed)`);
  } else {
    fact(dl, "Privacy", "no differential privacy in the signed release");
  }
  fact(dl, "Personal adapter", personalText(lock.personal));

  $("checks").replaceChildren(...lock.checks.map((c) => el("li", { class: c.ok ? "" : "bad" }, [
    el("span", { class: "name", text: c.name }), el("span", { text: c.detail }),
  ])));
  $("checked-at").textContent = `lock checked ${formatTime(lock.verified_at)}`;
}

async function refreshLock(verifyNow = false) {
  const button = $("recheck");
  button.disabled = true;
  try {
    showLock(await getJSON("/api/lock", verifyNow ? { method: "POST" } : {}));
  } catch (err) {
    showLock({ ok: false, hover: `Privacy lock unavailable: ${err.message}`, line: err.message, checks: [], release: {} });
  } finally {
    button.disabled = false;
  }
}

// --- the ledger ------------------------------------------------------------------------------

function cell(value, cls) {
  return el("td", cls ? { class: cls } : {}, [value]);
}

function showLedger(data) {
  const rows = data.messages.map((m) => {
    // the ledger's own kind name is the cell's hover text
    const kind = el("td", { title: `kind "${m.kind}" in ledger.jsonl`, text: m.what });
    return el("tr", m.allowed ? {} : { class: "odd-kind" }, [
      cell(formatTime(m.time)), kind, cell(formatBytes(m.bytes), "num"), cell(m.destination, "mono dest"),
    ]);
  });
  $("ledger").tBodies[0].replaceChildren(...rows);
  $("ledger-empty").hidden = data.total_messages > 0;
  $("ledger").parentElement.hidden = data.total_messages === 0;
  let total = `${data.total_messages} message${data.total_messages === 1 ? "" : "s"}, ${formatBytes(data.total_bytes)}`;
  if (data.messages.length < data.total_messages) total += ` (newest ${data.messages.length} listed)`;
  if (data.unreadable) total += ` · ${data.unreadable} unreadable line${data.unreadable === 1 ? "" : "s"}`;
  $("ledger-total").textContent = total;

  const refused = data.refusals.map((r) => el("tr", {}, [
    cell(formatTime(r.time)), cell(r.requested_kind, "mono"), cell(r.reason, "wrap"),
  ]));
  $("refusals").tBodies[0].replaceChildren(...refused);
  $("refusals-empty").hidden = data.total_refusals > 0;
  $("refusals").parentElement.hidden = data.total_refusals === 0;
}

async function refreshLedger() {
  try {
    showLedger(await getJSON("/api/ledger"));
  } catch (err) {
    $("ledger-total").textContent = `ledger unavailable: ${err.message}`;
  }
}

// --- wiring ----------------------------------------------------------------------------------

text.addEventListener("input", () => scheduleSuggest());
text.addEventListener("click", () => scheduleSuggest()); // the cursor moved: suggest for the text before it
$("recheck").addEventListener("click", async () => {
  await refreshLock(true);
  await refreshLedger();
});
setInterval(() => { if (!document.hidden) refreshLedger(); }, LEDGER_POLL_MS);

refreshLock();
refreshLedger();
scheduleSuggest(0);
text.focus();
