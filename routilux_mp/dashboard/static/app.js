// The routilux-mp dashboard page: plain JavaScript and SVG, no library.
// It listens to /events (Server-Sent Events): "history" (the last snapshot and the chart points so far),
// then a "snapshot" about every second, then "final" (with the run's summary) when the runtime shuts down.
// Every text that comes from the run (routine ids, messages, tracebacks, inputs, states) is set with
// textContent, never parsed as HTML.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const SVG = "http://www.w3.org/2000/svg";
const STATES_EVERY_MS = 2000;  // WorkerState is read only while the explorer is open

let points = [];
let finished = false;
let statesTimer = null;
let lastSnap = null;

// -- small helpers ---------------------------------------------------------------------------------

function el(tag, attrs, text, ns) {
  const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}
const svg = (tag, attrs, text) => el(tag, attrs, text, SVG);
const $ = (id) => document.getElementById(id);
function setText(id, text) { const node = $(id); if (node.textContent !== String(text)) node.textContent = text; }
function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

function mib(bytes) { return bytes == null ? "-" : (bytes / 1048576).toFixed(bytes < 10485760 ? 1 : 0) + " MiB"; }
function bytes(n) { return n < 1024 ? n + " B" : n < 1048576 ? (n / 1024).toFixed(1) + " KiB" : mib(n); }
function secs(s) {
  if (s == null) return "-";
  if (s < 1) return (s * 1000).toFixed(1) + " ms";
  if (s < 60) return s.toFixed(2) + " s";
  const m = Math.floor(s / 60), h = Math.floor(m / 60);
  return h ? `${h}:${String(m % 60).padStart(2, "0")}:${String(Math.round(s % 60)).padStart(2, "0")}`
           : `${m}:${String(Math.round(s % 60)).padStart(2, "0")}`;
}
function pct(x) { return x == null ? "-" : Math.round(x * 100) + "%"; }
function num(x) { return x == null ? "-" : x.toLocaleString("en-US"); }

// -- the feed --------------------------------------------------------------------------------------

function setStatus(kind, text) {
  const node = $("status");
  node.className = "status " + kind;
  node.textContent = text;
}

function connect() {
  const source = new EventSource("events?token=" + encodeURIComponent(TOKEN));
  source.addEventListener("history", (e) => {
    const data = JSON.parse(e.data);
    points = data.points || [];
    setStatus("live", "live");
    render(data.snapshot);
  });
  source.addEventListener("snapshot", (e) => {
    const snap = JSON.parse(e.data);
    if (snap.point) points.push(snap.point);
    setStatus("live", "live");
    render(snap);
  });
  source.addEventListener("final", (e) => {
    const snap = JSON.parse(e.data);
    finished = true;
    source.close();
    if (snap.points) points = snap.points;
    setStatus("finished", "finished");
    render(snap);
    summary(snap);
    if (snap.states) states(snap.states);
  });
  source.onerror = () => {
    if (!finished) setStatus("lost", "connection lost: retrying (the run may have ended)");
  };
}

// -- panels ----------------------------------------------------------------------------------------

function render(snap) {
  if (!snap || !snap.jobs) return;
  // The graph and the failures come only when they change (and now and then): keep the last ones.
  if (lastSnap) for (const key of ["flows", "failures"]) if (snap[key] === undefined) snap[key] = lastSnap[key];
  lastSnap = snap;
  const jobs = snap.jobs;
  setText("flows-title", (snap.flows || []).map((f) => f.name).join(", "));
  setText("clock", `${secs(snap.elapsed)} elapsed · ${snap.processes_n} processes · pid ${snap.pid}`);
  setText("done", num(snap.done));
  setText("total", snap.total == null ? "?" : num(snap.total));
  for (const key of ["completed", "failed", "cancelled", "running", "pending"]) setText(key, num(jobs[key] || 0));
  setText("rate", snap.rate ? snap.rate.toFixed(1) : "-");
  setText("eta", snap.status === "finished" ? "done" : secs(snap.eta));
  const whole = snap.total || Math.max(snap.done + (jobs.running || 0) + (jobs.pending || 0), 1);
  $("bar-done").style.width = (100 * ((jobs.completed || 0) + (jobs.cancelled || 0)) / whole).toFixed(2) + "%";
  $("bar-failed").style.width = (100 * (jobs.failed || 0) / whole).toFixed(2) + "%";
  throughput();
  graph(snap);
  processes(snap);
  failures(snap);
  extra(snap);
  const cost = snap.dashboard_cpu;
  setText("cost", cost == null ? "" : `this dashboard has used ${(cost * 100).toFixed(2)}% of the supervisor's CPU time`);
}

function chartLine(series, width, height, maxY, maxX, cls) {
  const coords = series.map(([x, y]) =>
    `${(maxX ? (x / maxX) * width : 0).toFixed(1)},${(height - (y / maxY) * (height - 4) - 2).toFixed(1)}`);
  return svg("polyline", { points: coords.join(" "), class: cls });
}

function throughput() {
  const chart = clear($("throughput"));
  const width = Math.max(chart.clientWidth, 200);
  chart.setAttribute("viewBox", `0 0 ${width} 140`);  // drawn in the chart's own pixels: text is not stretched
  if (points.length < 2) return;
  const maxX = points[points.length - 1].t || 1;
  const maxRate = Math.max(...points.map((p) => p.rate), 1e-9);
  const maxDone = Math.max(...points.map((p) => p.done), 1);
  chart.appendChild(chartLine(points.map((p) => [p.t, p.done]), width, 140, maxDone, maxX, "line done"));
  chart.appendChild(chartLine(points.map((p) => [p.t, p.rate]), width, 140, maxRate, maxX, "line rate"));
  chart.appendChild(svg("text", { x: 4, y: 12, class: "axis" }, `${maxRate.toFixed(1)} jobs/s`));
  chart.appendChild(svg("text", { x: width - 4, y: 12, class: "axis end" }, `${num(maxDone)} done`));
  chart.appendChild(svg("text", { x: width - 4, y: 136, class: "axis end" }, secs(maxX)));
}

function sparkline(index, which, maxY) {
  const series = points.filter((p) => p.procs && p.procs[index] && p.procs[index][which] != null)
    .map((p) => [p.t, p.procs[index][which]]);
  const box = svg("svg", { class: "spark", viewBox: "0 0 80 18", preserveAspectRatio: "none" });
  if (series.length > 1) {
    const maxX = series[series.length - 1][0] - series[0][0] || 1;
    const x0 = series[0][0];
    const top = maxY || Math.max(...series.map((s) => s[1]), 1);
    box.appendChild(chartLine(series.map(([x, y]) => [x - x0, y]), 80, 18, top, maxX, "line spark-line"));
  }
  return box;
}

// The flow graph: routines in columns by their distance from an entry slot, connections as curves.
function layers(flow) {
  const depth = {};
  for (const r of flow.routines) depth[r.id] = 0;
  const fed = new Set(flow.connections.map((c) => c.target));
  for (let pass = 0; pass < flow.routines.length; pass++) {  // longest path, bounded (cycles stop here)
    let moved = false;
    for (const c of flow.connections) {
      if (c.source === c.target) continue;
      const d = depth[c.source] + 1;
      if (d > depth[c.target] && (fed.has(c.source) || depth[c.source] === 0)) { depth[c.target] = d; moved = true; }
    }
    if (!moved) break;
  }
  return depth;
}

function graph(snap) {
  const root = clear($("graph"));
  const queued = {};
  for (const w of snap.waiting || []) {
    const key = w.routine + "." + w.slot;
    queued[key] = (queued[key] || 0) + w.items;
  }
  const fusedLinks = new Set();
  for (const c of (snap.extra && Array.isArray(snap.extra.connections)) ? snap.extra.connections : []) {
    if (c && c.fused) fusedLinks.add(`${c.source}>${c.target}`);
  }
  const defs = svg("defs");
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7,
    markerHeight: 7, orient: "auto-start-reverse" });
  marker.appendChild(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" }));
  defs.appendChild(marker);
  root.appendChild(defs);
  const W = 260, GAP_X = 110, GAP_Y = 24, TOP = 8;
  let offsetY = 0, widest = 0;
  for (const flow of snap.flows || []) {
    const depth = layers(flow);
    const columns = {};
    const place = {};
    const heights = {};
    for (const r of flow.routines) {
      heights[r.id] = 62 + 16 * Math.max(r.slots.length, 1);
      (columns[depth[r.id]] = columns[depth[r.id]] || []).push(r);
    }
    let flowHeight = 0;
    for (const [col, routines] of Object.entries(columns)) {
      let y = offsetY + TOP + 18;
      for (const r of routines) {
        place[r.id] = { x: 8 + col * (W + GAP_X), y };
        y += heights[r.id] + GAP_Y;
      }
      flowHeight = Math.max(flowHeight, y - offsetY);
      widest = Math.max(widest, 8 + (Number(col) + 1) * (W + GAP_X));
    }
    root.appendChild(svg("text", { x: 8, y: offsetY + TOP + 8, class: "flow-name" },
      `flow ${flow.name}` + (flow.flow_id !== flow.name ? ` (flow_id ${flow.flow_id})` : "")));
    for (const c of flow.connections) {
      const a = place[c.source], b = place[c.target];
      if (!a || !b) continue;
      const target = flow.routines.find((r) => r.id === c.target);
      const slotIndex = Math.max(target.slots.indexOf(c.slot), 0);
      const x1 = a.x + W, y1 = a.y + 24, x2 = b.x, y2 = b.y + 62 + 16 * slotIndex - 4;
      const bend = Math.max(Math.abs(x2 - x1) / 2, 40);
      const fused = fusedLinks.has(`${c.source}>${c.target}`);
      const path = svg("path", { d: `M ${x1} ${y1} C ${x1 + bend} ${y1}, ${x2 - bend} ${y2}, ${x2} ${y2}`,
        class: "edge" + (fused ? " fused" : ""), "marker-end": "url(#arrow)" });
      path.appendChild(svg("title", {}, `${c.source}.${c.event} -> ${c.target}.${c.slot}` + (fused ? " (fused)" : "")));
      root.appendChild(path);
      root.appendChild(svg("text", { x: (x1 + x2) / 2, y: Math.min(y1, y2) - 6, class: "edge-label mid" },
        c.event + (fused ? " · fused" : "")));
    }
    for (const r of flow.routines) {
      const p = place[r.id];
      const st = (snap.routines || {})[r.id] || {};
      const isNeck = snap.bottleneck === r.id;
      const g = svg("g", { class: "node" + (isNeck ? " bottleneck" : "") + (st.fused ? " fused" : ""),
        "data-routine": r.id, transform: `translate(${p.x},${p.y})` });
      g.appendChild(svg("rect", { width: W, height: heights[r.id], rx: 6 }));
      const share = st.busy_share;
      g.appendChild(svg("rect", { class: "busy", x: 0, y: heights[r.id] - 5, height: 5, rx: 2,
        width: (W * Math.min(share || 0, 1)).toFixed(1) }));
      g.appendChild(svg("text", { x: 10, y: 18, class: "title" }, r.id));
      g.appendChild(svg("text", { x: W - 8, y: 18, class: "class end" },
        (isNeck ? "bottleneck · " : "") + (st.fused ? "fused · " : "") + r.class));
      const lanes = st.lanes != null ? st.lanes : "-";
      g.appendChild(svg("text", { x: 10, y: 36 },
        `busy ${pct(share)} · lanes ${st.running != null ? st.running + "/" : ""}${lanes}`));
      g.appendChild(svg("text", { x: 10, y: 52, class: "small" },
        `${num(st.activations || 0)} runs · ${num(st.errors || 0)} errors · p50 ${secs(st.p50_latency)} · p99 ${secs(st.p99_latency)}`));
      r.slots.forEach((slot, i) => {
        const q = queued[r.id + "." + slot] || 0;
        g.appendChild(svg("text", { x: 10, y: 70 + 16 * i, class: "slot" + (q ? " queued" : "") },
          `▸ ${slot}: ${num(q)} queued`));
      });
      g.appendChild(svg("title", {}, `${r.id} (${r.class})\npolicy ${r.policy}\nmax_concurrency ${r.max_concurrency}`));
      root.appendChild(g);
    }
    offsetY += flowHeight + TOP;
  }
  root.setAttribute("width", Math.max(widest, 300));
  root.setAttribute("height", Math.max(offsetY, 60));
}

const PROC_COLUMNS = ["index", "pid", "node", "alive", "rss", "cpu_percent", "activations", "restarts", "routine"];

function processes(snap) {
  const procs = snap.processes || [];
  const hasNode = procs.some((p) => p.node != null);
  const known = new Set([...PROC_COLUMNS, "ready"]);
  const more = [...new Set(procs.flatMap((p) => Object.keys(p)).filter((k) => !known.has(k)))];
  const columns = PROC_COLUMNS.filter((c) => c !== "node" || hasNode).concat(more);
  const head = clear($("procs").tHead);
  const row = head.insertRow();
  for (const c of columns) row.appendChild(el("th", {}, { cpu_percent: "CPU", rss: "RSS", index: "#" }[c] || c));
  const body = clear($("procs").tBodies[0]);
  for (const p of procs) {
    const tr = body.insertRow();
    tr.dataset.pid = p.pid;
    for (const c of columns) {
      const td = tr.insertCell();
      if (c === "rss") { td.appendChild(el("span", {}, mib(p.rss))); td.appendChild(sparkline(String(p.index), 0)); }
      else if (c === "cpu_percent") {
        td.appendChild(el("span", {}, p.cpu_percent == null ? "-" : p.cpu_percent.toFixed(0) + "%"));
        td.appendChild(sparkline(String(p.index), 1, 100));
      } else if (c === "alive") td.textContent = p.alive ? (p.ready ? "ready" : "starting") : "down";
      else td.textContent = p[c] == null ? "-" : typeof p[c] === "object" ? JSON.stringify(p[c]) : p[c];
    }
  }
}

function failures(snap) {
  const list = snap.failures || [];
  const failed = (snap.jobs || {}).failed || 0;
  setText("failures-count", failed ? `${num(failed)} failed` + (failed > list.length ? `, the last ${list.length} shown` : "") : "");
  const box = $("failures");
  const key = list.map((f) => f.job_id).join("|");
  if (box.dataset.key === key) return;  // unchanged: keep what the user opened
  box.dataset.key = key;
  clear(box);
  if (!list.length) { box.appendChild(el("p", { class: "empty" }, "none")); return; }
  list.forEach((f, i) => {
    const item = el("details", { class: "failure", "data-job": f.job_id });
    if (i === 0) item.open = true;
    const head = el("summary");
    head.appendChild(el("b", {}, f.job_id));
    if (f.line != null) head.appendChild(el("span", { class: "tag" }, `line ${f.line}`));
    if (f.routine) head.appendChild(el("span", { class: "tag" }, f.routine));
    head.appendChild(el("span", { class: "msg" }, `${f.type || "Error"}: ${f.message || ""}`));
    item.appendChild(head);
    if (f.input != null) { item.appendChild(el("h4", {}, "input")); item.appendChild(el("pre", { class: "input" }, f.input)); }
    if (f.metadata) { item.appendChild(el("h4", {}, "metadata")); item.appendChild(el("pre", {}, JSON.stringify(f.metadata))); }
    item.appendChild(el("h4", {}, `traceback (worker ${f.worker_id}, attempts ${f.attempts})`));
    item.appendChild(el("pre", { class: "traceback" }, f.traceback || "(none)"));
    box.appendChild(item);
  });
}

function extra(snap) {
  const keys = Object.keys(snap.extra || {});
  $("extra-panel").hidden = !keys.length;
  if (keys.length) setText("extra", JSON.stringify(snap.extra, null, 1));
}

// -- WorkerState explorer: read only while open ----------------------------------------------------

function states(data) {
  const body = clear($("states-body"));
  if (data.error) body.appendChild(el("p", { class: "bad" }, data.error));
  if (!data.workers.length) { body.appendChild(el("p", { class: "empty" }, "no workers yet")); return; }
  for (const w of data.workers) {
    const box = el("div", { class: "worker", "data-worker": w.worker_id });
    box.appendChild(el("h3", {}, `${w.worker_id} · flow ${w.flow_id || "?"} · ${w.status || "?"} · ` +
      `${num(w.jobs_processed)} processed, ${num(w.jobs_failed)} failed`));
    if (w.error) box.appendChild(el("p", { class: "bad" }, w.error));
    if (!w.routines.length) box.appendChild(el("p", { class: "empty" }, "no routine state written"));
    for (const r of w.routines) {
      const item = el("details", { class: "routine-state" });
      item.appendChild(el("summary", {}, `${r.routine} · ${bytes(r.bytes)} · ${num(r.lost_updates)} lost updates`
        + (r.truncated ? " · shown in part" : "")));
      item.appendChild(el("pre", {}, r.json));
      box.appendChild(item);
    }
    body.appendChild(box);
  }
}

function refreshStates() {
  if (finished || !$("states").open) return;
  fetch("api/states?token=" + encodeURIComponent(TOKEN), { cache: "no-store" })
    .then((r) => r.json()).then(states)
    .catch(() => { /* the run may have ended: the final event brings the last states */ });
}

$("states").addEventListener("toggle", () => {
  clearInterval(statesTimer);
  if ($("states").open && !finished) {
    refreshStates();
    statesTimer = setInterval(refreshStates, STATES_EVERY_MS);
  }
});

// -- the end ---------------------------------------------------------------------------------------

function summary(snap) {
  const s = snap.summary;
  if (!s) return;
  $("summary").hidden = false;
  setText("summary-line", `${num(s.done)} jobs in ${secs(s.wall)}` +
    (s.throughput ? `, ${s.throughput.toFixed(1)} jobs/s` : "") + ` on ${snap.processes_n} processes: ` +
    `${num(s.completed)} completed, ${num(s.failed)} failed, ${num(s.cancelled)} cancelled. Busy over the run: ` +
    Object.entries(s.busy).map(([rid, b]) => `${rid} ${pct(b)}`).join(", ") + ".");
  setText("summary-hint", s.hint ? "bottleneck: " + s.hint : "");
}

connect();
