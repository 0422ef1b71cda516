// The web chat: streams /v1/chat/completions (SSE) into the page. Model text is only ever set as textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];  // {role, content} of the conversation so far (answers only, reasoning is not sent back)
let model = null;
let controller = null;

for (const id of ["temperature", "top_p"]) {
  $(id).addEventListener("input", () => { $(id + "_value").textContent = $(id).value; });
}
$("api_key").value = localStorage.getItem("apertus_api_key") || "";
$("api_key").addEventListener("change", () => { localStorage.setItem("apertus_api_key", $("api_key").value); loadModel(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api_key").value) h.Authorization = "Bearer " + $("api_key").value;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    model = body.data[0].id;
    $("model").textContent = `${model} · context ${body.data[0].max_model_len.toLocaleString()} tokens`;
  } catch (e) {
    $("model").textContent = "not connected: " + e.message;
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text || "";
  div.append(content);
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function reasoningBox(msg) {
  let box = msg.querySelector("details.reasoning");
  if (!box) {
    box = document.createElement("details");
    box.className = "reasoning";
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    const text = document.createElement("div");
    text.className = "reasoning-text";
    box.append(summary, text);
    msg.prepend(box);
  }
  return box.querySelector(".reasoning-text");
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("prompt").disabled = on;
}

// Server-sent events: "data: {json}" blocks separated by a blank line, ending with "data: [DONE]".
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const msg = addMessage("assistant", "");
  msg.classList.add("streaming");
  const content = msg.querySelector(".content");
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
  messages.push(...conversation);
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value) || undefined,
    chat_template_kwargs: { enable_thinking: $("thinking").checked },
  };
  controller = new AbortController();
  busy(true);
  const t0 = performance.now();
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : `HTTP ${r.status}`);
    }
    for await (const chunk of events(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) {
        const s = (performance.now() - t0) / 1000;
        $("stats").textContent = `${chunk.usage.completion_tokens} tokens in ${s.toFixed(1)} s ` +
          `(${(chunk.usage.completion_tokens / s).toFixed(1)} tokens/s), prompt ${chunk.usage.prompt_tokens}`;
      }
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.reasoning_content) reasoningBox(msg).textContent += delta.reasoning_content;
      if (delta.content) {
        answer += delta.content;
        content.textContent = answer;
      }
      if (delta.tool_calls) {
        for (const call of delta.tool_calls) {
          const pre = document.createElement("pre");
          pre.className = "tool-call";
          pre.textContent = `${call.function.name}(${call.function.arguments})`;
          msg.append(pre);
        }
      }
      if (choice.finish_reason === "length") msg.classList.add("truncated");
      msg.scrollIntoView({ block: "end" });
    }
  } catch (e) {
    if (e.name === "AbortError") {
      msg.classList.add("stopped");
    } else {
      const err = document.createElement("div");
      err.className = "error";
      err.textContent = "Error: " + e.message;
      msg.append(err);
    }
  } finally {
    msg.classList.remove("streaming");
    controller = null;
    busy(false);
    $("prompt").focus();
  }
  conversation.push({ role: "assistant", content: answer });
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("new_chat").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  $("messages").replaceChildren();
  $("stats").textContent = "";
});

loadModel();
