// The deployment console: log in with the operator token (kept in sessionStorage), poll the
// overview, draw the panels, send the operator's actions.
"use strict";
(function () {
  const KEY = "pocketfed.operator";
  const token = () => sessionStorage.getItem(KEY) || "";
  const auth = () => ({ Authorization: "Bearer " + token() });
  let poller = null;
  let last = null;

  function showLogin(message) {
    if (poller) { poller.stop(); poller = null; }
    PF.$("app").classList.add("hidden");
    PF.$("login").classList.remove("hidden");
    PF.$("login-error").textContent = message || "";
    PF.$("token").focus();
  }

  function start() {
    PF.$("login").classList.add("hidden");
    PF.$("app").classList.remove("hidden");
    poller = PF.poll("/console/api/overview", 2000, auth, draw, (status, body) => {
      if (status === 401) {
        sessionStorage.removeItem(KEY);
        showLogin(body.detail || "the operator token was refused");
        return true;
      }
      banner(body.detail || "the server answered " + status);
      return false;
    });
  }

  function banner(text) {
    const el = PF.$("banner");
    el.textContent = text || "";
    el.style.display = text ? "block" : "none";
  }

  async function act(path, body) {
    const r = await fetch("/console/api/" + path, {
      method: "POST", headers: { ...auth(), "Content-Type": "application/json" },
      body: JSON.stringify(body || {}),
    });
    const out = await r.json().catch(() => ({}));
    if (r.status === 401) { sessionStorage.removeItem(KEY); showLogin(out.detail); return; }
    banner(r.ok ? "" : out.detail || "the action was refused (" + r.status + ")");
    if (poller) poller.refresh();
  }

  // ---- panels ---------------------------------------------------------------------------------
  function state(d) {
    const c = d.controls;
    const pills = [];
    if (d.stopped) pills.push('<span class="pill info">finished: ' + PF.esc(d.stopped) + "</span>");
    else if (c.paused) pills.push('<span class="pill warn" id="state-paused">paused</span>');
    else pills.push('<span class="pill ok">running</span>');
    if (c.frozen_at != null) pills.push('<span class="pill bad">releases frozen at v' + c.frozen_at + "</span>");
    return pills.join(" ");
  }

  function stageBar(stages) {
    const total = stages.reduce((a, s) => a + s[1], 0);
    if (!total) return '<span class="muted">–</span>';
    const parts = stages.map((s, i) =>
      '<i style="width:' + ((100 * s[1]) / total).toFixed(1) + "%;background:" + PF.colors[i % PF.colors.length] +
      '" title="' + PF.esc(s[0]) + ": " + PF.secs(s[1]) + '"></i>').join("");
    const text = stages.map((s) => PF.esc(s[0]) + " " + PF.secs(s[1])).join(" · ");
    return '<div class="stagebar" title="' + text + '">' + parts + '</div><div class="muted" style="font-size:11px">' + text + "</div>";
  }

  function statusPill(s) {
    const cls = { committed: "ok", open: "info", empty: "warn", aborted: "bad", failed: "bad" }[s] || "info";
    return '<span class="pill ' + cls + '">' + PF.esc(s) + "</span>";
  }

  function drawRounds(d) {
    const rows = d.rounds.slice().reverse().map((r) =>
      "<tr data-round=\"" + r.round_id + "\" data-status=\"" + r.status + "\"><td>" + r.round_id +
      ' <span class="muted">(#' + r.idx + ")</span></td><td>" + statusPill(r.status) +
      '</td><td class="num">' + r.sampled + '</td><td class="num">' + r.assigned +
      '</td><td class="num">' + (r.accepted ?? '<span class="muted" title="updates in so far">' + r.received + " in</span>") + '</td><td class="num">' + (r.dropped ?? "–") +
      '</td><td class="num">' + (r.refused ?? "–") + '</td><td class="num">' + PF.secs(r.duration_s) +
      "</td><td>" + stageBar(r.stages) + '</td><td class="num">' + PF.num(r.metrics.train_loss, 4) +
      '</td><td class="num" data-bytes-up="' + r.bytes_up + '">' + PF.bytes(r.bytes_up) +
      '</td><td class="num">' + PF.bytes(r.bytes_down) + '</td><td class="muted" style="max-width:280px">' +
      PF.esc(r.reason) + "</td></tr>").join("");
    PF.$("rounds-table").tBodies[0].innerHTML = rows || '<tr><td colspan="13" class="muted">no round yet</td></tr>';
    const committed = d.rounds.filter((r) => r.status === "committed").length;
    PF.set("rounds-note", committed + " committed of " + d.rounds_planned + " planned · next cohort size " +
      d.controls.goal + (d.controls.hold ? " · " + PF.esc(d.controls.hold) : ""));
  }

  function drawQuality(d) {
    const done = d.rounds.filter((r) => r.status === "committed");
    const ev = d.evaluations.filter((e) => e.loss != null);
    // x: training rounds applied (a version's round count), so both curves share the axis
    const xs = [...new Set([...done.map((r) => r.idx + 1), ...ev.map((e) => e.rounds_applied)])].sort((a, b) => a - b);
    const train = new Map(done.map((r) => [r.idx + 1, r.metrics.train_loss]));
    const evLoss = new Map(ev.map((e) => [e.rounds_applied, e.loss]));
    const evTop3 = new Map(ev.map((e) => [e.rounds_applied, e.top3]));
    PF.chart("chart-loss", {
      x: xs, xLabel: "rounds applied", yLabel: "loss (nats)",
      series: [
        { label: "federated evaluation loss", values: xs.map((x) => evLoss.get(x) ?? null) },
        { label: "training loss (cohort mean)", values: xs.map((x) => train.get(x) ?? null), dash: [4, 3] },
      ],
    });
    PF.chart("chart-top3", {
      x: ev.map((e) => e.rounds_applied), xLabel: "rounds applied", yLabel: "top-3 accuracy",
      series: [{ label: "federated evaluation top-3", values: ev.map((e) => e.top3), color: PF.colors[2] }],
      empty: "no federated evaluation yet (deploy.eval_every)", yRange: [0, 1],
    });
    PF.set("quality-note", ev.length ? ev.length + " evaluations, last on " + ev[ev.length - 1].devices + " devices"
      + (ev[ev.length - 1].secure ? " (secure sum)" : "") : "training loss until the first federated evaluation");
  }

  function drawPrivacy(d) {
    const p = d.privacy;
    const dp = p.dp && p.dp !== "none";
    const facts = [
      ["epsilon (recipients)", dp ? PF.num(p.epsilon_recipients, 3) : "–", "eps-recipients"],
      ["epsilon (coordinator)", dp ? (p.epsilon_coordinator == null ? "∞" : PF.num(p.epsilon_coordinator, 3)) : "–", "eps-coordinator"],
      ["budget", p.target_epsilon != null ? PF.num(p.target_epsilon, 3) : "none", "eps-budget"],
      ["noise multiplier", dp ? PF.num(p.noise_multiplier, 3) : "–", "noise"],
      ["clip norm", PF.num(p.clip_norm ?? p.clip_norm_config, 3), "clip"],
      ["secure aggregation", p.secagg ? "on" : "off", "secagg"],
    ];
    PF.set("privacy-facts", facts.map((f) => '<div class="fact" id="fact-' + f[2] + '"><b>' + f[1] + "</b><span>" + f[0] + "</span></div>").join(""));
    PF.set("privacy-note", dp ? "DP " + PF.esc(p.dp) + ", delta " + Number(p.delta).toExponential(0) + (p.coordinator_sees ? " · the coordinator sees " + PF.esc(p.coordinator_sees) : "")
      : "no differential privacy in this run" + (p.secagg ? " (secure aggregation only)" : ""));
    const done = d.rounds.filter((r) => r.status === "committed" || r.status === "empty");
    const xs = done.map((r) => r.idx + 1);
    PF.chart("chart-epsilon", {
      x: xs, xLabel: "rounds applied", yLabel: "epsilon",
      series: [
        { label: "against recipients", values: done.map((r) => r.metrics.epsilon_recipients) },
        { label: "against the coordinator", values: done.map((r) => r.metrics.epsilon_coordinator), color: PF.colors[3] },
      ],
      hlines: [{ label: "budget", value: p.target_epsilon }],
      empty: dp ? "no round accounted yet" : "no DP: nothing to account",
    });
  }

  function drawTraffic(d) {
    const rs = d.rounds.filter((r) => r.bytes_up || r.bytes_down);
    const up = d.rounds.reduce((a, r) => a + r.bytes_up, 0);
    const down = d.rounds.reduce((a, r) => a + r.bytes_down, 0);
    PF.set("traffic-facts", '<div class="fact" id="fact-up"><b>' + PF.bytes(up) + '</b><span>up, all rounds</span></div>' +
      '<div class="fact"><b>' + PF.bytes(down) + '</b><span>down, all rounds</span></div>');
    PF.chart("chart-bytes", {
      x: rs.map((r) => r.round_id), xLabel: "round id", yLabel: "bytes", yFmt: PF.bytes,
      series: [
        { label: "up (devices to coordinator)", values: rs.map((r) => r.bytes_up) },
        { label: "down (coordinator to devices)", values: rs.map((r) => r.bytes_down), color: PF.colors[1] },
      ],
    });
  }

  function drawDevices(d) {
    const v = d.devices;
    PF.set("devices-facts", [["registered", v.registered, "registered"], ["eligible now", v.eligible_now, "eligible"], ["revoked", v.revoked, "revoked"]]
      .map((f) => '<div class="fact" id="fact-' + f[2] + '"><b>' + f[1] + "</b><span>" + f[0] + "</span></div>").join(""));
    PF.set("devices-note", "eligible now: its last check-in, within " + PF.secs(v.recent_s) + ", said so");
    PF.$("devices-table").tBodies[0].innerHTML = v.rows.map((r) => {
      const elig = r.revoked_at != null ? '<span class="pill bad">revoked</span>' : r.eligible == null ? '<span class="muted">not yet</span>'
        : r.eligible ? '<span class="pill ok">yes</span>' : '<span class="pill warn">no</span>';
      const btn = r.revoked_at != null ? "" : '<button class="danger" data-revoke="' + PF.esc(r.device_id) + '">Revoke</button>';
      return '<tr data-device="' + PF.esc(r.device_id) + '"><td class="mono">' + PF.esc(r.device_id) + "</td><td>" + (PF.esc(r.profile) || '<span class="muted">none</span>') +
        "</td><td>" + elig + "</td><td>" + PF.ago(r.last_seen, d.now) + "</td><td>" + PF.time(r.registered_at) + "</td><td>" + btn + "</td></tr>";
    }).join("") || '<tr><td colspan="6" class="muted">no device registered</td></tr>';
  }

  function drawReleases(d) {
    const r = d.releases;
    PF.set("releases-facts", '<div class="fact"><b>v' + r.served + '</b><span>served</span></div>' +
      '<div class="fact"><b class="mono" style="font-size:13px;padding-top:5px">' + r.key.slice(0, 16) + "…</b><span>release key (Ed25519)</span></div>" +
      '<div class="fact"><b>' + (r.frozen_at == null ? "no" : "at v" + r.frozen_at) + "</b><span>frozen</span></div>");
    PF.set("releases-note", r.versions.length + " versions");
    PF.$("releases-table").tBodies[0].innerHTML = r.versions.map((v) =>
      "<tr><td>v" + v.version + "</td><td>" + (v.round_id ?? "initial") + "</td><td>" + PF.time(v.created_at) +
      '</td><td class="mono">' + v.adapter_sha.slice(0, 12) + "…</td><td>" +
      (v.served ? '<span class="pill ok">signed on request</span>' : '<span class="pill warn">held: frozen</span>') + "</td></tr>").join("");
  }

  function drawActions(d) {
    PF.$("actions-table").tBodies[0].innerHTML = d.actions.map((a) =>
      "<tr><td>" + PF.time(a.at) + "</td><td>" + PF.esc(a.action.replace(/_/g, " ")) + "</td><td>" + PF.esc(a.value) +
      '</td><td class="mono">' + PF.esc(a.credential) + "</td></tr>").join("") || '<tr><td colspan="4" class="muted">none yet</td></tr>';
  }

  function draw(d) {
    last = d;
    banner("");
    PF.set("hdr-model", PF.esc(d.model) + " · " + PF.esc(d.strategy) + " · version " + d.version + " · " + d.rounds_applied + "/" + d.rounds_planned + " rounds");
    PF.set("hdr-state", state(d));
    PF.$("btn-pause").textContent = d.controls.paused ? "Resume rounds" : "Pause rounds";
    PF.$("btn-freeze").textContent = d.controls.frozen_at != null ? "Unfreeze releases" : "Freeze releases";
    const goal = PF.$("goal");
    if (document.activeElement !== goal) goal.value = d.controls.goal;
    goal.min = d.controls.quorum;
    drawRounds(d); drawQuality(d); drawPrivacy(d); drawTraffic(d); drawDevices(d); drawReleases(d); drawActions(d);
    document.body.dataset.stamp = d.stamp;
  }

  // ---- wiring ---------------------------------------------------------------------------------
  PF.$("login").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, PF.$("token").value.trim());
    PF.$("token").value = "";
    start();
  });
  PF.$("btn-logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); showLogin(""); });
  PF.$("btn-pause").addEventListener("click", () => act(last && last.controls.paused ? "resume" : "pause"));
  PF.$("btn-freeze").addEventListener("click", () => act(last && last.controls.frozen_at != null ? "unfreeze" : "freeze"));
  PF.$("btn-goal").addEventListener("click", () => act("cohort", { goal: Number(PF.$("goal").value) }));
  PF.$("devices-table").addEventListener("click", (e) => {
    const id = e.target.dataset && e.target.dataset.revoke;
    if (id && confirm("Revoke " + id + "? Its requests are refused from now on, for good.")) act("devices/" + encodeURIComponent(id) + "/revoke");
  });
  let resized = null;
  window.addEventListener("resize", () => { clearTimeout(resized); resized = setTimeout(() => last && draw(last), 200); });
  if (token()) start(); else showLogin("");
})();
