// Pinion dashboard: plain JavaScript, no build step, nothing loaded from elsewhere.
// Routes are real URLs: /, /namespaces/NS, /namespaces/NS/edges, /tap?resource=...
"use strict";

const view = document.getElementById("view");
const crumbs = document.getElementById("crumbs");
const statusLine = document.getElementById("status");
let timer = null;
let tapAbort = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function link(href, text) {
  const a = el("a", { href }, text);
  a.addEventListener("click", (event) => {
    if (event.ctrlKey || event.metaKey) return;
    event.preventDefault();
    history.pushState(null, "", href);
    route();
  });
  return a;
}

const fmt = {
  percent: (v) => (v === null || v === undefined ? "-" : (v * 100).toFixed(2) + "%"),
  rps: (v) => (v === null || v === undefined ? "-" : v.toFixed(1)),
  ms: (v) => (v === null || v === undefined ? "-" : v < 10 ? v.toFixed(1) + "ms" : Math.round(v) + "ms"),
  count: (v) => (v === null || v === undefined ? "-" : String(v)),
};

function successCell(value) {
  const cls = value === null || value === undefined ? "muted" : value >= 0.95 ? "ok" : value >= 0.8 ? "warn" : "bad";
  return el("td", { class: cls }, fmt.percent(value));
}

function goldenCells(row) {
  return [successCell(row.success), el("td", {}, fmt.rps(row.rps)), el("td", {}, fmt.ms(row.latency_ms_p50)),
    el("td", {}, fmt.ms(row.latency_ms_p95)), el("td", {}, fmt.ms(row.latency_ms_p99)),
    el("td", {}, fmt.count(row.tcp_open_connections))];
}

const GOLDEN_HEADERS = ["Success", "RPS", "P50", "P95", "P99", "TCP"];

function table(headers, rows, id) {
  return el("table", id ? { id } : {}, el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(url + ": " + response.status);
  return response.json();
}

function showErrors(errors) {
  return errors && errors.length ? el("p", { class: "errors" }, "Agents unreachable: " + errors.join("; ")) : "";
}

function setCrumbs(parts) {
  crumbs.replaceChildren(...parts.flatMap((part, i) => (i ? [" / ", part] : [part])));
}

// --- pages --------------------------------------------------------------------------------

async function overviewPage() {
  setCrumbs([link("/", "Namespaces"), link("/tap", "Tap")]);
  const data = await getJSON("/api/overview");
  const rows = data.namespaces.map((ns) => el("tr", { "data-namespace": ns.name },
    el("td", {}, link("/namespaces/" + encodeURIComponent(ns.name), ns.name)),
    el("td", {}, ns.meshed + "/" + ns.pods), ...goldenCells(ns)));
  view.replaceChildren(el("h1", {}, "Namespaces"),
    showErrors(data.errors),
    table(["Namespace", "Meshed", ...GOLDEN_HEADERS], rows, "namespaces"),
    el("p", { class: "muted", id: "source" }, "Agents: " + data.agents.join(", ") + ". Numbers from: " + data.source + "."));
}

async function namespacePage(ns) {
  const base = "/namespaces/" + encodeURIComponent(ns);
  setCrumbs([link("/", "Namespaces"), link(base, ns), link(base + "/edges", "edges"),
    link("/tap?namespace=" + encodeURIComponent(ns) + "&resource=" + encodeURIComponent("ns/" + ns), "tap")]);
  const data = await getJSON("/api/namespace?name=" + encodeURIComponent(ns));
  const rowsOf = (items, kind) => items.map((row) => el("tr", { "data-name": row.name },
    el("td", {}, link("/tap?namespace=" + encodeURIComponent(ns) + "&resource=" +
      encodeURIComponent(kind + "/" + row.name), row.name)),
    el("td", {}, row.meshed), ...goldenCells(row)));
  view.replaceChildren(el("h1", {}, "Namespace " + ns),
    showErrors(data.errors),
    el("h2", {}, "Deployments"), table(["Deployment", "Meshed", ...GOLDEN_HEADERS], rowsOf(data.deployments, "deploy"), "deployments"),
    el("h2", {}, "Pods"), table(["Pod", "Meshed", ...GOLDEN_HEADERS], rowsOf(data.pods, "pod"), "pods"),
    el("p", { class: "muted", id: "source" }, "Numbers from: " + data.source + "."));
}

function graph(edges) {
  const names = [...new Set(edges.flatMap((e) => [e.src, e.dst || "(destination unknown)"]))].sort();
  const width = 720, height = Math.max(320, 70 * Math.ceil(names.length / 2) + 80);
  const cx = width / 2, cy = height / 2, radius = Math.min(cx, cy) - 70;
  const at = {};
  names.forEach((name, i) => {
    const angle = (2 * Math.PI * i) / Math.max(1, names.length) - Math.PI / 2;
    at[name] = [cx + radius * Math.cos(angle), cy + radius * Math.sin(angle)];
  });
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "graph");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const defs = document.createElementNS(ns, "defs");
  for (const [id, color] of [["ok", "#1a7f37"], ["bad", "#c62828"]]) {
    const marker = document.createElementNS(ns, "marker");
    for (const [k, v] of Object.entries({ id: "arrow-" + id, viewBox: "0 0 10 10", refX: "22", refY: "5",
      markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" })) marker.setAttribute(k, v);
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", "M 0 0 L 10 5 L 0 10 z");
    path.setAttribute("fill", color);
    marker.append(path);
    defs.append(marker);
  }
  svg.append(defs);
  for (const e of edges) {
    const [x1, y1] = at[e.src], [x2, y2] = at[e.dst || "(destination unknown)"];
    const line = document.createElementNS(ns, "line");
    const kind = e.secured ? "ok" : "bad";
    for (const [k, v] of Object.entries({ x1, y1, x2, y2, stroke: kind === "ok" ? "#1a7f37" : "#c62828",
      "stroke-width": "2", "marker-end": "url(#arrow-" + kind + ")", "stroke-dasharray": e.secured ? "" : "6 4" }))
      line.setAttribute(k, v);
    svg.append(line);
  }
  for (const name of names) {
    const [x, y] = at[name];
    const circle = document.createElementNS(ns, "circle");
    for (const [k, v] of Object.entries({ cx: x, cy: y, r: 14, fill: "#2d5bd7" })) circle.setAttribute(k, v);
    const text = document.createElementNS(ns, "text");
    const above = y < cy;  // labels outside the ring, away from the edges
    for (const [k, v] of Object.entries({ x, y: above ? y - 22 : y + 30, "text-anchor": "middle" }))
      text.setAttribute(k, v);
    text.textContent = name;
    svg.append(circle, text);
  }
  return svg;
}

async function edgesPage(ns) {
  const base = "/namespaces/" + encodeURIComponent(ns);
  setCrumbs([link("/", "Namespaces"), link(base, ns), link(base + "/edges", "edges")]);
  const data = await getJSON("/api/edges?namespace=" + encodeURIComponent(ns));
  const rows = data.edges.map((e) => el("tr", {}, el("td", {}, e.src), el("td", { class: "left" }, e.dst || "-"),
    el("td", { class: "left" }, e.dst_namespace || "-"),
    el("td", { class: e.secured ? "ok" : "bad" }, e.secured ? "✓ mTLS" : "✗ " + (e.tls || "plaintext")),
    el("td", { class: "left" }, e.server_id || e.client_id || "")));
  view.replaceChildren(el("h1", {}, "Edges in " + ns),
    showErrors(data.errors),
    data.edges.length ? graph(data.edges) : el("p", { class: "muted" }, "No edges yet."),
    el("p", { class: "muted" }, "Green solid: mutual TLS. Red dashed: plaintext."),
    table(["Source", "Destination", "Dst namespace", "TLS", "Identity"], rows, "edges"));
}

const TAP_FIELDS = ["resource", "namespace", "to", "from", "method", "path", "authority", "max_rps"];

function tapPage() {
  setCrumbs([link("/", "Namespaces"), link("/tap", "Tap")]);
  const params = new URLSearchParams(location.search);
  const inputs = {};
  const form = el("form", { class: "filters" }, TAP_FIELDS.map((name) => {
    inputs[name] = el("input", { name, value: params.get(name) || (name === "namespace" ? "default" : ""),
      placeholder: { resource: "deploy/web", to: "pod/api-1", from: "deploy/cli", path: "/api", max_rps: "100" }[name] || "" });
    return el("label", {}, name, inputs[name]);
  }), el("button", { type: "submit" }, "Start"));
  const counter = el("span", { class: "muted", id: "tap-count" }, "");
  const body = el("tbody", {});
  const headers = ["Direction", "Source", "Destination", "TLS", "Method", "Authority", "Path", "Status", "gRPC", "Latency", "Bytes"];
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const query = new URLSearchParams();
    for (const name of TAP_FIELDS) if (inputs[name].value) query.set(name, inputs[name].value);
    history.pushState(null, "", "/tap?" + query.toString());
    route();
  });
  const tapTable = table(headers, [], "tap");
  tapTable.querySelector("tbody").replaceWith(body);
  view.replaceChildren(el("h1", {}, "Live tap"), form, counter, tapTable);
  if (params.get("resource")) startTap(params, body, counter);
}

async function startTap(params, body, counter) {
  const query = new URLSearchParams();
  for (const name of TAP_FIELDS) if (params.get(name)) query.set(name, params.get(name));
  tapAbort = new AbortController();
  let shown = 0;
  counter.textContent = "tapping " + params.get("resource") + "…";
  try {
    const response = await fetch("/api/tap?" + query.toString(), { signal: tapAbort.signal });
    if (!response.ok) {
      counter.textContent = "tap refused: " + (await response.text());
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += decoder.decode(value, { stream: true });
      const lines = pending.split("\n");
      pending = lines.pop();
      for (const line of lines) {
        if (!line.trim()) continue;
        const event = JSON.parse(line);
        if (event.kind === "error") { counter.textContent = event.message; continue; }
        if (event.kind !== "request") continue;
        shown += 1;
        const failed = event.classification !== "success";
        body.prepend(el("tr", { class: "tapped" }, el("td", {}, event.direction),
          el("td", { class: "left" }, event.src_pod || event.src), el("td", { class: "left" }, event.dst_pod || event.dst),
          el("td", { class: event.tls === "true" ? "ok" : "muted" }, event.tls),
          el("td", { class: "left" }, event.method), el("td", { class: "left" }, event.authority),
          el("td", { class: "left" }, event.path),
          el("td", { class: failed ? "bad" : "ok" }, event.status === null ? (event.error || "-") : event.status),
          el("td", {}, event.grpc_status === null ? "" : event.grpc_status),
          el("td", {}, fmt.ms(event.latency_ms)), el("td", {}, event.response_bytes + "B")));
        while (body.children.length > 500) body.lastChild.remove();
        counter.textContent = shown + " requests";
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") counter.textContent = "tap ended: " + error.message;
  }
}

// --- routing --------------------------------------------------------------------------------

async function route() {
  if (timer) clearInterval(timer);
  if (tapAbort) tapAbort.abort();
  timer = null;
  tapAbort = null;
  const parts = location.pathname.split("/").filter(Boolean).map(decodeURIComponent);
  let page;
  if (parts[0] === "tap") page = tapPage;
  else if (parts[0] === "namespaces" && parts[1] && parts[2] === "edges") page = () => edgesPage(parts[1]);
  else if (parts[0] === "namespaces" && parts[1]) page = () => namespacePage(parts[1]);
  else page = overviewPage;
  const refresh = async () => {
    try {
      await page();
      statusLine.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (error) {
      statusLine.textContent = "cannot load: " + error.message;
    }
  };
  await refresh();
  if (page !== tapPage) timer = setInterval(refresh, 2000);
  document.body.dataset.loaded = "true";
}

window.addEventListener("popstate", route);
route();
