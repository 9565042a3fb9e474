// The divergent browser view: one WebSocket to the server (see server/web.py), a canvas
// piano roll on the leading clock's grid, the novelty of each answer over time, the takes.
// Plain JavaScript, no library: the page must work on a stage without internet.
"use strict";

const $ = (id) => document.getElementById(id);
const PAST_BEATS = 12;     // the roll shows 3 bars behind the playhead...
const AHEAD_BEATS = 20;    // ...and 5 ahead, where the next answer is drawn
const NOVELTY_S = 180;     // seconds of readouts shown
const METRICS = [
  // [readout field, label, fixed top of the scale or null for "at least this"]
  ["surprisal", "surprisal (bits/note)", null, 8],
  ["copy_rate", "copy rate", 1, 1],
  ["feature_distance", "feature distance", null, 2],
  ["in_scale", "in scale", 1, 1],
];

// Everything the page knows; exposed for tests and for curious performers (read only).
const view = {
  connected: false, boot: null, restarts: 0, status: {}, clock: null, controls: {},
  performer: [], machine: [], answers: new Map(), readouts: [], knob: [],
  dropped: 0, drawn: {}, readoutDrawn: {}, errors: [], takes: [], concepts: [],
};
window.divergentView = view;

// ------------------------------------------------------------------ time

function beatNow() {
  const c = view.clock;
  if (!c) return 0;
  return c.beat + ((performance.now() - c.at) / 1000) * c.bpm / 60;
}

function serverNow() {
  const c = view.clock;
  return c ? c.t + (performance.now() - c.at) / 1000 : 0;
}

// ------------------------------------------------------------------ connection

let ws = null;
let tries = 0;
let nextRef = 1;
const sent = new Map();  // ref -> address, for the acks

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  ws = new WebSocket(`${scheme}//${location.host}/ws`);
  ws.onmessage = (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch (e) { return; }
    handle(msg, true);
  };
  ws.onclose = () => {
    const was = view.connected;
    view.connected = false;
    setOnline(false, was ? "offline: the server went away; reconnecting…"
                         : `offline: reconnecting (try ${tries + 1})…`);
    const delay = Math.min(5000, 250 * 2 ** tries);
    tries += 1;
    setTimeout(connect, delay);
  };
}

function send(address, args) {
  if (!ws || ws.readyState !== WebSocket.OPEN) {
    addMessage(`${address}: not sent, the server is offline`, "bad");
    return;
  }
  const ref = nextRef++;
  sent.set(ref, address);
  ws.send(JSON.stringify({ type: "control", address, args, ref }));
}

function setOnline(on, text) {
  $("light").className = "light " + (on ? "online" : "offline");
  $("online").textContent = text;
}

function notice(text) {
  const n = $("notice");
  n.textContent = text;
  n.hidden = false;
  clearTimeout(notice.timer);
  notice.timer = setTimeout(() => { n.hidden = true; }, 8000);
}

// ------------------------------------------------------------------ events

function handle(msg, live) {
  switch (msg.type) {
    case "hello": return hello(msg);
    case "clock":
      view.clock = { t: msg.t, beat: msg.beat, bpm: msg.bpm, bar: msg.beats_per_bar,
                     at: performance.now() };
      return;
    case "status": return status(msg.status, msg.t);
    case "performer": return performerNote(msg);
    case "answer_notes": return answerNotes(msg);
    case "sounded": return sounded(msg);
    case "cancel": return cancel(msg.id);
    case "reply": return reply(msg, live);
    case "ack": return ack(msg);
    case "error": return addMessage(msg.message, "bad");
    case "dropped":
      view.dropped = msg.count;
      return footer();
  }
}

function hello(msg) {
  const reconnected = view.boot !== null;
  const restarted = reconnected && view.boot !== msg.boot;
  // the history repeats what the server remembers: the page starts again from it
  view.performer = []; view.machine = []; view.answers = new Map();
  view.readouts = []; view.knob = [];
  if (restarted) {
    // a new server: its answers are not the old one's
    view.restarts += 1;
    view.drawn = {}; view.readoutDrawn = {};
  }
  view.boot = msg.boot;
  tries = 0;
  view.connected = true;
  view.clock = { t: msg.clock.t, beat: msg.clock.beat, bpm: msg.clock.bpm,
                 bar: msg.clock.beats_per_bar, at: performance.now() };
  view.controls = {};
  for (const c of msg.controls) view.controls[c.address] = c;
  setupControls();
  for (const ev of msg.history) handle(ev, false);
  status(msg.status, msg.t);
  setOnline(true, `online · divergent ${msg.version}`);
  if (restarted) notice("reconnected: the server restarted");
  else if (reconnected) notice("reconnected");
  send("/divergent/concepts", []);
  loadTakes();
}

function status(s, t) {
  const before = view.status;
  view.status = s;
  const last = view.knob[view.knob.length - 1];
  if (!last || last.d !== s.divergence) view.knob.push({ t, d: s.divergence });
  if (before.recording !== s.recording) loadTakes();
  if (before.answers !== s.answers && s.recording) setTimeout(loadTakes, 500);
  showStatus();
  syncControls();
}

function performerNote(m) {
  if (m.on) {
    view.performer.push({ on: m.beat, off: null, pitch: m.pitch });
  } else {
    for (let i = view.performer.length - 1; i >= 0; i--) {
      const n = view.performer[i];
      if (n.pitch === m.pitch && n.off === null) { n.off = Math.max(m.beat, n.on + 0.05); break; }
    }
  }
  trim(view.performer);
}

function answerNotes(m) {
  let a = view.answers.get(m.id);
  if (!a) {
    a = { id: m.id, notes: [], placed: false, since: performance.now() };
    view.answers.set(m.id, a);
  }
  const notes = m.notes.map(([on, off, pitch, velocity]) =>
    ({ on, off, pitch, velocity, filled: false }));
  if (m.placed) {
    if (!a.placed) a.notes = [];  // the placed notes replace the preview's guess
    a.placed = true;
    a.notes.push(...notes);
  } else if (!a.placed) {
    a.notes.push(...notes);
  }
}

function sounded(m) {
  if (!m.on) {
    for (let i = view.machine.length - 1; i >= 0; i--) {
      const n = view.machine[i];
      if (n.pitch === m.pitch && n.off === null) { n.off = Math.max(m.beat, n.on + 0.05); break; }
    }
    return;
  }
  const a = m.id === null ? null : view.answers.get(m.id);
  if (a) {
    let best = null;
    for (const n of a.notes) {
      if (n.filled || n.pitch !== m.pitch) continue;
      if (!best || Math.abs(n.on - m.beat) < Math.abs(best.on - m.beat)) best = n;
    }
    if (best) { best.filled = true; return; }
  }
  view.machine.push({ on: m.beat, off: null, pitch: m.pitch });
  trim(view.machine);
}

function cancel(id) {
  const ids = id === null ? [...view.answers.keys()] : [id];
  for (const k of ids) {
    const a = view.answers.get(k);
    if (!a) continue;
    // what already sounded stays; what was still to come disappears
    a.notes = a.notes.filter((n) => n.filled);
    a.cancelled = true;
    if (!a.notes.length) view.answers.delete(k);
  }
}

function reply(m, live) {
  const a = m.args;
  if (m.address === "/divergent/answer") {
    view.readouts.push({ t: m.t, ...a });
    if (view.readouts.length > 2000) view.readouts.shift();
  } else if (m.address === "/divergent/error") {
    if (live) addMessage(a.message, /\(applied\)$/.test(a.message) ? "warn" : "bad");
  } else if (m.address === "/divergent/concepts") {
    view.concepts = a.names || [];
    fillConcepts();
  } else if (m.address === "/divergent/concept") {
    if (live) addMessage(`concept ${a.concept} applies from the next answer`, "info");
  } else if (m.address === "/divergent/concept/learned") {
    if (live) addMessage(`learned concept ${a.name} in ${a.seconds.toFixed(1)} s`, "info");
  }
}

function ack(m) {
  const address = sent.get(m.ref) || m.address;
  sent.delete(m.ref);
  for (const text of m.messages) addMessage(text, m.ok ? "warn" : "bad");
  if (!m.ok) syncControls(true);  // a refused value: the control shows the server's again
  return address;
}

function trim(list) {
  const old = beatNow() - PAST_BEATS * 4;
  while (list.length > 4000 || (list.length && list[0].off !== null && list[0].off < old)) {
    list.shift();
  }
}

// ------------------------------------------------------------------ messages and status

function addMessage(text, kind) {
  const li = document.createElement("li");
  if (kind !== "bad") li.className = kind;
  const time = document.createElement("time");
  time.textContent = new Date().toLocaleTimeString();
  li.append(time, text);
  const list = $("errors");
  list.prepend(li);
  while (list.children.length > 30) list.lastChild.remove();
  view.errors.push(text);
}

function showStatus() {
  const s = view.status;
  const el = $("statusline");
  el.textContent = `${s.mode} · ${Number(s.tempo).toFixed(1)} BPM ${s.clock} · d ${Number(s.divergence).toFixed(2)}` +
    ` · T ${Number(s.temperature).toFixed(2)} · ${s.bars} bars · quantize ${s.quantize}` +
    ` · concept ${s.concept} · ${s.answers} answers `;
  const rec = document.createElement("span");
  rec.className = s.recording ? "rec" : "dim";
  rec.textContent = s.recording ? "● REC" : "not recording";
  el.append(rec);
}

function footer() {
  $("footer").textContent = view.dropped
    ? `this page could not keep up: ${view.dropped} updates dropped` : "";
}

// ------------------------------------------------------------------ controls

const sliders = [
  ["divergence", "/divergent/divergence", "divergence", 2],
  ["temperature", "/divergent/temperature", "temperature", 2],
  ["bars", "/divergent/bars", "bars", 0],
  ["concept-strength", "/divergent/concept/strength", "concept_strength", 2],
];
const selects = [
  ["mode", "/divergent/mode", "mode"],
  ["quantize", "/divergent/quantize", "quantize"],
  ["clock", "/divergent/clock", "clock"],
];
let controlsWired = false;

function firstArg(address) {
  const c = view.controls[address];
  return c && c.args.length ? c.args[0] : null;
}

function setupControls() {
  // ranges and choices come from the server's declarations (one control space)
  for (const [id, address] of sliders) {
    const arg = firstArg(address);
    if (arg && arg.lo !== null) $(id).min = arg.lo;
    if (arg && arg.hi !== null) $(id).max = arg.hi;
  }
  const tempo = firstArg("/divergent/tempo");
  if (tempo) { $("tempo").min = tempo.lo; $("tempo").max = tempo.hi; }
  for (const [id, address] of selects) {
    const arg = firstArg(address);
    const el = $(id);
    el.replaceChildren(...((arg && arg.choices) || []).map((c) => new Option(c, c)));
  }
  fillConcepts();
  if (controlsWired) return;
  controlsWired = true;
  for (const [id, address, , digits] of sliders) {
    const el = $(id);
    let timer = null;
    el.addEventListener("input", () => {
      $(`${id}-value`).textContent = Number(el.value).toFixed(digits);
      // while dragging, at most one message every 50 ms; the last value always goes
      if (timer === null) {
        timer = setTimeout(() => { timer = null; send(address, [Number(el.value)]); }, 50);
      }
    });
    el.addEventListener("change", () => send(address, [Number(el.value)]));
  }
  for (const [id, address] of selects) {
    $(id).addEventListener("change", () => send(address, [$(id).value]));
  }
  $("tempo").addEventListener("change", () => send("/divergent/tempo", [Number($("tempo").value)]));
  $("concept").addEventListener("change", () => send("/divergent/concept", [$("concept").value]));
  $("concepts-refresh").addEventListener("click", () => send("/divergent/concepts", []));
  $("generate").addEventListener("click", () => send("/divergent/generate", []));
  $("stop").addEventListener("click", () => send("/divergent/stop", []));
  $("record-start").addEventListener("click", () => {
    const name = $("take-name").value.trim();
    send("/divergent/record/start", name ? [name] : []);
  });
  $("record-stop").addEventListener("click", () => send("/divergent/record/stop", []));
}

function fillConcepts() {
  const el = $("concept");
  const current = view.status.concept || "none";
  const names = ["none", ...view.concepts];
  if (!names.includes(current)) names.push(current);
  el.replaceChildren(...names.map((n) => new Option(n, n)));
  el.value = current;
}

function syncControls(force) {
  const s = view.status;
  const values = {
    divergence: s.divergence, temperature: s.temperature, bars: s.bars,
    concept_strength: s.concept_strength,
  };
  for (const [id, , key, digits] of sliders) {
    const el = $(id);
    // a control the performer is moving right now is theirs, not the status's
    if (!force && document.activeElement === el) continue;
    if (values[key] === undefined) continue;
    el.value = values[key];
    $(`${id}-value`).textContent = Number(values[key]).toFixed(digits);
  }
  for (const [id, , key] of selects) {
    if (s[key] !== undefined && (force || document.activeElement !== $(id))) $(id).value = s[key];
  }
  if (s.tempo !== undefined && (force || document.activeElement !== $("tempo"))) {
    $("tempo").value = Number(s.tempo).toFixed(1);
  }
  if (s.concept !== undefined && document.activeElement !== $("concept")) fillConcepts();
}

// ------------------------------------------------------------------ takes

async function loadTakes() {
  try {
    const r = await fetch("/api/takes", { cache: "no-store" });
    if (!r.ok) return;
    const data = await r.json();
    view.takes = data.takes;
    $("sessions").textContent = `in ${data.sessions}`;
    $("takes").replaceChildren(...data.takes.map((t) => {
      const tr = document.createElement("tr");
      const cells = [t.name, `${t.duration_s.toFixed(1)} s`, t.performer_notes, t.machine_notes,
                     t.answers];
      for (const c of cells) {
        const td = document.createElement("td");
        td.textContent = c;
        tr.append(td);
      }
      const td = document.createElement("td");
      if (t.error) {
        td.textContent = "unreadable";
      } else {
        const a = document.createElement("a");
        a.href = t.url;
        a.download = t.file;
        a.textContent = "download .mid";
        a.className = "take-link";
        td.append(a);
      }
      tr.append(td);
      return tr;
    }));
  } catch (e) {
    // offline: the list comes back with the connection
  }
}

// ------------------------------------------------------------------ drawing

function fitCanvas(canvas) {
  const r = canvas.getBoundingClientRect();
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(r.width * dpr));
  const h = Math.max(1, Math.round(r.height * dpr));
  if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  return [ctx, r.width, r.height];
}

function previewShift(a, now) {
  // where the server will put an answer not yet placed: its first note on the next beat or
  // bar (quantize), or now (off); the placed notes replace this guess
  if (a.placed || !a.notes.length) return 0;
  const first = Math.min(...a.notes.map((n) => n.on));
  const need = now - first;
  const q = view.status.quantize;
  if (q === "off") return need;
  const unit = q === "bar" ? (view.clock ? view.clock.bar : 4) : 1;
  return Math.max(0, Math.ceil(need / unit) * unit);
}

function drawRoll() {
  const [ctx, w, h] = fitCanvas($("roll"));
  const now = beatNow();
  const lo = now - PAST_BEATS;
  const span = PAST_BEATS + AHEAD_BEATS;
  const x = (b) => ((b - lo) / span) * w;
  // the pitch range of what is on screen, at least two octaves
  let pmin = 127, pmax = 0;
  const visible = (n, shift = 0) => (n.off === null ? now : n.off + shift) >= lo && n.on + shift <= lo + span;
  const consider = (n, shift) => { if (visible(n, shift)) { pmin = Math.min(pmin, n.pitch); pmax = Math.max(pmax, n.pitch); } };
  view.performer.forEach((n) => consider(n, 0));
  view.machine.forEach((n) => consider(n, 0));
  for (const a of view.answers.values()) { const s = previewShift(a, now); a.notes.forEach((n) => consider(n, s)); }
  if (pmin > pmax) { pmin = 54; pmax = 78; }
  const mid = (pmin + pmax) / 2;
  const half = Math.max(12, (pmax - pmin) / 2 + 2);
  const top = mid + half, bottom = mid - half;
  const y = (p) => ((top - p) / (top - bottom)) * (h - 14);
  const rowH = Math.max(2, (h - 14) / (top - bottom) - 1);

  ctx.fillStyle = "#0d1015";
  ctx.fillRect(0, 0, w, h);
  // the grid: beats faint, bars strong and numbered
  const bar = view.clock ? view.clock.bar : 4;
  ctx.font = "10px ui-monospace, monospace";
  for (let b = Math.ceil(lo); b <= lo + span; b++) {
    const isBar = Math.abs(b / bar - Math.round(b / bar)) < 1e-6;
    ctx.strokeStyle = isBar ? "#3a4352" : "#1e242d";
    ctx.beginPath(); ctx.moveTo(x(b), 0); ctx.lineTo(x(b), h - 14); ctx.stroke();
    if (isBar) { ctx.fillStyle = "#8a94a3"; ctx.fillText(String(Math.round(b / bar) + 1), x(b) + 2, h - 3); }
  }
  const css = getComputedStyle(document.documentElement);
  const perfColour = css.getPropertyValue("--performer").trim() || "#4da3ff";
  const machColour = css.getPropertyValue("--machine").trim() || "#ff9f43";
  const box = (n, shift, fill, colour) => {
    const x0 = x(n.on + shift);
    const x1 = x((n.off === null ? now : n.off) + shift);
    const yy = y(n.pitch) - rowH / 2;
    if (fill) {
      ctx.fillStyle = colour;
      ctx.fillRect(x0, yy, Math.max(2, x1 - x0), rowH);
    } else {
      ctx.strokeStyle = colour;
      ctx.setLineDash([4, 3]);
      ctx.strokeRect(x0 + 0.5, yy + 0.5, Math.max(2, x1 - x0 - 1), rowH - 1);
      ctx.setLineDash([]);
    }
  };
  for (const n of view.performer) if (visible(n)) box(n, 0, true, perfColour);
  for (const n of view.machine) if (visible(n)) box(n, 0, true, machColour);
  for (const a of view.answers.values()) {
    const shift = previewShift(a, now);
    let shown = false;
    for (const n of a.notes) {
      if (!visible(n, shift)) continue;
      box(n, shift, n.filled, machColour);
      shown = true;
    }
    if (shown && view.drawn[a.id] === undefined) view.drawn[a.id] = Date.now();
  }
  // the playhead
  ctx.strokeStyle = "#dde3ea";
  ctx.beginPath(); ctx.moveTo(x(now), 0); ctx.lineTo(x(now), h - 14); ctx.stroke();
}

function drawNovelty() {
  const [ctx, w, h] = fitCanvas($("novelty"));
  ctx.fillStyle = "#0d1015";
  ctx.fillRect(0, 0, w, h);
  const now = serverNow();
  const first = view.readouts.length ? view.readouts[0].t : now;
  const window_s = Math.min(NOVELTY_S, Math.max(30, now - first + 5));
  const t0 = now - window_s;
  const left = 120, right = w - 8;
  const x = (t) => left + ((t - t0) / window_s) * (right - left);
  const strip = (h - 16) / METRICS.length;
  ctx.font = "11px system-ui, sans-serif";
  METRICS.forEach(([key, label, fixed, least], i) => {
    const top = i * strip + 4, bottom = top + strip - 6;
    let hi = fixed;
    if (hi === null) {
      hi = least;
      for (const r of view.readouts) if (r[key] > hi) hi = r[key];
    }
    // behind: the divergence knob over time, 0..1 over the strip's height
    ctx.fillStyle = "rgba(138,148,163,0.22)";
    ctx.beginPath();
    ctx.moveTo(left, bottom);
    let d = null;
    for (const k of view.knob) {
      if (k.t <= t0) { d = k.d; continue; }
      if (d !== null) { ctx.lineTo(x(k.t), bottom - d * (bottom - top)); }
      else { ctx.lineTo(x(k.t), bottom); }
      d = k.d;
      ctx.lineTo(x(k.t), bottom - d * (bottom - top));
    }
    if (d !== null) ctx.lineTo(right, bottom - d * (bottom - top));
    ctx.lineTo(right, bottom);
    ctx.closePath();
    ctx.fill();
    ctx.strokeStyle = "#2b313c";
    ctx.strokeRect(left, top, right - left, bottom - top);
    ctx.fillStyle = "#8a94a3";
    ctx.fillText(label, 4, top + 12);
    ctx.fillText(`0..${Number(hi.toFixed(2))}`, 4, top + 26);
    // the readouts: one point per answer (-1: could not be measured, not drawn)
    ctx.fillStyle = METRICS.length && i % 2 ? "#ff9f43" : "#ffd166";
    for (const r of view.readouts) {
      const v = r[key];
      if (v === undefined || v < 0 || r.t < t0) continue;
      const px = x(r.t), py = bottom - Math.min(1, v / hi) * (bottom - top);
      ctx.beginPath(); ctx.arc(px, py, 3.5, 0, 2 * Math.PI); ctx.fill();
      if (view.readoutDrawn[r.id] === undefined) view.readoutDrawn[r.id] = Date.now();
    }
  });
  ctx.fillStyle = "#8a94a3";
  ctx.fillText(`last ${Math.round(window_s)} s`, right - 60, h - 3);
}

function frame() {
  try {
    drawRoll();
    drawNovelty();
  } catch (e) {
    console.error(e);
  }
  requestAnimationFrame(frame);
}

// takes change when a take is written: ask now and then, cheaply
setInterval(() => { if (view.connected) loadTakes(); }, 5000);
connect();
requestAnimationFrame(frame);
