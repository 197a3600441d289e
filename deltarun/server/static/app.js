// deltarun chat page: plain JS, no dependencies; talks only to the server's OpenAI endpoints.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const LS = window.localStorage;
  const load = (k, d) => { try { const v = JSON.parse(LS.getItem(k)); return v == null ? d : v; } catch (e) { return d; } };
  const save = (k, v) => { try { LS.setItem(k, JSON.stringify(v)); } catch (e) { showError("could not save (storage full?): " + e.message); } };

  // conversations: [{id, title, messages: [{role, content, images, reasoning, tool_calls, stats}]}], kept in
  // IndexedDB (images and videos would overflow localStorage's ~5 MB); `images` holds image and video data URLs
  let convs = [];
  let cur = load("deltarun.current", null);
  const settings = Object.assign({ thinking: false, thinkingSet: false, model: "", preset: "", temperature: "", top_p: "",
    top_k: "", presence_penalty: "", max_tokens: "" }, load("deltarun.settings", {}));
  const PARAMS = ["temperature", "top_p", "top_k", "presence_penalty", "max_tokens"];
  const PRESETS = {  // from the Qwen3.5 model cards
    thinking: { thinking: true, temperature: 1.0, top_p: 0.95, top_k: 20, presence_penalty: 1.5 },
    nonthinking: { thinking: false, temperature: 1.0, top_p: 1.0, top_k: 20, presence_penalty: 2.0 },
    coding: { thinking: true, temperature: 0.6, top_p: 0.95, top_k: 20, presence_penalty: 0 },
  };
  let pending = [];                                 // data URLs of images/videos waiting to be sent
  let controller = null;

  const conv = () => convs.find((c) => c.id === cur);
  function newConv() {
    const c = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat", messages: [] };
    convs.unshift(c); cur = c.id; persist();
    return c;
  }
  let db = null;  // null: IndexedDB unavailable, conversations fall back to localStorage
  function openDB() {
    return new Promise((res) => {
      try {
        const rq = indexedDB.open("deltarun", 1);
        rq.onupgradeneeded = () => rq.result.createObjectStore("convs", { keyPath: "id" });
        rq.onsuccess = () => res(rq.result);
        rq.onerror = rq.onblocked = () => res(null);
      } catch (e) { res(null); }
    });
  }
  async function loadConvs() {
    db = await openDB();
    if (!db) return load("deltarun.convs", []);
    const rows = await new Promise((res, rej) => {
      const rq = db.transaction("convs").objectStore("convs").getAll();
      rq.onsuccess = () => res(rq.result); rq.onerror = () => rej(rq.error);
    });
    rows.sort((a, b) => a.order - b.order);
    const list = rows.map((r) => { delete r.order; return r; });
    const old = load("deltarun.convs", null);  // migrate what an older page kept in localStorage, once
    if (Array.isArray(old)) {
      const ids = new Set(list.map((c) => c.id));
      for (const c of old) if (c && c.id && !ids.has(c.id)) list.push(c);
      convs = list; await persist();
      LS.removeItem("deltarun.convs");
    }
    return list;
  }
  function persist() {
    save("deltarun.current", cur);
    if (!db) { save("deltarun.convs", convs); return Promise.resolve(); }
    return new Promise((res) => {
      try {
        const tx = db.transaction("convs", "readwrite"), st = tx.objectStore("convs");
        const keep = new Set(convs.map((c) => c.id));
        st.getAllKeys().onsuccess = (e) => { for (const k of e.target.result) if (!keep.has(k)) st.delete(k); };
        convs.forEach((c, i) => st.put(Object.assign({}, c, { order: i })));
        tx.oncomplete = () => res();
        tx.onerror = tx.onabort = () => { showError("could not save: " + (tx.error && tx.error.message)); res(); };
      } catch (e) { showError("could not save: " + e.message); res(); }
    });
  }
  function saveSettings() { save("deltarun.settings", settings); }

  // ---- API -----------------------------------------------------------------------------------
  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = LS.getItem("deltarun.key");
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }
  function askKey() {
    const k = window.prompt("This server needs an API key:", LS.getItem("deltarun.key") || "");
    if (k !== null) LS.setItem("deltarun.key", k.trim());
    return k !== null;
  }
  async function api(path, opts, retry) {
    const r = await fetch(path, Object.assign({ headers: headers() }, opts || {}));
    if (r.status === 401 && retry !== false && askKey()) return api(path, Object.assign({}, opts, { headers: headers() }), false);
    return r;
  }
  async function loadModels() {
    try {
      const r = await api("/v1/models");
      if (!r.ok) throw new Error(await errText(r));
      const data = (await r.json()).data || [];
      const sel = $("model");
      sel.textContent = "";
      for (const m of data) sel.append(new Option(m.id, m.id));
      if (data.some((m) => m.id === settings.model)) sel.value = settings.model;
      else if (data.length) settings.model = data[0].id;
      await modelDefaults(sel.value || settings.model);
    } catch (e) { showError("could not list models: " + e.message); }
  }
  // the thinking toggle follows the model until the user sets it: off for models without thinking and for the
  // small 0.8B/2B ones (their cards default to non-thinking), on otherwise
  async function modelDefaults(id) {
    if (!id || settings.thinkingSet) return;
    let caps = null;
    try { const r = await api("/api/show", { method: "POST", body: JSON.stringify({ model: id }) }); if (r.ok) caps = (await r.json()).capabilities; } catch (e) { /* not served: guess from the name */ }
    if (settings.thinkingSet) return;  // the user chose meanwhile
    let on = !/(^|[^\d.])(0\.8|2)b\b/i.test(id);
    if (Array.isArray(caps) && !caps.includes("thinking")) on = false;
    settings.thinking = on; $("thinking").checked = on; saveSettings();
  }
  async function errText(r) {
    try { const j = await r.json(); return (j.error && (j.error.message || j.error)) || r.statusText; } catch (e) { return r.status + " " + r.statusText; }
  }

  // ---- Markdown (escape first, then a small safe subset) --------------------------------------
  const esc = (s) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  // a tiny highlighter: tokens found on the raw code, each one escaped on its own
  const S2 = /"(?:[^"\\\n]|\\.)*"/.source, S1 = /'(?:[^'\\\n]|\\.)*'/.source, BT = /`(?:[^`\\]|\\.)*`/.source;
  const CC = /\/\/.*|\/\*[\s\S]*?(?:\*\/|$)/.source;
  const NUM = /\b(?:0[xXbBoO][\da-fA-F_]+|\d[\d_]*(?:\.\d+)?(?:[eE][+-]?\d+)?)[a-zA-Z]?\b/.source;
  function lang(comment, string, kws, lits, vars) {
    return { re: new RegExp("(" + comment + ")|(" + string + ")|(" + NUM + ")|([A-Za-z_$][\\w$]*)", "g"),
      kw: new Set(kws.split(" ")), lit: new Set(lits.split(" ")), vars };
  }
  const C_KW = "auto break case catch char class const continue default delete do double else enum extern final float for fn func go goto if impl import in inline int interface let long loop match mod mut namespace new package private protected pub public return self short signed sizeof static struct super switch template this throw throws try type typedef typename union unsigned use using var virtual void volatile where while";
  const LANGS = {
    python: lang(/#.*/.source, "[rbfuRBFU]{0,2}(?:" + /"""[\s\S]*?(?:"""|$)/.source + "|" + /'''[\s\S]*?(?:'''|$)/.source + "|" + S2 + "|" + S1 + ")",
      "and as assert async await break class continue def del elif else except finally for from global if import in is lambda nonlocal not or pass raise return try while with yield match case print len range self", "True False None"),
    js: lang(CC, S2 + "|" + S1 + "|" + BT, "async await break case catch class const continue debugger default delete do else export extends finally for from function if import in instanceof interface let new of return static super switch this throw try type typeof var void while with yield enum implements private public readonly as", "true false null undefined NaN"),
    json: lang("(?!)", S2, "", "true false null"),
    bash: lang(/(?<![^\s])#.*/.source, S2 + "|" + S1, "if then else elif fi for while until do done case esac function in return local export echo exit set unset source cd sudo", "true false", true),
    c: lang(CC, S2 + "|" + S1, C_KW, "true false null nullptr NULL nil None Some Ok Err"),
  };
  const ALIAS = { python: "python", py: "python", python3: "python", js: "js", javascript: "js", jsx: "js", ts: "js", typescript: "js", tsx: "js", mjs: "js",
    json: "json", jsonc: "json", bash: "bash", sh: "bash", shell: "bash", zsh: "bash", console: "bash",
    c: "c", h: "c", cpp: "c", "c++": "c", cc: "c", hpp: "c", java: "c", cs: "c", csharp: "c", go: "c", rust: "c", rs: "c", kotlin: "c", swift: "c", scala: "c", php: "c", cuda: "c" };
  function highlight(code, name) {
    const L = LANGS[ALIAS[name.toLowerCase()]];
    if (!L) return esc(code);
    let out = "", last = 0, m;
    L.re.lastIndex = 0;
    while ((m = L.re.exec(code))) {
      if (!m[0]) { L.re.lastIndex++; continue; }
      const kind = m[1] ? "c" : m[2] ? "s" : m[3] ? "n" : L.kw.has(m[4]) ? "k" : L.lit.has(m[4]) ? "l" : L.vars && m[4][0] === "$" ? "v" : "";
      out += esc(code.slice(last, m.index)) + (kind ? '<span class="tok-' + kind + '">' + esc(m[0]) + "</span>" : esc(m[0]));
      last = L.re.lastIndex;
    }
    return out + esc(code.slice(last));
  }
  // math: $…$, $$…$$, \(…\), \[…\] become <span class="math"> holding the (escaped) TeX; KaTeX typesets them later
  const MATH = /(`[^`\n]+`)|\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\]|\\\(([^\n]+?)\\\)|\$([^\s$](?:[^$\n]*?[^\s$\\])?)\$(?!\d)/g;
  function inline(s) {  // s is already escaped
    const codes = [];
    s = s.replace(/`([^`\n]+)`/g, (_, c) => { codes.push(c); return "\u0000" + (codes.length - 1) + "\u0000"; });
    s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
    s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>").replace(/__([^_\n]+)__/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>").replace(/(^|[^_\w])_([^_\n]+)_(?!\w)/g, "$1<em>$2</em>");
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => "<code>" + codes[+i] + "</code>");
  }
  function mathSpan(tex, display) { return '<span class="math' + (display ? " display" : "") + '">' + tex + "</span>"; }
  function markdown(src) {
    const out = [], maths = [];
    const parts = src.split(/^```/m);  // even: text, odd: fenced code (possibly unterminated while streaming)
    parts.forEach((part, i) => {
      if (i % 2) {
        const nl = part.indexOf("\n");
        const lang = nl < 0 ? "" : part.slice(0, nl).trim().replace(/[^\w+#-]/g, "");
        const code = nl < 0 ? "" : part.slice(nl + 1).replace(/\n$/, "");
        out.push('<pre><code' + (lang ? ' data-lang="' + lang + '"' : "") + ">" + highlight(code, lang) + "</code></pre>");
        return;
      }
      part = esc(part).replace(MATH, (all, code, dd, br, par, d) => {
        if (code) return all;
        maths.push(mathSpan(dd || br || par || d, !!(dd || br)));
        return "\u0001" + (maths.length - 1) + "\u0001";
      });
      let list = null, para = [];
      const flushP = () => { if (para.length) { out.push("<p>" + para.map(inline).join("<br>") + "</p>"); para = []; } };
      const flushL = () => { if (list) { out.push("<" + list.tag + ">" + list.items.map((x) => "<li>" + inline(x) + "</li>").join("") + "</" + list.tag + ">"); list = null; } };
      for (const line of part.replace(/^\n/, "").split("\n")) {
        let m;
        if (!line.trim()) { flushP(); flushL(); }
        else if ((m = /^(#{1,6})\s+(.*)$/.exec(line))) { flushP(); flushL(); const n = Math.min(m[1].length + 2, 6); out.push("<h" + n + ">" + inline(m[2]) + "</h" + n + ">"); }
        else if ((m = /^\s*([-*+]|\d+[.)])\s+(.*)$/.exec(line))) {
          flushP();
          const tag = /\d/.test(m[1]) ? "ol" : "ul";
          if (!list || list.tag !== tag) { flushL(); list = { tag, items: [] }; }
          list.items.push(m[2]);
        } else if (list && /^\s{2,}\S/.test(line)) list.items[list.items.length - 1] += " " + line.trim();
        else { flushL(); para.push(line); }
      }
      flushP(); flushL();
    });
    return out.join("").replace(/\u0001(\d+)\u0001/g, (_, i) => maths[+i]);
  }

  // KaTeX (static/vendor/katex, ~560 KB with its fonts) loads only once a message holds math
  let katexP = null;
  function loadKatex() {
    if (!katexP) katexP = new Promise((res, rej) => {
      const css = document.createElement("link"); css.rel = "stylesheet"; css.href = "/static/vendor/katex/katex.min.css";
      const js = document.createElement("script"); js.src = "/static/vendor/katex/katex.min.js";
      js.onload = () => res(window.katex); js.onerror = () => { katexP = null; rej(new Error("could not load KaTeX")); };
      document.head.append(css, js);
    });
    return katexP;
  }
  function typeset(root) {
    const spans = root.querySelectorAll(".math:not([data-done])");
    if (!spans.length) return;
    loadKatex().then((katex) => {
      for (const e of spans) {
        if (e.dataset.done || !e.isConnected) continue;
        const tex = e.textContent;
        try { katex.render(tex, e, { displayMode: e.classList.contains("display"), throwOnError: false }); } catch (err) { e.textContent = tex; }
        e.dataset.done = "1"; e.title = tex;
      }
    }, () => {});
  }

  // ---- Rendering -------------------------------------------------------------------------------
  const log = $("log");
  function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls; if (text != null) e.textContent = text; return e; }
  function fmtStats(s) {
    if (!s) return "";
    const bits = [];
    if (s.tokens != null) bits.push(s.tokens + " tokens");
    if (s.tps) bits.push(s.tps.toFixed(1) + " tok/s");
    if (s.stopped) bits.push("stopped");
    if (s.error) bits.push("error");
    return bits.join(" · ");
  }
  function media(u, what) {  // an <img>, or a <video> for a video data URL
    const v = u.startsWith("data:video/"), e = el(v ? "video" : "img");
    e.src = u;
    if (v) { e.controls = true; e.muted = true; e.preload = "metadata"; e.title = what + " video"; } else e.alt = what + " image";
    return e;
  }
  function renderTools(box, calls) {  // one collapsible block per call: its name, then its arguments as JSON
    box.textContent = "";
    box.hidden = !(calls && calls.length);
    for (const c of calls || []) {
      const f = c.function || {}, d = el("details", "tool");
      let args = f.arguments || "";
      try { args = JSON.stringify(JSON.parse(args), null, 2); } catch (e) { /* still streaming, or not JSON: as is */ }
      d.append(el("summary", null, "Tool call: " + (f.name || "?")), el("pre", null, args));
      box.append(d);
    }
  }
  function renderMessage(m, idx) {
    const box = el("div", "msg " + m.role);
    box.dataset.idx = idx;
    if (m.role === "user") {
      if (m.images && m.images.length) {
        const imgs = el("div", "imgs");
        for (const u of m.images) imgs.append(media(u, "attached"));
        box.append(imgs);
      }
      box.append(el("div", "body", m.content));
      const meta = el("div", "meta");
      const edit = el("button", "edit", "Edit"); edit.type = "button"; edit.onclick = () => editAt(idx);
      meta.append(edit); box.append(meta);
    } else {
      const think = el("details", "think");
      think.hidden = !m.reasoning;
      think.open = !!m.thinkOpen;
      think.append(el("summary", null, "Thinking"), el("div", "text", m.reasoning || ""));
      think.addEventListener("toggle", () => { m.thinkOpen = think.open; });
      const body = el("div", "body"); body.innerHTML = markdown(m.content || "");
      typeset(body);
      if (m.error) body.append(el("div", "err", m.error));
      const tools = el("div", "tools"); renderTools(tools, m.tool_calls);
      const meta = el("div", "meta");
      meta.append(el("span", "stats", fmtStats(m.stats)));
      const regen = el("button", "regen", "Regenerate"); regen.type = "button"; regen.onclick = () => regenerate(idx);
      meta.append(regen);
      box.append(think, body, tools, meta);
    }
    return box;
  }
  function render() {
    const c = conv();
    log.textContent = "";
    c.messages.forEach((m, i) => log.append(renderMessage(m, i)));
    const sel = $("convs");
    sel.textContent = "";
    for (const x of convs) sel.append(new Option(x.title, x.id));
    sel.value = cur;
    log.scrollTop = log.scrollHeight;
  }
  function showError(msg) {
    const e = el("div", "msg err", msg);
    log.append(e);
  }
  function busy(on) { $("send").hidden = on; $("stop").hidden = !on; }

  // ---- Sending -------------------------------------------------------------------------------
  function apiMessages(msgs) {
    return msgs.map((m) => {
      if (m.role === "user" && m.images && m.images.length) {
        const parts = m.images.map((u) => u.startsWith("data:video/") ? { type: "video_url", video_url: { url: u } }
          : { type: "image_url", image_url: { url: u } });
        if (m.content) parts.push({ type: "text", text: m.content });
        return { role: "user", content: parts };
      }
      return { role: m.role, content: m.content || "" };
    });
  }
  function num(v) { const x = parseFloat(v); return Number.isFinite(x) ? x : undefined; }

  async function generate() {
    const c = conv();
    const history = apiMessages(c.messages);
    const m = { role: "assistant", content: "", reasoning: "", stats: null, thinkOpen: settings.thinking };
    c.messages.push(m);
    const idx = c.messages.length - 1;
    const box = renderMessage(m, idx);
    log.append(box);
    log.scrollTop = log.scrollHeight;
    const think = box.querySelector(".think"), thinkText = think.querySelector(".text");
    const body = box.querySelector(".body"), stats = box.querySelector(".stats"), regen = box.querySelector(".regen");
    const tools = box.querySelector(".tools");
    body.classList.add("cursor");
    regen.hidden = true;
    const req = { model: $("model").value || settings.model, messages: history, stream: true,
      stream_options: { include_usage: true }, chat_template_kwargs: { enable_thinking: !!settings.thinking } };
    for (const k of PARAMS) { const v = num(settings[k]); if (v !== undefined) req[k] = k === "max_tokens" || k === "top_k" ? Math.round(v) : v; }
    controller = new AbortController();
    busy(true);
    const t0 = performance.now();
    let tFirst = null, chunks = 0, usage = null, stopped = false, frame = 0;
    const paint = () => {
      frame = 0;
      body.innerHTML = markdown(m.content);
      typeset(body);
      renderTools(tools, m.tool_calls);
      thinkText.textContent = m.reasoning;
      think.hidden = !m.reasoning;
      const el2 = think.querySelector(".text"); el2.scrollTop = el2.scrollHeight;
      if (log.scrollHeight - log.scrollTop - log.clientHeight < 120) log.scrollTop = log.scrollHeight;
    };
    try {
      const r = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(req), signal: controller.signal });
      if (!r.ok) throw new Error(await errText(r));
      const reader = r.body.getReader(), dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const ev = buf.slice(0, cut); buf = buf.slice(cut + 2);
          for (const line of ev.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const j = JSON.parse(data);
            if (j.error) throw new Error(j.error.message || JSON.stringify(j.error));
            if (j.usage) usage = j.usage;
            const d = j.choices && j.choices[0] && j.choices[0].delta;
            if (!d) continue;
            if (d.reasoning_content || d.content) {
              if (tFirst === null) tFirst = performance.now();
              chunks++;
              m.reasoning += d.reasoning_content || "";
              m.content += d.content || "";
              if (!frame) frame = requestAnimationFrame(paint);
            }
            for (const tc of d.tool_calls || []) {  // merged by index: a call may come whole or in pieces
              const calls = m.tool_calls || (m.tool_calls = []), i = tc.index != null ? tc.index : calls.length;
              const c = calls[i] || (calls[i] = { id: tc.id || "", type: "function", function: { name: "", arguments: "" } });
              if (tc.id) c.id = tc.id;
              if (tc.function) { c.function.name += tc.function.name || ""; c.function.arguments += tc.function.arguments || ""; }
              if (tFirst === null) tFirst = performance.now();
              if (!frame) frame = requestAnimationFrame(paint);
            }
          }
        }
      }
    } catch (e) {
      if (e.name === "AbortError") stopped = true;
      else m.error = String(e.message || e);
    } finally {
      controller = null;
      if (frame) cancelAnimationFrame(frame);
      paint();
      body.classList.remove("cursor");
      if (m.error) body.append(el("div", "err", m.error));
      const tokens = usage ? usage.completion_tokens : chunks;
      const secs = (performance.now() - (tFirst || t0)) / 1000;
      m.stats = { tokens, tps: tokens > 1 && secs > 0 ? (tokens - 1) / secs : 0, stopped, error: !!m.error,
        prompt: usage ? usage.prompt_tokens : undefined, ms: Math.round(performance.now() - t0) };
      stats.textContent = fmtStats(m.stats);
      regen.hidden = false;
      box.dataset.done = "1";
      busy(false);
      persist();
    }
  }

  function send() {
    const text = $("input").value.trim();
    if ((!text && !pending.length) || controller || !conv()) return;
    const c = conv();
    c.messages.push({ role: "user", content: text, images: pending });
    if (c.title === "New chat") c.title = (text || "image").slice(0, 40);
    pending = []; renderPreviews();
    $("input").value = ""; autosize();
    persist(); render();
    generate();
  }
  function regenerate(idx) {
    if (controller) return;
    const c = conv();
    c.messages.length = idx;  // drop this answer and anything after it
    persist(); render(); generate();
  }
  function editAt(idx) {
    if (controller) return;
    const c = conv(), m = c.messages[idx];
    $("input").value = m.content; pending = (m.images || []).slice(); renderPreviews();
    c.messages.length = idx;
    persist(); render(); autosize(); $("input").focus();
  }

  // ---- Attachments ---------------------------------------------------------------------------
  function addFiles(files) {
    for (const f of files) {
      if (!f.type.startsWith("image/") && !f.type.startsWith("video/")) continue;
      const rd = new FileReader();
      rd.onload = () => { pending.push(rd.result); renderPreviews(); };
      rd.readAsDataURL(f);
    }
  }
  function renderPreviews() {
    const p = $("previews"); p.textContent = "";
    pending.forEach((u, i) => {
      const d = el("div", "pv"), im = media(u, "preview of the attached"), x = el("button", null, "\u00d7");
      x.type = "button"; x.title = "Remove";
      x.onclick = () => { pending.splice(i, 1); renderPreviews(); };
      d.append(im, x); p.append(d);
    });
  }

  // ---- Wiring --------------------------------------------------------------------------------
  const input = $("input");
  function autosize() { input.style.height = "auto"; input.style.height = Math.min(input.scrollHeight + 2, 192) + "px"; }
  input.addEventListener("input", autosize);
  input.addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); } });
  input.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.length) { e.preventDefault(); addFiles(files); }
  });
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("file").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
  log.addEventListener("dragover", (e) => { e.preventDefault(); log.classList.add("drop"); });
  log.addEventListener("dragleave", () => log.classList.remove("drop"));
  log.addEventListener("drop", (e) => { e.preventDefault(); log.classList.remove("drop"); addFiles(e.dataTransfer.files); });
  $("thinking").checked = !!settings.thinking;
  $("thinking").addEventListener("change", (e) => { settings.thinking = e.target.checked; settings.thinkingSet = true; saveSettings(); });
  $("preset").value = settings.preset || "";
  $("preset").addEventListener("change", (e) => {
    const p = PRESETS[e.target.value];
    settings.preset = e.target.value;
    if (p) {
      for (const k of ["temperature", "top_p", "top_k", "presence_penalty"]) { settings[k] = String(p[k]); $(k).value = settings[k]; }
      settings.thinking = p.thinking; settings.thinkingSet = true; $("thinking").checked = p.thinking;
    }
    saveSettings();
  });
  $("model").addEventListener("change", (e) => { settings.model = e.target.value; saveSettings(); modelDefaults(settings.model); });
  for (const k of PARAMS) {
    $(k).value = settings[k] || "";
    $(k).addEventListener("input", (e) => {
      settings[k] = e.target.value;
      if (k !== "max_tokens" && settings.preset) { settings.preset = ""; $("preset").value = ""; }  // now custom
      saveSettings();
    });
  }
  $("new").addEventListener("click", () => { if (!controller) { const c = conv(); if (!c || c.messages.length) newConv(); render(); input.focus(); } });
  $("convs").addEventListener("change", (e) => { if (controller) { e.target.value = cur; return; } cur = e.target.value; persist(); render(); });
  $("clear").addEventListener("click", () => {
    if (controller || !window.confirm("Delete this conversation?")) return;
    convs = convs.filter((c) => c.id !== cur); cur = convs.length ? convs[0].id : null;
    if (!cur) newConv(); persist(); render();
  });
  $("key").addEventListener("click", () => { if (askKey()) loadModels(); });
  $("export").addEventListener("click", () => {
    const blob = new Blob([JSON.stringify({ format: "deltarun-chat-1", conversations: convs }, null, 2)], { type: "application/json" });
    const a = el("a"); a.href = URL.createObjectURL(blob); a.download = "deltarun-chats.json";
    document.body.append(a); a.click(); a.remove(); setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  });
  $("import").addEventListener("change", async (e) => {
    const f = e.target.files[0]; e.target.value = "";
    if (!f) return;
    try {
      const j = JSON.parse(await f.text());
      const list = Array.isArray(j) ? j : j.conversations;
      if (!Array.isArray(list)) throw new Error("no conversations in this file");
      const ids = new Set(convs.map((c) => c.id));
      for (const c of list) {
        if (!c || !Array.isArray(c.messages)) continue;
        if (!c.id || ids.has(c.id)) c.id = Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
        convs.unshift({ id: c.id, title: String(c.title || "Imported"), messages: c.messages });
        cur = c.id;
      }
      persist(); render();
    } catch (err) { showError("import failed: " + err.message); }
  });

  window.deltarunChat = { markdown, highlight };  // for tests
  loadModels();
  loadConvs().then((list) => {
    convs = list;
    if (!conv()) { cur = convs.length ? convs[0].id : null; if (!cur) newConv(); }
    render();
    document.body.dataset.ready = "1";
  }, (e) => { showError("could not read saved chats: " + e.message); convs = []; newConv(); render(); document.body.dataset.ready = "1"; });
})();
