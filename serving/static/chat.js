// The chat page of `jaxinfer serve` (GET /): streams /v1/chat/completions, keeps the conversation in this browser
// (localStorage; the API key only in this tab's sessionStorage), and stops an answer by closing its request (the server aborts it and frees its pages).
// No framework, no build step; text is only ever set as text (never parsed as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "jaxinfer.chat";
const FIELDS = ["system", "temperature", "top_p", "max_tokens", "api_key"];
let conversation = [];  // [{role, content}], what the next request sends after the system prompt
let model = null;
let running = null;     // the AbortController of the answer being streamed

function save() {  // the API key only for this tab's life (sessionStorage), the rest across visits
  const settings = Object.fromEntries(FIELDS.filter((f) => f !== "api_key").map((f) => [f, $(f).value]));
  localStorage.setItem(STORE, JSON.stringify({ conversation, settings }));
  sessionStorage.setItem(STORE + ".key", $("api_key").value);
}

function restore() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
    conversation = Array.isArray(saved.conversation) ? saved.conversation : [];
    for (const [f, v] of Object.entries(saved.settings || {})) if (FIELDS.includes(f) && f !== "api_key") $(f).value = v;
    $("api_key").value = sessionStorage.getItem(STORE + ".key") || "";
  } catch (e) { conversation = []; }
  for (const m of conversation) bubble(m.role, m.content);
}

function bubble(role, text) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  el.textContent = text;
  $("messages").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorText(resp) {
  try { return (await resp.json()).error.message; } catch (e) { return `HTTP ${resp.status}`; }
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) { $("model").textContent = resp.status === 401 ? "API key needed (settings)" : await errorText(resp); return; }
    model = (await resp.json()).data[0].id;
    $("model").textContent = model;
  } catch (e) { $("model").textContent = "server unreachable"; }
}

function setRunning(controller) {
  running = controller;
  $("send").disabled = !!controller;
  $("stop").disabled = !controller;
}

function number(id, parse) {
  const v = parse($(id).value);
  return Number.isFinite(v) ? v : undefined;
}

async function send(text) {
  if (!model) await loadModel();
  if (!model) { $("status").textContent = "no model: " + $("model").textContent; return; }
  conversation.push({ role: "user", content: text });
  bubble("user", text);
  save();
  const out = bubble("assistant", "");
  const system = $("system").value.trim();
  const body = {
    model, stream: true, stream_options: { include_usage: true },
    messages: system ? [{ role: "system", content: system }, ...conversation] : conversation,
    temperature: number("temperature", parseFloat), top_p: number("top_p", parseFloat),
    max_tokens: number("max_tokens", (s) => parseInt(s, 10)),
  };
  const controller = new AbortController();
  setRunning(controller);
  $("status").textContent = "waiting for the first token…";
  const t0 = performance.now();
  let first = null, chunks = 0, usage = null, finish = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {  // one server-sent event
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) throw new Error(msg.error.message);
          if (msg.usage) usage = msg.usage;
          for (const c of msg.choices || []) {
            if (c.delta && c.delta.content) {
              if (first === null) first = performance.now();
              chunks += 1;
              out.textContent += c.delta.content;
              out.scrollIntoView({ block: "end" });
              const s = (performance.now() - first) / 1000;
              if (s > 0.2) $("speed").textContent = `${(chunks / s).toFixed(1)} tok/s`;
            }
            if (c.finish_reason) finish = c.finish_reason;
          }
        }
      }
    }
    const tokens = usage ? usage.completion_tokens : chunks;
    const secs = first === null ? 0 : (performance.now() - first) / 1000;
    const rate = secs > 0 && tokens > 1 ? (tokens - 1) / secs : null;
    if (rate) $("speed").textContent = `${rate.toFixed(1)} tok/s`;
    $("status").textContent = `${tokens} tokens, first after ${(((first ?? performance.now()) - t0) / 1000).toFixed(2)} s` +
      (finish === "length" ? " (stopped at max tokens)" : "");
  } catch (e) {
    if (e.name === "AbortError") {
      $("status").textContent = "stopped";
    } else {
      out.classList.add("error");
      if (!out.textContent) out.textContent = "error";
      $("status").textContent = `error: ${e.message}`;
    }
  } finally {
    setRunning(null);
  }
  if (out.textContent && !out.classList.contains("error")) conversation.push({ role: "assistant", content: out.textContent });
  else if (!out.textContent) out.remove();
  save();
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || running) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (running) running.abort(); });
$("clear").addEventListener("click", () => {
  if (running) running.abort();
  conversation = [];
  $("messages").replaceChildren();
  $("status").textContent = "";
  save();
});
for (const f of FIELDS) $(f).addEventListener("change", () => { save(); if (f === "api_key") loadModel(); });

restore();
loadModel();
