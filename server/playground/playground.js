// The playground: pick a served model, draw a digit or drop an image, send it to POST /predict as any client would,
// and show the label, the probabilities and the attribution map. No build step, nothing fetched but this server's
// own API.
"use strict";

const $ = (id) => document.getElementById(id);
const pad = $("pad");
const map = $("map");
const ink = pad.getContext("2d");
const STROKE = 20; // pixels of 280: about 2 of MNIST's 28

let models = []; // from /v1/models, the default first
let classes = null; // the picked model's
let source = { kind: "drawing", file: null, image: null }; // what Predict sends
let drawing = null; // the pointer being drawn with
let lastMap = null;

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// -- errors: the server's one JSON shape {"error": {"code", "message", "field"}}, shown as text ---------------------

async function readError(response) {
  let detail = null;
  try {
    detail = (await response.json()).error;
  } catch (_) {
    detail = null;
  }
  const retry = response.headers.get("Retry-After");
  return {
    status: response.status,
    code: detail ? detail.code : "http_" + response.status,
    message: detail ? detail.message : response.statusText || "the server answered without a JSON error",
    field: detail ? detail.field : null,
    retry: retry,
  };
}

function showError(e) {
  const box = $("error");
  box.replaceChildren();
  const title = document.createElement("strong");
  const hints = {
    401: "enter a valid API key above",
    403: "this key is suspended",
    413: "the image is too large for this server",
    422: "the server could not use this input",
    429: "this key's query budget is spent",
    503: "the server is busy or still starting",
  };
  title.textContent = e.status ? `${e.status} — ${hints[e.status] || "refused"}` : "no answer";
  const text = document.createElement("div");
  text.textContent = e.message + (e.retry ? ` (retry after ${e.retry} s)` : "");
  const code = document.createElement("code");
  code.textContent = e.status ? `code: ${e.code}` + (e.field ? `, field: ${e.field}` : "") : e.code;
  box.append(title, text, code);
  box.hidden = false;
  if (e.status === 401) $("key-row").hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

// -- what is served: /v1/models -------------------------------------------------------------------------------

async function loadModels() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers(false) });
  } catch (err) {
    showError({ status: 0, code: String(err), message: "the server could not be reached" });
    return;
  }
  if (!response.ok) {
    const e = await readError(response);
    $("served").textContent = e.status === 401 ? "This server needs an API key." : "The model is not available yet.";
    showError(e);
    if (e.status === 503) setTimeout(loadModels, 1000 * Number(e.retry || 2));
    return;
  }
  clearError();
  models = (await response.json()).models;
  const picker = $("model");
  const picked = picker.value; // kept when the list is read again (a new API key)
  picker.replaceChildren(
    ...models.map((m) => {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = `${m.name} (${m.dataset})`;
      return option;
    }),
  );
  if (models.some((m) => m.name === picked)) picker.value = picked;
  $("model-row").hidden = models.length < 2;
  showModel();
}

// The picked model: its description, classes and card; an answer of another model is cleared.
function showModel() {
  const model = models.find((m) => m.name === $("model").value) || models[0];
  classes = model.classes;
  const gate = model.defense.settings.gate ? ` with the misinformation gate (${model.defense.settings.gate})` : "";
  $("served").textContent =
    `Model ${model.name} (${model.dataset}) · defense ${model.defense.name}${gate} · interpreter ${model.interpreter}`;
  $("served").dataset.model = model.name;
  $("served").dataset.defense = model.defense.name;
  $("served").dataset.interpreter = model.interpreter;
  $("card").hidden = true;
  if (model.card) showCard(model.card);
  $("label").textContent = "–";
  delete $("label").dataset.label;
  delete $("label").dataset.model;
  map.getContext("2d").clearRect(0, 0, map.width, map.height);
  lastMap = null;
  $("method").textContent = "";
  drawBars(null);
}

$("model").addEventListener("change", showModel);

function showCard(card) {
  $("card-summary").textContent = card.summary;
  const list = (id, items) =>
    $(id).replaceChildren(
      ...items.map((t) => {
        const li = document.createElement("li");
        li.textContent = t;
        return li;
      }),
    );
  list("card-not-for", card.not_meant_for);
  list("card-answers", card.answers);
  $("card").hidden = false;
}

// -- the input: a drawing, or a dropped or picked image -----------------------------------------------------------

function clearPad() {
  ink.fillStyle = "#000";
  ink.fillRect(0, 0, pad.width, pad.height); // opaque black: no alpha for the server to drop
  map.getContext("2d").clearRect(0, 0, map.width, map.height);
  source = { kind: "drawing", file: null, image: null };
  lastMap = null;
  $("source").textContent = "Draw one digit, white on black like MNIST, inside the dashed box.";
  $("label").textContent = "–";
  delete $("label").dataset.label;
  drawBars(null);
  clearError();
}

function point(event) {
  const box = pad.getBoundingClientRect();
  return [((event.clientX - box.left) * pad.width) / box.width, ((event.clientY - box.top) * pad.height) / box.height];
}

pad.addEventListener("pointerdown", (event) => {
  if (source.kind !== "drawing") clearPad();
  drawing = { id: event.pointerId, at: point(event) };
  pad.setPointerCapture(event.pointerId);
  ink.fillStyle = "#fff";
  ink.beginPath();
  ink.arc(drawing.at[0], drawing.at[1], STROKE / 2, 0, 2 * Math.PI);
  ink.fill();
  event.preventDefault();
});

pad.addEventListener("pointermove", (event) => {
  if (!drawing || drawing.id !== event.pointerId) return;
  const to = point(event);
  ink.strokeStyle = "#fff";
  ink.lineWidth = STROKE;
  ink.lineCap = "round";
  ink.lineJoin = "round";
  ink.beginPath();
  ink.moveTo(drawing.at[0], drawing.at[1]);
  ink.lineTo(to[0], to[1]);
  ink.stroke();
  drawing.at = to;
  event.preventDefault();
});

for (const end of ["pointerup", "pointercancel"]) {
  pad.addEventListener(end, () => {
    drawing = null;
  });
}

// The image as the model sees it: squeezed to the square (the server does not keep the aspect ratio), inverted
// when the option is on. What is sent is the file itself; the server does the converting and resizing.
function showImage() {
  ink.save();
  ink.filter = $("invert").checked ? "invert(1)" : "none";
  ink.fillStyle = "#fff";
  ink.fillRect(0, 0, pad.width, pad.height);
  ink.drawImage(source.image, 0, 0, pad.width, pad.height);
  ink.restore();
}

async function useFile(file) {
  if (!file) return;
  clearPad();
  if (!["image/png", "image/jpeg"].includes(file.type)) {
    showError({ status: 0, code: file.type || "unknown type", message: "only PNG and JPEG images are served" });
    return;
  }
  try {
    source = { kind: "file", file: file, image: await createImageBitmap(file) };
  } catch (_) {
    source = { kind: "file", file: file, image: null };
  }
  if (source.image) showImage();
  $("source").textContent = `${file.name}, shown as the model sees it: squeezed to a square` +
    ($("invert").checked ? ", inverted." : ". Dark strokes on a light background? Tick “invert light background”.");
}

$("file").addEventListener("change", () => useFile($("file").files[0]));
$("invert").addEventListener("change", () => {
  if (source.kind === "file") useFile(source.file); // shown again, inverted or not; the answer is cleared
});
const stack = $("stack");
stack.addEventListener("dragover", (event) => {
  event.preventDefault();
  stack.classList.add("dragging");
  $("drop-hint").hidden = false;
});
stack.addEventListener("dragleave", () => {
  stack.classList.remove("dragging");
  $("drop-hint").hidden = true;
});
stack.addEventListener("drop", (event) => {
  event.preventDefault();
  stack.classList.remove("dragging");
  $("drop-hint").hidden = true;
  useFile(event.dataTransfer.files[0]);
});

function fileBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// -- the answer -----------------------------------------------------------------------------------------------

function drawBars(probabilities) {
  const bars = $("bars");
  bars.replaceChildren();
  if (!classes) return;
  const top = probabilities ? probabilities.indexOf(Math.max(...probabilities)) : -1;
  classes.forEach((name, i) => {
    const p = probabilities ? probabilities[i] : 0;
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    const track = document.createElement("span");
    track.className = "track" + (i === top ? " top" : "");
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = probabilities ? `${(100 * p).toFixed(1)}%` : "";
    bars.append(label, track, value);
  });
}

// Positive attribution as a heat overlay: transparent where the map is 0, red to yellow as it grows.
function drawMap(attribution) {
  const ctx = map.getContext("2d");
  ctx.clearRect(0, 0, map.width, map.height);
  if (!attribution || !$("show-map").checked) return;
  const [h, w] = attribution.shape;
  const values = attribution.values.flat();
  const peak = Math.max(...values.map(Math.abs)) || 1;
  const small = document.createElement("canvas");
  small.width = w;
  small.height = h;
  const image = small.getContext("2d").createImageData(w, h);
  values.forEach((v, i) => {
    const t = Math.max(0, v) / peak; // below a tenth of the peak: transparent; the peak: yellow, 75% opaque
    image.data[4 * i] = 255;
    image.data[4 * i + 1] = Math.round(40 + 200 * t);
    image.data[4 * i + 2] = 0;
    image.data[4 * i + 3] = t < 0.1 ? 0 : Math.round(40 + 150 * t);
  });
  small.getContext("2d").putImageData(image, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, map.width, map.height);
}

$("show-map").addEventListener("change", () => drawMap(lastMap));

async function predict() {
  clearError();
  const button = $("predict");
  button.disabled = true;
  try {
    const image = source.kind === "file" ? await fileBase64(source.file) : pad.toDataURL("image/png").split(",", 2)[1];
    const body = { instances: [{ image_b64: image }], explain: true, invert: source.kind === "file" && $("invert").checked };
    if (models.length) body.model = $("model").value; // the model the answer's classes are read with
    let response;
    try {
      response = await fetch("/predict", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    } catch (err) {
      showError({ status: 0, code: String(err), message: "the server could not be reached" });
      return;
    }
    if (!response.ok) {
      showError(await readError(response));
      return;
    }
    const reply = await response.json();
    const answer = reply.predictions[0];
    if (!classes) await loadModels();
    $("label").textContent = answer.class_name; // the answering model's name of the class
    $("label").dataset.label = String(answer.label);
    $("label").dataset.model = reply.model;
    drawBars(answer.probabilities);
    lastMap = answer.attribution || null;
    drawMap(lastMap);
    $("method").textContent = lastMap ? `attribution map: ${lastMap.method}, positive values shown` : "";
  } finally {
    button.disabled = false;
  }
}

$("predict").addEventListener("click", predict);
$("clear").addEventListener("click", clearPad);
$("api-key").addEventListener("change", loadModels);

clearPad();
loadModels();
