// The HMS-MGMT dashboard: one page, rendered here from the engine's JSON API.
// Every value from the API goes into the page as text (textContent, text nodes), never as
// HTML: a payload that holds "<script>" shows as those characters.
"use strict";

const TOKEN_KEY = "hms-token";
const STATUSES = ["pending", "scheduled", "running", "waiting", "paused", "compensating", "succeeded", "failed", "cancelled", "compensated"];
const main = document.getElementById("main");
let current = null; // the page shown: {refresh()}
let refreshTimer = null;

// -- building the DOM, as text only ------------------------------------------------------

function h(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "className") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

function link(href, ...children) {
  return h("a", { href, "data-nav": true }, ...children);
}

function statusBadge(status) {
  return h("span", { className: `status ${status}` }, status);
}

function when(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 23) + "Z";
}

function took(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  if (seconds < 1) return `${(seconds * 1000).toFixed(1)} ms`;
  if (seconds < 120) return `${seconds.toFixed(2)} s`;
  return `${(seconds / 60).toFixed(1)} min`;
}

function age(seconds) {
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return `${Math.round(s)}s ago`;
  if (s < 3600) return `${Math.round(s / 60)}m ago`;
  if (s < 86400) return `${Math.round(s / 3600)}h ago`;
  return `${Math.round(s / 86400)}d ago`;
}

function json(value) {
  return JSON.stringify(value, null, 2);
}

// A payload pretty-printed, in a <pre> (as text); collapsed when large.
function payload(label, value) {
  const text = value === undefined ? "null" : json(value);
  const pre = h("pre", { className: "mono", "data-payload": label }, text);
  return h("details", { open: text.length <= 2000 }, h("summary", {}, `${label} (${text.length} chars)`), pre);
}

function notice(text, bad) {
  const box = document.getElementById("notice");
  box.textContent = text;
  box.className = bad ? "bad" : "";
  box.hidden = !text;
}

// -- the API -------------------------------------------------------------------------------

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, options = {}) {
  const headers = { ...authHeaders(), ...(options.headers || {}) };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  const text = await response.text();
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const error = JSON.parse(text).error;
      message = `${response.status} ${error.type}: ${error.message}`;
    } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  if (options.lines) return text.split("\n").filter(Boolean).map((line) => JSON.parse(line));
  return text ? JSON.parse(text) : null;
}

async function act(what, call) {
  try {
    const result = await call();
    notice(`${what}: ${JSON.stringify(result)}`, false);
    scheduleRefresh(0);
    return result;
  } catch (error) {
    notice(`${what} refused: ${error.message}`, true);
    return null;
  }
}

// -- pages -----------------------------------------------------------------------------------

// A line chart of the per-minute figures, as SVG built node by node.
const SVG = "http://www.w3.org/2000/svg";
const SERIES = { started: "#2457c5", succeeded: "#1b7f3b", failed: "#b42318", cancelled: "#98a2b3", compensated: "#b54708" };

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  append(node, children);
  return node;
}

function chart(minutes) {
  const width = 640, height = 180, left = 36, bottom = 20, top = 8;
  const max = Math.max(1, ...minutes.flatMap((m) => Object.keys(SERIES).map((k) => m[k])));
  const slots = 60;
  const x = (i) => left + ((width - left - 8) * (i + slots - minutes.length)) / (slots - 1);
  const y = (v) => top + (height - top - bottom) * (1 - v / max);
  const lines = Object.entries(SERIES).map(([kind, color]) =>
    svg("polyline", { points: minutes.map((m, i) => `${x(i)},${y(m[kind])}`).join(" "), fill: "none", stroke: color, "stroke-width": 2, "data-series": kind }));
  const axis = [
    svg("line", { x1: left, y1: y(0), x2: width - 8, y2: y(0), stroke: "#c5cbd6" }),
    svg("text", { x: left - 4, y: y(max) + 4, "text-anchor": "end", "font-size": 11, fill: "#667085" }, max),
    svg("text", { x: left - 4, y: y(0) + 4, "text-anchor": "end", "font-size": 11, fill: "#667085" }, 0),
    svg("text", { x: left, y: height - 4, "font-size": 11, fill: "#667085" }, "60 min ago"),
    svg("text", { x: width - 8, y: height - 4, "text-anchor": "end", "font-size": 11, fill: "#667085" }, "now"),
  ];
  const legend = h("div", { className: "legend" }, Object.entries(SERIES).map(([kind, color]) => {
    const swatch = h("span", { className: "swatch" });
    swatch.style.background = color;
    const last = minutes.length ? minutes[minutes.length - 1][kind] : 0;
    const total = minutes.reduce((sum, m) => sum + m[kind], 0);
    return h("span", { "data-kind": kind }, swatch, ` ${kind}: ${total} in the hour, ${last} this minute`);
  }));
  return [svg("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img", "aria-label": "workflows per minute" }, axis, lines), legend];
}

function overviewPage() {
  const tiles = h("div", { className: "tiles", id: "counts" });
  const dlq = h("tbody");
  const recent = h("tbody");
  const rates = h("div", { id: "rates", className: "panel" });
  const slowest = h("tbody");
  fill(main,
    h("h1", {}, "Overview"),
    tiles,
    h("div", { className: "cols" },
      h("section", {}, h("h2", {}, "Workflows per minute, last hour"), rates),
      h("section", {},
        h("h2", {}, "Slowest steps (since the engine started)"),
        h("table", { id: "slowest" },
          h("thead", {}, h("tr", {}, ["workflow", "step", "runs", "p50", "p95"].map((c) => h("th", {}, c)))),
          slowest))),
    h("div", { className: "cols" },
      h("section", {},
        h("h2", {}, "Latest workflows"),
        h("table", { id: "recent" },
          h("thead", {}, h("tr", {}, h("th", {}, "workflow"), h("th", {}, "name"), h("th", {}, "status"), h("th", {}, "updated"))),
          recent)),
      h("section", {},
        h("h2", {}, "Dead letters per step queue"),
        h("table", { id: "dlq-depth" },
          h("thead", {}, h("tr", {}, h("th", {}, "queue"), h("th", {}, "messages"))),
          dlq))));
  return {
    async refresh() {
      // All read first, then shown at once: the page never shows half an update.
      const [counts, latest, queues, stats] = await Promise.all([
        api("/api/counts"),
        api("/api/workflows?limit=10"),
        api("/api/dlq").catch((error) => error),
        api("/api/stats"),
      ]);
      fill(rates, chart(stats.minutes));
      fill(slowest, stats.steps.slice(0, 10).map((s) => h("tr", { "data-step": `${s.workflow}.${s.step}` },
        h("td", {}, s.workflow), h("td", {}, s.step), h("td", {}, s.runs), h("td", {}, took(s.p50)), h("td", {}, took(s.p95)))));
      if (!stats.steps.length) fill(slowest, h("tr", {}, h("td", { colspan: 5, className: "muted" }, "no step has run yet")));
      fill(tiles, ["total", ...STATUSES].map((status) => {
        const n = status === "total" ? Object.values(counts).reduce((a, b) => a + b, 0) : counts[status] || 0;
        const href = status === "total" ? "/workflows" : `/workflows?status=${status}`;
        return h("a", { className: "tile", href, "data-nav": true, "data-status": status },
          h("span", { className: "n" }, n), h("span", { className: "l" }, status));
      }));
      fill(recent, latest.map((w) => h("tr", {},
        h("td", { className: "mono" }, link(`/workflows/${encodeURIComponent(w.workflow_id)}`, w.workflow_id)),
        h("td", {}, w.name), h("td", {}, statusBadge(w.status)), h("td", {}, age(w.updated_at)))));
      if (queues instanceof Error) {
        fill(dlq, h("tr", {}, h("td", { colspan: 2, className: "error" }, queues.message)));
      } else {
        const full = queues.filter((q) => q.messages);
        fill(dlq, full.map((q) => h("tr", { "data-queue": q.queue },
          h("td", { className: "mono" }, link(`/dlq#${encodeURIComponent(q.queue)}`, q.queue)),
          h("td", { className: "error" }, q.messages))));
        if (!full.length) fill(dlq, h("tr", {}, h("td", { colspan: 2, className: "muted" }, `none in ${queues.length} queues`)));
      }
    },
  };
}

const AGO = [["15m", "15 minutes"], ["1h", "hour"], ["24h", "24 hours"], ["7d", "7 days"]];

// A time in the URL (seconds since the epoch) as a datetime-local input's value, local time.
function localTime(seconds) {
  const at = Number(seconds);
  if (!seconds || !Number.isFinite(at)) return "";
  const date = new Date(at * 1000);
  return new Date(date.getTime() - date.getTimezoneOffset() * 60000).toISOString().slice(0, 19);
}

function workflowsPage() {
  const query = new URLSearchParams(location.search);
  const limit = Math.min(1000, Math.max(1, Number(query.get("limit")) || 50));
  const attrs = [...query.entries()].filter(([k]) => k.startsWith("attr.")).map(([k, v]) => `${k.slice(5)}=${v}`);
  const nameSelect = h("select", { name: "name" }, h("option", { value: "" }, "any"));
  const form = h("form", { className: "filters", id: "filters" },
    h("label", {}, "Status",
      h("select", { name: "status" }, h("option", { value: "" }, "any"),
        [...STATUSES, "queued"].map((s) => h("option", { value: s, selected: query.get("status") === s }, s)))),
    h("label", {}, "Workflow", nameSelect),
    h("label", {}, "Business keys (key=value, comma-separated)",
      h("input", { name: "attr", value: attrs.join(", "), placeholder: "application_id=A-17", size: 30 })),
    h("label", {}, "Created in the last",
      h("select", { name: "ago" }, h("option", { value: "" }, "any time"),
        AGO.map(([value, label]) => h("option", { value, selected: query.get("since") === value }, label)))),
    h("label", {}, "or from", h("input", { type: "datetime-local", name: "from", step: 1, value: localTime(query.get("since")) })),
    h("label", {}, "to", h("input", { type: "datetime-local", name: "to", step: 1, value: localTime(query.get("until")) })),
    h("button", { type: "submit", className: "primary" }, "Filter"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const next = new URLSearchParams();
    for (const key of ["status", "name"]) if (data.get(key)) next.set(key, data.get(key));
    // A time range on created_at: "since" a time ago (15m, a link that stays relative) or
    // from a local date and time (sent as seconds since the epoch), "until" another.
    if (data.get("from")) next.set("since", String(new Date(data.get("from")).getTime() / 1000));
    else if (data.get("ago")) next.set("since", data.get("ago"));
    if (data.get("to")) next.set("until", String(new Date(data.get("to")).getTime() / 1000));
    for (const pair of String(data.get("attr") || "").split(",")) {
      const at = pair.indexOf("=");
      if (at > 0) next.append(`attr.${pair.slice(0, at).trim()}`, pair.slice(at + 1).trim());
    }
    navigate(`/workflows${next.toString() ? "?" + next : ""}`);
  });
  const search = h("form", { className: "filters", id: "search" },
    h("label", {}, "Workflow id", h("input", { name: "id", size: 36, placeholder: "go to a workflow by its id" })),
    h("button", { type: "submit" }, "Open"));
  search.addEventListener("submit", (event) => {
    event.preventDefault();
    const id = new FormData(search).get("id").trim();
    if (id) navigate(`/workflows/${encodeURIComponent(id)}`);
  });
  api("/api/definitions").then((definitions) => {
    for (const d of definitions) nameSelect.append(h("option", { value: d.name, selected: query.get("name") === d.name }, d.name));
  }).catch(() => {});
  const body = h("tbody");
  const shown = h("span", { className: "muted" });
  // Pages by keyset: the next one starts after this one's last (created_at, id).
  let cursor = null;
  const newest = h("button", { type: "button", id: "newest", hidden: !query.get("before"), onclick: () => {
    const next = new URLSearchParams(location.search);
    next.delete("before");
    navigate(`/workflows${next.toString() ? "?" + next : ""}`);
  } }, "← Newest");
  const more = h("button", { type: "button", id: "older", onclick: () => {
    const next = new URLSearchParams(location.search);
    next.set("before", cursor);
    navigate(`/workflows?${next}`);
  } }, "Older →");
  fill(main,
    h("h1", {}, "Workflows"),
    form, search,
    h("table", { id: "workflows" },
      h("thead", {}, h("tr", {}, ["workflow", "name", "status", "created", "updated", "business keys", "error"].map((c) => h("th", {}, c)))),
      body),
    h("div", { className: "pager" }, newest, shown, more));
  const apiQuery = new URLSearchParams(query);
  apiQuery.set("limit", String(limit));
  return {
    async refresh() {
      const found = await api(`/api/workflows?${apiQuery}`);
      fill(body, found.map((w) => h("tr", { "data-id": w.workflow_id },
        h("td", { className: "mono" }, link(`/workflows/${encodeURIComponent(w.workflow_id)}`, w.workflow_id)),
        h("td", {}, w.name),
        h("td", {}, statusBadge(w.status)),
        h("td", {}, when(w.created_at)),
        h("td", {}, age(w.updated_at)),
        h("td", { className: "mono" }, Object.entries(w.attributes || {}).map(([k, v]) => `${k}=${v}`).join(", ")),
        h("td", { className: "error" }, w.error ? `${w.error.type}: ${w.error.message}` : ""))));
      if (!found.length) fill(body, h("tr", {}, h("td", { colspan: 7, className: "muted" }, "no workflow matches")));
      fill(shown, `${found.length} shown, newest first${query.get("before") ? ", older page" : ""}`);
      const last = found[found.length - 1];
      cursor = last ? `${last.created_at},${last.workflow_id}` : null;
      more.hidden = found.length < limit;
    },
  };
}

// What a workflow that has not ended waits for, and until when: a signal, a timer (a
// delayed step or a retry's backoff), a step service to start its step, or a running step
// and its deadline.
function waitingText(state) {
  const parts = [];
  const wait = state.waiting_for;
  const run = state.steps.length ? state.steps[state.steps.length - 1] : null;
  if (wait && wait.children) {
    parts.push(`${wait.children.length === 1 ? "child workflow" : `${wait.children.length} child workflows`} (below)`);
  } else if (wait) {
    const until = wait.timeout_at || wait.until;
    parts.push(`signal '${wait.event}'` + (until ? ` until ${when(until)} (${inTime(until)})` : ", no timeout"));
  } else if (state.scheduled_at && run) {
    const what = run.attempt > 1 ? `backoff: attempt ${run.attempt} of ${run.step}` : `timer: step ${run.step}`;
    parts.push(`${what} at ${when(state.scheduled_at)} (${inTime(state.scheduled_at)})`);
  } else if (state.current_step && run) {
    if (run.status === "running") {
      parts.push(`step ${run.step} (attempt ${run.attempt}) running since ${when(run.started_at)}` +
        (run.deadline_at ? `, deadline ${when(run.deadline_at)} (${inTime(run.deadline_at)})` : ", no deadline"));
    } else {
      parts.push(`a step service to start ${run.step} (attempt ${run.attempt})`);
    }
  }
  if (state.stuck) parts.push(`stuck: ${state.stuck}`);
  return parts.join("; ") || "-";
}

function pausedText(state) {
  const paused = state.paused;
  if (!paused) return "-";
  const parts = [`since ${when(paused.since)}` + (paused.reason ? ` (${paused.reason})` : "")];
  if (Array.isArray(paused.type)) parts.push(`with its type ${paused.type[0]}${paused.type[1] ? ` step ${paused.type[1]}` : ""}`);
  parts.push(`resumes as ${paused.status}`);
  if (paused.timer) parts.push(`its ${paused.timer.kind} timer frozen with ${Number(paused.timer.remaining).toFixed(1)}s left`);
  if (paused.held !== null && paused.held !== undefined) parts.push(`holds run ${paused.held}`);
  return parts.join("; ");
}

// A workflow's latest fan-out: what fanned out, its join and state, and a count of its
// branches by status.
function branchesText(state) {
  const group = state.branches;
  if (!group) return "-";
  const counts = {};
  for (const b of group.branches) counts[b.status] = (counts[b.status] || 0) + 1;
  const tally = Object.entries(counts).map(([status, n]) => `${n} ${status}`).join(", ");
  return `${group.branches.length} from ${group.step}, join ${group.join} (${group.state})` + (tally ? `: ${tally}` : "");
}

function inTime(seconds) {
  const left = seconds - Date.now() / 1000;
  return left >= 0 ? `in ${took(left)}` : `${took(-left)} overdue`;
}

function workflowPage(workflowId) {
  const facts = h("dl", { className: "facts", id: "facts" });
  const steps = h("tbody");
  const history = h("tbody");
  const payloads = h("div", { className: "cols", id: "payloads" });
  const reason = h("input", { name: "reason", placeholder: "reason (optional)" });
  const signalName = h("input", { name: "signal", placeholder: "signal name", size: 18 });
  const pauseReason = h("input", { name: "pause-reason", placeholder: "reason (optional)" });
  const resetStep = h("input", { name: "to-step", placeholder: "step", size: 14 });
  const resetData = h("textarea", { name: "reset-data", placeholder: "input (JSON; empty: its last)" });
  const signalData = h("textarea", { name: "data", placeholder: '{"passed": true}' });
  const path = `/api/workflows/${encodeURIComponent(workflowId)}`;
  const actions = h("div", { className: "actions", id: "actions" },
    h("fieldset", {}, h("legend", {}, "Cancel"), reason, " ",
      h("button", { className: "danger", id: "cancel", onclick: () => {
        if (!confirm(`Cancel workflow ${workflowId}?`)) return;
        act("cancel", () => api(`${path}/cancel`, { method: "POST", body: reason.value ? { reason: reason.value } : {} }));
      } }, "Cancel")),
    h("fieldset", {}, h("legend", {}, "Retry a failed workflow"),
      h("button", { className: "primary", id: "retry", onclick: () => act("retry", () => api(`${path}/retry`, { method: "POST", body: {} })) }, "Retry")),
    h("fieldset", {}, h("legend", {}, "Pause and resume"), pauseReason, " ",
      h("button", { id: "pause", onclick: () => act("pause", () => api(`${path}/pause`, { method: "POST", body: pauseReason.value ? { reason: pauseReason.value } : {} })) }, "Pause"), " ",
      h("button", { className: "primary", id: "resume", onclick: () => act("resume", () => api(`${path}/resume`, { method: "POST", body: {} })) }, "Resume")),
    h("fieldset", {}, h("legend", {}, "Reset to a step"), resetStep, " ", resetData, " ",
      h("button", { id: "reset", onclick: () => {
        const body = { to_step: resetStep.value.trim() };
        try {
          if (resetData.value.trim()) body.data = JSON.parse(resetData.value);
        } catch (error) {
          notice(`the reset's input is not JSON: ${error.message}`, true);
          return;
        }
        if (!confirm(`Reset workflow ${workflowId} to step ${body.to_step}?`)) return;
        act("reset", () => api(`${path}/reset`, { method: "POST", body }));
      } }, "Reset")),
    h("fieldset", {}, h("legend", {}, "Signal"), signalName, " ", signalData, " ",
      h("button", { id: "signal", onclick: () => {
        let data = null;
        try {
          data = signalData.value.trim() ? JSON.parse(signalData.value) : null;
        } catch (error) {
          notice(`the signal's data is not JSON: ${error.message}`, true);
          return;
        }
        act("signal", () => api(`${path}/signal`, { method: "POST", body: { name: signalName.value, data } }));
      } }, "Send")));
  fill(main,
    h("h1", {}, "Workflow ", h("span", { className: "mono" }, workflowId)),
    facts, actions,
    h("h2", {}, "Step runs"),
    h("table", { id: "steps" },
      h("thead", {}, h("tr", {}, ["seq", "step", "attempt", "status", "started", "took", "timeline", "error"].map((c) => h("th", {}, c)))),
      steps),
    h("h2", {}, "Input and output"), payloads,
    h("h2", {}, "History"),
    h("table", { id: "history" },
      h("thead", {}, h("tr", {}, ["at", "event", "detail"].map((c) => h("th", {}, c)))),
      history));
  return {
    ids: [workflowId],
    async refresh() {
      let state;
      try {
        state = await api(path);
      } catch (error) {
        fill(facts, h("dt", {}, "error"), h("dd", { className: "error" }, error.message));
        return;
      }
      const end = ["succeeded", "failed", "cancelled", "compensated"].includes(state.status) ? state.updated_at : Date.now() / 1000;
      const rows = [
        ["name", state.name], ["status", statusBadge(state.status)],
        ["created", when(state.created_at)], ["updated", when(state.updated_at)],
        ["took", took(end - state.created_at)], ["waiting for", waitingText(state)],
        ["paused", pausedText(state)],
        ["parent", state.parent ? link(`/workflows/${encodeURIComponent(state.parent.id)}`, `${state.parent.id} (step ${state.parent.step})`) : "-"],
        ["children", state.children && state.children.length ? h("span", {}, ...state.children.map((c, i) => h("span", {}, i ? ", " : "", link(`/workflows/${encodeURIComponent(c.workflow_id)}`, c.workflow_id), ` ${c.status || "-"}`))) : "-"],
        ["branches", branchesText(state)],
        ["priority", String(state.priority ?? 3)],
        ["business keys", Object.entries(state.attributes || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "-"],
        ["trace_id", state.trace_id || "-"],
      ];
      if (state.error) rows.push(["error", h("span", { className: "error" }, `${state.error.type}: ${state.error.message}` + (state.error.step ? ` (step ${state.error.step})` : ""))]);
      fill(facts, rows.map(([k, v]) => [h("dt", {}, k), h("dd", { "data-fact": k }, v)]));
      const first = state.steps.length ? Math.min(...state.steps.map((s) => s.created_at)) : state.created_at;
      const span = Math.max(1e-3, end - first);
      fill(steps, state.steps.map((s) => {
        const start = s.started_at ?? s.created_at;
        const stop = s.finished_at ?? (s.started_at ? Date.now() / 1000 : start);
        const left = Math.max(0, Math.min(100, ((start - first) / span) * 100));
        const width = Math.max(0.5, Math.min(100 - left, ((stop - start) / span) * 100));
        const bar = h("div", { className: `bar ${s.status}` });
        bar.style.left = `${left}%`;
        bar.style.width = `${width}%`;
        return h("tr", { "data-step": s.step, "data-attempt": s.attempt },
          h("td", {}, s.seq), h("td", {}, s.undoes ? `${s.step} (undoes ${s.undoes.step} #${s.undoes.seq})` : s.step), h("td", {}, s.attempt), h("td", {}, statusBadge(s.status)),
          h("td", {}, when(s.started_at)), h("td", {}, took(s.started_at && s.finished_at ? s.finished_at - s.started_at : null)),
          h("td", { className: "bar-cell" }, h("div", { className: "bar-track", title: `${when(start)} → ${when(stop)}` }, bar)),
          h("td", { className: "error" }, s.error ? [
            `${s.error.type}: ${s.error.message}`,
            s.error.traceback ? h("details", {}, h("summary", {}, "traceback"), h("pre", { className: "mono" }, s.error.traceback)) : null,
          ] : ""));
      }));
      fill(payloads, h("div", {}, payload("input", state.input)), h("div", {}, payload("output", state.output)));
      fill(history, state.history.map((e) => h("tr", {},
        h("td", {}, when(e.at)), h("td", {}, e.kind), h("td", { className: "mono" }, JSON.stringify(e.detail)))));
    },
  };
}

function dlqPage() {
  const queues = h("tbody");
  const letters = h("div", { id: "letters" });
  fill(main,
    h("h1", {}, "Dead letters"),
    h("p", { className: "muted" }, "Step messages the engine gave up on, per step queue. Replay resumes each one's workflow from its failed step; purge deletes them."),
    h("table", { id: "queues" },
      h("thead", {}, h("tr", {}, ["queue", "messages", ""].map((c) => h("th", {}, c)))),
      queues),
    letters);

  function replay(queue, body) {
    return act(`replay ${queue}`, () => api(`/api/dlq/${encodeURIComponent(queue)}/replay`, { method: "POST", body, lines: true }));
  }

  return {
    async refresh() {
      const found = await api("/api/dlq");
      fill(queues, found.map((q) => h("tr", { "data-queue": q.queue },
        h("td", { className: "mono" }, q.queue),
        h("td", { className: q.messages ? "error" : "" }, q.messages),
        h("td", {},
          h("button", { disabled: !q.messages, "data-action": "replay-all", onclick: () => replay(q.queue, { all: true }) }, "Replay all"), " ",
          h("button", { className: "danger", disabled: !q.messages, "data-action": "purge", onclick: () => {
            if (!confirm(`Delete every message in ${q.queue}?`)) return;
            act(`purge ${q.queue}`, () => api(`/api/dlq/${encodeURIComponent(q.queue)}/purge`, { method: "POST", body: {} }));
          } }, "Purge")))));
      const sections = [];
      for (const q of found.filter((q) => q.messages)) {
        const messages = await api(`/api/dlq/${encodeURIComponent(q.queue)}?limit=100`);
        sections.push(h("section", { id: q.queue, "data-letters": q.queue },
          h("h2", { className: "mono" }, q.queue),
          h("table", {},
            h("thead", {}, h("tr", {}, ["message", "workflow", "step", "seq", "attempts", "reason", "error", "age", "bytes", ""].map((c) => h("th", {}, c)))),
            h("tbody", {}, messages.map((m) => h("tr", { "data-message": m.message_id },
              h("td", { className: "mono" }, m.message_id || "-"),
              h("td", { className: "mono" }, m.workflow_id ? link(`/workflows/${encodeURIComponent(m.workflow_id)}`, m.workflow_id) : "-"),
              h("td", {}, m.step || "-"), h("td", {}, m.seq ?? "-"), h("td", {}, m.attempts ?? "-"),
              h("td", {}, m.reason || "-"),
              h("td", { className: "error" }, [m.error_type, m.error].filter(Boolean).join(": ")),
              h("td", { title: m.dead_at ? when(m.dead_at) : "" }, m.dead_at ? age(m.dead_at) : "-"),
              h("td", {}, m.size),
              h("td", {}, m.message_id ? h("button", { "data-action": "replay", onclick: () => replay(q.queue, { id: m.message_id }) }, "Replay") : "")))))));
      }
      fill(letters, sections);
    },
  };
}

function typePauseText(paused) {
  if (!paused.length) return "-";
  return paused.map((p) => `${p.step ? `step ${p.step}` : "the whole type"} since ${when(p.since)}` + (p.reason ? ` (${p.reason})` : "")).join("; ");
}

// A definition's ordered steps as they run, as `hms definitions` shows them: a Parallel group
// in brackets, a compensation beside the step it undoes (not as a step after the last one).
function outline(d) {
  const steps = d.definition && Array.isArray(d.definition.steps) ? d.definition.steps : null;
  if (!steps) return d.steps.join(" > ");
  const parts = [];
  let group = null;
  for (const s of steps) {
    let text = String(s.name) + (s.compensate ? ` (undo ${s.compensate.name})` : "");
    const key = s.parallel ? s.parallel.group : null;
    if (key !== null && key === group) parts[parts.length - 1] = parts[parts.length - 1].slice(0, -1) + ` | ${text}]`;
    else parts.push(key !== null ? `[${text}]` : text);
    group = key;
  }
  return parts.join(" > ");
}

function typesPage() {
  const body = h("tbody");
  const rows = new Map(); // type -> its paused cell: the controls are built once, kept across refreshes
  fill(main,
    h("h1", {}, "Workflow types"),
    h("p", { className: "muted" }, "Pause a workflow type, or one step of it: its new starts, cron ticks and the next steps of its workflows are held, each workflow paused, until it is resumed, which releases them by priority, then oldest first. Steps already out run on."),
    h("table", { id: "types" },
      h("thead", {}, h("tr", {}, ["type", "version", "steps", "paused", ""].map((c) => h("th", {}, c)))),
      body));

  function row(d) {
    const step = h("select", { name: "type-step" }, h("option", { value: "" }, "the whole type"), d.steps.map((s) => h("option", { value: s }, `step ${s}`)));
    const reason = h("input", { name: "type-reason", placeholder: "reason (optional)", size: 16 });
    const target = `/api/definitions/${encodeURIComponent(d.name)}`;
    const chosen = () => (step.value ? { step: step.value } : {});
    const paused = h("td", { "data-paused": "" });
    body.append(h("tr", { "data-type": d.name },
      h("td", { className: "mono" }, d.name),
      h("td", { "data-version": "" }, d.version),
      h("td", { "data-steps": "" }, outline(d)),
      paused,
      h("td", {}, step, " ", reason, " ",
        h("button", { "data-action": "pause-type", onclick: () => act(`pause ${d.name}`, () => api(`${target}/pause`, { method: "POST", body: { ...chosen(), ...(reason.value ? { reason: reason.value } : {}) } })) }, "Pause"), " ",
        h("button", { className: "primary", "data-action": "resume-type", onclick: () => act(`resume ${d.name}`, () => api(`${target}/resume`, { method: "POST", body: chosen() })) }, "Resume"))));
    return paused;
  }

  return {
    async refresh() {
      for (const d of await api("/api/definitions")) {
        if (!rows.has(d.name)) rows.set(d.name, row(d));
        fill(rows.get(d.name), typePauseText(d.paused));
      }
    },
  };
}

// -- routing and live updates ----------------------------------------------------------------

function route() {
  const path = location.pathname;
  for (const a of document.querySelectorAll("header nav a")) {
    const href = a.getAttribute("href");
    a.classList.toggle("active", href === "/" ? path === "/" : path.startsWith(href));
  }
  if (path === "/") return overviewPage();
  if (path === "/workflows") return workflowsPage();
  if (path.startsWith("/workflows/")) return workflowPage(decodeURIComponent(path.slice("/workflows/".length)));
  if (path === "/dlq") return dlqPage();
  if (path === "/types") return typesPage();
  fill(main, h("h1", {}, "Not found"), h("p", {}, link("/", "Overview")));
  return null;
}

async function show() {
  notice("", false);
  current = route();
  await refresh();
}

async function refresh() {
  if (!current) return;
  try {
    await current.refresh();
    document.body.dataset.loaded = String(Date.now());
  } catch (error) {
    notice(`cannot read the engine's API: ${error.message}`, true);
  }
}

function scheduleRefresh(delay) {
  if (refreshTimer !== null) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    refresh();
  }, delay);
}

function navigate(href) {
  history.pushState(null, "", href);
  show();
}

document.addEventListener("click", (event) => {
  const a = event.target.closest("a[data-nav]");
  if (!a || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
  const url = new URL(a.href);
  if (url.origin !== location.origin) return;
  event.preventDefault();
  if (url.pathname === "/dlq" && url.hash && location.pathname === "/dlq") return;
  navigate(url.pathname + url.search + url.hash);
});
window.addEventListener("popstate", show);

// The event stream, read with fetch so that it can carry the Authorization header
// (EventSource cannot send one).
async function listen() {
  const live = document.getElementById("live");
  for (;;) {
    try {
      const response = await fetch("/api/events", { headers: authHeaders(), cache: "no-store" });
      if (!response.ok) throw new Error(String(response.status));
      live.textContent = "live";
      live.className = "live on";
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffered = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffered += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffered.indexOf("\n\n")) >= 0) {
          const message = buffered.slice(0, end);
          buffered = buffered.slice(end + 2);
          if (message.split("\n").includes("event: changed")) scheduleRefresh(100);
        }
      }
    } catch (_) { /* reconnect below */ }
    live.textContent = "offline";
    live.className = "live off";
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

const tokenInput = document.getElementById("token");
tokenInput.value = sessionStorage.getItem(TOKEN_KEY) || "";
document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (tokenInput.value) sessionStorage.setItem(TOKEN_KEY, tokenInput.value);
  else sessionStorage.removeItem(TOKEN_KEY);
  notice(tokenInput.value ? "token kept for this tab (sessionStorage)" : "token forgotten", false);
  refresh();
});

show();
listen();
