// postmux's dashboard: one EventSource, a snapshot a second, tables redrawn and two uPlot charts.
// No build step: plain ES2017 in the browser. Every update is timed (performance.now) and kept in
// window.postmux.timings, shown in the header, and read by the bench (bench/dashboard.py).
"use strict";

const RING = 1000; // events kept by the page (the node keeps its own ring of the same size)
const SHOWN = 200; // event rows drawn at most: the table stays cheap at 10,000 events a minute
const ADMIN = "/dashboard/api/v1";

const state = { events: [], seq: 0, types: new Set(), charts: {}, timings: [], snapshots: 0, last: null };
window.postmux = state;

const $ = (sel) => document.querySelector(sel);
const esc = (v) =>
  String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const age = (s) => (s == null ? "" : s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`);
const pct = (r) => (r == null ? "" : `${(r * 100).toFixed(1)}%`);
const clock = (ts) => new Date(ts * 1000).toISOString().slice(11, 19);
const reply = (r) => (r ? `${r.code} ${r.enhanced_code || ""} ${r.text || ""}` : "");

async function admin(method, path, body) {
  const init = { method, headers: { "X-Postmux-Dashboard": "1", "Content-Type": "application/json" } };
  if (body !== undefined) init.body = JSON.stringify(body);
  const answer = await fetch(ADMIN + path, init);
  const data = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new Error(data.error || `HTTP ${answer.status}`);
  return data;
}

function setRows(table, rows) {
  $(`#${table} tbody`).innerHTML = rows.join("");
}

function renderPools(pools) {
  setRows(
    "pools",
    pools.map((p) => {
      const n1 = p.n_plus_1 == null ? '<span class="note">no load this hour</span>'
        : p.n_plus_1 ? '<span class="ok">yes</span>' : '<span class="bad">no</span>';
      return `<tr data-pool="${esc(p.pool)}"><td>${esc(p.pool)}</td><td>${p.up} / ${p.members}</td>` +
        `<td>${p.peak_per_min}</td><td>${p.capacity_per_min}</td><td>${p.without_biggest_per_min}</td>` +
        `<td class="n1">${n1}</td></tr>`;
    }),
  );
}

function renderNode(node) {
  const zone = node.zone == null ? "no zone" : `zone ${node.zone}`;
  $("#node").textContent = node.name ? `${node.name} · ${zone}` : zone;
}

// Where the node's picks of a pool go (Pool.zone_routing), in words.
function routing(r) {
  const health = r.local_health == null ? "" : ` (zone ${pct(r.local_health)} healthy, threshold ${pct(r.local_threshold)})`;
  switch (r.state) {
    case "local": return `all in the zone${health}`;
    case "spilling": return `spilling ${pct(1 - r.local_share)} of picks to other zones${health}`;
    case "remote": return `all to other zones${health}`;
    case "panic": return "panic: every member, whatever its zone";
    case "off": return "zone routing off";
    case "none": return "the node has no zone";
    default: return "no member usable";
  }
}

function renderZones(pools, node) {
  const zoned = node.zone != null || pools.some((p) => p.zones.some((z) => z.zone));
  $("#zones-panel").hidden = !zoned;
  if (!zoned) return;
  const rows = [];
  for (const p of pools) {
    p.zones.forEach((z, i) => {
      const first = i === 0
        ? `<td rowspan="${p.zones.length}">${esc(p.pool)}</td>` +
          `<td class="routing" rowspan="${p.zones.length}" data-state="${esc(p.zone_routing.state)}">${esc(routing(p.zone_routing))}</td>`
        : "";
      rows.push(
        `<tr data-pool="${esc(p.pool)}" data-zone="${esc(z.zone)}">${first}` +
        `<td>${z.zone ? esc(z.zone) : '<span class="note">no zone</span>'}${z.local ? ' <span class="tag">local</span>' : ""}</td>` +
        `<td>${z.up} / ${z.members}</td><td>${z.attempts_last_min}</td><td class="share">${pct(z.share)}</td></tr>`,
      );
    });
  }
  setRows("zones", rows);
}

function renderMembers(members) {
  setRows(
    "members",
    members.map((m) => {
      const action = m.state === "draining" ? "enable" : "drain";
      return `<tr data-pool="${esc(m.pool)}" data-member="${esc(m.member)}" data-state="${esc(m.state)}">` +
        `<td>${esc(m.pool)}</td><td>${esc(m.member)}</td><td class="zone">${esc(m.zone)}</td><td><span class="state">${esc(m.state)}</span></td>` +
        `<td class="why">${esc(m.state === "up" ? "" : m.why)}</td><td>${m.weight}</td>` +
        `<td>${m.connections} / ${m.max_connections}</td><td>${m.in_flight}</td><td>${m.ewma_latency_ms}</td>` +
        `<td>${pct(m.error_rate)}</td><td>${m.ejections}</td><td>${m.ejected_for_s ? age(m.ejected_for_s) : ""}</td>` +
        `<td><button type="button" data-act="${action}" data-name="${esc(m.member)}">${action}</button></td></tr>`;
    }),
  );
}

function renderQueue(queue) {
  $("#queue-total").textContent = queue.error
    ? queue.error
    : `${queue.recipients} recipients; oldest ${age(queue.oldest_age_s)}`;
  setRows(
    "queue",
    (queue.destinations || []).map((d) => {
      const sel = `data-pool="${esc(d.pool)}" data-domain="${esc(d.domain)}"`;
      return `<tr ${sel}><td>${esc(d.pool)}</td><td>${esc(d.domain)}</td><td>${esc(d.destination)}</td>` +
        `<td>${d.recipients}</td><td>${d.queued}</td><td>${d.leased}</td><td>${d.held}</td>` +
        `<td>${age(d.oldest_age_s)}</td><td class="err">${esc(d.last_error)}</td><td>` +
        ["flush", "hold", "release"].map((v) => `<button type="button" data-queue="${v}" ${sel}>${v}</button>`).join(" ") +
        "</td></tr>";
    }),
  );
}

function renderLanes(lanes) {
  const rate = (r) => (r == null ? "∞" : r);
  setRows(
    "lanes",
    lanes.slice(0, 300).map((l) =>
      `<tr data-state="${esc(l.state)}"><td>${esc(l.pool)}</td><td>${esc(l.member)}</td><td>${esc(l.destination)}</td>` +
      `<td>${esc(l.state)}</td><td>${l.connections} / ${l.max_connections}</td>` +
      `<td>${rate(l.rate_per_min)} / ${rate(l.max_rate_per_min)}</td>` +
      `<td>${l.suspended_for_s ? age(l.suspended_for_s) : ""}</td>` +
      `<td class="why">${esc(l.last_change)}${l.last_change_age_s != null ? ` (${age(l.last_change_age_s)} ago)` : ""}</td></tr>`),
  );
}

function addEvents(snap) {
  // A reconnected stream starts again from the node's ring: keep only events this page has not seen
  // (a node that restarted counts from 0 again, so then everything is new).
  if (snap.seq < state.seq) state.seq = 0;
  const events = snap.events.filter((e) => e.seq > state.seq);
  state.seq = snap.seq;
  if (!events.length) return;
  for (const e of events) {
    if (!state.types.has(e.type)) {
      state.types.add(e.type);
      $("#f-type").insertAdjacentHTML("beforeend", `<option>${esc(e.type)}</option>`);
    }
  }
  state.events.push(...events);
  if (state.events.length > RING) state.events.splice(0, state.events.length - RING);
}

function renderEvents() {
  const type = $("#f-type").value;
  const member = $("#f-member").value.trim();
  const domain = $("#f-domain").value.trim().toLowerCase();
  const id = $("#f-id").value.trim();
  const rows = [];
  for (let i = state.events.length - 1; i >= 0 && rows.length < SHOWN; i--) {
    const e = state.events[i];
    if (type && e.type !== type) continue;
    if (member && e.member !== member) continue;
    if (domain && !e.recipient.toLowerCase().endsWith("@" + domain) && !e.queue.endsWith("/" + domain)) continue;
    if (id && e.id !== id && e.message_id !== id) continue;
    rows.push(
      `<tr data-type="${esc(e.type)}"><td>${clock(e.timestamp)}</td><td>${esc(e.type)}</td>` +
      `<td>${e.id ? `<a class="msg" data-id="${esc(e.id)}">${esc(e.id)}</a>` : ""}</td><td>${esc(e.recipient)}</td>` +
      `<td>${esc(e.pool)}</td><td>${esc(e.member)}</td>` +
      `<td class="reply">${esc(reply(e.response) || e.tags.reason || e.tags.change || "")}</td></tr>`,
    );
  }
  setRows("events", rows);
  $("#events-count").textContent = `${rows.length} shown of ${state.events.length} kept`;
}

function chart(id, series, opts) {
  const el = $(id);
  const width = Math.max(360, el.clientWidth || 600);
  return new uPlot({ width, height: 200, series: [{}, ...series], scales: { x: { time: true } }, ...opts },
    [[], ...series.map(() => [])], el);
}

function makeCharts() {
  state.charts.throughput = chart("#chart-throughput", [
    { label: "accepted", stroke: "#1d4f91" },
    { label: "delivered", stroke: "#13622e" },
    { label: "deferred", stroke: "#b7791f" },
    { label: "bounced", stroke: "#9b1c1c" },
  ]);
  state.charts.latency = chart("#chart-latency", [
    // Points drawn: a minute with deliveries between minutes without any has no line to draw.
    { label: "p50 ms", stroke: "#1d4f91", points: { show: true, size: 5 } },
    { label: "p99 ms", stroke: "#9b1c1c", points: { show: true, size: 5 } },
  ], { axes: [{}, { label: "ms" }] });
}

function renderCharts(s) {
  state.charts.throughput.setData([s.t, s.accepted, s.delivered, s.deferred, s.bounced]);
  state.charts.latency.setData([s.t, s.p50_ms, s.p99_ms]);
}

function update(snap) {
  const t0 = performance.now();
  renderNode(snap.node);
  renderPools(snap.pools);
  renderZones(snap.pools, snap.node);
  renderMembers(snap.members);
  if (snap.queue) renderQueue(snap.queue);
  renderLanes(snap.lanes);
  addEvents(snap);
  renderEvents();
  renderCharts(snap.series);
  const ms = performance.now() - t0;
  state.timings.push(ms);
  if (state.timings.length > 1000) state.timings.shift();
  state.snapshots += 1;
  state.last = snap;
  $("#timing").textContent = `update ${ms.toFixed(1)} ms`;
}

async function showMessage(id) {
  $("#message-panel").hidden = false;
  $("#message-id").textContent = id;
  const seen = state.events.filter((e) => e.id === id);
  let spool = "";
  try {
    const m = await admin("GET", `/queue/messages/${encodeURIComponent(id)}`);
    spool = `<h3>In the spool: from ${esc(m.sender)}, ${age(m.age_s)} old</h3><table><tr><th>recipient</th>` +
      "<th>state</th><th>attempts</th><th>last reply</th></tr>" +
      m.recipients.map((r) => `<tr><td>${esc(r.address)}</td><td>${esc(r.state)}</td><td>${r.attempts}</td>` +
        `<td class="reply">${esc(r.last_reply)}</td></tr>`).join("") + "</table>" +
      "<h3>Attempts</h3><table><tr><th>at</th><th>recipient</th><th>member</th><th>reply</th></tr>" +
      m.attempts.map((a) => `<tr><td>${clock(a.at)}</td><td>${esc(a.recipient)}</td><td>${esc(a.member)}</td>` +
        `<td class="reply">${esc(a.reply)}</td></tr>`).join("") + "</table>";
  } catch (err) {
    spool = `<p class="note">Not in the spool (${esc(err.message)}): finished, or never accepted.</p>`;
  }
  $("#message-body").innerHTML = spool +
    "<h3>Events seen by this page</h3><table><tr><th>time</th><th>type</th><th>recipient</th><th>member</th>" +
    "<th>reply</th></tr>" + seen.map((e) => `<tr><td>${clock(e.timestamp)}</td><td>${esc(e.type)}</td>` +
      `<td>${esc(e.recipient)}</td><td>${esc(e.member)}</td><td class="reply">${esc(reply(e.response))}</td></tr>`).join("") +
    "</table>";
}

function wire() {
  document.addEventListener("click", async (ev) => {
    const el = ev.target;
    try {
      if (el.dataset.act) {
        el.disabled = true;
        await admin("POST", `/members/${encodeURIComponent(el.dataset.name)}/${el.dataset.act}`);
      } else if (el.dataset.queue) {
        const done = await admin("POST", `/queue/${el.dataset.queue}`, { pool: el.dataset.pool, domain: el.dataset.domain });
        renderQueue(await admin("GET", "/queue")); // now, not at the stream's next queue read
        $("#queue-total").textContent = done.changes.join("; ");
      } else if (el.classList.contains("msg")) {
        await showMessage(el.dataset.id);
      } else if (el.id === "message-close") {
        $("#message-panel").hidden = true;
      }
    } catch (err) {
      $("#status").textContent = `refused: ${err.message}`;
    }
  });
  for (const f of ["#f-type", "#f-member", "#f-domain", "#f-id"]) $(f).addEventListener("input", renderEvents);
}

function connect() {
  const source = new EventSource("/dashboard/stream");
  source.addEventListener("snapshot", (e) => {
    $("#status").textContent = "live";
    $("#status").className = "status live";
    update(JSON.parse(e.data));
  });
  source.onerror = async () => {
    $("#status").textContent = "disconnected; retrying";
    $("#status").className = "status down";
    // Signed out (the token changed, the cookie expired): back to the form rather than retrying forever.
    const probe = await fetch("/dashboard/state", { method: "GET" }).catch(() => null);
    if (probe && probe.status === 401) {
      source.close();
      window.location.assign("/");
    }
  };
}

makeCharts();
wire();
connect();
