// The diffuse serve page: fills the form from /api/models, queues a job (POST /api/jobs), follows its
// server-sent events (read with fetch, so a bearer token can be sent), then shows the grid and the
// single images. Everything comes from this server; no external scripts, fonts or CDNs.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY_MAX = 8;
let models = [], current = null, jobId = null, reader = null;
let token = new URLSearchParams(location.hash.slice(1)).get("token") || sessionStorage.getItem("diffuse-token") || "";

function headers(extra = {}) {
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

function status(text, bad = false) {
  $("status").textContent = text;
  $("status").classList.toggle("bad", bad);
}

async function errorText(res) {
  try {
    const body = await res.json();
    if (Array.isArray(body.detail)) {
      return body.detail.map((d) => `${(d.loc || []).filter((x) => x !== "body").join(".")}: ${d.msg}`).join("; ");
    }
    return body.detail || body.message || JSON.stringify(body);
  } catch (e) {
    return `${res.status} ${res.statusText}`;
  }
}

async function loadModels() {
  const res = await fetch("/api/models", { headers: headers() });
  if (res.status === 401) {
    $("token-row").hidden = false;
    $("model-info").textContent = "This server needs its access token.";
    status(token ? "That token was refused; enter the one the server was started with (--token)."
                 : "Enter the token the server was started with (--token), then press Generate.", true);
    return false;
  }
  if (!res.ok) { status(await errorText(res), true); return false; }
  const info = await res.json();
  models = info.models;
  $("model").replaceChildren(...models.map((m) => new Option(m.name, m.name)));
  $("sampler").replaceChildren(...info.samplers.map((s) => new Option(s.name, s.name)));
  $("sampler").value = info.defaults.sampler;
  $("steps").value = $("steps-num").value = info.defaults.steps;
  $("n").value = $("n-out").value = info.defaults.n;
  $("n").max = info.limits.max_images;
  selectModel();
  return true;
}

function selectModel() {
  current = models.find((m) => m.name === $("model").value) || models[0];
  if (!current) return;
  const m = current;
  $("model-info").textContent = `${m.name}: ${m.channels}×${m.image_size}×${m.image_size}, ` +
    `${m.class_cond ? m.classes.length + " classes" : "unconditional"}, trained ${m.step ?? "?"} steps` +
    (m.distilled ? `; distilled: ${m.default_steps} network call${m.default_steps > 1 ? "s" : ""} per image` : "");
  // each model samples with its own default (a distilled one: the consistency sampler at its NFE)
  $("sampler").value = m.default_sampler;
  $("steps").value = $("steps-num").value = m.default_steps;
  // the slider spans the useful range (up to 100 steps); the number box goes up to the model's limit
  $("steps").max = Math.min(100, m.max_steps);
  $("steps-num").max = m.max_steps;
  if (+$("steps-num").value > m.max_steps) $("steps").value = $("steps-num").value = m.max_steps;
  $("cond").hidden = !m.class_cond;
  if (m.class_cond) {
    const opts = [new Option("none (unconditional)", ""), new Option("all (cycle through classes)", "all")];
    m.classes.forEach((name, k) => opts.push(new Option(name === String(k) ? name : `${k}: ${name}`, String(k))));
    $("class").replaceChildren(...opts);
    $("class").value = "all";
    $("guidance").value = m.default_guidance;
    $("guidance-out").value = (+m.default_guidance).toFixed(1);
  }
  syncGuidance();
}

function syncGuidance() {
  $("guidance").disabled = !current || !current.class_cond || $("class").value === "";
}

function request() {
  const body = { model: current.name, sampler: $("sampler").value, steps: +$("steps-num").value, n: +$("n").value,
                 seed: +$("seed").value || 0 };
  if (current.class_cond && $("class").value !== "") {
    body.class = $("class").value === "all" ? "all" : +$("class").value;
    body.guidance = +$("guidance").value;
  }
  return body;
}

function setRunning(running) {
  $("generate").disabled = running;
  $("cancel").hidden = !running;
  $("progress-box").hidden = !running && $("progress-box").hidden;
}

async function generate(ev) {
  ev.preventDefault();
  if (!$("token-row").hidden) {
    token = $("token").value.trim();
    sessionStorage.setItem("diffuse-token", token);
    if (!current && !(await loadModels())) return;
    $("token-row").hidden = true;
  }
  if (!current) return;
  const body = request();
  setRunning(true);
  status("Queued…");
  $("progress").value = 0;
  $("progress-text").textContent = "";
  $("preview").hidden = true;
  $("progress-box").hidden = false;
  if (window.innerWidth < 700) $("output").scrollIntoView({ behavior: "smooth", block: "start" });   // phones
  try {
    const res = await fetch("/api/jobs", { method: "POST", headers: headers({ "Content-Type": "application/json" }),
                                           body: JSON.stringify(body) });
    if (res.status === 429) {
      const wait = res.headers.get("Retry-After") || "a few";
      throw new Error(`The server is busy (queue full); try again in ${wait} s.`);
    }
    if (!res.ok) throw new Error(await errorText(res));
    const job = await res.json();
    jobId = job.id;
    const final = await follow(job.id);
    if (final.event === "done") {
      await showResult(job.id, body);
      status(`Done in ${(+final.seconds).toFixed(1)} s.`);
    } else if (final.event === "cancelled") {
      status("Cancelled.");
    } else {
      throw new Error(final.error || "generation failed");
    }
  } catch (e) {
    status(e.message, true);
  } finally {
    jobId = null;
    setRunning(false);
    $("progress-box").hidden = true;
  }
}

// Server-sent events over fetch: "event: NAME\ndata: JSON\n\n" blocks; returns the terminal event.
async function follow(id) {
  const res = await fetch(`/api/jobs/${id}/events`, { headers: headers({ Accept: "text/event-stream" }) });
  if (!res.ok) throw new Error(await errorText(res));
  reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (!data) continue;
        const ev = JSON.parse(data);
        onEvent(ev);
        if (["done", "failed", "cancelled"].includes(ev.event)) return ev;
      }
    }
  } finally {
    reader = null;
  }
  throw new Error("the progress stream ended early");
}

function onEvent(ev) {
  if (ev.total) $("progress").max = ev.total;
  if (ev.event === "queued") status(ev.position > 1 ? `Queued: ${ev.position - 1} ahead of you…` : "Starting…");
  if (ev.event === "started") status(ev.batch_jobs > 1 ? `Generating (batched with ${ev.batch_jobs - 1} other requests)…` : "Generating…");
  if (ev.event === "progress") {
    $("progress").value = ev.step;
    $("progress-text").textContent = `step ${ev.step} of ${ev.total}`;
    if (ev.preview) { $("preview").src = ev.preview; $("preview").hidden = false; }
  }
}

async function showResult(id, body) {
  const [gridRes, jsonRes] = await Promise.all([
    fetch(`/api/jobs/${id}/result?format=png`, { headers: headers() }),
    fetch(`/api/jobs/${id}/result?format=json`, { headers: headers() }),
  ]);
  if (!gridRes.ok) throw new Error(await errorText(gridRes));
  if (!jsonRes.ok) throw new Error(await errorText(jsonRes));
  const gridUrl = URL.createObjectURL(await gridRes.blob());
  const result = await jsonRes.json();
  const cls = body.class === undefined ? "" : `, class ${body.class}`;
  const entry = { body, gridUrl, result, label: `${body.sampler} ${body.steps} steps, seed ${body.seed}, ${body.n} images${cls}` };
  show(entry);
  addHistory(entry);
}

function show(entry) {
  const { body, gridUrl, result } = entry;
  const stem = `diffuse-${result.model}-seed${result.seed}`;
  $("grid").src = gridUrl;
  $("download-grid").href = gridUrl;
  $("download-grid").download = `${stem}.png`;
  // the speed a user compares a distilled model by: network calls per image, images per second
  const speed = result.seconds > 0 ? `; ${result.nfe} network calls, ${(result.batch_images / result.seconds).toFixed(1)} images/s` : "";
  $("result-info").textContent = `${result.model}: ${entry.label}` +
    (body.class !== undefined ? `, guidance ${body.guidance}` : "") + speed + ".";
  $("result").hidden = false;
  $("empty").hidden = true;
  $("images").replaceChildren(...result.images.map((im) => {
    const a = document.createElement("a");
    a.href = `data:image/png;base64,${im.png}`;
    a.download = `${stem}-${im.index}.png`;
    a.title = `image ${im.index} of seed ${im.seed}${im.class_name != null ? ", class " + im.class_name : ""} (download)`;
    const img = document.createElement("img");
    img.src = a.href;
    img.alt = a.title;
    a.append(img);
    return a;
  }));
}

function addHistory(entry) {
  const li = document.createElement("li");
  const b = document.createElement("button");
  b.type = "button";
  const img = document.createElement("img");
  img.src = entry.gridUrl;
  img.alt = "";
  b.append(img, document.createTextNode(entry.label));
  b.addEventListener("click", () => { restore(entry.body); show(entry); });
  li.append(b);
  $("history").prepend(li);
  while ($("history").children.length > HISTORY_MAX) {
    const old = $("history").lastElementChild;
    old.remove();
  }
  $("history-box").hidden = false;
}

function restore(body) {
  $("model").value = body.model; selectModel();
  $("sampler").value = body.sampler;
  $("steps").value = $("steps-num").value = body.steps;
  $("n").value = $("n-out").value = body.n;
  $("seed").value = body.seed;
  if (body.class !== undefined) { $("class").value = String(body.class); $("guidance").value = body.guidance;
    $("guidance-out").value = (+body.guidance).toFixed(1); }
  syncGuidance();
}

async function cancel() {
  if (!jobId) return;
  await fetch(`/api/jobs/${jobId}`, { method: "DELETE", headers: headers() });
}

document.addEventListener("DOMContentLoaded", () => {
  if (location.hash.includes("token=")) {
    sessionStorage.setItem("diffuse-token", token);
    history.replaceState(null, "", location.pathname);        // keep the token out of the address bar
  }
  $("controls").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("model").addEventListener("change", selectModel);
  $("class").addEventListener("change", syncGuidance);
  $("steps").addEventListener("input", () => { $("steps-num").value = $("steps").value; });
  $("steps-num").addEventListener("change", () => {
    const v = Math.max(1, Math.min(+$("steps-num").max, Math.round(+$("steps-num").value) || 1));
    $("steps").value = $("steps-num").value = v;
  });
  $("n").addEventListener("input", () => { $("n-out").value = $("n").value; });
  $("guidance").addEventListener("input", () => { $("guidance-out").value = (+$("guidance").value).toFixed(1); });
  $("random-seed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 31); });
  loadModels().catch((e) => status(`cannot reach the server: ${e.message}`, true));
});
