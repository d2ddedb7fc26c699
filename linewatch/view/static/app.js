// linewatch view: live cameras, rejects and score history from the view's server-sent events.
// No build step and no library: the chart and the heatmap overlay are drawn on canvases by hand.
"use strict";

const cams = new Map(); // camera name → {name, el, info, last, shot, history, rejects, dirty}
let limits = { rejects_max: 12, history_max: 300 };
let daemon = {};
let renderQueued = false;
let source = null;

const $ = (sel, root = document) => root.querySelector(sel);

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toPrecision(digits);
}

function imgUrl(camera, key, kind) {
  // relative: resolves under whatever prefix the page itself was served from
  return `img/${encodeURIComponent(camera)}/${encodeURIComponent(key)}/${kind}`;
}

function ago(epochS) {
  if (!epochS) return "";
  const s = Math.max(0, Date.now() / 1000 - epochS);
  return s < 60 ? `${s.toFixed(0)} s ago` : s < 3600 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}

// ---------------------------------------------------------------- state

function camera(name) {
  let c = cams.get(name);
  if (!c) {
    const el = $("#camera-tpl").content.firstElementChild.cloneNode(true);
    el.dataset.camera = name;
    $(".name", el).textContent = name;
    $(".frame", el).addEventListener("load", () => drawCard(c));
    $(".heatmap", el).addEventListener("load", () => drawCard(c));
    c = { name, el, info: {}, last: null, shot: null, history: [], rejects: [], dirty: true, shownShot: null };
    cams.set(name, c);
    const grid = $("#grid");
    const after = [...grid.children].find((x) => x.dataset.camera > name);
    grid.insertBefore(el, after || null);
    $("#empty").hidden = true;
  }
  return c;
}

function onSnapshot(s) {
  limits = { rejects_max: s.rejects_max, history_max: s.history_max };
  daemon = s.daemon || {};
  const names = new Set(s.cameras.map((x) => x.camera));
  for (const [name, c] of cams) {
    if (!names.has(name)) { c.el.remove(); cams.delete(name); }
  }
  for (const snap of s.cameras) {
    const c = camera(snap.camera);
    c.info = snap;
    c.last = snap.last;
    c.shot = snap.shot;
    c.history = snap.history;
    c.rejects = snap.rejects.slice(); // oldest first, as the server keeps them
    c.dirty = true;
  }
  setConn("live");
  schedule();
}

function onVerdict(v) {
  const c = camera(v.camera);
  c.last = v;
  c.info.fps = v.fps;
  c.info.state = v.state;
  c.info.verdicts = (c.info.verdicts || 0) + 1;
  c.history.push([v.time, v.score, v.verdict === "fail"]);
  if (c.history.length > limits.history_max) c.history.splice(0, c.history.length - limits.history_max);
  if (v.shot) c.shot = v;
  if (v.verdict === "fail") {
    c.info.fails = (c.info.fails || 0) + 1;
    c.rejects.push(v);
    if (c.rejects.length > limits.rejects_max) c.rejects.splice(0, c.rejects.length - limits.rejects_max);
  }
  c.dirty = true;
  schedule();
}

function onCamera(info) {
  const c = camera(info.camera);
  Object.assign(c.info, info);
  c.dirty = true;
  schedule();
}

function onDaemon(d) {
  daemon = d;
  schedule();
}

// ---------------------------------------------------------------- rendering

function schedule() {
  if (renderQueued) return;
  renderQueued = true;
  // one render for a burst of events; the timer also covers pages where animation frames are paused
  const run = () => { if (renderQueued) { renderQueued = false; render(); } };
  requestAnimationFrame(run);
  setTimeout(run, 200);
}

function render() {
  const dState = daemon.lifecycle || "?";
  const dEl = $("#daemon");
  dEl.textContent = `daemon: ${dState}`;
  dEl.className = `badge ${dState}`;
  $("#model").textContent = daemon.model_id ? `model ${daemon.model_id}` : "";
  $("#heard").textContent = daemon.last_heard ? `last heard ${ago(daemon.last_heard)}` : "";
  for (const c of cams.values()) {
    if (c.dirty) { renderCard(c); c.dirty = false; }
    const stale = c.last && Date.now() / 1000 - c.last.time > 30 && c.info.state === "up";
    c.el.classList.toggle("is-stale", Boolean(stale));
  }
}

function renderCard(c) {
  const el = c.el, info = c.info, v = c.last;
  const state = $(".state", el);
  state.textContent = info.state || "";
  state.className = `state badge ${info.state || ""}`;
  state.title = info.reason || "";
  const cond = $(".condition", el);
  cond.textContent = info.condition && info.condition !== "ok" ? info.condition : info.condition === "ok" ? "image ok" : "";
  cond.className = `condition badge ${info.condition || ""}`;
  const mismatch = $(".mismatch", el);
  mismatch.textContent = info.mismatch ? "calibration?" : "";
  mismatch.title = info.mismatch || "";
  const verdict = $(".verdict", el);
  verdict.textContent = v ? v.verdict.toUpperCase() + (v.timed_out ? " (timeout)" : "") : "";
  verdict.className = `verdict badge ${v ? v.verdict : ""}`;
  el.classList.toggle("is-fail", Boolean(v && v.verdict === "fail"));
  if (v) {
    const p = v.p_value === null ? "" : `  p ${fmt(v.p_value, 2)}`;
    $(".score", el).textContent = `#${v.seq}  score ${fmt(v.score, 4)} / threshold ${fmt(v.threshold, 4)}${p}`;
    const frac = v.threshold > 0 && v.score !== null ? Math.min(1, v.score / (2 * v.threshold)) : 0;
    const fill = $(".scorebar .fill", el);
    fill.style.width = `${(frac * 100).toFixed(1)}%`;
    fill.classList.toggle("over", v.verdict === "fail");
    $(".latency", el).textContent = v.latency_ms === null ? "–" : `${v.latency_ms.toFixed(0)} ms`;
  }
  $(".fps", el).textContent = info.fps ? info.fps.toFixed(1) : "–";
  $(".failrate", el).textContent = info.fail_rate === null || info.fail_rate === undefined ? "–" : `${(info.fail_rate * 100).toFixed(1)} %`;
  const drift = $(".drift", el);
  const r = info.score_median_ratio;
  drift.textContent = r === null || r === undefined ? "–" : `× ${r.toFixed(2)}`;
  drift.classList.toggle("warn", r !== null && r !== undefined && (r > 1.25 || r < 0.75));
  $(".count", el).textContent = String(info.verdicts || 0);
  renderPicture(c);
  renderRejects(c);
  drawChart($(".chart", el), c.history, v ? v.threshold : null);
}

function renderPicture(c) {
  const pic = $(".picture", c.el);
  const s = c.shot;
  pic.classList.toggle("has-pic", Boolean(s && s.shot));
  if (!s || !s.shot || c.shownShot === s.shot) return;
  c.shownShot = s.shot;
  c.drawn = null;
  $(".frame", c.el).src = imgUrl(c.name, s.shot, "frame.jpg");
  $(".heatmap", c.el).src = imgUrl(c.name, s.shot, "heatmap.png");
  $(".pic-label", c.el).textContent = `#${s.seq} ${s.verdict}`;
}

function drawCard(c) {
  const frame = $(".frame", c.el), heat = $(".heatmap", c.el);
  if (!c.shot || !frame.complete || !heat.complete || !heat.naturalWidth) return;
  if (c.drawn === c.shownShot) return;
  c.drawn = c.shownShot;
  drawOverlay($(".overlay", c.el), heat, c.shot, 2);
}

function renderRejects(c) {
  const ol = $(".rejects", c.el);
  const want = c.rejects.slice().reverse(); // newest first
  const keyOf = (r) => `${r.run_id}-${r.seq}`;
  const wanted = new Set(want.map(keyOf));
  for (const li of [...ol.children]) if (!wanted.has(li.dataset.key)) li.remove();
  const have = new Map([...ol.children].map((li) => [li.dataset.key, li]));
  let prev = null;
  for (const r of want) {
    let li = have.get(keyOf(r));
    if (!li) li = rejectTile(c, r);
    const next = prev ? prev.nextSibling : ol.firstChild;
    if (li !== next) ol.insertBefore(li, next);
    prev = li;
  }
  const fails = c.info.fails || 0;
  $(".rejects-note", c.el).textContent = c.rejects.length ? `last ${c.rejects.length} of ${fails}` : "none yet";
}

function rejectTile(c, r) {
  const li = document.createElement("li");
  li.className = "reject";
  li.tabIndex = 0;
  li.dataset.key = `${r.run_id}-${r.seq}`;
  li.dataset.seq = String(r.seq);
  li.dataset.run = r.run_id;
  li.dataset.shownAt = String(Date.now()); // when the page first showed this reject (ms since epoch)
  li.title = `#${r.seq} score ${fmt(r.score, 4)} / ${fmt(r.threshold, 4)}`;
  if (!r.shot) {
    li.classList.add("nopic");
    li.title += " (no picture: preview not sent for it)";
  } else {
    const img = document.createElement("img");
    img.alt = `reject #${r.seq}`;
    img.addEventListener("load", () => { li.dataset.loadedAt = String(Date.now()); });
    // the view keeps a bounded number of pictures: one that went before the page fetched it is just a label
    img.addEventListener("error", () => { img.remove(); li.classList.add("nopic"); li.title += " (picture no longer held)"; });
    img.src = imgUrl(c.name, r.shot, "frame.jpg");
    li.appendChild(img);
  }
  const label = document.createElement("span");
  label.textContent = `#${r.seq}`;
  li.appendChild(label);
  const open = () => showDetail(c, r);
  li.addEventListener("click", open);
  li.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } });
  return li;
}

// ---------------------------------------------------------------- the heatmap overlay

// jet-like colour scale, v in [0, 1]
function colour(v) {
  const r = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 3)));
  const g = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 2)));
  const b = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 1)));
  return [r * 255, g * 255, b * 255];
}

// The heatmap is the anomaly map scaled so that 255 = 2 × image threshold (linewatch.messages). Colour where
// it is high, outline the defect regions (map above the pixel threshold) in red, and draw the boxes, which
// are in frame pixels and are mapped onto the ROI the preview shows.
function drawOverlay(canvas, heatImg, v, scale) {
  const w = heatImg.naturalWidth, h = heatImg.naturalHeight;
  if (!w || !h) return;
  const k = Math.max(1, Math.round(scale));
  canvas.width = w * k;
  canvas.height = h * k;
  const src = document.createElement("canvas");
  src.width = w; src.height = h;
  const sctx = src.getContext("2d", { willReadFrequently: true });
  sctx.drawImage(heatImg, 0, 0);
  const px = sctx.getImageData(0, 0, w, h);
  const d = px.data;
  const grey = new Uint8Array(w * h);
  for (let i = 0; i < w * h; i++) grey[i] = d[i * 4];
  const thr = v.threshold > 0 && v.pixel_threshold !== null ? Math.min(255, (255 * v.pixel_threshold) / (2 * v.threshold)) : 128;
  const start = thr * 0.6;
  for (let i = 0; i < w * h; i++) {
    const g = grey[i];
    const [r, gg, b] = colour(g / 255);
    d[i * 4] = r; d[i * 4 + 1] = gg; d[i * 4 + 2] = b;
    d[i * 4 + 3] = g <= start ? 0 : Math.min(150, ((g - start) / (255 - start)) * 150 + 40);
  }
  // outline: above the pixel threshold with a 4-neighbour at or below it (or at the border)
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x;
      if (grey[i] <= thr) continue;
      const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 || grey[i - 1] <= thr || grey[i + 1] <= thr ||
        grey[i - w] <= thr || grey[i + w] <= thr;
      if (edge) { d[i * 4] = 255; d[i * 4 + 1] = 40; d[i * 4 + 2] = 40; d[i * 4 + 3] = 255; }
    }
  }
  sctx.putImageData(px, 0, 0);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(src, 0, 0, canvas.width, canvas.height);
  const roi = v.roi || [0, 0, v.frame[0], v.frame[1]];
  const sx = canvas.width / roi[2], sy = canvas.height / roi[3];
  ctx.strokeStyle = "#ffd400";
  ctx.lineWidth = Math.max(1, k);
  for (const [bx, by, bw, bh] of v.boxes || []) {
    ctx.strokeRect((bx - roi[0]) * sx, (by - roi[1]) * sy, bw * sx, bh * sy);
  }
}

// ---------------------------------------------------------------- the score chart (hand-drawn)

function drawChart(canvas, history, threshold) {
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || 300, cssH = canvas.clientHeight || 90;
  canvas.width = Math.round(cssW * dpr);
  canvas.height = Math.round(cssH * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  const pts = history.filter((p) => p[1] !== null);
  if (!pts.length) return;
  // the range of the scores and the threshold, padded: scores often sit in a narrow band near it
  let lo = threshold || pts[0][1], hi = lo;
  for (const p of pts) { lo = Math.min(lo, p[1]); hi = Math.max(hi, p[1]); }
  const span = Math.max(hi - lo, Math.abs(threshold || hi) * 0.05, 1e-6);
  lo -= span * 0.1;
  hi += span * 0.1;
  const pad = 4, n = Math.max(2, limits.history_max);
  const x = (i) => pad + ((cssW - 2 * pad) * (i + n - pts.length)) / (n - 1);
  const y = (s) => cssH - pad - ((cssH - 2 * pad) * (s - lo)) / (hi - lo);
  if (threshold) {
    ctx.strokeStyle = "#c9ced3";
    ctx.setLineDash([4, 3]);
    ctx.beginPath();
    ctx.moveTo(pad, y(threshold));
    ctx.lineTo(cssW - pad, y(threshold));
    ctx.stroke();
    ctx.setLineDash([]);
  }
  ctx.strokeStyle = "#4aa3df";
  ctx.lineWidth = 1;
  ctx.beginPath();
  pts.forEach((p, i) => (i ? ctx.lineTo(x(i), y(p[1])) : ctx.moveTo(x(i), y(p[1]))));
  ctx.stroke();
  ctx.fillStyle = "#e0413a";
  pts.forEach((p, i) => { if (p[2]) { ctx.beginPath(); ctx.arc(x(i), y(p[1]), 2.2, 0, 2 * Math.PI); ctx.fill(); } });
}

// ---------------------------------------------------------------- the reject detail

function showDetail(c, r) {
  const dlg = $("#detail");
  $("#detail-title").textContent = `${c.name} — reject #${r.seq}`;
  const facts = $("#detail-facts");
  facts.replaceChildren();
  const rows = [
    ["time", new Date(r.capture_time * 1000).toLocaleString()],
    ["score", `${fmt(r.score, 5)} (threshold ${fmt(r.threshold, 5)})`],
    ["p-value", r.p_value === null ? "–" : fmt(r.p_value, 3)],
    ["regions", `${r.n_regions}, ${r.defect_area} px`],
    ["latency", r.latency_ms === null ? "–" : `${r.latency_ms.toFixed(0)} ms`],
    ["frame", `${r.frame[0]}×${r.frame[1]}${r.roi ? `, ROI ${r.roi.join(",")}` : ""}`],
    ["model", r.model_id],
    ["source", r.ref || "–"],
    ["run", r.run_id],
  ];
  for (const [k, val] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = val;
    facts.append(dt, dd);
  }
  const tbody = $("#detail-boxes tbody");
  tbody.replaceChildren();
  for (const b of r.boxes) {
    const tr = document.createElement("tr");
    for (const n of b) { const td = document.createElement("td"); td.textContent = String(n); tr.appendChild(td); }
    tbody.appendChild(tr);
  }
  const pic = $("#detail-frame").parentElement;
  const frame = $("#detail-frame"), heat = $("#detail-heatmap"), overlay = $("#detail-overlay");
  overlay.getContext("2d").clearRect(0, 0, overlay.width, overlay.height);
  pic.classList.toggle("has-pic", Boolean(r.shot));
  if (r.shot) {
    const draw = () => {
      if (!frame.complete || !heat.complete || !heat.naturalWidth) return;
      pic.style.aspectRatio = `${frame.naturalWidth} / ${frame.naturalHeight}`;
      drawOverlay(overlay, heat, r, 4);
    };
    frame.onload = draw;
    heat.onload = draw;
    frame.onerror = heat.onerror = () => pic.classList.remove("has-pic"); // no longer held by the view
    frame.src = imgUrl(c.name, r.shot, "frame.jpg");
    heat.src = imgUrl(c.name, r.shot, "heatmap.png");
    draw();
  }
  if (!dlg.open) dlg.showModal();
}

// ---------------------------------------------------------------- live updates

function setConn(state) {
  const el = $("#conn");
  el.textContent = state;
  el.className = `badge ${state}`;
}

function connect() {
  if (source) source.close();
  source = new EventSource("api/events");
  source.addEventListener("snapshot", (e) => onSnapshot(JSON.parse(e.data)));
  source.addEventListener("verdict", (e) => onVerdict(JSON.parse(e.data)));
  source.addEventListener("camera", (e) => onCamera(JSON.parse(e.data)));
  source.addEventListener("daemon", (e) => onDaemon(JSON.parse(e.data)));
  source.addEventListener("dropped", (e) => {
    const d = JSON.parse(e.data);
    const el = $("#dropped");
    el.hidden = false;
    el.textContent = `${d.total} updates skipped (this page fell behind)`;
  });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {
      setConn("lost"); // refused (e.g. too many viewers): try again later
      setTimeout(connect, 5000);
    } else {
      setConn("reconnecting"); // the browser retries by itself
    }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  connect();
  setInterval(render, 1000); // "last heard … ago", stale cameras
});
