// The playground chat page: one browser tab is one Telegram user chatting with the bot.
// Everything the bot says arrives as events from the emulator (long polling); text is
// rendered from Telegram entities with DOM nodes only, never as HTML, so nothing the bot
// or a user sends can inject markup into the page.
"use strict";

(() => {
  const CHAT_KEY = "playground-chat-id";
  const ACTION_SHOWN_MS = 5000; // Telegram shows a chat action for about five seconds
  const POLL_TIMEOUT_S = 25;
  const ACTION_LABELS = {
    typing: "typing…",
    upload_photo: "sending a photo…",
    upload_document: "sending a file…",
    upload_video: "sending a video…",
    record_voice: "recording a voice message…",
    choose_sticker: "choosing a sticker…",
  };

  const $ = (id) => document.getElementById(id);
  const ui = {
    messages: $("messages"),
    emptyNote: $("empty-note"),
    status: $("bot-status"),
    botName: $("bot-name"),
    avatar: $("bot-avatar"),
    typingRow: $("typing-row"),
    replyBar: $("reply-bar"),
    replyAuthor: $("reply-bar-author"),
    replyText: $("reply-bar-text"),
    replyCancel: $("reply-cancel"),
    form: $("composer-form"),
    text: $("text-input"),
    fileInput: $("file-input"),
    attach: $("attach-button"),
    menuButton: $("menu-button"),
    commandMenu: $("command-menu"),
    start: $("start-button"),
    dropOverlay: $("drop-overlay"),
    lightbox: $("lightbox"),
    lightboxImage: $("lightbox-image"),
    lightboxOpen: $("lightbox-open"),
    toast: $("toast"),
    alert: $("alert"),
    alertText: $("alert-text"),
    alertOk: $("alert-ok"),
  };

  const state = {
    chatId: chatIdForThisTab(),
    lastSeq: 0,
    messages: new Map(), // message_id -> {message, element}
    replyTo: null,
    actionTimer: null,
    botName: "Caption Bot",
    commands: [],
    connected: true,
  };

  // Each tab keeps its own chat for as long as it lives (sessionStorage is per tab).
  function chatIdForThisTab() {
    const fromUrl = new URLSearchParams(location.search).get("chat");
    if (fromUrl && /^[1-9][0-9]{0,14}$/.test(fromUrl)) return Number(fromUrl);
    const saved = sessionStorage.getItem(CHAT_KEY);
    if (saved && /^[1-9][0-9]{0,14}$/.test(saved)) return Number(saved);
    const fresh = 100000000 + Math.floor(Math.random() * 899999999);
    sessionStorage.setItem(CHAT_KEY, String(fresh));
    return fresh;
  }

  // --- talking to the playground API ---------------------------------------------------

  const api = (path) => `/api/chats/${state.chatId}${path}`;

  // The page's token (served in its HTML): the API refuses changes without it, so other
  // web sites open in the same browser cannot post into these chats.
  const PAGE_TOKEN = document.querySelector('meta[name="playground-token"]').content;

  async function request(url, options = {}) {
    const headers = { ...(options.headers || {}), "X-Playground-Token": PAGE_TOKEN };
    const response = await fetch(url, { ...options, headers });
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (!response.ok) {
      throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
    }
    return body;
  }

  function postJson(url, payload) {
    return request(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload),
    });
  }

  async function loadInfo() {
    try {
      const info = await request("/api/info");
      state.botName = info.bot.first_name;
      state.commands = info.commands;
      state.maxUploadBytes = info.max_upload_bytes;
      ui.botName.textContent = info.bot.first_name;
      ui.avatar.textContent = (info.bot.first_name || "B").slice(0, 1).toUpperCase();
      document.title = `${info.bot.first_name} — playground`;
    } catch (_) {
      // the event loop below reports connection problems
    }
  }

  async function pollEvents() {
    for (;;) {
      try {
        const body = await request(api(`/events?after=${state.lastSeq}&timeout=${POLL_TIMEOUT_S}`));
        setConnected(true);
        for (const event of body.events) {
          if (event.seq <= state.lastSeq) continue;
          state.lastSeq = event.seq;
          handleEvent(event);
        }
      } catch (_) {
        setConnected(false);
        await sleep(1500);
      }
    }
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function setConnected(connected) {
    if (connected === state.connected) return;
    state.connected = connected;
    if (!connected) {
      clearAction();
      ui.status.textContent = "connecting…";
    } else {
      ui.status.textContent = "bot";
    }
  }

  function handleEvent(event) {
    switch (event.type) {
      case "message":
        if (event.message.from && event.message.from.is_bot) clearAction();
        showMessage(event.message);
        break;
      case "edited_message":
        showMessage(event.message);
        break;
      case "deleted_message":
        removeMessage(event.message_id);
        break;
      case "chat_action":
        showAction(event.action);
        break;
      case "callback_answer":
        showCallbackAnswer(event);
        break;
      default:
        break;
    }
  }

  // --- sending --------------------------------------------------------------------------

  async function sendText(text) {
    const payload = { text };
    if (state.replyTo) payload.reply_to_message_id = state.replyTo;
    cancelReply();
    try {
      const body = await postJson(api("/messages"), payload);
      showMessage(body.message);
    } catch (error) {
      showToast(`Not sent: ${error.message}`, true);
    }
  }

  async function sendFile(file) {
    if (state.maxUploadBytes && file.size > state.maxUploadBytes) {
      const limit = Math.round(state.maxUploadBytes / (1024 * 1024));
      showToast(`Not sent: ${file.name} is larger than ${limit} MB`, true);
      return;
    }
    const form = new FormData();
    form.append("file", file, file.name);
    const caption = ui.text.value.trim();
    if (caption) form.append("caption", caption);
    if (state.replyTo) form.append("reply_to_message_id", String(state.replyTo));
    ui.text.value = "";
    cancelReply();
    try {
      const body = await request(api("/uploads"), { method: "POST", body: form });
      showMessage(body.message);
    } catch (error) {
      showToast(`Not sent: ${error.message}`, true);
    }
  }

  async function pressButton(messageId, data, button) {
    button.classList.add("pending");
    try {
      await postJson(api("/buttons"), { message_id: messageId, callback_data: data });
    } catch (error) {
      button.classList.remove("pending");
      showToast(`Button failed: ${error.message}`, true);
      return;
    }
    // Telegram shows a spinner until the bot answers the callback query (or gives up).
    setTimeout(() => button.classList.remove("pending"), 15000);
  }

  // --- showing messages -------------------------------------------------------------------

  function showMessage(message) {
    const known = state.messages.get(message.message_id);
    const element = renderMessage(message);
    if (known) {
      known.element.replaceWith(element);
    } else {
      ui.messages.appendChild(element);
    }
    state.messages.set(message.message_id, { message, element });
    ui.emptyNote.hidden = true;
    ui.start.hidden = true;
    if (!known) scrollToBottom();
  }

  function removeMessage(messageId) {
    const known = state.messages.get(messageId);
    if (!known) return;
    known.element.remove();
    state.messages.delete(messageId);
  }

  function scrollToBottom() {
    requestAnimationFrame(() => {
      ui.messages.scrollTop = ui.messages.scrollHeight;
    });
  }

  function renderMessage(message) {
    const fromBot = Boolean(message.from && message.from.is_bot);
    const wrapper = el("div", `message ${fromBot ? "from-bot" : "from-user"}`);
    wrapper.dataset.messageId = String(message.message_id);
    wrapper.dataset.from = fromBot ? "bot" : "user";

    const bubble = el("div", "bubble");
    wrapper.appendChild(bubble);

    if (message.reply_to_message) bubble.appendChild(renderQuote(message.reply_to_message));

    if (message.photo && message.photo.length) {
      bubble.classList.add("with-photo");
      bubble.appendChild(renderPhoto(message.photo));
    }
    if (message.document) bubble.appendChild(renderDocument(message.document));

    const text = message.text ?? message.caption;
    const entities = message.entities ?? message.caption_entities ?? [];
    if (text) {
      const body = el("div", "text");
      body.appendChild(renderEntities(text, entities));
      bubble.appendChild(body);
    }
    bubble.appendChild(renderMeta(message));

    const keyboard = message.reply_markup && message.reply_markup.inline_keyboard;
    if (keyboard && keyboard.length) wrapper.appendChild(renderKeyboard(message.message_id, keyboard));

    const reply = el("button", "reply-action", "Reply");
    reply.type = "button";
    reply.title = "Reply to this message";
    reply.addEventListener("click", () => startReply(message.message_id));
    bubble.appendChild(reply);
    bubble.addEventListener("dblclick", () => startReply(message.message_id));
    return wrapper;
  }

  function renderMeta(message) {
    const meta = el("span", "meta");
    const time = new Date(message.date * 1000);
    const label = time.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    meta.textContent = message.edit_date ? `edited ${label}` : label;
    return meta;
  }

  function renderQuote(quoted) {
    const quote = el("div", "quote");
    quote.appendChild(el("div", "quote-author", authorName(quoted)));
    quote.appendChild(el("div", "quote-text", summary(quoted)));
    quote.title = "Go to the quoted message";
    quote.addEventListener("click", () => {
      const target = state.messages.get(quoted.message_id);
      if (!target) return;
      target.element.scrollIntoView({ behavior: "smooth", block: "center" });
      target.element.classList.remove("highlight");
      void target.element.offsetWidth; // restart the animation
      target.element.classList.add("highlight");
    });
    return quote;
  }

  function authorName(message) {
    if (message.from && message.from.is_bot) return state.botName;
    return "You";
  }

  function summary(message) {
    const text = message.text ?? message.caption ?? "";
    if (message.photo) return text ? `Photo · ${text}` : "Photo";
    if (message.document) return `${message.document.file_name || "File"}${text ? ` · ${text}` : ""}`;
    return text;
  }

  const fileUrl = (fileId) => `/api/files/${encodeURIComponent(fileId)}`;

  function renderPhoto(sizes) {
    const largest = sizes[sizes.length - 1];
    const image = el("img", "photo");
    image.alt = "Photo";
    image.src = fileUrl(largest.file_id);
    image.width = Math.min(largest.width, 340);
    image.addEventListener("click", () => openLightbox(fileUrl(largest.file_id)));
    image.addEventListener("error", () => {
      const missing = el("div", "photo-missing", "This photo is no longer held by the playground.");
      image.replaceWith(missing);
    });
    return image;
  }

  function renderDocument(document_) {
    const link = el("a", "document");
    link.href = fileUrl(document_.file_id);
    link.setAttribute("download", document_.file_name || "file");
    const extension = (document_.file_name || "").split(".").pop().slice(0, 4).toUpperCase();
    link.appendChild(el("div", "file-icon", extension || "FILE"));
    const details = el("div");
    details.appendChild(el("div", "file-name", document_.file_name || "File"));
    details.appendChild(el("div", "file-size", formatSize(document_.file_size)));
    link.appendChild(details);
    return link;
  }

  function formatSize(bytes) {
    if (bytes == null) return "";
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
    return `${(bytes / (1024 * 1024)).toFixed(1)} MB`;
  }

  function renderKeyboard(messageId, rows) {
    const keyboard = el("div", "keyboard");
    for (const row of rows) {
      const line = el("div", "keyboard-row");
      for (const button of row) {
        if (button.url && isSafeUrl(button.url)) {
          const link = el("a", "", `${button.text} ↗`);
          link.href = button.url;
          link.target = "_blank";
          link.rel = "noopener noreferrer";
          line.appendChild(link);
          continue;
        }
        const control = el("button", "", button.text);
        control.type = "button";
        if (button.callback_data !== undefined) {
          control.dataset.callbackData = button.callback_data;
          control.addEventListener("click", () => pressButton(messageId, button.callback_data, control));
        } else {
          control.disabled = true;
          control.title = "This kind of button does nothing in the playground";
        }
        line.appendChild(control);
      }
      keyboard.appendChild(line);
    }
    return keyboard;
  }

  // --- formatting entities ------------------------------------------------------------------

  // Entities are offsets in UTF-16 code units, which is exactly how JavaScript indexes
  // strings. They nest (bold inside a link, code inside a quote), so they are rendered as
  // a tree: each entity becomes an element holding its text and the entities inside it.
  function renderEntities(text, entities) {
    const sorted = [...entities]
      .filter((e) => e.length > 0 && e.offset >= 0 && e.offset < text.length)
      .sort((a, b) => a.offset - b.offset || b.length - a.length);
    const fragment = document.createDocumentFragment();
    appendRange(fragment, text, sorted, 0, text.length);
    return fragment;
  }

  function appendRange(parent, text, entities, start, end) {
    let cursor = start;
    let index = 0;
    while (index < entities.length) {
      const entity = entities[index];
      const entityEnd = Math.min(entity.offset + entity.length, end);
      if (entity.offset > cursor) parent.appendChild(document.createTextNode(text.slice(cursor, entity.offset)));
      const inner = [];
      index += 1;
      while (index < entities.length && entities[index].offset < entityEnd) {
        inner.push(entities[index]);
        index += 1;
      }
      const node = entityElement(entity, text.slice(entity.offset, entityEnd));
      appendRange(node.content, text, inner, Math.max(entity.offset, cursor), entityEnd);
      parent.appendChild(node.outer);
      cursor = entityEnd;
    }
    if (cursor < end) parent.appendChild(document.createTextNode(text.slice(cursor, end)));
  }

  // Returns {outer, content}: the element to insert and the one to fill with the text.
  function entityElement(entity, entityText) {
    const simple = { bold: "b", italic: "i", underline: "u", strikethrough: "s", code: "code" };
    if (simple[entity.type]) return single(document.createElement(simple[entity.type]));
    switch (entity.type) {
      case "pre": {
        const pre = document.createElement("pre");
        const code = document.createElement("code");
        if (entity.language) code.dataset.language = entity.language;
        pre.appendChild(code);
        return { outer: pre, content: code };
      }
      case "blockquote":
      case "expandable_blockquote":
        return single(document.createElement("blockquote"));
      case "spoiler": {
        const span = el("span", "spoiler");
        span.title = "Spoiler: click to reveal";
        span.addEventListener("click", () => span.classList.add("revealed"));
        return single(span);
      }
      case "text_link":
        return single(link(entity.url));
      case "url":
        return single(link(/^[a-z]+:\/\//i.test(entityText) ? entityText : `http://${entityText}`));
      case "email":
        return single(link(`mailto:${entityText}`));
      case "bot_command": {
        const span = el("span", "command");
        span.title = "Send this command";
        span.addEventListener("click", () => sendText(entityText));
        return single(span);
      }
      default:
        return single(document.createElement("span"));
    }
  }

  function single(element) {
    return { outer: element, content: element };
  }

  function isSafeUrl(url) {
    return /^(https?:|mailto:|tg:)/i.test(url);
  }

  function link(url) {
    if (!isSafeUrl(url)) return document.createElement("span");
    const anchor = document.createElement("a");
    anchor.href = url;
    anchor.target = "_blank";
    anchor.rel = "noopener noreferrer";
    return anchor;
  }

  function el(tag, className = "", text = null) {
    const element = document.createElement(tag);
    if (className) element.className = className;
    if (text !== null) element.textContent = text;
    return element;
  }

  // --- chat actions and callback answers -------------------------------------------------------

  function showAction(action) {
    document.body.dataset.lastChatAction = action; // lets tests see a brief indicator happened
    ui.status.textContent = ACTION_LABELS[action] || "busy…";
    ui.status.classList.add("active");
    ui.typingRow.hidden = false;
    ui.typingRow.dataset.action = action;
    scrollToBottom();
    clearTimeout(state.actionTimer);
    state.actionTimer = setTimeout(clearAction, ACTION_SHOWN_MS);
  }

  function clearAction() {
    clearTimeout(state.actionTimer);
    ui.status.textContent = state.connected ? "bot" : "connecting…";
    ui.status.classList.remove("active");
    ui.typingRow.hidden = true;
  }

  function showCallbackAnswer(answer) {
    for (const pending of document.querySelectorAll(".keyboard button.pending")) {
      pending.classList.remove("pending");
    }
    if (answer.url && isSafeUrl(answer.url)) window.open(answer.url, "_blank", "noopener");
    if (!answer.text) return;
    if (answer.show_alert) {
      ui.alertText.textContent = answer.text;
      ui.alert.hidden = false;
    } else {
      showToast(answer.text);
    }
  }

  let toastTimer = null;
  function showToast(text, isError = false) {
    ui.toast.textContent = text;
    ui.toast.classList.toggle("error", isError);
    ui.toast.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => {
      ui.toast.hidden = true;
    }, isError ? 6000 : 3000);
  }

  // --- replying ----------------------------------------------------------------------------------

  function startReply(messageId) {
    const known = state.messages.get(messageId);
    if (!known) return;
    state.replyTo = messageId;
    ui.replyAuthor.textContent = `Reply to ${authorName(known.message)}`;
    ui.replyText.textContent = summary(known.message);
    ui.replyBar.hidden = false;
    ui.text.focus();
  }

  function cancelReply() {
    state.replyTo = null;
    ui.replyBar.hidden = true;
  }

  // --- the command menu ---------------------------------------------------------------------------

  async function toggleCommandMenu() {
    if (!ui.commandMenu.hidden) {
      ui.commandMenu.hidden = true;
      return;
    }
    await loadInfo(); // the bot may have set its commands after the page loaded
    ui.commandMenu.replaceChildren();
    if (!state.commands.length) {
      ui.commandMenu.appendChild(el("div", "empty", "The bot has not set any commands yet."));
    }
    for (const command of state.commands) {
      const item = el("button");
      item.type = "button";
      item.appendChild(el("span", "command-name", `/${command.command}`));
      item.appendChild(el("span", "command-description", command.description));
      item.addEventListener("click", () => {
        ui.commandMenu.hidden = true;
        ui.text.value = `/${command.command} `;
        ui.text.focus();
      });
      ui.commandMenu.appendChild(item);
    }
    ui.commandMenu.hidden = false;
  }

  // --- full-size photos ------------------------------------------------------------------------------

  function openLightbox(url) {
    ui.lightboxImage.src = url;
    ui.lightboxOpen.href = url;
    ui.lightbox.hidden = false;
  }

  function closeOverlays() {
    ui.lightbox.hidden = true;
    ui.alert.hidden = true;
    ui.commandMenu.hidden = true;
  }

  // --- wiring ------------------------------------------------------------------------------------------

  function wire() {
    ui.form.addEventListener("submit", (event) => {
      event.preventDefault();
      const text = ui.text.value.trim();
      if (!text) return;
      ui.text.value = "";
      ui.commandMenu.hidden = true;
      sendText(text);
    });
    ui.start.addEventListener("click", () => sendText("/start"));
    ui.attach.addEventListener("click", () => ui.fileInput.click());
    ui.fileInput.addEventListener("change", () => {
      for (const file of ui.fileInput.files) sendFile(file);
      ui.fileInput.value = "";
    });
    ui.menuButton.addEventListener("click", toggleCommandMenu);
    ui.replyCancel.addEventListener("click", cancelReply);
    ui.lightbox.addEventListener("click", (event) => {
      if (event.target !== ui.lightboxOpen) ui.lightbox.hidden = true;
    });
    ui.alertOk.addEventListener("click", () => {
      ui.alert.hidden = true;
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        closeOverlays();
        cancelReply();
      }
    });

    // Drag and drop anywhere on the page sends the dropped files.
    let dragDepth = 0;
    const hasFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
    window.addEventListener("dragenter", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      dragDepth += 1;
      ui.dropOverlay.hidden = false;
    });
    window.addEventListener("dragover", (event) => {
      if (hasFiles(event)) event.preventDefault();
    });
    window.addEventListener("dragleave", () => {
      dragDepth = Math.max(0, dragDepth - 1);
      if (dragDepth === 0) ui.dropOverlay.hidden = true;
    });
    window.addEventListener("drop", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      dragDepth = 0;
      ui.dropOverlay.hidden = true;
      for (const file of event.dataTransfer.files) sendFile(file);
    });
  }

  async function main() {
    wire();
    document.body.dataset.chatId = String(state.chatId);
    await loadInfo();
    // A fresh chat offers Telegram's START button; history (after a reload) hides it.
    const history = await request(api("/events?after=0&timeout=0")).catch(() => ({ events: [] }));
    for (const event of history.events) {
      state.lastSeq = Math.max(state.lastSeq, event.seq);
      if (event.type !== "chat_action") handleEvent(event);
    }
    if (!state.messages.size) ui.start.hidden = false;
    pollEvents();
  }

  main();
})();
