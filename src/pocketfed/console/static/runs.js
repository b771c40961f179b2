// The simulation-runs console: every run folder's metrics.jsonl and summary.json, side by side.
"use strict";
(function () {
  const VARIANTS = ["base", "federated", "personalized", "local_only", "centralized"];

  // one chart, one series per run, over the union of their rounds (1-based: rounds applied)
  function overlay(id, runs, key, opts) {
    const xs = [...new Set(runs.flatMap((r) => r.rows.map((x) => x.round + 1)))].sort((a, b) => a - b);
    const series = runs.map((r, i) => {
      const m = new Map(r.rows.map((x) => [x.round + 1, x[key]]));
      return { label: r.name, values: xs.map((x) => m.get(x) ?? null), color: PF.colors[i % PF.colors.length] };
    });
    PF.chart(id, { x: xs, series, xLabel: "round", ...opts });
  }

  function draw(d) {
    PF.set("hdr-root", PF.esc(d.root) + " · " + d.runs.length + " runs");
    const runs = d.runs;
    const head = "<tr><th></th>" + runs.map((r, i) => '<th style="color:' + PF.colors[i % PF.colors.length] + '">' + PF.esc(r.name) + "</th>").join("") + "</tr>";
    const row = (label, f) => "<tr><td class=\"muted\">" + label + "</td>" + runs.map((r) => "<td>" + f(r) + "</td>").join("") + "</tr>";
    const s = (r) => r.settings;
    const last = (r, k) => (r.rows.length ? r.rows[r.rows.length - 1][k] : null);
    PF.$("runs-table").tHead.innerHTML = head;
    PF.$("runs-table").tBodies[0].innerHTML = [
      row("model", (r) => PF.esc(s(r).model ?? "–")),
      row("strategy", (r) => PF.esc(s(r).strategy ?? "–")),
      row("privacy", (r) => PF.esc(!s(r).dp || s(r).dp === "none" ? "no DP" : "DP " + s(r).dp + (s(r).noise_multiplier ? ", z " + s(r).noise_multiplier : "")) +
        (s(r).secagg ? " + secure aggregation" : "")),
      row("rounds", (r) => r.rows.length + (s(r).rounds ? " of " + s(r).rounds : "") + (r.summary ? "" : ' <span class="pill info">running</span>')),
      row("last training loss", (r) => PF.num(last(r, "train_loss"), 4)),
      row("epsilon (recipients)", (r) => PF.num(last(r, "epsilon_recipients"), 3)),
    ].join("");
    overlay("chart-train", runs, "train_loss", { yLabel: "loss (nats)" });
    overlay("chart-heldout", runs, "heldout_perplexity", { yLabel: "perplexity", empty: "no held-out evaluation per round (eval.every_round)" });
    overlay("chart-top3", runs, "heldout_top3", { yLabel: "top-3", yRange: [0, 1], empty: "no held-out evaluation per round" });
    overlay("chart-epsilon", runs, "epsilon_recipients", { yLabel: "epsilon", empty: "no run with DP" });
    overlay("chart-bytes", runs, "bytes_up", { yLabel: "bytes", yFmt: PF.bytes });
    PF.$("summary-table").tHead.innerHTML = head;
    const cell = (r, v) => {
      const x = r.summary && r.summary[v];
      return x ? PF.fixed(x.perplexity, 2) + ' <span class="muted">top-3 ' + PF.fixed(x.top3, 3) + "</span>" : "–";
    };
    PF.$("summary-table").tBodies[0].innerHTML = VARIANTS.filter((v) => runs.some((r) => r.summary && r.summary[v]))
      .map((v) => row(v.replace("_", " "), (r) => cell(r, v))).join("") || '<tr><td class="muted">no run has finished</td></tr>';
    document.body.dataset.stamp = d.stamp;
  }

  const banner = (t) => { const el = PF.$("banner"); el.textContent = t; el.style.display = t ? "block" : "none"; };
  PF.poll("/console/api/runs", 3000, () => ({}), (d) => { banner(""); draw(d); }, (status, body) => { banner(body.detail || "error " + status); return false; });
})();
