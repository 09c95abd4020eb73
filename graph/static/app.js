// lorafleet's page: a form over POST /v1/jobs, progress from the job's event stream, a gallery.
// Plain JS, no framework, nothing loaded from elsewhere. The server checks every value; this page
// shows what it says (error.message next to the form, the named field marked).
"use strict";

// The default model's config, and in `models` one per served model, the default first (graph/page.py).
const config = JSON.parse(document.getElementById("config").textContent);
const models = config.models ?? [config];
const $ = (id) => document.getElementById(id);
// The page is served at the application's root, which may sit under a route prefix ("/multi/"):
// every API path is relative to it.
const root = location.pathname.endsWith("/") ? location.pathname : `${location.pathname}/`;
const api = (path) => root + path;
const FAMILIES = { sd1: "SD1.x", sdxl: "SDXL", "sd1-inpaint": "SD1.x inpainting", "sdxl-inpaint": "SDXL inpainting" };

const state = {
  mode: "txt2img",        // "txt2img" | "img2img" | "inpaint"
  model: models[0],       // the chosen model's config: sizes, limits and schedulers come from it
  adapters: new Map(),    // name -> /sdapi/v1/loras entry, every model's
  chosen: [],             // [{name, scale: <input>, item: <li>}] in request order
  image: null,            // {dataUrl, img: HTMLImageElement} of the input image
  style: null,            // {dataUrl, name} of the style reference image (IP-Adapter)
  styleModels: new Map(), // model name -> whether it takes a style_image (GET /v1/models)
  job: null,              // {id, events: EventSource, finished}
};

// -- set-up ---------------------------------------------------------------------------------

function setUpForm() {
  const pick = $("model");
  for (const m of models) pick.append(new Option(`${m.model} (${familyName(m)})`, m.model));
  $("model-field").hidden = models.length < 2;  // one model: the line under the title names it
  pick.addEventListener("change", () => chooseModel(pick.value));
  for (const id of ["width", "height"]) $(id).value = state.model.default_side;
  applyModel(state.model);
  const tabs = [...document.querySelectorAll("[role=tab]")];
  for (const [i, tab] of tabs.entries()) {
    tab.addEventListener("click", () => setMode(tab.dataset.mode));
    tab.addEventListener("keydown", (e) => {  // the ARIA tabs pattern: arrows move between tabs
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (!step) return;
      const next = tabs[(i + step + tabs.length) % tabs.length];
      setMode(next.dataset.mode);
      next.focus();
    });
  }
  $("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
  $("image").addEventListener("change", loadImage);
  $("adapter-pick").addEventListener("change", describePicked);
  $("adapter-add").addEventListener("click", () => addAdapter($("adapter-pick").value));
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  setUpMask();
  setUpStyle();
}

function familyName(model) {
  return FAMILIES[model.family] ?? model.family;
}

function chooseModel(name) {
  const next = models.find((m) => m.model === name);
  if (!next || next === state.model) return;
  const previous = state.model;
  state.model = next;
  clearError();
  // A size still at the old model's native side becomes the new one's; one the person (or the input
  // image) set stays, within the new bounds.
  for (const id of ["width", "height"]) {
    const input = $(id);
    const value = Number(input.value);
    if (input.value.trim() === "" || value === previous.default_side) input.value = next.default_side;
    else if (!Number.isNaN(value)) input.value = Math.min(next.max_side, Math.max(next.min_side, value));
  }
  applyModel(next);
  renderAdapterPick();
  dropOtherModelsAdapters();
}

function applyModel(model) {
  const native = `${model.default_side}×${model.default_side}`;
  $("model-line").textContent = `Model: ${model.model} (${familyName(model)}, native ${native}). ` +
    "Text to image, image to image and inpainting with LoRA styles.";
  $("model").value = model.model;
  for (const id of ["width", "height"]) Object.assign($(id), { min: model.min_side, max: model.max_side });
  $("steps").max = model.max_steps;
  $("num_images").max = model.max_num_images;
  $("guidance_scale").max = model.max_guidance_scale;
  for (const c of state.chosen) c.scale.max = model.max_lora_scale;
  // Each model has its own default scheduler; a named one the person chose stays if this model has it.
  const scheduler = $("scheduler");
  const chosen = scheduler.value;
  scheduler.replaceChildren(...model.schedulers.map((s) =>
    new Option(s.value === "default" ? `${s.name} (the model's own)` : s.name, s.value)));
  scheduler.value = model.schedulers.some((s) => s.value === chosen) ? chosen : "default";
  renderStyle();
}

function setMode(mode) {
  state.mode = mode;
  for (const tab of document.querySelectorAll("[role=tab]")) {
    const selected = tab.dataset.mode === mode;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
  }
  $("panel-image").hidden = mode === "txt2img";
  $("panel-image").setAttribute("aria-labelledby", `tab-${mode}`);
  $("mask-tools").hidden = mode !== "inpaint" || !state.image;
  $("image-preview").hidden = mode !== "img2img" || !state.image;
  $("strength").value = mode === "inpaint" ? "1" : "0.75";  // the API's defaults per mode
  $("strength-value").textContent = $("strength").value;
  clearError();
}

// -- adapters -------------------------------------------------------------------------------

async function loadAdapters() {
  const pick = $("adapter-pick");
  let entries;
  try {
    const response = await fetch(api("sdapi/v1/loras"));
    if (!response.ok) throw new Error(await errorText(response));
    entries = await response.json();
  } catch (e) {
    pick.replaceChildren(new Option("Adapters unavailable", ""));
    $("adapter-info").textContent = `Could not load the adapter list: ${e.message}`;
    return;
  }
  state.adapters = new Map(entries.map((entry) => [entry.name, entry]));
  state.adaptersLoaded = true;
  renderAdapterPick();
}

function forModel(entry) {
  // Entries name the served model their latest version is for (null: none served); a server that does
  // not say lists only adapters for its one model.
  return !("model" in entry) || entry.model === state.model.model;
}

function renderAdapterPick() {
  if (!state.adaptersLoaded) return;
  const pick = $("adapter-pick");
  const picked = pick.value;
  const entries = [...state.adapters.values()].filter(forModel);
  const none = models.length > 1 ? `No adapters registered for ${state.model.model}` : "No adapters registered";
  pick.replaceChildren(new Option(entries.length ? "Choose a style…" : none, ""));
  for (const entry of entries) pick.append(new Option(entry.name, entry.name));
  pick.value = entries.some((e) => e.name === picked) ? picked : "";
  describePicked();
}

function dropOtherModelsAdapters() {
  const gone = state.chosen.filter((c) => !forModel(state.adapters.get(c.name)));
  for (const c of gone) c.item.remove();
  state.chosen = state.chosen.filter((c) => !gone.includes(c));
  if (gone.length) {
    const names = gone.map((c) => c.name).join(", ");
    $("adapter-info").textContent = `Removed ${names}: not for ${state.model.model}.`;
  }
}

function describePicked() {
  const entry = state.adapters.get($("adapter-pick").value);
  $("adapter-info").textContent = entry ? describe(entry) : "";
}

function describe(entry) {
  const meta = entry.metadata;
  const parts = [meta.description || "No description."];
  if (meta.trigger_words.length) parts.push(`Trigger words: ${meta.trigger_words.join(", ")}.`);
  parts.push(`Version ${meta.latest_version}.`);
  return parts.join(" ");
}

function addAdapter(name) {
  clearError();
  const entry = state.adapters.get(name);
  if (!entry || !forModel(entry)) return showError("Choose a style to add first.", "adapter-pick");
  if (state.chosen.some((c) => c.name === name)) return showError(`${name} is already added.`, "adapter-pick");
  if (state.chosen.length >= state.model.max_loras) {
    return showError(`At most ${state.model.max_loras} styles per image.`, "adapter-pick");
  }
  const item = document.createElement("li");
  const title = document.createElement("strong");
  title.textContent = name;
  const desc = document.createElement("div");
  desc.className = "desc";
  desc.textContent = describe(entry);
  const row = document.createElement("div");
  row.className = "row";
  const scaleId = `scale-${name}`;
  const label = Object.assign(document.createElement("label"), { htmlFor: scaleId, textContent: "Scale" });
  const scale = Object.assign(document.createElement("input"), {
    type: "number", id: scaleId, min: 0, max: state.model.max_lora_scale, step: 0.05, value: 1,
  });
  row.append(label, scale);
  const words = entry.metadata.trigger_words;
  if (words.length) {
    const insert = button("Insert trigger words", () => insertTriggerWords(words));
    insert.setAttribute("aria-label", `Insert the trigger words of ${name} into the prompt`);
    row.append(insert);
  }
  const remove = button("Remove", () => {
    state.chosen = state.chosen.filter((c) => c.name !== name);
    item.remove();
  });
  remove.setAttribute("aria-label", `Remove ${name}`);
  row.append(remove);
  item.append(title, desc, row);
  $("adapter-list").append(item);
  state.chosen.push({ name, scale, item });
}

function insertTriggerWords(words) {
  const prompt = $("prompt");
  const missing = words.filter((w) => !prompt.value.includes(w));
  if (missing.length) prompt.value = [prompt.value.trim(), ...missing].filter(Boolean).join(", ");
  prompt.focus();
}

function button(text, onClick) {
  const b = Object.assign(document.createElement("button"), { type: "button", textContent: text });
  b.addEventListener("click", onClick);
  return b;
}

// -- style image (IP-Adapter) ------------------------------------------------------------------

function takesStyle(model) {
  // The page config may say (style_image); else GET /v1/models does, once loaded; unknown: hidden.
  if (typeof model.style_image === "boolean") return model.style_image;
  return state.styleModels.get(model.model) === true;
}

async function loadModels() {
  try {
    const response = await fetch(api("v1/models"));
    if (!response.ok) return;
    const listing = await response.json();
    for (const entry of listing.data ?? []) state.styleModels.set(entry.id, entry.style_image === true);
  } catch {
    return;  // the style section stays hidden: the rest of the page works without it
  }
  renderStyle();
}

function renderStyle() {
  $("style").hidden = !takesStyle(state.model);
}

function setUpStyle() {
  const drop = $("style-drop");
  const input = $("style_image");
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      input.click();
    }
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) loadStyle(file);
  });
  input.addEventListener("change", () => { if (input.files[0]) loadStyle(input.files[0]); });
  $("style_scale").addEventListener("input", () => { $("style-scale-value").textContent = $("style_scale").value; });
  $("style-clear").addEventListener("click", clearStyle);
}

function loadStyle(file) {
  clearError();
  const reader = new FileReader();
  reader.onerror = () => showError(`Could not read ${file.name}.`, "style_image");
  reader.onload = () => {
    const img = new Image();
    img.onerror = () => showError(`${file.name} is not an image this browser can read.`, "style_image");
    img.onload = () => {
      state.style = { dataUrl: reader.result, name: file.name };
      Object.assign($("style-preview"), { src: reader.result, hidden: false });
      $("style-name").textContent = `${file.name} (${img.naturalWidth}×${img.naturalHeight})`;
      $("style-clear").hidden = false;
    };
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function clearStyle() {
  state.style = null;
  $("style_image").value = "";
  $("style-preview").hidden = true;
  $("style-preview").removeAttribute("src");
  $("style-name").textContent = "";
  $("style-clear").hidden = true;
}

// -- input image and mask -------------------------------------------------------------------

const mask = { canvas: null, painting: false, last: null };

function loadImage() {
  const file = $("image").files[0];
  clearError();
  if (!file) return;
  const reader = new FileReader();
  reader.onerror = () => showError(`Could not read ${file.name}.`, "image");
  reader.onload = () => {
    const img = new Image();
    img.onerror = () => showError(`${file.name} is not an image this browser can read.`, "image");
    img.onload = () => {
      state.image = { dataUrl: reader.result, img };
      $("image-preview").src = reader.result;
      // Output size follows the input, to a multiple of 8 within the limits; the server has the last word.
      for (const [id, side] of [["width", img.naturalWidth], ["height", img.naturalHeight]]) {
        $(id).value = Math.min(state.model.max_side, Math.max(state.model.min_side, side - (side % 8)));
      }
      resetMask();
      setMode(state.mode);
    };
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function setUpMask() {
  const view = $("mask");
  view.addEventListener("pointerdown", (e) => {
    mask.painting = true;
    mask.last = null;
    view.setPointerCapture(e.pointerId);
    paint(e);
  });
  view.addEventListener("pointermove", (e) => { if (mask.painting) paint(e); });
  for (const type of ["pointerup", "pointercancel"]) view.addEventListener(type, () => { mask.painting = false; });
  $("mask-clear").addEventListener("click", resetMask);
  $("mask-all").addEventListener("click", () => {
    const ctx = mask.canvas.getContext("2d");
    ctx.fillStyle = "white";
    ctx.fillRect(0, 0, mask.canvas.width, mask.canvas.height);
    drawMaskView();
  });
}

function resetMask() {
  // The mask itself: the input image's size, black = keep, white = repaint.
  const { img } = state.image;
  mask.canvas = Object.assign(document.createElement("canvas"), { width: img.naturalWidth, height: img.naturalHeight });
  const ctx = mask.canvas.getContext("2d");
  ctx.fillStyle = "black";
  ctx.fillRect(0, 0, mask.canvas.width, mask.canvas.height);
  Object.assign($("mask"), { width: img.naturalWidth, height: img.naturalHeight });
  drawMaskView();
}

function paint(e) {
  const view = $("mask");
  // CSS pixels (inside the border) -> mask pixels: the canvas is shown scaled to the page's width.
  const rect = view.getBoundingClientRect();
  const scale = view.width / view.clientWidth;
  const x = (e.clientX - rect.left - view.clientLeft) * scale;
  const y = (e.clientY - rect.top - view.clientTop) * scale;
  const point = [x, y];
  const ctx = mask.canvas.getContext("2d");
  Object.assign(ctx, { strokeStyle: "white", lineCap: "round", lineJoin: "round" });
  ctx.lineWidth = Number($("brush").value) * scale;
  ctx.beginPath();
  ctx.moveTo(...(mask.last || point));
  ctx.lineTo(...point);
  ctx.stroke();
  mask.last = point;
  drawMaskView();
}

function drawMaskView() {
  // What the person sees: the image, with the part to repaint tinted red.
  const view = $("mask");
  const ctx = view.getContext("2d");
  ctx.globalAlpha = 1;
  ctx.globalCompositeOperation = "source-over";
  ctx.drawImage(state.image.img, 0, 0);
  const tint = Object.assign(document.createElement("canvas"), { width: view.width, height: view.height });
  const t = tint.getContext("2d");
  t.drawImage(mask.canvas, 0, 0);
  t.globalCompositeOperation = "multiply";
  t.fillStyle = "rgb(255, 40, 40)";
  t.fillRect(0, 0, tint.width, tint.height);
  ctx.globalCompositeOperation = "screen";
  ctx.globalAlpha = 0.6;
  ctx.drawImage(tint, 0, 0);
  ctx.globalAlpha = 1;
  ctx.globalCompositeOperation = "source-over";
}

// -- the request ----------------------------------------------------------------------------

class FormError extends Error {
  constructor(message, field) {
    super(message);
    this.field = field;
  }
}

function number(id) {
  // Whatever was typed goes to the server, which names the field if it is wrong.
  const input = $(id);
  if (input.value.trim() === "") return undefined;
  const value = Number(input.value);
  if (Number.isNaN(value)) throw new FormError(`${id} must be a number`, id);
  return value;
}

function buildBody() {
  const body = {
    model: state.model.model,
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    seed: number("seed"),
    steps: number("steps"),
    guidance_scale: number("guidance_scale"),
    width: number("width"),
    height: number("height"),
    num_images: number("num_images"),
    scheduler: $("scheduler").value,
    output_format: "png",
    loras: state.chosen.map((c) => ({ name: c.name, scale: Number(c.scale.value) })),
  };
  if (state.mode !== "txt2img") {
    if (!state.image) throw new FormError("Choose an input image first.", "image");
    body.image = state.image.dataUrl;
    body.strength = Number($("strength").value);
  }
  if (state.mode === "inpaint") body.mask = mask.canvas.toDataURL("image/png");
  if (state.style && takesStyle(state.model)) {  // a model without IP-Adapter hides the section: nothing is sent
    body.style_image = state.style.dataUrl;
    body.style_scale = Number($("style_scale").value);
  }
  return body;
}

async function submit(event) {
  event.preventDefault();
  clearError();
  let body;
  try {
    body = buildBody();
  } catch (e) {
    if (e instanceof FormError) return showError(e.message, e.field);
    throw e;
  }
  setBusy(true);
  let response;
  try {
    response = await fetch(api("v1/jobs"), {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch (e) {
    setBusy(false);
    return showError(`Network error: could not reach the server (${e.message}).`);
  }
  if (!response.ok) {
    setBusy(false);
    const data = await readJson(response);
    return showError(apiMessage(response, data), data?.error?.field);
  }
  follow(await response.json(), body);
}

function follow(created, body) {
  const events = new EventSource(`${created.events_url}?previews=true`);
  const job = { id: created.id, events, finished: false, body };
  state.job = job;
  $("preview").hidden = true;
  setStatus("Queued.", 0);
  events.addEventListener("status", (e) => showProgress(JSON.parse(e.data)));
  events.addEventListener("preview", (e) => {
    const p = JSON.parse(e.data);
    $("preview").src = p.image;
    $("preview").hidden = false;
    setStatus(`Running: step ${p.step} of ${p.steps}.`, p.step / p.steps);
  });
  events.addEventListener("done", (e) => {
    const done = JSON.parse(e.data);
    finish(job, "Done.", 1);
    addToGallery(done, job.body);
  });
  events.addEventListener("failed", (e) => {
    const failed = JSON.parse(e.data);
    finish(job, "Failed.", 0);
    showError(failed.error ? failed.error.message : "The job failed.", failed.error?.field);
  });
  events.addEventListener("cancelled", () => finish(job, "Cancelled.", 0));
  events.onerror = () => {
    if (job.finished) return;
    if (events.readyState === EventSource.CLOSED) {
      finish(job, "Connection lost.", 0);
      showError(`Network error: lost the connection to the server while following job ${job.id}.`);
    } else {
      setStatus("Connection lost; reconnecting…");
    }
  };
}

function showProgress(job) {
  if (job.status === "queued" && job.phase === "loading_model") {
    const eta = job.eta_s === null ? "" : `: about ${Math.ceil(job.eta_s)} s`;
    setStatus(`Starting ${job.model}${eta}.`, 0);
  } else if (job.status === "queued") {
    const ahead = job.position === null ? "" : ` ${job.position} ahead of you`;
    const eta = job.eta_s === null ? "" : `, about ${Math.ceil(job.eta_s)} s`;
    setStatus(`Queued:${ahead}${eta}.`, 0);
  } else if (job.status === "running") {
    setStatus(`Running: step ${job.step} of ${job.steps}.`, job.progress);
  }
}

function finish(job, text, progress) {
  job.finished = true;
  job.events.close();
  if (state.job === job) state.job = null;
  setStatus(text, progress);
  setBusy(false);
}

async function cancel() {
  const job = state.job;
  if (!job) return;
  try {
    const response = await fetch(api(`v1/jobs/${encodeURIComponent(job.id)}`), { method: "DELETE" });
    if (!response.ok) showError(apiMessage(response, await readJson(response)));
  } catch (e) {
    showError(`Network error: could not cancel (${e.message}).`);
  }
}

function addToGallery(job, body) {
  const styles = (job.loras || []).map((l) => `${l.ref} ×${l.scale}`).join(", ");
  for (const image of job.images) {
    const src = `data:image/png;base64,${image.b64}`;
    const figure = document.createElement("figure");
    const img = Object.assign(document.createElement("img"), {
      src, alt: `Generated: ${body.prompt} (seed ${image.seed})`, width: image.width, height: image.height,
    });
    const caption = document.createElement("figcaption");
    const seed = Object.assign(document.createElement("span"), { className: "seed", textContent: `Seed ${image.seed}` });
    const size = Object.assign(document.createElement("span"), { textContent: `${image.width}×${image.height}` });
    caption.append(seed, size);
    if (models.length > 1) {
      caption.append(Object.assign(document.createElement("span"), { className: "model", textContent: job.model }));
    }
    if (styles) caption.append(Object.assign(document.createElement("span"), { className: "styles", textContent: styles }));
    if (body.style_image) {
      const text = `style image ×${body.style_scale}`;
      caption.append(Object.assign(document.createElement("span"), { className: "style-ref", textContent: text }));
    }
    const download = Object.assign(document.createElement("a"), {
      href: src, download: `lorafleet-${image.seed}.png`, textContent: "Download",
    });
    const reuse = button("Use seed", () => { $("seed").value = image.seed; });
    caption.append(download, reuse);
    figure.append(img, caption);
    $("gallery").prepend(figure);
  }
}

// -- messages -------------------------------------------------------------------------------

async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return null;
  }
}

function apiMessage(response, data) {
  const message = data?.error?.message || `The server answered ${response.status} ${response.statusText}.`;
  const retry = response.headers.get("retry-after");
  return retry ? `${message} Try again in ${retry} s.` : message;
}

async function errorText(response) {
  return apiMessage(response, await readJson(response));
}

// The API names fields like "steps", "loras[1].scale", "loras.1.scale" or "image".
function fieldElement(field) {
  if (!field) return null;
  const lora = /^loras(?:\[(\d+)\]|\.(\d+))/.exec(field);
  if (lora) {
    const chosen = state.chosen[Number(lora[1] ?? lora[2])];
    return chosen ? chosen.scale : $("adapter-pick");
  }
  if (field.startsWith("loras")) return $("adapter-pick");
  if (field === "mask") return $("mask");
  if (field.startsWith("style_image")) return $("style-drop");
  return $(field.split(".")[0]);
}

function showError(message, field) {
  const box = $("form-error");
  box.textContent = message;
  box.hidden = false;
  const element = fieldElement(field);
  // The message sits by the Generate button, where the person is; the field at fault is marked.
  box.scrollIntoView({ block: "nearest" });
  if (element) {
    if (!element.hasAttribute("aria-invalid")) {
      element.dataset.describedby = element.getAttribute("aria-describedby") || "";
      element.setAttribute("aria-describedby", `form-error ${element.dataset.describedby}`.trim());
    }
    element.setAttribute("aria-invalid", "true");
  }
}

function clearError() {
  $("form-error").hidden = true;
  $("form-error").textContent = "";
  for (const el of document.querySelectorAll("[aria-invalid]")) {
    el.removeAttribute("aria-invalid");
    if (el.dataset.describedby) el.setAttribute("aria-describedby", el.dataset.describedby);
    else el.removeAttribute("aria-describedby");
    delete el.dataset.describedby;
  }
}

function setStatus(text, progress) {
  $("job-status").textContent = text;
  if (progress !== undefined) $("progress").value = progress;
}

function setBusy(busy) {
  $("submit").disabled = busy;
  $("cancel").hidden = !busy;
}

setUpForm();
loadAdapters();
loadModels();
