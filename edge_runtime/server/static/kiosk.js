"use strict";

// Kiosk chat: keeps the conversation here and sends all of it each turn (the server reuses its KV cache for
// the common prefix), streams the reply over server-sent events, and writes model and user text only as
// text nodes. URL options: ?system=...&temperature=...&max_tokens=...&idle=SECONDS (300 by default, 0 = never)
// &think=1 (the model thinks first; its thought is shown collapsed above the reply).

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), newChat: $("new-chat"), transcript: $("transcript"), status: $("status"),
  statusNewChat: $("status-new-chat"), keyForm: $("key-form"), key: $("key"), composer: $("composer"),
  prompt: $("prompt"), send: $("send"), stop: $("stop"),
};
const KEY_STORAGE = "edge-runtime.api-key";
const LINE_END = /\r\n|\r|\n/;
const params = new URLSearchParams(location.search);
const settings = {
  system: params.get("system") || "",
  temperature: numberParam("temperature", (v) => v >= 0),
  maxTokens: numberParam("max_tokens", (v) => Number.isInteger(v) && v > 0),
  idleSeconds: Math.min(numberParam("idle", (v) => v >= 0) ?? 300, 86400),
  think: params.get("think") === "1",
};

let sessionKey = storedKey();
let conversation = { messages: [] };
let controller = null;
let idleTimer = 0;
let followEnd = true;

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function numberParam(name, valid) {
  const raw = params.get(name);
  if (raw === null || raw.trim() === "") return undefined;
  const value = Number(raw);
  return Number.isFinite(value) && valid(value) ? value : undefined;
}

function storedKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

function storeKey(key) {
  try {
    localStorage.setItem(KEY_STORAGE, key);
  } catch {
    // Storage may be disabled; the key then lasts until the page reloads.
  }
  sessionKey = key;
}

function headers() {
  const result = { "Content-Type": "application/json" };
  if (sessionKey) result.Authorization = `Bearer ${sessionKey}`;
  return result;
}

function setStatus(text, kind = "", offerNewChat = false) {
  ui.status.textContent = text;
  ui.status.dataset.kind = kind;
  ui.statusNewChat.hidden = !offerNewChat;
}

function askForKey() {
  ui.keyForm.hidden = false;
  setStatus(sessionKey ? "The API key was not accepted; enter it again." : "This kiosk needs an API key.", "error");
  ui.key.focus();
}

async function loadModelName() {
  try {
    const models = await fetch("v1/models", { headers: headers() });
    if (models.status === 401) askForKey();
    let name = models.ok ? (await models.json()).data?.[0]?.id : undefined;
    if (!name) {
      const health = await fetch("health");
      name = health.ok ? (await health.json()).model : undefined;
    }
    if (name) {
      ui.model.textContent = name;
      document.title = `${name} · Chat`;
    }
  } catch {
    // Server not reachable yet: the first message reports it.
  }
}

function atEnd() {
  const t = ui.transcript;
  return t.scrollHeight - t.scrollTop - t.clientHeight < 48;
}

function scrollToEnd() {
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  followEnd = true;
}

function addMessage(role, text) {
  const item = document.createElement("div");
  item.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "visually-hidden";
  who.textContent = role === "user" ? "You: " : "Assistant: ";
  const body = document.createElement("span");
  body.className = "text";
  body.append(document.createTextNode(text));
  item.append(who, body);
  ui.transcript.append(item);
  scrollToEnd();
  return item;
}

// The model's thought, collapsed above its reply: there if wanted, out of the way of the answer.
function addThought(reply) {
  const details = document.createElement("details");
  details.className = "thought";
  const summary = document.createElement("summary");
  summary.textContent = "Thought";
  const text = document.createElement("div");
  text.append(document.createTextNode(""));
  details.append(summary, text);
  reply.querySelector(".text").before(details);
  return text.firstChild;
}

function setBusy(busy) {
  const focusWasHere = [ui.send, ui.stop, document.body].includes(document.activeElement);
  document.body.dataset.state = busy ? "busy" : "idle";
  ui.transcript.setAttribute("aria-busy", String(busy));
  ui.send.disabled = busy;
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  if (focusWasHere) (busy ? ui.stop : ui.prompt).focus();
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const abort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", abort);
      resolve();
    }, ms);
    signal.addEventListener("abort", abort, { once: true });
  });
}

async function apiError(response) {
  let message = `The server answered ${response.status} ${response.statusText}.`.replace(" .", ".");
  try {
    message = (await response.json()).error?.message || message;
  } catch {
    // Not an OpenAI error object: keep the status line.
  }
  return new ApiError(response.status, message);
}

// Posts the chat, waiting out 429s for the server's Retry-After; Stop (the signal) ends the wait too.
async function postChat(body, signal) {
  for (;;) {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal,
    });
    if (response.status !== 429) return response;
    const seconds = Number.parseInt(response.headers.get("Retry-After"), 10);
    for (let left = seconds > 0 ? Math.min(seconds, 60) : 2; left > 0; left--) {
      setStatus(`The server is busy, retrying in ${left} s…`);
      await sleep(1000, signal);
    }
    setStatus("");
  }
}

// The data of each server-sent event, parsed line by line as the bytes arrive (events and lines may be
// split anywhere across reads; a CR at the end of a read may be the first half of a CRLF).
async function* serverEvents(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      for (let match; (match = LINE_END.exec(buffer));) {
        if (!done && match[0] === "\r" && match.index === buffer.length - 1) break;
        const line = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line[5] === " " ? 6 : 5));
        }
      }
      if (done) return;
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

async function readReply(response, onText, onThought) {
  let finish = null;
  for await (const data of serverEvents(response.body)) {
    if (data === "[DONE]") return finish ?? "stop";
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(chunk.error.message || "The server stopped with an error.");
    const choice = chunk.choices?.[0];
    if (choice?.delta?.reasoning_content) onThought(choice.delta.reasoning_content);
    if (choice?.delta?.content) onText(choice.delta.content);
    if (choice?.finish_reason) finish = choice.finish_reason;
  }
  if (finish) return finish;
  throw new Error("The connection closed before the reply was complete.");
}

function requestBody(messages) {
  const body = { messages: settings.system ? [{ role: "system", content: settings.system }, ...messages] : messages,
                 stream: true };
  if (settings.temperature !== undefined) body.temperature = settings.temperature;
  if (settings.maxTokens !== undefined) body.max_tokens = settings.maxTokens;
  if (settings.think) body.chat_template_kwargs = { enable_thinking: true };
  return body;
}

async function send(text) {
  const chat = conversation;
  const mine = new AbortController();
  controller = mine;
  const userItem = addMessage("user", text);
  const reply = addMessage("assistant", "");
  const replyText = reply.querySelector(".text").firstChild;
  reply.classList.add("pending");
  chat.messages.push({ role: "user", content: text });
  let content = "";
  const withdraw = () => {
    userItem.remove();
    reply.remove();
    chat.messages.pop();
    if (!ui.prompt.value) ui.prompt.value = text;
    resizePrompt();
  };
  setBusy(true);
  setStatus("");
  try {
    const response = await postChat(requestBody(chat.messages), mine.signal);
    if (!response.ok) throw await apiError(response);
    let thought = null;
    const finish = await readReply(response, (piece) => {
      reply.classList.remove("pending");
      replyText.appendData(piece);
      content += piece;
      if (followEnd) scrollToEnd();
    }, (piece) => {
      reply.classList.remove("pending");
      thought ??= addThought(reply);
      thought.appendData(piece);
    });
    reply.dataset.finish = finish;
    if (finish === "length") setStatus("The reply reached its length limit.");
  } catch (error) {
    if (chat !== conversation) return;
    reply.classList.remove("pending");
    reply.dataset.finish = error.name === "AbortError" ? "aborted" : "error";
    if (!content) withdraw();
    if (error.name === "AbortError") {
      setStatus(content ? "Stopped." : "");
    } else if (error instanceof ApiError && error.status === 401) {
      askForKey();
    } else if (error instanceof ApiError) {
      setStatus(error.message, "error", error.status < 500);
    } else {
      const reason = error instanceof TypeError ? "Cannot reach the server." : error.message;
      setStatus(content ? `${reason} The reply is incomplete.` : `${reason} Try again.`, "error");
    }
  } finally {
    if (content) chat.messages.push({ role: "assistant", content });
    if (controller === mine) {
      controller = null;
      setBusy(false);
    }
    resetIdleTimer();
  }
}

function newChat(clearInput) {
  controller?.abort();
  conversation = { messages: [] };
  ui.transcript.replaceChildren();
  setStatus("");
  if (clearInput) ui.prompt.value = "";
  resizePrompt();
}

function resizePrompt() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${ui.prompt.scrollHeight + 2}px`;
}

function resetIdleTimer() {
  clearTimeout(idleTimer);
  if (settings.idleSeconds > 0) idleTimer = setTimeout(onIdle, settings.idleSeconds * 1000);
}

function onIdle() {
  if (controller) return resetIdleTimer();
  if (conversation.messages.length || ui.transcript.childElementCount || ui.prompt.value) {
    newChat(true);
    document.activeElement?.blur();
  }
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || controller) return;
  ui.prompt.value = "";
  resizePrompt();
  send(text);
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.prompt.addEventListener("input", resizePrompt);
ui.stop.addEventListener("click", () => controller?.abort());
ui.transcript.addEventListener("scroll", () => { followEnd = atEnd(); }, { passive: true });
new ResizeObserver(() => followEnd && scrollToEnd()).observe(ui.transcript);

for (const button of [ui.newChat, ui.statusNewChat]) {
  button.addEventListener("click", () => {
    newChat(false);
    ui.prompt.focus();
  });
}

ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  storeKey(ui.key.value.trim());
  ui.key.value = "";
  ui.keyForm.hidden = true;
  setStatus("");
  loadModelName();
  if (ui.prompt.value.trim()) ui.composer.requestSubmit();
  else ui.prompt.focus();
});

for (const type of ["pointerdown", "keydown", "input", "wheel"]) {
  addEventListener(type, resetIdleTimer, { passive: true });
}
addEventListener("scroll", resetIdleTimer, { capture: true, passive: true });

resetIdleTimer();
loadModelName();
