// Seedling playground logic: plain browser JavaScript, no build step, no dependencies.
// Chat streams from POST /v1/chat/completions (stream: true, include_usage) and reads the SSE body
// with fetch + ReadableStream; the task forms POST to /summarize, /translate, /classify and /extract.
// The API key is kept in this page's memory only (never in localStorage or cookies).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], controller: null };

// ---------------------------------------------------------------- HTTP helpers
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorMessage(response) {
  // the server's error envelope: {"error": {"message", "type", "param", "code"}}
  try {
    const body = await response.json();
    if (body && body.error) return `${response.status} ${body.error.type}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function postJSON(path, body) {
  const t0 = performance.now();
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) throw new Error(await errorMessage(response));
  return { data: await response.json(), ms: performance.now() - t0 };
}

// Yields each SSE event's data string ("[DONE]" included) from a fetch Response body.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}

function usageText(usage) {
  if (!usage) return "";
  return `tokens: ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion = ${usage.total_tokens}`;
}

// ---------------------------------------------------------------- status
async function refreshStatus() {
  const pill = $("ready");
  try {
    const r = await fetch("/ready");
    pill.textContent = r.ok ? "ready" : "not ready";
    pill.className = `pill ${r.ok ? "ok" : "bad"}`;
    if (r.ok && !$("model-name").textContent) {
      const m = await fetch("/v1/models", { headers: headers() });
      if (m.ok) {
        const body = await m.json();
        if (body.data && body.data.length) $("model-name").textContent = body.data[0].id;
      }
    }
  } catch (_) {
    pill.textContent = "offline";
    pill.className = "pill bad";
  }
}

// ---------------------------------------------------------------- chat
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("transcript").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy) {
  $("chat-send").disabled = busy;
  $("chat-stop").disabled = !busy;
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || state.controller) return;
  $("chat-input").value = "";
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant streaming", "");
  const system = $("chat-system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...state.messages] : state.messages;
  const body = {
    messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("chat-temperature").value || 0),
    max_tokens: Number($("chat-max-tokens").value || 128),
    seed: optionalNumber("chat-seed"),
  };
  state.controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let tFirst = null, chunks = 0, usage = null, finish = null, reply = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of sseEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(`${chunk.error.type}: ${chunk.error.message}`);
      if (chunk.usage) usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      if (choice.finish_reason) finish = choice.finish_reason;
      const delta = (choice.delta && choice.delta.content) || "";
      if (delta) {
        if (tFirst === null) tFirst = performance.now();
        chunks += 1;
        reply += delta;
        out.textContent = reply;
        out.scrollIntoView({ block: "end" });
      }
    }
    state.messages.push({ role: "assistant", content: reply });
  } catch (err) {
    if (err.name === "AbortError") {
      finish = "stopped";
      state.messages.push({ role: "assistant", content: reply });
    } else {
      state.messages.pop(); // the failed turn is not part of the conversation
      out.classList.add("error");
      out.textContent = (reply ? `${reply}\n` : "") + `error: ${err.message}`;
    }
  } finally {
    out.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
  }
  const total = performance.now() - t0;
  const generated = usage ? usage.completion_tokens : chunks;
  const parts = [];
  if (tFirst !== null) parts.push(`first token ${(tFirst - t0).toFixed(0)} ms`);
  parts.push(`total ${total.toFixed(0)} ms`);
  if (tFirst !== null && generated > 1) {
    parts.push(`${((generated - 1) / ((performance.now() - tFirst) / 1000 || 1)).toFixed(1)} tok/s`);
  }
  if (usage) parts.push(usageText(usage));
  if (finish) parts.push(`finish: ${finish}`);
  $("chat-stats").textContent = parts.join(" · ");
}

// ---------------------------------------------------------------- tasks
function showStats(id, ms, usage, extra) {
  $(id).textContent = [`${ms.toFixed(0)} ms`, usageText(usage), extra].filter(Boolean).join(" · ");
}

function wireTask(formId, outId, statsId, path, buildBody, render) {
  $(formId).addEventListener("submit", async (event) => {
    event.preventDefault();
    const out = $(outId);
    const button = $(formId).querySelector("button[type=submit]");
    out.className = "out";
    out.textContent = "…";
    $(statsId).textContent = "";
    button.disabled = true;
    try {
      const body = buildBody(); // may throw (e.g. a schema that is not JSON): shown like a server error
      const { data, ms } = await postJSON(path, body);
      render(out, data);
      showStats(statsId, ms, data.usage, data.finish_reason ? `finish: ${data.finish_reason}` : "");
    } catch (err) {
      out.className = "out error";
      out.textContent = `error: ${err.message}`;
    } finally {
      button.disabled = false;
    }
  });
}

function optionalNumber(id) {
  const v = $(id).value.trim();
  return v ? Number(v) : undefined;
}

function renderScores(out, data) {
  out.textContent = "";
  const head = document.createElement("div");
  head.textContent = `label: ${data.label}`;
  out.appendChild(head);
  for (const { label, score } of data.scores || []) {
    const row = document.createElement("div");
    row.className = "bar";
    const name = document.createElement("span");
    name.textContent = label;
    const track = document.createElement("span");
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${Math.max(1, score * 100).toFixed(1)}%`;
    track.appendChild(fill);
    const pct = document.createElement("span");
    pct.textContent = score.toFixed(3);
    row.append(name, track, pct);
    out.appendChild(row);
  }
}

wireTask("summarize-form", "summarize-out", "summarize-stats", "/summarize",
  () => ({ text: $("summarize-text").value, max_words: optionalNumber("summarize-max-words") }),
  (out, data) => { out.textContent = data.text; });

wireTask("translate-form", "translate-out", "translate-stats", "/translate",
  () => ({
    text: $("translate-text").value,
    target_lang: $("translate-target").value.trim(),
    source_lang: $("translate-source").value.trim() || undefined,
  }),
  (out, data) => { out.textContent = data.text; });

wireTask("classify-form", "classify-out", "classify-stats", "/classify",
  () => {
    const labels = $("classify-labels").value.split(",").map((s) => s.trim()).filter(Boolean);
    return { text: $("classify-text").value, labels: labels.length ? labels : undefined };
  },
  renderScores);

wireTask("extract-form", "extract-out", "extract-stats", "/extract",
  () => {
    let schema;
    try {
      schema = JSON.parse($("extract-schema").value);
    } catch (err) {
      throw new Error(`the schema is not JSON: ${err.message}`);
    }
    return { text: $("extract-text").value, schema };
  },
  (out, data) => { out.textContent = data.data === null ? "(cut short by max_tokens)" : JSON.stringify(data.data, null, 2); });

// ---------------------------------------------------------------- wiring
$("chat-form").addEventListener("submit", sendChat);
$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});
$("chat-stop").addEventListener("click", () => state.controller && state.controller.abort());
$("chat-clear").addEventListener("click", () => {
  state.messages = [];
  $("transcript").textContent = "";
  $("chat-stats").textContent = "";
});
refreshStatus();
setInterval(refreshStatus, 5000);
