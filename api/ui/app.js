"use strict";
// The unified-inference dashboard: polls /v1/dashboard every second and draws it.
// Keys live only in this tab's sessionStorage ("ui-key" for /v1/*, "ui-admin-key" for admin).

const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);
const ui = { data: null, chartModel: "", logModel: "", logAbort: null, keyFor: "client" };
window.uiState = ui; // read by tests: the data the page last drew

function keyHeader(admin) {
  const key = sessionStorage.getItem(admin ? "ui-admin-key" : "ui-key")
    || (admin ? sessionStorage.getItem("ui-key") : sessionStorage.getItem("ui-admin-key"));
  return key ? { Authorization: "Bearer " + key } : {};
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}

function notice(text, error) {
  const n = $("notice");
  n.textContent = text;
  n.className = error ? "error" : "";
  n.hidden = !text;
}

function askKey(kind, why) {
  ui.keyFor = kind;
  $("keywhy").textContent = why;
  $("keyinput").placeholder = kind === "admin" ? "ADMIN_API_KEY" : "API key";
  $("keyform").hidden = false;
}

async function errorText(resp) {
  try { const body = await resp.json(); return (body.error && body.error.message) || resp.statusText; }
  catch { return resp.statusText; }
}

async function poll() {
  try {
    const resp = await fetch("/v1/dashboard", { headers: keyHeader(false), cache: "no-store" });
    if (resp.status === 401 || resp.status === 403) {
      askKey("client", "This daemon needs an API key to show its status.");
      return;
    }
    if (!resp.ok) { notice("The daemon answered " + resp.status + ": " + await errorText(resp), true); return; }
    ui.data = await resp.json();
    draw(ui.data);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    $("updated").textContent = "the daemon is not answering";
  }
}

function draw(data) {
  const status = data.status;
  $("mode").textContent = "execution mode: " + status.execution_mode;
  drawModels(status.models);
  drawGpus(status.gpus);
  const names = status.models.map((m) => m.name);
  fillSelect($("chartmodel"), names, (v) => { ui.chartModel = v; drawCharts(); });
  fillSelect($("logmodel"), logTargets(status.models), (v) => followLog(v));
  if (!ui.chartModel) ui.chartModel = $("chartmodel").value;
  if (!ui.logModel && $("logmodel").value) followLog($("logmodel").value);
  drawCharts();
  drawRecent(data.recent);
}

function logTargets(models) {
  const out = [];
  for (const m of models) {
    if (m.replicas.length > 1) m.replicas.forEach((r) => out.push(m.name + "#" + r.replica));
    else out.push(m.name);
  }
  return out;
}

function fillSelect(select, values, onChange) {
  const current = Array.from(select.options).map((o) => o.value).join("\n");
  if (current === values.join("\n")) return;
  const keep = select.value;
  select.replaceChildren(...values.map((v) => el("option", { value: v }, v)));
  if (values.includes(keep)) select.value = keep;
  select.onchange = () => onChange(select.value);
}

function gpuText(m) {
  if (m.gpu_memory == null && !m.gpu_ids.length && m.placement !== "ray") return "";
  const parts = [];
  if (m.gpu_ids.length) parts.push("GPU " + m.gpu_ids.join(","));
  if (m.gpu_memory != null) parts.push(Math.round(m.gpu_memory * 100) + "% share");
  if (m.gpu_memory_bytes != null) parts.push((m.gpu_memory_bytes / 2 ** 30).toFixed(1) + " GiB used");
  const nodes = [...new Set(m.replicas.map((r) => r.node).filter((n) => n))];
  if (nodes.length) parts.push("Ray node " + nodes.map((n) => n.slice(0, 8)).join(","));
  return parts.join(" · ");
}

function queueTitle(m) {
  const q = m.admission_queue || {};
  return "waiting for a slot: high " + (q.high || 0) + ", normal " + (q.normal || 0) + ", low " + (q.low || 0);
}

function drawModels(models) {
  const rows = models.map((m) => {
    const ready = m.replicas.filter((r) => r.state === "ready").length;
    const actions = el("td", { class: "actions" });
    if (!m.disabled) {
      actions.append(
        el("button", { type: "button", "data-action": "start", "data-model": m.name, onclick: () => act(m.name, "start") }, "Start"),
        el("button", { type: "button", "data-action": "stop", "data-model": m.name, onclick: () => act(m.name, "stop") }, "Stop"));
    }
    if (m.gpu_memory != null && !m.disabled) {
      actions.append(el("button", { type: "button", "data-action": "sleep", "data-model": m.name, onclick: () => act(m.name, "sleep") }, "Sleep"));
    }
    const row = el("tr", { "data-model": m.name },
      el("td", {}, m.name),
      el("td", {}, el("span", { class: "badge state-" + m.state, "data-state": m.state, title: m.disabled || "" }, m.state)),
      el("td", {}, m.backend),
      el("td", {}, (m.execution_mode || "") + (m.placement === "ray" ? " · ray" : "")),
      el("td", {}, ready + "/" + m.replicas.length),
      el("td", {}, m.in_flight), el("td", { title: queueTitle(m) }, m.queued), el("td", {}, m.starts),
      el("td", {}, m.failures), el("td", {}, gpuText(m)), actions);
    const out = [row];
    if (m.disabled) out.push(el("tr", {}, el("td", { class: "error", colspan: "11" }, "cannot run: " + m.disabled)));
    if (m.last_error) out.push(el("tr", {}, el("td", { class: "error", colspan: "11" }, m.last_error)));
    return out;
  }).flat();
  $("models").tBodies[0].replaceChildren(...rows);
}

function drawGpus(gpus) {
  $("gpus-section").hidden = !gpus.length;
  $("gpus").replaceChildren(...gpus.map((g) => {
    const share = Math.min(1, g.share_reserved / (g.budget || 1));
    const fill = el("div", {});
    fill.style.width = (share * 100).toFixed(1) + "%"; // CSSOM, not a style attribute: the CSP allows it
    return el("div", { class: "gpu", "data-gpu": g.id },
      el("div", {}, "GPU " + g.id + " · " + (g.memory_total_bytes / 2 ** 30).toFixed(0) + " GiB · "
        + Math.round(g.share_reserved * 100) + "% reserved" + (g.models.length ? " by " + g.models.join(", ") : "")),
      el("div", { class: "bar" }, fill));
  }));
}

function drawRecent(recent) {
  $("recent").tBodies[0].replaceChildren(...recent.slice(0, 50).map((r) => el("tr", { "data-request-id": r.request_id },
    el("td", {}, new Date(r.time * 1000).toLocaleTimeString()), el("td", {}, r.model), el("td", {}, r.served || "-"),
    el("td", {}, r.status + (r.code ? " " + r.code : "")), el("td", {}, r.duration_ms.toFixed(1) + " ms"),
    el("td", {}, r.request_id))));
}

function drawCharts() {
  const series = (ui.data && ui.data.series[ui.chartModel]) || [];
  line($("chart-rps"), series.map((p) => [p.t, p.rps]), "#2a6df4");
  line($("chart-errors"), series.map((p) => [p.t, p.errors_ps]), "#c0392b");
  line($("chart-ttft"), series.filter((p) => p.ttft_ms != null).map((p) => [p.t, p.ttft_ms]), "#17612c");
}

function line(canvas, points, colour) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 18;
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "#6b6b70"; ctx.font = "11px system-ui";
  const now = Date.now() / 1000, span = 600;
  const top = Math.max(0, ...points.map((p) => p[1]));
  const max = top || 1;
  ctx.fillText(points.length ? "max " + (top ? top.toPrecision(3) : "0") + " · last 10 min" : "no data yet", 4, 12);
  const xy = points.map(([t, v]) => [pad + (w - 2 * pad) * Math.max(0, 1 - (now - t) / span),
    h - pad - (h - 2 * pad) * (v / max)]);
  ctx.strokeStyle = colour; ctx.fillStyle = colour; ctx.lineWidth = 2; ctx.beginPath();
  xy.forEach(([x, y], i) => { if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y); });
  ctx.stroke();
  xy.forEach(([x, y]) => { ctx.beginPath(); ctx.arc(x, y, 3, 0, 2 * Math.PI); ctx.fill(); });
  canvas.dataset.points = String(points.length);
}

async function act(model, action) {
  notice(action + " " + model + " …", false);
  try {
    const resp = await fetch("/v1/admin/models/" + encodeURIComponent(model) + "/" + action,
      { method: "POST", headers: keyHeader(true) });
    if (resp.status === 401 || resp.status === 403) {
      askKey("admin", "Admin actions need the admin key (ADMIN_API_KEY).");
      notice("Not allowed: " + await errorText(resp), true);
      return;
    }
    notice(resp.ok ? "" : action + " " + model + ": " + await errorText(resp), !resp.ok);
  } catch (e) {
    notice(action + " " + model + ": the daemon did not answer", true);
  }
  poll();
}

async function reloadConfig() {
  const resp = await fetch("/v1/admin/reload", { method: "POST", headers: keyHeader(true) });
  if (resp.status === 401 || resp.status === 403) {
    askKey("admin", "Reload needs the admin key (ADMIN_API_KEY).");
    notice("Not allowed: " + await errorText(resp), true);
    return;
  }
  if (!resp.ok) { notice("reload: " + await errorText(resp), true); return; }
  const r = await resp.json();
  notice("reloaded: " + ["added", "removed", "changed"].map((k) => k + " " + (r[k].join(", ") || "none")).join("; "), false);
  poll();
}

async function followLog(target) {
  if (ui.logAbort) ui.logAbort.abort();
  ui.logModel = target;
  const pre = $("log");
  pre.textContent = "";
  if (!target) return;
  const [model, replica] = target.split("#");
  const abort = new AbortController();
  ui.logAbort = abort;
  const url = "/v1/admin/models/" + encodeURIComponent(model) + "/logs?tail=200&follow=true"
    + (replica ? "&replica=" + replica : "");
  try {
    const resp = await fetch(url, { headers: keyHeader(true), signal: abort.signal });
    if (!resp.ok) { pre.textContent = "The engine log needs the admin key (" + await errorText(resp) + ")."; return; }
    const reader = resp.body.getReader(), decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.textContent += decoder.decode(value, { stream: true });
      if (pre.textContent.length > 200000) pre.textContent = pre.textContent.slice(-100000);
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    }
  } catch (e) {
    // aborted (another engine chosen) or the daemon went away: nothing to report
  }
}

$("keyform").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("keyinput").value.trim();
  if (!key) return;
  sessionStorage.setItem(ui.keyFor === "admin" ? "ui-admin-key" : "ui-key", key);
  $("keyinput").value = "";
  $("keyform").hidden = true;
  notice("", false);
  poll();
  if (ui.logModel) followLog(ui.logModel);
});
$("reload").addEventListener("click", () => reloadConfig().catch(() => notice("reload: the daemon did not answer", true)));
poll();
setInterval(poll, POLL_MS);
