"""The chat page at `/` in a real headless browser (Debian's chromium driven by Playwright) against a live
`deltarun serve` with the tiny checkpoint: streamed answer, thinking toggle and block, stop mid-stream,
image attachment, reload restores the conversation (IndexedDB), Markdown is escaped, `--api-key` asks for the key.
A screenshot of each state lands in the test's tmp dir (its path is printed). No console errors."""
import io
import json
import os
from pathlib import Path

import pytest
from server_helpers import live_server, wait_idle

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if not os.path.exists(CHROMIUM):
    pytest.skip(f"web page tests need Debian's chromium at {CHROMIUM} (apt-get install -y chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="web page tests need `pip install playwright`")



@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Page:
    """A page with its console errors, the chat requests it sent and numbered screenshots."""

    def __init__(self, browser, shots: Path, **ctx):
        self.ctx = browser.new_context(**ctx)
        self.page = self.ctx.new_page()
        self.page.set_default_timeout(15000)
        self.errors: list[str] = []
        self.requests: list[dict] = []
        self.shots = shots
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: r.url.endswith("/v1/chat/completions")
                     and self.requests.append(json.loads(r.post_data)))

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def setting(self, key: str, value) -> None:
        self.page.evaluate("([k, v]) => { const e = document.getElementById(k); e.value = v;"
                           " e.dispatchEvent(new Event('input')); }", [key, str(value)])

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def last_done(self, n: int):
        """Wait for the n-th assistant message (1-based) to finish; return its locator."""
        msg = self.page.locator(".msg.assistant").nth(n - 1)
        msg.and_(self.page.locator("[data-done='1']")).wait_for()
        return msg


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 60, 40)).save(buf, format="PNG")
    return buf.getvalue()


def test_chat_page(browser, chat_ckpt, tmp_path):
    live = live_server(chat_ckpt)
    print(f"\nscreenshots: {tmp_path}")
    t = Page(browser, tmp_path, viewport={"width": 1000, "height": 720})
    page = t.page
    page.goto(live.url + "/")
    page.locator("#model option[value='tiny']").wait_for(state="attached")
    page.locator("body[data-ready='1']").wait_for(state="attached")
    # the thinking toggle's default comes from the model (/api/show): on, since "tiny" is no 0.8B/2B model
    page.wait_for_function("document.getElementById('thinking').checked")
    page.uncheck("#thinking")
    paint = page.evaluate("performance.getEntriesByType('paint').map(e => [e.name, e.startTime])")
    print(f"paint timings (ms): {paint}")
    assert page.title() == "deltarun chat"

    # 1. thinking off: the answer streams into the body, with a token count and tokens/s
    t.setting("max_tokens", 12)
    t.send("Hello there")
    a1 = t.last_done(1)
    assert a1.locator(".body").inner_text().strip()
    assert a1.locator(".think").is_hidden()
    assert "tokens" in a1.locator(".stats").inner_text() and "tok/s" in a1.locator(".stats").inner_text()
    req = t.requests[-1]
    assert req["stream"] is True and req["stream_options"] == {"include_usage": True}
    assert req["chat_template_kwargs"] == {"enable_thinking": False} and req["max_tokens"] == 12
    assert req["model"] == "tiny" and req["messages"] == [{"role": "user", "content": "Hello there"}]
    t.shot("1-answer")

    # 2. thinking on: the reasoning goes to the collapsible block, apart from the answer
    page.check("#thinking")
    t.send("Think first")
    a2 = t.last_done(2)
    assert t.requests[-1]["chat_template_kwargs"] == {"enable_thinking": True}
    assert len(t.requests[-1]["messages"]) == 3  # the history went along
    think = a2.locator(".think")
    assert think.is_visible() and think.locator(".text").inner_text().strip()
    t.shot("2-thinking")

    # 3. stop mid-stream: text is already on screen while generating, Stop ends it and the server idles
    t.setting("max_tokens", 3000)
    t.send("Write a long essay")
    a3 = page.locator(".msg.assistant").nth(2)
    page.wait_for_function("() => { const m = document.querySelectorAll('.msg.assistant')[2];"
                           " return m && m.querySelector('.think .text').textContent.length > 20; }")
    assert page.locator("#stop").is_visible() and a3.get_attribute("data-done") is None
    t.shot("3-streaming")
    page.click("#stop")
    a3 = t.last_done(3)
    assert "stopped" in a3.locator(".stats").inner_text()
    assert page.locator("#send").is_visible()
    assert wait_idle(live.llm), "the server kept generating after Stop"
    t.shot("3-stopped")

    # 4. an image from the file picker: previewed, then sent as an image_url data URL part
    page.uncheck("#thinking")
    t.setting("max_tokens", 6)
    page.set_input_files("#file", files=[{"name": "red.png", "mimeType": "image/png", "buffer": _png()}])
    page.locator("#previews img").wait_for()
    t.shot("4-attachment-preview")
    t.send("What is in this picture?")
    t.last_done(4)
    parts = t.requests[-1]["messages"][-1]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1] == {"type": "text", "text": "What is in this picture?"}
    assert page.locator(".msg.user img").count() == 1 and page.locator("#previews img").count() == 0
    t.shot("4-image-sent")

    # 5. reload: the conversation (texts, thinking, stats, image) comes back from IndexedDB
    before = page.locator(".msg .body").all_inner_texts()
    assert page.evaluate(IDB_COUNT) == 1 and page.evaluate("localStorage.getItem('deltarun.convs')") is None
    page.reload()
    page.locator(".msg.assistant").nth(3).wait_for()
    assert page.locator(".msg .body").all_inner_texts() == before
    assert page.locator(".msg.user img").count() == 1 and page.is_checked("#thinking") is False
    assert "stopped" in page.locator(".msg.assistant .stats").nth(2).inner_text()
    t.shot("5-reloaded")

    # 6. Markdown: HTML is escaped first; code, bold, lists and http links render
    html = page.evaluate("s => window.deltarunChat.markdown(s)",
                         "**b** <script>alert(1)</script> `x<y`\n- one\n- two\n\n```py\na<b\n```\n"
                         "[ok](https://example.com) [bad](javascript:alert(1))")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<strong>b</strong>" in html and "<code>x&lt;y</code>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert '<pre><code data-lang="py">a&lt;b</code></pre>' in html
    assert 'href="https://example.com"' in html and 'href="javascript' not in html
    hl = lambda code, lang: page.evaluate("([c, l]) => window.deltarunChat.highlight(c, l)", [code, lang])
    assert hl('const s = "<b>"; // x<y', "ts") == ('<span class="tok-k">const</span> s = <span class="tok-s">'
                                                 '&quot;&lt;b&gt;&quot;</span>; <span class="tok-c">// x&lt;y</span>')
    assert hl('{"a": [1.5, true, null]}', "json") == ('{<span class="tok-s">&quot;a&quot;</span>: [<span class="tok-n">'
                                                      '1.5</span>, <span class="tok-l">true</span>, '
                                                      '<span class="tok-l">null</span>]}')
    assert hl("echo $HOME # hi\nx=a#b", "bash") == ('<span class="tok-k">echo</span> <span class="tok-v">$HOME</span> '
                                                  '<span class="tok-c"># hi</span>\nx=a#b')
    assert hl("int x = 0x1F; /* c", "cpp").endswith('<span class="tok-n">0x1F</span>; <span class="tok-c">/* c</span>')
    assert hl("<i>", "klingon") == "&lt;i&gt;"
    html = page.evaluate("s => window.deltarunChat.markdown(s)", "`$x$` and \\(a<b\\) and $y$")
    assert html == ('<p><code>$x$</code> and <span class="math">a&lt;b</span> and <span class="math">y</span></p>')

    # 7. a phone-sized screen (same browser storage): nothing wider than the screen
    page.set_viewport_size({"width": 390, "height": 760})
    page.reload()
    page.locator(".msg.assistant").nth(3).wait_for()
    t.shot("6-phone")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    page.emulate_media(color_scheme="dark")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(22, 23, 26)"
    t.shot("7-phone-dark")

    assert not t.errors, t.errors
    t.ctx.close()


IDB_COUNT = """() => new Promise((res, rej) => { const rq = indexedDB.open('deltarun'); rq.onerror = rej;
  rq.onsuccess = () => { const c = rq.result.transaction('convs').objectStore('convs').count();
    c.onsuccess = () => { rq.result.close(); res(c.result); }; }; })"""

CRAFTED = ("Here:\n```python\ndef f(x):\n    return 'a<b'  # note\n```\n"
           "Euler: $e^{i\\pi}+1=0$, costs $5 and $6.\n\n$$\\int_0^1 x\\,dx = \\tfrac12$$\n")


def _sse(content: str) -> str:
    chunks = [{"delta": {"role": "assistant", "reasoning_content": "Let me think."}}]
    chunks += [{"delta": {"content": content[i:i + 9]}} for i in range(0, len(content), 9)]
    chunks.append({"delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                             "function": {"name": "get_weather", "arguments": ""}}]}})
    chunks.append({"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris", "days": 2}'}}]}})
    out = [{"id": "x", "object": "chat.completion.chunk", "model": "tiny", "choices": [dict(index=0, **c)]}
           for c in chunks]
    out.append({"id": "x", "object": "chat.completion.chunk", "model": "tiny", "choices": [],
                "usage": {"prompt_tokens": 5, "completion_tokens": len(chunks), "total_tokens": 5 + len(chunks)}})
    return "".join(f"data: {json.dumps(o)}\n\n" for o in out) + "data: [DONE]\n\n"


def test_crafted_answer(browser, chat_ckpt, tmp_path):
    """A crafted SSE answer (the network intercepted): highlighted code, KaTeX math, a tool-call block; presets
    and a video attachment in the request body; reload restores all from IndexedDB; localStorage data migrates."""
    live = live_server(chat_ckpt)
    t = Page(browser, tmp_path, viewport={"width": 1000, "height": 800})
    page = t.page
    page.route("**/v1/chat/completions", lambda r: r.fulfill(status=200, body=_sse(CRAFTED),
                                                             headers={"Content-Type": "text/event-stream"}))
    page.goto(live.url + "/")
    page.locator("#model option[value='tiny']").wait_for(state="attached")
    page.locator("body[data-ready='1']").wait_for(state="attached")
    assert page.evaluate("[...document.scripts].every(s => !s.src.includes('katex'))")  # lazily, only for math

    # presets from the model cards fill the settings and go along in the request (top_k as an extra field)
    page.click("#settings summary")
    page.select_option("#preset", "coding")
    assert page.input_value("#temperature") == "0.6" and page.input_value("#top_k") == "20"
    page.set_input_files("#file", files=[{"name": "clip.mp4", "mimeType": "video/mp4",
                                          "buffer": b"\0\0\0\x18ftypmp42"}])
    page.locator("#previews video").wait_for()
    t.shot("8-preset-video")
    page.click("#settings summary")
    t.send("Show me code, math and a tool")
    a = t.last_done(1)
    req = t.requests[-1]
    assert (req["temperature"], req["top_p"], req["top_k"], req["presence_penalty"]) == (0.6, 0.95, 20, 0)
    assert req["chat_template_kwargs"] == {"enable_thinking": True}
    parts = req["messages"][-1]["content"]
    assert parts[0]["type"] == "video_url" and parts[0]["video_url"]["url"].startswith("data:video/mp4;base64,")

    # code highlighted (escaped), math typeset by KaTeX ($5 and $6 stay text), tool call in its own block
    code = a.locator("pre code[data-lang='python']")
    assert code.locator(".tok-k").first.inner_text() == "def"
    assert code.locator(".tok-s").inner_text() == "'a<b'" and code.locator(".tok-c").inner_text() == "# note"
    a.locator(".katex").nth(1).wait_for()
    assert a.locator(".katex").count() == 2 and a.locator(".katex-display").count() == 1
    assert "costs $5 and $6." in a.locator(".body").inner_text()
    tool = a.locator(".tools details.tool")
    assert tool.locator("summary").inner_text() == "Tool call: get_weather"
    assert "Paris" not in a.locator(".body").inner_text()
    tool.locator("summary").click()
    assert json.loads(tool.locator("pre").inner_text()) == {"city": "Paris", "days": 2}
    page.wait_for_function("document.fonts.status === 'loaded'")
    t.shot("9-code-math-tool")

    # the non-thinking preset; reload brings everything back from IndexedDB
    page.click("#settings summary")
    page.select_option("#preset", "nonthinking")
    page.click("#settings summary")
    assert not page.is_checked("#thinking")
    t.send("again")
    t.last_done(2)
    req = t.requests[-1]
    assert (req["temperature"], req["top_p"], req["top_k"], req["presence_penalty"]) == (1.0, 1.0, 20, 2.0)
    assert req["chat_template_kwargs"] == {"enable_thinking": False}
    page.reload()
    page.locator(".msg.assistant").nth(1).wait_for()
    assert page.locator(".msg.user video").count() == 1 and page.locator(".tools details.tool").count() == 2
    page.locator(".msg.assistant .katex").nth(3).wait_for()
    assert page.input_value("#preset") == "nonthinking"
    t.shot("10-reloaded")
    assert not t.errors, t.errors
    t.ctx.close()

    # an older page's localStorage conversations move to IndexedDB once
    old = [{"id": "old1", "title": "From localStorage",
            "messages": [{"role": "user", "content": "old question"},
                         {"role": "assistant", "content": "**old** answer"}]}]
    t = Page(browser, tmp_path, viewport={"width": 800, "height": 600})
    t.page.add_init_script("if (!sessionStorage.getItem('seeded')) { sessionStorage.setItem('seeded', '1');"
                           f" localStorage.setItem('deltarun.convs', {json.dumps(json.dumps(old))});"
                           " localStorage.setItem('deltarun.current', '\"old1\"'); }")
    t.page.goto(live.url + "/")
    t.page.locator(".msg.assistant strong").wait_for()
    assert t.page.evaluate("localStorage.getItem('deltarun.convs')") is None and t.page.evaluate(IDB_COUNT) == 1
    t.page.reload()
    t.page.locator(".msg.assistant strong").wait_for()
    assert t.page.locator("#convs option").all_inner_texts() == ["From localStorage"]
    assert not t.errors, t.errors
    t.ctx.close()


def test_api_key_page(browser, chat_ckpt, tmp_path):
    """With --api-key the page and its assets load without the key; the page asks once and sends Bearer."""
    live = live_server(chat_ckpt, api_key="sekret")
    t = Page(browser, tmp_path, viewport={"width": 800, "height": 600})
    asked = []
    t.page.on("dialog", lambda d: (asked.append(d.message), d.accept("sekret")))
    t.page.goto(live.url + "/")
    t.page.locator("#model option[value='tiny']").wait_for(state="attached")
    assert len(asked) == 1
    t.setting("max_tokens", 4)
    t.send("hi")
    a = t.last_done(1)
    assert not a.locator(".err").count() and "tokens" in a.locator(".stats").inner_text()
    t.page.reload()
    t.page.locator("#model option[value='tiny']").wait_for(state="attached")
    assert len(asked) == 1  # remembered
    # the only console error allowed is the browser's note about the first, keyless 401
    assert all("401" in e for e in t.errors) and len(t.errors) <= 1, t.errors
    t.ctx.close()
