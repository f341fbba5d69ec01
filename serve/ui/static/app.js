// lorafleet /ui: polls the app's JSON endpoints (no other source) and draws them with Chart.js.
// Time series are differences between polls of the cumulative counts in GET /v1/experiments.
"use strict";

const ADMIN = document.body.dataset.admin === "true";
const PARAMS = new URLSearchParams(location.search);
const EVERY_MS = Math.max(0.5, Number(PARAMS.get("every_s")) || 2) * 1000;
const MAX_POINTS = 90; // points per time-series chart
const COLORS = ["#2f5bea", "#e8590c", "#0ca678", "#ae3ec9", "#f59f00", "#1098ad", "#e03131"];
const state = {
  history: [], // [{t, exps: {experiment: {variant: cumulative counts}}}], the last hour
  bounds: [], // latency bucket upper bounds (s), from /v1/experiments
  charts: {}, // id -> Chart
  cards: {}, // id -> card element
  polls: 0,
};

// --- small helpers -------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== undefined && c !== null) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

const pct = (x, digits = 1) => (x === null || x === undefined || isNaN(x) ? "—" : `${(100 * x).toFixed(digits)}%`);
const num = (x, digits = 3) => (x === null || x === undefined || isNaN(x) ? "—" : Number(x.toFixed(digits)).toString());
const ms = (s) => (s === null || s === undefined ? "—" : `${(s * 1000).toFixed(s < 0.1 ? 1 : 0)} ms`);
const color = (i) => COLORS[i % COLORS.length];

function table(headers, rows, attrs) {
  return el("div", { class: "scroll" }, el("table", attrs || {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { text: h })))),
    el("tbody", {}, rows)));
}

function say(text, error = false) {
  const box = document.getElementById("message");
  box.textContent = text;
  box.className = error ? "error" : "";
  box.hidden = !text;
}

async function api(method, path, body) {
  // credentials: the browser's Basic credentials for this origin; the header marks the page's own
  // requests (the server refuses a changing Basic request without it: another site's form)
  const headers = { "X-Lorafleet-UI": "1" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(new URL(path, location.origin), {
    method, headers, credentials: "same-origin", cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const err = new Error(`${method} ${path}: ${r.status} ${(data.error && data.error.message) || r.statusText}`);
    err.status = r.status;
    throw err;
  }
  return data;
}

async function act(question, method, path, body, done) {
  if (!ADMIN || !window.confirm(question)) return;
  try {
    const result = await api(method, path, body);
    say(done(result));
  } catch (e) {
    say(e.message, true);
  }
  poll(false);
}

function card(section, id, build) {
  if (!state.cards[id]) {
    state.cards[id] = build();
    document.querySelector(`#${section} .cards`).append(state.cards[id]);
  }
  return state.cards[id];
}

// where a release stands: scored offline (release.eval), its shadow step, or a ramp step
function where(r, steps) {
  if (r.state === "evaluating") return "eval: scoring both versions";
  if (r.phase === "shadow" && (r.state === "running" || r.state === "paused")) return `shadow: ${r.spec.shadow.percent}% of the control's requests mirrored`;
  return `step ${r.step + 1}/${steps.length}`;
}

function lineChart(canvas, title, yTitle, datasets, stepped = false) {
  if (typeof Chart === "undefined") return null; // chart.umd.min.js missing: `make setup`
  return new Chart(canvas, {
    type: "line",
    data: { labels: [], datasets },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false, spanGaps: true,
      plugins: { title: { display: true, text: title }, legend: { labels: { boxWidth: 10 } } },
      scales: { x: { ticks: { maxTicksLimit: 4, maxRotation: 0 } }, y: { beginAtZero: true, title: { display: !!yTitle, text: yTitle } } },
      elements: { line: { stepped, borderWidth: 2 }, point: { radius: stepped ? 3 : 0 } },
    },
  });
}

// --- experiments -----------------------------------------------------------------------------

function windowDeltas(name) {
  // {variant: requests} between the oldest sample in the window and now; null before 2 samples
  const h = state.history;
  const now = h[h.length - 1];
  const minutes = Number(document.getElementById("window").value);
  const old = h.find((s) => s.t >= now.t - minutes * 60e3 && s.exps[name]);
  if (!old || old === now) return null;
  const out = {};
  for (const [v, c] of Object.entries(now.exps[name])) {
    out[v] = (c.requests || 0) - ((old.exps[name][v] || {}).requests || 0);
  }
  return out;
}

function quantile(buckets, q) {
  const keys = Object.keys(buckets).filter((k) => buckets[k] > 0).sort();
  const n = keys.reduce((a, k) => a + buckets[k], 0);
  let seen = 0;
  for (const k of keys) {
    seen += buckets[k];
    if (seen >= q * n) return state.bounds[Number(k.slice(4))] ?? null;
  }
  return null;
}

function rates(prev, cur, dt) {
  // one variant's per-second rates and window latency quantiles between two polls
  const d = (k) => ((cur[k] || 0) - ((prev || {})[k] || 0));
  const delta = {};
  for (const [k, n] of Object.entries(cur.latency_buckets || {})) {
    delta[k] = n - (((prev || {}).latency_buckets || {})[k] || 0);
  }
  const reqs = d("requests");
  return {
    requests: reqs / dt, errors: d("errors") / dt,
    tokens: (d("prompt_tokens") + d("completion_tokens")) / dt,
    p50: reqs > 0 ? quantile(delta, 0.5) : null, p99: reqs > 0 ? quantile(delta, 0.99) : null,
  };
}

function buildExperiment(name, exp) {
  const variants = Object.keys(exp.variants);
  const id = `exp-${name}`;
  const canvases = ["requests", "errors", "latency", "tokens"].map((k) => el("canvas", { "data-chart": k }));
  const node = el("article", { class: "card experiment", id, "data-experiment": name },
    el("h3", {}, name, el("span", { class: "muted", text: `control: ${exp.control}` })),
    el("div", { class: "tables" }, el("div", { class: "split" }), el("div", { class: "outcomes" })),
    el("div", { class: "charts" }, canvases.map((c) => el("div", { class: "chart" }, c))));
  const per = (key, label, dash) => variants.map((v, i) => ({ label: label ? `${v} ${label}` : v, data: [], borderColor: color(i), backgroundColor: color(i), borderDash: dash ? [4, 3] : [], _v: v, _k: key }));
  state.charts[`${id}-requests`] = lineChart(canvases[0], "requests / s", "", per("requests"));
  state.charts[`${id}-errors`] = lineChart(canvases[1], "errors / s", "", per("errors"));
  state.charts[`${id}-latency`] = lineChart(canvases[2], "latency p50 / p99 (ms, bucket bound)", "", [...per("p50", "p50"), ...per("p99", "p99", true)]);
  state.charts[`${id}-tokens`] = lineChart(canvases[3], "tokens / s (prompt + completion)", "", per("tokens"));
  if (ADMIN) {
    const inputs = variants.map((v) => el("label", {}, `${v} `, el("input", { type: "number", min: "0", step: "any", value: exp.variants[v].weight, "data-variant": v, "aria-label": `weight of ${v}` })));
    const button = el("button", { class: "reweight", "data-experiment": name, text: "Re-weight", onclick: () => reweight(name, node) });
    node.append(el("div", { class: "actions" }, el("span", { class: "muted", text: "weights:" }), inputs, button));
  }
  return node;
}

function reweight(name, node) {
  const weights = {};
  for (const input of node.querySelectorAll(".actions input")) weights[input.dataset.variant] = Number(input.value);
  const text = Object.entries(weights).map(([v, w]) => `${v}=${w}`).join(", ");
  act(`Re-weight experiment "${name}" to ${text}?\nNew users are split by these weights at once; only as many users as the change needs move.`,
    "PUT", `/v1/experiments/${encodeURIComponent(name)}`, { weights },
    (r) => `re-weighted ${name}: shares ${Object.entries(r.shares).map(([v, s]) => `${v} ${pct(s)}`).join(", ")}; ${pct(r.moved_users)} of users moved`);
}

function renderExperiment(name, exp, prevCounts, dt) {
  const node = card("experiments", `exp-${name}`, () => buildExperiment(name, exp));
  const variants = Object.keys(exp.variants);
  const win = windowDeltas(name);
  const winTotal = win ? Object.values(win).reduce((a, b) => a + b, 0) : 0;
  const minutes = document.getElementById("window").value;
  const rows = variants.map((v, i) => {
    const s = exp.variants[v];
    const observed = win && winTotal ? win[v] / winTotal : null;
    return el("tr", { "data-variant": v },
      el("td", {}, el("b", { text: v })), el("td", { text: num(s.weight, 2) }),
      el("td", { class: "weight-share", "data-share": s.share, text: pct(s.share) }),
      el("td", { class: "observed-share", "data-share": observed ?? "", "data-requests": win ? win[v] : "", text: observed === null ? (win ? "no requests" : "—") : `${pct(observed)} (${win[v]})` }),
      el("td", {}, el("div", { class: "bar", title: `by weight ${pct(s.share)}` }, el("span", { style: `width:${100 * s.share}%;background:${color(i)}` }))),
      el("td", { text: s.requests || 0 }), el("td", { text: s.errors || 0 }),
      el("td", { text: s.requests ? ms(s.latency_s_sum / s.requests) : "—" }),
      el("td", { text: `${ms(s.p50_s)} / ${ms(s.p99_s)}` }), el("td", { class: "muted", text: s.target || "" }));
  });
  node.querySelector(".split").replaceChildren(table(
    ["variant", "weight", "share by weight", `got, last ${minutes} min (n)`, "", "requests", "errors", "mean latency", "p50 / p99 (all)", "target"],
    rows, { class: "shares" }));
  node.querySelector(".outcomes").replaceChildren(outcomeTable(exp, variants));
  if (prevCounts && dt > 0) {
    const label = new Date().toLocaleTimeString([], { hour12: false });
    for (const key of ["requests", "errors", "latency", "tokens"]) {
      const chart = state.charts[`exp-${name}-${key}`];
      if (!chart) continue;
      chart.data.labels.push(label);
      for (const ds of chart.data.datasets) {
        const r = rates(prevCounts[ds._v], exp.variants[ds._v], dt);
        const y = ds._k === "p50" || ds._k === "p99" ? (r[ds._k] === null ? null : r[ds._k] * 1000) : r[ds._k];
        ds.data.push(y);
        if (ds.data.length > MAX_POINTS) ds.data.shift();
      }
      if (chart.data.labels.length > MAX_POINTS) chart.data.labels.shift();
      chart.update();
    }
  }
}

function outcomeTable(exp, variants) {
  const rows = variants.map((v) => {
    const o = exp.variants[v].outcome || {};
    // the server's 95% interval of the mean: Wilson for 0/1 rewards, Student's t for others
    const ci = o.interval_95;
    const c = o.vs_control;
    let vs = "control";
    if (c) {
      // the always-valid interval and p-value (valid however often this page reloads); a winner
      // only when that test says so
      const a = c.always_valid;
      vs = !a || a.p_value === null || a.p_value === undefined ? "too few outcomes"
        : `${a.difference >= 0 ? "+" : ""}${num(a.difference)} [${num(a.low)}, ${num(a.high)}], p=${num(a.p_value, 4)} (${a.method})${c.winner ? `; winner: ${c.winner === "variant" ? v : c.control}` : ""}`;
    }
    const enough = c ? c.enough_samples : o.enough_samples;
    return el("tr", { "data-variant": v },
      el("td", {}, el("b", { text: v })), el("td", { class: "feedback-count", text: o.count || 0 }),
      el("td", { text: o.mean === null || o.mean === undefined ? "—" : num(o.mean) }),
      el("td", { class: "interval", "data-method": ci ? ci.method : "", text: ci ? `[${num(ci.low)}, ${num(ci.high)}] (${ci.method})` : o.count ? "needs 2 rewards" : "—" }),
      el("td", { text: vs }),
      el("td", { class: enough ? "pass" : "hold", text: `${enough ? "yes" : "no"} (min ${o.min_samples ?? "—"})` }));
  });
  return table(["variant", "feedback", "mean reward", "95% CI", "vs control (diff, always-valid 95% interval, p)", "min sample reached"], rows, { class: "outcome-table" });
}

// --- releases --------------------------------------------------------------------------------

const GATE_ROWS = [
  ["requests (candidate)", (n) => n.candidate_requests, (g) => `≥ ${g.min_requests}`, (v, g) => v >= g.min_requests],
  ["error rate (candidate)", (n) => n.candidate_error_rate, (g) => `≤ ${g.max_error_rate}`, (v, g) => v <= g.max_error_rate],
  ["p99 ratio (candidate / control)", (n) => (n.candidate_p99_s && n.control_p99_s ? n.candidate_p99_s / n.control_p99_s : null), (g) => `≤ ${g.max_p99_ratio}`, (v, g) => v <= g.max_p99_ratio],
  ["reward difference, lower bound (always-valid)", (n) => n.difference_low ?? null, (g) => (g.outcome === false ? "off" : `> −${g.max_reward_drop} (min ${g.min_feedback} each)`), (v, g) => g.outcome === false || v > -g.max_reward_drop],
];

function buildRelease(adapter) {
  const canvas = el("canvas", {});
  const node = el("article", { class: "card release", "data-adapter": adapter },
    el("h3", {}), el("div", { class: "ramp" }, canvas), el("div", { class: "gates" }),
    el("details", { open: true }, el("summary", { text: "decisions" }), el("div", { class: "log" })),
    el("div", { class: "actions" }));
  state.charts[`rel-${adapter}`] = lineChart(canvas, "ramp: candidate share per step (%)", "", [
    { label: "planned", data: [], borderColor: "#98a2b3", backgroundColor: "#98a2b3", borderDash: [4, 3] },
    { label: "reached", data: [], borderColor: COLORS[0], backgroundColor: COLORS[0] }], true);
  return node;
}

function renderRelease(r) {
  const node = card("releases", `rel-${r.adapter}`, () => buildRelease(r.adapter));
  const steps = r.spec.steps;
  const done = r.state === "promoted";
  node.dataset.state = r.state;
  node.dataset.candidate = r.candidate;
  node.dataset.step = r.step;
  node.querySelector("h3").replaceChildren(r.adapter,
    el("span", { class: `state state-${r.state}`, text: r.state.replace("_", " ") }),
    el("span", { class: "step muted", text: `${where(r, steps)}${r.percent !== null ? ` · candidate ${num(r.percent, 1)}%` : ""}` }),
    el("span", { class: "muted", text: `${r.control} → ${r.candidate}` }));
  const chart = state.charts[`rel-${r.adapter}`];
  if (chart) {
    // a point at the start of each step, and one at the end: the line steps up at each start
    const before = r.state === "evaluating" || (r.phase === "shadow" && r.state !== "rolled_back");
    const reachedUpTo = done ? steps.length : before ? 0 : r.state === "running" || r.state === "paused" ? r.step + 1 : r.step;
    const planned = [...steps.map((s) => s.percent), steps[steps.length - 1].percent];
    chart.data.labels = [...steps.map((s, i) => `step ${i + 1}: ${s.percent}% (${s.hold_s}s)`), "end"];
    chart.data.datasets[0].data = planned;
    chart.data.datasets[1].data = planned.map((p, i) => (i < reachedUpTo || (i === reachedUpTo && i > 0) ? (i === reachedUpTo ? planned[i - 1] : p) : null));
    chart.update();
  }
  const last = [...r.log].reverse().find((e) => e.numbers) || {};
  const n = last.numbers || {};
  const g = r.spec.gates;
  const gateRows = GATE_ROWS.map(([label, value, limit, ok]) => {
    const v = value(n);
    const status = v === null || v === undefined ? "" : ok(v, g) ? "pass" : "fail";
    return el("tr", {}, el("td", { text: label }), el("td", { text: v === null || v === undefined ? "—" : num(v, 4) }),
      el("td", { text: limit(g) }), el("td", { class: status, text: status }));
  });
  const totals = ["control", "candidate"].map((a) => `${a}: ${(r.total[a] || {}).requests || 0} req, ${(r.total[a] || {}).errors || 0} err`).join(" · ");
  node.querySelector(".gates").replaceChildren(
    el("p", { class: "muted note", text: `gates at the last decision (${last.decision || "none yet"}); totals ${totals}` }),
    table(["gate", "value", "threshold", ""], gateRows));
  node.querySelector(".log").replaceChildren(table(["at", "step", "share", "decision", "numbers"],
    [...r.log].reverse().map((e) => el("tr", { class: "decision" },
      el("td", { text: e.at.replace("T", " ").replace("+00:00", "Z") }), el("td", { text: e.phase || e.step + 1 }),
      el("td", { text: e.phase === "shadow" ? `${e.mirrored}% mirrored` : `${e.percent}%` }), el("td", { class: "decision-name", text: e.decision }),
      el("td", { class: "muted", text: Object.entries(e.numbers || {}).map(([k, v]) => `${k}=${typeof v === "number" ? num(v, 4) : v}`).join(" ") }))),
    { class: "release-log" }));
  const actions = node.querySelector(".actions");
  actions.replaceChildren();
  const path = (what) => `/v1/releases/${encodeURIComponent(r.adapter)}/${what}`;
  if (ADMIN && r.state === "running") {
    actions.append(el("button", {
      class: "quiet pause", "data-adapter": r.adapter, text: "Pause",
      onclick: () => act(`Pause the release of ${r.adapter} at step ${r.step + 1} (${num(r.percent, 1)}% on ${r.candidate})?\nUsers keep their version; it neither advances nor rolls back until resumed.`,
        "POST", path("pause"), undefined, (x) => `paused the release of ${x.adapter} at step ${x.step + 1}`),
    }));
  }
  if (ADMIN && r.state === "paused") {
    actions.append(el("button", {
      class: "quiet resume", "data-adapter": r.adapter, text: "Resume",
      onclick: () => act(`Resume the release of ${r.adapter}? Step ${r.step + 1} starts again on fresh counts: its gates judge the traffic from now on.`,
        "POST", path("resume"), undefined, (x) => `resumed the release of ${x.adapter} at step ${x.step + 1}`),
    }));
  }
  if (ADMIN && ["running", "paused", "evaluating"].includes(r.state)) {
    actions.append(el("button", {
      class: "danger abort", "data-adapter": r.adapter, text: "Abort release",
      onclick: () => act(`Abort the release of ${r.adapter}? Its candidate ${r.candidate} gets no more traffic; current stays ${r.control}.`,
        "POST", path("abort"), undefined, (x) => `aborted the release of ${x.adapter}: ${x.state}`),
    }));
  }
}

// --- adapters --------------------------------------------------------------------------------

function adapterCard(name) {
  return el("article", { class: "card adapter", "data-adapter": name }, el("h3", {}, name), el("div", { class: "body" }));
}

function loadedOn(a) {
  // the vLLM replicas holding a version of this adapter (GET /v1/adapters/{name} loaded_on)
  const on = a.loaded_on;
  if (on === null || on === undefined) {
    return el("p", { class: "loaded-on muted", "data-known": "false", text: "loaded on: unknown (Serve's controller did not answer)" });
  }
  if (!on.length) {
    return el("p", { class: "loaded-on muted", "data-known": "true", text: "loaded on no replica (its next request loads it)" });
  }
  return el("p", { class: "loaded-on", "data-known": "true" }, `loaded on ${on.length} replica${on.length === 1 ? "" : "s"}:`,
    on.map((r) => el("span", {
      class: "replica", "data-replica": r.replica, "data-model": r.model, "data-versions": r.versions.join(" "),
      title: `${r.model} replica ${r.replica}: ${r.versions.join(", ")}`, text: `${r.model} ${r.replica}`,
    })));
}

function renderAdapter(name, a, error) {
  const node = card("adapters", `ad-${name}`, () => adapterCard(name));
  if (error) {
    node.querySelector("h3").replaceChildren(name);
    node.querySelector(".body").replaceChildren(el("p", { class: "muted", text: error }));
    return;
  }
  node.dataset.current = a.current;
  node.querySelector("h3").replaceChildren(name, el("span", { class: "muted", text: `current ${a.current}` }));
  const rows = [...a.versions].reverse().map((v) => {
    const metrics = Object.entries(v.metrics || {}).map(([k, x]) => `${k}=${typeof x === "number" ? num(x, 4) : x}`).join(" ");
    const isCurrent = v.version === a.current;
    const on = (a.loaded_on || []).filter((r) => r.versions.includes(v.version)).map((r) => r.replica);
    return el("tr", { "data-version": v.version, class: isCurrent ? "current" : "" },
      el("td", {}, isCurrent ? el("b", { text: v.version }) : v.version),
      el("td", { text: isCurrent ? "current" : "" }),
      el("td", { class: "muted", text: (v.published_at || "").replace("T", " ") }),
      el("td", { text: (v.source && v.source.kind) || "—" }), el("td", { text: v.step ?? "—" }),
      el("td", { text: num(v.eval_loss, 4) }), el("td", { class: "muted", text: metrics }),
      el("td", { class: "replicas", "data-replicas": on.join(" "), text: on.length ? on.join(", ") : "—" }),
      el("td", {}, ADMIN && !isCurrent ? el("button", {
        class: "quiet promote", "data-adapter": name, "data-version": v.version, text: "Promote",
        onclick: () => act(`Promote ${name} to version ${v.version}? It becomes current for every request at once.`,
          "POST", `/v1/adapters/${encodeURIComponent(name)}/promote`, { version: v.version }, (x) => `${name}: current is now ${x.version}`),
      }) : ""));
  });
  const body = [loadedOn(a), table(["version", "", "published", "source", "step", "eval_loss", "metrics", "loaded on", ""], rows)];
  if (ADMIN && (a.history || []).length) {
    body.push(el("div", { class: "actions" }, el("button", {
      class: "danger rollback", "data-adapter": name, text: `Roll back to ${a.history[0]}`,
      onclick: () => act(`Roll ${name} back from ${a.current} to ${a.history[0]}?`,
        "POST", `/v1/adapters/${encodeURIComponent(name)}/rollback`, undefined, (x) => `${name}: rolled back, current is ${x.version}`),
    })));
  }
  node.querySelector(".body").replaceChildren(...body);
}

// --- the loop ----------------------------------------------------------------------------------

async function poll(again = true) {
  try {
    const [exps, releases, models] = await Promise.all([
      api("GET", "/v1/experiments"),
      api("GET", "/v1/releases").catch((e) => (e.status === 404 ? { releases: [], none: e.message } : Promise.reject(e))),
      api("GET", "/v1/models"),
    ]);
    const t = Date.now();
    const prev = state.history[state.history.length - 1];
    state.bounds = exps.latency_bounds_s || [];
    const snapshot = {};
    for (const [name, e] of Object.entries(exps.experiments)) snapshot[name] = e.variants;
    state.history.push({ t, exps: snapshot });
    while (state.history.length > 2 && state.history[0].t < t - 61 * 60e3) state.history.shift();
    const dt = prev ? (t - prev.t) / 1000 : 0;
    for (const [name, e] of Object.entries(exps.experiments)) renderExperiment(name, e, prev && prev.exps[name], dt);
    for (const r of releases.releases) renderRelease(r);
    const none = document.getElementById("no-releases");
    none.hidden = releases.releases.length > 0;
    none.textContent = releases.none || "No releases yet: `lorafleet release SERVE.yaml` starts one.";
    const names = new Set(models.data.filter((m) => m.parent).map((m) => m.root));
    for (const r of releases.releases) names.add(r.adapter);
    for (const n of [...names].sort()) card("adapters", `ad-${n}`, () => adapterCard(n)); // in name order
    await Promise.all([...names].sort().map((n) => api("GET", `/v1/adapters/${encodeURIComponent(n)}`)
      .then((a) => renderAdapter(n, a)).catch((e) => renderAdapter(n, null, e.message))));
    state.polls += 1;
    document.body.dataset.polls = state.polls;
    document.getElementById("updated").textContent = `updated ${new Date(t).toLocaleTimeString([], { hour12: false })} · every ${EVERY_MS / 1000} s`;
  } catch (e) {
    document.getElementById("updated").textContent = `refresh failed: ${e.message}`;
    if (e.status === 401) say("The key was refused: reopen the page with a valid key.", true);
  } finally {
    if (again) setTimeout(poll, EVERY_MS);
  }
}

if (!ADMIN) document.getElementById("role").title = "an inference key: the page is read-only (the server refuses changes with 403)";
poll();
