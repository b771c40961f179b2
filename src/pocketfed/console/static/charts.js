// Shared by the console's pages: formatting, small DOM helpers and line charts on uPlot
// (vendored at install time by `make vendor`; see the README's console section).
"use strict";
const PF = {};
PF.colors = ["#2f6fde", "#e4572e", "#1f8a4c", "#8e44ad", "#b7791f", "#17a2b8", "#555"];

PF.esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
// d significant digits, without trailing zeros (500 -> "500", 1.50 -> "1.5", 1e-6 -> "0.000001")
PF.num = (x, d = 3) => (x == null || !isFinite(x) ? "–" : String(parseFloat(Number(x).toPrecision(d))));
PF.fixed = (x, d = 2) => (x == null || !isFinite(x) ? "–" : Number(x).toFixed(d));
PF.bytes = (n) => {
  if (n == null) return "–";
  const u = ["B", "kB", "MB", "GB"]; let i = 0; let v = Number(n);
  while (v >= 1000 && i < u.length - 1) { v /= 1000; i++; }
  return (i ? v.toFixed(v < 10 ? 2 : 1) : v.toFixed(0)) + " " + u[i];
};
PF.secs = (s) => (s == null ? "–" : s < 1 ? (s * 1000).toFixed(0) + " ms" : s < 120 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min");
PF.ago = (t, now) => (t == null ? "never" : PF.secs(Math.max(0, now - t)) + " ago");
PF.time = (t) => (t == null ? "–" : new Date(t * 1000).toLocaleTimeString([], { hour12: false }));
PF.$ = (id) => document.getElementById(id);
PF.set = (id, html) => { const el = PF.$(id); if (el) el.innerHTML = html; };

PF._charts = {};
// A line chart in element `id`: x values, series [{label, values, color?, dash?}], optional
// horizontal reference lines [{label, value, color}]. Redrawn whole on each update (a few hundred
// points at most); `data-points` records how many x values it drew (the browser tests read it).
PF.chart = function (id, { x, series, hlines = [], xLabel = "round", yLabel = "", empty = "no data yet", yFmt, yRange }) {
  const el = PF.$(id);
  if (!el) return;
  if (PF._charts[id]) { PF._charts[id].destroy(); delete PF._charts[id]; }
  el.dataset.points = String(x.length);
  const has = series.some((s) => s.values.some((v) => v != null));
  if (!window.uPlot) {
    el.innerHTML = '<div class="empty">charts need the vendored uPlot library: run <code>make vendor</code></div>';
    return;
  }
  if (!x.length || !has) { el.innerHTML = '<div class="empty">' + PF.esc(empty) + "</div>"; return; }
  el.innerHTML = "";
  const lines = hlines.filter((h) => h.value != null && isFinite(h.value));
  const data = [x, ...series.map((s) => s.values), ...lines.map((h) => x.map(() => h.value))];
  const fmt = yFmt || ((v) => PF.num(v, 4));
  const opts = {
    width: Math.max(280, el.clientWidth || 500), height: 220,
    scales: { x: { time: false }, ...(yRange ? { y: { range: yRange } } : {}) },
    legend: { live: false },
    axes: [
      { label: xLabel, size: 40, stroke: "#667085", grid: { stroke: "#eef0f4" }, incrs: [1, 2, 5, 10, 20, 50, 100] },
      // the axis keeps uPlot's tick labels (they carry the digits the ticks need) unless told
      { label: yLabel, size: 62, stroke: "#667085", grid: { stroke: "#eef0f4" }, ...(yFmt ? { values: (u, vals) => vals.map(yFmt) } : {}) },
    ],
    series: [
      { label: xLabel },
      ...series.map((s, i) => ({
        label: s.label, stroke: s.color || PF.colors[i % PF.colors.length], width: 2, dash: s.dash,
        spanGaps: true, points: { show: true, size: 6 }, value: (u, v) => fmt(v),
      })),
      ...lines.map((h) => ({ label: h.label, stroke: h.color || "#c0392b", width: 1.5, dash: [6, 4], points: { show: false }, value: (u, v) => fmt(v) })),
    ],
  };
  PF._charts[id] = new uPlot(opts, data, el);
};

// Poll `url` every `ms`; call draw(data) when its `stamp` changes. headers() gives the request's.
PF.poll = function (url, ms, headers, draw, onError) {
  let stamp = null; let timer = null;
  async function tick() {
    try {
      const r = await fetch(url, { headers: headers(), cache: "no-store" });
      if (!r.ok) {
        if (onError(r.status, await r.json().catch(() => ({})))) return; // true: stop polling (e.g. 401)
      } else {
        const data = await r.json();
        if (data.stamp !== stamp) { stamp = data.stamp; draw(data); }
      }
    } catch (e) {
      onError(0, { detail: "cannot reach the server: " + String(e) }); // keep trying: it may restart
    }
    timer = setTimeout(tick, ms);
  }
  tick();
  return { stop: () => clearTimeout(timer), refresh: () => { clearTimeout(timer); stamp = null; tick(); } };
};
