// The TAL viewer: a video with the served model's detections under it (docs/viewer.md).
// Plain JavaScript, no build step, no library; it talks only to the server that serves it.
"use strict";

const MIN_OPACITY = 0.15; // a bar scoring 0 must still be visible
const LABEL_W = 140; // px, the lane labels' column
const AXIS_H = 22; // px, the time axis above the lanes
const LANE_H = 30; // px per class lane: ground truth on top, detections under it
const SVG_NS = "http://www.w3.org/2000/svg";
const COLOURS = ["#1f6feb", "#d97706", "#059669", "#9333ea", "#dc2626", "#0891b2", "#65a30d", "#db2777", "#4f46e5", "#b45309"];

const $ = (id) => document.getElementById(id);
const video = $("video");
const state = {
  labels: [], // the model's classes, in its order (lanes follow it)
  current: null, // {id, name}: the video on the page; its id (file stem) matches result and ground-truth entries
  detections: [], // [{label, score, segment: [s, e]}]
  truth: [], // [{label, segment: [s, e]}]
  duration: 0, // seconds, from the API's answer (the player's own once it knows)
  results: null, // the last results JSON opened: {video_id: [...]}
  database: null, // the last ground-truth JSON opened: {video_id: {annotations: [...]}}
  request: 0, // the detection request in flight: an older answer is dropped
};

// --- errors, in words ------------------------------------------------------------------------------

class ApiError extends Error {}

// errors pile up (the last 5) until the next action clears them: an API error and the player's own can come together
function showError(text) {
  const box = $("error");
  const line = document.createElement("div");
  line.className = "error-line";
  line.textContent = text;
  box.append(line);
  while (box.childElementCount > 5) box.firstElementChild.remove();
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setStatus(text, busy = false) {
  $("status").textContent = text;
  $("status").classList.toggle("busy", busy);
}

// fetch + the API's JSON errors ({"error": code, "message": ...}) as "STATUS code: message"
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new ApiError(`network error: ${path}: ${e.message} (is the server still running?)`);
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch (e) {
    body = null;
  }
  if (!response.ok) {
    if (body && typeof body === "object" && body.error) {
      throw new ApiError(`${response.status} ${body.error}: ${body.message ?? ""}`);
    }
    throw new ApiError(`${response.status} ${response.statusText || "error"}: ${text.slice(0, 300) || "no details"}`);
  }
  if (body === null) throw new ApiError(`${path}: the server's answer is not JSON`);
  return body;
}

// --- the model card --------------------------------------------------------------------------------

async function loadModel() {
  const box = $("model-info");
  try {
    const m = await api("/v1/model");
    state.labels = m.labels || [];
    box.replaceChildren();
    const name = m.name ? `${m.name}` : m.reference;
    const parts = [
      ["model", name],
      ["version", m.version !== undefined ? `${m.version}${m.alias ? ` (@${m.alias})` : ""}` : m.pinned],
      ["arch", m.arch],
      [`${state.labels.length} labels`, null],
    ];
    for (const [key, value] of parts) {
      const b = document.createElement("b");
      b.textContent = key;
      box.append(b, value === null ? " " : `: ${value}  `);
    }
    const labels = document.createElement("span");
    labels.className = "labels";
    labels.id = "model-labels";
    labels.textContent = state.labels.join(", ");
    labels.title = state.labels.join(", ");
    box.append(labels);
    box.dataset.labels = String(state.labels.length);
  } catch (e) {
    box.textContent = "model card unavailable";
    showError(`GET /v1/model: ${e.message}`);
  }
}

// --- video sources -----------------------------------------------------------------------------------

const stem = (name) => name.split(/[\\/]/).pop().replace(/\.[^.]*$/, "");

function setVideo(src, name) {
  state.current = { id: stem(name), name };
  state.detections = [];
  state.duration = 0;
  video.src = src;
  video.dataset.videoId = state.current.id;
  render();
  // a results or ground-truth file opened earlier applies to this video too, if it names it
  if (state.results) applyResults(state.current.id, false);
  if (state.database) applyTruth(state.current.id, false);
}

async function detect(body, headers, what) {
  const request = ++state.request;
  clearError();
  setStatus(`detecting ${what}…`, true);
  $("stage").dataset.state = "detecting";
  try {
    const answer = await api("/v1/detect/video", { method: "POST", body, headers });
    if (request !== state.request) return;
    state.detections = answer.detections;
    state.duration = answer.duration;
    const t = answer.timing || {};
    setStatus(`${answer.detections.length} detections in ${what} (${fmt(answer.duration)} s of video, ${fmt(t.total_s ?? 0)} s on the server)`);
    $("stage").dataset.state = "done";
    render();
  } catch (e) {
    if (request !== state.request) return;
    setStatus(`detection failed for ${what}`);
    $("stage").dataset.state = "error";
    showError(`POST /v1/detect/video: ${e.message}`);
  }
}

$("video-file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (!file) return;
  for (const b of document.querySelectorAll("#video-list button")) b.removeAttribute("aria-current");
  setVideo(URL.createObjectURL(file), file.name);
  const form = new FormData();
  form.append("video", file, file.name);
  detect(form, {}, file.name);
});

async function loadVideoList() {
  const list = $("video-list");
  const note = $("video-list-note");
  try {
    const answer = await api("/v1/videos?limit=200");
    list.replaceChildren();
    for (const v of answer.videos) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.uri = v.uri;
      button.title = v.uri;
      const size = document.createElement("span");
      size.className = "size";
      size.textContent = `${(v.size / 2 ** 20).toFixed(1)} MB`;
      button.append(v.name, size);
      button.addEventListener("click", () => {
        for (const b of list.querySelectorAll("button")) b.removeAttribute("aria-current");
        button.setAttribute("aria-current", "true");
        setVideo(`/v1/videos/content?uri=${encodeURIComponent(v.uri)}`, v.name);
        detect(JSON.stringify({ uri: v.uri }), { "Content-Type": "application/json" }, v.name);
      });
      item.append(button);
      list.append(item);
    }
    if (answer.message) note.textContent = answer.message;
    else if (!answer.videos.length) note.textContent = "no videos under the server's roots";
    else note.textContent = `${answer.videos.length}${answer.truncated ? "+ (list truncated)" : ""} under ${answer.roots.join(", ")}`;
  } catch (e) {
    note.textContent = "the server's videos cannot be listed";
    showError(`GET /v1/videos: ${e.message}`);
  }
}

// --- results and ground-truth files ----------------------------------------------------------------

async function readJson(input) {
  const file = input.files[0];
  input.value = ""; // the same file may be opened again
  if (!file) return null;
  try {
    return { name: file.name, data: JSON.parse(await file.text()) };
  } catch (e) {
    showError(`${file.name}: not valid JSON (${e.message})`);
    return null;
  }
}

function offerPick(kind, ids, message) {
  const field = $(`${kind}-pick-field`);
  const select = $(`${kind}-pick`);
  select.replaceChildren(new Option("— pick a video —", ""), ...ids.map((id) => new Option(id, id)));
  field.hidden = false;
  showError(message);
}

function applyResults(id, ask = true) {
  const entry = state.results[id];
  if (!Array.isArray(entry)) {
    if (ask) {
      const ids = Object.keys(state.results);
      offerPick("results", ids, `the results file has no entry for video "${id}" (${ids.length} other videos): pick one under "Open results JSON"`);
    }
    return;
  }
  $("results-pick-field").hidden = true;
  state.detections = entry
    .filter((d) => Array.isArray(d.segment) && d.segment.length === 2)
    .map((d) => ({ label: String(d.label), score: Number(d.score ?? 1), segment: d.segment.map(Number) }));
  setStatus(`${state.detections.length} detections from the results file (entry "${id}")`);
  render();
}

function applyTruth(id, ask = true) {
  const entry = state.database[id];
  if (!entry || !Array.isArray(entry.annotations)) {
    if (ask) {
      const ids = Object.keys(state.database);
      offerPick("gt", ids, `the ground-truth file has no entry for video "${id}" (${ids.length} other videos): pick one under "Open ground truth JSON"`);
    }
    return;
  }
  $("gt-pick-field").hidden = true;
  state.truth = entry.annotations
    .filter((a) => Array.isArray(a.segment) && a.segment.length === 2)
    .map((a) => ({ label: String(a.label), segment: a.segment.map(Number) }));
  if (!state.duration && entry.duration) state.duration = Number(entry.duration);
  render();
}

// each JSON file opened counts once it is handled (drawn, a pick offered, or refused): scripts wait on #stage[data-files]
function fileHandled() {
  $("stage").dataset.files = String(Number($("stage").dataset.files || 0) + 1);
}

// An ActivityNet file: results ({"results": {video id: detections}}) or ground truth ({"database": {video id: ...}}).
// Kept in the state, then its entry for the video on the page is drawn (or a pick is offered, by apply).
const JSON_FILES = {
  "results-file": {key: "results", what: "ActivityNet results file", entries: "detections", apply: (id) => applyResults(id)},
  "gt-file": {key: "database", what: "ActivityNet ground-truth file", entries: "annotations", apply: (id) => applyTruth(id)},
};

for (const [id, kind] of Object.entries(JSON_FILES)) {
  $(id).addEventListener("change", async (event) => {
    try {
      await openJson(event.target, kind);
    } finally {
      fileHandled();
    }
  });
}

async function openJson(input, kind) {
  const file = await readJson(input);
  if (!file) return;
  const entries = file.data && file.data[kind.key];
  if (!entries || typeof entries !== "object") {
    showError(`${file.name}: not an ${kind.what} (no "${kind.key}" object of video id -> ${kind.entries})`);
    return;
  }
  clearError();
  state[kind.key] = entries;
  if (!state.current) {
    showError(`${file.name} is read: load a video first, its entry is then drawn`);
    return;
  }
  kind.apply(state.current.id);
}

$("results-pick").addEventListener("change", (e) => e.target.value && (clearError(), applyResults(e.target.value)));
$("gt-pick").addEventListener("change", (e) => e.target.value && (clearError(), applyTruth(e.target.value)));

// --- the timeline -------------------------------------------------------------------------------------

const fmt = (x) => Number(x).toFixed(2);

function tiou(a, b) {
  const inter = Math.max(0, Math.min(a[1], b[1]) - Math.max(a[0], b[0]));
  const union = Math.max(a[1], b[1]) - Math.min(a[0], b[0]);
  return union > 0 ? inter / union : 0;
}

function duration() {
  if (Number.isFinite(video.duration) && video.duration > 0) return video.duration;
  if (state.duration > 0) return state.duration;
  const ends = [...state.detections, ...state.truth].map((d) => d.segment[1]);
  return Math.max(1, ...ends);
}

function lanes() {
  const used = new Set([...state.detections, ...state.truth].map((d) => d.label));
  const order = state.labels.filter((l) => used.has(l));
  const others = [...used].filter((l) => !state.labels.includes(l)).sort();
  return [...order, ...others];
}

function svg(tag, attrs = {}, parent = null) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (parent) parent.append(el);
  return el;
}

function render() {
  const timeline = $("timeline");
  const width = Math.max(400, timeline.parentElement.clientWidth);
  const classes = lanes();
  const height = AXIS_H + Math.max(1, classes.length) * LANE_H + 4;
  const total = duration();
  const x = (t) => LABEL_W + (Math.min(Math.max(t, 0), total) / total) * (width - LABEL_W - 8);
  timeline.replaceChildren();
  timeline.setAttribute("height", height);
  timeline.setAttribute("viewBox", `0 0 ${width} ${height}`);
  timeline.dataset.duration = String(total);

  // time axis: ~8 ticks at a round step
  const raw = total / 8;
  const step = [0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600].find((s) => s >= raw) || 3600;
  for (let t = 0; t <= total + 1e-9; t += step) {
    svg("line", { class: "tick", x1: x(t), x2: x(t), y1: AXIS_H - 4, y2: height }, timeline);
    svg("text", { class: "tick-label", x: x(t), y: 12 }, timeline).textContent = step < 1 ? t.toFixed(1) : String(Math.round(t));
  }
  if (!classes.length) {
    svg("text", { class: "lane-label", x: 8, y: AXIS_H + LANE_H / 2 }, timeline).textContent = state.current
      ? "no detections"
      : "no video yet";
  }
  classes.forEach((label, i) => {
    const top = AXIS_H + i * LANE_H;
    const colour = COLOURS[Math.max(0, state.labels.indexOf(label) >= 0 ? state.labels.indexOf(label) : i) % COLOURS.length];
    svg("rect", { class: `lane-bg${i % 2 ? " odd" : ""}`, x: 0, y: top, width, height: LANE_H }, timeline);
    const text = svg("text", { class: "lane-label", x: 6, y: top + LANE_H / 2, "data-label": label }, timeline);
    text.textContent = label.length > 20 ? `${label.slice(0, 19)}…` : label;
    svg("title", {}, text).textContent = label;
    const truth = state.truth.filter((g) => g.label === label);
    for (const g of truth) {
      const bar = svg("rect", { class: "gt-bar", x: x(g.segment[0]), y: top + 3, width: Math.max(1, x(g.segment[1]) - x(g.segment[0])), height: 7 }, timeline);
      bar.dataset.label = label;
      bar.dataset.start = String(g.segment[0]);
      bar.dataset.end = String(g.segment[1]);
      bar.addEventListener("mouseenter", (e) => tooltip(e, `ground truth: ${label}`, `${fmt(g.segment[0])}–${fmt(g.segment[1])} s`));
      bar.addEventListener("mouseleave", hideTooltip);
    }
    // lowest score first, so the best detection is drawn on top where bars overlap
    const dets = state.detections.filter((d) => d.label === label).sort((a, b) => a.score - b.score);
    for (const d of dets) {
      const [s, e] = d.segment;
      const best = truth.reduce((m, g) => Math.max(m, tiou(d.segment, g.segment)), 0);
      const bar = svg("rect", {
        class: "det-bar",
        x: x(s),
        y: top + 12,
        width: Math.max(2, x(e) - x(s)),
        height: LANE_H - 15,
        fill: colour,
        "fill-opacity": Math.max(MIN_OPACITY, Math.min(1, d.score)),
        tabindex: 0,
        role: "button",
        "aria-label": `${label} ${fmt(s)} to ${fmt(e)} s, score ${d.score.toFixed(3)}: play from here`,
      }, timeline);
      Object.assign(bar.dataset, { score: String(d.score), start: String(s), end: String(e), label });
      const lines = [`${label}`, `${fmt(s)}–${fmt(e)} s`, `score ${d.score.toFixed(3)}`];
      if (truth.length) lines.push(`tIoU ${best.toFixed(2)} with the best ground truth`);
      bar.addEventListener("mouseenter", (ev) => tooltip(ev, ...lines));
      bar.addEventListener("focus", (ev) => tooltip(ev, ...lines));
      bar.addEventListener("mouseleave", hideTooltip);
      bar.addEventListener("blur", hideTooltip);
      bar.addEventListener("click", () => seek(s));
      bar.addEventListener("keydown", (ev) => {
        if (ev.key === "Enter" || ev.key === " ") {
          ev.preventDefault();
          seek(s);
        }
      });
    }
  });
  svg("line", { id: "cursor", x1: x(0), x2: x(0), y1: AXIS_H - 4, y2: height }, timeline);
  timeline._x = x; // the scale, for the cursor
  applyThreshold();
  moveCursor();
}

function applyThreshold() {
  const threshold = Number($("threshold").value);
  $("threshold-value").textContent = threshold.toFixed(2);
  let shown = 0;
  const bars = document.querySelectorAll("#timeline .det-bar");
  for (const bar of bars) {
    const hide = Number(bar.dataset.score) < threshold;
    bar.classList.toggle("hidden", hide);
    if (hide) bar.setAttribute("tabindex", "-1");
    else {
      bar.setAttribute("tabindex", "0");
      shown += 1;
    }
  }
  const count = $("shown-count");
  count.textContent = `${shown} of ${bars.length} shown`;
  count.dataset.shown = String(shown);
  count.dataset.total = String(bars.length);
}

function seek(t) {
  video.currentTime = t;
  moveCursor(t);
}

function moveCursor(t = video.currentTime) {
  const line = $("cursor");
  const x = $("timeline")._x;
  if (!line || !x) return;
  line.setAttribute("x1", x(t || 0));
  line.setAttribute("x2", x(t || 0));
}

function tooltip(event, ...lines) {
  const tip = $("tooltip");
  const wrap = $("timeline-wrap").getBoundingClientRect();
  const box = event.target.getBoundingClientRect();
  tip.replaceChildren(...lines.flatMap((l, i) => (i ? [document.createElement("br"), l] : [l])));
  tip.hidden = false;
  tip.style.left = `${Math.min(box.left - wrap.left, wrap.width - 220)}px`;
  tip.style.top = `${box.bottom - wrap.top + 4}px`;
}

function hideTooltip() {
  $("tooltip").hidden = true;
}

$("threshold").addEventListener("input", applyThreshold);
video.addEventListener("timeupdate", () => moveCursor());
video.addEventListener("seeked", () => moveCursor());
video.addEventListener("loadedmetadata", render); // the player's duration is exact; the scale follows it
video.addEventListener("play", function frame() {
  moveCursor();
  if (!video.paused && !video.ended) requestAnimationFrame(frame);
});
video.addEventListener("error", () => {
  if (video.error && video.getAttribute("src")) showError(`the player cannot play this video: ${video.error.message || `media error ${video.error.code}`}`);
});
window.addEventListener("resize", render);

loadModel();
loadVideoList();
render();
