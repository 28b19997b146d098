// segsvc web page: upload a photo, follow the job, show overlay and mask. No dependencies.
"use strict";

const KEY_STORAGE = "segsvc.apiKey";
// Mask values 0 pet, 1 background, 2 border, coloured like the legend (raw 0/1/2 looks black);
// any other value white. RGBA.
const MASK_COLOURS = [[255, 64, 64, 255], [40, 44, 60, 255], [255, 220, 0, 255]];
const MASK_OTHER = [255, 255, 255, 255];
// The overlay as the server draws it (segsvc/ml/imaging.py: PALETTE, OVERLAY_ALPHA, rounded
// to bytes): pet 50% red, background untouched, border 60% yellow, any other value untouched.
const OVERLAY_COLOURS = [[255, 64, 64, 128], [0, 0, 0, 0], [255, 220, 0, 153]];
const OVERLAY_OTHER = [0, 0, 0, 0];
// The pictures on screen are drawn at most this wide (CSS pixels, the page's width, at the
// screen's density) and this many pixels in all: a 24 MP photo's full-size overlay and mask
// held about 200 MB of canvas and pixel copies for a picture shown 500 pixels wide.
const DISPLAY_MAX_WIDTH = 1100;
const DISPLAY_MAX_PIXELS = 4_000_000;
const ALLOWED_TYPES = ["image/jpeg", "image/png", "image/webp"];
const STATUS_WORDS = {
  checking: "Checking on the job\u2026",
  queued: "Waiting in the queue for a worker.",
  running: "A worker is segmenting the photo.",
  succeeded: "Done.",
  failed: "The job failed.",
  canceled: "The job was canceled.",
};
const LOADING_RESULT = "Loading the result\u2026";

const $ = (id) => document.getElementById(id);
const state = { config: { auth_required: true, max_upload_bytes: 10 * 1024 * 1024, max_pixels: 0 },
                job: null, urls: [], pollTimer: null, generation: 0, picks: 0, overlayUrl: null,
                originalUrl: null, xhr: null, cancelRequested: false, pollFailures: 0 };

// What an HTTP header can carry: a key pasted with a zero-width space or an ellipsis made
// every request throw in setRequestHeader, and the page hung at "Uploading... 0%".
const KEY_PATTERN = /^[\x21-\x7e]+$/;

// --- the key: in localStorage, or in this page's memory where the browser refuses storage --
// With site data blocked (Chrome's "block all cookies") every localStorage access throws: the
// page never started, "Save key" did nothing and a chosen photo failed in silence.
const keyStore = { blocked: false, memory: "" };

function storedKey() {
  if (!keyStore.blocked) {
    try {
      return window.localStorage.getItem(KEY_STORAGE) || "";
    } catch (_err) {
      keyStore.blocked = true;
    }
  }
  return keyStore.memory;
}

function storeKey(key) {  // "" forgets it
  if (!keyStore.blocked) {
    try {
      if (key) window.localStorage.setItem(KEY_STORAGE, key);
      else window.localStorage.removeItem(KEY_STORAGE);
      return;
    } catch (_err) {  // blocked, or full (a private window's quota)
      keyStore.blocked = true;
    }
  }
  keyStore.memory = key;
}

function apiKey() {
  const key = storedKey();
  return KEY_PATTERN.test(key) ? key : "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: "Bearer " + key } : {};
}

function code(text) {
  const element = document.createElement("code");
  element.textContent = text;
  return element;
}

function showKeyState() {
  const key = apiKey();
  if (key) {
    $("key-state").textContent = (keyStore.blocked ? "Key kept in this page (" : "Key saved in this browser (")
      + key.slice(0, 8) + "\u2026).";
  } else {  // as index.html has it (a string here showed its backticks)
    $("key-state").replaceChildren("No key saved yet. ", code("make run"), " prints one (also in ",
      code("var/local_api_key"), ").");
  }
  $("storage-note").hidden = !keyStore.blocked;
  $("api-key").value = "";
  $("api-key").placeholder = key ? "saved; paste a new key to replace it" : "seg_...";
}

function formatBytes(n) {
  if (n >= 1024 * 1024) return (n / 1024 / 1024).toFixed(n % (1024 * 1024) ? 1 : 0) + " MB";
  if (n >= 10 * 1024) return Math.round(n / 1024) + " KB";
  if (n >= 1024) return (n / 1024).toFixed(1).replace(/\.0$/, "") + " KB";
  return n + (n === 1 ? " byte" : " bytes");  // a small file was "(0 KB)"
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

// Information, not an error (no alert): it goes at the next thing the user does.
function showNotice(text) {
  $("notice-box").textContent = text;
  $("notice-box").hidden = false;
}

function clearNotice() {
  $("notice-box").hidden = true;
  $("notice-box").textContent = "";
}

function clearMessages() {
  clearError();
  clearNotice();
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

// The photo's width and height as the browser reads them from its header (no pixels are
// decoded for this); null where it cannot: the server judges that file.
function imageSize(file) {
  return new Promise((resolve) => {
    const url = URL.createObjectURL(file);
    const img = new Image();
    const done = (size) => { URL.revokeObjectURL(url); img.removeAttribute("src"); resolve(size); };
    img.onload = () => done([img.naturalWidth, img.naturalHeight]);
    img.onerror = () => done(null);
    img.src = url;
  });
}

// The server's own words for a photo over SEG_MAX_PIXELS, said before sending it.
function pixelProblem(size) {
  const pixels = size ? size[0] * size[1] : 0;
  const limit = state.config.max_pixels;
  return limit && pixels > limit
    ? "That file could not be used as an image. The image has " + pixels
      + " pixels, more than the limit of " + limit + "."
    : null;
}

function setJobInUrl(jobId) {  // a reload comes back to the job (#job=<id>)
  const url = location.pathname + location.search + (jobId ? "#job=" + encodeURIComponent(jobId) : "");
  history.replaceState(null, "", url);
}

async function startUpload(file) {  // whether it started (else the error box says why not)
  clearMessages();
  let problem = checkFile(file);
  if (!problem && state.config.max_pixels) {
    const pick = ++state.picks;
    const size = await imageSize(file);
    if (pick !== state.picks) return false;  // another photo came meanwhile
    problem = pixelProblem(size);
  }
  if (problem) {
    showError(problem);
    return false;
  }
  resetResults();
  setJobInUrl(null);
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
      setJobInUrl(body.id);
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

// A reload (or a link) with #job=<id>: follow that job again, and show its result when done.
// The photo itself is not in the page any more: the server's overlay.png is shown instead.
function jobFromUrl() {
  const match = /^#job=([\w.~%-]{1,200})$/.exec(location.hash);
  if (!match) return null;
  try { return decodeURIComponent(match[1]); } catch (_err) { return null; }
}

function resumeJob(jobId) {
  resetResults();
  const generation = ++state.generation;
  state.job = { id: jobId, status: "checking" };
  $("progress-box").hidden = false;
  setProgress(100);
  if (state.config.auth_required && !apiKey()) {  // saving a key starts the polls
    setStep("queued", "Paste your API key above to check on job " + jobId + ".");
    $("cancel-button").hidden = true;
    return;
  }
  showJob(state.job);
  schedulePoll(jobId, generation, FIRST_POLL_MS);
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
  const step = { checking: "queued", queued: "queued", running: "running" }[job.status] || "done";
  let text = STATUS_WORDS[job.status] || job.status;
  // A running job stops at the worker's next batch boundary: the cancel answers "running".
  if (step !== "done" && state.cancelRequested) text = "Cancel requested\u2026 " + text;
  setStep(step, text, job.status === "failed" || job.status === "canceled");
  $("cancel-button").hidden = step === "done" || state.cancelRequested || job.status === "checking";
}

async function cancelJob() {
  if (!state.job) return;
  clearNotice();
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
  state.originalUrl = null;
  state.overlayUrl = null;
  state.cancelRequested = false;
  state.pollFailures = 0;
  $("results").hidden = true;
  $("show-original").checked = false;
  $("show-original").disabled = false;
  $("left-figure").hidden = false;
  $("download-overlay").hidden = false;
  resetOverlayDownload();
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

// The result is drawn here, from the photo the page holds and the small mask PNG: the server's
// overlay.png is as large as the photo (28 MB for a 24 MP JPEG of 3 MB), and the page said
// "Done." and then showed nothing for as long as it took to download. It is fetched only when
// its download link is clicked, or shown where the page lacks the photo (after a reload) or
// cannot line the mask up with it.
async function loadResults(job, generation) {
  const base = "/v1/jobs/" + encodeURIComponent(job.id);
  setStep("done", LOADING_RESULT);
  // Each on its own: an overlay that cannot be drawn (its input purged after retention: a 410)
  // must not hide a mask that loaded.
  const serverOverlay = state.originalUrl ? null : settle(fetchBlob(base + "/overlay.png"));
  const [mask] = await Promise.all([settle(fetchBlob(base + "/mask.png")), serverOverlay]);
  if (generation !== state.generation) return;  // after each wait: a new photo replaces it
  if (mask.error) {
    showError("The job finished but its mask could not be loaded: " + mask.error.message);
    setStep("done", STATUS_WORDS.succeeded);
    return;
  }
  let layers;
  try {
    layers = await maskLayers(mask.value);
    await drawMask(layers);
  } catch (_err) {  // not an image after all (a proxy's page with a 200)
    if (generation === state.generation) {
      showError("The job finished but its mask could not be drawn.");
      setStep("done", STATUS_WORDS.succeeded);
    }
    return;
  }
  if (generation !== state.generation) return;
  let overlay = state.originalUrl ? await drawOverlay(state.originalUrl, layers) : null;
  if (generation !== state.generation) return;
  let fetched = null;
  if (overlay) {
    overlay = trackUrl(URL.createObjectURL(overlay));
  } else {  // no photo here, or one the mask does not fit: the server's
    fetched = await (serverOverlay || settle(fetchBlob(base + "/overlay.png")));
    if (generation !== state.generation) return;
    overlay = fetched.value ? trackUrl(URL.createObjectURL(fetched.value)) : null;
  }
  state.overlayUrl = overlay;
  // Without an overlay the photo itself is shown (none after a reload), and the overlay's
  // download is hidden; the server's, fetched already, is the download as it is.
  $("download-overlay").hidden = !overlay;
  $("show-original").disabled = !overlay || !state.originalUrl;
  $("left-figure").hidden = !overlay && !state.originalUrl;
  if (overlay || state.originalUrl) showLeft(overlay ? "overlay" : "original");
  if (fetched && fetched.error) {
    showError(sentence("The overlay could not be drawn, the mask is shown: " + fetched.error.message));
  }
  if (fetched && fetched.value) setOverlayDownload(overlay, job.id);
  setDownload("download-mask", trackUrl(URL.createObjectURL(mask.value)), job.id + "-mask.png");
  setDownload("download-mask-colour", trackUrl(URL.createObjectURL(layers.colour)), job.id + "-mask-colour.png");
  showDetails(job);
  $("results").hidden = false;
  setStep("done", STATUS_WORDS.succeeded);
}

function settle(promise) {  // {value} or {error}: one failure does not reject the others
  return promise.then((value) => ({ value }), (error) => ({ error }));
}

// The canvas size a picture is drawn at on screen: at most the page's width at this screen's
// density and DISPLAY_MAX_PIXELS, never larger than the picture.
function displaySize(width, height) {
  const density = Math.min(Math.max(window.devicePixelRatio || 1, 1), 3);
  const scale = Math.min(1, (DISPLAY_MAX_WIDTH * density) / width,
    Math.sqrt(DISPLAY_MAX_PIXELS / (width * height)));
  return [Math.max(1, Math.round(width * scale)), Math.max(1, Math.round(height * scale))];
}

// --- the mask's colours without decoding it ----------------------------------------------
// The served mask is an 8-bit greyscale PNG whose values are the classes. The same bytes with
// the IHDR's colour type set to "palette" and a palette (and transparency) added are a PNG of
// the classes in colour: the legend's colours for the mask, the overlay's colours at its
// opacity to draw over the photo. Nothing is decoded or copied pixel by pixel in JavaScript,
// so a 24 MP mask costs a few kilobytes here, not 100 MB of pixel arrays.
const PNG_SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function pngChunk(type, data) {  // length, type, data, CRC-32 of type + data
  const chunk = new Uint8Array(12 + data.length);
  const view = new DataView(chunk.buffer);
  view.setUint32(0, data.length);
  for (let i = 0; i < 4; i++) chunk[4 + i] = type.charCodeAt(i);
  chunk.set(data, 8);
  view.setUint32(8 + data.length, crc32(chunk.subarray(4, 8 + data.length)));
  return chunk;
}

// {width, height, chunks}: an 8-bit greyscale PNG's size and its IDAT chunks as stored; null
// for any other PNG. Ancillary chunks are left out: some (tRNS, bKGD, sBIT) are laid out
// differently for a palette image.
function greyscalePng(bytes) {
  if (bytes.length < 33 || PNG_SIGNATURE.some((b, i) => bytes[i] !== b)) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const type = (at) => String.fromCharCode(...bytes.subarray(at, at + 4));
  if (view.getUint32(8) !== 13 || type(12) !== "IHDR" || bytes[24] !== 8 || bytes[25] !== 0) return null;
  const chunks = [];
  for (let at = 33; at + 12 <= bytes.length;) {
    const end = at + 12 + view.getUint32(at);
    if (end > bytes.length) return null;
    if (type(at + 4) === "IDAT") chunks.push(bytes.subarray(at, end));
    if (type(at + 4) === "IEND") break;
    at = end;
  }
  if (!chunks.length) return null;
  return { width: view.getUint32(16), height: view.getUint32(20), ihdr: bytes.slice(16, 29), chunks };
}

function palettePng(grey, colours, other) {
  const ihdr = grey.ihdr.slice();
  ihdr[9] = 3;  // colour type: palette
  const palette = new Uint8Array(256 * 3);
  const alpha = new Uint8Array(256);
  for (let i = 0; i < 256; i++) {
    const colour = colours[i] || other;
    palette.set(colour.slice(0, 3), 3 * i);
    alpha[i] = colour[3];
  }
  const parts = [new Uint8Array(PNG_SIGNATURE), pngChunk("IHDR", ihdr), pngChunk("PLTE", palette)];
  if (alpha.some((a) => a !== 255)) parts.push(pngChunk("tRNS", alpha));
  return new Blob([...parts, ...grey.chunks, pngChunk("IEND", new Uint8Array(0))], { type: "image/png" });
}

// Any other mask (one a proxy re-encoded, say): decoded and coloured pixel by pixel.
async function recolouredPng(bitmap, colours, other) {
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const d = pixels.data;
  for (let i = 0; i < d.length; i += 4) {
    const colour = colours[d[i]] || other;
    d[i] = colour[0]; d[i + 1] = colour[1]; d[i + 2] = colour[2]; d[i + 3] = colour[3];
  }
  ctx.putImageData(pixels, 0, 0);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  canvas.width = 0;
  if (!blob) throw new Error("the mask could not be coloured");
  return blob;
}

// {width, height, colour, overlay}: the mask's size and two PNGs at that size, the mask in the
// legend's colours (also the mask-colour.png download) and the overlay's colours to blend.
async function maskLayers(blob) {
  const grey = greyscalePng(new Uint8Array(await blob.arrayBuffer()));
  if (grey) {
    return { width: grey.width, height: grey.height,
             colour: palettePng(grey, MASK_COLOURS, MASK_OTHER),
             overlay: palettePng(grey, OVERLAY_COLOURS, OVERLAY_OTHER) };
  }
  const bitmap = await createImageBitmap(blob);
  try {
    return { width: bitmap.width, height: bitmap.height,
             colour: await recolouredPng(bitmap, MASK_COLOURS, MASK_OTHER),
             overlay: await recolouredPng(bitmap, OVERLAY_COLOURS, OVERLAY_OTHER) };
  } finally {
    bitmap.close();
  }
}

async function drawMask(layers) {
  const [width, height] = displaySize(layers.width, layers.height);
  const bitmap = await createImageBitmap(layers.colour);
  const canvas = $("mask-canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;  // only the legend's colours, no blends of them
  ctx.drawImage(bitmap, 0, 0, width, height);
  bitmap.close();
}

// The photo with the overlay's colours blended on it, as a PNG at display size; null where
// the browser cannot decode the photo or the mask is not its size. The mask is at the size
// of the photo as the server turned it by its EXIF orientation, which is how the browser
// shows it (the <img> and drawImage alike): a mask of another size was made by another rule
// (the jobs stored before 2026-11-27 that turned a WebP by its tag), and the server's
// overlay knows how to draw those.
async function drawOverlay(photoUrl, layers) {
  const photo = new Image();
  photo.src = photoUrl;
  try {
    await photo.decode();
  } catch (_err) {
    return null;
  }
  if (photo.naturalWidth !== layers.width || photo.naturalHeight !== layers.height) return null;
  const [width, height] = displaySize(layers.width, layers.height);
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(photo, 0, 0, width, height);
  photo.removeAttribute("src");  // the full-size decode can go
  const colours = await createImageBitmap(layers.overlay);
  ctx.drawImage(colours, 0, 0, width, height);
  colours.close();
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  canvas.width = 0;
  return blob;
}

// overlay.png, fetched when its link is clicked (the server draws it at the photo's size).
function resetOverlayDownload() {
  const link = $("download-overlay");
  link.href = "#";
  link.removeAttribute("download");
  delete link.dataset.ready;
  link.textContent = "overlay.png";
}

function setOverlayDownload(url, jobId) {
  setDownload("download-overlay", url, jobId + "-overlay.png");
  $("download-overlay").dataset.ready = "true";
}

async function downloadOverlay(event) {
  const link = event.currentTarget;
  if (link.dataset.ready) return;  // fetched already: the browser saves it
  event.preventDefault();
  if (!state.job || link.getAttribute("aria-busy") === "true") return;
  clearMessages();
  const job = state.job;
  const generation = state.generation;
  link.setAttribute("aria-busy", "true");
  link.textContent = "overlay.png (preparing\u2026)";
  let blob;
  try {
    blob = await fetchBlob("/v1/jobs/" + encodeURIComponent(job.id) + "/overlay.png");
  } catch (err) {
    if (generation === state.generation) showError(sentence("overlay.png could not be downloaded: " + err.message));
    return;
  } finally {
    link.removeAttribute("aria-busy");
    link.textContent = "overlay.png";
  }
  if (generation !== state.generation) return;
  setOverlayDownload(trackUrl(URL.createObjectURL(blob)), job.id);
  link.click();
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
    if (key) storeKey(key);
    showKeyState();
    clearMessages();
    // A poll refused for the key (Forget pressed, a key mis-pasted) stopped; this one goes on.
    if (jobUnfinished()) {
      showJob(state.job);
      schedulePoll(state.job.id, state.generation, FIRST_POLL_MS);
    }
  });
  $("key-forget").addEventListener("click", () => {
    storeKey("");
    showKeyState();
    clearNotice();
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
  zone.addEventListener("drop", async (event) => {
    event.preventDefault();
    const files = Array.from(event.dataTransfer.files);
    // One photo at a time here (`segsvc submit` takes folders): the first image dropped, and
    // a word on the others, which were dropped silently.
    const file = files.find((f) => !f.type || ALLOWED_TYPES.includes(f.type)) || files[0];
    if (!file || !(await startUpload(file))) return;  // refused: its reason stays shown
    if (files.length > 1) {  // information, not an error: gone at the next upload
      const others = files.length - 1;
      showNotice("One photo at a time: sending " + file.name + "; the other " + others +
                 (others === 1 ? " was" : " were") + " not sent.");
    }
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file-input").click(); }
  });
  $("cancel-button").addEventListener("click", cancelJob);
  $("download-overlay").addEventListener("click", downloadOverlay);
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
loadConfig().then(() => {
  const jobId = jobFromUrl();
  if (jobId) resumeJob(jobId);
  document.body.dataset.ready = "true";
});
