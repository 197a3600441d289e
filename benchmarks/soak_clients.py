"""The soak benchmark's clients: one streaming request of each API kind, and the loop one client runs.

Kinds: OpenAI chat (`/v1/chat/completions`) and completions (`/v1/completions`), Ollama chat (`/api/chat`)
and generate (`/api/generate`). Each request may carry an image (a small PNG: a data URL for OpenAI,
base64 for Ollama; not on /v1/completions, which takes no media), tools (chat kinds) or a JSON schema
(`response_format` / Ollama `format`), and may be cut off mid-stream on purpose (an intentional
disconnect: counted apart, never a failure). A request fails when the status is not 200, the stream
carries an error, breaks, or ends without its end marker (`data: [DONE]` / `"done": true`).
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

KINDS = ("openai-chat", "openai-completions", "ollama-chat", "ollama-generate")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city today.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "score": {"type": "integer"}},
          "required": ["answer", "score"]}
PROMPTS = ["Tell me a story about a lighthouse.", "Explain how a bicycle stays upright.",
           "Write a short poem about rain.", "What should I cook tonight with rice and beans?",
           "Summarise the history of the printing press.", "Describe this picture in detail."]


@dataclass
class Mix:
    """What the clients send: API kinds and the fraction of requests with each feature."""

    kinds: tuple[str, ...] = KINDS
    image: float = 0.15
    tools: float = 0.15  # chat kinds only
    schema: float = 0.15
    disconnect: float = 0.10
    min_tokens: int = 64  # answer length (max_tokens / num_predict), drawn uniformly per request
    max_tokens: int = 256
    # None: a request under way at the deadline runs to its end; a number: it is cut that many seconds after
    # the deadline (counted as cut_at_end, not a failure), so a short run ends on time
    grace: float | None = None


@dataclass
class Results:
    """What every client recorded (one event loop: plain lists, no locking)."""

    ok: int = 0
    disconnected: int = 0  # intentional, mid-stream
    cut_at_end: int = 0  # under way when the run's time (+ Mix.grace) was up
    failures: list[str] = field(default_factory=list)
    tokens: int = 0  # generated, as the server counted them (usage / eval_count); chunks for cut streams
    ttft: list[float] = field(default_factory=list)  # seconds to the first text chunk
    itl: list[float] = field(default_factory=list)  # seconds between successive text chunks
    by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return self.ok + self.disconnected + self.cut_at_end + len(self.failures)


def png_bytes(seed: int, size: int = 32) -> bytes:
    import numpy as np
    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def build(kind: str, model: str, rng: random.Random, mix: Mix, image_b64: str) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of one streaming request of `kind`, its features drawn from `mix`."""
    text = rng.choice(PROMPTS) + f" (#{rng.randrange(10**6)})"  # distinct prompts: no free prefix-cache ride
    n = rng.randint(mix.min_tokens, mix.max_tokens)
    image = kind != "openai-completions" and rng.random() < mix.image
    tools = kind in ("openai-chat", "ollama-chat") and not image and rng.random() < mix.tools
    schema = not tools and rng.random() < mix.schema
    if kind == "openai-chat":
        content: Any = text if not image else [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64}},
            {"type": "text", "text": text}]
        body: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "max_tokens": n}
        if tools:
            body["tools"] = TOOLS
        if schema:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
        return "/v1/chat/completions", {"model": model, "stream": True,
                                        "stream_options": {"include_usage": True}, **body}
    if kind == "openai-completions":
        body = {"prompt": text, "max_tokens": n}
        if schema:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
        return "/v1/completions", {"model": model, "stream": True, "stream_options": {"include_usage": True}, **body}
    body = {"options": {"num_predict": n}}
    if schema:
        body["format"] = SCHEMA
    if kind == "ollama-chat":
        msg: dict[str, Any] = {"role": "user", "content": text, **({"images": [image_b64]} if image else {})}
        body["messages"] = [msg]
        if tools:
            body["tools"] = TOOLS
        return "/api/chat", {"model": model, "stream": True, **body}
    if image:
        body["images"] = [image_b64]
    return "/api/generate", {"model": model, "prompt": text, "stream": True, **body}


def parse_line(kind: str, line: str) -> tuple[str | None, dict | None, bool]:
    """(text in this line, the server's final usage-like record, end marker seen) of one stream line;
    raises RuntimeError on an error event."""
    if kind.startswith("openai"):
        if not line.startswith("data: "):
            return None, None, False
        if line == "data: [DONE]":
            return None, None, True
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(f"error event: {chunk['error']}")
        text = ""
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text += choice.get("text") or delta.get("content") or delta.get("reasoning_content") or ""
            text += "".join(json.dumps(t) for t in delta.get("tool_calls") or [])
        usage = chunk.get("usage")
        return text, ({"tokens": usage["completion_tokens"]} if usage else None), False
    if not line.strip():
        return None, None, False
    chunk = json.loads(line)
    if "error" in chunk:
        raise RuntimeError(f"error event: {chunk['error']}")
    part = chunk.get("message") or chunk
    text = (part.get("content") or part.get("response") or "") + (part.get("thinking") or "")
    text += "".join(json.dumps(t) for t in part.get("tool_calls") or [])
    done = bool(chunk.get("done"))
    return text, ({"tokens": chunk.get("eval_count", 0)} if done else None), done


async def one_request(http: httpx.AsyncClient, url: str, kind: str, path: str, body: dict, cut: int | None,
                      res: Results) -> None:
    """Send one request and record it; `cut`: disconnect after this many text chunks (None: read to the end)."""
    start = last = time.perf_counter()
    chunks, tokens, done = 0, None, False
    try:
        async with http.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                res.failures.append(f"{kind}: HTTP {r.status_code} {r.text[:200]}")
                return
            async for line in r.aiter_lines():
                text, final, end = parse_line(kind, line)
                done = done or end
                if final is not None:
                    tokens = final["tokens"]
                if text:
                    now = time.perf_counter()
                    (res.ttft if chunks == 0 else res.itl).append(now - (start if chunks == 0 else last))
                    last, chunks = now, chunks + 1
                    if cut is not None and chunks >= cut:
                        res.disconnected += 1  # leaving the block closes the connection mid-stream
                        res.tokens += chunks
                        return
    except (httpx.HTTPError, RuntimeError, ValueError) as e:  # a failure to report, not to crash the run on
        res.failures.append(f"{kind}: {type(e).__name__}: {str(e)[:200]}")
        return
    if not done:
        res.failures.append(f"{kind}: the stream ended without its end marker after {chunks} chunks")
        return
    res.ok += 1
    res.tokens += tokens if tokens is not None else chunks
    res.by_kind[kind] = res.by_kind.get(kind, 0) + 1


async def warm_up(url: str, model: str, mix: Mix, res: Results, tokens: int = 8) -> None:
    """One short request of every kind with each feature it takes, all at once, before the clock starts: what
    loads on first use (the vision tower, the grammar compiler, the tool parser) is loaded before the RSS
    reference. Only failures are recorded (into `res`)."""
    rng, image_b64 = random.Random(-1), base64.b64encode(png_bytes(0)).decode()
    features = [Mix(mix.kinds, image=1.0 * (f == "image"), tools=1.0 * (f == "tools"), schema=1.0 * (f == "schema"),
                    min_tokens=tokens, max_tokens=tokens) for f in ("plain", "image", "tools", "schema")]
    scratch = Results()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as http:
        await asyncio.gather(*(one_request(http, url, kind, *build(kind, model, rng, m, image_b64), None, scratch)
                               for kind in mix.kinds for m in features))
    res.failures += [f"warm-up: {f}" for f in scratch.failures]


async def client(url: str, model: str, mix: Mix, until: float, seed: int, res: Results) -> None:
    """One client: requests back to back until `until` (perf_counter); the one under way then completes."""
    rng = random.Random(seed)
    image_b64 = base64.b64encode(png_bytes(seed)).decode()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as http:
        while time.perf_counter() < until:
            kind = rng.choice(mix.kinds)
            path, body = build(kind, model, rng, mix, image_b64)
            cut = rng.randint(1, 16) if rng.random() < mix.disconnect else None
            left = until - time.perf_counter() + (mix.grace or 0.0)
            try:
                await asyncio.wait_for(one_request(http, url, kind, path, body, cut, res),
                                       None if mix.grace is None else max(0.0, left))
            except TimeoutError:  # cancelled inside the stream: the connection closes, the server aborts
                res.cut_at_end += 1
            await asyncio.sleep(0)
