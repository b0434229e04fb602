// ray-galaxy latent explorer. Plain script, no build step, no requests beyond this app:
// every URL is relative to <base href>, i.e. to the Serve app's route prefix. When the server
// has a token, the page was opened once as ?token=...; the server then keeps it in a
// same-site cookie, which fetch() sends along (credentials: "same-origin"). An endpoint that
// serves several models gets the chosen one's name in every request (?model= or "model").
"use strict";

const PAD = 2;            // figures.grid: pixels between and around tiles
const SLIDER_RANGE = 4;   // slider span in prior standard deviations
const DEFAULT_SLIDERS = 12;
const DEBOUNCE_MS = 30;
// Properties with range controls (of the nine /info lists): size, brightness, shape, colour.
const RANGE_PROPERTIES = ["r50_px", "flux", "ellipticity", "colour"];

const $ = (id) => document.getElementById(id);
const state = {
  models: [],     // the names /models lists, when there are several
  info: null,
  z: [],          // the current latent code (full precision; sliders show it rounded)
  shown: [],      // latent dims that have a slider, most used first
  a: null, b: null,
  traversal: null, interpolation: null,  // what the figures on screen were drawn from
};

// ------------------------------------------------------------------ HTTP

async function api(path, options = {}) {
  const resp = await fetch(path, { credentials: "same-origin", ...options });
  if (!resp.ok) {
    let message = `HTTP ${resp.status}`;
    try { message = (await resp.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(`${path.split("?")[0]}: ${message}`);
  }
  return resp;
}

// The chosen model as a request parameter; none where the endpoint serves one model.
function modelParam() {
  return state.models.length > 1 ? { model: $("model").value } : {};
}

function query(params = {}) { return new URLSearchParams({ ...params, ...modelParam() }); }

function postJSON(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" },
                     body: JSON.stringify({ ...body, ...modelParam() }) });
}

function setStatus(text, error = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", error);
}

function showBlob(img, blob) {
  const old = img.src;
  img.src = URL.createObjectURL(blob);
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
}

// ------------------------------------------------------------------ live decoding
// At most one /decode request is in flight. Slider events only mark the code dirty; the
// running request, when it returns, sends the latest code. So a fast drag never queues a
// backlog of stale requests, and the image always ends on the code the sliders show.

const live = { dirty: false, busy: false, timer: 0, pending: 0 };

// aria-busy stays "true" while a decode or any other request (a code, a figure) is pending,
// so a reader (or a test) that waits for "false" sees a page whose state has settled.
function markBusy() {
  $("view").setAttribute("aria-busy", String(live.dirty || live.busy || live.pending > 0));
}

async function tracked(promise) {
  live.pending += 1;
  markBusy();
  try { return await promise; } finally { live.pending -= 1; markBusy(); }
}

// Each kind of request keeps a counter: only the answer to the latest one is applied, so a
// slow earlier answer (a seed, a figure) cannot overwrite a newer one when it lands late.
const latest = { latent: 0, interp: 0, traverse: 0 };

function scheduleDecode() {
  live.dirty = true;
  markBusy();
  clearTimeout(live.timer);
  live.timer = setTimeout(pump, DEBOUNCE_MS);
}

async function pump() {
  if (live.busy) return;
  live.busy = true;
  try {
    while (live.dirty) {
      live.dirty = false;
      const z = state.z.slice();
      const t0 = performance.now();
      const blob = await (await postJSON("decode", { z })).blob();
      showBlob($("galaxy"), blob);
      setStatus(`decoded in ${Math.round(performance.now() - t0)} ms`);
    }
  } catch (err) {
    live.dirty = false;
    setStatus(err.message, true);
  } finally {
    live.busy = false;
    markBusy();
  }
}

// ------------------------------------------------------------------ the latent code

function fmt(v) { return (v >= 0 ? "+" : "") + v.toFixed(2); }

function buildSliders() {
  const info = state.info;
  const count = Number($("dimcount").value) || Math.min(DEFAULT_SLIDERS, info.latent_dim);
  state.shown = info.dims_by_activity.slice(0, count);
  const box = $("sliders");
  box.replaceChildren();
  for (const d of state.shown) {
    const row = document.createElement("div");
    row.className = "slider";
    const label = document.createElement("label");
    label.htmlFor = `z${d}`;
    label.textContent = `z${d}`;
    const input = document.createElement("input");
    Object.assign(input, { type: "range", id: `z${d}`, min: -SLIDER_RANGE, max: SLIDER_RANGE, step: 0.01 });
    input.dataset.dim = d;
    const out = document.createElement("output");
    out.htmlFor = input.id;
    input.addEventListener("input", () => {
      state.z[d] = Number(input.value);
      out.textContent = fmt(state.z[d]);
      showVector();
      scheduleDecode();
    });
    row.append(label, input, out);
    box.append(row);
  }
  syncSliders();
}

function syncSliders() {
  for (const d of state.shown) {
    const input = $(`z${d}`);
    // A sampler's code can lie past the default span: widen that slider rather than clip it.
    const span = Math.max(SLIDER_RANGE, Math.ceil(Math.abs(state.z[d])));
    if (span > Number(input.max)) Object.assign(input, { min: -span, max: span });
    input.value = String(state.z[d]);
    input.nextElementSibling.textContent = fmt(state.z[d]);
  }
  showVector();
}

function showVector() { $("zvec").value = JSON.stringify(state.z); }

function setCode(z) {
  state.z = z.map(Number);
  syncSliders();
  scheduleDecode();
}

// The class a seed's code is drawn from: "" (any) unless the model's sampler was fitted with
// labels and is the one in use (the prior has no classes).
function labelParam() {
  const select = $("label");
  return !select.disabled && select.value ? { label: select.value } : {};
}

function syncLabelBox() {
  const labels = state.info.labels || [], prior = $("sampler").value === "prior";
  $("label").disabled = !labels.length || prior;
  $("label-note").textContent = !labels.length ? "this model was trained without labels"
    : prior ? "classes need the GMM sampler" : "";
}

// ------------------------------------------------------------------ property ranges
// Each control is "from" and "to" boxes (empty: open); together they make the server's where=
// expression, e.g. "r50_px >= 6 and ellipticity <= 0.3", and the seed's code is drawn near
// the training galaxies that satisfy it. Too few matches is the server's 422, shown as status.

function buildRanges() {
  const props = state.info.properties || {};
  const box = $("ranges");
  box.replaceChildren();
  for (const name of RANGE_PROPERTIES.filter((p) => props[p]?.min != null)) {
    const { min, max, unit } = props[name];
    const row = document.createElement("div");
    row.className = "range";
    const label = document.createElement("label");
    label.htmlFor = `from-${name}`;
    label.textContent = name;
    label.title = unit;
    const bound = (side, hint) => {
      const input = Object.assign(document.createElement("input"),
        { type: "number", id: `${side}-${name}`, placeholder: hint, step: "any" });
      input.setAttribute("aria-label", `${name} ${side}`);
      input.addEventListener("change", () => { syncWhereBox(); report(loadSeed(currentSeed())); });
      return input;
    };
    const dash = Object.assign(document.createElement("span"), { textContent: "–", className: "hint" });
    const short = (v) => String(Number(v.toPrecision(3)));  // 3 digits, never 1.23e+3
    row.append(label, bound("from", short(min)), dash, bound("to", short(max)));
    box.append(row);
  }
  $("where-box").hidden = !box.children.length;
  syncWhereBox();
}

function whereExpression() {
  const terms = [];
  for (const input of $("ranges").querySelectorAll("input")) {
    if (input.value.trim() === "" || !Number.isFinite(Number(input.value))) continue;
    const [side, name] = input.id.split(/-(.*)/s);
    terms.push(`${name} ${side === "from" ? ">=" : "<="} ${Number(input.value)}`);
  }
  return terms.join(" and ");
}

function whereParam() {
  const where = whereExpression();
  return where && $("sampler").value !== "prior" ? { where } : {};
}

function syncWhereBox() {
  const prior = $("sampler").value === "prior", where = whereExpression();
  for (const input of $("ranges").querySelectorAll("input")) input.disabled = prior;
  $("where-note").textContent = prior ? "property ranges need the GMM sampler"
    : where ? `where ${where}` : "placeholders: the training galaxies' range";
}

function currentSeed() { return Math.max(0, Math.floor(Number($("seed").value) || 0)); }

async function loadSeed(seed) {
  const params = query({ seed: String(seed), temperature: $("temperature").value,
                         sampler: $("sampler").value, ...labelParam(), ...whereParam() });
  const ticket = ++latest.latent;
  const body = await (await api(`latent?${params}`)).json();
  if (ticket !== latest.latent) return body.z;  // a newer seed was asked for meanwhile
  $("seed").value = String(body.seed);
  setCode(body.z);
  return body.z;
}

// ------------------------------------------------------------------ figures

function tileAt(img, event, cols, rows) {
  // Map a click on the scaled image to the (row, col) of a figures.grid tile.
  const size = state.info.image_size;
  const scale = img.naturalWidth / img.clientWidth;
  const x = event.offsetX * scale - PAD / 2, y = event.offsetY * scale - PAD / 2;
  const clamp = (v, n) => Math.max(0, Math.min(n - 1, Math.floor(v / (size + PAD))));
  return [clamp(y, rows), clamp(x, cols)];
}

function slerp(a, b, steps) {
  // The same path as the server's slerp (serve.py), so a clicked tile gets the code it shows.
  const dot = a.reduce((s, v, i) => s + v * b[i], 0);
  const na = Math.hypot(...a), nb = Math.hypot(...b);
  const out = [];
  for (let k = 0; k < steps; k++) {
    const t = k / (steps - 1);
    let wa = 1 - t, wb = t;
    if (na > 0 && nb > 0) {
      const omega = Math.acos(Math.max(-1, Math.min(1, dot / (na * nb))));
      const so = Math.sin(omega);
      if (so > 1e-6) { wa = Math.sin((1 - t) * omega) / so; wb = Math.sin(t * omega) / so; }
    }
    out.push(a.map((v, i) => wa * v + wb * b[i]));
  }
  return out;
}

async function drawInterpolation() {
  if (!state.a || !state.b) return;
  const steps = Math.max(2, Math.min(16, Number($("interp-steps").value) || 8));
  const ticket = ++latest.interp;
  const blob = await (await postJSON("interpolate", { from: state.a, to: state.b, steps })).blob();
  if (ticket !== latest.interp) return;
  state.interpolation = { codes: slerp(state.a, state.b, steps), steps };
  showBlob($("interp"), blob);
}

async function drawTraversal() {
  const a = Number($("dim-a").value), b = Number($("dim-b").value);
  if (a === b) { setStatus("traversal: pick two different dimensions", true); return; }
  const steps = Math.max(2, Math.min(12, Number($("trav-steps").value) || 7));
  const span = Number($("trav-range").value) || 3;
  const center = $("trav-center").checked ? state.z.slice() : state.z.map(() => 0);
  const params = query({ dims: `${a},${b}`, steps: String(steps), range: String(span), center: center.join(",") });
  const ticket = ++latest.traverse;
  const blob = await (await api(`traverse?${params}`)).blob();
  if (ticket !== latest.traverse) return;
  const values = Array.from({ length: steps }, (_, i) => -span + (2 * span * i) / (steps - 1));
  state.traversal = { a, b, values, center, steps };
  showBlob($("traverse"), blob);
}

function report(promise) { tracked(promise).catch((err) => setStatus(err.message, true)); }

// ------------------------------------------------------------------ model info

function showInfo(info) {
  const best = info.metrics?.best || {}, data = info.metrics?.data || {};
  const rows = [
    ["name", info.name], ["version", info.version], ["latent dim", info.latent_dim],
    ["image size", `${info.image_size} px`], ["samplers", info.samplers.join(", ")],
    ["classes", (info.labels || []).join(", ") || "none"],
    ["best epoch", info.metrics?.best_epoch ?? "–"], ["epochs run", info.metrics?.epochs_run ?? "–"],
  ];
  for (const [k, v] of Object.entries(best)) if (k !== "epoch") rows.push([k, Number(v).toPrecision(4)]);
  for (const [k, v] of Object.entries(data)) rows.push([`data ${k}`, v]);
  const list = $("info-list");
  list.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = String(v);
    list.append(dt, dd);
  }
}

function fillSelect(select, values, label, selected) {
  select.replaceChildren(...values.map((v) => new Option(label(v), String(v), false, v === selected)));
}

// ------------------------------------------------------------------ start

// Everything that depends on the model: the info panel, the selectors, the sliders and the
// first view (seed 0, an interpolation from it to seed 1, the traversal around it).
async function loadModel() {
  for (const k of Object.keys(latest)) latest[k] += 1;  // answers for the previous model are stale
  const info = await (await api(`info?${query()}`)).json();
  state.info = info;
  document.title = `${info.name} · ray-galaxy latent explorer`;
  showInfo(info);

  fillSelect($("sampler"), info.samplers, (s) => (s === "gmm" ? "GMM (fitted to training codes)" : "prior N(0, I)"),
             info.samplers.includes("gmm") ? "gmm" : "prior");
  $("sampler-box").hidden = info.samplers.length < 2;
  fillSelect($("label"), [""].concat(info.labels || []), (l) => l || "any class", "");
  syncLabelBox();
  buildRanges();
  $("dimcount").replaceChildren();
  $("dimcount-box").hidden = info.latent_dim <= DEFAULT_SLIDERS;
  if (info.latent_dim > DEFAULT_SLIDERS) {
    const counts = [DEFAULT_SLIDERS, 24, 48].filter((c) => c < info.latent_dim).concat([info.latent_dim]);
    fillSelect($("dimcount"), counts, (c) => (c === info.latent_dim ? `all ${c}` : `first ${c}`), DEFAULT_SLIDERS);
  }
  const dims = [...Array(info.latent_dim).keys()];
  // The traversal starts on the two most used dimensions: the first two sliders.
  const [ta, tb] = info.dims_by_activity.length >= 2 ? info.dims_by_activity : (info.traverse_dims || [0, 0]);
  fillSelect($("dim-a"), dims, (d) => `z${d}`, ta);
  fillSelect($("dim-b"), dims, (d) => `z${d}`, tb ?? ta);

  state.z = new Array(info.latent_dim).fill(0);
  state.interpolation = state.traversal = null;
  buildSliders();

  const first = query({ seed: "1", sampler: $("sampler").value, ...labelParam(), ...whereParam() });
  state.b = (await (await api(`latent?${first}`)).json()).z;
  state.a = await loadSeed(Number($("seed").value) || 0);
  await Promise.all([drawInterpolation(), drawTraversal()]);
}

function bindControls() {
  $("model").addEventListener("change", () => report(loadModel()));
  $("dimcount").addEventListener("change", buildSliders);
  $("random").addEventListener("click", () => report(loadSeed(Math.floor(Math.random() * 1e9))));
  $("sampler").addEventListener("change", () => { syncLabelBox(); syncWhereBox(); });
  for (const id of ["seed", "temperature", "sampler", "label"]) {
    $(id).addEventListener("change", () => report(loadSeed(currentSeed())));
  }
  $("apply-z").addEventListener("click", () => {
    try {
      const z = JSON.parse($("zvec").value), n = state.info.latent_dim;
      if (!Array.isArray(z) || z.length !== n || !z.every(Number.isFinite)) {
        throw new Error(`need a JSON list of ${n} numbers`);
      }
      setCode(z);
    } catch (err) { setStatus(`latent vector: ${err.message}`, true); }
  });
  $("set-a").addEventListener("click", () => { state.a = state.z.slice(); report(drawInterpolation()); });
  $("set-b").addEventListener("click", () => { state.b = state.z.slice(); report(drawInterpolation()); });
  $("interp-steps").addEventListener("change", () => report(drawInterpolation()));
  $("interp").addEventListener("click", (event) => {
    const fig = state.interpolation;
    if (!fig) return;
    const [, col] = tileAt($("interp"), event, fig.steps, 1);
    setCode(fig.codes[col]);
  });
  for (const id of ["dim-a", "dim-b", "trav-range", "trav-steps", "trav-center"]) {
    $(id).addEventListener("change", () => report(drawTraversal()));
  }
  $("draw-trav").addEventListener("click", () => report(drawTraversal()));
  $("traverse").addEventListener("click", (event) => {
    const fig = state.traversal;
    if (!fig) return;
    const [row, col] = tileAt($("traverse"), event, fig.steps, fig.steps);
    const z = fig.center.slice();
    z[fig.a] = fig.values[row];
    z[fig.b] = fig.values[col];
    setCode(z);
  });
}

async function start() {
  const listing = await (await api("models")).json();
  const byName = Object.fromEntries(listing.models.map((m) => [m.name, m]));
  state.models = Object.keys(byName);
  fillSelect($("model"), state.models, (n) => `${n} (latent ${byName[n].latent_dim}, ${byName[n].image_size} px)`,
             listing.default);
  $("model-box").hidden = state.models.length < 2;
  bindControls();
  await tracked(loadModel());
}

start().catch((err) => setStatus(err.message, true));
