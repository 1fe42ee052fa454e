// scopecast live viewer: frames arrive as binary WebSocket messages (raw pixels + JSON header),
// contrast is applied here so changing it is instant; each frame is acknowledged once drawn,
// and the viewer sends the next (newest) one only then.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const PANES = ["raw", "enhanced"];
  const ARRAYS = { uint8: Uint8Array, uint16: Uint16Array, uint32: Uint32Array, float32: Float32Array };

  // the token arrives once in the URL; the page keeps it for reconnects and hides it from the bar
  const token = new URLSearchParams(location.search).get("token");
  if (token) history.replaceState(null, "", location.pathname);

  const state = {
    ws: null,
    connected: false,
    keys: [],
    key: null,
    status: null,
    view: { s: 1, tx: 0, ty: 0 },
    panes: Object.fromEntries(PANES.map((name) => [name, {
      name,
      canvas: $(`canvas-${name}`),
      caption: $(`cap-${name}`),
      frame: null,
      meta: null,
      image: null,
      lut: null,
      range: null,
      shown: 0,
      drawn: [],
      lastAt: 0,
    }])),
  };

  // ---- connection -------------------------------------------------------------------------

  function connect() {
    const url = new URL("ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = token ? `?token=${encodeURIComponent(token)}` : "";
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => { state.connected = true; renderState(); };
    ws.onmessage = (e) => (typeof e.data === "string" ? onText(JSON.parse(e.data)) : onFrame(e.data));
    ws.onclose = () => {
      state.connected = false;
      state.ws = null;
      renderState();
      setTimeout(connect, 1000);
    };
    state.ws = ws;
  }

  function send(msg) {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(msg));
  }

  function onText(msg) {
    if (msg.type === "keys") onKeys(msg.keys);
    else if (msg.type === "status") { state.status = msg; renderStats(); }
  }

  // ---- frames -----------------------------------------------------------------------------

  function onFrame(buf) {
    const length = new DataView(buf).getUint32(0, true);
    const meta = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, length)));
    const pane = state.panes[meta.pane];
    const count = meta.shape.reduce((a, b) => a * b, 1);
    try {
      if (pane && meta.key === state.key && ARRAYS[meta.dtype]) {
        pane.frame = new ARRAYS[meta.dtype](buf, 4 + length, count);
        pane.meta = meta;
        pane.shown += 1;
        pane.lastAt = performance.now();
        pane.drawn.push(pane.lastAt);
        draw(pane);
        renderCaption(pane);
        if (meta.pane === "enhanced") { drawOverlay(); renderFrameStats(meta); }
      }
    } finally {
      send({ ack: meta.pane }); // whatever happened, the next frame may come
    }
  }

  function draw(pane) {
    const { frame, meta, canvas } = pane;
    if (!frame) return;
    const [h, w, comps = 1] = meta.shape;
    if (canvas.width !== w || canvas.height !== h) {
      canvas.width = w;
      canvas.height = h;
      pane.image = null;
    }
    if (!pane.image) pane.image = new ImageData(w, h);
    if (pane.name === "enhanced") document.documentElement.style.setProperty("--aspect", `${w / h}`);
    const [lo, hi] = displayRange(frame);
    pane.range = [lo, hi];
    const gamma = Number($("gamma").value);
    const out = new Uint32Array(pane.image.data.buffer);
    const n = w * h;
    const integer = frame instanceof Uint8Array || frame instanceof Uint16Array;
    const grey = integer ? lutFor(pane, lo, hi, gamma, frame instanceof Uint8Array ? 256 : 65536) : null;
    const curve = integer ? null : gammaCurve(gamma);
    const level = integer
      ? (v) => grey[v]
      : (v) => { const t = (v - lo) / (hi - lo); return curve[t > 0 ? (t < 1 ? (t * 4095) | 0 : 4095) : 0]; };
    if (comps >= 3) {
      for (let i = 0, j = 0; i < n; i++, j += comps) {
        out[i] = 0xff000000 | (level(frame[j + 2]) << 16) | (level(frame[j + 1]) << 8) | level(frame[j]);
      }
    } else if (integer && comps === 1) {
      for (let i = 0; i < n; i++) out[i] = 0xff000000 | (grey[frame[i]] * 0x010101);
    } else {
      for (let i = 0, j = 0; i < n; i++, j += comps) out[i] = 0xff000000 | (level(frame[j]) * 0x010101);
    }
    canvas.getContext("2d").putImageData(pane.image, 0, 0);
  }

  function lutFor(pane, lo, hi, gamma, size) {
    const id = `${lo}:${hi}:${gamma}:${size}`;
    if (pane.lut && pane.lut.id === id) return pane.lut.table;
    const table = new Uint8Array(size);
    for (let v = 0; v < size; v++) {
      const t = Math.min(1, Math.max(0, (v - lo) / (hi - lo)));
      table[v] = Math.round(255 * Math.pow(t, gamma));
    }
    pane.lut = { id, table };
    return table;
  }

  let curveCache = null;
  function gammaCurve(gamma) {
    if (curveCache && curveCache.gamma === gamma) return curveCache.table;
    const table = new Uint8Array(4096);
    for (let i = 0; i < 4096; i++) table[i] = Math.round(255 * Math.pow(i / 4095, gamma));
    curveCache = { gamma, table };
    return table;
  }

  function displayRange(frame) {
    if ($("contrast-mode").value === "manual") {
      const lo = Number($("min").value), hi = Number($("max").value);
      return [lo, hi > lo ? hi : lo + 1];
    }
    return percentiles(frame, Number($("auto-lo").value), Number($("auto-hi").value));
  }

  let hist = null;
  function percentiles(frame, loPct, hiPct) {
    const n = frame.length;
    if (frame instanceof Uint8Array || frame instanceof Uint16Array) {
      const bins = frame instanceof Uint8Array ? 256 : 65536;
      if (!hist || hist.length !== bins) hist = new Uint32Array(bins);
      hist.fill(0);
      const step = Math.max(1, Math.floor(n / 1048576));
      let m = 0;
      for (let i = 0; i < n; i += step, m++) hist[frame[i]]++;
      const a = (loPct / 100) * m, b = (hiPct / 100) * m;
      let acc = 0, lo = -1, hi = bins - 1;
      for (let v = 0; v < bins; v++) {
        acc += hist[v];
        if (lo < 0 && acc > a) lo = v;
        if (acc >= b) { hi = v; break; }
      }
      lo = Math.max(lo, 0);
      return [lo, hi > lo ? hi : lo + 1];
    }
    const m = Math.min(n, 65536);
    const sample = new Float64Array(m);
    for (let i = 0; i < m; i++) sample[i] = frame[Math.floor((i * n) / m)];
    sample.sort();
    const finite = sample.filter(Number.isFinite);
    if (!finite.length) return [0, 1];
    const lo = finite[Math.floor((loPct / 100) * (finite.length - 1))];
    const hi = finite[Math.ceil((hiPct / 100) * (finite.length - 1))];
    return [lo, hi > lo ? hi : lo + 1e-6];
  }

  function redraw() { PANES.forEach((p) => { draw(state.panes[p]); renderCaption(state.panes[p]); }); }

  // ---- the fidelity scan's flagged regions, outlined on the enhanced pane --------------------

  // meta.fidelity.flagged (needs `serve --profile`): regions in raw pixels, row y and column x
  // of the raw frame; sign -1: the output shows structure the raw frame does not support, +1:
  // the raw frame holds structure the output lacks (calibration/fidelity.py, Region)
  const SVG = "http://www.w3.org/2000/svg";
  const SIGNS = {
    "-1": ["invented", "the enhanced frame shows structure here that the raw frame does not support"],
    "1": ["removed", "the raw frame holds structure here that the enhanced frame lacks"],
  };

  // Raw pixel x covers enhanced pixels [x * scale, (x + 1) * scale), so a region's centre is at
  // (x + 0.5) * scale in the enhanced canvas's pixel units (pixel x * scale + (scale - 1) / 2,
  // counted from pixel centres); its radius, twice the matched filter's sigma, scales likewise.
  function flaggedRegions(meta) {
    const f = meta && meta.fidelity;
    if (!f || !Array.isArray(f.flagged)) return [];
    const k = meta.scale || 1;
    return f.flagged.map((g) => ({
      ...g, cx: (g.x + 0.5) * k, cy: (g.y + 0.5) * k, r: 2 * (g.scale_px || 1) * k,
    }));
  }

  // Redrawn from the enhanced pane's own frame on every frame, zoom, pan and resize: an outline
  // never outlives the frame it came with. Screen units, so lines and labels keep their size.
  function drawOverlay() {
    const pane = state.panes.enhanced, svg = $("overlay-enhanced");
    svg.classList.toggle("off", !$("overlay").checked);
    const regions = pane.frame ? flaggedRegions(pane.meta) : [];
    svg.dataset.seq = regions.length ? pane.meta.seq : "";
    if (!regions.length) { svg.replaceChildren(); return; }
    const box = svg.getBoundingClientRect(), img = pane.canvas.getBoundingClientRect();
    const k = img.width / pane.canvas.width; // screen px per enhanced px, zoom included
    const ox = img.left - box.left, oy = img.top - box.top;
    svg.replaceChildren(...regions.map((g) => {
      const [kind, what] = SIGNS[g.sign > 0 ? "1" : "-1"];
      const x = ox + g.cx * k, y = oy + g.cy * k, r = Math.max(4, g.r * k);
      const el = (name, attrs) => {
        const e = document.createElementNS(SVG, name);
        for (const [a, v] of Object.entries(attrs)) e.setAttribute(a, String(v));
        return e;
      };
      const group = el("g", { class: `region ${kind}`, "data-x": g.cx, "data-y": g.cy, "data-z": g.z });
      const title = el("title", {});
      title.textContent = `${kind}, z ${fmt(g.z, 3)}: ${what} (raw pixel row ${g.y}, column ${g.x})`;
      const label = el("text", { x: x + r + 3, y: y + 4 });
      label.textContent = `z ${Number(g.z).toFixed(1)}`;
      group.append(title, el("circle", { cx: x, cy: y, r }), label);
      return group;
    }));
  }

  new ResizeObserver(drawOverlay).observe($("overlay-enhanced"));

  // ---- stream / position / channel / z ------------------------------------------------------

  const SELECTS = [["sel-stream", "stream"], ["sel-p", "p"], ["sel-c", "c"], ["sel-z", "z"]];

  function onKeys(keys) {
    state.keys = keys;
    const current = keys.find((k) => k.key === state.key);
    fillSelects(current || keys[0] || null);
  }

  // every selector offers what exists under the choices left of it
  function fillSelects(want) {
    let pool = state.keys;
    for (const [id, field] of SELECTS) {
      const el = $(id);
      const values = [...new Set(pool.map((k) => k[field]))].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
      const chosen = want && values.includes(want[field]) ? want[field] : values[0];
      el.replaceChildren(...values.map((v) => {
        const k = pool.find((x) => x[field] === v);
        const label = field === "c" && k.channel ? `${v} ${k.channel}` : String(v);
        return new Option(label, String(v), false, v === chosen);
      }));
      el.disabled = values.length < 2;
      pool = pool.filter((k) => k[field] === chosen);
    }
    select(pool.length ? pool[0].key : null);
  }

  function onSelectChange() {
    const want = {};
    for (const [id, field] of SELECTS) {
      const v = $(id).value;
      want[field] = field === "stream" ? v : Number(v);
    }
    fillSelects(want);
  }

  function select(key) {
    if (key !== state.key) {
      state.key = key;
      for (const p of PANES) {
        const pane = state.panes[p];
        Object.assign(pane, { frame: null, meta: null, drawn: [] });
        pane.caption.textContent = "waiting for a frame";
      }
      drawOverlay();
    }
    send({ select: key });
  }

  // ---- zoom and pan, the same for both panes -------------------------------------------------

  function applyView() {
    const { s, tx, ty } = state.view;
    for (const p of PANES) state.panes[p].canvas.style.transform = `translate(${tx}px, ${ty}px) scale(${s})`;
    $("zoom").textContent = `${s.toFixed(2)}x`;
    drawOverlay();
  }

  function clampView(width, height) {
    const v = state.view;
    v.tx = Math.min(0, Math.max(width - width * v.s, v.tx));
    v.ty = Math.min(0, Math.max(height - height * v.s, v.ty));
  }

  function resetView() { state.view = { s: 1, tx: 0, ty: 0 }; applyView(); }

  for (const vp of document.querySelectorAll(".viewport")) {
    vp.addEventListener("wheel", (e) => {
      e.preventDefault();
      const r = vp.getBoundingClientRect();
      const v = state.view;
      const s = Math.min(64, Math.max(1, v.s * Math.exp(-e.deltaY * 0.0015)));
      const f = s / v.s;
      const cx = e.clientX - r.left, cy = e.clientY - r.top;
      Object.assign(v, { s, tx: cx - (cx - v.tx) * f, ty: cy - (cy - v.ty) * f });
      clampView(r.width, r.height);
      applyView();
    }, { passive: false });
    let drag = null;
    vp.addEventListener("pointerdown", (e) => {
      drag = { x: e.clientX, y: e.clientY };
      vp.setPointerCapture(e.pointerId);
      vp.classList.add("dragging");
    });
    vp.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const r = vp.getBoundingClientRect();
      state.view.tx += e.clientX - drag.x;
      state.view.ty += e.clientY - drag.y;
      drag = { x: e.clientX, y: e.clientY };
      clampView(r.width, r.height);
      applyView();
    });
    const end = () => { drag = null; vp.classList.remove("dragging"); };
    vp.addEventListener("pointerup", end);
    vp.addEventListener("pointercancel", end);
    vp.addEventListener("dblclick", resetView);
  }

  // ---- numbers ----------------------------------------------------------------------------

  const fmt = (v, digits = 3) => (v === null || v === undefined || Number.isNaN(v) ? "-"
    : typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(digits)) : String(v));

  function shownFps(pane) {
    const now = performance.now();
    pane.drawn = pane.drawn.filter((t) => now - t < 2000);
    return pane.drawn.length / 2;
  }

  function renderCaption(pane) {
    const m = pane.meta;
    if (!m) return;
    const [h, w] = m.shape;
    const idx = Object.entries(m.index || {}).map(([k, v]) => `${k}${v}`).join(" ");
    const range = pane.range ? `display ${fmt(pane.range[0])}-${fmt(pane.range[1])}` : "";
    const age = m.wall_time ? ` age ${Math.max(0, Date.now() - m.wall_time * 1000).toFixed(0)} ms` : "";
    const engine = m.engine ? ` ${m.engine} x${m.scale}` : "";
    pane.caption.textContent = `${w}x${h} ${m.dtype} seq ${m.seq} ${idx}${engine} ${range}${age}`;
  }

  function renderFrameStats(meta) {
    const f = meta.fidelity;
    $("st-fidelity").textContent = f
      ? `${fmt(f.chi2)}${f.worst_block !== undefined ? ` (worst block ${fmt(f.worst_block)})` : ""}` +
        `${f.noise !== undefined ? ` noise ${fmt(f.noise)}` : ""}`
      : "- (no profile)";
    const flagged = f && Array.isArray(f.flagged) ? f.flagged : null;
    const invented = flagged ? flagged.filter((g) => g.sign < 0).length : 0;
    $("st-flagged").textContent = !flagged ? "-"
      : flagged.length ? `${flagged.length} (${invented} invented, ${flagged.length - invented} removed)` : "0";
    state.lastTimings = meta.timings_ms || {};
  }

  function renderStats() {
    const st = state.status;
    if (!st) return;
    // st.server is the viewer server's _brief of the engine server's status: the fields read
    // here (healthy, failure, mode, uptime_s, frames_*, latency_ms) are ServerStatus fields,
    // named, typed and described in status.schema.json beside this file (stream/status.py);
    // engine, scale and backend are flattened to strings there. tests/test_status.py checks
    // every s.NAME read here against that schema.
    const s = st.server || {};
    $("st-engine").textContent = fmt(s.engine);
    $("st-backend").textContent = (s.backend || []).join(", ") || "-";
    $("st-mode").textContent = fmt(s.mode);
    $("st-fps-raw").textContent = fmt(st.fps && st.fps.raw, 3);
    $("st-fps-enhanced").textContent = fmt(st.fps && st.fps.enhanced, 3);
    $("st-received").textContent = fmt(s.frames_received);
    $("st-enhanced").textContent = fmt(s.frames_enhanced);
    $("st-skipped").textContent = fmt(s.frames_skipped);
    $("st-missing").textContent = fmt(s.frames_missing);
    $("st-frames-flagged").textContent = fmt(s.frames_flagged);
    const ns = st.not_shown || {};
    $("st-notshown").textContent = `${fmt(ns.raw)} / ${fmt(ns.enhanced)}`;
    const v = st.viewer || {};
    $("source").textContent = `${v.publish || ""}  ${v.browsers || 0} browser${v.browsers === 1 ? "" : "s"}`;
    const timings = state.lastTimings || {};
    const rows = Object.entries(s.latency_ms || {}).map(([stage, l]) => {
      const tr = document.createElement("tr");
      if (stage === "total") tr.className = "total";
      for (const text of [stage, fmt(l.p50), fmt(l.p99), fmt(timings[stage])]) {
        const cell = document.createElement(tr.children.length ? "td" : "th");
        cell.textContent = text;
        tr.appendChild(cell);
      }
      return tr;
    });
    $("latency").tBodies[0].replaceChildren(...rows);
    renderState();
  }

  function renderState() {
    const conn = $("conn"), server = $("server-state");
    const st = state.status;
    const fresh = PANES.some((p) => performance.now() - state.panes[p].lastAt < 3000);
    let text, cls;
    if (!state.connected) [text, cls] = ["viewer not reachable, retrying", "bad"];
    else if (fresh) [text, cls] = ["live", "good"];
    else [text, cls] = [state.key ? "waiting for frames" : "no frames yet", "warn"];
    conn.textContent = text;
    conn.className = `state ${cls}`;
    if (!st || !state.connected) [text, cls] = ["-", "bad"];
    else if (st.ok && st.server.healthy === false) {
      const f = st.server.failure || {};
      [text, cls] = [`UNHEALTHY: stage ${f.stage} died (${f.error}); the server is stopping`, "bad"];
    } else if (st.ok && st.server.fidelity_mismatch) {
      // the --profile's noise model does not describe this camera (stream/server.py)
      [text, cls] = [st.server.fidelity_mismatch, "warn"];
    } else if (st.ok) [text, cls] = [`answering, up ${fmt(st.server.uptime_s, 2)} s`, "good"];
    else [text, cls] = [st.error, "bad"];
    server.textContent = text;
    server.className = `state ${cls}`;
  }

  setInterval(() => {
    $("st-shown").textContent = PANES.map((p) => shownFps(state.panes[p]).toFixed(1)).join(" / ");
    renderState();
  }, 500);

  // ---- controls ---------------------------------------------------------------------------

  for (const [id] of SELECTS) $(id).addEventListener("change", onSelectChange);
  $("contrast-mode").addEventListener("change", () => {
    const manual = $("contrast-mode").value === "manual";
    const r = state.panes.enhanced.range || state.panes.raw.range;
    if (manual && r) { $("min").value = fmt(r[0], 4); $("max").value = fmt(r[1], 4); }
    document.body.classList.toggle("manual", manual);
    redraw();
  });
  for (const id of ["auto-lo", "auto-hi", "min", "max"]) $(id).addEventListener("input", redraw);
  $("gamma").addEventListener("input", () => { $("gamma-out").textContent = Number($("gamma").value).toFixed(2); redraw(); });
  $("smooth").addEventListener("change", () => document.body.classList.toggle("smooth", $("smooth").checked));
  $("reset-view").addEventListener("click", resetView);
  $("overlay").addEventListener("change", drawOverlay);

  // what a test (or a curious user in the console) can read
  window.scopecast = {
    state,
    probe() {
      return Object.fromEntries(PANES.map((p) => {
        const { canvas, shown, meta } = state.panes[p];
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let sum = 0, sum2 = 0, hash = 0;
        for (let i = 0; i < data.length; i += 4) {
          sum += data[i];
          sum2 += data[i] * data[i];
          hash = (hash * 31 + data[i]) | 0;
        }
        const n = data.length / 4, mean = sum / n;
        return [p, { shown, seq: meta ? meta.seq : null, width: canvas.width, height: canvas.height,
          mean, std: Math.sqrt(Math.max(0, sum2 / n - mean * mean)), hash }];
      }));
    },
  };

  connect();
})();
