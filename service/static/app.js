// facegen playground: submit a request, follow its progress (the job's event stream, with previews; polling if the
// stream fails), show the PNG grid, the GIF and per-image downloads.
// The query string mirrors the form (?label=smiling&count=4&seed=1&run=1), so a URL reproduces a request.
"use strict";

const $ = (id) => document.getElementById(id);
const FALLBACK_LABELS = ["smiling", "not_smiling"];
const POLL_MS = 400;
const STEPS_MAX = "1000"; // the steps field's bound for the samplers but the student (the API's)

let current = null; // {id, links, animation}
let models = []; // GET /models: each served version with its defaults and its distilled student (or null)
let latestVersion = null; // the version "latest" names now
let pollTimer = null;
let stream = null; // AbortController of the open event stream
const objectUrls = [];

function setState(state) { document.body.dataset.state = state; }

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

function setStatus(text, fraction) {
  $("status").textContent = text;
  if (fraction === null || fraction === undefined) {
    $("progress").removeAttribute("value"); // indeterminate
  } else {
    $("progress").value = Math.max(0, Math.min(1, fraction));
  }
}

function apiKey() { return $("apikey").value.trim(); }

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (apiKey()) h.Authorization = "Bearer " + apiKey();
  return h;
}

function api(path) { return new URL(path.replace(/^\//, ""), document.baseURI).toString(); }

async function errorText(response) {
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (response.status === 401) return "This server needs an API key: enter it under 'API key'.";
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((e) => (e.loc || []).slice(1).join(".") + ": " + e.msg).join("\n");
  }
  if (body && body.detail) return body.detail + (body.error ? " — " + body.error : "");
  return "HTTP " + response.status;
}

// ----- models and labels ---------------------------------------------------------------------------------
function fillSelect(select, values, wanted) {
  select.textContent = "";
  for (const value of values) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = value;
    select.appendChild(option);
  }
  if (wanted && !values.includes(wanted)) {
    const option = document.createElement("option");
    option.value = wanted;
    option.textContent = wanted;
    select.appendChild(option);
  }
  if (wanted) select.value = wanted;
}

async function loadModels(wantedLabel, wantedModel) {
  let labels = FALLBACK_LABELS;
  let versions = ["latest"];
  try {
    const response = await fetch(api("models"), { headers: headers() });
    if (response.ok) {
      const body = await response.json();
      models = body.models;
      latestVersion = body.latest;
      const latest = body.models.find((m) => m.version === body.latest) || body.models[0];
      if (latest && latest.labels.length) labels = latest.labels;
      versions = ["latest"].concat(body.models.map((m) => m.version));
    }
  } catch (e) { /* keep the fallback */ }
  fillSelect($("label"), labels, wantedLabel || $("label").value || labels[0]);
  fillSelect($("model"), versions, wantedModel || $("model").value || "latest");
  showSampling();
}

// The model the form's "Model" names ("latest": the version it names now), or null when GET /models did not say.
function chosenModel() {
  const wanted = $("model").value;
  const version = !wanted || wanted === "latest" ? latestVersion : wanted;
  return models.find((m) => m.version === version) || null;
}

// The sampler list and the steps field follow the chosen model: "student" is offered only when it serves a
// distilled student, whose steps run from 1 to its max_steps; the defaults shown are the model's (or student's).
function showSampling() {
  const model = chosenModel();
  const student = model ? model.student : null;
  const option = $("sampler").querySelector('option[value="student"]');
  option.hidden = option.disabled = !student;
  if (!student && $("sampler").value === "student") $("sampler").value = "dpmpp";
  const studentChosen = $("sampler").value === "student";
  $("steps").max = studentChosen ? String(student.max_steps) : STEPS_MAX;
  $("steps-hint").textContent = studentChosen ? "(1 to " + student.max_steps + "; empty = the student's default)"
                                              : "(empty = sampler default)";
  if (!model) return;
  const steps = studentChosen ? student.default_steps : model.default_steps[$("sampler").value];
  $("steps").placeholder = steps ? "default (" + steps + ")" : "default";
  $("guidance").placeholder = "default (" + model.default_guidance_scale + ")";
}

// ----- query string <-> form ------------------------------------------------------------------------------
function readQuery() {
  const q = new URLSearchParams(window.location.search);
  const get = (name) => q.get(name);
  if (get("count")) $("count").value = get("count");
  if (get("seed")) $("seed").value = get("seed");
  if (get("sampler")) $("sampler").value = get("sampler");
  if (get("steps")) $("steps").value = get("steps");
  if (get("guidance")) $("guidance").value = get("guidance");
  $("animation").checked = ["1", "true", "yes"].includes((get("animation") || "").toLowerCase());
  $("transition").checked = ["1", "true", "yes"].includes((get("transition") || "").toLowerCase());
  return { label: get("label"), model: get("model"), run: ["1", "true", "yes"].includes((get("run") || "").toLowerCase()) };
}

function formQuery(seed) {
  const q = new URLSearchParams();
  q.set("label", $("label").value);
  if ($("model").value && $("model").value !== "latest") q.set("model", $("model").value);
  q.set("count", $("count").value);
  q.set("seed", seed);
  q.set("sampler", $("sampler").value);
  if ($("steps").value) q.set("steps", $("steps").value);
  if ($("guidance").value) q.set("guidance", $("guidance").value);
  if ($("animation").checked) q.set("animation", "1");
  if ($("transition").checked) q.set("transition", "1");
  return q;
}

function showShare(seed) {
  const q = formQuery(seed);
  window.history.replaceState(null, "", "?" + q.toString());
  q.set("run", "1");
  const url = new URL(window.location.href);
  url.search = q.toString();
  $("share").value = url.toString();
  $("share-row").hidden = false;
}

// ----- submit and poll -------------------------------------------------------------------------------------
function requestBody() {
  const body = {
    label: $("label").value,
    count: parseInt($("count").value, 10),
    sampler: $("sampler").value,
    model: $("model").value || "latest",
    animation: $("animation").checked,
    transition: $("transition").checked,
  };
  if ($("steps").value) body.steps = parseInt($("steps").value, 10);
  if ($("guidance").value) body.guidance_scale = parseFloat($("guidance").value);
  const seed = $("seed").value.trim();
  let json = JSON.stringify(body);
  if (seed) {
    if (!/^[0-9]{1,19}$/.test(seed)) throw new Error("seed: a whole number from 0 to 9223372036854775807");
    // Spliced in as text: seeds above 2^53 would lose digits as JavaScript numbers.
    json = json.slice(0, -1) + ',"seed":' + seed.replace(/^0+(?=\d)/, "") + "}";
  }
  return json;
}

function idempotencyKey() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return String(Date.now()) + "-" + String(Math.random()).slice(2);
}

function clearResults() {
  while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
  $("grid-figure").hidden = true;
  $("anim-figure").hidden = true;
  $("singles-figure").hidden = true;
  $("singles").textContent = "";
  $("result-image").removeAttribute("src");
  $("animation-image").removeAttribute("src");
}

async function submit(event) {
  if (event) event.preventDefault();
  stopPolling();
  showError("");
  clearResults();
  let body;
  try { body = requestBody(); } catch (e) { showError(e.message); return; }
  setState("submitting");
  setStatus("Submitting…", 0);
  $("submit").disabled = true;
  try {
    const response = await fetch(api("generate"), {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", "Idempotency-Key": idempotencyKey() }),
      body: body,
    });
    if (response.status !== 202) {
      const retry = response.headers.get("Retry-After");
      throw new Error((await errorText(response)) + (retry ? " (retry in " + retry + " s)" : ""));
    }
    const accepted = await response.json();
    // A typed seed is kept as text; the API's own random seeds stay below 2^53, so accepted.seed is exact.
    const seed = $("seed").value.trim() || String(accepted.seed);
    current = { id: accepted.job_id, links: accepted.links, animation: Boolean(accepted.links.animation),
                count: parseInt($("count").value, 10) };
    showShare(seed);
    $("cancel").disabled = false;
    setState("running");
    follow(current);
  } catch (e) {
    fail(e.message);
  }
}

function stopPolling() {
  if (pollTimer) clearTimeout(pollTimer);
  pollTimer = null;
  if (stream) stream.abort();
  stream = null;
  $("preview-figure").hidden = true;
}

// ----- the event stream (GET /jobs/{id}/events): fetch, not EventSource, which cannot send the API key ----------
function parseEvent(block) {
  const event = { event: "message", data: "" };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const cut = line.indexOf(":");
    const field = cut < 0 ? line : line.slice(0, cut);
    const value = cut < 0 ? "" : line.slice(cut + 1).replace(/^ /, "");
    if (field === "data") event.data += (event.data ? "\n" : "") + value;
    else event[field] = value;
  }
  return event;
}

function showEvent(event) {
  const data = event.data ? JSON.parse(event.data) : {};
  if (event.event === "queued") {
    const ahead = data.queue_position;
    setStatus("Queued" + (ahead !== null && ahead !== undefined ? " — " + ahead + " job(s) ahead" : "") + "…", null);
  } else if (event.event === "started") {
    setStatus("Starting…", 0);
  } else if (event.event === "progress") {
    const p = data.progress;
    setStatus("Denoising: step " + p.step + " / " + p.total, p.total ? p.step / p.total : null);
    if (data.preview) {
      $("preview-image").src = "data:image/png;base64," + data.preview;
      $("preview-figure").hidden = false;
    }
  }
}

const FINAL_EVENTS = ["finished", "failed", "canceled"];

async function follow(job, lastId) {
  const controller = new AbortController();
  stream = controller;
  let resume = null; // the last event's id, when the server ended the stream before the final event
  try {
    const extra = lastId ? { "Last-Event-ID": lastId } : {};
    const response = await fetch(api(job.links.self + "/events?preview=true"),
                                 { headers: headers(extra), signal: controller.signal });
    if (!response.ok || !response.body) throw new Error("no event stream");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        if (job !== current) return;
        const event = parseEvent(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (event.id) resume = FINAL_EVENTS.includes(event.event) ? null : event.id;
        showEvent(event);
      }
    }
  } catch (e) {
    resume = null;
    if (controller.signal.aborted) return;
    // the stream failed: polling below carries on
  }
  if (stream === controller) stream = null;
  if (job !== current) return;
  if (resume && resume !== lastId) follow(job, resume); // the server ended a long stream: go on after the last event
  else poll(); // the final state (or, if the stream broke, polling until it ends)
}

function fail(message) {
  stopPolling();
  setState("error");
  setStatus("Failed.", 0);
  showError(message);
  $("submit").disabled = false;
  $("cancel").disabled = true;
}

async function poll() {
  if (!current) return;
  const job = current;
  let body;
  try {
    const response = await fetch(api(job.links.self), { headers: headers() });
    if (!response.ok) throw new Error(await errorText(response));
    body = await response.json();
  } catch (e) {
    fail(e.message);
    return;
  }
  if (job !== current) return;
  const progress = body.progress;
  if (body.status === "queued") {
    const ahead = body.queue_position;
    setStatus("Queued" + (ahead !== null && ahead !== undefined ? " — " + ahead + " job(s) ahead" : "") + "…", null);
  } else if (body.status === "started") {
    const text = progress ? "Denoising: step " + progress.step + " / " + progress.total : "Starting…";
    setStatus(text + (body.cancel_requested ? " (cancelling)" : ""), progress && progress.total ? progress.step / progress.total : null);
  } else if (body.status === "finished") {
    $("preview-figure").hidden = true;
    setStatus("Finished — loading images…", 1);
    await showImages(job);
    return;
  } else if (["failed", "canceled", "stopped"].includes(body.status)) {
    fail("Job " + body.status + (body.error ? ": " + body.error : "."));
    return;
  } else {
    setStatus(body.status + "…", null);
  }
  pollTimer = setTimeout(poll, POLL_MS);
}

async function loadImage(url, img, link, name) {
  const response = await fetch(api(url), { headers: headers() });
  if (!response.ok) throw new Error(await errorText(response));
  const blobUrl = URL.createObjectURL(await response.blob());
  objectUrls.push(blobUrl);
  await new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = () => reject(new Error("could not decode " + name));
    img.src = blobUrl;
  });
  link.href = blobUrl;
  link.download = name;
}

async function showImages(job) {
  try {
    await loadImage(job.links.result, $("result-image"), $("grid-download"), "facegen-" + job.id + ".png");
    $("grid-figure").hidden = false;
    if (job.animation) {
      await loadImage(job.links.animation, $("animation-image"), $("anim-download"), "facegen-" + job.id + ".gif");
      $("anim-figure").hidden = false;
    }
    showSingles(job);
  } catch (e) {
    fail(e.message);
    return;
  }
  setStatus("Done.", 1);
  $("submit").disabled = false;
  $("cancel").disabled = true;
  setState("done");
}

// One download link per image: GET {self}/images/{i} (fetched with the API key on click, saved from a blob).
function showSingles(job) {
  const list = $("singles");
  list.textContent = "";
  for (let i = 0; i < job.count; i++) {
    const link = document.createElement("a");
    link.href = api(job.links.self + "/images/" + i);
    link.textContent = String(i);
    link.dataset.index = String(i);
    link.addEventListener("click", (event) => { event.preventDefault(); downloadSingle(job, i); });
    list.appendChild(link);
    list.appendChild(document.createTextNode(" "));
  }
  $("singles-figure").hidden = false;
}

async function downloadSingle(job, index) {
  try {
    const response = await fetch(api(job.links.self + "/images/" + index), { headers: headers() });
    if (!response.ok) throw new Error(await errorText(response));
    const blobUrl = URL.createObjectURL(await response.blob());
    objectUrls.push(blobUrl);
    const save = document.createElement("a");
    save.href = blobUrl;
    save.download = "facegen-" + job.id + "-" + index + ".png";
    save.click();
  } catch (e) {
    showError(e.message);
  }
}

async function cancel() {
  if (!current) return;
  $("cancel").disabled = true;
  try {
    const response = await fetch(api(current.links.self), { method: "DELETE", headers: headers() });
    if (!response.ok && response.status !== 409) throw new Error(await errorText(response));
  } catch (e) {
    showError(e.message);
  }
}

async function copyShare() {
  $("share").select();
  try { await navigator.clipboard.writeText($("share").value); } catch (e) { document.execCommand("copy"); }
}

async function init() {
  $("apikey").value = sessionStorage.getItem("facegen-api-key") || "";
  $("apikey").addEventListener("change", () => {
    sessionStorage.setItem("facegen-api-key", apiKey());
    loadModels();
  });
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("copy").addEventListener("click", copyShare);
  $("sampler").addEventListener("change", showSampling);
  $("model").addEventListener("change", showSampling);
  // a job's GIF is either the denoising trajectory or the attribute transition
  $("animation").addEventListener("change", () => { if ($("animation").checked) $("transition").checked = false; });
  $("transition").addEventListener("change", () => { if ($("transition").checked) $("animation").checked = false; });
  const wanted = readQuery();
  await loadModels(wanted.label, wanted.model);
  setState("ready");
  if (wanted.run) submit();
}

document.addEventListener("DOMContentLoaded", init);
