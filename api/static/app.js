// segsvc web page: upload a photo, follow the job, show overlay and mask. No dependencies.
"use strict";

const KEY_STORAGE = "segsvc.apiKey";
// Mask values 0 pet, 1 background, 2 border, coloured like the overlay (raw 0/1/2 looks black).
const MASK_COLOURS = [[255, 64, 64], [40, 44, 60], [255, 220, 0]];
const ALLOWED_TYPES = ["image/jpeg", "image/png", "image/webp"];
const STATUS_WORDS = {
  queued: "Waiting in the queue for a worker.",
  running: "A worker is segmenting the photo.",
  succeeded: "Done.",
  failed: "The job failed.",
  canceled: "The job was canceled.",
};

const $ = (id) => document.getElementById(id);
const state = { config: { auth_required: true, max_upload_bytes: 10 * 1024 * 1024 }, job: null,
                urls: [], pollTimer: null, generation: 0, overlayUrl: null, originalUrl: null,
                xhr: null, cancelRequested: false, pollFailures: 0 };

// What an HTTP header can carry: a key pasted with a zero-width space or an ellipsis made
// every request throw in setRequestHeader, and the page hung at "Uploading... 0%".
const KEY_PATTERN = /^[\x21-\x7e]+$/;

function apiKey() {
  const key = localStorage.getItem(KEY_STORAGE) || "";
  return KEY_PATTERN.test(key) ? key : "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: "Bearer " + key } : {};
}

function showKeyState() {
  const key = apiKey();
  $("key-state").textContent = key
    ? "Key saved in this browser (" + key.slice(0, 8) + "\u2026)."
    : "No key saved yet. `make run` prints one (also in var/local_api_key).";
  $("api-key").value = "";
  $("api-key").placeholder = key ? "saved; paste a new key to replace it" : "seg_...";
}

function formatBytes(n) {
  return n >= 1024 * 1024 ? (n / 1024 / 1024).toFixed(n % (1024 * 1024) ? 1 : 0) + " MB"
    : Math.round(n / 1024) + " KB";
}

// --- errors in plain words ----------------------------------------------------------------
function retryAfterText(headers) {
  const seconds = parseInt(headers && headers.get ? headers.get("Retry-After") : headers, 10);
  return Number.isFinite(seconds) ? " Try again in " + seconds + " second" + (seconds === 1 ? "" : "s") + "." : " Try again shortly.";
}

function describeError(status, body, retryAfter) {
  const message = body && body.message ? body.message : "";
  switch (status) {
    case 0: return "Could not reach the service. Check that it is running and try again.";
    case 401: return "The API key was not accepted. Paste a valid key above and try again.";
    case 403: return "This API key may not do that.";
    case 404: return "That job does not exist (or belongs to another key).";
    case 413: return "The file is too large. The limit is " + formatBytes(state.config.max_upload_bytes) + ".";
    case 415: return "That file is not a supported image. Use a JPEG, PNG or WebP photo.";
    case 422: return "That file could not be used as an image. " + message;
    case 429: return "Too many requests from this key right now." + retryAfterText(retryAfter);
    case 503: return "The service is busy or briefly unavailable." + retryAfterText(retryAfter);
    default:
      return status >= 500 ? "Something went wrong on the server (" + status + ")." + retryAfterText(retryAfter)
        : (message || "The request failed (" + status + ").");
  }
}

function showError(text) {
  $("error-box").textContent = text;
  $("error-box").hidden = false;
}

function sentence(text) {
  return /[.!?]$/.test(text) ? text : text + ".";
}

function clearError() {
  $("error-box").hidden = true;
  $("error-box").textContent = "";
}

// --- status display -----------------------------------------------------------------------
// `ended`: the job failed or was canceled; its Done step is marked so, not ticked.
function setStep(step, text, ended) {
  const order = ["uploading", "queued", "running", "done"];
  const at = order.indexOf(step);
  document.querySelectorAll("#steps li").forEach((li) => {
    const i = order.indexOf(li.dataset.step);
    const last = step === "done" && i === at;
    li.classList.toggle("complete", i < at || (last && !ended));
    li.classList.toggle("ended", last && Boolean(ended));
    li.classList.toggle("active", i === at && step !== "done");
  });
  $("status-text").textContent = text || "";
}

function setProgress(percent) {
  $("upload-progress").value = percent;
  $("upload-text").textContent = percent + "%";
}

// --- upload -------------------------------------------------------------------------------
function checkFile(file) {
  if (file.type && !ALLOWED_TYPES.includes(file.type)) {
    return "That file is not a supported image (" + file.type + "). Use a JPEG, PNG or WebP photo.";
  }
  if (file.size > state.config.max_upload_bytes) {
    return "The file is too large (" + formatBytes(file.size) + "). The limit is "
      + formatBytes(state.config.max_upload_bytes) + ".";
  }
  if (state.config.auth_required && !apiKey()) {
    return "Paste your API key above first.";
  }
  return null;
}

function startUpload(file) {  // whether it started (else the error box says why not)
  clearError();
  const problem = checkFile(file);
  if (problem) {
    showError(problem);
    return false;
  }
  resetResults();
  const generation = ++state.generation;
  state.originalUrl = trackUrl(URL.createObjectURL(file));
  $("progress-box").hidden = false;
  setProgress(0);
  setStep("uploading", "Uploading " + file.name + " (" + formatBytes(file.size) + ")\u2026");

  const form = new FormData();
  form.append("image", file, file.name);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/v1/jobs");
  const headers = authHeaders();
  Object.keys(headers).forEach((k) => xhr.setRequestHeader(k, headers[k]));
  xhr.upload.onprogress = (event) => {
    if (event.lengthComputable) setProgress(Math.round((100 * event.loaded) / event.total));
  };
  xhr.onload = () => {
    if (generation !== state.generation) return;
    state.xhr = null;
    let body = null;
    try { body = JSON.parse(xhr.responseText); } catch (_err) { body = null; }
    if (xhr.status === 202 && body) {
      setProgress(100);
      state.job = body;
      showJob(body);
      schedulePoll(body.id, generation, FIRST_POLL_MS);
    } else {
      $("progress-box").hidden = true;  // nothing was stored; the error says why
      showError(describeError(xhr.status, body, xhr.getResponseHeader("Retry-After")));
    }
  };
  xhr.onerror = () => {
    if (generation !== state.generation) return;
    state.xhr = null;
    $("progress-box").hidden = true;
    showError(describeError(0));
  };
  state.xhr = xhr;
  xhr.send(form);
  return true;
}

// --- polling ------------------------------------------------------------------------------
function schedulePoll(jobId, generation, delay) {
  clearTimeout(state.pollTimer);
  state.pollTimer = setTimeout(() => poll(jobId, generation, delay), delay);
}

// Answers that say "not now" rather than "no": rate limited, busy, or a proxy whose API
// process is restarting (a rolling deploy). The job goes on meanwhile, so the page asks again.
const TRANSIENT_STATUSES = [429, 502, 503, 504];

const LOST_CONTACT_POLLS = 3;
// The first poll's delay, and the least between two: a delay of 0 grew to 0 (x 1.5, x 2), and
// the page asked as fast as the server answered.
const FIRST_POLL_MS = 300;

function jobUnfinished() {
  return Boolean(state.job) && !["succeeded", "failed", "canceled"].includes(state.job.status);
}

function retryDelay(headers, delay) {
  const wait = parseInt(headers ? headers.get("Retry-After") : "", 10);
  return Number.isFinite(wait) ? Math.max(wait, 0) * 1000
    : Math.min(Math.max(delay * 2, FIRST_POLL_MS), 5000);
}

async function poll(jobId, generation, delay) {
  let resp, body;
  try {
    resp = await fetch("/v1/jobs/" + encodeURIComponent(jobId), { headers: authHeaders(), cache: "no-store" });
    body = await resp.json().catch(() => null);
  } catch (_err) {  // the network: lost, or the connection cut mid-answer
    resp = null;
  }
  if (generation !== state.generation) return;
  // The service unreachable poll after poll (stopped, or the network gone): said, while the
  // page goes on asking; a job waiting in a long queue looked the same as a dead server.
  if (!resp) {
    state.pollFailures += 1;
    if (state.pollFailures >= LOST_CONTACT_POLLS) {
      showError("Lost contact with the service; still trying every few seconds. Check that it is running.");
    }
  } else if (state.pollFailures) {
    if (state.pollFailures >= LOST_CONTACT_POLLS) clearError();
    state.pollFailures = 0;
  }
  if (!resp || TRANSIENT_STATUSES.includes(resp.status)) {
    schedulePoll(jobId, generation, retryDelay(resp && resp.headers, delay));
    return;
  }
  if (!resp.ok) {  // polling stops here: the page says so, and a saved key starts it again
    showError(describeError(resp.status, body, resp.headers));
    setStep("done", "Stopped checking on the job.", true);
    return;
  }
  if (!body || typeof body.status !== "string") {  // a 200 that is not a job: a proxy's page
    schedulePoll(jobId, generation, retryDelay(null, delay));
    return;
  }
  state.job = body;
  showJob(body);
  if (body.status === "succeeded") {
    await loadResults(body, generation);
  } else if (body.status === "failed") {
    showError(sentence("The job failed: " + ((body.error && body.error.message) || "no reason given")));
  } else if (body.status !== "canceled") {
    schedulePoll(jobId, generation, Math.max(Math.min(delay * 1.5, 2000), FIRST_POLL_MS));
  }
}

function showJob(job) {
  const step = { queued: "queued", running: "running" }[job.status] || "done";
  let text = STATUS_WORDS[job.status] || job.status;
  // A running job stops at the worker's next batch boundary: the cancel answers "running".
  if (step !== "done" && state.cancelRequested) text = "Cancel requested\u2026 " + text;
  setStep(step, text, job.status === "failed" || job.status === "canceled");
  $("cancel-button").hidden = step === "done" || state.cancelRequested;
}

async function cancelJob() {
  if (!state.job) return;
  const generation = state.generation;  // a new photo meanwhile: this answer is not its job's
  const button = $("cancel-button");
  button.disabled = true;  // one cancel at a time
  const resp = await fetch("/v1/jobs/" + encodeURIComponent(state.job.id) + "/cancel",
    { method: "POST", headers: authHeaders() }).catch(() => null);
  button.disabled = false;
  if (generation !== state.generation) return;
  if (!resp) { showError(describeError(0)); return; }
  const body = await resp.json().catch(() => null);
  if (generation !== state.generation) return;
  if (resp.status === 409) {  // it ended first (the page polls every 2 s): show how, no error
    button.hidden = true;
    schedulePoll(state.job.id, generation, FIRST_POLL_MS);
    return;
  }
  if (!resp.ok) { showError(describeError(resp.status, body, resp.headers)); return; }
  state.cancelRequested = true;
  state.job = body;
  showJob(body);
}

// --- results ------------------------------------------------------------------------------
function trackUrl(url) {
  state.urls.push(url);
  return url;
}

function resetResults() {
  clearTimeout(state.pollTimer);
  if (state.xhr) {  // an upload still going: a new photo replaces it (its job would go unseen)
    state.xhr.abort();
    state.xhr = null;
  }
  state.urls.forEach((u) => URL.revokeObjectURL(u));
  state.urls = [];
  state.job = null;
  state.cancelRequested = false;
  state.pollFailures = 0;
  $("results").hidden = true;
  $("show-original").checked = false;
  $("show-original").disabled = false;
  $("download-overlay").hidden = false;
  $("left-caption").textContent = LEFT_PANELS.overlay[0];
  $("overlay-img").alt = LEFT_PANELS.overlay[1];
  $("overlay-img").removeAttribute("src");
  $("job-details").textContent = "";
}

// A result over 1 MP is drawn one at a time per key (over 4 MP, per API process), and the
// overlays in flight share a pixel budget: a busy server answers 503 with
// Retry-After, as it does 429 when the key is over its rate, and a proxy 502/504 while the API
// restarts. Wait as told (at most 10 s; else 1, 2, ... s), up to 5 times, instead of giving up
// on a finished job.
const RESULT_TRIES = 6;

async function fetchBlob(path) {
  for (let attempt = 1; ; attempt++) {
    const resp = await fetch(path, { headers: authHeaders() }).catch(() => null);
    if (resp && resp.ok) return resp.blob();
    const status = resp ? resp.status : 0;  // 0: the network (a proxy restarting, Wi-Fi)
    const body = resp ? await resp.json().catch(() => null) : null;
    if ((status !== 0 && !TRANSIENT_STATUSES.includes(status)) || attempt >= RESULT_TRIES) {
      throw new Error(describeError(status, body, resp && resp.headers));
    }
    const wait = resp ? parseInt(resp.headers.get("Retry-After"), 10) : NaN;
    const seconds = Number.isFinite(wait) ? Math.min(Math.max(wait, 0), 10) : attempt;
    await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
  }
}

async function loadResults(job, generation) {
  const base = "/v1/jobs/" + encodeURIComponent(job.id);
  // Each on its own: an overlay that cannot be drawn (its input purged after retention: a 410)
  // must not hide a mask that loaded.
  const [overlay, mask] = await Promise.allSettled(
    [fetchBlob(base + "/overlay.png"), fetchBlob(base + "/mask.png")]);
  if (generation !== state.generation) return;  // after each wait: a new photo replaces it
  if (mask.status === "rejected") {
    showError("The job finished but its mask could not be loaded: " + mask.reason.message);
    return;
  }
  // Without its overlay the photo itself is shown, and the overlay's download is hidden.
  state.overlayUrl = overlay.status === "fulfilled"
    ? trackUrl(URL.createObjectURL(overlay.value)) : state.originalUrl;
  const maskUrl = trackUrl(URL.createObjectURL(mask.value));
  showLeft(overlay.status === "fulfilled" ? "overlay" : "original");
  $("download-overlay").hidden = overlay.status !== "fulfilled";
  $("show-original").disabled = overlay.status !== "fulfilled";
  if (overlay.status === "rejected") {
    showError(sentence("The overlay could not be drawn, the mask is shown: " + overlay.reason.message));
  }
  try {
    await drawMask(mask.value);
  } catch (_err) {  // not an image after all (a proxy's page with a 200)
    if (generation === state.generation) showError("The job finished but its mask could not be drawn.");
    return;
  }
  if (generation !== state.generation) return;
  setDownload("download-overlay", state.overlayUrl, job.id + "-overlay.png");
  setDownload("download-mask", maskUrl, job.id + "-mask.png");
  $("mask-canvas").toBlob((blob) => {
    if (blob && generation === state.generation) setDownload("download-mask-colour", trackUrl(URL.createObjectURL(blob)), job.id + "-mask-colour.png");
  }, "image/png");
  showDetails(job);
  $("results").hidden = false;
}

async function drawMask(blob) {
  const bitmap = await createImageBitmap(blob);
  const canvas = $("mask-canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const d = pixels.data;
  for (let i = 0; i < d.length; i += 4) {
    const colour = MASK_COLOURS[d[i]] || [255, 255, 255];
    d[i] = colour[0]; d[i + 1] = colour[1]; d[i + 2] = colour[2]; d[i + 3] = 255;
  }
  ctx.putImageData(pixels, 0, 0);
}

function setDownload(id, url, name) {
  const a = $(id);
  a.href = url;
  a.download = name;
}

function showDetails(job) {
  const m = job.metrics || {};
  const fractions = job.result && job.result.class_fractions;
  const rows = [
    ["Job", job.id],
    ["Model", job.model_version || "-"],
    ["Size", job.input ? job.input.width + " \u00d7 " + job.input.height : "-"],
    ["Queue", m.queue_ms != null ? Math.round(m.queue_ms) + " ms" : "-"],
    ["Predict", m.predict_ms != null ? Math.round(m.predict_ms) + " ms (batch of " + (m.batch_size || 1) + ")" : "-"],
  ];
  if (fractions) {
    rows.push(["Pet / background / border", fractions.map((f) => (100 * f).toFixed(1) + "%").join(" / ")]);
  }
  const dl = $("job-details");
  dl.textContent = "";
  rows.forEach(([k, v]) => {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dl.append(dt, dd);
  });
}

// The left panel: the overlay or the photo itself, its caption and its alt text saying which
// (a screen reader announced the plain photo as the overlay).
const LEFT_PANELS = {
  overlay: ["Overlay", "The photo with the segmentation blended on it"],
  original: ["Original photo", "The original photo"],
};

function showLeft(which) {
  const [caption, alt] = LEFT_PANELS[which];
  $("overlay-img").src = which === "original" ? state.originalUrl : state.overlayUrl;
  $("overlay-img").alt = alt;
  $("left-caption").textContent = caption;
}

// --- wiring -------------------------------------------------------------------------------
function wire() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key && !KEY_PATTERN.test(key)) {
      showError("That key contains characters an API key cannot have (spaces, or letters " +
                "outside plain ASCII, often pasted along with it); copy it again.");
      return;
    }
    if (key) localStorage.setItem(KEY_STORAGE, key);
    showKeyState();
    clearError();
    // A poll refused for the key (Forget pressed, a key mis-pasted) stopped; this one goes on.
    if (jobUnfinished()) {
      showJob(state.job);
      schedulePoll(state.job.id, state.generation, FIRST_POLL_MS);
    }
  });
  $("key-forget").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    showKeyState();
  });
  $("file-input").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) startUpload(file);
    event.target.value = "";
  });
  const zone = $("drop-zone");
  ["dragenter", "dragover"].forEach((name) => zone.addEventListener(name, (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  }));
  ["dragleave", "drop"].forEach((name) => zone.addEventListener(name, () => zone.classList.remove("dragging")));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    const files = Array.from(event.dataTransfer.files);
    // One photo at a time here (`segsvc submit` takes folders): the first image dropped, and
    // a word on the others, which were dropped silently.
    const file = files.find((f) => !f.type || ALLOWED_TYPES.includes(f.type)) || files[0];
    if (!file || !startUpload(file)) return;  // refused: its reason stays shown
    if (files.length > 1) {
      const others = files.length - 1;
      showError("One photo at a time: sending " + file.name + "; the other " + others +
                (others === 1 ? " was" : " were") + " not sent.");
    }
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file-input").click(); }
  });
  $("cancel-button").addEventListener("click", cancelJob);
  $("show-original").addEventListener("change", (event) => {
    showLeft(event.target.checked ? "original" : "overlay");
  });
}

async function loadConfig() {
  try {
    const resp = await fetch("/ui/config.json");
    if (resp.ok) state.config = await resp.json();
  } catch (_err) { /* keep the defaults; the API still enforces the limits */ }
  $("max-size").textContent = formatBytes(state.config.max_upload_bytes);
  $("key-section").hidden = !state.config.auth_required;
}

wire();
showKeyState();
loadConfig().then(() => { document.body.dataset.ready = "true"; });
